"""Data specs: which examples to load, as one string (`parse_spec`, `load_dataset_spec`).

Spec syntax
-----------
    NAME[:SPLIT][[START:STOP]][@N[,seed=S]]
    PATH[[START:STOP]][@N[,seed=S]]

    gsm8k:test                  the whole GSM8K test split
    gsm8k:train[:1000]          its first 1000 examples
    gsm8k:test[100:200]         examples 100..199 (Python slice; asking past the end is an error)
    svamp                       SPLIT may be left out when the dataset has a single split
    gsm8k:test@200              200 examples sampled without replacement (seed from the caller)
    gsm8k:test[:500]@100,seed=3 slice first, then sample 100 with seed 3
    path/to/file.jsonl[:50]     a local .jsonl / .json / .csv file
    synthetic:test              a dataset registered by another module (imported lazily)

A spec is a file path when it contains "/" or "\\" or ends in .jsonl, .json or .csv.
Sampling uses `random.Random(seed)` and keeps the source order of the sampled examples.
Names are looked up in `overmem.data.registry`; files are read by
`overmem.data.file_examples.load_file`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from overmem.data.example import AnswerKind, Example
from overmem.data.file_examples import load_file
from overmem.data.readers import FILE_SUFFIXES
from overmem.data.registry import load_registered


@dataclass(frozen=True)
class DataSpec:
    """What to load: a registered name (with split) or a file path, a slice, a seeded sample."""

    name_or_path: str
    split: str | None = None
    start: int | None = None
    stop: int | None = None
    sample: int | None = None
    seed: int = 0

    @property
    def is_file(self) -> bool:
        return _looks_like_path(self.name_or_path)

    def unsliced(self) -> DataSpec:
        """The whole source: the same dataset and split without slice or sample."""
        return replace(self, start=None, stop=None, sample=None)

    def __str__(self) -> str:
        text = self.name_or_path
        if self.split is not None:
            text += f":{self.split}"
        if self.start is not None or self.stop is not None:
            start, stop = ("" if b is None else b for b in (self.start, self.stop))
            text += f"[{start}:{stop}]"
        if self.sample is not None:
            text += f"@{self.sample},seed={self.seed}"
        return text


_SPEC_RE = re.compile(
    r"(?P<body>.+?)"
    r"(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?"
    r"(?:@(?P<sample>\d+)(?:,seed=(?P<seed>-?\d+))?)?"
)
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_SPEC_HELP = "expected NAME:SPLIT[START:STOP]@N,seed=S or PATH[START:STOP], e.g. gsm8k:train[:1000]"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(FILE_SUFFIXES)


def parse_spec(text: str, *, seed: int = 0) -> DataSpec:
    """Parse a spec string (syntax in the module docstring); `seed` applies if the text has none."""
    match = _SPEC_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad data spec {text!r}: {_SPEC_HELP}")
    body = match["body"]
    if "[" in body or "]" in body or "@" in body:
        raise ValueError(f"bad data spec {text!r}: cannot read the slice or sample; {_SPEC_HELP}")
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    sample = int(match["sample"]) if match["sample"] is not None else None
    if sample == 0:
        raise ValueError(f"bad data spec {text!r}: sample size must be positive")
    spec_seed = int(match["seed"]) if match["seed"] is not None else seed
    if _looks_like_path(body):
        return DataSpec(body, None, start, stop, sample, spec_seed)
    name, colon, split = body.partition(":")
    if not _NAME_RE.fullmatch(name) or (colon and not _NAME_RE.fullmatch(split)):
        raise ValueError(f"bad data spec {text!r}: {_SPEC_HELP}")
    return DataSpec(name, split or None, start, stop, sample, spec_seed)


def sample_examples(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """`n` examples drawn without replacement with random.Random(seed), in source order."""
    if not 0 <= n <= len(examples):
        raise ValueError(f"cannot sample {n} examples from {len(examples)}")
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def load_dataset_spec(
    spec: str | DataSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    kind: AnswerKind | None = None,
) -> list[Example]:
    """Load a spec: the dataset (or file), then its slice, then a seeded sample.

    `sample`/`seed` apply when the spec itself asks for no sample; `field_map` and `kind`
    apply to files only.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec, seed=seed)
    if sample is not None:
        if spec.sample is not None and spec.sample != sample:
            raise ValueError(f"spec {spec} samples {spec.sample} but sample={sample} was passed")
        if spec.sample is None:
            spec = replace(spec, sample=sample, seed=seed)
    if spec.is_file:
        examples = load_file(spec.name_or_path, field_map, kind=kind)
    else:
        if field_map is not None or kind is not None:
            raise ValueError(f"{spec}: field_map and kind apply to files, not registered datasets")
        examples = load_registered(spec.name_or_path, spec.split, data_dir)
    examples = _slice(examples, spec)
    if spec.sample is not None:
        if spec.sample > len(examples):
            raise ValueError(f"{spec}: cannot sample {spec.sample} from {len(examples)} examples")
        examples = sample_examples(examples, spec.sample, spec.seed)
    return examples


def _slice(examples: list[Example], spec: DataSpec) -> list[Example]:
    n = len(examples)
    for bound in (spec.start, spec.stop):
        if bound is not None and not -n <= bound <= n:
            raise ValueError(f"{spec}: slice bound {bound} is past the end ({n} examples)")
    chosen = examples[spec.start : spec.stop]
    if not chosen and n:  # an empty slice would give results over no examples (n=0, NaN)
        raise ValueError(f"{spec}: the slice selects no examples (of {n}); give [START:STOP] with START before STOP")
    return chosen
