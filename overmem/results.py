"""Run-folder layout and the plain files every result lives in.

```
RUN/
  config.yaml                 resolved config
  checkpoints/epoch-N/        model or adapter folders (plain transformers / PEFT)
  trainer_state/              the Trainer's own state while training runs (resume)
  dynamics.jsonl              one row per checkpoint x split
  samples/<checkpoint>/<split>.jsonl   one row per example
  phases.json  selection.json  dynamics.png  dynamics.svg
  keep.json                   the early-stopping callback's verdict (Trainer integration)
  analysis/NAME.json  analysis/NAME/<checkpoint>.jsonl   `overmem analyze`
  timings.json                wall time of each stage (train, merge, ...); evaluations: `seconds` in dynamics
  environment.json            versions and hardware of the machine that ran it
  report.html                 everything above in one self-contained page (`overmem report`)
  .overmem.lock               while a command writes the run: who it is (`runlock.py`)
```
Every name above is a constant of this module; other modules reach the files through `RunDir`.
Writes are atomic (temp file + rename) and `dynamics.jsonl` is append-only with one complete
line per write, so a killed run never leaves a partial result that a resume would trust.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .files import missing_folder

# Files and folders of a run.
CONFIG = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_DIR = "trainer_state"
DYNAMICS = "dynamics.jsonl"
SAMPLES_DIR = "samples"
PHASES = "phases.json"
SELECTION = "selection.json"
FIGURE = "dynamics"  # dynamics.png and dynamics.svg
KEEP = "keep.json"
ANALYSIS_DIR = "analysis"
TIMINGS = "timings.json"
ENVIRONMENT = "environment.json"
REPORT = "report.html"
LOCK = ".overmem.lock"  # one writer per run folder (runlock.py)

# Files inside one checkpoint folder.
CHECKPOINT_META = "overmem.json"  # {"epoch", "step"} written beside each saved checkpoint
MODEL_CONFIG = "config.json"  # a transformers model folder
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder
HF_TRAINER_STATE = "trainer_state.json"  # a Hugging Face Trainer checkpoint-STEP folder
INIT_ADAPTER = "adapter-init"  # checkpoints/adapter-init: the initial PiSSA/MiLoRA adapter (B0, A0)

# The fields of a dynamics row that every reader of `dynamics.jsonl` uses.
DYNAMICS_FIELDS = ("checkpoint", "epoch", "split", "ppl")

# The numbers of a dynamics row: each a finite number >= 0 (accuracies also <= 1) or null. A NaN or a
# negative value is an edit or a corruption, and would be plotted or compared as if measured.
_DYNAMICS_NUMBERS = ("epoch", "step", "n", "ppl", "ppl_token", "nll_token", "n_tokens", "accuracy",
                     "accuracy_ci_low", "accuracy_ci_high", "seconds")


def _plausible(field: str, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return False
    return value <= 1 or not field.startswith("accuracy")


BASE = "epoch-0"  # the base model, evaluated as epoch 0
_CHECKPOINT_NAME = re.compile(r"(epoch|step|checkpoint)-\d+|merge\(.*\)")


def epoch_name(epoch: int) -> str:
    """The checkpoint name of the end of `epoch` (`epoch-0` is the base model)."""
    return f"epoch-{epoch}"


def step_name(step: int) -> str:
    """The checkpoint name of optimizer step `step` (extra checkpoints between epochs)."""
    return f"step-{step}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write to; renamed to `path` when the block succeeds and
    removed when it fails, so `path` is never left half-written. A failure to write names `path`.
    Temporary files of `path` left by a killed writer are removed first (one writer per file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a writer of this file that was killed mid-write
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _naming(err, path) from None
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """`err` naming `path`: a failed write (no file name) or temp file is reported as the file
    being written."""
    return err if err.errno is None else type(err)(err.errno, err.strerror, str(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (`atomic_path`), synced to disk."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_jsonl(path: Path, *, torn_ok: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file written by overmem. A torn last line (a killed appender) is an error, so
    that a reader does not silently lose the row; it is dropped when `torn_ok` (what a resuming
    writer wants: it rewrites that row)."""
    return [row for _, row in _numbered_rows(path, torn_ok=torn_ok)]


def _numbered_rows(path: Path, *, torn_ok: bool) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each non-blank line of a JSONL file (`read_jsonl`)."""
    from .files import read_text

    if not path.exists():
        return []
    rows = []
    lines = read_text(path).splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                if torn_ok:
                    break  # interrupted append: the row was never complete
                raise ValueError(f"{path} line {i + 1}: incomplete last line (an interrupted write); re-run the "
                                 "command that writes it to repair it, or delete the line") from None
            raise ValueError(f"{path} line {i + 1}: invalid JSON; delete the line to continue") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {i + 1}: expected a JSON object, got {type(row).__name__}; "
                             "delete the line to continue")
        rows.append((i + 1, row))
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a single write; repairs a torn last line left by a killed writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        if torn:
            write_jsonl(path, read_jsonl(path, torn_ok=True))
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise _naming(err, path) from None


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that is not valid JSON (truncated, edited) is an error naming it."""
    from .files import read_text

    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        where = f" line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not valid JSON (truncated or edited?); restore it, or delete it "
                         "if overmem made it") from None


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
        return self.root / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, name: str) -> Path:
        """The folder of checkpoint `name` (e.g. `epoch_name(3)`)."""
        return self.checkpoints / name

    @property
    def trainer_state(self) -> Path:
        return self.root / TRAINER_STATE_DIR

    @property
    def dynamics(self) -> Path:
        return self.root / DYNAMICS

    def samples(self, checkpoint: str, split: str) -> Path:
        return self.root / SAMPLES_DIR / checkpoint / f"{split}.jsonl"

    def read_dynamics(self, *, strict: bool = False) -> list[dict[str, Any]]:
        """The rows of `dynamics.jsonl`. `strict` (a command reading a run it does not write): a
        torn last line, a row without the fields every reader uses, or a second row for one
        checkpoint and split is an error naming the line."""
        numbered = _numbered_rows(self.dynamics, torn_ok=not strict)
        seen: dict[tuple[str, str], int] = {}
        for i, (line, row) in enumerate(numbered if strict else []):
            missing = [k for k in DYNAMICS_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{self.dynamics}: row {i + 1} has no {', '.join(missing)}; "
                                 "not a dynamics row written by overmem: delete it")
            first = seen.setdefault((str(row["checkpoint"]), str(row["split"])), line)
            if first != line:  # overmem writes one row per pair: two commands wrote the folder at once
                raise ValueError(f"{self.dynamics} line {line}: a second row for {row['checkpoint']} on {row['split']} "
                                 f"(the first is line {first}); delete the rows of one of the two evaluations")
            bad = next(((k, row[k]) for k in _DYNAMICS_NUMBERS if not _plausible(k, row.get(k))), None)
            if bad is not None:
                raise ValueError(f"{self.dynamics} line {line}: {bad[0]} is {bad[1]!r}; overmem writes a finite "
                                 "number >= 0 there (or null): restore the file, or delete the line")
        return [row for _, row in numbered]

    @property
    def phases(self) -> Path:
        return self.root / PHASES

    @property
    def selection(self) -> Path:
        return self.root / SELECTION

    @property
    def figure(self) -> Path:
        """The dynamics figure without suffix (`.png` and `.svg` lie there)."""
        return self.root / FIGURE

    @property
    def keep(self) -> Path:
        return self.root / KEEP

    @property
    def environment(self) -> Path:
        return self.root / ENVIRONMENT

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def analysis_dir(self) -> Path:
        return self.root / ANALYSIS_DIR

    def analysis_json(self, name: str) -> Path:
        """`analysis/NAME.json`: the aggregates of analysis `name`."""
        return self.analysis_dir / f"{name}.json"

    def analysis_samples(self, name: str, checkpoint: str) -> Path:
        """`analysis/NAME/CHECKPOINT.jsonl`: the per-sample rows of analysis `name` on `checkpoint`."""
        return self.analysis_dir / name / f"{checkpoint}.jsonl"

    def read_json(self, path: Path) -> Any:
        """The content of a JSON file of the run (e.g. `run.phases`), None if it does not exist."""
        return read_json(path) if path.exists() else None

    def up_to_date(self, path: Path) -> bool:
        """Whether `path` exists and was written after the last change to `dynamics.jsonl` (so a
        result computed from the dynamics still describes them)."""
        return path.exists() and (not self.dynamics.exists()
                                  or path.stat().st_mtime_ns >= self.dynamics.stat().st_mtime_ns)

    @property
    def timings(self) -> Path:
        return self.root / TIMINGS

    def read_timings(self) -> list[dict[str, Any]]:
        return read_json(self.timings) if self.timings.exists() else []

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


# ---- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A model of a run: `path` None is the run's base model; `epoch` and `step` None when unknown."""

    name: str
    path: Path | None
    epoch: float | None
    step: int | None


def is_model_folder(path: Path) -> bool:
    """A transformers model folder or a PEFT adapter folder."""
    return (path / MODEL_CONFIG).exists() or (path / ADAPTER_CONFIG).is_file()


def _checkpoint_meta(path: Path) -> tuple[float | None, int]:
    meta = path / CHECKPOINT_META
    if meta.exists():
        m = read_json(meta)
        if not isinstance(m, dict) or not {"epoch", "step"} <= set(m):
            raise ValueError(f"{meta}: expected {{\"epoch\": ..., \"step\": ...}}; restore or delete the file")
        return m["epoch"], m["step"]
    state = path / HF_TRAINER_STATE
    if state.exists():
        s = read_json(state)
        if not isinstance(s, dict):
            raise ValueError(f"{state}: expected a JSON object (the Trainer's state); restore or delete the file")
        return s.get("epoch"), s.get("global_step", 0)
    return None, 0


def find_checkpoints(folder: str | Path) -> list[Checkpoint]:
    """Checkpoints in an overmem run (`checkpoints/epoch-N`, `step-K`, `merge(...)`) or a Trainer output
    folder (`checkpoint-STEP`), ordered by step; the step is 0 when no metadata tells it."""
    folder = Path(folder)
    root = folder / CHECKPOINTS_DIR if (folder / CHECKPOINTS_DIR).is_dir() else folder
    if not root.is_dir():
        raise missing_folder(folder, "folder")
    found = []
    for p in root.iterdir():
        if not p.is_dir() or not _CHECKPOINT_NAME.fullmatch(p.name):
            continue
        if not is_model_folder(p):  # emptied, or a copy cut short: left out, its results would go missing unsaid
            raise ValueError(f"{p}: a checkpoint folder without a model ({MODEL_CONFIG} or {ADAPTER_CONFIG}); "
                             "restore its files, or delete the folder")
        epoch, step = _checkpoint_meta(p)
        if epoch is None and p.name.startswith("epoch-"):
            epoch = float(p.name.split("-")[1])
        found.append(Checkpoint(p.name, p, epoch, step))
    if not found:
        raise FileNotFoundError(f"{folder}: no checkpoints (epoch-N, step-K or checkpoint-STEP folders) found")
    return sorted(found, key=lambda c: (c.step, c.epoch or 0.0, c.name))


def resolve_checkpoints(run_root: str | Path, names: Sequence[str]) -> list[Checkpoint]:
    """Checkpoints for names of the run (RUN/checkpoints/NAME, `BASE` = the base model) or model folders
    anywhere (named by their folder name; epoch and step known when they lie among checkpoints)."""
    run = RunDir(run_root)
    known = {c.name: c for c in find_checkpoints(run.root)} if run.checkpoints.is_dir() else {}
    chosen: dict[str, Checkpoint] = {}
    for name in names:
        path = Path(name)
        if name in known:
            ckpt = known[name]
        elif name == BASE:
            ckpt = Checkpoint(BASE, None, 0.0, 0)
        elif path.is_dir() and is_model_folder(path):
            meta = {c.name: c for c in find_checkpoints(path.parent)} if _has_checkpoints(path.parent) else {}
            c = meta.get(path.resolve().name)
            ckpt = Checkpoint(path.resolve().name, path, c.epoch if c else None, c.step if c else None)
        else:
            available = ", ".join([BASE, *known]) or "none"
            raise ConfigError(f"checkpoint {name!r}: not a checkpoint of {run.root} (available: {available}) "
                              "and not a model or adapter folder")
        if ckpt.name in chosen and chosen[ckpt.name].path != ckpt.path:
            raise ConfigError(f"two checkpoints are named {ckpt.name!r}; rename one of the folders")
        chosen[ckpt.name] = ckpt
    if not chosen:
        raise ConfigError("no checkpoints given (e.g. --checkpoints epoch-3 epoch-10)")
    return list(chosen.values())


def _has_checkpoints(folder: Path) -> bool:
    try:
        find_checkpoints(folder)
    except FileNotFoundError:
        return False
    return True
