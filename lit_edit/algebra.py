"""The solvers' pure algebra (docs/algorithms.md §4–6): SPD inverses, the null-space basis of C0, the Woodbury
response of a batch, the stacked downdate, and the PRUNE / RECT post-processing of an update. Small pure functions
of tensors, tested on their own (tests/test_solvers.py)."""
from __future__ import annotations

import torch


def spd_inverse(A: torch.Tensor, what: str) -> torch.Tensor:
    """A⁻¹ of a symmetric positive-definite matrix through its Cholesky factor; a clear error otherwise."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        smallest = torch.linalg.eigvalsh(A)[0].item()
        raise ValueError(f"{what} is not positive definite (smallest eigenvalue {smallest:.3g}); "
                         f"raise mom2_update_weight (λ) or L2 (α)")
    return torch.cholesky_inverse(L)


def nullspace_basis(C0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of C0 (= U S Uᵀ) whose eigenvalue is below ``threshold``, and those eigenvalues: a basis
    U0 (d×r) of the approximate null space of the preserved keys' second moment (AlphaEdit, §5). Kept as a
    basis, never as the dense d×d projector P = U0 U0ᵀ."""
    evals, evecs = torch.linalg.eigh(C0.double())
    keep = evals < threshold
    return evecs[:, keep].contiguous(), evals[keep]


def woodbury_response(Y: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given Y = Kᵀ A⁻¹ (n×d), for A' = A + K Kᵀ: the gate X = Kᵀ A'⁻¹ = (I + Y K)⁻¹ Y and Z = L⁻¹ Y with
    L Lᵀ = I + Y K (an n×n Cholesky), so that A'⁻¹ = A⁻¹ − Zᵀ Z (Woodbury, symmetric by construction)."""
    Lc = torch.linalg.cholesky(torch.eye(K.shape[1], dtype=K.dtype, device=K.device) + Y @ K)
    Z = torch.linalg.solve_triangular(Lc, Y, upper=False)
    return torch.linalg.solve_triangular(Lc.T, Z, upper=True), Z


def sym_downdate(A: torch.Tensor, Z: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """A − ZᵀZ for symmetric A (d×d) and Z (m×d), as a new tensor.

    Only the lower block triangle of ZᵀZ is multiplied (block rows of width d/nb against the columns up
    to their diagonal block: (nb+1)/(2nb) of the full product's flops, 56 % at nb = 8) and the strictly
    upper blocks are copied from their mirror, so the result is symmetric to the last bit off the
    diagonal blocks."""
    d = A.shape[0]
    nb = blocks or max(1, min(8, d // 1024))
    if nb == 1 or Z.shape[0] == 0:
        return torch.addmm(A, Z.T, Z, alpha=-1.0)
    out = A.clone()
    edges = [d * i // nb for i in range(nb + 1)]
    for i in range(nb):
        a, b = edges[i], edges[i + 1]
        out[a:b, :b].addmm_(Z[:, a:b].T, Z[:, :b], alpha=-1.0)
    for i in range(1, nb):  # upper blocks ← transposed lower blocks
        a, b = edges[i], edges[i + 1]
        out[:a, a:b].copy_(out[a:b, :a].T)
    return out


def prune(delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Φ_PRUNE(Δ; W), §6.2: singular values of Δ above σ_max(W) become ln s − ln σ_max + σ_max (natural log);
    the others are kept. ``W`` is the weight before this batch."""
    sigma_max = torch.linalg.matrix_norm(W.double(), ord=2)
    U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    big = s > sigma_max
    if not bool(big.any()):
        return delta
    s = torch.where(big, torch.log(s) - torch.log(sigma_max) + sigma_max, s)
    return ((U * s) @ Vh).to(delta.dtype)


def rect_mask(delta: torch.Tensor, W: torch.Tensor, keep_percent: float) -> torch.Tensor:
    """RECT's mask, §6.3: relative change r = |Δ / (W + 1e-8)|; keep the entries with r ≥ the m-th smallest
    value, m = floor(numel·(100 − k)/100) (≈ the top k %, ties included)."""
    r = (delta.double() / (W.double() + 1e-8)).abs().flatten()
    m = int(r.numel() * (100.0 - keep_percent) // 100)
    if m < 1:
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = torch.kthvalue(r, m).values
    return (r >= threshold).view_as(delta)


def rect(delta: torch.Tensor, W: torch.Tensor, keep_percent: float) -> torch.Tensor:
    """Φ_RECT(Δ; W, k), §6.3: only the top-k % entries of Δ by relative change are written."""
    return delta * rect_mask(delta, W, keep_percent)
