"""Downstream closed-form solvers: given keys K (d_in×n) and residuals R (d_out×n) of one layer,
return the update Δ (d_out×d_in, math layout) and keep the accumulated constraints of past edits.

One objective, OTE–SE Prop. 3.2 (docs/algorithms.md §6). Work in coordinates x = Pᵀk, where P is the
identity or an orthonormal basis U0 (d_in×r) of the null space of C0 (AlphaEdit, §5), so that
Δ = G Pᵀ. After t steps with keys K_τ and per-layer targets V_τ the one-time solution is

    G*_t = argmin_G  λ‖G PᵀK0‖² + α‖G‖² + Σ_τ ‖(W_0 + G Pᵀ) K_τ − V_τ‖²  =  B_t A_t⁻¹,
    A_t  = λ PᵀC0P + α I + Σ_τ K̃_τ K̃_τᵀ,      B_t = Σ_τ (V_τ − W_0 K_τ) K̃_τᵀ,      K̃ = Pᵀ K.

The aligned step (recursive least squares) is G*_t − G*_{t−1} = R_t K̃_tᵀ A_t⁻¹ with R_t = V_t − W_{t−1} K_t
measured on the current weights, so the sum of the steps is the one-time solution. MEMIT_seq
(Remark A.1) is P = I, α = 0; AlphaEdit is P = U0, λ = 0, α = L2.

Fast, exact algebra: we keep Ainv = A⁻¹ (d×d, or r×r in the null-space basis) in float64 and change
it by the step's rank-n term with Woodbury: with Y = K̃ᵀ A⁻¹ and L Lᵀ = I + K̃ᵀ A⁻¹ K̃ (n×n), Z = L⁻¹ Y,

    M = K̃ᵀ A_t⁻¹ = L⁻ᵀ Z,        A_t⁻¹ = A⁻¹ − Zᵀ Z.

The rank-n terms are stacked (A_t⁻¹ = Ainv − Zsᵀ Zs) and folded into Ainv once ``fold_every`` keys
have accumulated, so a step costs one d×d-by-n product (Y) instead of also rewriting the d×d
matrix (a memory-bound pass that cost twice the product at d = 6400): O(d²n) per step against the
O(d³) dense re-solve. Removing edits (rare) rebuilds A⁻¹ from
A_0 and the ledger's remaining keys instead of a Woodbury downdate: a downdate forms I − K̃ᵀA⁻¹K̃,
a difference of numbers close to 1 when the removed keys dominate A in some direction, and loses
as many digits as that direction's conditioning (measured: 1e-5 relative on the unit test's system).

Every solver is affine in R: Δ = R·M + c, with the gate M = gate(layer, K) (n×d_in) carrying all of
the R-dependence (docs/algorithms.md §7.6). MetaKE differentiates through that map; diagnostics read it.
"""
from __future__ import annotations

import torch

from lit_edit import checks
from lit_edit.algebra import nullspace_basis, prune, rect, rect_mask, spd_inverse, sym_downdate, woodbury_response  # noqa: F401

MODES = ("aligned", "naive", "memorize_latest")
REGULARIZERS = (None, "prune", "rect")


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


class Solver:
    """Interface of a downstream solver. Per step, for each edited layer (low to high):
    ``solve`` gives the raw Δ that is written at once (later layers' keys see it); afterwards ``commit`` adds
    the batch's keys (recomputed on the edited model) and stored values to the accumulated constraint,
    ``finalize`` returns what is finally written (a post-processing regulariser acts here), and
    ``finish_batch`` records the batch's fact ids. ``forget`` removes earlier edits (conflicts, forgetting).
    State tensors are replaced, never mutated in place, so a ``state_dict`` taken before a step is a valid
    snapshot to roll back to."""

    on_conflict = "keep"  # an insert of an already edited fact: "keep" | "replace" | "error" (needs a ledger)
    regularizer: str | None = None  # post-processing of Δ in finalize ("prune" | "rect"), None = none

    def __init__(self) -> None:
        self.n_edits = 0

    def setup(self, C0: dict[int, torch.Tensor]) -> None:
        """Receives the uncentred key second moment C0 (§3) of every edited layer."""
        raise NotImplementedError

    def gate(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """M (n×d_in): the R-dependent part of ``solve`` is R·M for any residual R (d_out×n)."""
        raise NotImplementedError

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return R.double() @ self.gate(layer, K)

    def commit(self, layer: int, K: torch.Tensor, V: torch.Tensor | None = None) -> None:
        """Add this batch's keys K and the values V = W_before K + R they were fitted to."""

    def finalize(self, layer: int, delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The update to write instead of the raw ``delta`` (W = the layer's weight before this batch)."""
        return delta

    def finish_batch(self, fact_ids: list[str]) -> None:
        self.n_edits += len(fact_ids)

    def knows(self, fact_id: str) -> bool:
        """Whether an applied edit of this fact is in the solver's ledger (so it can be replaced or removed)."""
        return False

    def forget(self, fact_ids: list[str], W: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        raise ValueError(f"{type(self).__name__} keeps no ledger of applied edits and cannot remove or replace them; "
                         f"use an aligned solver (mode: aligned, keep_ledger: true)")

    def describe(self) -> dict:
        return {}

    def settings(self) -> dict:
        """The constructor arguments that change what this solver writes (stored in checkpoints and compared on
        resume, so a resumed run cannot silently continue with another λ, α or threshold)."""
        return {}

    def state_dict(self) -> dict:
        return {"n_edits": self.n_edits}

    def load_state_dict(self, state: dict) -> None:
        self.n_edits = int(state["n_edits"])


class AlignedSolver(Solver):
    """The OTE-aligned solver family (see the module docstring for the objective and the algebra).

    Args:
        mom2_update_weight: λ, weight of the preservation term λ‖Δ K0‖².
        L2: α, ridge ‖G‖² (AlphaEdit's L2; the error-corrected OTE variants use α = 1, §6.4 / §12.6).
        projector: ``"identity"`` or ``"nullspace"`` (updates restricted to the span of U0, AlphaEdit).
        nullspace_threshold: eigenvalues of C0 below it span the null space (absolute, §5).
        mode: ``"aligned"`` (default): Σ steps = one-time solution. ``"naive"`` (ablation): every step is a
            fresh one-time edit that ignores earlier edits (original MEMIT; AlphaEdit without C_p).
            ``"memorize_latest"`` (§6.5): the objective keeps K0 and the newest batch only.
        regularizer: ``None``, ``"prune"`` (§6.2) or ``"rect"`` (§6.3), applied to each step's Δ at write time.
        rect_keep: RECT's k, the percent of entries kept (OTE files: 40, or 20 in the error-corrected one).
        error_correction: feed the regulariser's error back (OTE–SE Algorithm 1, §6.4).
        on_conflict: what an ``insert`` of an already edited fact does: ``"replace"`` (drop the old entry,
            Prop. 3.5), ``"keep"`` (both entries stay and compete in the least squares) or ``"error"``.
        keep_ledger: store every edit's per-layer keys and values (needed to remove or replace edits).
        fold_every: fold the stacked Woodbury factors into the kept inverse once this many keys are pending.

    Error correction (Algorithm 1). With E_{t−1} the fed-back error, the raw step is
    Δ_t = (R_t K_tᵀ − E_{t−1}) A_t⁻¹, Φ(Δ_t) is written and E_t = (Φ(Δ_t) − Δ_t) A_t. Invariant: with W_t the
    written weights and B_t as above,
        (W_t − W_0) A_t = B_t + E_t,
    so W_{t−1} + Δ_t (the raw step) is exactly the one-time solution W_0 + B_t A_t⁻¹ at every step and the
    written weights differ from it by Φ(Δ_t) − Δ_t only, the current step's error, never an accumulation.
    Proof: (W_{t−1} − W_0 + Δ_t) A_t = (B_{t−1} + E_{t−1}) + (W_{t−1} − W_0) K_tK_tᵀ + R_tK_tᵀ − E_{t−1} = B_t.
    We store F = E A⁻¹ (d_out×d_in) instead of E, so that E_{t−1} A_t⁻¹ = F − (F K_t) M_t costs O(d_out d n),
    not O(d_out d²); an insert maps F to F − (F K̃) M, a removal to F + (F K̃_O) K̃_Oᵀ A'⁻¹.
    """

    def __init__(self, mom2_update_weight: float = 3000.0, L2: float = 0.0, projector: str = "identity",
                 nullspace_threshold: float = 2e-2, mode: str = "aligned", regularizer: str | None = None,
                 rect_keep: float = 40.0, error_correction: bool = False, on_conflict: str = "replace",
                 keep_ledger: bool = True, fold_every: int = 1024) -> None:
        super().__init__()
        self._check_args(mom2_update_weight, L2, projector, nullspace_threshold, mode, regularizer, rect_keep,
                         error_correction, on_conflict, keep_ledger, fold_every)
        self.lam = float(mom2_update_weight)
        self.alpha = float(L2)
        self.projector = projector
        self.threshold = float(nullspace_threshold)
        self.mode = mode
        self.regularizer = regularizer
        self.rect_keep = float(rect_keep)
        self.error_correction = error_correction
        self.on_conflict = on_conflict
        self.keep_ledger = keep_ledger and mode == "aligned"
        self.fold_every = int(fold_every)
        self.U: dict[int, torch.Tensor] = {}  # null-space bases (projector 'nullspace')
        self.A0: dict[int, torch.Tensor] = {}  # λ PᵀC0P + α I in working coordinates (kept with a ledger)
        self.Ainv: dict[int, torch.Tensor] = {}  # A⁻¹ = Ainv − Zsᵀ Zs in working coordinates
        self.Zs: dict[int, torch.Tensor] = {}  # stacked Woodbury factors not yet folded into Ainv
        self.F: dict[int, torch.Tensor] = {}  # E A⁻¹, error correction
        self.S: dict[int, torch.Tensor] = {}  # Σ Δ written so far (d_out × d_in), memorize_latest
        self.ledger_ids: list[str] = []
        self.ledger_K: dict[int, torch.Tensor] = {}  # d_in × N stored keys
        self.ledger_V: dict[int, torch.Tensor] = {}  # d_out × N stored values (W_before k + r)
        self._cache: dict[int, tuple] = {}  # (K, K̃, X, Z) of the last solve, reused by commit when the keys agree

    def _check_args(self, lam, alpha, projector, threshold, mode, regularizer, rect_keep, error_correction,
                    on_conflict, keep_ledger, fold_every) -> None:
        """Refuse any out-of-range or unknown argument here, at construction, not at the first step."""
        cls = type(self).__name__
        arg = lambda a: dict(name=f"solver {cls}: {a}", note=f"model.solver.init_args.{a}")  # noqa: E731
        checks.choice(value=projector, allowed=("identity", "nullspace"), **arg("projector"))
        checks.choice(value=mode, allowed=MODES, **arg("mode"))
        checks.choice(value=regularizer, allowed=REGULARIZERS, **arg("regularizer"))
        checks.choice(value=on_conflict, allowed=("replace", "keep", "error"), **arg("on_conflict"))
        checks.boolean(value=error_correction, **arg("error_correction"))
        checks.boolean(value=keep_ledger, **arg("keep_ledger"))
        # A_0 = λ PᵀC0P + α I must be positive definite (setup inverts it): both weights finite and >= 0 (L2 = inf
        # gives A_0⁻¹ = 0, every update 0; NaN fails later as a non-finite update), and α > 0 when λ = 0 (else
        # A_0 = 0). With λ > 0 and α = 0, whether λ·PᵀC0P alone is positive definite depends on C0: setup checks.
        checks.number(value=lam, ge=0, **arg("mom2_update_weight"))
        if lam == 0:  # A_0 = α I (AlphaEdit's default)
            checks.number(name=f"solver {cls}: L2", value=alpha, gt=0, note="model.solver.init_args.L2; with "
                          "mom2_update_weight 0, A_0 = λ·PᵀC0P + α·I = α·I is not positive definite unless L2 > 0")
        checks.number(value=alpha, ge=0, **arg("L2"))
        # C0's eigenvalues are >= 0: a threshold <= 0 selects no direction, inf selects all (no preservation)
        checks.number(value=threshold, gt=0, **arg("nullspace_threshold"))
        checks.number(value=rect_keep, gt=0, le=100, **arg("rect_keep"))  # a percentage of the entries kept
        checks.integer(value=fold_every, ge=1, **arg("fold_every"))  # pending keys before a fold
        if regularizer is not None and projector != "identity":
            raise ValueError(f"solver {cls}: PRUNE/RECT act on the full Δ and would leave the null space: "
                             f"use projector 'identity'")
        if error_correction and (regularizer is None or mode != "aligned"):
            raise ValueError(f"solver {cls}: error_correction feeds back a regulariser's error: it needs a regularizer "
                             f"and mode 'aligned'")

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, C0):
        self.U, self.A0, self.Ainv, self.Zs, self.F, self.S, self._cache = {}, {}, {}, {}, {}, {}, {}
        self.ledger_ids, self.ledger_K, self.ledger_V = [], {}, {}
        for l, c in C0.items():
            c = c.double()
            if self.projector == "nullspace":
                U, evals = nullspace_basis(c, self.threshold)
                if U.shape[1] == 0:
                    smallest = torch.linalg.eigvalsh(c)[0].item()
                    raise ValueError(
                        f"{type(self).__name__}: no eigenvalue of C0 at layer {l} is below nullspace_threshold="
                        f"{self.threshold:g} (smallest is {smallest:.3g}); every update would be zero. Raise the threshold.")
                self.U[l] = U
                A0 = torch.diag(self.lam * evals + self.alpha)  # PᵀC0P is diagonal in the eigenbasis
            else:
                A0 = self.lam * c + self.alpha * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            self.Ainv[l] = spd_inverse(A0, f"A_0 = λ·C0 + α·I at layer {l}")
            self.Zs[l] = A0.new_zeros(0, A0.shape[0])
            if self.keep_ledger:
                self.A0[l] = A0  # rebuilding A⁻¹ after a removal
            if self.keep_ledger:
                self.ledger_K[l] = torch.zeros(c.shape[0], 0, dtype=torch.float64, device=c.device)

    def _work(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """K̃ = PᵀK in float64."""
        K = self._f64(layer, K)
        return self.U[layer].T @ K if layer in self.U else K

    def _f64(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        return K.to(self.Ainv[layer].device, torch.float64)

    def _full(self, layer: int, G: torch.Tensor) -> torch.Tensor:
        """Δ = G Pᵀ."""
        return G @ self.U[layer].T if layer in self.U else G

    def inverse(self, layer: int) -> torch.Tensor:
        """A⁻¹ of the accumulated constraint (working coordinates), with the pending factors folded in."""
        Zs = self.Zs[layer]
        return sym_downdate(self.Ainv[layer], Zs) if Zs.shape[0] else self.Ainv[layer]

    def fold(self, layer: int) -> None:
        """Ainv ← Ainv − Zsᵀ Zs: one compute-bound rank-m product (its lower block triangle, mirrored) instead
        of m/n memory-bound ones."""
        self.Ainv[layer], self.Zs[layer] = self.inverse(layer), self.Zs[layer][:0]

    def _times_inverse(self, layer: int, Kt: torch.Tensor) -> torch.Tensor:
        """Y = K̃ᵀ A⁻¹ = K̃ᵀ Ainv − (K̃ᵀ Zsᵀ) Zs, without forming A⁻¹."""
        Zs = self.Zs[layer]
        Y = Kt.T @ self.Ainv[layer]
        return torch.addmm(Y, Kt.T @ Zs.T, Zs, alpha=-1.0) if Zs.shape[0] else Y

    def _response(self, layer: int, K: torch.Tensor):
        K = self._f64(layer, K)
        Kt = self._work(layer, K)
        X, Z = woodbury_response(self._times_inverse(layer, Kt), Kt)
        self._cache[layer] = (K, Kt, X, Z)
        return Kt, X, Z

    # -- the step --------------------------------------------------------------------------
    def gate(self, layer, K):
        _, X, _ = self._response(layer, K)
        return self._full(layer, X)  # M = K̃ᵀ A_t⁻¹ Pᵀ

    def solve(self, layer, K, R):
        """Δ = R M, or (R + C K) M − C with C = F (error correction: − E_{t−1} A_t⁻¹ = −(F − (F K) M)) or
        C = S (memorize_latest, §6.5: Δ_t = (R_t + S K_t) M − S); the two never occur together. Both are kept
        in full coordinates (d_out × d_in), so no term needs a (d_out×r)(r×d_in) product.
        Multiplied as R·(X Pᵀ), (d_out×n)(n×d_in), not (R X) Pᵀ: with the null-space basis that would be a
        (d_out×r)(r×d_in) product, 2·d_out·r·d_in flops (1.2e12 per layer at Llama-3-8B width)."""
        _, X, _ = self._response(layer, K)
        R = R.to(X.device, torch.float64)
        M = self._full(layer, X)
        C = self.F.get(layer, self.S.get(layer))
        if C is None:
            return R @ M
        return (R + C @ self._f64(layer, K)) @ M - C

    def commit(self, layer, K, V=None):
        if self.mode != "aligned":
            return  # the naive and memorize-latest objectives hold no earlier batches
        K = self._f64(layer, K)
        cached = self._cache.get(layer)
        if cached is not None and cached[0].shape == K.shape and torch.equal(cached[0], K):
            _, Kt, X, Z = cached  # the keys of the solve: skip re-projecting them (2·d·r·n flops) and the Woodbury
        else:
            Kt = self._work(layer, K)
            X, Z = woodbury_response(self._times_inverse(layer, Kt), Kt)
        self.Zs[layer] = torch.cat([self.Zs[layer], Z])  # new tensors, never in place: snapshots stay valid
        if self.Zs[layer].shape[0] >= self.fold_every:
            self.fold(layer)
        if layer in self.F:
            self.F[layer] = self.F[layer] - (self.F[layer] @ Kt) @ X
        if self.keep_ledger:
            if V is None:
                raise ValueError("commit needs the stored values V to keep the ledger")
            self.ledger_K[layer] = torch.cat([self.ledger_K[layer], K], 1)
            V = V.to(Kt.device, torch.float64)
            old = self.ledger_V.get(layer, torch.zeros(V.shape[0], 0, dtype=torch.float64, device=V.device))
            self.ledger_V[layer] = torch.cat([old, V], 1)
        self._cache.pop(layer, None)

    def finalize(self, layer, delta, W):
        applied = delta
        if self.regularizer == "prune":
            applied = prune(delta, W)
        elif self.regularizer == "rect":
            applied = rect(delta, W, self.rect_keep)
        if self.error_correction:
            self.F[layer] = (applied - delta).double()  # E_t A_t⁻¹ = Φ(Δ_t) − Δ_t (overwritten, not accumulated)
        if self.mode == "memorize_latest":
            self.S[layer] = self.S[layer] + applied.double() if layer in self.S else applied.double()
        return applied

    def finish_batch(self, fact_ids):
        super().finish_batch(fact_ids)
        if self.keep_ledger:
            self.ledger_ids = self.ledger_ids + list(fact_ids)

    # -- conflicts and forgetting (Prop. 3.5, §6.6) -----------------------------------------
    def knows(self, fact_id):
        return fact_id in self.ledger_ids

    def forget(self, fact_ids, W):
        """Remove the ledger entries of ``fact_ids`` from every layer (Prop. 3.5 with no new entries): with the
        stored keys K_O and the OLD stored values V_O (§12.8), A' = A − K̃_O K̃_Oᵀ and
        Δ = −(V_O − W K_O) K̃_Oᵀ A'⁻¹. For fixed keys this lands exactly on the least-squares solution of the
        remaining edits. A'⁻¹ is rebuilt densely from A_0 and the remaining keys (see the module docstring)."""
        if not self.keep_ledger:
            return super().forget(fact_ids, W)
        missing = [f for f in fact_ids if f not in self.ledger_ids]
        if missing:
            raise KeyError(f"no applied edit of fact(s) {missing} in the ledger")
        gone = set(fact_ids)
        drop = [i for i, f in enumerate(self.ledger_ids) if f in gone]
        keep = [i for i, f in enumerate(self.ledger_ids) if f not in gone]
        deltas = {}
        for l in self.Ainv:
            K_O, V_O = self.ledger_K[l][:, drop], self.ledger_V[l][:, drop]
            K_keep = self._work(l, self.ledger_K[l][:, keep])
            self.Ainv[l] = spd_inverse(self.A0[l] + K_keep @ K_keep.T, f"the remaining constraint at layer {l}")
            self.Zs[l] = self.Zs[l][:0]
            Kt = self._work(l, K_O)
            X = Kt.T @ self.Ainv[l]  # K̃_Oᵀ A'⁻¹
            R_O = V_O - W[l].to(K_O.device, torch.float64) @ K_O
            deltas[l] = -R_O @ self._full(l, X)
            if l in self.F:  # F = E A⁻¹ → E A'⁻¹ = F + (F K̃_O) K̃_Oᵀ A'⁻¹ (E itself is unchanged by a removal)
                self.F[l] = self.F[l] + (self.F[l] @ Kt) @ X
            self.ledger_K[l], self.ledger_V[l] = self.ledger_K[l][:, keep], self.ledger_V[l][:, keep]
        self.ledger_ids = [self.ledger_ids[i] for i in keep]
        self.n_edits -= len(drop)
        return deltas

    # -- state -----------------------------------------------------------------------------
    def settings(self):
        return {"mom2_update_weight": self.lam, "L2": self.alpha, "projector": self.projector,
                "nullspace_threshold": self.threshold, "mode": self.mode, "regularizer": self.regularizer,
                "rect_keep": self.rect_keep, "error_correction": self.error_correction, "on_conflict": self.on_conflict,
                "keep_ledger": self.keep_ledger, "fold_every": self.fold_every}

    def describe(self):
        out = {f"nullspace_rank/layer_{l}": U.shape[1] for l, U in self.U.items()}
        if self.keep_ledger:
            out["ledger_entries"] = len(self.ledger_ids)
        return out

    def state_dict(self):
        state = {**super().state_dict(), "rank": {str(l): U.shape[1] for l, U in self.U.items()},
                 "F": {str(l): f for l, f in self.F.items()}, "S": {str(l): s for l, s in self.S.items()}}
        if self.mode == "aligned":  # the naive / memorize-latest A⁻¹ never changes: rebuilt by setup
            state["Ainv"] = {str(l): a for l, a in self.Ainv.items()}
            state["Zs"] = {str(l): z for l, z in self.Zs.items()}
        if self.keep_ledger:
            state["ledger"] = {"ids": list(self.ledger_ids), "K": {str(l): k for l, k in self.ledger_K.items()},
                               "V": {str(l): v for l, v in self.ledger_V.items()}}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for l, r in state.get("rank", {}).items():
            if int(l) in self.U and self.U[int(l)].shape[1] != r:
                raise ValueError(f"solver state for layer {l} has null-space rank {r}, this run has "
                                 f"{self.U[int(l)].shape[1]}: C0 or nullspace_threshold changed since the checkpoint")
        dev = lambda l: self.Ainv[int(l)].device  # noqa: E731
        for l, a in state.get("Ainv", {}).items():
            if a.shape != self.Ainv[int(l)].shape:
                raise ValueError(f"solver state for layer {l} has shape {tuple(a.shape)}, this run "
                                 f"{tuple(self.Ainv[int(l)].shape)}: the model or solver configuration changed")
            self.Ainv[int(l)] = a.to(dev(l), torch.float64).clone()
        for l, z in state.get("Zs", {}).items():
            self.Zs[int(l)] = z.to(dev(l), torch.float64).clone()
        self.F = {int(l): f.to(dev(l), torch.float64).clone() for l, f in state.get("F", {}).items()}
        self.S = {int(l): s.to(dev(l), torch.float64).clone() for l, s in state.get("S", {}).items()}
        ledger = state.get("ledger")
        if ledger is not None:
            self.ledger_ids = list(ledger["ids"])
            self.ledger_K = {int(l): k.to(dev(l), torch.float64).clone() for l, k in ledger["K"].items()}
            self.ledger_V = {int(l): v.to(dev(l), torch.float64).clone() for l, v in ledger["V"].items()}
        self._cache = {}


class MEMIT(AlignedSolver):
    """MEMIT, §4. ``mode="aligned"`` (default, OTE "MEMIT_seq", Remark A.1): Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹ with
    C_p the Gram of all previously edited keys. ``mode="naive"``: the original MEMIT, Δ = R Kᵀ (λC0 + K Kᵀ)⁻¹.
    With ``regularizer`` (and ``error_correction``) it is the OTE repo's MEMIT_seq_prune / _rect (/ _err)."""

    def __init__(self, mom2_update_weight: float = 15000.0, mode: str = "aligned", L2: float = 0.0,
                 regularizer: str | None = None, rect_keep: float = 40.0, error_correction: bool = False,
                 on_conflict: str = "replace", keep_ledger: bool = True, fold_every: int = 1024) -> None:
        super().__init__(mom2_update_weight=mom2_update_weight, L2=L2, projector="identity", mode=mode,
                         regularizer=regularizer, rect_keep=rect_keep, error_correction=error_correction,
                         on_conflict=on_conflict, keep_ledger=keep_ledger, fold_every=fold_every)


class AlphaEdit(AlignedSolver):
    """AlphaEdit, §5: Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with P = U0 U0ᵀ the null-space projector of C0.

    Worked in the basis U0 (d×r): Δ = R K̃ᵀ (C̃_p + K̃ K̃ᵀ + α I)⁻¹ U0ᵀ, which equals the dense formula exactly
    (the solution of (P B + αI)X = PK lies in range(U0)) and costs O(r²n) per step with the incremental inverse.
    ``L2`` is α (AE repo: 10; EasyEdit Llama/Qwen and the papers: 1, §12.4). ``mode="naive"`` drops C_p
    (the OTE–SE paper's collapsing null-space baseline)."""

    def __init__(self, L2: float = 10.0, nullspace_threshold: float = 2e-2, mode: str = "aligned",
                 mom2_update_weight: float = 0.0, on_conflict: str = "replace", keep_ledger: bool = True,
                 fold_every: int = 1024) -> None:
        super().__init__(mom2_update_weight=mom2_update_weight, L2=L2, projector="nullspace",
                         nullspace_threshold=nullspace_threshold, mode=mode, on_conflict=on_conflict,
                         keep_ledger=keep_ledger, fold_every=fold_every)
