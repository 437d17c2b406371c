"""One-shot sparsification: SparseGPT (unstructured and N:M), Wanda and magnitude baselines."""

from draftkit.sparsify.baselines import magnitude_mask, nm_mask, unstructured_mask, wanda_mask
from draftkit.sparsify.config import SparsifyConfig
from draftkit.sparsify.runner import sparsify_model
from draftkit.sparsify.sparsegpt import (
    accumulate_hessian,
    inverse_hessian_cholesky,
    make_empty_hessian,
    reconstruction_error,
    sparsegpt_prune,
    sparsegpt_prune_many,
    sparsify_weight,
)

__all__ = [
    "SparsifyConfig",
    "accumulate_hessian",
    "inverse_hessian_cholesky",
    "magnitude_mask",
    "make_empty_hessian",
    "nm_mask",
    "reconstruction_error",
    "sparsegpt_prune",
    "sparsegpt_prune_many",
    "sparsify_model",
    "sparsify_weight",
    "unstructured_mask",
    "wanda_mask",
]
