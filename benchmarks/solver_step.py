"""One sequential solver step at real FFN widths: lit_edit's incremental form vs a dense re-solve.

The step is the aligned MEMIT write of one layer (OTE "MEMIT_seq", the identity-projector member of
``lit_edit.solvers.AlignedSolver``) at step t, with N earlier edits already in the constraint:

    Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹,   then C_p ← C_p + K Kᵀ.

* incremental (lit_edit): ``solver.solve`` + ``solver.commit``: Woodbury on the kept inverse, O(d² b);
  timed as the mean over one cycle of ``fold_every`` keys, so the periodic fold is included.
* dense Cholesky: form A = λC0 + C_p + K Kᵀ and Cholesky-solve it, O(d³/3), then update C_p.
* dense LU (reference repos' way, ``--lu``): the same system through ``torch.linalg.solve`` (LU, O(2d³/3)).

Widths: d = 6400 (GPT2-XL c_proj input, d_out 1600) and 14336 (Llama-3-8B down_proj input, d_out 4096);
b = 100 edits per step. C0 is a synthetic second moment with a decaying spectrum plus low-rank correlation;
set-up (C0, the inverse after N earlier edits) is not timed. Float64 throughout, as in the solvers.

    python benchmarks/solver_step.py                 # both widths (d = 14336 needs ~10 GB RAM)
    python benchmarks/solver_step.py --d 6400 --lu
"""
from __future__ import annotations

import argparse
import time

import lit_edit  # noqa: F401  (sets OMP_WAIT_POLICY before torch spins up its thread pool)
import torch

from lit_edit.solvers import MEMIT

D_OUT = {6400: 1600, 14336: 4096}
LAM = 15000.0


def synthetic_C0(d: int, seed: int) -> torch.Tensor:
    """Uncentred second moment: decaying spectrum (1e-6 .. 1) plus a rank-256 correlated part."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, 256, generator=g, dtype=torch.float64) / 16.0
    C0 = G @ G.T
    C0.diagonal().add_(torch.logspace(0, -6, d, dtype=torch.float64))
    return C0


def bench(d: int, b: int, n_prev: int, lu: bool, fold_every: int, seed: int = 0) -> dict:
    d_out = D_OUT.get(d, d // 4)
    g = torch.Generator().manual_seed(seed + 1)
    C0 = synthetic_C0(d, seed)
    K_prev = torch.randn(d, n_prev, generator=g, dtype=torch.float64)
    n_steps = -(-fold_every // b)  # one full cycle of the stacked factors, the last step folds them
    Ks = [torch.randn(d, b, generator=g, dtype=torch.float64) for _ in range(n_steps)]
    Rs = [torch.randn(d_out, b, generator=g, dtype=torch.float64) for _ in range(n_steps)]

    t0 = time.perf_counter()
    solver = MEMIT(mom2_update_weight=LAM, keep_ledger=False, fold_every=fold_every)
    solver.setup({0: C0})
    solver.commit(0, K_prev)  # N earlier edits, folded into the kept inverse
    solver.fold(0)
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for K, R in zip(Ks, Rs):  # incremental: solve + commit, amortised over the cycle (includes one fold)
        d_inc = solver.solve(0, K, R)
        solver.commit(0, K)
    t_inc = (time.perf_counter() - t0) / n_steps
    assert solver.Zs[0].shape[0] == 0, "the cycle must end with a fold"

    # dense baseline for the same last step: A = λC0 + C_p + K Kᵀ, with C_p kept dense as the reference repos do
    K_before = torch.cat([K_prev] + Ks[:-1], 1)
    Cp = K_before @ K_before.T
    lamC0 = LAM * C0
    del C0, K_before
    K, R = Ks[-1], Rs[-1]

    def dense(solve):
        t0 = time.perf_counter()
        A = torch.addmm(lamC0 + Cp, K, K.T)
        delta = R @ solve(A, K).T  # R (A⁻¹ K)ᵀ = R Kᵀ A⁻¹
        torch.addmm(Cp, K, K.T)  # the C_p update of the step
        return time.perf_counter() - t0, delta

    t_chol, d_chol = dense(lambda A, B: torch.cholesky_solve(B, torch.linalg.cholesky(A)))
    t_lu, d_lu = dense(torch.linalg.solve) if lu else (float("nan"), d_chol)
    scale = d_chol.abs().max()
    return {"d": d, "d_out": d_out, "b": b, "n_prev": n_prev, "steps": n_steps, "setup_s": setup_s,
            "incremental_s": t_inc, "dense_cholesky_s": t_chol, "dense_lu_s": t_lu,
            "speedup_vs_cholesky": t_chol / t_inc, "speedup_vs_lu": t_lu / t_inc,
            "max_rel_diff": ((d_inc - d_chol).abs().max() / scale).item(),
            "max_rel_diff_lu": ((d_lu - d_chol).abs().max() / scale).item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[6400, 14336])
    p.add_argument("--b", type=int, default=100)
    p.add_argument("--n_prev", type=int, default=1000, help="edits already in the constraint")
    p.add_argument("--fold_every", type=int, default=1024, help="the solver's fold interval (keys)")
    p.add_argument("--lu", action="store_true", help="also time torch.linalg.solve (LU; slow on CPU: 44 s at d=6400)")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    results = []
    for d in a.d:
        r = bench(d, a.b, a.n_prev, a.lu, a.fold_every)
        results.append(r)
        print(f"d={d:6d} d_out={r['d_out']:5d} b={a.b} N={a.n_prev}: incremental {r['incremental_s']:.3f}s/step "
              f"(mean of {r['steps']} steps incl. one fold) | dense "
              f"Cholesky {r['dense_cholesky_s']:.2f}s ({r['speedup_vs_cholesky']:.1f}x) | dense LU {r['dense_lu_s']:.2f}s "
              f"({r['speedup_vs_lu']:.1f}x) | max rel diff in Δ {r['max_rel_diff']:.2e} (LU vs Cholesky "
              f"{r['max_rel_diff_lu']:.2e}) | set-up {r['setup_s']:.1f}s", flush=True)
    fields = " ".join(f"{k}_d{r['d']}={r[k]:.4g}" for r in results
                      for k in ("incremental_s", "dense_cholesky_s", "dense_lu_s", "speedup_vs_cholesky",
                                "speedup_vs_lu", "max_rel_diff"))
    print(f"RESULT b={a.b} n_prev={a.n_prev} {fields}")


if __name__ == "__main__":
    main()
