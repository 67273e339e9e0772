"""MetaKE against AlphaEdit and MetaKE's two ablations on the deep world (issue 19, docs/results.md §9).

Each row is one ``train.py fit`` in its own child process, one after the other, on the same requests: the
shipped ``configs/world/deep_alphaedit.yaml`` / ``deep_metake.yaml`` plus the row's overrides, without callbacks
(no checkpoints, no monitor) and without evaluation during the run (the final evaluation is the reported one).
The rows (metrics.json's efficacy / generalization / specificity in percent and the child's wall time) and, for
MetaKE rows, ``benchmarks/realisation_bins.py``'s summary are printed and, with ``--write``, replace the block
between ``<!-- deep_world_compare:<tag> -->`` markers in docs/results.md, with the exact command.

    python benchmarks/deep_world_compare.py --write                                   # 200 edits (records 0-199)
    python benchmarks/deep_world_compare.py --offset 200 --limit 40 --tag tune --write  # the tuning records
    python benchmarks/deep_world_compare.py --rows alphaedit metake                   # a subset of the rows
    python benchmarks/deep_world_compare.py --rows alphaedit memit memit_naive alphaedit_naive prune prune_no_err \
        rect rect_no_err --limit 1200 --batch_size 50 --tag ote --write                # (c): all 1200 records
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"

ROWS = {  # name -> (config, overrides, label)
    "alphaedit": ("configs/world/deep_alphaedit.yaml", [], "AlphaEdit (`deep_alphaedit.yaml`)"),
    "metake": ("configs/world/deep_metake.yaml", [], "MetaKE over AlphaEdit, paper settings (`deep_metake.yaml`)"),
    "key_only": ("configs/world/deep_metake.yaml", ["--model.method.init_args.gate", "key_only"],
                 "ablation `gate: key_only`"),
    "stop_grad": ("configs/world/deep_metake.yaml", ["--model.method.init_args.feedback", "stop_grad"],
                  "ablation `feedback: stop_grad`"),
    "relaxed": ("configs/world/deep_metake.yaml",
                ["--model.method.init_args.w_anchor", "0.001", "--model.method.init_args.optimizer", "adam",
                 "--model.method.init_args.eta", "0.5"],
                "MetaKE, relaxed anchor (`w_anchor 1e-3, optimizer adam, eta 0.5`, §4.2)"),
}
# Issue 19 (c): the OTE-SE solver comparison (configs/world/*.yaml of docs/results.md §3, made for world:large)
# moved to the deep world: the same solvers and settings, the deep world's model, stream and edited layers
DEEP = ["--model.model", "world:deep", "--data.path", "world:deep", "--model.layers", "[1, 2]"]
for _name, _label in (("memit", "MEMIT aligned (`memit.yaml`, λ 3000)"), ("memit_naive", "MEMIT naive (`memit_naive.yaml`)"),
                      ("alphaedit_naive", "AlphaEdit naive (`alphaedit_naive.yaml`)"),
                      ("prune", "PRUNE with error correction (`prune.yaml`)"),
                      ("prune_no_err", "PRUNE without error correction (`prune_no_err.yaml`)"),
                      ("rect", "RECT (k 40 %) with error correction (`rect.yaml`)"),
                      ("rect_no_err", "RECT (k 40 %) without error correction (`rect_no_err.yaml`)")):
    ROWS[_name] = (f"configs/world/{_name}.yaml", DEEP, _label)
KEYS = ("efficacy", "generalization", "specificity")


def find(doc: dict, key: str):
    """The first value under ``key`` anywhere in metrics.json (its layout: docs/outputs.md)."""
    if isinstance(doc, dict):
        if key in doc and isinstance(doc[key], (int, float)):
            return doc[key]
        for v in doc.values():
            hit = find(v, key)
            if hit is not None:
                return hit
    return None


def fit_child(config: str, overrides: list[str], save: Path, name: str) -> tuple[Path, float]:
    """One ``train.py fit`` in its own child process, without callbacks (no checkpoints, no monitor) and without
    evaluation during the run; its ``metrics.json`` and wall time."""
    args = ["fit", "--config", config, *overrides, "--trainer.callbacks", "[]", "--model.eval_every_n_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (metrics,) = save.glob("*/version_*/metrics.json")
    return metrics, wall


def run_row(name: str, common: list[str], out: Path) -> dict:
    config, extra, label = ROWS[name]
    metrics, wall = fit_child(config, [*extra, *common], out / name, name)
    run_dir = metrics.parent
    doc = json.loads(metrics.read_text())
    label += f" + `{' '.join(common[6:])}`" if common[6:] else ""  # the --extra overrides
    row = {"name": name, "label": label, "run_dir": str(run_dir), "wall_s": round(wall, 1),
           **{k: find(doc, k) for k in KEYS}}
    if "metake" in config:
        bins = subprocess.run([sys.executable, "benchmarks/realisation_bins.py", str(run_dir)], cwd=ROOT,
                              capture_output=True, text=True)
        row["bins"] = (bins.stdout.strip().replace(str(out), "<tmp>") if bins.returncode == 0
                       else f"(failed: {bins.stderr[-500:]})")
    return row


def table(rows: list[dict]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| run | efficacy | generalization | specificity | wall |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {fmt(r['efficacy'])} | {fmt(r['generalization'])} | {fmt(r['specificity'])} "
                     f"| {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def write_block(script: str, tag: str, command: str, parts: list[str]) -> None:
    """Replace the block between ``<!-- script:tag -->`` markers in docs/results.md (or append it) with the command
    and ``parts``."""
    begin, end = f"<!-- {script}:{tag} -->", f"<!-- /{script}:{tag} -->"
    block = "\n\n".join([begin, f"```bash\n{command}\n```", *parts, end])
    text = DOC.read_text()
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def write_doc(tag: str, command: str, rows: list[dict]) -> None:
    bins = [f"{r['label']}:\n\n```\n{r['bins']}\n```" for r in rows if r.get("bins")]
    write_block("deep_world_compare", tag, command, [table(rows), *bins])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=["alphaedit", "metake", "key_only", "stop_grad"], choices=list(ROWS))
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=20)
    ap.add_argument("--extra", default="", help="further overrides for every row (one string, shell-quoted)")
    ap.add_argument("--tag", default="main", help="the docs block the rows go to")
    ap.add_argument("--write", action="store_true", help="write the rows into docs/results.md")
    args = ap.parse_args()
    common = ["--data.offset", str(args.offset), "--data.limit", str(args.limit),
              "--data.batch_size", str(args.batch_size), *shlex.split(args.extra)]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/deep_world_compare.py", *sys.argv[1:]])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            row = run_row(name, common, Path(tmp))
            rows.append(row)
            print(f"ROW {json.dumps({k: v for k, v in row.items() if k != 'bins'})}", flush=True)
            if row.get("bins"):
                print(row["bins"], flush=True)
        print(table(rows))
        if args.write:
            write_doc(args.tag, command, rows)


if __name__ == "__main__":
    main()
