"""One-shot sparsification: SparseGPT (unstructured and N:M), Wanda and magnitude baselines."""
