"""Lifelong editing at real widths: does a step, the memory and a checkpoint stay flat as edits accumulate?

Synthetic keys K (d_in × b) and residuals R (d_out × b) go through the real aligned solver (``MEMIT``, OTE
"MEMIT_seq": λ = 15000, the on-disk ledger on, as a run that can still remove edits) for ``--edits`` edits, one
layer. Per step: ``solve`` + ``commit`` + ``finish_batch`` (the ledger shard and index line, fsync'ed). Printed: the
mean step time over the first, middle and last 10 steps, the RSS and peak RSS, the bytes of a checkpoint of the
solver state and of the ledger directory, at 1k edits and at the end, each against the memory model
(``lit_edit.solver_memory``) and against the earlier design (A_0 and the whole ledger in memory and in every
checkpoint; its sizes from the same model). The last line is ``RESULT key=value ...`` with ``step_time_ratio``
(last 10 steps / first 10), ``rss_ratio`` (RSS at the end / at 1k edits) and ``ckpt_bytes_ratio``.

``fold_every`` defaults to 10·b so that every 10-step window holds exactly one fold of the stacked Woodbury factors
(with the solver's default 1024 and b = 100 the fold comes every 11 steps, and a 10-step window holds one or none).

    python benchmarks/lifelong_scale.py                                  # d_in 6400, d_out 1600, 10k edits
    python benchmarks/lifelong_scale.py --d-in 14336 --d-out 4096        # Llama-3-8B width
    python benchmarks/lifelong_scale.py --edits 100000                   # 6.4 GB of ledger at d_in 6400
    python benchmarks/lifelong_scale.py --edits 100000 --no-ledger       # keep_ledger: false, nothing on disk
    python benchmarks/lifelong_scale.py --compare-float32                # + A⁻¹ in float32, same keys: Δ error
    python benchmarks/lifelong_scale.py --memory-table                   # the model at real widths, checked small
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lit_edit  # noqa: F401,I001  (sets OMP_WAIT_POLICY before torch spins up its thread pool)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solver_step import synthetic_C0  # noqa: E402

from lit_edit.edit_ledger import directory_bytes  # noqa: E402
from lit_edit.solver_memory import measured_state_bytes, solver_bytes  # noqa: E402
from lit_edit.solvers import MEMIT, AlphaEdit  # noqa: E402

LAM = 15000.0
MODELS = {"GPT2-XL": (6400, 1600), "GPT-J-6B": (16384, 4096), "Llama-3-8B": (14336, 4096)}


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process. The current one after ``gc`` and glibc's ``malloc_trim``:
    blocks freed by earlier steps (Δ alone is 82 MB at d_in 6400) that the allocator keeps are not state."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the RSS as it is
        pass
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
    return kb("VmRSS"), kb("VmHWM")


def checkpoint_bytes(solver, where: Path) -> int:
    """Bytes of ``torch.save(solver.state_dict())``, the solver's part of a checkpoint (streamed to a file)."""
    path = where / "solver_state.pt"
    torch.save(solver.state_dict(), path)
    size = path.stat().st_size
    path.unlink()
    return size


def mb(x: float) -> str:
    return f"{x / 2**20:,.1f} MB"


def run(d_in: int, d_out: int, b: int, edits: int, fold_every: int, dtype: str, compare_f32: bool, remove: int,
        seed: int, keep_ledger: bool = True) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lifelong_scale_"))
    g = torch.Generator().manual_seed(seed + 1)
    C0 = synthetic_C0(d_in, seed)
    solvers = {"main": MEMIT(mom2_update_weight=LAM, fold_every=fold_every, inverse_dtype=dtype,
                             keep_ledger=keep_ledger)}
    if compare_f32:
        solvers["f32"] = MEMIT(mom2_update_weight=LAM, fold_every=fold_every, inverse_dtype="float32")
    t0 = time.perf_counter()
    for name, s in solvers.items():
        s.setup({0: C0})  # C0 is spilled to a temporary file: a removal re-reads it for A_0
        s.attach(work / name / "solver_ledger")
    setup_s = time.perf_counter() - t0
    del C0
    gc.collect()
    main = solvers["main"]
    warm_K = torch.randn(d_in, b, generator=g, dtype=torch.float64)
    main.gate(0, warm_K)  # first BLAS call and allocations, not a step
    main._cache.clear()

    n_steps = -(-edits // b)
    times, cpu, ledger_s, marks, errors = [], [], [], {}, {}
    at = sorted({min(1000, edits), edits})
    for t in range(n_steps):
        K = torch.randn(d_in, b, generator=g, dtype=torch.float64)
        R = torch.randn(d_out, b, generator=g, dtype=torch.float64)
        ids = [f"edit {t * b + j}" for j in range(b)]
        t1, c1 = time.perf_counter(), time.process_time()
        delta = main.solve(0, K, R)
        main.commit(0, K, R)  # the stored values V; their content does not change the cost
        t2 = time.perf_counter()
        main.finish_batch(ids)  # the ledger's shard and index line, fsync'ed
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        ledger_s.append(time.perf_counter() - t2)
        if compare_f32:
            d32 = solvers["f32"].solve(0, K, R)
            solvers["f32"].commit(0, K, R)
            solvers["f32"].finish_batch(ids)
            errors[(t + 1) * b] = ((d32.double() - delta).norm() / delta.norm()).item()
        del delta
        done = (t + 1) * b
        if done in at:
            gc.collect()
            rss, peak = rss_bytes()
            marks[done] = {"rss": rss, "peak_rss": peak, "ckpt": checkpoint_bytes(main, work),
                           "ledger": directory_bytes(main.ledger.dir) if main.ledger is not None else 0,
                           "state": measured_state_bytes(main)}
            print(f"  {done:>7} edits: RSS {mb(rss)} (peak {mb(peak)}), checkpoint {marks[done]['ckpt']:,} B, "
                  f"ledger {mb(marks[done]['ledger'])}, solver tensors {mb(marks[done]['state'])}", flush=True)
    removal_s = None
    if remove:
        t1 = time.perf_counter()
        main.forget([f"edit {j}" for j in range(remove)], {0: torch.zeros(d_out, d_in, dtype=torch.float64)})
        removal_s = time.perf_counter() - t1
    w = min(10, len(times) // 3 or 1)
    mid = len(times) // 2 - w // 2

    def windows(xs: list[float]) -> tuple[float, float, float]:  # the mean of the first, middle and last w steps
        return tuple(sum(x) / len(x) for x in (xs[:w], xs[mid: mid + w], xs[-w:]))

    first, middle, last = windows(times)
    lo, hi = marks[at[0]], marks[at[-1]]
    return {"setup_s": setup_s, "first": first, "middle": middle, "last": last, "window": w, "marks": marks,
            "cpu": windows(cpu), "ledger_s": windows(ledger_s),
            "lo": at[0], "hi": at[-1], "lo_mark": lo, "hi_mark": hi, "errors": errors, "removal_s": removal_s,
            "work": work}


def memory_table(b: int, fold_every: int) -> None:
    """The memory model at real widths (per edited layer), then checked against solvers at smaller widths."""
    print(f"memory model per edited layer (b = {b}, fold_every = {fold_every}); r = null-space rank (AlphaEdit), "
          f"'-' = P = I (MEMIT, OTE)")
    head = (f"{'model':<11}{'d_in':>6}{'d_out':>6}{'r':>7}{'dtype':>8}{'edits':>8} | {'state':>10}{'step peak':>11}"
            f"{'removal pk':>11}{'checkpoint':>11}{'ledger':>11} | {'earlier: state':>15}{'checkpoint':>11}")
    print(head)
    for name, (d_in, d_out) in MODELS.items():
        for rank, dtype in ((None, "float64"), (None, "float32"), (int(0.7 * d_in), "float64")):
            for edits in (10_000, 100_000):
                m = solver_bytes(d_in, d_out, rank, edits, b, fold_every, dtype)
                gb = lambda x: f"{x / 2**30:.2f} GB"  # noqa: E731
                print(f"{name:<11}{d_in:>6}{d_out:>6}{rank or '-':>7}{dtype:>8}{edits:>8} | {gb(m['state']):>10}"
                      f"{gb(m['step_peak']):>11}{gb(m['removal_peak']):>11}{gb(m['checkpoint']):>11}"
                      f"{gb(m['ledger_disk']):>11} | {gb(m['reference_state']):>15}{gb(m['reference_checkpoint']):>11}")
    off = {name: solver_bytes(d_in, d_out, on_accelerator=False)["accelerator"] for name, (d_in, d_out) in
           MODELS.items()}
    print("state and step peak sit on the accelerator with device: model, on the host with device: cpu; then the "
          "accelerator only sees each Δ: " + ", ".join(f"{name} {x / 2**30:.2f} GB" for name, x in off.items()))
    print("\nchecked against solvers at smaller widths (measured / model):")
    for d_in, rank_frac, dtype in ((1024, None, "float64"), (2048, None, "float64"), (2048, None, "float32"),
                                   (2048, 0.7, "float64")):
        d_out, edits, work = d_in // 4, 2000, Path(tempfile.mkdtemp(prefix="lifelong_memory_"))
        gc.collect()
        rss0 = rss_bytes()[0]
        C0 = synthetic_C0(d_in, 0)
        s = MEMIT(mom2_update_weight=LAM, fold_every=fold_every, inverse_dtype=dtype) if rank_frac is None else None
        if s is None:
            evals = torch.linalg.eigvalsh(C0)
            thr = float(evals[int(rank_frac * d_in)])  # keeps ~rank_frac·d_in directions
            s = AlphaEdit(L2=10.0, nullspace_threshold=thr, fold_every=fold_every, inverse_dtype=dtype)
        s.setup({0: C0})
        s.attach(work / "solver_ledger")
        del C0
        g = torch.Generator().manual_seed(1)
        for t in range(edits // b):
            K, R = torch.randn(d_in, b, generator=g, dtype=torch.float64), torch.randn(d_out, b, generator=g,
                                                                                        dtype=torch.float64)
            s.solve(0, K, R)
            s.commit(0, K, R)
            s.finish_batch([f"edit {t * b + j}" for j in range(b)])
        gc.collect()
        grown = rss_bytes()[0] - rss0
        rank = s.pres[0].rank
        m = solver_bytes(d_in, d_out, rank, edits, b, fold_every, dtype)
        got = {"state": measured_state_bytes(s), "checkpoint": checkpoint_bytes(s, work),
               "ledger_disk": directory_bytes(s.ledger.dir)}
        parts = "  ".join(f"{k} {got[k]:,}/{m[k]:,} ({got[k] / m[k]:.3f})" for k in got)
        print(f"  d_in {d_in} r {rank or '-'} {dtype}, {edits} edits: {parts}  RSS growth {mb(grown)} vs state "
              f"{mb(m['state'])}", flush=True)
        del s
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=6400)
    p.add_argument("--d-out", type=int, default=None, help="default: 1600 for d_in 6400, else 4096")
    p.add_argument("--b", type=int, default=100, help="edits (keys) per step")
    p.add_argument("--edits", type=int, default=10_000)
    p.add_argument("--fold-every", type=int, default=None, help="default 10·b: one fold per 10-step window")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the solver's inverse_dtype")
    p.add_argument("--compare-float32", action="store_true", help="also run A⁻¹ in float32 on the same keys and "
                   "report the relative error of its Δ")
    p.add_argument("--remove", type=int, default=0, help="at the end, remove this many edits (of the first step) "
                   "and time it (reads the whole ledger, rebuilds A_0 from C0)")
    p.add_argument("--memory-table", action="store_true", help="print the memory model for GPT2-XL, GPT-J and "
                   "Llama-3-8B and check it at smaller widths, then exit")
    p.add_argument("--no-ledger", action="store_true", help="keep_ledger: false, a run that never removes or replaces "
                   "edits: nothing grows, on disk either (the ledger is (d_in + d_out)·8 B per edit: 6.4 GB at 100k, d_in 6400)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.no_ledger and (a.remove or a.compare_float32):
        p.error("--no-ledger keeps no ledger: it cannot be combined with --remove or --compare-float32")
    fold_every = a.fold_every or 10 * a.b
    if a.memory_table:
        memory_table(a.b, fold_every)
        return
    d_out = a.d_out or (1600 if a.d_in == 6400 else 4096)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MEMIT_seq λ={LAM:g}, d_in {a.d_in}, d_out "
          f"{d_out}, b {a.b}, {a.edits} edits, fold_every {fold_every}, A⁻¹ {a.dtype}, "
          f"{'no ledger' if a.no_ledger else 'ledger on disk'}", flush=True)
    r = run(a.d_in, d_out, a.b, a.edits, fold_every, a.dtype, a.compare_float32, a.remove, a.seed, not a.no_ledger)
    lo, hi = r["lo_mark"], r["hi_mark"]
    model_lo = solver_bytes(a.d_in, d_out, None, r["lo"], a.b, fold_every, a.dtype, keep_ledger=not a.no_ledger)
    model_hi = solver_bytes(a.d_in, d_out, None, r["hi"], a.b, fold_every, a.dtype, keep_ledger=not a.no_ledger)
    w = r["window"]
    print(f"set-up {r['setup_s']:.1f} s; step time (mean of {w}): first {r['first']:.3f} s, middle "
          f"{r['middle']:.3f} s, last {r['last']:.3f} s; of which the ledger write {' / '.join(f'{x:.3f}' for x in r['ledger_s'])} s; "
          f"process CPU time {' / '.join(f'{x:.3f}' for x in r['cpu'])} s (all threads: less sensitive to other "
          f"processes on a shared machine)")
    print(f"memory model at {r['hi']} edits: solver tensors {hi['state']:,} B measured / {model_hi['state']:,} B "
          f"model; checkpoint {hi['ckpt']:,} / {model_hi['checkpoint']:,}; ledger {hi['ledger']:,} / "
          f"{model_hi['ledger_disk']:,}")
    print(f"earlier design (model): checkpoint {model_lo['reference_checkpoint']:,} B at {r['lo']} edits, "
          f"{model_hi['reference_checkpoint']:,} B at {r['hi']} "
          f"({model_hi['reference_checkpoint'] / hi['ckpt']:.1f}x this one's)")
    if r["removal_s"] is not None:
        print(f"removing {a.remove} edits after {r['hi']}: {r['removal_s']:.1f} s")
    out = {"d_in": a.d_in, "d_out": d_out, "b": a.b, "edits": r["hi"], "dtype": a.dtype, "fold_every": fold_every,
           "step_first_s": round(r["first"], 4), "step_middle_s": round(r["middle"], 4),
           "step_last_s": round(r["last"], 4), "step_time_ratio": round(r["last"] / r["first"], 3),
           "step_cpu_ratio": round(r["cpu"][2] / r["cpu"][0], 3), "ledger_write_first_s": round(r["ledger_s"][0], 4),
           "ledger_write_last_s": round(r["ledger_s"][2], 4),
           f"rss_{r['lo']}_mb": round(lo["rss"] / 2**20, 1), f"rss_{r['hi']}_mb": round(hi["rss"] / 2**20, 1),
           "rss_ratio": round(hi["rss"] / lo["rss"], 3), "peak_rss_mb": round(hi["peak_rss"] / 2**20, 1),
           f"ckpt_bytes_{r['lo']}": lo["ckpt"], f"ckpt_bytes_{r['hi']}": hi["ckpt"],
           "ckpt_bytes_ratio": round(hi["ckpt"] / lo["ckpt"], 4), f"ledger_bytes_{r['lo']}": lo["ledger"],
           f"ledger_bytes_{r['hi']}": hi["ledger"], "earlier_ckpt_bytes": model_hi["reference_checkpoint"]}
    if r["errors"]:
        for n in sorted({r["lo"], r["hi"]}):
            out[f"f32_rel_err_{n}"] = f"{r['errors'][n]:.2e}"
        out["f32_rel_err_max"] = f"{max(r['errors'].values()):.2e}"
    if r["removal_s"] is not None:
        out["removal_s"] = round(r["removal_s"], 1)
    checks = [("step_time_ratio <= 1.2", out["step_time_ratio"] <= 1.2), ("rss_ratio <= 1.1", out["rss_ratio"] <= 1.1),
              ("checkpoint bytes equal", lo["ckpt"] == hi["ckpt"])]
    print("checks: " + ", ".join(f"{name}: {'ok' if ok else 'NOT MET'}" for name, ok in checks))
    shutil.rmtree(r["work"], ignore_errors=True)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
