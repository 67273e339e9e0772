"""One sequential solver step at real FFN widths: lit_edit's incremental form vs a dense re-solve.

``--solver memit`` (default): the aligned MEMIT write of one layer (OTE "MEMIT_seq", the identity-projector
member of ``lit_edit.solvers.AlignedSolver``) at step t, with N earlier edits already in the constraint:

    Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹,   then C_p ← C_p + K Kᵀ.

* incremental (lit_edit): ``solver.solve`` + ``solver.commit``: Woodbury on the kept inverse, O(d² b);
  timed as the mean over one cycle of ``fold_every`` keys, so the periodic fold is included.
* dense Cholesky: form A = λC0 + C_p + K Kᵀ and Cholesky-solve it, O(d³/3), then update C_p; timed as the
  median of 3 runs of the same step.
* dense LU (reference repos' way, ``--lu``): the same system through ``torch.linalg.solve`` (LU, O(2d³/3)).

``--solver alphaedit``: the aligned AlphaEdit write, Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with P = U0 U0ᵀ
the null-space projector of C0 (rank r, ``nullspace_threshold``):

* incremental (lit_edit): the same Woodbury step on the r×r inverse in the basis U0, O(r² b + d r b).
* dense Cholesky in the basis (the strongest re-solve): C̃_p = U0ᵀ C_p U0 kept r×r, A = α I + C̃_p + K̃ K̃ᵀ
  Cholesky-solved, O(r³/3).
* dense LU (the AlphaEdit repo's way, ``--lu``): ``solve(P (C_p + K Kᵀ) + α I, P K Rᵀ)`` with the d×d P and
  C_p, O(2d³) for the product and O(2d³/3) for the LU.

Widths: d = 6400 (GPT2-XL c_proj input, d_out 1600) and 14336 (Llama-3-8B down_proj input, d_out 4096);
b = 100 edits per step. C0 is a synthetic second moment with a decaying spectrum plus low-rank correlation;
set-up (C0, its eigenbasis, the inverse after N earlier edits) is not timed. Float64 throughout, as in
the solvers.

    python benchmarks/solver_step.py                 # both widths (d = 14336 needs ~10 GB RAM)
    python benchmarks/solver_step.py --d 6400 --lu
    python benchmarks/solver_step.py --solver alphaedit   # eigh of C0 in the set-up: minutes at d = 14336
"""
from __future__ import annotations

import argparse
import time

import lit_edit  # noqa: F401  (sets OMP_WAIT_POLICY before torch spins up its thread pool)
import torch

from lit_edit.solvers import MEMIT, AlphaEdit

D_OUT = {6400: 1600, 14336: 4096}
LAM = 15000.0  # MEMIT's λ (mom2_update_weight)
ALPHA = 10.0  # AlphaEdit's α (L2, the AlphaEdit repo's value)


def synthetic_C0(d: int, seed: int) -> torch.Tensor:
    """Uncentred second moment: decaying spectrum (1e-6 .. 1) plus a rank-256 correlated part."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, 256, generator=g, dtype=torch.float64) / 16.0
    C0 = G @ G.T
    C0.diagonal().add_(torch.logspace(0, -6, d, dtype=torch.float64))
    return C0


def bench(d: int, b: int, n_prev: int, lu: bool, fold_every: int, solver: str = "memit",
          threshold: float = 2e-2, seed: int = 0) -> dict:
    d_out = D_OUT.get(d, d // 4)
    g = torch.Generator().manual_seed(seed + 1)
    C0 = synthetic_C0(d, seed)
    K_prev = torch.randn(d, n_prev, generator=g, dtype=torch.float64)
    n_steps = -(-fold_every // b)  # one full cycle of the stacked factors, the last step folds them
    Ks = [torch.randn(d, b, generator=g, dtype=torch.float64) for _ in range(n_steps)]
    Rs = [torch.randn(d_out, b, generator=g, dtype=torch.float64) for _ in range(n_steps)]

    t0 = time.perf_counter()
    if solver == "memit":
        s = MEMIT(mom2_update_weight=LAM, keep_ledger=False, fold_every=fold_every)
    else:
        s = AlphaEdit(L2=ALPHA, nullspace_threshold=threshold, keep_ledger=False, fold_every=fold_every)
    s.setup({0: C0})
    s.commit(0, K_prev)  # N earlier edits, folded into the kept inverse
    s.fold(0)
    setup_s = time.perf_counter() - t0
    rank = s.U[0].shape[1] if solver == "alphaedit" else d

    t0 = time.perf_counter()
    for K, R in zip(Ks, Rs):  # incremental: solve + commit, amortised over the cycle (includes one fold)
        d_inc = s.solve(0, K, R)
        s.commit(0, K)
    t_inc = (time.perf_counter() - t0) / n_steps
    assert s.inv[0].rows == 0, "the cycle must end with a fold"

    # dense baselines for the same last step, with C_p kept dense (d×d) as the reference repos do
    K_before = torch.cat([K_prev] + Ks[:-1], 1)
    Cp = K_before @ K_before.T
    K, R = Ks[-1], Rs[-1]
    if solver == "memit":
        lamC0 = LAM * C0
        del C0, K_before

        def strong():  # Cholesky of A = λC0 + C_p + K Kᵀ, then the C_p update
            A = torch.addmm(lamC0 + Cp, K, K.T)
            delta = R @ torch.cholesky_solve(K, torch.linalg.cholesky(A)).T  # R (A⁻¹ K)ᵀ = R Kᵀ A⁻¹
            torch.addmm(Cp, K, K.T)
            return delta

        def reference():  # the same system through LU
            A = torch.addmm(lamC0 + Cp, K, K.T)
            delta = R @ torch.linalg.solve(A, K).T
            torch.addmm(Cp, K, K.T)
            return delta
    else:
        U = s.U[0]
        Kb = U.T @ K_before
        Cp_t = Kb @ Kb.T  # C̃_p = U0ᵀ C_p U0, which the strong re-solver keeps (r×r)
        P = U @ U.T  # the AlphaEdit repo keeps the dense projector
        eye_d = torch.eye(d, dtype=torch.float64)
        del C0, K_before, Kb

        def strong():  # Cholesky of α I + C̃_p + K̃ K̃ᵀ in the basis, then the C̃_p update
            Kt = U.T @ K
            A = torch.addmm(Cp_t, Kt, Kt.T)
            A.diagonal().add_(ALPHA)
            X = torch.cholesky_solve(Kt, torch.linalg.cholesky(A))  # (α I + C̃_p + K̃K̃ᵀ)⁻¹ K̃  (r×b)
            delta = R @ (U @ X).T
            torch.addmm(Cp_t, Kt, Kt.T)
            return delta

        def reference():  # solve(P (C_p + K Kᵀ) + α I, P K Rᵀ), then the C_p update
            A = torch.addmm(P @ torch.addmm(Cp, K, K.T), eye_d, eye_d, beta=1.0, alpha=ALPHA)
            delta = torch.linalg.solve(A, P @ K @ R.T).T
            torch.addmm(Cp, K, K.T)
            return delta

    def timed(fn, repeats: int):  # the median of a few runs of the same step (a single one varies by up to 2x here)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], out

    t_chol, d_chol = timed(strong, 3)
    t_lu, d_lu = timed(reference, 1) if lu else (float("nan"), None)
    scale = d_chol.abs().max()
    lu_diff = ((d_lu - d_chol).abs().max() / scale).item() if lu else float("nan")
    return {"solver": solver, "d": d, "r": rank, "d_out": d_out, "b": b, "n_prev": n_prev, "steps": n_steps,
            "setup_s": setup_s, "incremental_s": t_inc, "dense_cholesky_s": t_chol, "dense_lu_s": t_lu,
            "speedup_vs_cholesky": t_chol / t_inc, "speedup_vs_lu": t_lu / t_inc,
            "max_rel_diff": ((d_inc - d_chol).abs().max() / scale).item(),
            "max_rel_diff_lu": lu_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", choices=("memit", "alphaedit"), default="memit")
    p.add_argument("--d", type=int, nargs="+", default=[6400, 14336])
    p.add_argument("--b", type=int, default=100)
    p.add_argument("--n_prev", type=int, default=1000, help="edits already in the constraint")
    p.add_argument("--fold_every", type=int, default=1024, help="the solver's fold interval (keys)")
    p.add_argument("--nullspace_threshold", type=float, default=2e-2, help="AlphaEdit's (the published value)")
    p.add_argument("--lu", action="store_true", help="also time the reference repos' LU re-solve (slow on CPU: "
                   "44 s at d=6400 for MEMIT)")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, solver {a.solver}")
    strong = "Cholesky" if a.solver == "memit" else "Cholesky in U0"
    results = []
    for d in a.d:
        r = bench(d, a.b, a.n_prev, a.lu, a.fold_every, a.solver, a.nullspace_threshold)
        results.append(r)
        print(f"d={d:6d} r={r['r']:5d} d_out={r['d_out']:5d} b={a.b} N={a.n_prev}: incremental "
              f"{r['incremental_s']:.3f}s/step (mean of {r['steps']} steps incl. one fold) | dense "
              f"{strong} {r['dense_cholesky_s']:.2f}s ({r['speedup_vs_cholesky']:.1f}x) | dense LU "
              f"{r['dense_lu_s']:.2f}s ({r['speedup_vs_lu']:.1f}x) | max rel diff in Δ {r['max_rel_diff']:.2e} "
              f"(LU vs {strong} {r['max_rel_diff_lu']:.2e}) | set-up {r['setup_s']:.1f}s", flush=True)
    fields = " ".join(f"{k}_d{r['d']}={r[k]:.4g}" for r in results
                      for k in ("r", "incremental_s", "dense_cholesky_s", "dense_lu_s", "speedup_vs_cholesky",
                                "speedup_vs_lu", "max_rel_diff", "max_rel_diff_lu"))
    print(f"RESULT solver={a.solver} b={a.b} n_prev={a.n_prev} {fields}")


if __name__ == "__main__":
    main()
