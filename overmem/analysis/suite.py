"""`overmem analyze`: run the behavioural analyses over a run's checkpoints, resumably.

    analyze(run_dir, ["epoch-3", "epoch-10", "path/to/merged"], ["ood", "mia"], cfg)

Checkpoints are names under RUN/checkpoints/, `epoch-0` (the base model, unless such a folder
exists), or model / adapter folders anywhere (named by their folder name). The analyses are
`ANALYSES`: ood, robustness, diversity, calibration, mia, premem; their settings are the
`analysis` section of the run config (`overmem.config.AnalysisConfig`).

Files, per analysis NAME:

    RUN/analysis/NAME.json                aggregates, written atomically after each checkpoint
    RUN/analysis/NAME/<checkpoint>.jsonl  one row per sample (query, example, generation)
    RUN/analysis/<figures>                PNG (+ SVG beside it) where the analysis has a figure

NAME.json:

    {"analysis": NAME,
     "description": "...",
     "settings": {...},                      every setting used, data specs resolved
     "checkpoints": {ckpt: {metric: value}}, in training order; "epoch" and "step" included
     "table": {"columns": ["checkpoint", ...], "rows": [[ckpt, value, ...], ...]},
     "figures": ["analysis/mia_roc.png", ...],   paths relative to RUN (PNG; an SVG lies beside each)
     "figures_of": [ckpt, ...],             the checkpoints the figures show (analyses with figures)
     "samples": {ckpt: "analysis/NAME/ckpt.jsonl"}}

plus, for premem only, "r2" (PM against test accuracy across runs, or null with the reason) and
"ranking" (the path of the exported ranking of training examples). Values are numbers, strings,
lists or null; undefined numbers (NaN) are written as null.

Resuming: a checkpoint listed in NAME.json whose samples file exists is done and is skipped.
The samples file is written (atomically) before NAME.json lists the checkpoint, so an
interruption leaves at most a samples file that the next run overwrites. Figures are drawn once
per invocation, after the last checkpoint, and redrawn by the next invocation if one was cut short. NAME.json records the
settings; analysing more checkpoints with different settings is refused with the setting named.
Everything that can fail on bad input (analysis names, checkpoints, data, settings) is checked
before anything is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import AnalysisConfig, ConfigError, RunConfig
from ..data.example import Example
from ..pipeline import _quiet_libraries, _release_memory  # shared with run/scan
from ..results import RunDir, read_jsonl, write_json, write_jsonl
from . import calibration, mia, ood, premem, robustness, runners
from .figures import plot_curves, plot_roc
from .sampling import AnalysisResult, Decoding

ANALYSIS_DIR = "analysis"
BASE = "epoch-0"


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Target:
    """A model to analyse: `path` None is the base model of the run config."""

    name: str
    path: Path | None
    epoch: float | None
    step: int | None


def resolve_checkpoints(run_root: str | Path, names: Sequence[str]) -> list[Target]:
    """Targets for checkpoint names (RUN/checkpoints/NAME, `epoch-0` = base) or model folders."""
    from ..models import is_adapter
    from ..pipeline import find_checkpoints

    run_root = Path(run_root)
    known = {c.name: c for c in find_checkpoints(run_root)} if (run_root / "checkpoints").is_dir() else {}
    targets: dict[str, Target] = {}
    for name in names:
        path = Path(name)
        if name in known:
            c = known[name]
            target = Target(c.name, c.path, c.epoch, c.step)
        elif name == BASE:
            target = Target(BASE, None, 0.0, 0)
        elif path.is_dir() and ((path / "config.json").exists() or is_adapter(path)):
            meta = {c.name: c for c in find_checkpoints(path.parent)} if _has_checkpoints(path.parent) else {}
            c = meta.get(path.resolve().name)
            target = Target(path.resolve().name, path, c.epoch if c else None, c.step if c else None)
        else:
            available = ", ".join([BASE, *known]) or "none"
            raise ConfigError(f"checkpoint {name!r}: not a checkpoint of {run_root} (available: {available}) "
                              "and not a model or adapter folder")
        if target.name in targets and targets[target.name].path != target.path:
            raise ConfigError(f"two checkpoints are named {target.name!r}; rename one of the folders")
        targets[target.name] = target
    if not targets:
        raise ConfigError("no checkpoints given (e.g. --checkpoints epoch-3 epoch-10)")
    return list(targets.values())


def _has_checkpoints(folder: Path) -> bool:
    from ..pipeline import find_checkpoints

    try:
        find_checkpoints(folder)
    except FileNotFoundError:
        return False
    return True


def _order_key(entry: Mapping[str, Any], name: str) -> tuple:
    """Training order: checkpoints with a known step first, by (step, epoch); then the rest by name."""
    step = entry.get("step")
    return (step is None, step or 0, entry.get("epoch") or 0.0, name)


# --------------------------------------------------------------------------------------------
# What every analysis sees: the run's config and its data


@dataclass
class Context:
    """The run being analysed, its config, and data loaded once for all analyses."""

    run: RunDir
    cfg: RunConfig

    @property
    def settings(self) -> AnalysisConfig:
        return self.cfg.analysis

    def load(self, spec: str, size: int | None = None) -> list[Example]:
        """A dataset spec, then a seeded sample of `size` (all if None or larger than the set)."""
        from ..data.datasets import load_dataset_spec, parse_spec, sample_examples

        parsed = parse_spec(spec, seed=self.cfg.data.seed)
        examples = load_dataset_spec(parsed, data_dir=self.cfg.data.data_dir,
                                     field_map=self.cfg.data.field_map if parsed.is_file else None)
        if size is not None and size < len(examples):
            examples = sample_examples(examples, size, self.settings.seed)
        return examples

    def first_test(self, field_name: str) -> str:
        if not self.cfg.data.tests:
            raise ConfigError(f"{field_name}: the run has no test set; give a dataset spec")
        return next(iter(self.cfg.data.tests.values()))

    @cached_property
    def pools(self) -> tuple[list[Example], list[Example], str, str]:
        """(training set, unseen examples of the same source, their descriptions), as the run made
        them (`overmem.pipeline.prepare_splits`): the unseen ones are the rest of the training source
        after its slice without questions seen in training, or the explicit validation set."""
        from ..data.datasets import parse_spec

        d = self.cfg.data
        if d.validation is not None:
            return self.load(d.train), self.load(d.validation), d.train, d.validation
        spec = parse_spec(d.train, seed=d.seed)
        if spec.start not in (None, 0) or spec.stop is None:
            raise ConfigError(f"data.train {d.train!r}: cannot tell the unseen examples of its source; "
                              "set analysis.mia.nonmembers")
        source = self.load(str(spec.unsliced()))
        train = source[: spec.stop]
        seen = {ex.question for ex in train}
        unseen = [ex for ex in source[spec.stop :] if ex.question not in seen]
        return train, unseen, d.train, f"{spec.unsliced()}[{spec.stop}:] (questions seen in training left out)"

    def decoding(self, sampled: Any | None = None) -> Decoding:
        """Greedy decoding with the run's generation settings, or sampling as `sampled` says."""
        g = self.cfg.generation
        common = dict(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=self.settings.seed,
                      stop_at_answer=g.stop_at_answer, cache=g.cache)
        if sampled is None:
            return Decoding(**common)
        return Decoding(temperature=sampled.temperature, top_p=sampled.top_p, n_samples=sampled.n_samples, **common)

    def common(self) -> dict[str, Any]:
        """Settings every analysis records: decoding and scoring limits, seed."""
        g = self.cfg.generation
        return {"seed": self.settings.seed, "max_new_tokens": g.max_new_tokens, "generation_batch_size": g.batch_size,
                "stop_at_answer": g.stop_at_answer, "max_length": self.cfg.train.max_length}


def _sample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    from ..data.datasets import sample_examples

    return examples if size is None or size >= len(examples) else sample_examples(examples, size, seed)


# --------------------------------------------------------------------------------------------
# The analyses: settings -> data -> per-checkpoint run -> table columns -> figures


Progress = Callable[[int], None]


@dataclass(frozen=True)
class Analysis:
    """One analysis: how to resolve its settings, load its data, run it on a model, and show it.

    `prepare(ctx)` returns (settings recorded in NAME.json, data handed to `run`, progress total);
    `run(ctx, data, model, tokenizer, progress)` gives an `AnalysisResult`; `columns(settings)`
    lists (column label, metric key) of the table; `finish(ctx, doc)` adds values derived from
    several checkpoints (optional); `figures(ctx, doc, fresh)` draws the figures of all checkpoints
    in `doc` (those in `fresh` were just computed) and returns their paths relative to RUN (optional).
    """

    name: str
    description: str
    prepare: Callable[[Context], tuple[dict[str, Any], Any, int]]
    run: Callable[[Context, Any, PreTrainedModel, PreTrainedTokenizerBase, Progress], AnalysisResult]
    columns: Callable[[dict[str, Any]], list[tuple[str, str]]]
    finish: Callable[[Context, dict[str, Any]], None] | None = None
    figures: Callable[[Context, dict[str, Any], set[str]], list[str]] | None = None


def _prepare_ood(ctx: Context):
    s = ctx.settings.ood
    sets, id_sets = (dict(s.sets), []) if s.sets else ood.default_sets(ctx.cfg.data.tests, _train_source(ctx.cfg))
    if s.id_sets is not None:
        id_sets = list(s.id_sets)
    unknown = [n for n in id_sets if n not in sets]
    if unknown:
        raise ConfigError(f"analysis.ood.id_sets: {', '.join(unknown)} not among the sets ({', '.join(sets)})")
    data = {name: ctx.load(spec, s.size) for name, spec in sets.items()}
    settings = {"sets": sets, "id_sets": id_sets, "size": s.size, "bootstrap": ctx.cfg.eval.bootstrap,
                "confidence": ctx.cfg.eval.confidence, "decoding": "greedy", **ctx.common()}
    return settings, (data, id_sets), sum(len(v) for v in data.values())


def _train_source(cfg: RunConfig) -> str:
    from ..data.datasets import parse_spec

    return parse_spec(cfg.data.train).name_or_path


def _run_ood(ctx, data, model, tok, progress):
    sets, id_sets = data
    return ood.ood_accuracy(model, tok, sets, id_sets=id_sets, decoding=ctx.decoding(), n_boot=ctx.cfg.eval.bootstrap,
                            confidence=ctx.cfg.eval.confidence, progress=progress)


def _prepare_robustness(ctx: Context):
    s = ctx.settings.robustness
    preambles = {**(robustness.PAPER_PREAMBLES if s.paper_preambles else {}), **s.preambles}
    if not preambles:
        raise ConfigError("analysis.robustness: no preambles (paper_preambles is false and preambles is empty)")
    if robustness.UNPERTURBED in preambles:
        raise ConfigError(f"analysis.robustness.preambles: the name {robustness.UNPERTURBED!r} is reserved")
    spec = s.data or ctx.first_test("analysis.robustness.data")
    examples = ctx.load(spec, s.size)
    settings = {"data": spec, "size": s.size, "preambles": preambles, "position": s.position,
                "bootstrap": ctx.cfg.eval.bootstrap, "confidence": ctx.cfg.eval.confidence, "decoding": "greedy",
                **ctx.common()}
    return settings, (examples, preambles), len(examples) * (1 + len(preambles))


def _run_robustness(ctx, data, model, tok, progress):
    examples, preambles = data
    return robustness.prompt_robustness(model, tok, examples, preambles, position=ctx.settings.robustness.position,
                                        decoding=ctx.decoding(), n_boot=ctx.cfg.eval.bootstrap,
                                        confidence=ctx.cfg.eval.confidence, progress=progress)


def _sampled_settings(ctx: Context, s: Any, field_name: str, **extra: Any) -> tuple[dict[str, Any], list[Example]]:
    spec = s.data or ctx.first_test(f"analysis.{field_name}.data")
    examples = ctx.load(spec, s.size)
    settings = {"data": spec, "size": s.size, "n_samples": s.n_samples, "temperature": s.temperature,
                "top_p": s.top_p, **extra, **ctx.common()}
    return settings, examples


def _prepare_diversity(ctx: Context):
    s = ctx.settings.diversity
    scorer = s.scorer
    label = ("policy_logprob (offline default: the policy's own mean token log-prob, not a reward model)"
             if scorer == runners.POLICY_LOGPROB else f"reward model {scorer}")
    settings, examples = _sampled_settings(ctx, s, "diversity", scorer=scorer, scorer_label=label,
                                           ead_ns=list(range(1, s.ead_max_n + 1)),
                                           sbert=(s.sbert_model or "all-MiniLM-L6-v2 (packaged)") if s.sbert else None)
    if scorer != runners.POLICY_LOGPROB:
        from ..models import ModelSource

        try:
            ModelSource.parse(scorer)
        except FileNotFoundError as err:
            raise ConfigError(f"analysis.diversity.scorer: {err}") from None
    if s.sbert:
        from .diversity import minilm_path

        if s.sbert_model is None:
            minilm_path()  # fails now, with the extra to install, rather than after sampling
    return settings, examples, len(examples)


def _run_diversity(ctx, examples, model, tok, progress):
    s = ctx.settings.diversity
    from .diversity import sbert_embed

    scorer = runners.policy_logprob_scorer if s.scorer == runners.POLICY_LOGPROB else runners.reward_model_scorer(s.scorer)
    embed = (lambda texts: sbert_embed(texts, s.sbert_model)) if s.sbert else None
    return runners.diversity_analysis(model, tok, examples, ctx.decoding(s), scorer=scorer,
                                      ead_ns=range(1, s.ead_max_n + 1), embed=embed,
                                      score_batch_size=ctx.cfg.eval.batch_size,
                                      max_length=ctx.cfg.train.max_length, progress=progress)


def _diversity_columns(settings):
    n = settings["n_samples"]
    cols = [("pass@1", "pass@1"), (f"pass@{n}", f"pass@{n}"), (f"BoN@{n}", f"bon@{n}"), ("EAD", "ead")]
    return cols + ([("SBERT", "sbert")] if settings.get("sbert") else [])


def _diversity_figures(ctx: Context, doc: dict[str, Any], fresh: set[str]) -> list[str]:
    n = doc["settings"]["n_samples"]
    ks = list(range(1, n + 1))
    panels = {"Pass@k": {}, "Best-of-k": {}}
    for ckpt, m in doc["checkpoints"].items():
        panels["Pass@k"][ckpt] = (ks, [m[f"pass@{k}"] for k in ks])
        panels["Best-of-k"][ckpt] = (ks, [m[f"bon@{k}"] for k in ks])
    return [_figure(ctx, plot_curves(panels, ctx.run.root / ANALYSIS_DIR / "diversity", xlabel="k", ylabel="accuracy"))]


def _prepare_calibration(ctx: Context):
    s = ctx.settings.calibration
    settings, examples = _sampled_settings(ctx, s, "calibration", n_bins=s.n_bins,
                                           confidence="mean token probability of the sampled response")
    return settings, examples, len(examples)


def _run_calibration(ctx, examples, model, tok, progress):
    s = ctx.settings.calibration
    return runners.calibration_analysis(model, tok, examples, ctx.decoding(s), n_bins=s.n_bins,
                                        score_batch_size=ctx.cfg.eval.batch_size,
                                        max_length=ctx.cfg.train.max_length, progress=progress)


def _calibration_figures(ctx: Context, doc: dict[str, Any], fresh: set[str]) -> list[str]:
    """One reliability diagram per checkpoint; only new or missing ones are drawn."""
    figures = []
    for ckpt in doc["checkpoints"]:
        out = ctx.run.root / ANALYSIS_DIR / "calibration" / f"{ckpt}_reliability"
        rows = [r for r in read_jsonl(ctx.run.root / doc["samples"][ckpt]) if r["n_tokens"] > 0]
        if not rows:
            continue
        if ckpt in fresh or not out.with_suffix(".png").exists():
            bins = calibration.reliability_bins([r["confidence"] for r in rows], [r["correct"] for r in rows],
                                                doc["settings"]["n_bins"])
            calibration.plot_reliability(bins, out, title=ckpt)
        figures.append(_relative(ctx, out.with_suffix(".png")))
    return figures


SYNTHETIC_NONMEMBERS = "synthetic:nonmembers"


def _prepare_mia(ctx: Context):
    s = ctx.settings.mia
    if s.members:
        members, members_desc = ctx.load(s.members), s.members
    else:
        members, train_desc = _train_only(ctx)
        members_desc = f"the run's training set ({train_desc})"
    if s.nonmembers:
        nonmembers, nonmembers_desc = ctx.load(s.nonmembers), s.nonmembers
    elif _train_source(ctx.cfg) == "synthetic":
        # The generator's own pool: worded like its training split (per item kind), which the
        # validation and test references are not, so that members and non-members differ only
        # in having been trained on.
        nonmembers_desc = SYNTHETIC_NONMEMBERS
        nonmembers = ctx.load(nonmembers_desc)
    else:
        _, nonmembers, _, unseen_desc = ctx.pools
        nonmembers_desc = f"unseen: {unseen_desc}"
    if not members or not nonmembers:
        which = "members" if not members else "nonmembers"
        raise ConfigError(f"analysis.mia.{which}: no examples ({members_desc if which == 'members' else nonmembers_desc})")
    seed = ctx.settings.seed
    members, nonmembers = _sample(members, s.size, seed), _sample(nonmembers, s.size, seed)
    if s.k not in s.ks:
        raise ConfigError(f"analysis.mia.k: {s.k} is not among analysis.mia.ks {s.ks}")
    settings = {"members": members_desc, "nonmembers": nonmembers_desc, "size": s.size, "n_members": len(members),
                "n_nonmembers": len(nonmembers), "ks": list(s.ks), "k": s.k, "scored": "reference responses",
                "score_direction": "higher = more likely a member", "batch_size": ctx.cfg.eval.batch_size,
                **ctx.common()}
    return settings, (members, nonmembers), 0


def _run_mia(ctx, data, model, tok, progress):
    members, nonmembers = data
    return runners.mia_analysis(model, tok, members, nonmembers, ks=ctx.settings.mia.ks,
                                batch_size=ctx.cfg.eval.batch_size, max_length=ctx.cfg.train.max_length)


def _mia_attacks(settings: Mapping[str, Any]) -> list[str]:
    k = settings["k"]
    return ["loss", "zlib", mia.score_name("min_k", k), mia.score_name("min_k++", k)]


def _mia_columns(settings):
    return [(f"{a} {label}", f"{a}/{key}") for a in _mia_attacks(settings)
            for label, key in (("AUROC", "auroc"), ("TPR@5%FPR", "tpr_at_5fpr"))]


def _mia_figures(ctx: Context, doc: dict[str, Any], fresh: set[str]) -> list[str]:
    curves: dict[str, dict[str, tuple]] = {a: {} for a in _mia_attacks(doc["settings"])}
    for ckpt in doc["checkpoints"]:
        rows = [r for r in read_jsonl(ctx.run.root / doc["samples"][ckpt]) if r["n_tokens"] > 0]
        for attack in curves:
            roc = mia.roc_metrics([r[attack] for r in rows], [r["member"] for r in rows])
            curves[attack][ckpt] = (roc["fpr"], roc["tpr"], roc["auroc"])
    return [_figure(ctx, plot_roc(curves, ctx.run.root / ANALYSIS_DIR / "mia_roc"))]


def _prepare_premem(ctx: Context):
    s = ctx.settings.premem
    if s.data is None:
        train, desc = _train_only(ctx)
        desc = f"the run's training set ({desc})"
        examples = _sample(train, s.size, ctx.settings.seed)
    else:
        desc = s.data
        examples = ctx.load(s.data, s.size)
    test_split = s.test_split or (next(iter(ctx.cfg.data.tests)) if ctx.cfg.data.tests else None)
    for other in s.compare_runs:
        if not (Path(other) / "config.yaml").exists():
            raise ConfigError(f"analysis.premem.compare_runs: {other} is not a run folder (no config.yaml)")
    settings = {"data": desc, "size": s.size, "n_samples": s.n_samples, "temperature": s.temperature,
                "top_p": s.top_p, "tau": s.tau, "test_split": test_split, "compare_runs": list(s.compare_runs),
                "batch_size": ctx.cfg.eval.batch_size, **ctx.common()}
    return settings, examples, len(examples)


def _train_only(ctx: Context) -> tuple[list[Example], str]:
    """The run's training set and its description, without requiring an unseen pool."""
    try:
        train, _, desc, _ = ctx.pools
    except ConfigError:
        train, desc = ctx.load(ctx.cfg.data.train), ctx.cfg.data.train
    return train, desc


def _run_premem(ctx, examples, model, tok, progress):
    s = ctx.settings.premem
    return runners.premem_checkpoint(model, tok, examples, ctx.decoding(s), tau=s.tau,
                                     score_batch_size=ctx.cfg.eval.batch_size,
                                     max_length=ctx.cfg.train.max_length, progress=progress)


def _finish_premem(ctx: Context, doc: dict[str, Any]) -> None:
    """PM_j over the checkpoints with a known training position, the ranking export, R^2, figure."""
    ordered = [c for c, m in doc["checkpoints"].items() if m.get("step") is not None]
    for m in doc["checkpoints"].values():
        m["pm"] = None
    ranking_path = ctx.run.root / ANALYSIS_DIR / "premem" / "ranking.jsonl"
    if ordered:
        per_ckpt = [read_jsonl(ctx.run.root / doc["samples"][c]) for c in ordered]
        means, last, ids = runners.premem_summary(per_ckpt, doc["settings"]["tau"])
        for c, v in zip(ordered, means):
            doc["checkpoints"][c]["pm"] = float(v)
        acc_last = {r["id"]: r["acc"] for r in per_ckpt[-1]}
        write_jsonl(ranking_path, [{"rank": i + 1, "id": ex_id, "pm": pm, "acc": acc_last[ex_id], "checkpoint": ordered[-1]}
                                   for i, (ex_id, pm) in enumerate(premem.rank_examples(ids, last))])
        doc["ranking"] = _relative(ctx, ranking_path)
    doc["r2"] = _premem_r2(ctx, doc)


def _premem_figures(ctx: Context, doc: dict[str, Any], fresh: set[str]) -> list[str]:
    """PM and sampled train accuracy against the checkpoints in training order."""
    ordered = [c for c, m in doc["checkpoints"].items() if m.get("pm") is not None]
    if not ordered:
        return []
    x = list(range(len(ordered)))
    series = {label: (x, [doc["checkpoints"][c][key] for c in ordered])
              for label, key in (("PM", "pm"), ("train accuracy", "train_accuracy"))}
    path = plot_curves({"pre-memorization accuracy": series}, ctx.run.root / ANALYSIS_DIR / "premem",
                       xlabel="checkpoint (" + ", ".join(ordered) + ")")
    return [_figure(ctx, path)]


def _premem_r2(ctx: Context, doc: dict[str, Any]) -> dict[str, Any]:
    others = [(Path(r), _read_json(Path(r) / ANALYSIS_DIR / "premem.json")) for r in doc["settings"]["compare_runs"]]
    return premem_r2([(ctx.run.root, doc), *[(r, d) for r, d in others if d is not None]],
                     doc["settings"]["test_split"])


def premem_r2(runs: Sequence[tuple[str | Path, Mapping[str, Any]]], test_split: str | None) -> dict[str, Any]:
    """R^2 of dataset PM against test accuracy (Kang et al.), one point per (run, checkpoint) that has
    both a PM value (in the run's premem.json content) and a `test_split` accuracy in its dynamics.

    Returns {"test_split", "points": [{"run", "checkpoint", "pm", "test_accuracy"}], "value"} with
    value null and a "reason" when R^2 is undefined or meaningless (fewer than 3 points, constant x or y).
    """
    points = []
    for run_root, doc in runs:
        acc = {r["checkpoint"]: r["accuracy"] for r in RunDir(run_root).read_dynamics()
               if r["split"] == test_split and r.get("accuracy") is not None}
        points += [{"run": str(run_root), "checkpoint": c, "pm": m["pm"], "test_accuracy": acc[c]}
                   for c, m in doc["checkpoints"].items() if m.get("pm") is not None and c in acc]
    out: dict[str, Any] = {"test_split": test_split, "points": points, "value": None}
    if len(points) < 3:  # a line fits two points exactly: R^2 = 1 says nothing
        out["reason"] = f"R^2 needs at least 3 (run, checkpoint) points, got {len(points)}"
        return out
    try:
        out["value"] = premem.r_squared([p["pm"] for p in points], [p["test_accuracy"] for p in points])
    except ValueError as err:
        out["reason"] = str(err)
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


ANALYSES: dict[str, Analysis] = {a.name: a for a in (
    Analysis("ood", "Greedy accuracy on in-distribution and OOD sets (paper Table 2)", _prepare_ood, _run_ood,
             lambda s: [*[(n, n) for n in s["sets"]], ("ID avg", "id_avg"), ("OOD avg", "ood_avg")]),
    Analysis("robustness", "Greedy accuracy with neutral preambles (paper Table 3)", _prepare_robustness,
             _run_robustness,
             lambda s: [("w/o perturb", robustness.UNPERTURBED), *[(n, n) for n in s["preambles"]], ("Avg", "avg")]),
    Analysis("diversity", "Pass@k, Best-of-N, EAD and Sentence-BERT diversity of N samples (Fig. 5, Table 8)",
             _prepare_diversity, _run_diversity, _diversity_columns, figures=_diversity_figures),
    Analysis("calibration", "ECE of sampled answers, confidence = mean token probability (App. D.1)",
             _prepare_calibration, _run_calibration,
             lambda s: [("ECE", "ece"), ("accuracy", "accuracy"), ("confidence", "confidence")],
             figures=_calibration_figures),
    Analysis("mia", "Membership inference on training vs unseen references (App. D.2, Table 7)", _prepare_mia,
             _run_mia, _mia_columns, figures=_mia_figures),
    Analysis("premem", "Pre-memorization train accuracy (Kang et al. 2025)", _prepare_premem, _run_premem,
             lambda s: [("train acc", "train_accuracy"), ("memorized", "memorized"), ("PM", "pm")], _finish_premem,
             _premem_figures),
)}


# --------------------------------------------------------------------------------------------
# Files


def _relative(ctx: Context, path: Path) -> str:
    return path.relative_to(ctx.run.root).as_posix()


def _figure(ctx: Context, paths: list[Path]) -> str:
    return _relative(ctx, paths[0])  # the PNG; its SVG lies beside it


def json_path(run_root: str | Path, name: str) -> Path:
    return Path(run_root) / ANALYSIS_DIR / f"{name}.json"


def samples_path(run_root: str | Path, name: str, checkpoint: str) -> Path:
    return Path(run_root) / ANALYSIS_DIR / name / f"{checkpoint}.jsonl"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> null, numpy scalars and arrays -> Python values."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _table(analysis: Analysis, doc: dict[str, Any]) -> dict[str, Any]:
    cols = analysis.columns(doc["settings"])
    return {"columns": ["checkpoint", *[label for label, _ in cols]],
            "rows": [[ckpt, *[m.get(key) for _, key in cols]] for ckpt, m in doc["checkpoints"].items()]}


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    for key in [*new, *[k for k in old if k not in new]]:
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
    return None


# --------------------------------------------------------------------------------------------
# The entry point


def analyze(
    run_dir: str | Path, checkpoints: Sequence[str], suite: Sequence[str], cfg: RunConfig
) -> dict[str, dict[str, Any]]:
    """Run each analysis of `suite` on each checkpoint not yet done; returns NAME -> NAME.json content."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"run folder {run.root} not found")
    unknown = [n for n in suite if n not in ANALYSES]
    if unknown or not suite:
        raise ConfigError(f"unknown analysis {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(ANALYSES)}")
    suite = list(dict.fromkeys(suite))
    targets = resolve_checkpoints(run.root, checkpoints)
    ctx = Context(run, cfg)
    _quiet_libraries(cfg.quiet)

    # Everything that can fail on bad input, before anything is written.
    prepared, docs = {}, {}
    for name in suite:
        settings, data, total = ANALYSES[name].prepare(ctx)
        settings = _clean(settings)
        doc = _read_json(json_path(run.root, name))
        if doc is not None and doc["checkpoints"]:
            diff = _settings_diff(doc["settings"], settings)
            if diff:
                raise ConfigError(f"{json_path(run.root, name)} was computed with other settings ({diff}); "
                                  f"restore them, or delete the file and {ANALYSIS_DIR}/{name}/ to recompute")
        else:
            doc = {"analysis": name, "description": ANALYSES[name].description, "settings": settings,
                   "checkpoints": {}, "table": {}, "figures": [], "samples": {}}
        prepared[name], docs[name] = (data, total), doc

    todo = [(t, name) for t in targets for name in suite if not _done(run.root, docs[name], t.name)]
    tokenizer, fresh = None, {}
    with tqdm(total=len(todo), desc="analyses", disable=cfg.quiet) as bar:
        for target in targets:
            names = [n for t, n in todo if t is target]
            if not names:
                continue
            tokenizer = tokenizer or _load_tokenizer(cfg)
            model = _load_model(target, cfg)
            for name in names:
                bar.set_postfix_str(f"{target.name} {name}")
                data, total = prepared[name]
                with tqdm(total=total, desc=f"{name} {target.name}", disable=cfg.quiet or not total, leave=False) as inner:
                    result = ANALYSES[name].run(ctx, data, model, tokenizer, inner.update)
                _record(ctx, ANALYSES[name], docs[name], target, result)
                fresh.setdefault(name, set()).add(target.name)
                bar.update()
            del model
            _release_memory()
    for name in suite:
        _draw_figures(ctx, ANALYSES[name], docs[name], fresh.get(name, set()))
    return docs


def _draw_figures(ctx: Context, analysis: Analysis, doc: dict[str, Any], fresh: set[str]) -> None:
    """Figures once per invocation, after all its checkpoints; also when an interrupted invocation
    left them behind the results (`figures_of` lists the checkpoints the figures show)."""
    if analysis.figures is None or not doc["checkpoints"]:
        return
    if not fresh and doc.get("figures_of") == list(doc["checkpoints"]):
        return
    doc["figures"] = analysis.figures(ctx, doc, fresh)
    doc["figures_of"] = list(doc["checkpoints"])
    write_json(json_path(ctx.run.root, analysis.name), _clean(doc))


def _done(run_root: Path, doc: Mapping[str, Any], checkpoint: str) -> bool:
    return checkpoint in doc["checkpoints"] and samples_path(run_root, doc["analysis"], checkpoint).exists()


def _record(ctx: Context, analysis: Analysis, doc: dict[str, Any], target: Target, result: AnalysisResult) -> None:
    """Samples first (atomic), then NAME.json with the checkpoint in it (atomic)."""
    path = samples_path(ctx.run.root, analysis.name, target.name)
    write_jsonl(path, _clean(result.rows))
    entries = dict(doc["checkpoints"])
    entries[target.name] = _clean({**result.metrics, "epoch": target.epoch, "step": target.step})
    doc["checkpoints"] = dict(sorted(entries.items(), key=lambda kv: _order_key(kv[1], kv[0])))
    doc["samples"] = {c: _relative(ctx, samples_path(ctx.run.root, analysis.name, c)) for c in doc["checkpoints"]}
    if analysis.finish is not None:
        analysis.finish(ctx, doc)
    doc["table"] = _table(analysis, doc)
    write_json(json_path(ctx.run.root, analysis.name), _clean(doc))


def _load_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    from ..models import load_tokenizer

    return load_tokenizer(cfg.model)


def _load_model(target: Target, cfg: RunConfig) -> PreTrainedModel:
    from ..models import load_checkpoint, load_model

    return load_model(cfg.model) if target.path is None else load_checkpoint(target.path, cfg.model)


def format_table(doc: Mapping[str, Any], checkpoints: Sequence[str] | None = None) -> str:
    """The analysis table as text, checkpoints side by side (one row each, as in the paper's tables)."""
    table = doc["table"]
    rows = [r for r in table["rows"] if checkpoints is None or r[0] in checkpoints]
    cells = [table["columns"], *[[_cell(v) for v in r] for r in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table["columns"]))]
    lines = [f"{doc['analysis']}: {doc['description']}"]
    for j, row in enumerate(cells):
        lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
