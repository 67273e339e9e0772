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

Fast, exact algebra: we keep A⁻¹ (d×d, or r×r in the null-space basis; float64 by default, ``inverse_dtype``)
and change it by the step's rank-n term with Woodbury: with Y = K̃ᵀ A⁻¹ and L Lᵀ = I + K̃ᵀ A⁻¹ K̃ (n×n),
Z = L⁻¹ Y,

    M = K̃ᵀ A_t⁻¹ = L⁻ᵀ Z,        A_t⁻¹ = A⁻¹ − Zᵀ Z.

The rank-n terms are stacked (A_t⁻¹ = Ainv − Zsᵀ Zs) and folded into Ainv once ``fold_every`` keys
have accumulated, so a step costs one d×d-by-n product (Y) instead of also rewriting the d×d
matrix (a memory-bound pass that cost twice the product at d = 6400): O(d²n) per step against the
O(d³) dense re-solve (:class:`lit_edit.solver_state.IncrementalInverse`). Removing edits (rare) rebuilds A⁻¹ from
A_0 and the ledger's remaining keys instead of a Woodbury downdate: a downdate forms I − K̃ᵀA⁻¹K̃,
a difference of numbers close to 1 when the removed keys dominate A in some direction, and loses
as many digits as that direction's conditioning (measured: 1e-5 relative on the unit test's system).
A_0 is not kept but rebuilt from C0 (:class:`lit_edit.solver_state.Preservation`), and the ledger of applied
edits is on disk (:mod:`lit_edit.edit_ledger`), so the state does not grow with the number of edits.

Every solver is affine in R: Δ = R·M + c, with the gate M = gate(layer, K) (n×d_in) carrying all of
the R-dependence (docs/algorithms.md §7.6). MetaKE differentiates through that map; diagnostics read it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lit_edit import checks
from lit_edit.algebra import nullspace_basis, prune, rect, rect_mask, spd_inverse, sym_downdate, woodbury_response  # noqa: F401
from lit_edit.edit_ledger import EditLedger
from lit_edit.solver_state import C0Files, ErrorFeedback, Feedback, IncrementalInverse, Preservation, RunningSum

MODES = ("aligned", "naive", "memorize_latest")
REGULARIZERS = (None, "prune", "rect")
DEVICES = ("model", "cpu")  # where the algebra runs: the model's device (where C0 arrives) or the host
INVERSE_DTYPES = ("float64", "float32")


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


class Solver:
    """Interface of a downstream solver. Per step, for each edited layer (low to high):
    ``solve`` gives the raw Δ that is written at once (later layers' keys see it); afterwards ``commit`` adds
    the batch's keys (recomputed on the edited model) and stored values to the accumulated constraint,
    ``finalize`` returns what is finally written (a post-processing regulariser acts here), and
    ``finish_batch`` records the batch's fact ids. ``forget`` removes earlier edits (conflicts, forgetting).
    No state tensor that a ``state_dict`` covers is written in place afterwards, so a ``state_dict`` taken before a
    step is a valid snapshot to roll back to (``load_state_dict`` copies)."""

    on_conflict = "keep"  # an insert of an already edited fact: "keep" | "replace" | "error" (needs a ledger)
    regularizer: str | None = None  # post-processing of Δ in finalize ("prune" | "rect"), None = none

    def __init__(self) -> None:
        self.n_edits = 0

    def setup(self, C0: dict[int, torch.Tensor], source: C0Files | None = None) -> None:
        """Receives the uncentred key second moment C0 (§3) of every edited layer, and where it can be read again
        (the stats cache files; None: the solver keeps a copy on disk if it needs one)."""
        raise NotImplementedError

    def attach(self, directory: str | Path | None) -> None:
        """Where the solver keeps its on-disk state (the ledger of applied edits): the run directory's
        ``solver_ledger`` (RunRecord calls this when the run directory is claimed), or None for a temporary one."""

    def check_ledger(self, directory: str | Path | None) -> set[str]:
        """What :meth:`attach` would find in ``directory``, read only (RunRecord checks it before it writes
        anything): the fact ids with a live edit after a restored state, raising as ``attach`` would."""
        return set()

    @property
    def keeps_ledger(self) -> bool:
        """Whether :meth:`knows` remembers applied edits (so a later batch can replace or remove them)."""
        return False

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
        keep_ledger: store every edit's per-layer keys and values, on disk (needed to remove or replace edits).
        fold_every: fold the stacked Woodbury factors into the kept inverse once this many keys are pending.
        device: ``"model"`` (the algebra runs where C0 arrives, the model's device) or ``"cpu"``.
        inverse_dtype: ``"float64"`` (default) or ``"float32"``: the dtype of A⁻¹ and of all the solver's algebra
            and state (set-up and the rebuild after a removal factorise in float64; docs/results.md §8 measures the
            error of float32).

    The state (:meth:`state_dict`) per layer: A⁻¹ with its pending factors (:class:`IncrementalInverse`), F or S
    (:class:`Feedback`), the checksum of C0; plus the ledger's length and checksum (:class:`EditLedger`, on disk).
    U0 and A_0's diagonal are rebuilt by ``setup``. Nothing in it grows with the number of edits.
    """

    def __init__(self, mom2_update_weight: float = 3000.0, L2: float = 0.0, projector: str = "identity",
                 nullspace_threshold: float = 2e-2, mode: str = "aligned", regularizer: str | None = None,
                 rect_keep: float = 40.0, error_correction: bool = False, on_conflict: str = "replace",
                 keep_ledger: bool = True, fold_every: int = 1024, device: str = "model",
                 inverse_dtype: str = "float64") -> None:
        super().__init__()
        self._check_args(mom2_update_weight, L2, projector, nullspace_threshold, mode, regularizer, rect_keep,
                         error_correction, on_conflict, keep_ledger, fold_every, device, inverse_dtype)
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
        self.device = device
        self.inverse_dtype = inverse_dtype
        self.dtype = getattr(torch, inverse_dtype)
        self.pres: dict[int, Preservation] = {}  # A_0 and P per layer
        self.inv: dict[int, IncrementalInverse] = {}  # A_t⁻¹ per layer
        self.feedback = self._feedback()
        self.ledger = EditLedger(self.dtype) if self.keep_ledger else None
        self._cache: dict[int, tuple] = {}  # (K, K̃, X, Z) of the last solve, reused by commit when the keys agree

    def _check_args(self, lam, alpha, projector, threshold, mode, regularizer, rect_keep, error_correction,
                    on_conflict, keep_ledger, fold_every, device, inverse_dtype) -> None:
        """Refuse any out-of-range or unknown argument here, at construction, not at the first step."""
        cls = type(self).__name__
        arg = lambda a: dict(name=f"solver {cls}: {a}", note=f"model.solver.init_args.{a}")  # noqa: E731
        checks.choice(value=projector, allowed=("identity", "nullspace"), **arg("projector"))
        checks.choice(value=mode, allowed=MODES, **arg("mode"))
        checks.choice(value=regularizer, allowed=REGULARIZERS, **arg("regularizer"))
        checks.choice(value=on_conflict, allowed=("replace", "keep", "error"), **arg("on_conflict"))
        checks.choice(value=device, allowed=DEVICES, **arg("device"))
        checks.choice(value=inverse_dtype, allowed=INVERSE_DTYPES, **arg("inverse_dtype"))
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

    def _feedback(self) -> Feedback:
        """The step's C term: F (error correction, §6.4), S (memorize-the-latest, §6.5) or none (C = 0)."""
        if self.error_correction:
            return ErrorFeedback()
        return RunningSum() if self.mode == "memorize_latest" else Feedback()

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, C0, source=None):
        self.pres, self.inv, self._cache, self.feedback = {}, {}, {}, self._feedback()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = EditLedger(self.dtype)
        if source is None and self.keep_ledger and self.projector == "identity":  # a removal re-reads C0 (A_0)
            source = C0Files.spill(C0)
        for l, c in C0.items():
            c = c.to("cpu" if self.device == "cpu" else c.device, torch.float64)
            p = Preservation(l, c, self.lam, self.alpha, self.projector, self.threshold, source, self.dtype,
                             type(self).__name__)
            A0 = p.A0(c)
            self.pres[l] = p
            self.inv[l] = IncrementalInverse(spd_inverse(A0, f"A_0 = λ·C0 + α·I at layer {l}").to(self.dtype),
                                             self.fold_every)

    def attach(self, directory):
        if self.ledger is not None:
            self.ledger.attach(directory)

    def check_ledger(self, directory):
        return self.ledger.check(directory) if self.ledger is not None else set()

    @property
    def keeps_ledger(self) -> bool:
        return self.ledger is not None

    def _cast(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """A tensor on the solver's device, in its dtype."""
        return K.to(self.inv[layer].Ainv.device, self.dtype)

    def _work(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """K̃ = PᵀK."""
        K, U = self._cast(layer, K), self.pres[layer].U
        return U.T @ K if U is not None else K

    def _full(self, layer: int, G: torch.Tensor) -> torch.Tensor:
        """Δ = G Pᵀ."""
        U = self.pres[layer].U
        return G @ U.T if U is not None else G

    def inverse(self, layer: int) -> torch.Tensor:
        """A⁻¹ of the accumulated constraint (working coordinates), with the pending factors folded in."""
        return self.inv[layer].dense()

    def fold(self, layer: int) -> None:
        self.inv[layer].fold()

    def _response(self, layer: int, K: torch.Tensor):
        """K̃ and the Woodbury response of the batch: X = K̃ᵀ A_t⁻¹ and Z with A_t⁻¹ = A⁻¹ − ZᵀZ."""
        K = self._cast(layer, K)
        Kt = self._work(layer, K)
        X, Z = woodbury_response(self.inv[layer].times(Kt), Kt)
        self._cache[layer] = (K, Kt, X, Z)
        return Kt, X, Z

    # -- the step --------------------------------------------------------------------------
    def gate(self, layer, K):
        _, X, _ = self._response(layer, K)
        return self._full(layer, X)  # M = K̃ᵀ A_t⁻¹ Pᵀ

    def solve(self, layer, K, R):
        """Δ_t = R_t M_t (Prop. 3.2), or (R_t + C K_t) M_t − C with C = F (error correction) or S (memorize_latest).
        Multiplied as R·(X Pᵀ), (d_out×n)(n×d_in), not (R X) Pᵀ: with the null-space basis that would be a
        (d_out×r)(r×d_in) product, 2·d_out·r·d_in flops (1.2e12 per layer at Llama-3-8B width)."""
        _, X, _ = self._response(layer, K)
        M = self._full(layer, X)
        return self.feedback.step(layer, R.to(X.device, self.dtype), self._cast(layer, K), M)

    def commit(self, layer, K, V=None):
        """A_t = A_{t−1} + K̃_t K̃_tᵀ; the keys and stored values V join the ledger."""
        if self.mode != "aligned":
            return  # the naive and memorize-latest objectives hold no earlier batches
        K = self._cast(layer, K)
        cached = self._cache.pop(layer, None)
        if cached is not None and cached[0].shape == K.shape and torch.equal(cached[0], K):
            _, Kt, X, Z = cached  # the keys of the solve: skip re-projecting them (2·d·r·n flops) and the Woodbury
        else:
            Kt = self._work(layer, K)
            X, Z = woodbury_response(self.inv[layer].times(Kt), Kt)
        self.inv[layer].add(Z)
        self.feedback.committed(layer, Kt, X)
        if self.ledger is not None:
            if V is None:
                raise ValueError("commit needs the stored values V to keep the ledger")
            self.ledger.stage(layer, K, V)

    def finalize(self, layer, delta, W):
        applied = delta
        if self.regularizer == "prune":
            applied = prune(delta, W.to(delta.device))
        elif self.regularizer == "rect":
            applied = rect(delta, W.to(delta.device), self.rect_keep)
        self.feedback.written(layer, applied, delta)
        return applied

    def finish_batch(self, fact_ids):
        super().finish_batch(fact_ids)
        if self.ledger is not None:
            self.ledger.append(list(fact_ids))

    # -- conflicts and forgetting (Prop. 3.5, §6.6) -----------------------------------------
    def knows(self, fact_id):
        return self.ledger is not None and self.ledger.knows(fact_id)

    @property
    def ledger_ids(self) -> list[str]:
        """The fact id of every live ledger entry, in ledger order."""
        return self.ledger.ids() if self.ledger is not None else []

    def forget(self, fact_ids, W):
        """Remove the ledger entries of ``fact_ids`` from every layer (Prop. 3.5 with no new entries): with the
        stored keys K_O and the OLD stored values V_O (§12.8), A' = A − K̃_O K̃_Oᵀ and
        Δ = −(V_O − W K_O) K̃_Oᵀ A'⁻¹. For fixed keys this lands exactly on the least-squares solution of the
        remaining edits. A'⁻¹ is rebuilt densely (float64) from A_0 and the remaining keys (see the module
        docstring), layer by layer and reading the ledger one shard at a time."""
        if self.ledger is None:
            return super().forget(fact_ids, W)
        missing = [f for f in fact_ids if not self.ledger.knows(f)]
        if missing:
            raise KeyError(f"no applied edit of fact(s) {missing} in the ledger")
        gone, deltas, n_gone = set(fact_ids), {}, 0
        for l, inv in self.inv.items():
            A = self.pres[l].A0()  # A_0, rebuilt from C0
            K_O, V_O = [], []
            for K_keep, K_drop, V_drop in self.ledger.scan(l, gone):
                Kt = self._work(l, K_keep).to(torch.float64)
                A.addmm_(Kt, Kt.T)  # + Σ K̃ K̃ᵀ of the entries that stay
                K_O.append(K_drop), V_O.append(V_drop)
            inv.reset(spd_inverse(A, f"the remaining constraint at layer {l}").to(self.dtype))
            del A
            K_O, V_O = self._cast(l, torch.cat(K_O, 1)), self._cast(l, torch.cat(V_O, 1))
            Kt = self._work(l, K_O)
            X = Kt.T @ inv.Ainv  # K̃_Oᵀ A'⁻¹
            R_O = V_O - self._cast(l, W[l]) @ K_O
            deltas[l] = -R_O @ self._full(l, X)
            self.feedback.forgotten(l, Kt, X)
            n_gone = K_O.shape[1]
        self.ledger.remove(list(fact_ids))
        self.n_edits -= n_gone
        return deltas

    # -- state -----------------------------------------------------------------------------
    def settings(self):
        return {"mom2_update_weight": self.lam, "L2": self.alpha, "projector": self.projector,
                "nullspace_threshold": self.threshold, "mode": self.mode, "regularizer": self.regularizer,
                "rect_keep": self.rect_keep, "error_correction": self.error_correction, "on_conflict": self.on_conflict,
                "keep_ledger": self.keep_ledger, "fold_every": self.fold_every, "device": self.device,
                "inverse_dtype": self.inverse_dtype}

    def describe(self):
        out = {f"nullspace_rank/layer_{l}": p.rank for l, p in self.pres.items() if p.rank is not None}
        if self.ledger is not None:
            out["ledger_entries"] = len(self.ledger)
        return out

    @property
    def U(self) -> dict[int, torch.Tensor]:
        """The null-space bases U0 (projector 'nullspace')."""
        return {l: p.U for l, p in self.pres.items() if p.U is not None}

    @property
    def F(self) -> dict[int, torch.Tensor]:
        """E A⁻¹ per layer (error correction)."""
        return self.feedback.C if self.feedback.name == "F" else {}

    @property
    def S(self) -> dict[int, torch.Tensor]:
        """Σ Δ written so far per layer (memorize_latest)."""
        return self.feedback.C if self.feedback.name == "S" else {}

    def state_dict(self):
        state = {**super().state_dict(), "rank": {str(l): p.rank for l, p in self.pres.items() if p.rank is not None},
                 "C0": {str(l): p.checksum for l, p in self.pres.items()},
                 "F": {str(l): f for l, f in self.F.items()}, "S": {str(l): s for l, s in self.S.items()}}
        if self.mode == "aligned":  # the naive / memorize-latest A⁻¹ never changes: rebuilt by setup
            parts = {l: inv.state() for l, inv in self.inv.items()}
            state["Ainv"] = {str(l): p["Ainv"] for l, p in parts.items()}
            state["Zs"] = {str(l): p["Zs"] for l, p in parts.items()}  # a fixed-size buffer: flat checkpoints
            state["Zs_rows"] = {str(l): p["rows"] for l, p in parts.items()}
        if self.ledger is not None:
            state["ledger"] = self.ledger.state()  # its length and checksum; the entries are on disk
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for l, r in state.get("rank", {}).items():
            if int(l) in self.pres and self.pres[int(l)].rank != r:
                raise ValueError(f"solver state for layer {l} has null-space rank {r}, this run has "
                                 f"{self.pres[int(l)].rank}: C0 or nullspace_threshold changed since the checkpoint")
        for l, checksum in state.get("C0", {}).items():
            if int(l) in self.pres and self.pres[int(l)].checksum != checksum:
                raise ValueError(f"solver state for layer {l} was built on another C0 than this run's (checksums "
                                 f"differ): model.stats or the stats cache changed since the checkpoint; A⁻¹ cannot "
                                 f"move to another C0, start a new run")
        ledger = state.get("ledger")
        if ledger is not None and "ids" in ledger:
            raise ValueError("the solver state embeds its ledger (a checkpoint of an earlier lit_edit); this version "
                             "keeps it on disk in the run directory: start a new run")
        for l, a in state.get("Ainv", {}).items():
            inv = self.inv[int(l)]
            if a.shape != inv.Ainv.shape:
                raise ValueError(f"solver state for layer {l} has shape {tuple(a.shape)}, this run "
                                 f"{tuple(inv.Ainv.shape)}: the model or solver configuration changed")
            inv.load(self._cast(int(l), a), self._cast(int(l), state["Zs"][l]), state.get("Zs_rows", {}).get(l))
        self.feedback.C = {int(l): self._cast(int(l), c).clone() for l, c in state.get(self.feedback.name, {}).items()}
        if self.ledger is not None and ledger is not None:
            self.ledger.restore(ledger)
        self._cache = {}


class MEMIT(AlignedSolver):
    """MEMIT, §4. ``mode="aligned"`` (default, OTE "MEMIT_seq", Remark A.1): Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹ with
    C_p the Gram of all previously edited keys. ``mode="naive"``: the original MEMIT, Δ = R Kᵀ (λC0 + K Kᵀ)⁻¹.
    With ``regularizer`` (and ``error_correction``) it is the OTE repo's MEMIT_seq_prune / _rect (/ _err)."""

    def __init__(self, mom2_update_weight: float = 15000.0, mode: str = "aligned", L2: float = 0.0,
                 regularizer: str | None = None, rect_keep: float = 40.0, error_correction: bool = False,
                 on_conflict: str = "replace", keep_ledger: bool = True, fold_every: int = 1024,
                 device: str = "model", inverse_dtype: str = "float64") -> None:
        super().__init__(mom2_update_weight=mom2_update_weight, L2=L2, projector="identity", mode=mode,
                         regularizer=regularizer, rect_keep=rect_keep, error_correction=error_correction,
                         on_conflict=on_conflict, keep_ledger=keep_ledger, fold_every=fold_every, device=device,
                         inverse_dtype=inverse_dtype)


class AlphaEdit(AlignedSolver):
    """AlphaEdit, §5: Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with P = U0 U0ᵀ the null-space projector of C0.

    Worked in the basis U0 (d×r): Δ = R K̃ᵀ (C̃_p + K̃ K̃ᵀ + α I)⁻¹ U0ᵀ, which equals the dense formula exactly
    (the solution of (P B + αI)X = PK lies in range(U0)) and costs O(r²n) per step with the incremental inverse.
    ``L2`` is α (AE repo: 10; EasyEdit Llama/Qwen and the papers: 1, §12.4). ``mode="naive"`` drops C_p
    (the OTE–SE paper's collapsing null-space baseline)."""

    def __init__(self, L2: float = 10.0, nullspace_threshold: float = 2e-2, mode: str = "aligned",
                 mom2_update_weight: float = 0.0, on_conflict: str = "replace", keep_ledger: bool = True,
                 fold_every: int = 1024, device: str = "model", inverse_dtype: str = "float64") -> None:
        super().__init__(mom2_update_weight=mom2_update_weight, L2=L2, projector="nullspace",
                         nullspace_threshold=nullspace_threshold, mode=mode, on_conflict=on_conflict,
                         keep_ledger=keep_ledger, fold_every=fold_every, device=device, inverse_dtype=inverse_dtype)
