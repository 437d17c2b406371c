"""Spreading a search's independent candidates over processes.

Under ``torchrun`` (or ``accelerate launch``) every process takes every ``N``-th candidate. The processes meet
through a gloo process group of the search's own (a barrier before the frontier is judged) and through the work
folder: each shared step (the regeneration, a prune, a sparsify) is built under a file lock by whichever process
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
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def spread() -> Iterator[Procs]:
    """This process's place among the search's processes (one process outside a launcher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Procs()
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the launcher's rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE)
    procs = Procs(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    _reset_accelerate()
    try:
        yield procs
    finally:
        _reset_accelerate()
        os.environ.update(saved)


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
