"""SparseGPT maths as pure functions on tensors (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", section 3).

* Hessian of the layer-wise reconstruction loss ||WX - ŴX||²: H = 2/n Σ x xᵀ over the n calibration
  tokens (section 3.1), accumulated chunk by chunk with :func:`accumulate_hessian`.
* Inverse: dead inputs (zero diagonal) get H_cc = 1 and their weights are zeroed; H is dampened by a
  fraction of mean(diag H); the upper Cholesky factor of H⁻¹ carries, row by row, the inverse Hessians
  of the shrinking column sets that the column-by-column OBS update needs (section 3.2, "Hessian
  synchronization"): :func:`inverse_hessian_cholesky`.
* Pruning (Algorithm 1): columns are processed in lazy blocks of ``block_size`` (section 3.4); per
  block the mask is chosen adaptively by the OBS saliency w² / [H⁻¹]²_cc (section 3.3, "adaptive mask
  selection"), or, for N:M, the N lowest-saliency weights of every M consecutive columns (section 3.5);
  each pruned weight's error is spread over the not-yet-processed columns: :func:`sparsegpt_prune`.

Variable names (W1, Q1, Err1, Losses1, Hinv1, mask1) follow IST-DASLab/sparsegpt's ``fasterprune`` and
llm-compressor's ``sparsify_weight``, so the code can be held beside them. Unlike those, the number of
weights pruned is exact: ``floor(sparsity * W.numel())`` per matrix (no threshold ties, and sparsity 0
prunes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISION = torch.float32


def make_empty_hessian(columns: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero ``[columns, columns]`` float32 Hessian."""
    return torch.zeros((columns, columns), dtype=PRECISION, device=device)


def accumulate_hessian(H: torch.Tensor, X: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
    """Add the tokens of ``X`` (``[..., columns]``) to the running mean H = 2/n Σ x xᵀ, in place.

    Returns ``(H, n)`` with ``n`` the number of tokens seen so far.
    """
    X = X.reshape(-1, X.shape[-1])
    added = X.shape[0]
    if added == 0:
        return H, num_tokens
    total = num_tokens + added
    H.mul_(num_tokens / total)
    X = X.to(device=H.device, dtype=PRECISION)
    # addmm_ with alpha keeps a single [columns, columns] buffer alive
    H.addmm_(X.t(), X, alpha=2.0 / total)
    return H, total


@dataclass
class InverseHessian:
    """Upper Cholesky factor of the dampened H⁻¹, shared by every linear that reads the same input."""

    Hinv: torch.Tensor  # [columns, columns], upper triangular
    dead: torch.Tensor  # [columns] bool: inputs that were always zero
    dampening: float  # fraction of mean(diag H) that was finally added
    retries: int  # how many times the dampening had to be raised


def inverse_hessian_cholesky(
    H: torch.Tensor, dampening: float = 0.01, *, max_retries: int = 6
) -> InverseHessian:
    """Dead-input handling, dampening and the Cholesky factor of H⁻¹ (SparseGPT section 3.2).

    ``H`` is not modified. When a Cholesky factorisation fails (H not positive definite in float32),
    the dampening is multiplied by 10 and the factorisation retried, up to ``max_retries`` times; the
    returned ``retries`` says how often, so the caller can tell the user.

    Raises:
        torch.linalg.LinAlgError: still not positive definite after ``max_retries``.
    """
    H = H.to(PRECISION).clone()
    columns = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    diag = torch.arange(columns, device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    frac = dampening
    for attempt in range(max_retries + 1):
        Hd = H.clone()
        Hd[diag, diag] += frac * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return InverseHessian(U, dead, frac, attempt)
        frac = frac * 10 if frac > 0 else 1e-4
    raise torch.linalg.LinAlgError(
        f"the Hessian is not positive definite even with dampening {frac / 10:g}: "
        "use more calibration samples or a larger --dampening"
    )


def _block_quota(sparsity: float, rows: int, columns: int, i1: int, i2: int) -> int:
    """Weights to prune in columns [i1, i2) so that the whole matrix gets exactly floor(s · numel)."""
    return _floor(sparsity * rows * i2) - _floor(sparsity * rows * i1)


def _floor(x: float) -> int:
    """floor that forgives float round-off (0.3 * 1680 is 503.99999...)."""
    return int(x + 1e-6)


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    inv: InverseHessian,
    *,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``W`` (``[rows, columns]``) with SparseGPT's Algorithm 1, given the inverse-Hessian factor.

    Args:
        W: the weight; not modified.
        inv: from :func:`inverse_hessian_cholesky` on the Hessian of this weight's input.
        sparsity: fraction of weights to prune (unstructured); ignored when ``prune_n`` is set.
        prune_n, prune_m: N:M pattern, pruning ``prune_n`` of every ``prune_m`` consecutive input columns
            (SparseGPT section 3.5; 2:4 keeps 2 of 4). ``block_size`` must be a multiple of ``prune_m``.
        block_size: columns per lazy batch-update block (section 3.4).

    Returns:
        ``(W_pruned, mask, loss)``: float32 pruned weight, bool mask (True = pruned), and the OBS
        estimate Σ (w - q)² / [H⁻¹]²_cc / 2 of the reconstruction loss.
    """
    Hinv = inv.Hinv
    W = W.to(device=Hinv.device, dtype=PRECISION).clone()
    num_rows, num_columns = W.shape
    if prune_n:
        if num_columns % prune_m:
            raise ValueError(f"N:M with M={prune_m} needs the input width ({num_columns}) to be a multiple of M")
        block_size = max(prune_m, block_size - block_size % prune_m)  # groups never straddle blocks
    W[:, inv.dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    Losses = torch.zeros(num_rows, device=W.device, dtype=PRECISION)

    for i1 in range(0, num_columns, block_size):
        i2 = min(i1 + block_size, num_columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not prune_n:
            # Section 3.3: adaptive mask selection per block by the OBS saliency w² / [H⁻¹]²_cc,
            # computed on the block's weights after the updates from earlier blocks.
            k = _block_quota(sparsity, num_rows, num_columns, i1, i2)
            if k > 0:
                tmp = W1**2 / d1.reshape((1, -1)) ** 2
                mask1.view(-1)[torch.topk(tmp.flatten(), k, largest=False)[1]] = True

        # The per-column updates are small ops: on CPU, thread hand-offs cost more than they save
        # (measured 20-50x slower with 2 threads on a loaded 2-core machine), so run them on one thread.
        threads = torch.get_num_threads()
        if W1.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            _prune_block(W1, Q1, Err1, Losses1, Hinv1, d1, mask1, count, prune_n, prune_m)
        finally:
            torch.set_num_threads(threads)

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        # Section 3.4: lazy batch update of all later columns with the block's accumulated errors.
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W, mask, float(Losses.sum().item())



def _prune_block(W1, Q1, Err1, Losses1, Hinv1, d1, mask1, count, prune_n, prune_m) -> None:
    """Algorithm 1's inner loop over one block's columns (in place on W1, Q1, Err1, Losses1, mask1)."""
    for i in range(count):
        w = W1[:, i]
        d = Hinv1[i, i]

        if prune_n and i % prune_m == 0:
            # Section 3.5: N lowest-saliency weights of every M columns, chosen when the group starts.
            tmp = W1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m].reshape((1, -1)) ** 2
            mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)

        q = w.clone()
        q[mask1[:, i]] = 0

        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d**2

        err1 = (w - q) / d
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err1



def sparsify_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One weight, one Hessian: :func:`inverse_hessian_cholesky` then :func:`sparsegpt_prune`."""
    inv = inverse_hessian_cholesky(H, dampening)
    return sparsegpt_prune(W, inv, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, block_size=block_size)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ||WX - ŴX||² / ||WX||² on the inputs summarised by H = 2/n Σ x xᵀ.

    ||ΔW X||² = n/2 · tr(ΔW H ΔWᵀ), so the ratio needs only the (undampened) Hessian.
    """
    W = W.to(device=H.device, dtype=PRECISION)
    dW = W - W_hat.to(device=H.device, dtype=PRECISION)
    num = (dW @ H * dW).sum()
    den = (W @ H * W).sum()
    return float((num / den).item()) if den > 0 else 0.0
