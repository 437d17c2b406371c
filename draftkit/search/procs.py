"""Spreading a search's independent candidates over processes.

Under ``torchrun`` (or ``accelerate launch``) every process takes every ``N``-th candidate. The processes meet
through the work folder and, once every candidate is measured, in a gloo process group (a barrier before the first
process judges the frontier and writes the report). In the work folder each shared step (the regeneration, a prune, a sparsify) is built under a file lock by whichever process
needs it first, the others wait for it and reuse it, so it is still computed once.

Each candidate is trained by one process alone: inside :func:`spread` the launcher's variables are hidden, so the
stages (accelerate in distill's training) see a single process rather than joining a data-parallel group with
candidates that are not theirs. They are restored, and accelerate's state reset, on the way out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# what torchrun / accelerate launch set for each process
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "GROUP_WORLD_SIZE", "ACCELERATE_USE_CPU")


@dataclass(frozen=True)
class Procs:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        """Wait for every process. The gloo group is made here, at the end of the work: while a process group
        exists, transformers saves a model on rank 0 only, and each process saves its own candidates."""
        if self.world <= 1:
            return
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():  # the launcher's rendezvous (MASTER_ADDR/PORT); a search may take days
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timedelta(days=7))
        dist.barrier()

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def spread(*, cpu: bool = True) -> Iterator[Procs]:
    """This process's place among the search's processes (one process outside a launcher). ``cpu``: the processes
    run on CPUs (accelerate's state, set up again on the way out, is a gloo one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Procs()
        return
    procs = Procs(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    _reset_accelerate()
    try:
        yield procs
    finally:
        _reset_accelerate()
        os.environ.update(saved)
        from accelerate.state import PartialState

        PartialState(cpu=cpu)  # the launch's state again, on the group the barrier made (the stage's output: rank 0)


def _reset_accelerate() -> None:
    """Forget accelerate's process state, so that the next use reads the environment again."""
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@contextmanager
def step_lock(work: Path, key: str) -> Iterator[None]:
    """Wait for, then hold, the lock of one shared step of the work folder (several processes may need it)."""
    from filelock import FileLock

    folder = work / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{key}.lock")):
        yield
