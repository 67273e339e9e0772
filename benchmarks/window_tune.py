"""Choose the window methods' settings on dev records (issue 30 (3), docs/results.md §11.3): how far each setting's
window targets reach, and at what cost, before anything is written.

For each setting of a grid (``--window-sizes`` × ``--steps`` × ``--lrs``), the targets of the chosen dev records are
optimised exactly as a run would (``lit_edit.muke.optimise_windows`` with the config's method settings, the model's
chat template, z at the config's last edited layer) and the final per-window NLL is printed: the mean over every
window of every record, the worst window, the share of windows under ``--landed`` (default 0.1 nats per token), and
the wall time. Lower NLL costs more steps or more windows (smaller W); the solver's write then realises part of
each target, which this script does not measure (``benchmarks/longform_compare.py`` on the same dev records does).

The config's reported records start at its ``data.offset`` (100 for ``configs/smollm2-135m/*_muke.yaml``): a record
at or above it is refused, so the choice is never made on what is reported.

    python benchmarks/window_tune.py --config configs/smollm2-135m/unke_muke.yaml --records 0 2 4 \\
        --method anyedit --window-sizes 10 30 --steps 25 50 --lrs 0.5
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lit_edit.cli import load_config  # noqa: E402
from lit_edit.data import config_requests  # noqa: E402
from lit_edit.layouts import get_layout  # noqa: E402
from lit_edit.models import load_model  # noqa: E402
from lit_edit.muke import METHODS, WindowConfig, optimise_windows  # noqa: E402
from lit_edit.tokens import pad_id  # noqa: E402
from lit_edit.windows import windowed  # noqa: E402


def window_config(cfg: dict, **over) -> WindowConfig:
    """The config's ``model.method.init_args`` as a :class:`WindowConfig` (the fields it knows), with ``over``."""
    args = dict(cfg["model"]["method"].get("init_args", {}))
    known = {f.name for f in fields(WindowConfig)}
    return WindowConfig(**{k: v for k, v in {**args, **over}.items() if k in known})


def dev_records(cfg: dict, records: list[int]) -> list:
    """The records at these indices of the config's data file, refusing any at or after ``data.offset``."""
    data = cfg["data"]
    first_reported = int(data.get("offset", 0) or 0)
    bad = [i for i in records if i < 0 or i >= first_reported]
    if bad:
        raise SystemExit(f"--records {bad}: the config reports records from data.offset {first_reported} on; choose "
                         f"settings on records 0-{first_reported - 1} only")
    reqs = config_requests(data, ROOT, 0, max(records) + 1)
    return [reqs[i] for i in records]


def summarise(nll: list[list[float]], landed: float) -> dict:
    flat = [x for row in nll for x in row]
    return {"windows": len(flat), "mean_nll": sum(flat) / len(flat), "max_nll": max(flat),
            "landed": sum(x < landed for x in flat) / len(flat)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m/unke_muke.yaml")
    ap.add_argument("--records", type=int, nargs="+", default=[0, 1], help="dev record indices (< data.offset)")
    ap.add_argument("--method", choices=METHODS, help="default: the config's")
    ap.add_argument("--window-sizes", type=int, nargs="+", help="default: the config's")
    ap.add_argument("--steps", type=int, nargs="+", help="v_num_grad_steps (default: the config's)")
    ap.add_argument("--lrs", type=float, nargs="+", help="v_lr (default: the config's)")
    ap.add_argument("--landed", type=float, default=0.1, help="a window counts as reached below this NLL")
    args = ap.parse_args(argv)
    cfg = load_config(ROOT / args.config)
    base = window_config(cfg, **({"method": args.method} if args.method else {}))
    reqs = dev_records(cfg, args.records)
    torch.manual_seed(0)
    llm, tok, _ = load_model(cfg["model"]["model"])
    llm.eval().requires_grad_(False)
    layout, layer = get_layout(llm), int(cfg["model"]["layers"][-1])
    grid = list(itertools.product(args.window_sizes or [base.window_size], args.steps or [base.v_num_grad_steps],
                                  args.lrs or [base.v_lr]))
    print(f"{args.config}: {base.method}, records {args.records}, z layer {layer}; {len(grid)} settings")
    print("| W | steps | lr | windows | mean NLL | worst | reached (< %g) | seconds |" % args.landed)
    print("|---|---|---|---|---|---|---|---|")
    best, rows = None, []
    for W, steps, lr in grid:
        wc = window_config(cfg, method=base.method, window_size=W, v_num_grad_steps=steps, v_lr=lr)
        seqs = [windowed(tok, r, wc) for r in reqs]
        t0 = time.perf_counter()
        got = optimise_windows(llm, layout, layer, seqs, wc, pad=pad_id(tok))
        secs = time.perf_counter() - t0
        s = summarise([[float(x) for x in g.nll] for g in got], args.landed)
        print(f"| {W} | {steps} | {lr:g} | {s['windows']} | {s['mean_nll']:.3f} | {s['max_nll']:.3f} | "
              f"{100 * s['landed']:.0f} % | {secs:.0f} |", flush=True)
        rows.append({"window_size": W, "steps": steps, "lr": lr, "seconds": secs, **s})
        if best is None or s["mean_nll"] < best[1]["mean_nll"]:
            best = ((W, steps, lr), s, secs)
    (W, steps, lr), s, secs = best
    print(f"RESULT method={base.method} records={len(reqs)} settings={len(grid)} best_window={W} best_steps={steps} "
          f"best_lr={lr:g} best_mean_nll={s['mean_nll']:.4f} best_reached={s['landed']:.3f} best_seconds={secs:.1f}")
    return rows


if __name__ == "__main__":
    main()
