"""The token-level view of the paper's Figure 1 (right): a test problem's reference solution with
each token shaded by its loss, for a healthy and an over-memorized checkpoint side by side, and
the perplexity of each sentence.

Per-token losses are read from the samples files (`tokens`, `token_nll`: `overmem run` and
`overmem scan` write them for test splits). For a run without them (made before they existed, or
by the callback with a config.yaml and checkpoints beside it) they are computed here by loading
the two checkpoints and scoring only the examples shown; the view says which of the two it did.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

from ..results import RunDir, read_jsonl
from .html import esc, note, phase_chip

# A sentence ends at a newline, or at . ! ? followed by whitespace or the end (so "3.5" is one number).
_SENTENCE_END = re.compile(r"(?:[.!?]+(?=\s|$)|\n)\s*")
_CMAP = colormaps["Reds"]
_DARKEST = 0.85  # top of the colour map used, so the darkest token stays readable


class Unavailable(Exception):
    """Token losses are not stored and cannot be computed (the message says why)."""


@dataclass
class TokenLosses:
    """One reference solution as scored by one checkpoint."""

    tokens: list[str]
    nll: list[float]  # -log p(y_t | x, y_<t), one per token

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll)) if self.nll else float("nan")


@dataclass
class CheckpointPair:
    """The two checkpoints shown side by side, with why each was chosen."""

    split: str
    healthy: str
    healthy_label: str
    late: str
    late_label: str
    why: str


@dataclass
class ExampleView:
    """One example: its question and, per checkpoint, the token losses and the sample row."""

    id: str
    question: str | None
    losses: dict[str, TokenLosses] = field(default_factory=dict)
    rows: dict[str, Mapping[str, Any]] = field(default_factory=dict)


def sentence_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the sentences the tokens spell. A token in which a sentence
    ends (with the whitespace after it) closes that sentence."""
    starts = np.cumsum([0] + [len(t) for t in tokens])  # character offset of each token
    cuts = [m.end() for m in _SENTENCE_END.finditer("".join(tokens))]
    spans, begin, c = [], 0, 0
    for i in range(len(tokens)):
        while c < len(cuts) and cuts[c] <= starts[i]:
            c += 1
        if c < len(cuts) and cuts[c] <= starts[i + 1] and starts[i + 1] > starts[i]:
            spans.append((begin, i + 1))
            begin = i + 1
    if begin < len(tokens):
        spans.append((begin, len(tokens)))
    return spans


def sentence_ppl(nll: Sequence[float], span: tuple[int, int]) -> float:
    part = nll[span[0]:span[1]]
    return math.exp(sum(part) / len(part))


def choose_checkpoints(phases: Mapping[str, Any]) -> CheckpointPair | None:
    """Healthy: the lowest-perplexity checkpoint labelled healthy (else the perplexity minimum).
    Over-memorized: the last over-memorized checkpoint (else the last checkpoint, whatever its label).
    When the last checkpoint is the perplexity minimum, the first checkpoint and the minimum are
    shown instead. None for a run of one checkpoint."""
    cps = phases.get("checkpoints") or []
    if len(cps) < 2:
        return None
    healthy = [c for c in cps if c["label"] == "healthy"]
    h = min(healthy, key=lambda c: c["ppl"]) if healthy else min(cps, key=lambda c: c["ppl"])
    om = [c for c in cps if c["label"] == "over_memorized"]
    late = om[-1] if om else cps[-1]
    if late["checkpoint"] == h["checkpoint"]:
        # Perplexity never rose above its minimum: show how training got there instead.
        first = cps[0]
        return CheckpointPair(phases["split"], first["checkpoint"], first["label"], h["checkpoint"], h["label"],
                              f"Perplexity never rose above its minimum, so there is no over-memorized checkpoint. "
                              f"Left: {first['checkpoint']}, the first checkpoint; right: {h['checkpoint']}, the "
                              "lowest perplexity")
    why_h = "lowest perplexity among healthy checkpoints" if healthy else "lowest perplexity (no checkpoint is healthy)"
    why_l = ("last over-memorized checkpoint" if om
             else f"last checkpoint (labelled {late['label'].replace('_', ' ')}; none is over-memorized)")
    return CheckpointPair(phases["split"], h["checkpoint"], h["label"], late["checkpoint"], late["label"],
                          f"Left: {h['checkpoint']}, {why_h}; right: {late['checkpoint']}, {why_l}")


def choose_examples(
    a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]], n: int, first: str | None = None,
) -> list[str]:
    """Ids of `n` examples scored by both checkpoints: answered correctly by both first (the
    paper's point: accuracy holds), then by how much the perplexity rose from `a` to `b`.
    `first` (an example id) is put first; an unknown id raises ValueError."""
    def ok(r: Mapping[str, Any]) -> bool:
        return r.get("ppl") is not None and r.get("n_tokens", 1) > 0 and not math.isnan(r["ppl"])

    ids = [i for i in a if i in b and ok(a[i]) and ok(b[i])]
    ids.sort(key=lambda i: (not (a[i].get("correct", True) and b[i].get("correct", True)), -b[i]["ppl"] / a[i]["ppl"]))
    chosen = ids[:n]
    if first is not None:
        if first not in ids:
            raise ValueError(f"example {first!r} is not among the scored test examples; ids look like {ids[:3]}")
        chosen = [first, *[i for i in chosen if i != first]][:n]
    return chosen


def collect_examples(
    run: RunDir, pair: CheckpointPair, *, n: int, first: str | None, quiet: bool = True,
) -> tuple[list[ExampleView], str]:
    """The examples to show and where their token losses came from (stored or computed)."""
    rows = {c: {r["id"]: r for r in read_jsonl(run.samples(c, pair.split))} for c in (pair.healthy, pair.late)}
    ids = choose_examples(rows[pair.healthy], rows[pair.late], n, first)
    views = [ExampleView(i, rows[pair.late][i].get("question"), rows={c: rows[c][i] for c in rows}) for i in ids]
    if all("token_nll" in v.rows[c] for v in views for c in rows):
        for v in views:
            v.losses = {c: TokenLosses(v.rows[c]["tokens"], v.rows[c]["token_nll"]) for c in rows}
        return views, "Token losses stored in the samples files at evaluation time."
    try:
        compute_token_losses(run, pair, views, quiet=quiet)
    except (OSError, ValueError) as err:  # missing config, checkpoints or data
        raise Unavailable(str(err)) from err
    return views, (f"Token losses computed for this report by loading {pair.healthy} and {pair.late} "
                   "(the samples files do not store them).")


def compute_token_losses(run: RunDir, pair: CheckpointPair, views: Sequence[ExampleView], *, quiet: bool) -> None:
    """Score the shown examples' references with both checkpoints (the run's config.yaml says which
    model, data and lengths); fills `views[i].losses` and `.question`."""
    from tqdm.auto import tqdm

    from ..config import load_config
    from ..data.datasets import load_dataset_spec, parse_spec
    from ..models import load_checkpoint, load_model, load_tokenizer
    from ..scoring import response_pieces, score_examples

    if not run.config.exists():
        raise FileNotFoundError(f"{run.config}: needed to compute token losses (which model and data)")
    cfg = load_config(run.config)
    spec_text = cfg.data.tests.get(pair.split)
    if spec_text is None:
        raise ValueError(f"split {pair.split!r} is not a test set of the run's config")
    spec = parse_spec(spec_text, seed=cfg.data.seed)
    by_id = {ex.id: ex for ex in load_dataset_spec(spec, data_dir=cfg.data.data_dir,
                                                   field_map=cfg.data.field_map if spec.is_file else None)}
    missing = [v.id for v in views if v.id not in by_id]
    if missing:
        raise ValueError(f"examples {missing[:3]} not found in {spec_text}")
    examples = [by_id[v.id] for v in views]
    tokenizer = load_tokenizer(cfg.model)
    for ckpt in tqdm((pair.healthy, pair.late), desc="token losses", disable=quiet):
        path = run.checkpoints / ckpt
        model = load_checkpoint(path, cfg.model) if path.exists() or ckpt != "epoch-0" else load_model(cfg.model)
        scores = score_examples(model, tokenizer, examples, batch_size=cfg.eval.batch_size,
                                max_length=cfg.train.max_length)
        for v, ex, s in zip(views, examples, scores):
            v.question = ex.question
            v.losses[ckpt] = TokenLosses(response_pieces(tokenizer, ex.response, s.n_tokens),
                                         [-x for x in s.logprobs.tolist()])
        del model


def _shade(nll: float, vmax: float) -> tuple[str, str]:
    """Background and text colour of a token with loss `nll` on a 0..vmax scale."""
    r, g, b, _ = _CMAP(min(nll / vmax, 1.0) * _DARKEST)
    text = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#111"
    return to_hex((r, g, b)), text


def _tokens_html(losses: TokenLosses, vmax: float) -> str:
    out = []
    for start, end in sentence_spans(losses.tokens):
        # The sentence's badge goes after its last visible token, before trailing whitespace.
        last = max((i for i in range(start, end) if losses.tokens[i].strip()), default=end - 1)
        for i in range(start, end):
            bg, fg = _shade(losses.nll[i], vmax)
            out.append(f'<span class="tok" style="background:{bg};color:{fg}" '
                       f'title="-log p = {losses.nll[i]:.3f}">{esc(losses.tokens[i])}</span>')
            if i == last:
                ppl = sentence_ppl(losses.nll, (start, end))
                out.append(f'<span class="sppl" title="sentence perplexity">ppl {ppl:.2f}</span>')
    return "".join(out)


def _panel(view: ExampleView, ckpt: str, label: str, vmax: float) -> str:
    losses, row = view.losses[ckpt], view.rows.get(ckpt, {})
    verdict = ""
    if "correct" in row:
        answer = "no answer" if row.get("extracted") is None else f"answer {esc(row['extracted'])}"
        verdict = f" · greedy decoding: {answer}, {'correct' if row['correct'] else 'wrong'}"
    gen = ""
    if row.get("generation") is not None:
        gen = f"<details><summary>the checkpoint's own greedy solution</summary><pre>{esc(row['generation'])}</pre></details>"
    return (f'<div class="panel"><h4>{esc(ckpt)} {phase_chip(label)}</h4>'
            f"<div>reference perplexity <b>{losses.ppl:.3f}</b>{verdict}</div>"
            f'<div class="tokens">{_tokens_html(losses, vmax)}</div>{gen}</div>')


def render_token_view(anchor: str, pair: CheckpointPair, views: Sequence[ExampleView], source: str) -> str:
    """The section body: example chooser, colour scale, and one pair of panels per example
    (all precomputed; the inline script shows the chosen one)."""
    if not views:
        return note(f"No {pair.split} example was scored by both {pair.healthy} and {pair.late}.")
    all_nll = [x for v in views for c in (pair.healthy, pair.late) for x in v.losses[c].nll]
    vmax = max(float(np.percentile(all_nll, 95)), 0.5)
    options = "".join(
        f'<option value="{esc(v.id)}">{esc(v.id)}: ppl {v.losses[pair.healthy].ppl:.2f} → '
        f"{v.losses[pair.late].ppl:.2f}</option>" for v in views
    )
    ramp = ", ".join(to_hex(_CMAP(x * _DARKEST)) for x in np.linspace(0, 1, 8))
    head = (f"<p>Split <b>{esc(pair.split)}</b>. {esc(pair.why)}. Each token of the reference solution is "
            f"shaded by its loss −log p(y<sub>t</sub> | x, y<sub>&lt;t</sub>) (hover for the value); the dark "
            f"badges give each sentence's perplexity. {esc(source)}</p>"
            f'<p><label>Example: <select class="example-select" data-target="{esc(anchor)}-examples">{options}'
            f'</select></label> &nbsp; loss 0 <span class="scale" style="background:linear-gradient(to right, {ramp})">'
            f"</span> ≥ {vmax:.2f} nats</p>")
    blocks = []
    for k, v in enumerate(views):
        question = f'<div class="question"><b>Question:</b> {esc(v.question)}</div>' if v.question else ""
        blocks.append(
            f'<div class="token-example" data-example="{esc(v.id)}"{"" if k == 0 else " hidden"}>{question}'
            f'<div class="pair">{_panel(v, pair.healthy, pair.healthy_label, vmax)}'
            f"{_panel(v, pair.late, pair.late_label, vmax)}</div></div>"
        )
    return head + f'<div id="{esc(anchor)}-examples">{"".join(blocks)}</div>'


def token_view(
    run_root: Path, phases: Mapping[str, Any] | None, anchor: str, *, n: int = 6, first: str | None = None,
    quiet: bool = True,
) -> str | None:
    """The whole token view of one run, or None when the run has nothing to compare (no phases, or
    one checkpoint). A run whose losses can neither be read nor computed gets a note saying why."""
    pair = choose_checkpoints(phases) if phases else None
    if pair is None:
        return None
    run = RunDir(run_root)
    if not (run.samples(pair.healthy, pair.split).exists() and run.samples(pair.late, pair.split).exists()):
        return note(f"No samples files for {pair.split} of {pair.healthy} and {pair.late}: nothing to show.")
    try:
        views, source = collect_examples(run, pair, n=n, first=first, quiet=quiet)
    except Unavailable as err:
        return note(f"Token losses are not stored in this run and could not be computed: {err}")
    return render_token_view(anchor, pair, views, source)
