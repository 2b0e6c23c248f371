"""The processes of one command started by torchrun: which one this is, and the few collective steps the sharded
template extraction needs (share the work, wait for all shares, agree on one decision).

``torchrun --nproc_per_node=N finetune.py ...`` (or ``eval/evaluation.py``) starts N copies of the command; each
reads its rank from the environment torchrun sets. A plain ``python finetune.py`` is one process: ``Processes``
then has ``world == 1`` and every collective step is a no-op, so the code has a single path.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from utils.errors import UserError

T = TypeVar("T")

# a share's extraction can take hours on a large set, and rank 0 assembles the entry while the others wait
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Processes:
    """This process's place among the command's processes (rank 0 trains, sweeps and writes the results)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # the group was started by ``processes`` (and is left by this object alone)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, batch: int) -> slice:
        """This process's contiguous part of ``n`` items, split at multiples of ``batch`` so that every batch is
        one the single-process pass would also run (the same images together, hence the same templates)."""
        batches = -(-n // batch)
        lo, hi = self.rank * batches // self.world, (self.rank + 1) * batches // self.world
        return slice(min(lo * batch, n), min(hi * batch, n))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, value: T, failure: BaseException | None, doing: str) -> T:
        """Process 0's ``value`` on every process (a broadcast: a large value is sent once, not gathered from every
        process); if process 0 failed (``failure``, its own), all stop together."""
        if self.world > 1:
            box: list[Any] = [(value, _message(failure)) if self.main else None]
            dist.broadcast_object_list(box, src=0)
            value, message = box[0]
            if message is not None and failure is None:
                raise UserError(f"process 0 failed while {doing}, so process {self.rank} stops too. Process 0's "
                                f"error: {message}")
        if failure is not None:
            raise failure
        return value

    def agree(self, value: T, failure: BaseException | None, doing: str) -> list[T]:
        """Every process's ``value`` once all have finished a step; if any process failed at it (``failure``), all
        stop together: the failed one raises its own error, the others a UserError naming it. Without this a
        failure on one machine would leave the others waiting in the next collective step."""
        out = self.gather((value, _message(failure)))
        if failure is not None:
            raise failure
        failed = [(rank, message) for rank, (_, message) in enumerate(out) if message is not None]
        if failed:
            rank, message = failed[0]
            raise UserError(f"process {rank} failed while {doing}, so process {self.rank} stops too. Process "
                            f"{rank}'s error: {message}")
        return [v for v, _ in out]

    def decide(self, step: Callable[[], T], doing: str) -> T:
        """Process 0 runs ``step``; its result reaches every process (``from_main``), and a failure in it stops
        them all. The other processes run nothing."""
        value: Any = None   # process 0's result; for the others whatever it sends them
        failure: BaseException | None = None
        if self.main:
            try:
                value = step()
            except Exception as exc:   # the others learn of it and stop too
                failure = exc
        return self.from_main(value, failure, doing)

    def each(self, step: Callable[[], T], doing: str) -> list[T]:
        """Every process runs ``step``; once all have, each gets every process's result in rank order (``agree``),
        and a failure anywhere stops them all."""
        value: Any = None   # process 0's result; for the others whatever it sends them
        failure: BaseException | None = None
        try:
            value = step()
        except Exception as exc:   # the others learn of it and stop too
            failure = exc
        return self.agree(value, failure, doing)

    def leave(self) -> None:
        """Leave the process group once the shared work is done: process 0 then trains or sweeps alone, with no
        group (and no peer) left to wait for."""
        if self.owns_group and dist.is_initialized():
            _destroy_group()

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: with several processes on CUDA, GPU ``local_rank`` of its machine."""
        if self.world > 1 and device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started process {self.local_rank} of this machine but it has "
                                f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node at most the number of "
                                f"GPUs, or --set device=cpu.")
            return torch.device("cuda", self.local_rank)
        return device


def _message(failure: BaseException | None) -> str | None:
    """What the other processes are told of a failure."""
    if failure is None:
        return None
    return str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}"


def _launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("the environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets "
                        "them); unset them to run a single process.") from None


@contextlib.contextmanager
def processes(device: torch.device) -> Iterator[Processes]:
    """Join the command's other processes for the block (gloo on CPU, nccl on CUDA); a single process joins
    nothing. The process group is left at the end, so no global state outlives the command."""
    rank, world, local_rank = _launched()
    if world == 1:
        yield Processes()
        return
    if not dist.is_available():
        raise UserError("torchrun started several processes but this PyTorch build has no torch.distributed; run "
                        "a single process (python finetune.py ...).")
    started = not dist.is_initialized()
    procs = Processes(rank, world, local_rank, owns_group=started)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(procs.device(device))
        kwargs["device_id"] = procs.device(device)
    if started:
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    try:
        yield procs
    finally:
        if started and dist.is_initialized():
            _destroy_group()


def _destroy_group() -> None:
    """Destroy the process group and free its objects now: left in reference cycles until the interpreter shuts
    down, gloo's objects were freed then and aborted the process ('terminate called without an active exception',
    3 of 34 two-process runs under load here; none in 44 with the collection)."""
    dist.destroy_process_group()
    gc.collect()
