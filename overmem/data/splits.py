"""A run's data: the one place that turns the `data` section of a run config into examples.

`overmem run`, `scan`, `evaluate` and `analyze` all load through here, so they see the same
examples (same seeds, same order). The tracked splits follow the paper's appendix B.1:

- the training set is `data.train`;
- the monitored training subset ("MetaTrain", split `TRAIN`) is a seeded sample of
  `monitor_size` of it;
- the validation set ("MetaTest", split `VALIDATION`) is a seeded sample of `validation_size`
  from the unseen remainder of the training source: when `data.train` is a leading slice
  `name:split[:N]`, the examples after the first N whose question text does not occur among
  those N (MetaMathQA repeats questions with different answers). An explicit `data.validation`
  spec replaces the remainder;
- each test set of `data.tests`, sampled down to `test_size` when that is smaller.

Each sample is `sample_examples(..., seed)` with a fresh random.Random(seed), so changing one
size does not change another split's sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from overmem.config import ConfigError, DataConfig
from overmem.data.example import Example
from overmem.data.specs import DataSpec, load_dataset_spec, parse_spec, sample_examples

# Names of the tracked splits in the dynamics rows; test sets go by their `data.tests` names.
TRAIN = "train"
VALIDATION = "validation"


def load_spec(data: DataConfig, text: str, *, size: int | None = None, seed: int | None = None) -> list[Example]:
    """The examples of one spec as the run reads it (its data folder; its field map, for files),
    then a seeded sample of `size` (seed `data.seed` unless given) when the set is larger."""
    spec = parse_spec(text, seed=data.seed)
    field_map = data.field_map if spec.is_file else None  # a field map describes files only
    examples = load_dataset_spec(spec, data_dir=data.data_dir, field_map=field_map)
    return _at_most(examples, size, data.seed if seed is None else seed)


def _at_most(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    # A sample of the whole set would be the set itself, in source order.
    return examples if size is None or size >= len(examples) else sample_examples(examples, size, seed)


@dataclass
class Splits:
    """The training set and the tracked splits (name -> examples): `TRAIN`, `VALIDATION`, then
    each test set."""

    train: list[Example]
    tracked: dict[str, list[Example]]


def derive_splits(data: DataConfig) -> Splits:
    """The run's training set and tracked splits (module docstring); bad sizes and specs fail
    here, before anything is trained or written."""
    if data.validation is None:
        train, monitor, valid = _b1_splits(data)
    else:
        train = load_spec(data, data.train)
        monitor = _at_most(train, data.monitor_size, data.seed)
        valid = load_spec(data, data.validation, size=data.validation_size)
    tracked = {TRAIN: monitor, VALIDATION: valid}
    for name, test_spec in data.tests.items():
        tracked[name] = load_spec(data, test_spec, size=data.test_size)
    if not train:
        raise ConfigError(f"data.train {data.train!r}: no examples")
    return Splits(train, tracked)


def _b1_splits(data: DataConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(training set, monitored subset, validation set) with the validation set drawn from the
    unseen remainder of the training source."""
    spec = _leading_slice(data)
    if spec is None:
        raise ConfigError(
            f"data.train {data.train!r}: to draw the validation set from the unseen remainder, "
            "give the training slice as name:split[:N]; or set data.validation"
        )
    source = load_spec(data, str(spec.unsliced()))
    n_train = spec.stop
    if not 0 < n_train <= len(source):
        raise ValueError(f"train_size {n_train} is outside 1..{len(source)} (source size)")
    train = source[:n_train]
    unseen = _unseen_rest(source, n_train)
    if data.validation_size > len(unseen):
        raise ValueError(
            f"valid_size {data.validation_size} exceeds the {len(unseen)} unseen examples left after the "
            f"first {n_train} of {len(source)} (questions seen in training excluded); lower valid_size or train_size"
        )
    monitor = sample_examples(train, min(data.monitor_size, n_train), data.seed)
    valid = sample_examples(unseen, data.validation_size, data.seed)
    return train, monitor, valid


def _leading_slice(data: DataConfig) -> DataSpec | None:
    """The training spec if it is a leading slice `name:split[:N]` of its source, else None."""
    spec = parse_spec(data.train, seed=data.seed)
    return spec if spec.start in (None, 0) and spec.stop is not None else None


def _unseen_rest(source: list[Example], n_train: int) -> list[Example]:
    """The source after its first `n_train` examples, without questions that occur among those."""
    seen = {ex.question for ex in source[:n_train]}
    return [ex for ex in source[n_train:] if ex.question not in seen]


@dataclass
class Pools:
    """The run's whole training set and the unseen examples of its source, with descriptions.

    `unseen` is None when the training spec does not tell them apart (it is not a leading slice
    and there is no explicit validation set); `unseen_desc` then says why.
    """

    train: list[Example]
    train_desc: str
    unseen: list[Example] | None
    unseen_desc: str


def training_pools(data: DataConfig) -> Pools:
    """The run's training set (all of it, unsampled) and the unseen examples of its source: the
    explicit validation set, or the rest of the source after the training slice with questions
    seen in training left out (the pool the validation set of `derive_splits` is drawn from)."""
    if data.validation is not None:
        return Pools(load_spec(data, data.train), data.train, load_spec(data, data.validation), data.validation)
    spec = _leading_slice(data)
    if spec is None:
        reason = f"data.train {data.train!r}: cannot tell the unseen examples of its source"
        return Pools(load_spec(data, data.train), data.train, None, reason)
    source = load_spec(data, str(spec.unsliced()))
    unseen_desc = f"{spec.unsliced()}[{spec.stop}:] (questions seen in training left out)"
    return Pools(source[: spec.stop], data.train, _unseen_rest(source, spec.stop), unseen_desc)
