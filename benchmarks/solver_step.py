"""One sequential solver step at real FFN widths: lit_edit's incremental form vs a dense re-solve.

The step is the aligned MEMIT write of one layer (OTE "MEMIT_seq", the identity-projector member of
``lit_edit.solvers.AlignedSolver``) at step t, with N earlier edits already in the constraint:

    Δ = R Kᵀ (λC0 + C_p + K Kᵀ)⁻¹,   then C_p ← C_p + K Kᵀ.

* incremental (lit_edit): ``solver.solve`` + ``solver.commit``: Woodbury on the kept inverse, O(d² b).
* dense Cholesky: form A = λC0 + C_p + K Kᵀ and Cholesky-solve it, O(d³/3), then update C_p.
* dense LU (reference repos' way, ``--lu``): the same system through ``torch.linalg.solve`` (LU, O(2d³/3)).

Widths: d = 6400 (GPT2-XL c_proj input, d_out 1600) and 14336 (Llama-3-8B down_proj input, d_out 4096);
b = 100 edits per step. C0 is a synthetic second moment with a decaying spectrum plus low-rank correlation;
set-up (C0, the inverse after N earlier edits) is not timed. Float64 throughout, as in the solvers.

    python benchmarks/solver_step.py                 # both widths (d = 14336 needs ~10 GB RAM)
    python benchmarks/solver_step.py --d 6400 --repeat 3
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


def timed(fn, repeat: int, reset=lambda: None):
    best, out = float("inf"), None
    for _ in range(repeat):
        reset()  # not timed
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(d: int, b: int, n_prev: int, repeat: int, lu: bool, seed: int = 0) -> dict:
    d_out = D_OUT.get(d, d // 4)
    g = torch.Generator().manual_seed(seed + 1)
    C0 = synthetic_C0(d, seed)
    K_prev = torch.randn(d, n_prev, generator=g, dtype=torch.float64)
    K = torch.randn(d, b, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, b, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, b, generator=g, dtype=torch.float64)

    t0 = time.perf_counter()
    solver = MEMIT(mom2_update_weight=LAM, keep_ledger=False)
    solver.setup({0: C0})
    solver.commit(0, K_prev)  # N earlier edits
    state = solver.state_dict()
    setup_s = time.perf_counter() - t0

    def incremental():
        delta = solver.solve(0, K, R)
        solver.commit(0, K, V)
        return delta

    Cp = K_prev @ K_prev.T  # the dense baseline keeps C_p, as the reference repos do
    lamC0 = LAM * C0
    del C0

    def dense(solve):
        def run():
            A = torch.addmm(lamC0 + Cp, K, K.T)
            delta = solve(A, K).T  # (A⁻¹ K)ᵀ = Kᵀ A⁻¹
            torch.addmm(Cp, K, K.T)  # C_p update (result discarded: every repeat starts from the same state)
            return R @ delta
        return run

    t_inc, d_inc = timed(incremental, repeat, reset=lambda: solver.load_state_dict(state))  # same start state
    t_chol, d_chol = timed(dense(lambda A, B: torch.cholesky_solve(B, torch.linalg.cholesky(A))), repeat)
    t_lu, d_lu = timed(dense(torch.linalg.solve), repeat) if lu else (float("nan"), d_chol)
    scale = d_chol.abs().max()
    return {"d": d, "d_out": d_out, "b": b, "n_prev": n_prev, "setup_s": setup_s, "incremental_s": t_inc,
            "dense_cholesky_s": t_chol, "dense_lu_s": t_lu, "speedup_vs_cholesky": t_chol / t_inc,
            "speedup_vs_lu": t_lu / t_inc,
            "max_rel_diff": ((d_inc - d_chol).abs().max() / scale).item(),
            "max_rel_diff_lu": ((d_lu - d_chol).abs().max() / scale).item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[6400, 14336])
    p.add_argument("--b", type=int, default=100)
    p.add_argument("--n_prev", type=int, default=1000, help="edits already in the constraint")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--lu", action="store_true", help="also time torch.linalg.solve (LU; slow on CPU: 44 s at d=6400)")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    results = []
    for d in a.d:
        r = bench(d, a.b, a.n_prev, a.repeat, a.lu)
        results.append(r)
        print(f"d={d:6d} d_out={r['d_out']:5d} b={a.b} N={a.n_prev}: incremental {r['incremental_s']:.3f}s | dense "
              f"Cholesky {r['dense_cholesky_s']:.2f}s ({r['speedup_vs_cholesky']:.1f}x) | dense LU {r['dense_lu_s']:.2f}s "
              f"({r['speedup_vs_lu']:.1f}x) | max rel diff in Δ {r['max_rel_diff']:.2e} (LU vs Cholesky "
              f"{r['max_rel_diff_lu']:.2e}) | set-up {r['setup_s']:.1f}s", flush=True)
    fields = " ".join(f"{k}_d{r['d']}={r[k]:.4g}" for r in results
                      for k in ("incremental_s", "dense_cholesky_s", "dense_lu_s", "speedup_vs_cholesky",
                                "speedup_vs_lu", "max_rel_diff"))
    print(f"RESULT b={a.b} n_prev={a.n_prev} {fields}")


if __name__ == "__main__":
    main()
