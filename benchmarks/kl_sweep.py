"""MetaKE §7.5 KL-strength sweep: one run per KL weight ω of the v* objective (``targets.kl_factor``), the same
requests each time. The requests are split by association ρ into the top and bottom 20 %, efficacy is reported
per group, and the best ω per group is the argmax (ties go to the smaller ω). The paper's claim is that
low-ρ requests (hard to realise) prefer a different ω than high-ρ ones.

    python benchmarks/kl_sweep.py --config configs/world/metake.yaml --limit 200 [--omegas 0.008 0.016 ...]

Each run is ``train.py fit`` in a child process with ``metake.bilevel: none``, so it edits with the plain
solver but still logs ρ, β and β̂ per request. Runs go under ``--out`` (default runs/kl_sweep).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from realisation_bins import load  # noqa: E402

OMEGAS = (0.008, 0.016, 0.031, 0.0625, 0.125, 0.25, 0.5)


def run(config: str, omega: float, limit: int, out: Path, extra: list[str]) -> Path:
    save = out / f"omega_{omega:g}"
    if not list(save.glob("*/version_*/metrics.json")):
        cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", config, "--data.limit", str(limit),
               "--model.method.init_args.bilevel", "none", "--model.method.init_args.base.kl_factor", str(omega),
               "--model.eval_every_n_steps", "0", "--trainer.callbacks", "[]",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save), *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sorted(save.glob("*/version_*"))[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/world/metake.yaml")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--omegas", type=float, nargs="+", default=OMEGAS)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kl_sweep")
    args, extra = ap.parse_known_args()
    table = []
    for omega in args.omegas:
        rundir = run(args.config, omega, args.limit, args.out, extra)
        rows = sorted(load(rundir), key=lambda r: r["rho"])
        k = max(1, len(rows) // 5)
        eff = lambda g: sum(r["efficacy"] for r in g) / len(g)  # noqa: E731
        metrics = json.loads((rundir / "metrics.json").read_text())
        table.append((omega, eff(rows[:k]), eff(rows[-k:]), metrics["efficacy"], metrics["specificity"]))
        print(f"omega {omega:<7g} efficacy low-rho {table[-1][1]:.3f}  high-rho {table[-1][2]:.3f}  "
              f"all {table[-1][3]:.3f}  specificity {table[-1][4]:.3f}", flush=True)
    best_low = max(table, key=lambda t: (t[1], -t[0]))[0]  # argmax, ties -> smaller omega
    best_high = max(table, key=lambda t: (t[2], -t[0]))[0]
    print(f"RESULT best_omega_low_rho={best_low:g} best_omega_high_rho={best_high:g} "
          + " ".join(f"eff_low_{t[0]:g}={t[1]:.4f} eff_high_{t[0]:g}={t[2]:.4f}" for t in table))


if __name__ == "__main__":
    main()
