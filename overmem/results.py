"""Run-folder layout and the plain files every result lives in.

```
RUN/
  config.yaml                 resolved config
  checkpoints/epoch-N/        model or adapter folders (plain transformers / PEFT)
  dynamics.jsonl              one row per checkpoint x split
  samples/<checkpoint>/<split>.jsonl   one row per example
  phases.json  selection.json  dynamics.png  dynamics.svg
  timings.json                wall time of each stage (train, merge, ...); evaluations: `seconds` in dynamics
  environment.json            versions and hardware of the machine that ran it
  report.html                 everything above in one self-contained page (`overmem report`)
```
Writes are atomic (temp file + rename) and `dynamics.jsonl` is append-only with one complete
line per write, so a killed run never leaves a partial result that a resume would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DYNAMICS = "dynamics.jsonl"
TIMINGS = "timings.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by overmem; a torn last line (killed writer) is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # interrupted append: the row was never complete
            raise ValueError(f"{path} line {i + 1}: invalid JSON; delete the line to continue") from None
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a single write; repairs a torn last line left by a killed writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        if torn:
            write_jsonl(path, read_jsonl(path))
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=_jsonable) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunDir:
    """Paths inside one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def trainer_state(self) -> Path:
        return self.root / "trainer_state"

    @property
    def dynamics(self) -> Path:
        return self.root / DYNAMICS

    def samples(self, checkpoint: str, split: str) -> Path:
        return self.root / "samples" / checkpoint / f"{split}.jsonl"

    def read_dynamics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.dynamics)

    @property
    def timings(self) -> Path:
        return self.root / TIMINGS

    def read_timings(self) -> list[dict[str, Any]]:
        return json.loads(self.timings.read_text()) if self.timings.exists() else []

    def record_timing(self, stage: str, seconds: float, note: str | None = None) -> None:
        """Add one stage's wall time to `timings.json` (a resumed run adds entries, never
        replaces them: the report sums them per stage)."""
        entry: dict[str, Any] = {"stage": stage, "seconds": round(seconds, 3),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if note:
            entry["note"] = note
        write_json(self.timings, [*self.read_timings(), entry])

    @contextmanager
    def timed(self, stage: str, note: str | None = None) -> Iterator[None]:
        """Record the wall time of the block as `stage` if it finishes."""
        t0 = time.perf_counter()
        yield
        self.record_timing(stage, time.perf_counter() - t0, note)

    def done(self) -> set[tuple[str, str]]:
        """(checkpoint, split) pairs already evaluated."""
        return {(r["checkpoint"], r["split"]) for r in self.read_dynamics()}
