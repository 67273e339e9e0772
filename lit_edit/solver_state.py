"""The parts of an aligned solver's state, one concern each, so that :class:`lit_edit.solvers.AlignedSolver` reads as
its equations (docs/algorithms.md §6). None of them grows with the number of edits; the ledger of applied edits,
which does, is on disk (:mod:`lit_edit.edit_ledger`).

* :class:`C0Files` — where C0 can be read again (the stats cache files, or a spilled copy).
* :class:`Preservation` — A_0 = λ PᵀC0P + α I and the projector P of one layer; A_0 itself is not kept.
* :class:`IncrementalInverse` — A_t⁻¹ of one layer as ``Ainv − Zsᵀ Zs`` (Woodbury factors stacked, then folded).
* :class:`Feedback` — the d_out × d_in term C of a step Δ = (R + C K) M − C: nothing on the plain aligned path,
  the fed-back error F (:class:`ErrorFeedback`, §6.4) or the running sum S (:class:`RunningSum`, §6.5).

Each keeps tensors that are replaced, never written in place where a snapshot can see them, so a ``state_dict``
taken before a step is a valid snapshot to roll back to.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lit_edit.algebra import nullspace_basis, sym_downdate
from lit_edit.runs import tensor_checksum


class C0Files:
    """Where each layer's C0 can be read again: the stats cache files (:func:`lit_edit.stats.c0_files`), or, for C0
    given as tensors (:meth:`spill`), copies in a temporary directory deleted with this object. A solver that does
    not keep A_0 = λ·C0 + α·I (d_in² floats per layer) re-reads C0 from here when a removal needs it
    (docs/algorithms.md §6.6)."""

    KEY = "mom2"  # the tensor's name in a cache file

    def __init__(self, paths: dict[int, Path], device: torch.device | str = "cpu", keep_alive=None) -> None:
        self.paths, self.device, self._keep_alive = {l: Path(p) for l, p in paths.items()}, device, keep_alive

    @classmethod
    def spill(cls, C0: dict[int, torch.Tensor]) -> C0Files:
        """Write C0 (float64) to a temporary directory, removed when the returned object is garbage collected."""
        tmp = tempfile.TemporaryDirectory(prefix="lit_edit_c0_")
        paths = {l: Path(tmp.name) / f"layer{l}_mom2.safetensors" for l in C0}
        for l, c in C0.items():
            save_file({cls.KEY: c.detach().to("cpu", torch.float64).contiguous()}, paths[l])
        return cls(paths, "cpu", keep_alive=tmp)

    def load(self, layer: int) -> torch.Tensor:
        """C0 of ``layer`` in float64 on ``device``; a missing file is named."""
        path = self.paths.get(layer)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"the C0 cache file of layer {layer} ({path}) is gone: the solver re-reads it to "
                                    f"rebuild A_0 for a removal; recompute it with the run's model.stats settings")
        return load_file(path)[self.KEY].to(self.device, torch.float64)

    def load_all(self) -> dict[int, torch.Tensor]:
        return {l: self.load(l) for l in self.paths}


def c0_checksum(C0: torch.Tensor) -> str:
    """SHA-256 of C0 as float64: what A_0 is rebuilt from must be what the solver was set up with."""
    return tensor_checksum([("C0", C0.to(torch.float64))])


class Preservation:
    """The preservation and ridge terms of one layer (OTE–SE Prop. 3.2): A_0 = λ PᵀC0P + α I, and P.

    P is the identity or the null-space basis U0 of C0 (AlphaEdit, §5; kept d_in × r, never as the d_in × d_in
    projector). In that basis A_0 is diagonal, λ·evals + α (PᵀC0P = diag(evals) for eigenvectors of C0), so its r
    numbers are kept. With P = I it is d_in × d_in, as large as A⁻¹, so it is not kept: :meth:`A0` rebuilds it from
    C0 read back from ``source`` (the stats cache files), refusing a C0 whose checksum is not the one of set-up."""

    def __init__(self, layer: int, C0: torch.Tensor, lam: float, alpha: float, projector: str, threshold: float,
                 source: C0Files | None, dtype: torch.dtype, owner: str) -> None:
        self.layer, self.lam, self.alpha, self.source, self.device = layer, lam, alpha, source, C0.device
        self.checksum = c0_checksum(C0)
        self.U: torch.Tensor | None = None  # d_in × r in the solver's dtype; None: P = I
        self.diag: torch.Tensor | None = None  # A_0 in the null-space basis, λ·evals + α (float64)
        if projector == "nullspace":
            U, evals = nullspace_basis(C0, threshold)
            if U.shape[1] == 0:
                smallest = torch.linalg.eigvalsh(C0)[0].item()
                raise ValueError(
                    f"{owner}: no eigenvalue of C0 at layer {layer} is below nullspace_threshold={threshold:g} "
                    f"(smallest is {smallest:.3g}); every update would be zero. Raise the threshold.")
            self.U, self.diag = U.to(dtype), lam * evals + alpha

    @property
    def rank(self) -> int | None:
        return None if self.U is None else self.U.shape[1]

    def A0(self, C0: torch.Tensor | None = None) -> torch.Tensor:
        """A_0 in float64 in working coordinates, from ``C0`` (set-up) or from C0 read back from the source."""
        if self.diag is not None:
            return torch.diag(self.diag)
        c = self._reload() if C0 is None else C0.to(self.device, torch.float64).clone()
        c.mul_(self.lam).diagonal().add_(self.alpha)  # λ C0 + α I, in place: one d×d buffer
        return c

    def _reload(self) -> torch.Tensor:
        if self.source is None:
            raise ValueError(f"layer {self.layer}: A_0 must be rebuilt from C0, but the solver was set up without a "
                             f"C0 source")
        c = self.source.load(self.layer).to(self.device, torch.float64)
        if c0_checksum(c) != self.checksum:
            raise ValueError(f"C0 of layer {self.layer} read back from {self.source.paths[self.layer]} is not the C0 "
                             f"this solver was set up with (checksum differs): the stats cache changed during the run. "
                             f"Restore it, or start a new run")
        return c


class IncrementalInverse:
    """A_t⁻¹ of one layer's accumulated constraint, kept as ``Ainv − Zsᵀ Zs`` (the Woodbury form of
    lit_edit.solvers): Ainv is folded, Zs stacks the factors Z of the steps since (one row per key).

    Zs lives in a buffer of ``fold_every − 1 + n`` rows (n: the widest batch so far) whose first ``rows`` rows are
    the pending factors. An append writes the rows after them in place and a fold starts a new buffer, so rows that
    a snapshot (:meth:`state`) covers are never written again; and the state has the same size whatever the number
    of pending keys, so checkpoints are flat in the number of edits."""

    def __init__(self, Ainv: torch.Tensor, fold_every: int) -> None:
        self.Ainv, self.fold_every = Ainv, fold_every
        self.buf, self.rows = Ainv.new_zeros(0, Ainv.shape[0]), 0

    @property
    def Zs(self) -> torch.Tensor:
        return self.buf[: self.rows]

    def times(self, Kt: torch.Tensor) -> torch.Tensor:
        """Y = K̃ᵀ A⁻¹ = K̃ᵀ Ainv − (K̃ᵀ Zsᵀ) Zs, without forming A⁻¹."""
        Y = Kt.T @ self.Ainv
        return torch.addmm(Y, Kt.T @ self.Zs.T, self.Zs, alpha=-1.0) if self.rows else Y

    def dense(self) -> torch.Tensor:
        """A⁻¹ with the pending factors folded in."""
        return sym_downdate(self.Ainv, self.Zs) if self.rows else self.Ainv

    def fold(self) -> None:
        """Ainv ← Ainv − Zsᵀ Zs: one compute-bound rank-m product (its lower block triangle, mirrored) instead of
        m/n memory-bound ones."""
        self.Ainv = self.dense()
        self.buf, self.rows = torch.zeros_like(self.buf), 0

    def add(self, Z: torch.Tensor) -> None:
        """A⁻¹ ← A⁻¹ − Zᵀ Z (a batch joins the constraint); folds once ``fold_every`` keys are pending."""
        n = Z.shape[0]
        if self.rows + n > self.buf.shape[0]:  # the first batch, or a wider one: a larger buffer
            grown = self.buf.new_zeros(self.fold_every - 1 + n, self.buf.shape[1])
            grown[: self.rows] = self.Zs
            self.buf = grown
        self.buf[self.rows : self.rows + n] = Z
        self.rows += n
        if self.rows >= self.fold_every:
            self.fold()

    def reset(self, Ainv: torch.Tensor) -> None:
        """A⁻¹ rebuilt densely (after a removal): no pending factors."""
        self.Ainv, self.buf, self.rows = Ainv, torch.zeros_like(self.buf), 0

    def state(self) -> dict:
        return {"Ainv": self.Ainv, "Zs": self.buf, "rows": self.rows}

    def load(self, Ainv: torch.Tensor, Zs: torch.Tensor, rows: int | None) -> None:
        self.Ainv, self.buf = Ainv.clone(), Zs.clone()
        self.rows = Zs.shape[0] if rows is None else int(rows)


class Feedback:
    """The d_out × d_in term C of an aligned step, per layer: Δ = (R + C K) M − C, with the gate M = K̃ᵀ A_t⁻¹ Pᵀ.
    This base class is the plain aligned path, C = 0 and Δ = R M. Kept in full coordinates, so no term needs a
    (d_out×r)(r×d_in) product."""

    name = ""  # its key in the solver's state_dict

    def __init__(self) -> None:
        self.C: dict[int, torch.Tensor] = {}

    def step(self, layer: int, R: torch.Tensor, K: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        C = self.C.get(layer)
        return R @ M if C is None else (R + C @ K) @ M - C

    def committed(self, layer: int, Kt: torch.Tensor, X: torch.Tensor) -> None:
        """The batch's keys K̃ joined A (X = K̃ᵀ A_t⁻¹)."""

    def written(self, layer: int, applied: torch.Tensor, delta: torch.Tensor) -> None:
        """``applied`` = Φ(Δ) was written for the raw step ``delta``."""

    def forgotten(self, layer: int, Kt: torch.Tensor, X: torch.Tensor) -> None:
        """Keys K̃_O left A (X = K̃_Oᵀ A'⁻¹)."""


class ErrorFeedback(Feedback):
    """F = E A⁻¹ of error correction (OTE–SE Algorithm 1, §6.4): the raw step is Δ_t = (R_t K_tᵀ − E_{t−1}) A_t⁻¹ =
    (R_t + F K_t) M_t − F, and E_t = (Φ(Δ_t) − Δ_t) A_t, so F_t = Φ(Δ_t) − Δ_t (overwritten, not accumulated).
    E is unchanged when A changes, so F follows A: an insert maps F to F − (F K̃) M, a removal to F + (F K̃_O) X_O."""

    name = "F"

    def committed(self, layer, Kt, X):
        if layer in self.C:
            self.C[layer] = self.C[layer] - (self.C[layer] @ Kt) @ X

    def written(self, layer, applied, delta):
        self.C[layer] = applied - delta

    def forgotten(self, layer, Kt, X):
        if layer in self.C:
            self.C[layer] = self.C[layer] + (self.C[layer] @ Kt) @ X


class RunningSum(Feedback):
    """S = Σ Φ(Δ) written so far, of memorize-the-latest (§6.5, OTE–SE Eq. 31–32): Δ_t = (R_t + S K_t) M_t − S
    is the one-time solution of K0 and the newest batch only."""

    name = "S"

    def written(self, layer, applied, delta):
        self.C[layer] = self.C[layer] + applied if layer in self.C else applied
