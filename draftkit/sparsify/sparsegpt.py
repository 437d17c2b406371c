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
  each pruned weight's error is spread over the not-yet-processed columns: :func:`sparsegpt_prune`;
  linears reading the same input (q/k/v, gate/up) share one column loop: :func:`sparsegpt_prune_many`.

Memory: the input is converted to float32 chunk by chunk while H accumulates, and H⁻¹'s factor is
computed in place in one work buffer, so at most H and one [columns, columns] buffer are alive.

Variable names (W1, Q1, Err1, Losses1, Hinv1, mask1) follow IST-DASLab/sparsegpt's ``fasterprune`` and
llm-compressor's ``sparsify_weight``, so the code can be held beside them. Unlike those, the number of
weights pruned is exact: ``floor(sparsity * W.numel())`` per matrix (no threshold ties, and sparsity 0
prunes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISION = torch.float32
# rows of H per product in accumulate_hessian (the strips on and above the diagonal)
HESSIAN_STRIP = 128


def make_empty_hessian(columns: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero ``[columns, columns]`` float32 Hessian."""
    return torch.zeros((columns, columns), dtype=PRECISION, device=device)


def accumulate_hessian(
    H: torch.Tensor, X: torch.Tensor, num_tokens: int, *, max_chunk_bytes: int = 64 * 2**20
) -> tuple[torch.Tensor, int]:
    """Add the tokens of ``X`` (``[..., columns]``) to the running mean H = 2/n Σ x xᵀ, in place.

    ``X`` is converted to float32 on H's device ``max_chunk_bytes`` at a time, so a bfloat16 input of
    128×2048 tokens never exists as a whole float32 copy (for Llama-3.1-8B's down_proj that copy alone
    would be 15 GB). H accumulates in float32 (bf16 compute too: a bf16 product would round each entry of
    xᵀx to 8 bits, which measured broke the Cholesky of a tiny model's o_proj); being symmetric, only its
    strips on and above the diagonal are multiplied and the lower triangle is mirrored.

    Returns ``(H, n)`` with ``n`` the number of tokens seen so far.
    """
    X = X.reshape(-1, X.shape[-1])
    added = X.shape[0]
    if added == 0:
        return H, num_tokens
    total = num_tokens + added
    H.mul_(num_tokens / total)
    columns = X.shape[1]
    step = max(1, max_chunk_bytes // (4 * columns))
    for start in range(0, added, step):
        x = X[start : start + step].to(device=H.device, dtype=PRECISION)
        # H is symmetric: only the strips on and above the diagonal are multiplied (55-60% of the FLOPs of
        # the whole xᵀx, 0.63-0.67x its time on this project's CPU), in place with alpha, so no
        # [columns, columns] buffer besides H exists
        for i in range(0, columns, HESSIAN_STRIP):
            H[i : i + HESSIAN_STRIP, i:].addmm_(x[:, i : i + HESSIAN_STRIP].t(), x[:, i:], alpha=2.0 / total)
    for i in range(HESSIAN_STRIP, columns, HESSIAN_STRIP):  # the lower triangle mirrors the upper one
        H[i : i + HESSIAN_STRIP, :i].copy_(H[:i, i : i + HESSIAN_STRIP].t())
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

    ``H`` is not modified. Besides it, a single ``[columns, columns]`` work buffer is alive: the
    Cholesky factor, its inverse and the factor of that inverse are each computed in place in it (for
    Llama-3.1-8B's down_proj one buffer is 0.8 GB). LAPACK works on column-major matrices, so the
    buffer is handed to it through its transpose (the same memory; the matrices are symmetric): with a
    row-major ``out`` torch would allocate a column-major copy and copy back. The lower factor L2 of
    H⁻¹ = L2 L2ᵀ computed column-major is, read row-major, the upper factor U = L2ᵀ with H⁻¹ = Uᵀ U.

    When a factorisation fails (H not positive definite in float32), the dampening is multiplied by 10
    and the buffer refilled from H, up to ``max_retries`` times; the returned ``retries`` says how
    often, so the caller can tell the user.

    Raises:
        torch.linalg.LinAlgError: still not positive definite after ``max_retries``.
    """
    columns = H.shape[0]
    dead = torch.diag(H) == 0
    diag = torch.arange(columns, device=H.device)
    A = torch.empty((columns, columns), dtype=PRECISION, device=H.device)
    V = A.mT  # column-major view of the same buffer, what LAPACK factors in place
    info = torch.empty((), dtype=torch.int32, device=H.device)
    frac = dampening
    for attempt in range(max_retries + 1):
        A.copy_(H)
        A[dead, dead] = 1
        A[diag, diag] += frac * torch.mean(torch.diagonal(A))
        torch.linalg.cholesky_ex(V, out=(V, info))  # H = L Lᵀ, L in place
        if info == 0:
            torch.cholesky_inverse(V, out=V)  # H⁻¹ = (L Lᵀ)⁻¹, in place
            torch.linalg.cholesky_ex(V, out=(V, info))  # H⁻¹ = L2 L2ᵀ, in place: A = L2ᵀ = U
            if info == 0 and torch.isfinite(torch.diagonal(A)).all():
                return InverseHessian(A.triu_(), dead, frac, attempt)
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
    return sparsegpt_prune_many(
        [W], inv, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, block_size=block_size
    )[0]


@torch.no_grad()
def sparsegpt_prune_many(
    Ws: list[torch.Tensor],
    inv: InverseHessian,
    *,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """:func:`sparsegpt_prune` on several weights that read the same input (q/k/v, gate/up), in one
    column loop.

    The OBS update of Algorithm 1 works row by row (each row's error feedback uses only that row and
    H⁻¹), so stacking the weights' rows gives each one exactly the result it gets alone; the column
    loop, its Python overhead and its small ops run once for the group instead of once per weight.
    The mask is still chosen per weight: each gets exactly ``floor(sparsity * numel)`` zeros.
    """
    Hinv = inv.Hinv
    W = torch.cat([w.to(device=Hinv.device, dtype=PRECISION) for w in Ws]) if len(Ws) > 1 else (
        Ws[0].to(device=Hinv.device, dtype=PRECISION).clone()
    )
    bounds = [0]
    for w in Ws:
        bounds.append(bounds[-1] + w.shape[0])
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
            # computed on the block's weights after the updates from earlier blocks; per weight matrix.
            tmp = W1**2 / d1.reshape((1, -1)) ** 2
            for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
                k = _block_quota(sparsity, r1 - r0, num_columns, i1, i2)
                if k > 0:
                    mask1[r0:r1].view(-1)[_lowest(tmp[r0:r1], k)] = True

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

    return [
        (W[r0:r1], mask[r0:r1], float(Losses[r0:r1].sum().item()))
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _prune_block(W1, Q1, Err1, Losses1, Hinv1, d1, mask1, count, prune_n, prune_m) -> None:
    """Algorithm 1's inner loop over one block's columns (in place on W1, Q1, Err1, Losses1, mask1).

    Column i's quantized value q = w with the masked weights zeroed, so its error (w - q) / d is w / d on the
    masked weights and 0 elsewhere, and the update reaches only the later columns (column i itself would
    become exactly q). Column i is never written after its own step, so Q1 and the losses are read off
    the block at the end: four small ops per column instead of a dozen (no boolean indexing, no
    temporary outer product).
    """
    for i in range(count):
        if prune_n and i % prune_m == 0:
            # Section 3.5: N lowest-saliency weights of every M columns, chosen when the group starts.
            tmp = W1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m].reshape((1, -1)) ** 2
            mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
        err1 = torch.where(mask1[:, i], W1[:, i], 0.0).div_(Hinv1[i, i])
        Err1[:, i] = err1
        if i + 1 < count:
            W1[:, i + 1 :].addr_(err1, Hinv1[i, i + 1 :], alpha=-1)
    Q1.copy_(W1.masked_fill(mask1, 0.0))
    torch.square(Err1, out=Losses1)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` lowest of ``scores`` (ties at the k-th value: the first ones), by one
    selection instead of a top-k (for half of a 1536×128 block on one thread of this project's CPU: kthvalue
    2.6 ms against topk's 8.4 ms)."""
    flat = scores.flatten()
    threshold = torch.kthvalue(flat, k).values
    chosen = flat < threshold
    ties = (flat == threshold).nonzero().flatten()[: k - int(chosen.sum())]
    chosen[ties] = True
    return chosen.nonzero().flatten()


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
