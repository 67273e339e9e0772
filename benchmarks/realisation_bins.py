"""MetaKE §7.5 realisation diagnostics of finished runs: requests sorted by association ρ, 13 quantile bins, mean
predicted β and empirical β̂ (± standard error) per bin, and efficacy per bin (from scores.jsonl); then efficacy of
the top and bottom 20 % by ρ (the groups of the paper's KL-strength sweep).

Where the ledger has them (runs since issue 30), each bin also shows why MetaKE moved its targets as far as it did:
``resid`` ‖V − h_L‖, the residual the solver was asked to realise, and ``unreal`` (1 − β̂)‖V − h_L‖, the part it did
not; ``shift`` ‖V − v*‖, how far the refinement moved the target, and ``reach`` ‖∇L_meta(v*)‖ / (2 w_anchor), how far
the anchor lets it move (the meta-loss's stationary point to first order). ``reach`` ≪ ``unreal`` means the anchor,
not the solver, is what keeps MetaKE at v*.

    python benchmarks/realisation_bins.py runs/world_metake/version_0 [more run dirs ...] [--bins 13]

A run dir needs ``edits.jsonl`` with per-request ``rho``/``beta``/``beta_hat`` (written by MetaKE runs, any
``bilevel``, so ``metake.bilevel: none`` gives the plain solver's diagnostics) and ``scores.jsonl``. Efficacy is CounterFact's ``efficacy`` or, for ZsRE, its analogue ``rewrite_acc``.

Efficacy is printed in percent, the unit of ``scores.jsonl`` (lit_edit/report.py); a run written before scores were
reported in percent (every efficacy a fraction, none above 1) is scaled to percent.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


EFFICACY = ("efficacy", "rewrite_acc")  # CounterFact's efficacy; ZsRE's rewrite accuracy, its analogue


def load(run: Path) -> list[dict]:
    scores = {}
    if (run / "scores.jsonl").exists():
        scores = {json.loads(l)["case_id"]: json.loads(l) for l in (run / "scores.jsonl").read_text().splitlines()}
    rows = []
    for line in (run / "edits.jsonl").read_text().splitlines():
        e = json.loads(line)
        if "rho" in e and e["case_id"] in scores:  # still a live edit at the end (not replaced or removed)
            if "residual" in e and "beta_hat" in e:  # the part of the residual the solver left unrealised
                e["unreal"] = (1.0 - e["beta_hat"]) * e["residual"]
            score = scores[e["case_id"]]
            rows.append({**e, "efficacy": next((score[k] for k in EFFICACY if score.get(k) is not None), None)})
    if not rows:
        raise SystemExit(f"{run}: no per-request rho in edits.jsonl (not a MetaKE run?) or no scores.jsonl")
    effs = [r["efficacy"] for r in rows if r["efficacy"] is not None]
    if effs and max(effs) <= 1.0:  # fractions (runs before percent reporting; all-zero reads the same either way)
        for r in rows:
            if r["efficacy"] is not None:
                r["efficacy"] = 100.0 * r["efficacy"]
    return rows


WHY = ("residual", "unreal", "shift", "reach")  # printed as resid / unreal / shift / reach when every row has them


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def bins(rows: list[dict], n_bins: int) -> list[list[dict]]:
    rows = sorted(rows, key=lambda r: r["rho"])
    edges = [round(i * len(rows) / n_bins) for i in range(n_bins + 1)]
    return [rows[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy) if sx and sy else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--bins", type=int, default=13)
    args = ap.parse_args(argv)
    results = []
    for run in args.runs:
        rows = load(run)
        print(f"\n{run}: {len(rows)} requests")
        why = [k for k in WHY if all(k in r for r in rows)]
        print(f"{'bin':>4} {'n':>4} {'rho':>10} {'beta':>7} {'beta_hat':>16} {'eff. %':>9}"
              + "".join(f" {'resid' if k == 'residual' else k:>9}" for k in why))
        for i, b in enumerate(bins(rows, args.bins)):
            rho = sum(r["rho"] for r in b) / len(b)
            beta = sum(r["beta"] for r in b) / len(b)
            bh, se = mean_se([r.get("beta_hat", float("nan")) for r in b])
            eff = [r["efficacy"] for r in b if r["efficacy"] is not None]
            print(f"{i:>4} {len(b):>4} {rho:>10.4g} {beta:>7.3f} {bh:>9.3f} ± {se:<5.3f} "
                  f"{sum(eff) / len(eff) if eff else float('nan'):>9.1f}"
                  + "".join(f" {sum(r[k] for r in b) / len(b):>9.4g}" for k in why))
        k = max(1, len(rows) // 5)
        by_rho = sorted(rows, key=lambda r: r["rho"])
        low, high = by_rho[:k], by_rho[-k:]
        def eff(g):  # mean over the requests that have a score (nan: none has)
            xs = [r["efficacy"] for r in g if r["efficacy"] is not None]
            return sum(xs) / len(xs) if xs else float("nan")

        r_bb = pearson([r["beta"] for r in rows if "beta_hat" in r], [r["beta_hat"] for r in rows if "beta_hat" in r])
        print(f"efficacy (%) bottom 20 % by rho {eff(low):.1f}, top 20 % {eff(high):.1f}; "
              f"corr(beta, beta_hat) {r_bb:.3f}")
        results.append(f"{run.parent.name}_low={eff(low):.2f} {run.parent.name}_high={eff(high):.2f} "
                       f"{run.parent.name}_corr={r_bb:.4f}")
    print("RESULT " + " ".join(results))


if __name__ == "__main__":
    main()
