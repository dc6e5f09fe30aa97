"""Tracking in a second process while training goes on (`eval.overlap`).

A run evaluates each checkpoint as it is saved, and training waits meanwhile. On a machine whose
training leaves cores idle (the demo trains on one torch thread of two cores, so that its figures
are the same on every machine), a worker process can evaluate checkpoint k from its saved files
while the Trainer trains epoch k + 1: the run then takes about the longer of training and tracking
instead of their sum.

The results are those of tracking inside the training process: the worker loads the weights the
Trainer saved (safetensors keep every bit), runs the same `evaluate_checkpoint` on the same
examples with the same number of torch threads, in checkpoint order (so the draft reuse of
`overmem.generation.generate_greedy` sees the same previous generations). The base model is
evaluated there too, while the first epoch trains.

The worker is the run folder's one writer of `dynamics.jsonl` and `samples/` while it lives; the
Trainer writes checkpoints and its own state. The training process learns of each finished
checkpoint through a queue, prints its rows, and stops training (`TrainingDiverged`) when one has
non-finite losses; with the overlap that stop comes a checkpoint or two later than without.
The worker dies with the run: it exits when the training process does, however it ends
(`PR_SET_PDEATHSIG` on Linux; an interrupted run resumes what the worker did not finish).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .data.example import Example

# How long `close` waits for the worker to stop after being told to, before killing it.
STOP_GRACE_S = 30.0


class TrackerFailed(RuntimeError):
    """The tracking worker raised; the message names its error (OVERMEM_DEBUG=1 prints its traceback)."""


def _die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere the multiprocessing
    daemon flag covers orderly exits only)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _work(cfg_json: str, tracked: Mapping[str, Sequence[Example]], threads: int, jobs: Any, results: Any) -> None:
    """The worker: evaluate each job (name, checkpoint folder or None for the base, epoch, step) in
    order until None; report ("rows", name, rows) per job, or ("error", message, traceback) once and stop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    try:
        import torch

        from .config import RunConfig
        from .dynamics import eval_kwargs, evaluate_checkpoint
        from .models import load_for_eval, load_tokenizer, quiet_libraries, release_memory
        from .results import RunDir

        torch.set_num_threads(threads)
        cfg = RunConfig.model_validate_json(cfg_json)
        quiet_libraries(True)
        run = RunDir(cfg.out_dir)
        tokenizer = load_tokenizer(cfg.model)
        ev = {**eval_kwargs(cfg, tracked), "quiet": True}
        while (job := jobs.get()) is not None:
            name, path, epoch, step = job
            model = load_for_eval(path, cfg)
            rows = evaluate_checkpoint(model, tokenizer, tracked, run, checkpoint=name, epoch=epoch, step=step, **ev)
            del model
            release_memory()
            results.put(("rows", name, rows))
    except BaseException as err:  # noqa: BLE001 - reported to the training process, which raises it
        results.put(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))


class OverlapTracker:
    """Evaluate checkpoints in a worker process while the caller trains.

    `submit` queues a checkpoint, `poll` returns the rows of the checkpoints finished since the last
    call (raising `TrackerFailed` if the worker failed), `close` waits for the queue to drain, and
    `stop` ends the worker at once (a finished checkpoint's files are complete: the samples file is
    written before its dynamics row, see `overmem.dynamics.evaluate_checkpoint`)."""

    def __init__(self, cfg: Any, tracked: Mapping[str, Sequence[Example]], *, threads: int, quiet: bool = True):
        ctx = mp.get_context("spawn")  # a fork of a process holding torch threads is unsafe
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.quiet = quiet
        self.pending: list[str] = []
        self.seconds = 0.0  # time the worker spent evaluating
        self.stopped = False
        self.process = ctx.Process(target=_work, args=(cfg.model_dump_json(), dict(tracked), threads, self.jobs,
                                                       self.results), daemon=True, name="overmem-tracker")
        self.process.start()

    def submit(self, name: str, path: str | Path | None, epoch: float, step: int) -> None:
        self.jobs.put((name, None if path is None else str(path), epoch, step))
        self.pending.append(name)

    def poll(self, timeout: float | None = 0.0) -> list[dict[str, Any]]:
        """Rows of checkpoints finished since the last call; with a `timeout` (None: no limit) wait
        that long for the next one when none has finished."""
        rows: list[dict[str, Any]] = []
        block = timeout is None or timeout > 0
        while True:
            try:
                message = self.results.get(block=block and not rows, timeout=timeout if block and not rows else None)
            except queue.Empty:
                break
            if message[0] == "error":
                if os.environ.get("OVERMEM_DEBUG"):
                    print(message[2], file=sys.stderr)
                raise TrackerFailed(f"tracking checkpoints in a second process failed: {message[1]}")
            _, name, new = message
            self.pending.remove(name)
            rows.extend(new)
            self.seconds += sum(r.get("seconds") or 0.0 for r in new)
            if not self.quiet:
                from .dynamics import summary_line

                for row in new:
                    tqdm.write(summary_line(row))
            if not self.process.is_alive() and self.results.empty():
                break
        if not rows and self.pending and not self.process.is_alive():
            raise TrackerFailed(f"the tracking process exited (code {self.process.exitcode}) before evaluating "
                                f"{', '.join(self.pending)}; resume the run to evaluate them")
        return rows

    def close(self, progress: bool = False) -> list[dict[str, Any]]:
        """Wait until every submitted checkpoint is evaluated; returns their rows; ends the worker."""
        rows: list[dict[str, Any]] = []
        with tqdm(total=len(self.pending), desc="tracking (second process)", disable=not progress) as bar:
            while self.pending:
                new = self.poll(timeout=1.0)
                bar.update(len({r["checkpoint"] for r in new}))
                rows.extend(new)
        self.jobs.put(None)
        self.process.join(STOP_GRACE_S)
        self.stop()
        return rows

    def stop(self) -> None:
        """End the worker now (a no-op once it has ended)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if not self.stopped:
            self.stopped = True
            for q in (self.jobs, self.results):
                q.cancel_join_thread()
                q.close()

