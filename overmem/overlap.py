"""Tracking in a second process while training goes on (`eval.overlap`).

A run evaluates each checkpoint as it is saved, and training waits meanwhile. On a machine whose
training leaves cores idle (the demo trains on one torch thread of two cores, so that its figures
are the same on every machine), a worker process can evaluate checkpoint k from its saved files
while the Trainer trains epoch k + 1: the run then takes about the longer of training and tracking
instead of their sum.

The results are those of tracking inside the training process: the worker loads the weights the
Trainer saved (safetensors keep every bit), runs the same `evaluate_checkpoint` on the same
examples with the same number of torch threads, in checkpoint order while training goes on (so
the draft reuse of `overmem.generation.generate_greedy` sees the same previous generations; after
training, see below, only draft counts may differ). The base model is evaluated there too, while
the first epoch trains.

Once training is over, the training process helps with the checkpoints left: it takes over the
largest splits (about half of the examples), in checkpoint order from the first the worker has not
started, and the worker keeps the others; a worker done with its own splits takes the largest
ones too, from the last checkpoint backwards, until the two meet (`OverlapTracker.close`). The
rows are then put back in the order one process writes them.

While training goes on, the worker is the run folder's one writer of `dynamics.jsonl` and
`samples/`; the Trainer writes checkpoints and its own state. The training process learns of each finished
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
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .data.example import Example

# How long `close` waits for the worker to stop after being told to, before killing it.
STOP_GRACE_S = 30.0
NEVER = 2**62  # no job index reaches it


class TrackerFailed(RuntimeError):
    """The tracking worker raised; the message names its error (OVERMEM_DEBUG=1 prints its traceback)."""


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere the multiprocessing
    daemon flag covers orderly exits only). A parent that died before the request (while this
    process was still starting) is no longer this process's parent: then it ends at once."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


class _Evaluator:
    """What evaluating a job takes, in either process: the run, its tokenizer and settings."""

    def __init__(self, cfg: Any, tracked: Mapping[str, Sequence[Example]], *, quiet: bool):
        from .dynamics import eval_kwargs
        from .models import load_tokenizer
        from .results import RunDir

        self.cfg, self.tracked = cfg, tracked
        self.run = RunDir(cfg.out_dir)
        self.tokenizer = load_tokenizer(cfg.model)
        self.kwargs = {**eval_kwargs(cfg, tracked), "quiet": quiet}
        self.model: Any = None
        self.loaded: str | None = None

    def __call__(self, job: tuple[int, str, str | None, float, int], split: str) -> list[dict[str, Any]]:
        """The rows of `split` on the job's checkpoint (none when already in the dynamics)."""
        from .backends import load_for_eval
        from .dynamics import evaluate_checkpoint
        from .models import module_ref, release_memory

        _, name, path, epoch, step = job
        if (name, split) in self.run.done():
            return []
        if self.loaded != name:
            dropped = module_ref(self.model)
            self.model = None
            release_memory(dropped)
            self.model, self.loaded = load_for_eval(path, self.cfg), name
        return evaluate_checkpoint(self.model, self.tokenizer, {split: self.tracked[split]}, self.run,
                                   checkpoint=name, epoch=epoch, step=step, **self.kwargs)


def _work(cfg_json: str, tracked: Mapping[str, Sequence[Example]], handed: Sequence[str], threads: int, jobs: Any,
          results: Any, shared: tuple[Any, ...], parent: int) -> None:
    """The worker: evaluate each job (index, name, checkpoint folder or None for the base, epoch,
    step) in order until None; report ("rows", name, rows) per job, or ("error", message,
    traceback) once and stop. `shared` (see `OverlapTracker.close`): a lock; the first job whose
    `handed` splits are the training process's; the last job whose handed splits this process
    started; the first job the training process has not taken, and the first one this process
    took back from the end. After None, take the handed splits of the jobs left from the last
    backwards, reporting ("taken", name, rows) for each, then ("finished",). `parent`: the
    training process's id."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    lock, handed_from, started, front, back = shared
    try:
        import torch

        from .config import RunConfig
        from .models import quiet_libraries

        torch.set_num_threads(threads)
        cfg = RunConfig.model_validate_json(cfg_json)
        quiet_libraries(True)
        evaluate = _Evaluator(cfg, tracked, quiet=True)
        seen = []
        while (job := jobs.get()) is not None:
            seen.append(job)
            rows = []
            for split in tracked:
                if split in handed:
                    with lock:
                        if job[0] >= handed_from.value:
                            continue
                        started.value = job[0]
                rows.extend(evaluate(job, split))
            results.put(("rows", job[1], rows))
        while True:  # training is over: take the training process's last jobs until the two meet
            with lock:
                if back.value - 1 < front.value:
                    break
                back.value -= 1
                job = seen[back.value]
            results.put(("taken", job[1], [row for split in handed for row in evaluate(job, split)]))
        results.put(("finished",))
    except BaseException as err:  # noqa: BLE001 - reported to the training process, which raises it
        results.put(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))


def handed_splits(tracked: Mapping[str, Sequence[Example]]) -> list[str]:
    """The splits the training process takes over once training ends: the largest ones, up to about
    half of the examples, leaving the worker at least one (none when there is only one split)."""
    if len(tracked) < 2:
        return []
    total = sum(map(len, tracked.values()))
    chosen: list[str] = []
    for split in sorted(tracked, key=lambda s: -len(tracked[s])):
        if len(chosen) == len(tracked) - 1 or sum(len(tracked[s]) for s in chosen) >= total / 2:
            break
        chosen.append(split)
    return chosen


class OverlapTracker:
    """Evaluate checkpoints in a worker process while the caller trains.

    `submit` queues a checkpoint, `poll` returns the rows the worker finished since the last call
    (raising `TrackerFailed` if it failed), `close` finishes the queue with the caller's help, and
    `stop` ends the worker at once (a finished checkpoint's files are complete: the samples file is
    written before its dynamics row, see `overmem.dynamics.evaluate_checkpoint`)."""

    def __init__(self, cfg: Any, tracked: Mapping[str, Sequence[Example]], *, threads: int, quiet: bool = True):
        ctx = mp.get_context("spawn")  # a fork of a process holding torch threads is unsafe
        self.cfg, self.tracked, self.quiet = cfg, dict(tracked), quiet
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.submitted: list[tuple[int, str, str | None, float, int]] = []
        self.pending: list[str] = []  # jobs the worker has not reported
        self.seconds = 0.0  # time the worker spent evaluating
        self.helped = 0.0  # time the training process spent evaluating, in `close`
        self.stopped = False
        self.closing = False  # `close` has told the worker that no job will come
        self.finished = False  # the worker has reported its last rows
        self.taken = 0  # jobs whose handed splits the worker took back in `close`
        self.handed = handed_splits(self.tracked)
        # lock, first job handed over, last job whose handed splits the worker started, first job the
        # training process has not taken, first job the worker took back (see `_work` and `close`)
        self.shared = (ctx.Lock(), ctx.Value("q", NEVER, lock=False), ctx.Value("q", -1, lock=False),
                       ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False))
        self.process = ctx.Process(target=_work, args=(cfg.model_dump_json(), self.tracked, self.handed, threads,
                                                       self.jobs, self.results, self.shared, os.getpid()),
                                   daemon=True, name="overmem-tracker")
        self.process.start()

    def submit(self, name: str, path: str | Path | None, epoch: float, step: int) -> None:
        if any(job[1] == name for job in self.submitted):  # saved again by a resumed Trainer
            return
        job = (len(self.submitted), name, None if path is None else str(path), epoch, step)
        self.submitted.append(job)
        self.jobs.put(job)
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
            if message[0] == "finished":
                self.finished = True
                continue
            kind, name, new = message
            if kind == "rows":
                self.pending.remove(name)
            else:  # "taken": the handed splits of a job the worker took back in `close`
                self.taken += 1
            rows.extend(new)
            self.seconds += sum(r.get("seconds") or 0.0 for r in new)
            if not self.quiet:
                from .dynamics import summary_line

                for row in new:
                    tqdm.write(summary_line(row))
            if not self.process.is_alive() and self.results.empty():
                break
        if not rows and (self.pending or self.closing and not self.finished) and not self.process.is_alive():
            left = ", ".join(self.pending) or "the checkpoints it took over"
            raise TrackerFailed(f"the tracking process exited (code {self.process.exitcode}) before evaluating "
                                f"{left}; resume the run to evaluate them")
        return rows

    def close(self, progress: bool = False) -> list[dict[str, Any]]:
        """Finish every submitted checkpoint, end the worker, and return the rows written since the
        last `poll`.

        Training is over, so this process helps: it takes over the `handed` splits (the largest,
        about half of the examples) of the jobs whose handed splits the worker has not started, and
        evaluates them in checkpoint order while the worker goes on with the other splits. A worker
        done with those takes the handed splits back from the last job backwards, until the two
        meet: each (checkpoint, split) is evaluated once, by one of them. Drafts are the
        generations of the checkpoint evaluated last on the split
        (`overmem.dynamics.previous_generations`): where the worker takes a job back, a later or
        an earlier one than the previous checkpoint, whose draft counts may then differ from one
        process's; the generations, the model's own greedy ones, do not. The rows are then put
        back in the order one process writes them (`_reorder`)."""
        rows: list[dict[str, Any]] = []
        lock, handed_from, started, front, back = self.shared
        with lock:
            handed_from.value = front.value = first = started.value + 1
            back.value = len(self.submitted) if self.handed else first
        self.closing = True
        self.jobs.put(None)  # no more jobs: the worker takes back what is left once its own are done
        mine = self.submitted[first:] if self.handed else []
        with tqdm(total=len(self.pending) + len(mine), desc="tracking", disable=not progress) as bar:
            def drain(timeout: float) -> None:
                left = len(self.pending) - self.taken  # one less per job finished or taken back
                rows.extend(self.poll(timeout))
                bar.update(left - (len(self.pending) - self.taken))

            evaluate = _Evaluator(self.cfg, self.tracked, quiet=self.quiet) if mine else None
            previous = self.submitted[first - 1] if first else None
            for job in mine:
                with lock:
                    if job[0] >= back.value:  # the worker has taken this one and those after it
                        break
                    front.value = job[0] + 1
                # Its drafts are the previous job's generations, which the worker may still be writing.
                while previous is not None and not all((previous[1], s) in evaluate.run.done() for s in self.handed):
                    drain(0.1)
                t = time.perf_counter()
                for split in self.handed:
                    rows.extend(evaluate(job, split))
                self.helped += time.perf_counter() - t
                bar.update(1)
                drain(0.0)
                previous = job
            while self.pending or not self.finished:
                drain(1.0)
        self.process.join(STOP_GRACE_S)
        self.stop()
        self._reorder()
        return rows

    def _reorder(self) -> None:
        """`dynamics.jsonl` in the order of evaluating the checkpoints one after the other, each one's
        splits in the tracked order: the checkpoints evaluated before this tracker first (in the
        order they appear), then its jobs. Rows written by two processes, or by a run stopped and
        resumed, come out as one process writes them."""
        from .results import RunDir, write_jsonl

        run = RunDir(self.cfg.out_dir)
        rows = run.read_dynamics()
        index = {job[1]: job[0] for job in self.submitted}
        seen: dict[str, int] = {}
        for row in rows:
            seen.setdefault(row["checkpoint"], len(seen))
        splits = list(self.tracked)

        def key(row: Mapping[str, Any]) -> tuple[int, int, int]:
            ckpt = row["checkpoint"]
            return (index.get(ckpt, -1), seen[ckpt] if ckpt not in index else 0,
                    splits.index(row["split"]) if row["split"] in splits else len(splits))

        ordered = sorted(rows, key=key)
        if ordered != rows:
            write_jsonl(run.dynamics, ordered)

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

