"""The dataset registry: dataset names, their loaders and splits, and the data folder.

A module registers its datasets with `register_dataset` when it is imported. The registry imports
those modules itself, by name and only when a dataset is first looked up, so that a module
registering a dataset can import this one without a cycle and importing the registry stays light:
the built-in datasets (`overmem.data.builtin`) on any lookup, other providers (`_LAZY_MODULES`)
when one of their names is used.

Registered datasets are read from a data folder: the argument `data_dir`, else the environment
variable OVERMEM_DATA_DIR (`resolve_data_dir`); the layout of each built-in dataset under it is
in `overmem.data.builtin`.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from overmem.data.example import AnswerKind, Example

DATA_DIR_ENV = "OVERMEM_DATA_DIR"

Loader = Callable[[str, Path | None], list[Example]]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and the facts a caller needs before loading it."""

    name: str
    kind: AnswerKind
    loader: Loader
    hub_id: str | None
    splits: tuple[str, ...]
    description: str


_REGISTRY: dict[str, DatasetInfo] = {}
_BUILTIN_MODULE = "overmem.data.builtin"
# Datasets registered by other modules: name -> module, imported when the name is first used.
_LAZY_MODULES: dict[str, str] = {"synthetic": "overmem.data.synthetic", "gpqa": "overmem.data.gpqa",
                                 "gpqa_diamond": "overmem.data.gpqa", "alpaca_cleaned": "overmem.data.alpaca",
                                 "humaneval": "overmem.data.code", "codefeedback": "overmem.data.code"}


def register_dataset(
    name: str,
    *,
    kind: AnswerKind,
    hub_id: str | None = None,
    splits: Sequence[str] = ("test",),
    description: str = "",
) -> Callable[[Loader], Loader]:
    """Decorator registering `fn(split, data_dir) -> list[Example]` under `name`.

    `data_dir` is the resolved data folder or None (no folder given: use the hub or ignore it).
    Registering a name twice from different functions is an error.
    """
    if not splits:
        raise ValueError(f"dataset {name!r}: splits must not be empty")

    def decorator(fn: Loader) -> Loader:
        old = _REGISTRY.get(name)
        origin = (fn.__module__, fn.__qualname__)
        if old is not None and (old.loader.__module__, old.loader.__qualname__) != origin:
            raise ValueError(
                f"dataset {name!r} is already registered by "
                f"{old.loader.__module__}.{old.loader.__qualname__}"
            )
        _REGISTRY[name] = DatasetInfo(name, kind, fn, hub_id, tuple(splits), description)
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Names of all datasets, including those whose module is imported only on use."""
    importlib.import_module(_BUILTIN_MODULE)
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def get_dataset(name: str) -> DatasetInfo:
    """The registered dataset `name`; unknown names raise ValueError with the closest match."""
    importlib.import_module(_BUILTIN_MODULE)
    if name not in _REGISTRY and name in _LAZY_MODULES:
        _import_provider(name, _LAZY_MODULES[name])
    if name in _REGISTRY:
        return _REGISTRY[name]
    known = list_datasets()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}{hint} (known: {', '.join(known)})")


def _import_provider(name: str, module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise ValueError(
            f"dataset {name!r} is provided by module {module}, which is missing from this install"
        ) from None
    if name not in _REGISTRY:
        raise ValueError(f"module {module} was imported but did not register dataset {name!r}")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder: `data_dir`, else $OVERMEM_DATA_DIR, else None (hub only)."""
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir is not None else DATA_DIR_ENV
        if path.exists():
            raise ValueError(f"data folder {path} (from {source}) is not a folder; give the folder that holds "
                             "the datasets")
        raise FileNotFoundError(f"data folder {path} (from {source}) does not exist")
    return path


def load_registered(
    name: str, split: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> list[Example]:
    """All examples of one split of a registered dataset (split may be omitted if unique)."""
    info = get_dataset(name)
    return info.loader(_check_split(info, split), resolve_data_dir(data_dir))


def _check_split(info: DatasetInfo, split: str | None) -> str:
    valid = ", ".join(info.splits)
    if split is None:
        if len(info.splits) == 1:
            return info.splits[0]
        raise ValueError(
            f"dataset {info.name!r} has several splits; name one ({valid}), e.g. "
            f"{info.name}:{info.splits[0]}"
        )
    if split not in info.splits:
        raise ValueError(f"dataset {info.name!r} has no split {split!r} (valid splits: {valid})")
    return split
