"""Downstream closed-form solvers: given keys K (d_in×n) and residuals R (d_out×n) of one layer,
return the update Δ (d_out×d_in, math layout) and keep the accumulated constraints of past edits.

Every solver here is linear in R: Δ = R·M with the *gate* M = gate(layer, K) (n×d_in),
ALGORITHMS.md §7.6. MetaKE differentiates through that map; the diagnostics read it too.
All algebra runs in float64 on symmetric positive-definite systems (Cholesky).
"""
from __future__ import annotations

import torch


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive-definite A (Cholesky; LU fallback if A is not numerically PD)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


def nullspace_basis(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """Columns of U (C0 = U S Uᵀ) whose eigenvalue is below ``threshold``: a basis U0 (d×r) of the
    (approximate) null space of the preserved keys' second moment (AlphaEdit, §5). Kept as a basis,
    never as the dense d×d projector P = U0 U0ᵀ."""
    evals, evecs = torch.linalg.eigh(C0.double())
    return evecs[:, evals < threshold].contiguous()


class Solver:
    """Base class. ``setup`` receives C0 per edited layer (uncentred key second moment, §3)."""

    def __init__(self) -> None:
        self.n_edits = 0

    # -- interface -------------------------------------------------------------------------
    def setup(self, C0: dict[int, torch.Tensor]) -> None:
        raise NotImplementedError

    def gate(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """M (n×d_in) with Δ = R·M for any residual R (d_out×n)."""
        raise NotImplementedError

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return R.double() @ self.gate(layer, K)

    def commit(self, layer: int, K: torch.Tensor) -> None:
        """Add this batch's keys (recomputed on the edited model) to the accumulated constraint."""

    def finish_batch(self, n: int) -> None:
        self.n_edits += n

    def describe(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Tensors are returned by reference; ``commit`` replaces them instead of mutating, so a state
        taken before a step is a valid snapshot to roll back to."""
        return {"n_edits": self.n_edits}

    def load_state_dict(self, state: dict) -> None:
        self.n_edits = int(state["n_edits"])


class MEMIT(Solver):
    """MEMIT per-layer solve, §4. ``sequential=True`` (default, OTE-aligned "MEMIT_seq", §6.1):
    Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹ with C_p the Gram of all previously edited keys; the sum of the
    sequential steps then equals the one-time solution (OTE–SE Prop. 3.2).
    ``sequential=False``: the original, naive MEMIT (ablation: each step ignores earlier edits)."""

    def __init__(self, mom2_update_weight: float = 15000.0, sequential: bool = True) -> None:
        super().__init__()
        self.lam = float(mom2_update_weight)
        self.sequential = sequential
        self.C0: dict[int, torch.Tensor] = {}
        self.Cp: dict[int, torch.Tensor] = {}

    def setup(self, C0):
        self.C0 = {l: c.double() for l, c in C0.items()}
        self.Cp = {l: torch.zeros_like(c) for l, c in self.C0.items()} if self.sequential else {}

    def constraint(self, layer: int) -> torch.Tensor:
        """λC0 + C_p: the accumulated preservation system before this batch."""
        A = self.lam * self.C0[layer]
        return A + self.Cp[layer] if self.sequential else A

    def gate(self, layer, K):
        K = K.double().to(self.C0[layer].device)
        A = self.constraint(layer) + K @ K.T
        return spd_solve(A, K).T  # M = Kᵀ A⁻¹ (A symmetric)

    def commit(self, layer, K):
        if self.sequential:
            K = K.double().to(self.Cp[layer].device)
            self.Cp[layer] = self.Cp[layer] + K @ K.T  # not in place: a state_dict taken before stays valid

    def state_dict(self):
        return {**super().state_dict(), "Cp": {str(l): c for l, c in self.Cp.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for l, c in state.get("Cp", {}).items():
            self.Cp[int(l)] = c.to(self.Cp[int(l)].device, torch.float64).clone()


class AlphaEdit(Solver):
    """AlphaEdit, §5: Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with P = U0 U0ᵀ the null-space projector of C0.

    Worked in the basis U0 (d×r): with K̃ = U0ᵀK and C̃_p = U0ᵀ C_p U0 (r×r),
        Δ = R K̃ᵀ (C̃_p + K̃ K̃ᵀ + α I)⁻¹ U0ᵀ,
    which equals the dense formula exactly (the solution of (P B + αI)X = PK lies in range(U0)),
    costs O(r³) instead of O(d³), and stores r×r instead of two d×d matrices.
    ``L2`` is α (AE repo: 10; EasyEdit Llama/Qwen and the papers: 1 — §12.4).
    """

    def __init__(self, L2: float = 10.0, nullspace_threshold: float = 2e-2) -> None:
        super().__init__()
        self.alpha = float(L2)
        self.threshold = float(nullspace_threshold)
        self.U: dict[int, torch.Tensor] = {}
        self.Cp: dict[int, torch.Tensor] = {}

    def setup(self, C0):
        self.U = {}
        for l, c in C0.items():
            U = nullspace_basis(c, self.threshold)
            if U.shape[1] == 0:
                smallest = torch.linalg.eigvalsh(c.double())[0].item()
                raise ValueError(
                    f"AlphaEdit: no eigenvalue of C0 at layer {l} is below nullspace_threshold={self.threshold:g} "
                    f"(smallest is {smallest:.3g}); every update would be zero. Raise the threshold."
                )
            self.U[l] = U
        self.Cp = {l: torch.zeros(U.shape[1], U.shape[1], dtype=torch.float64, device=U.device) for l, U in self.U.items()}

    def _project(self, layer, K):
        U = self.U[layer]
        return U, U.T @ K.double().to(U.device)

    def _Y(self, layer, K):
        U, Kt = self._project(layer, K)
        A = self.Cp[layer] + Kt @ Kt.T + self.alpha * torch.eye(Kt.shape[0], dtype=Kt.dtype, device=Kt.device)
        return U, spd_solve(A, Kt)  # r×n

    def gate(self, layer, K):
        U, Y = self._Y(layer, K)
        return Y.T @ U.T

    def solve(self, layer, K, R):
        U, Y = self._Y(layer, K)
        return (R.double().to(U.device) @ Y.T) @ U.T  # associate as (R Yᵀ) U0ᵀ: never forms n×d twice

    def commit(self, layer, K):
        _, Kt = self._project(layer, K)
        self.Cp[layer] = self.Cp[layer] + Kt @ Kt.T  # not in place (see MEMIT.commit)

    def describe(self):
        return {f"nullspace_rank/layer_{l}": U.shape[1] for l, U in self.U.items()}

    def state_dict(self):
        return {**super().state_dict(), "Cp": {str(l): c for l, c in self.Cp.items()},
                "rank": {str(l): U.shape[1] for l, U in self.U.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for l, c in state.get("Cp", {}).items():
            if c.shape != self.Cp[int(l)].shape:
                raise ValueError(f"AlphaEdit state for layer {l} has null-space rank {c.shape[0]}, this run has "
                                 f"{self.Cp[int(l)].shape[0]}: C0 or nullspace_threshold changed since the checkpoint")
            self.Cp[int(l)] = c.to(self.Cp[int(l)].device, torch.float64).clone()
