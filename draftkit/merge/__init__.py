"""``draftkit merge``: SLERP, linear and task-arithmetic merges of models of one architecture, tensor by
tensor from the checkpoints, keeping sparsity masks. The maths are :mod:`draftkit.merge.maths` (pure
tensor functions); :mod:`draftkit.merge.runner` reads, checks and writes."""

from draftkit.merge.config import MergeConfig

__all__ = ["MergeConfig", "merge_checkpoints"]


def merge_checkpoints(*args, **kwargs):
    """See :func:`draftkit.merge.runner.merge_checkpoints`."""
    from draftkit.merge.runner import merge_checkpoints as run

    return run(*args, **kwargs)
