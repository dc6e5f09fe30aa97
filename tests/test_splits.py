"""A run's data (`overmem.data.splits`): the tracked splits of appendix B.1 and the training pools,
checked against selections computed independently here with random.Random(seed).sample."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from overmem.config import ConfigError, DataConfig
from overmem.data.splits import TRAIN, VALIDATION, derive_splits, load_spec, training_pools
from tests.conftest import DATA_DIR


def _write_pool(path: Path, n: int, repeat_every: int = 0) -> Path:
    """n rows in our own layout; ids are `<stem>/<index>`. With repeat_every=k, row i > 0 with
    i % k == 0 repeats the question of row i - 1."""
    with path.open("w") as f:
        for i in range(n):
            q = f"q{i - 1}" if repeat_every and i and i % repeat_every == 0 else f"q{i}"
            f.write(json.dumps({"question": q, "response": f"r{i}", "answer": i}) + "\n")
    return path


def _ids(examples) -> list[str]:
    return [e.id for e in examples]


def _picks(prefix: str, first: int, population: int, k: int, seed: int) -> list[str]:
    """Ids of a seeded sample of k positions out of `population`, starting at row `first`, in order."""
    return [f"{prefix}/{first + i}" for i in sorted(random.Random(seed).sample(range(population), k))]


@pytest.fixture
def pool(tmp_path) -> Path:
    return _write_pool(tmp_path / "p.jsonl", 100)


def _cfg(train: str, **kw) -> DataConfig:
    return DataConfig(train=train, **{"tests": {}, **kw})


# ---------------------------------------------------------------------------------------------
# Validation set from the unseen remainder of the training source


def test_b1_selection(pool):
    data = _cfg(f"{pool}[:60]", monitor_size=20, validation_size=30, seed=0)
    splits = derive_splits(data)
    assert _ids(splits.train) == [f"p/{i}" for i in range(60)]
    assert list(splits.tracked) == [TRAIN, VALIDATION]
    assert _ids(splits.tracked[TRAIN]) == _picks("p", 0, 60, 20, seed=0)
    assert _ids(splits.tracked[VALIDATION]) == _picks("p", 60, 40, 30, seed=0)
    # Deterministic; another seed gives other samples.
    assert derive_splits(data) == splits
    other = derive_splits(data.model_copy(update={"seed": 1}))
    assert _ids(other.tracked[TRAIN]) == _picks("p", 0, 60, 20, seed=1) != _ids(splits.tracked[TRAIN])
    assert _ids(other.tracked[VALIDATION]) == _picks("p", 60, 40, 30, seed=1)
    # The validation sample does not depend on the monitor size; the monitor never exceeds training.
    smaller = derive_splits(data.model_copy(update={"monitor_size": 5}))
    assert smaller.tracked[VALIDATION] == splits.tracked[VALIDATION]
    everything = derive_splits(data.model_copy(update={"monitor_size": 1000}))
    assert everything.tracked[TRAIN] == splits.train


def test_b1_errors(pool):
    with pytest.raises(ValueError, match=r"valid_size 41 exceeds the 40 unseen examples left after the first 60 of 100"):
        derive_splits(_cfg(f"{pool}[:60]", validation_size=41))
    with pytest.raises(ValueError, match=r"train_size 101 is outside 1\.\.100 \(source size\)"):
        derive_splits(_cfg(f"{pool}[:101]", validation_size=1))
    for train in (str(pool), f"{pool}[10:60]"):
        with pytest.raises(ConfigError, match="give the training slice as name:split\\[:N\\]; or set data.validation"):
            derive_splits(_cfg(train))


def test_b1_leaves_out_questions_seen_in_training(tmp_path):
    pool = _write_pool(tmp_path / "p.jsonl", 100, repeat_every=10)  # p/60 repeats q59, a training question
    valid = derive_splits(_cfg(f"{pool}[:60]", monitor_size=1, validation_size=39)).tracked[VALIDATION]
    unseen = [f"p/{i}" for i in range(61, 100)]  # p/60 left out
    assert _ids(valid) == unseen
    with pytest.raises(ValueError, match="the 39 unseen examples .*questions seen in training excluded"):
        derive_splits(_cfg(f"{pool}[:60]", monitor_size=1, validation_size=40))


def test_tests_are_sampled_down_to_test_size(pool, tmp_path):
    test = _write_pool(tmp_path / "t.jsonl", 30)
    data = _cfg(f"{pool}[:60]", validation_size=10, tests={"a": str(test), "b": f"{test}[:5]"}, test_size=8, seed=3)
    tracked = derive_splits(data).tracked
    assert list(tracked) == [TRAIN, VALIDATION, "a", "b"]
    assert _ids(tracked["a"]) == _picks("t", 0, 30, 8, seed=3)
    assert _ids(tracked["b"]) == [f"t/{i}" for i in range(5)]  # smaller than test_size: all of it
    assert _ids(derive_splits(data.model_copy(update={"test_size": None})).tracked["a"]) == [f"t/{i}" for i in range(30)]


# ---------------------------------------------------------------------------------------------
# An explicit validation set


def test_explicit_validation(pool, tmp_path):
    valid = _write_pool(tmp_path / "v.jsonl", 20)
    data = _cfg(f"{pool}[10:50]", validation=str(valid), monitor_size=5, validation_size=7, seed=2)
    splits = derive_splits(data)
    assert _ids(splits.train) == [f"p/{i}" for i in range(10, 50)]
    assert _ids(splits.tracked[TRAIN]) == _picks("p", 10, 40, 5, seed=2)
    assert _ids(splits.tracked[VALIDATION]) == _picks("v", 0, 20, 7, seed=2)
    whole = derive_splits(data.model_copy(update={"monitor_size": 40, "validation_size": 50}))
    assert whole.tracked[TRAIN] == splits.train and _ids(whole.tracked[VALIDATION]) == [f"v/{i}" for i in range(20)]
    with pytest.raises(ValueError, match=r"p\.jsonl\[5:5\]: the slice selects no examples \(of 100\)"):
        derive_splits(_cfg(f"{pool}[5:5]", validation=str(valid)))


# ---------------------------------------------------------------------------------------------
# Training pools: the run's training set and the unseen examples of its source


def test_pools_of_a_leading_slice(tmp_path):
    pool = _write_pool(tmp_path / "p.jsonl", 100, repeat_every=10)
    data = _cfg(f"{pool}[:60]", validation_size=30)
    pools = training_pools(data)
    assert _ids(pools.train) == [f"p/{i}" for i in range(60)]
    assert pools.train_desc == f"{pool}[:60]"
    seen = {f"q{i}" for i in range(60)}
    assert all(e.question not in seen for e in pools.unseen)
    assert _ids(pools.unseen) == [f"p/{i}" for i in range(61, 100)]  # p/60 repeats q59
    assert pools.unseen_desc == f"{pool}[60:] (questions seen in training left out)"
    # The run's splits come from these pools: training set, and validation set drawn from the unseen.
    splits = derive_splits(data)
    assert splits.train == pools.train
    assert set(_ids(splits.tracked[VALIDATION])) <= set(_ids(pools.unseen))


def test_pools_with_explicit_validation(pool, tmp_path):
    valid = _write_pool(tmp_path / "v.jsonl", 20)
    pools = training_pools(_cfg(f"{pool}[10:50]", validation=str(valid), validation_size=5))
    assert _ids(pools.train) == [f"p/{i}" for i in range(10, 50)]
    assert _ids(pools.unseen) == [f"v/{i}" for i in range(20)]  # all of it, not the validation sample
    assert (pools.train_desc, pools.unseen_desc) == (f"{pool}[10:50]", str(valid))


def test_pools_when_the_unseen_cannot_be_told(pool):
    pools = training_pools(_cfg(f"{pool}[10:60]"))
    assert _ids(pools.train) == [f"p/{i}" for i in range(10, 60)]
    assert pools.unseen is None
    assert pools.unseen_desc == f"data.train '{pool}[10:60]': cannot tell the unseen examples of its source"


# ---------------------------------------------------------------------------------------------
# One spec as the run reads it


def test_load_spec_sampling_and_field_map(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "solution": f"#### {i}"}) + "\n" for i in range(12)))
    data = _cfg("unused:train[:1]", field_map={"question": "prompt", "response": "solution"}, seed=4)
    assert _ids(load_spec(data, str(path))) == [f"f/{i}" for i in range(12)]
    assert _ids(load_spec(data, str(path), size=5)) == _picks("f", 0, 12, 5, seed=4)
    assert _ids(load_spec(data, str(path), size=5, seed=9)) == _picks("f", 0, 12, 5, seed=9)
    assert _ids(load_spec(data, str(path), size=12)) == [f"f/{i}" for i in range(12)]
    # A spec's own sample takes the run's seed unless it names one.
    assert _ids(load_spec(data, f"{path}@3")) == _picks("f", 0, 12, 3, seed=4)
    # The field map describes files only; a registered dataset ignores it.
    synthetic = load_spec(data, "synthetic:validation[:3]")
    assert _ids(synthetic) == [f"synthetic-validation-{i}" for i in range(3)]


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no local data folder at {DATA_DIR}")
def test_b1_on_real_data():
    data = _cfg("mawps:test[:1500]", data_dir=str(DATA_DIR), monitor_size=300, validation_size=500)
    splits = derive_splits(data)
    training, monitor, valid = splits.train, splits.tracked[TRAIN], splits.tracked[VALIDATION]
    assert len(training) == 1500 and len(monitor) == 300 and len(valid) == 500
    assert {e.question for e in valid}.isdisjoint(e.question for e in training)
    assert {e.id for e in monitor} <= {e.id for e in training}
