"""The token-level view of the paper's Figure 1 (right): a test problem's reference solution with
each token shaded by its loss, for the checkpoint to keep and an over-memorized checkpoint side by
side, and the perplexity of each sentence.

Per-token losses are read from the samples files (`tokens`, `token_nll`: `overmem run` and
`overmem scan` write them for test splits; the training callback for its `token_splits`). A run
whose samples files do not store them gets one line saying how to get them.
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
from ..selection import Keep
from .html import esc, note, phase_chip

# A sentence ends at a newline, or at . ! ? followed by whitespace or the end (so "3.5" is one number).
_SENTENCE_END = re.compile(r"(?:[.!?]+(?=\s|$)|\n)\s*")
_CMAP = colormaps["Reds"]
_DARKEST = 0.85  # top of the colour map used, so the darkest token stays readable


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
    """The two checkpoints shown side by side (`early` left, `late` right), with why each was chosen."""

    split: str
    early: str
    early_label: str
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


def choose_checkpoints(phases: Mapping[str, Any], keep: Keep | None) -> CheckpointPair | None:
    """Left: the checkpoint to keep (`overmem.selection.checkpoint_to_keep`; the lowest perplexity
    when there is none or it is not on the phase split's curve). Right: the last over-memorized
    checkpoint (else the last checkpoint, whatever its label). When that is the kept one, the first
    checkpoint and the kept one are shown instead. None for a run of one checkpoint."""
    cps = phases.get("checkpoints") or []
    if len(cps) < 2:
        return None
    lowest = min(cps, key=lambda c: c["ppl"])
    kept = next((c for c in cps if keep is not None and c["checkpoint"] == keep.checkpoint), None)
    h = kept or lowest
    why_h = f"the checkpoint to keep ({keep.reason})" if kept else "lowest perplexity"
    om = [c for c in cps if c["label"] == "over_memorized"]
    late = om[-1] if om else cps[-1]
    if late["checkpoint"] == h["checkpoint"]:
        # Nothing later to compare with: show how training got there instead.
        first = cps[0]
        return CheckpointPair(phases["split"], first["checkpoint"], first["label"], h["checkpoint"], h["label"],
                              ("Perplexity never rose above its minimum, so there is no over-memorized checkpoint. "
                               if h is lowest else f"No over-memorized checkpoint follows {h['checkpoint']}. ")
                              + f"Left: {first['checkpoint']}, the first checkpoint; right: {h['checkpoint']}, {why_h}")
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


def collect_examples(run: RunDir, pair: CheckpointPair, *, n: int, first: str | None) -> list[ExampleView] | None:
    """The examples to show with their stored token losses; None when the samples files do not
    store them."""
    rows = {c: {r["id"]: r for r in read_jsonl(run.samples(c, pair.split))} for c in (pair.early, pair.late)}
    ids = choose_examples(rows[pair.early], rows[pair.late], n, first)
    views = [ExampleView(i, rows[pair.late][i].get("question"), rows={c: rows[c][i] for c in rows}) for i in ids]
    if not all("token_nll" in v.rows[c] for v in views for c in rows):
        return None
    for v in views:
        v.losses = {c: TokenLosses(v.rows[c]["tokens"], v.rows[c]["token_nll"]) for c in rows}
    return views


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


def render_token_view(anchor: str, pair: CheckpointPair, views: Sequence[ExampleView]) -> str:
    """The section body: example chooser, colour scale, and one pair of panels per example
    (all precomputed; the inline script shows the chosen one)."""
    if not views:
        return note(f"No {pair.split} example was scored by both {pair.early} and {pair.late}.")
    all_nll = [x for v in views for c in (pair.early, pair.late) for x in v.losses[c].nll]
    vmax = max(float(np.percentile(all_nll, 95)), 0.5)
    options = "".join(
        f'<option value="{esc(v.id)}">{esc(v.id)}: ppl {v.losses[pair.early].ppl:.2f} → '
        f"{v.losses[pair.late].ppl:.2f}</option>" for v in views
    )
    ramp = ", ".join(to_hex(_CMAP(x * _DARKEST)) for x in np.linspace(0, 1, 8))
    head = (f"<p>Split <b>{esc(pair.split)}</b>. {esc(pair.why)}. Each token of the reference solution is "
            f"shaded by its loss −log p(y<sub>t</sub> | x, y<sub>&lt;t</sub>) (hover for the value); the dark "
            f"badges give each sentence's perplexity. Token losses stored in the samples files at evaluation "
            "time.</p>"
            f'<p><label>Example: <select class="example-select" data-target="{esc(anchor)}-examples">{options}'
            f'</select></label> &nbsp; loss 0 <span class="scale" style="background:linear-gradient(to right, {ramp})">'
            f"</span> ≥ {vmax:.2f} nats</p>")
    blocks = []
    for k, v in enumerate(views):
        question = f'<div class="question"><b>Question:</b> {esc(v.question)}</div>' if v.question else ""
        blocks.append(
            f'<div class="token-example" data-example="{esc(v.id)}"{"" if k == 0 else " hidden"}>{question}'
            f'<div class="pair">{_panel(v, pair.early, pair.early_label, vmax)}'
            f"{_panel(v, pair.late, pair.late_label, vmax)}</div></div>"
        )
    return head + f'<div id="{esc(anchor)}-examples">{"".join(blocks)}</div>'


def token_view(
    run_root: Path, phases: Mapping[str, Any] | None, keep: Keep | None, anchor: str, *, n: int = 6,
    first: str | None = None,
) -> str | None:
    """The whole token view of one run, or None when the run has nothing to compare (no phases, or
    one checkpoint). A run whose samples files lack the losses gets a note saying how to get them."""
    pair = choose_checkpoints(phases, keep) if phases else None
    if pair is None:
        return None
    run = RunDir(run_root)
    if not (run.samples(pair.early, pair.split).exists() and run.samples(pair.late, pair.split).exists()):
        return note(f"No samples files for {pair.split} of {pair.early} and {pair.late}: nothing to show.")
    views = collect_examples(run, pair, n=n, first=first)
    if views is None:
        return note(f"The {pair.split} samples files of {pair.early} and {pair.late} do not store per-token losses; "
                    f"re-evaluate with token losses kept to see them (`overmem scan {run.root} --out NEW_FOLDER` keeps "
                    "them for test splits; the training callback for its `token_splits`).")
    return render_token_view(anchor, pair, views)
