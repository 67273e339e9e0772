"""Runtime and peak memory of MetaKE relative to its base solver, on the same requests, in one invocation.

Each variant runs the real fit loop (``train.py fit``) in its own child process, one after the other, so
that its peak RSS is its own; the edit time runs from the first step's start to the end of the epoch (targets, MetaKE refinement,
the closed-form write, the per-batch metrics), so model loading, C0 and the final evaluation are excluded. It is
reported as wall-clock time and as the process's CPU time, which other processes on a shared machine disturb less.

    python benchmarks/metake_overhead.py                      # configs/world/metake.yaml vs the same with metake off
    python benchmarks/metake_overhead.py --limit 100 --batch_size 20
    python benchmarks/metake_overhead.py --limit 200 --variants paper bare tol   # also the open-choice variants
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
sys.argv = ["train.py"] + json.loads(sys.argv[1])
from lit_edit.cli import main
import lightning as L

marks = []
class StepTimer(L.Callback):  # first batch start -> end of the epoch: every step with all its callbacks
    def on_train_batch_start(self, *a):
        marks.append((time.perf_counter(), time.process_time()))
    def on_train_epoch_end(self, *a):
        marks.append((time.perf_counter(), time.process_time()))
start = time.perf_counter()
cli = main(sys.argv[1:] + ["--trainer.callbacks+=__main__.StepTimer"])
print("CHILD " + json.dumps({"edit_s": marks[-1][0] - marks[0][0], "edit_cpu_s": marks[-1][1] - marks[0][1],
                             "wall_s": time.perf_counter() - start,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "metrics": cli.model.final_scores}))
"""


def run(config: str, extra: list[str], out: Path) -> dict:
    args = ["fit", "--config", config, "--model.eval_every_n_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
            "--trainer.logger.init_args.save_dir", str(out)] + extra
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][6:])


VARIANTS = {  # MetaKE variants timed against the same base run (docs/algorithms.md §7.2's open choices)
    "paper": [],  # the config as is: context-prefixed x_e, all T steps
    "bare": ["--model.method.init_args.edit_prompts", "bare"],  # x_e = the rewriting prompt alone
    "tol": ["--model.method.init_args.tol", "1e-3"],  # stop once an iteration lowers L_meta by < 0.1 %
}


def base_method(config: str) -> dict:
    """The config's MetaKE base (v* with the same settings) as a method of its own: the run without MetaKE."""
    from dataclasses import asdict

    from lit_edit.cli import EditCLI
    from lit_edit.data import EditDataModule
    from lit_edit.module import EditModule

    cli = EditCLI(EditModule, EditDataModule, run=False, args=["--config", config])  # parses; loads no weights
    return {"class_path": "lit_edit.methods.VStar", "init_args": asdict(cli.model.method.base)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/world/metake.yaml")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=["paper"], choices=sorted(VARIANTS))
    a = p.parse_args()
    data = ["--data.limit", str(a.limit), "--data.batch_size", str(a.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        base = run(a.config, data + ["--model.method", json.dumps(base_method(a.config))], Path(tmp) / "base")
        metas = {v: run(a.config, data + VARIANTS[v], Path(tmp) / v) for v in a.variants}
    for name, r in (("base solver", base), *((f"MetaKE {v}", r) for v, r in metas.items())):
        m = r["metrics"]
        print(f"{name:14s} edit time {r['edit_s']:7.1f}s (x{r['edit_s'] / base['edit_s']:.3f}), CPU time "
              f"{r['edit_cpu_s']:7.1f}s (x{r['edit_cpu_s'] / base['edit_cpu_s']:.3f})  peak RSS "
              f"{r['peak_rss_mb']:7.0f} MB  eff {m.get('efficacy', float('nan')):.3f} "
              f"gen {m.get('generalization', float('nan')):.3f} spec {m.get('specificity', float('nan')):.3f}")
    fields = " ".join(f"{v}_edit_s={r['edit_s']:.2f} {v}_time_ratio={r['edit_s'] / base['edit_s']:.3f} "
                      f"{v}_cpu_ratio={r['edit_cpu_s'] / base['edit_cpu_s']:.3f} "
                      f"{v}_rss_ratio={r['peak_rss_mb'] / base['peak_rss_mb']:.3f}" for v, r in metas.items())
    print(f"RESULT n_edits={a.limit} batch_size={a.batch_size} base_edit_s={base['edit_s']:.2f} "
          f"base_edit_cpu_s={base['edit_cpu_s']:.2f} "
          f"base_peak_rss_mb={base['peak_rss_mb']:.0f} {fields}")


if __name__ == "__main__":
    main()
