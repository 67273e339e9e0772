"""Real-model editing speed: --n CounterFact edits of SmolLM2-135M-Instruct with the shipped config, timed by phase,
against the per-request loop of the reference repositories on a subset, in one run.

1. ``train.py fit --config CONFIG`` on the config's first --n records (its own data, layers, v* and solver
   settings), in a subprocess as a user runs it; the phases come from the run's ``time/*_seconds`` scalars
   (docs/outputs.md): set-up (load, C0, the solver's set-up, pre-edit scores) and, per step, targets, write and the
   batch's scores. By default the pre-edit and final scores leave out the sampled generations (fluency, free
   generation: ten 100-token samples per record, minutes on a CPU, and not part of the edit loop); --full-eval keeps
   the config's evaluator.
2. On --baseline-n of those records, on the unedited model: v* one request at a time with the plain full forward
   and ``torch.optim.Adam`` (MEMIT's ``compute_z``; ``compute_targets_reference``) and their scores as one plain
   forward per (prompt, target) (``score_targets_whole``), against the batched v* and the scorer of the run; and the
   batched v* over whole rows (``whole_rows``: without the causal saving of docs/algorithms.md §2.10). The
   write is the same closed-form code in both, so the baseline's per-edit cost is its targets and scores per edit
   plus the run's write per edit.
3. The equality of the fast paths on those records: the largest relative difference of v* and of the scores' NLL.

The edit loop is the run's targets + write + batch scores; ``edits_per_min`` = n / that time. Timings are wall
clock of whatever machine runs it: compare ratios within one run.

    python benchmarks/real_model.py [--config configs/smollm2-135m/alphaedit_counterfact.yaml] [--n 100]
        [--baseline-n 4] [--full-eval] [--out DIR] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = ("targets", "write", "eval")
SETUP_KEYS = ("load", "c0", "solver_setup", "pre_eval")


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def overrides(sets: list[str]) -> list[tuple[str, str]]:
    """``--set KEY=VALUE`` pairs (KEY as on the command line of ``train.py``, e.g. ``model.model``)."""
    pairs = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.model=world:tiny")
        pairs.append((key, value))
    return pairs


def fit(config: str, n: int, out: Path, full_eval: bool, sets: list[tuple[str, str]] = ()) -> tuple[Path, float]:
    """Run ``train.py fit`` on the config's first ``n`` records; the run folder and the wall time of the command."""
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", config, "--data.limit", str(n),
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "bench"]
    for key, value in sets:
        cmd += [f"--{key}", value]
    if not full_eval:
        cmd += ["--model.method.init_args.evaluator.fluency", "false",
                "--model.method.init_args.evaluator.free_generation", "false"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    (run_dir,) = sorted((out / "bench").glob("version_*"))[-1:]
    return run_dir, wall


def baseline(config: str, n_base: int, sets: list[tuple[str, str]] = ()) -> dict:
    """The per-request loop and the fast paths on the config's first ``n_base`` records, on the unedited model."""
    import torch
    import yaml

    from lit_edit.cli import load_config  # the config as the CLI reads it (its base: chain expanded)
    from lit_edit.data import config_requests
    from lit_edit.layouts import get_layout
    from lit_edit.metrics import score_targets, score_targets_whole, scored_pairs
    from lit_edit.models import generate_context_templates, load_model
    from lit_edit.targets import compute_targets, compute_targets_reference
    from lit_edit.truncated import whole_rows

    cfg = load_config(ROOT / config)
    for key, value in sets:  # as train.py reads them: a YAML value at a dotted path
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    m, d = cfg["model"], cfg["data"]
    model, tok, _ = load_model(m["model"], m.get("dtype", "float32"))
    model.requires_grad_(False).eval()
    layout = get_layout(model)
    offset = d.get("offset") or 0
    requests = config_requests(d, ROOT, offset, offset + n_base)
    ctx = generate_context_templates(model, tok, m.get("context_templates", [[10, 5]]), m.get("context_seed", 0))
    tcfg = method_target_config(m["method"])
    layer = max(m["layers"])

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    ref, t_ref = timed(lambda: compute_targets_reference(model, tok, layout, layer, requests, ctx, tcfg))
    fast, t_fast = timed(lambda: compute_targets(model, tok, layout, layer, requests, ctx, tcfg).v_star)
    with whole_rows():  # the batched loop without the causal saving (docs/algorithms.md §2.10)
        whole, t_whole = timed(lambda: compute_targets(model, tok, layout, layer, requests, ctx, tcfg).v_star)
    pairs = [(p, t) for r in requests for _, _, _, p, t in scored_pairs(r)]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    (nll_w, top_w), t_sw = timed(lambda: score_targets_whole(model, tok, prompts, targets))
    (nll_f, top_f), t_sf = timed(lambda: score_targets(model, tok, prompts, targets))
    rel = ((fast - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    nll_diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(nll_f, nll_w))
    return {"n": len(requests), "targets_ref_s": t_ref, "targets_fast_s": t_fast, "targets_whole_rows_s": t_whole,
            "whole_rows_rel_diff": ((whole - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item(), "score_ref_s": t_sw,
            "score_fast_s": t_sf, "vstar_rel_diff": rel, "nll_rel_diff": nll_diff,
            "top1_equal": top_f == top_w, "threads": torch.get_num_threads()}


def method_target_config(method: dict):
    """The v* settings of a config's ``model.method`` (VStar's init_args; the others keep their defaults)."""
    from lit_edit.targets import TargetConfig

    args = {k: v for k, v in (method.get("init_args") or {}).items() if k in TargetConfig.__dataclass_fields__}
    return TargetConfig(**args)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m/alphaedit_counterfact.yaml")
    ap.add_argument("--n", type=int, default=100, help="edits in the run (the config's first n records)")
    ap.add_argument("--baseline-n", type=int, default=4, help="records of the per-request baseline")
    ap.add_argument("--full-eval", action="store_true", help="keep the config's generations in the pre / final scores")
    ap.add_argument("--out", default=None, help="where the run goes (default: a temporary folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the run and the baseline, as on train.py's command line (repeatable)")
    args = ap.parse_args(argv)
    sets = overrides(args.set)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        run_dir, wall = fit(args.config, args.n, out, args.full_eval, sets)
        scalars = read_scalars(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = {k: sum(scalars.get(f"time/{k}_seconds", {}).values()) for k in STEP_KEYS}
    setup = {k: scalars.get(f"time/{k}_seconds", {}).get(0, float("nan")) for k in SETUP_KEYS}
    n_steps = len(scalars.get("time/targets_seconds", {}))
    loop = sum(steps.values())
    n = int(metrics.get("n_edits", args.n))
    base = baseline(args.config, args.baseline_n, sets)
    per_edit_ours = loop / n
    per_edit_ref = (base["targets_ref_s"] + base["score_ref_s"]) / base["n"] + steps["write"] / n
    speedup = per_edit_ref / per_edit_ours

    print(f"config {args.config}: {n} edits in {n_steps} steps, torch threads {base['threads']}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print("set-up  " + "  ".join(f"{k} {v:.1f}s" for k, v in setup.items()))
    print("loop    " + "  ".join(f"{k} {v:.1f}s" for k, v in steps.items()) + f"  total {loop:.1f}s "
          f"({60 * n / loop:.1f} edits/min); command wall {wall:.1f}s")
    print(f"final   efficacy {metrics.get('efficacy', float('nan')):.2f}  generalization "
          f"{metrics.get('generalization', float('nan')):.2f}  specificity {metrics.get('specificity', float('nan')):.2f}"
          f"  (pre {metrics.get('pre.efficacy', float('nan')):.2f} / {metrics.get('pre.generalization', float('nan')):.2f}"
          f" / {metrics.get('pre.specificity', float('nan')):.2f})")
    print(f"baseline on {base['n']} records: v* per request {base['targets_ref_s']:.1f}s vs batched "
          f"{base['targets_fast_s']:.1f}s ({base['targets_ref_s'] / base['targets_fast_s']:.2f}x; batched over whole "
          f"rows {base['targets_whole_rows_s']:.1f}s); scores "
          f"{base['score_ref_s']:.2f}s vs {base['score_fast_s']:.2f}s ({base['score_ref_s'] / base['score_fast_s']:.2f}x)")
    print(f"per edit: per-request loop {per_edit_ref:.2f}s, this run {per_edit_ours:.2f}s -> speedup {speedup:.2f}x")
    print(f"equality: v* max relative difference {base['vstar_rel_diff']:.2e}, score NLL {base['nll_rel_diff']:.2e}, "
          f"top-1 equal {base['top1_equal']}")
    result = {"edits_per_min": 60 * n / loop, "speedup": speedup, "targets_s": steps["targets"],
              "write_s": steps["write"], "eval_s": steps["eval"], "load_s": setup["load"], "c0_s": setup["c0"],
              "pre_eval_s": setup["pre_eval"], "n": n, "vstar_rel_diff": base["vstar_rel_diff"],
              "suffix_speedup": base["targets_whole_rows_s"] / base["targets_fast_s"],
              "score_speedup": base["score_ref_s"] / base["score_fast_s"],
              "efficacy": metrics.get("efficacy"), "generalization": metrics.get("generalization"),
              "specificity": metrics.get("specificity")}
    print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
