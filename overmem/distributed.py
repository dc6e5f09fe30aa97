"""Several processes, one run: who writes, who waits, and evaluation shared between processes.

Launched by `torchrun` or `accelerate launch`, every process runs the same command. Training is
the Hugging Face Trainer's own distributed path (DDP, FSDP, DeepSpeed); this module holds the rest:

- `rank()`, `world_size()`, `is_main()`: read from the process group, or from the launcher's
  environment before the group exists; one process without a launcher is rank 0 of 1.
- `on_main(fn)`: rank 0 alone runs `fn` (a write to the run folder) and tells the others how it
  went, with its result; when it raised, the others raise `RankFailed` instead of waiting for a
  collective that will never come. `main_value` is the same for a value every rank needs.
- `evaluate_sharded(fn, tokenizer, examples, ...)`: each rank evaluates whole scoring batches of
  the split, and every rank gets all rows back in example order.

The group is joined through accelerate's `PartialState` (NCCL on GPUs, gloo on the CPU), the state
the Trainer itself uses. Python objects travel over a gloo group of their own (no GPU memory, no
device sync). In one process nothing here touches `torch.distributed`, and the command line can
import this module and ask `is_main()` without loading torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")
# How long a rank waits in a collective (rank 0 saving a large checkpoint, say): the Trainer's own
# default (`TrainingArguments.ddp_timeout`), which it would give the group had it made it.
TIMEOUT_S = 1800


class RankFailed(RuntimeError):
    """Another rank failed in a step all ranks share; that rank reports the error, this one stops."""


def _initialized() -> bool:
    # Without torch loaded there is no group: commands that never load torch do not load it here.
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes working together (1 without a launcher)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the run folder (rank 0)."""
    return rank() == 0


def setup() -> bool:
    """Join the launcher's process group if there is one; True when several processes run."""
    if world_size() < 2:
        return False
    if not _initialized():
        from datetime import timedelta

        from accelerate import PartialState

        # Reads the launcher's environment; the Trainer finds the group already made.
        PartialState(timeout=timedelta(seconds=TIMEOUT_S))
    _leave_at_exit()
    return True


@cache
def _leave_at_exit() -> None:
    """Leave the group when the interpreter exits, if the script has not (a user's own Trainer
    script rarely does). A gloo group still alive during interpreter finalization can abort the
    process ("terminate called without an active exception"): its worker threads may hold tensors
    whose release then needs a Python that is being torn down."""
    import atexit

    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
        _objects_group.cache_clear()


@cache
def _objects_group() -> Any:
    """The group Python objects travel over: the default one if it is gloo, else a gloo group."""
    from datetime import timedelta

    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                      timeout=timedelta(seconds=TIMEOUT_S))


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not setup():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_objects_group())
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not setup():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_objects_group())
    return out


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only; the other ranks wait for it and get its result.

    Rank 0 re-raises its own error after telling the others, which raise `RankFailed` naming
    it: an error in a rank-0 write stops every rank instead of leaving them at the next collective."""
    if not setup():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - told to the others, then re-raised
            error = err
    status = broadcast((result, None if error is None else _describe(error)))
    if error is not None:
        raise error
    if status[1] is not None:
        raise RankFailed(f"rank 0 failed: {status[1]}")
    return status[0]


def main_value(fn: Callable[[], T]) -> T:
    """`fn()` computed on rank 0 (a read of the run folder) and the same value on every rank."""
    return on_main(fn)  # type: ignore[return-value]


def shard_indices(tokenizer: Any, examples: Sequence[Any], *, batch_size: int, max_length: int) -> list[int]:
    """The examples this rank evaluates: whole batches of `length_sorted_batches`, dealt round-robin.

    Each rank's share, kept in the original order, sorts into exactly the batches it was dealt
    (the sort is stable and only the globally last batch can be short), so every example is
    scored in the same batch, padded to the same width, as in one process."""
    from .data.encoding import length_sorted_batches

    batches = [idx for idx, _ in length_sorted_batches(tokenizer, examples, batch_size=batch_size,
                                                       max_length=max_length)]
    mine = batches[rank()::world_size()]
    return sorted(i for idx in mine for i in idx)


def evaluate_sharded(
    fn: Callable[[Sequence[Any]], list[T]], tokenizer: Any, examples: Sequence[Any], *, batch_size: int,
    max_length: int,
) -> list[T]:
    """`fn(examples)` (one row per example, in order) with the work split across ranks: each rank
    runs `fn` on its share (`shard_indices`); every rank returns all rows in example order. A rank
    whose share fails raises its error; the others raise `RankFailed`."""
    if not setup():
        return fn(examples)
    idx = shard_indices(tokenizer, examples, batch_size=batch_size, max_length=max_length)
    try:
        part: tuple[list[int], list[T] | None, str | None] = (idx, fn([examples[i] for i in idx]), None)
        error = None
    except Exception as err:  # noqa: BLE001 - told to the others, then re-raised
        part, error = (idx, None, _describe(err)), err
    parts = all_gather(part)
    if error is not None:
        raise error
    failed = [f"rank {r}: {p[2]}" for r, p in enumerate(parts) if p[2] is not None]
    if failed:
        raise RankFailed("; ".join(failed))
    rows: list[Any] = [None] * len(examples)
    for indices, got, _ in parts:
        for i, row in zip(indices, got):  # type: ignore[arg-type]
            rows[i] = row
    return rows
