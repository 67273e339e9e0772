"""Methods side by side on the same edit stream: MetaKE against AlphaEdit / MEMIT and its ablations, and the OTE-SE
sequential solvers, on the deep world (issue 19, docs/results.md §9) or a real model (issue 30).

Each row is one ``train.py fit`` in its own child process on the same requests: a shipped config plus the row's
overrides, without callbacks (no checkpoints, no monitor) and without evaluation during the run (the final
evaluation is the reported one). ``--model`` picks the configs:

* ``world:deep`` (default): ``configs/world/deep_alphaedit.yaml`` / ``deep_metake.yaml`` and the OTE-SE world
  configs moved to the deep world (issue 19 c).
* ``smollm2-135m``, ``gemma3-270m``: ``configs/<model>/<row>_<dataset>.yaml`` (``--dataset counterfact | zsre``),
  e.g. ``metake_counterfact.yaml``, ``metake_memit_counterfact.yaml``, ``ote_prune_counterfact.yaml``.

Printed per row: metrics.json's scores (CounterFact: efficacy / generalization / specificity and fluency when the
evaluator has it; ZsRE: rewrite / paraphrase / neighbourhood accuracy) and the child's wall time, and for MetaKE rows
``benchmarks/realisation_bins.py``'s ρ / β / β̂ bins. The unedited model's scores do not depend on the row, so only
the first child scores it (the ``pre-edit`` row); the others run with ``--model.eval_pre false``.

``--seeds 0 1 2`` runs every row once per seed, with ``--seed_everything S --model.context_seed S
--data.order_seed S`` (the seed of the target optimisation's context templates and of the record order), and prints
mean ± std (sample std over seeds). ``--jobs N`` runs N children at once (each with ``OMP_NUM_THREADS`` = cores / N
unless set). With ``--write`` the table, with the exact command, replaces the block between
``<!-- method_compare:<tag> -->`` markers in docs/results.md.

``--curve-every E`` adds, per row, the retention curve (all live edits scored every E edits, ``retention.json``)
and the monitor's drift at the same steps (held-out perplexity and top-1 agreement with the unedited model, on
``--drift-text``: a real model has no held-out text of its own). ``data.path`` may be a list: the longest real
stream of the shared data is CounterFact then the MQuAKE-CF rewrites, 618 distinct edits with
``--data.drop_repeats true`` (the MQuAKE rewrites have no paraphrase or neighbourhood prompts: efficacy only).

    python benchmarks/method_compare.py --write                                   # 200 edits (records 0-199)
    python benchmarks/method_compare.py --offset 200 --limit 40 --tag tune --write  # the tuning records
    python benchmarks/method_compare.py --rows alphaedit metake                   # a subset of the rows
    python benchmarks/method_compare.py --rows alphaedit memit memit_naive alphaedit_naive prune prune_no_err \\
        rect rect_no_err --limit 1200 --batch_size 50 --tag ote --write                # (c): all 1200 records
    python benchmarks/method_compare.py --model smollm2-135m --rows alphaedit metake key_only stop_grad relaxed \\
        --offset 100 --limit 100 --seeds 0 1 2 --jobs 2                                 # issue 30 (1)
    python benchmarks/method_compare.py --model smollm2-135m --rows ote_memit_seq ote_memit_naive ote_prune \
        ote_rect ote_rect_no_err --offset 0 --limit 618 --batch_size 20 --curve-every 100 --no-generations \
        --drift-text ../shared/data/unke.json --drift-field answer \
        --extra "--data.path '[../shared/data/counterfact_sample.json, ../shared/data/akew_mquake.json]' \
                 --data.drop_repeats true"                                              # issue 30 (2)
    python benchmarks/method_compare.py --model smollm2-135m --dataset zsre --rows alphaedit relaxed --offset 100 \
        --limit 40 --seeds 1 2 --keep runs/zsre    # keep the run directories (realisation_bins.py on them later)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
MODELS = ("world:deep", "smollm2-135m", "gemma3-270m")

# MetaKE's ablations and the relaxed anchor (docs/algorithms.md §10), as overrides of a MetaKE config
METAKE_VARIANTS = {
    "key_only": (["--model.method.init_args.gate", "key_only"], "ablation `gate: key_only`"),
    "stop_grad": (["--model.method.init_args.feedback", "stop_grad"], "ablation `feedback: stop_grad`"),
    "relaxed": (["--model.method.init_args.w_anchor", "0.001", "--model.method.init_args.optimizer", "adam",
                 "--model.method.init_args.eta", "0.5"],
                "MetaKE, relaxed anchor (`w_anchor 1e-3, optimizer adam, eta 0.5`, §4.2)"),
}

WORLD_ROWS = {  # name -> (config, overrides, label)
    "alphaedit": ("configs/world/deep_alphaedit.yaml", [], "AlphaEdit (`deep_alphaedit.yaml`)"),
    "metake": ("configs/world/deep_metake.yaml", [], "MetaKE over AlphaEdit, paper settings (`deep_metake.yaml`)"),
    **{name: ("configs/world/deep_metake.yaml", extra, label) for name, (extra, label) in METAKE_VARIANTS.items()},
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
    WORLD_ROWS[_name] = (f"configs/world/{_name}.yaml", DEEP, _label)

# a real model's rows: name -> (config stem, overrides, label); the file is configs/<model>/<stem>_<dataset>.yaml
REAL_ROWS = {
    "alphaedit": ("alphaedit", [], "AlphaEdit"),
    "memit": ("memit", [], "MEMIT"),
    "metake": ("metake", [], "MetaKE over AlphaEdit, paper settings (T 15, η 5e-3)"),
    "metake_memit": ("metake_memit", [], "MetaKE over MEMIT, paper settings"),
    **{name: ("metake", extra, label) for name, (extra, label) in METAKE_VARIANTS.items()},
    **{f"ote_{s}": (f"ote_{s}", [], f"OTE-SE `ote_{s}`")
       for s in ("memit_seq", "memit_naive", "prune", "rect", "rect_no_err", "memorize_latest")},
}
KEYS = {"counterfact": ("efficacy", "generalization", "specificity", "fluency"),
        "zsre": ("rewrite_acc", "paraphrase_acc", "neighborhood_acc")}


def rows_for(model: str, dataset: str) -> dict[str, tuple[str, list[str], str]]:
    """The rows this model offers: name -> (config path relative to the checkout, overrides, label)."""
    if model == "world:deep":
        return dict(WORLD_ROWS)
    out = {}
    for name, (stem, extra, label) in REAL_ROWS.items():
        config = f"configs/{model}/{stem}_{dataset}.yaml"
        if (ROOT / config).is_file():
            out[name] = (config, extra, f"{label} (`{Path(config).name}`)")
    return out


def find(doc: dict, key: str):
    """The first value under ``key`` anywhere in metrics.json (its layout: docs/outputs.md)."""
    if isinstance(doc, dict):
        if key in doc and isinstance(doc[key], (int, float)) and not isinstance(doc[key], bool):  # not a setting
            return doc[key]
        for v in doc.values():
            hit = find(v, key)
            if hit is not None:
                return hit
    return None


def fit_child(config: str, overrides: list[str], save: Path, name: str,
              env: dict[str, str] | None = None) -> tuple[Path, float]:
    """One ``train.py fit`` in its own child process, without callbacks (no checkpoints, no monitor) and without
    evaluation during the run unless ``overrides`` add them; its ``metrics.json`` and wall time."""
    args = ["fit", "--config", config, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--model.eval_every_n_steps", "0", "--trainer.enable_progress_bar", "false", *overrides, "--trainer.logger.init_args.save_dir", str(save)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (metrics,) = save.glob("*/version_*/metrics.json")
    return metrics, wall


def curve(run_dir: Path, batch_size: int, n_edits: int | None) -> list[dict]:
    """The run's retention curve and drift, one entry per evaluation step: ``edits`` written so far, the live edits'
    scores (retention.json, percent) and the monitor's drift/* scalars at that step (TensorBoard)."""
    from lit_edit.figures import drift_from_events, read_retention

    drift = dict(drift_from_events(run_dir))
    points = {}
    for entry in read_retention(run_dir):
        step = entry["step"]
        edits = step * batch_size if n_edits is None else min(step * batch_size, n_edits)
        points.setdefault(step, {"edits": edits, **entry.get("scores", {}), **drift.get(step, {})})
    return [points[k] for k in sorted(points)]


def curve_table(rows: list[dict], keys: tuple[str, ...]) -> str:
    """Retention (the evaluator's first key over all live edits) and drift per row, every evaluation step."""
    key = keys[0]
    steps = sorted({p["edits"] for r in rows for p in r.get("curve", [])})
    if not steps:
        return ""
    lines = ["| run | measure | " + " | ".join(str(e) for e in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for r in rows:
        by = {p["edits"]: p for p in r.get("curve", [])}
        for label, tag, fmt in ((f"retention {key}", key, "{:.1f}"), ("perplexity", "drift/perplexity", "{:.2f}"),
                                ("top-1 agreement", "drift/agreement", "{:.3f}")):
            cells = [fmt.format(by[e][tag]) if e in by and by[e].get(tag) is not None else "–" for e in steps]
            if any(c != "–" for c in cells):
                lines.append(f"| {r['label']}{'' if r.get('seed') is None else ' (seed %d)' % r['seed']} | {label} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_row(name: str, spec: tuple[str, list[str], str], common: list[str], out: Path, keys: tuple[str, ...],
            env: dict[str, str] | None = None, label_extra: str = "", batch_size: int = 20) -> dict:
    config, extra, label = spec
    metrics, wall = fit_child(config, [*extra, *common], out / name, name, env)
    run_dir = metrics.parent
    doc = json.loads(metrics.read_text())
    row = {"name": name, "label": label + label_extra, "run_dir": str(run_dir), "wall_s": round(wall, 1),
           **{k: find(doc, k) for k in keys}, **{f"pre.{k}": find(doc, f"pre.{k}") for k in keys}}
    if (run_dir / "retention.json").exists():
        row["curve"] = curve(run_dir, batch_size, doc.get("n_edits"))
    if "metake" in config:
        bins = subprocess.run([sys.executable, "benchmarks/realisation_bins.py", str(run_dir)], cwd=ROOT,
                              capture_output=True, text=True)
        row["bins"] = (bins.stdout.strip().replace(str(out), "<tmp>") if bins.returncode == 0
                       else f"(failed: {bins.stderr[-500:]})")
    return row


def mean_std(values: list) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def aggregate(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """One table row from a row's runs (one per seed): each key's mean and std over seeds, wall time's mean."""
    row = {"name": runs[0]["name"], "label": runs[0]["label"], "n": len(runs),
           "wall_s": sum(r["wall_s"] for r in runs) / len(runs)}
    for k in keys:
        row[k] = mean_std([r.get(k) for r in runs])
    return row


def pre_row(runs: list[dict], keys: tuple[str, ...]) -> dict | None:
    """The unedited model's scores: the ``pre.`` values of the child that scored it."""
    scored = next((r for r in runs if any(r.get(f"pre.{k}") is not None for k in keys)), None)
    if scored is None:
        return None
    return {"name": "pre", "label": "pre-edit", "n": 1, "wall_s": None,
            **{k: (scored.get(f"pre.{k}"), None) for k in keys}}


def table(rows: list[dict], keys: tuple[str, ...]) -> str:
    def fmt(v) -> str:
        m, s = v if isinstance(v, tuple) else (v, None)
        if m is None:
            return "–"
        return f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")

    keys = tuple(k for k in keys if any(r.get(k, (None, None))[0] is not None for r in rows))
    lines = ["| run | " + " | ".join(keys) + " | wall |", "|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r.get(k)) for k in keys) + f" | {wall} |")
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


def plan(args, rows: dict) -> list[tuple[str, int | None, list[str]]]:
    """(row, seed, overrides) per child, seeds outermost. Only the first child scores the unedited model: its scores
    depend neither on the row nor on the seed (the record order and context templates change the edits only)."""
    common = ["--data.offset", str(args.offset), "--data.limit", str(args.limit),
              "--data.batch_size", str(args.batch_size)]
    if args.no_generations:
        common += ["--model.method.init_args.evaluator.fluency", "false",
                   "--model.method.init_args.evaluator.free_generation", "false"]
    if args.curve_every:
        if args.curve_every % args.batch_size:
            raise SystemExit(f"--curve-every {args.curve_every}: must be a multiple of --batch_size {args.batch_size}")
        steps = str(args.curve_every // args.batch_size)
        common += ["--model.eval_every_n_steps", steps, "--trainer.callbacks+=lit_edit.monitor.Monitor",
                   "--trainer.callbacks.every_n_steps", steps]
        if args.drift_text:
            common += ["--trainer.callbacks.text.dataset", args.drift_text,
                       "--trainer.callbacks.text.text_field", args.drift_field]
        elif args.model != "world:deep":
            raise SystemExit("--curve-every on a real model needs --drift-text FILE (held-out text for the drift "
                             "perplexity and top-1 agreement), e.g. ../shared/data/unke.json --drift-field answer")
    common += shlex.split(args.extra)
    todo = []
    for seed in args.seeds or [None]:
        seeded = [] if seed is None else ["--seed_everything", str(seed), "--model.context_seed", str(seed),
                                          "--data.order_seed", str(seed)]
        for name in args.rows:
            if name not in rows:
                raise SystemExit(f"--rows {name}: no config for it with --model {args.model} --dataset "
                                 f"{args.dataset}; available: {sorted(rows)}")
            pre = [] if not todo else ["--model.eval_pre", "false"]
            todo.append((name, seed, [*common, *seeded, *pre]))
    return todo


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="world:deep", choices=MODELS)
    ap.add_argument("--dataset", default="counterfact", choices=sorted(KEYS),
                    help="real models: which configs (<row>_<dataset>.yaml); the world has its own stream")
    ap.add_argument("--rows", nargs="+", default=["alphaedit", "metake", "key_only", "stop_grad"])
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds of the context templates and record order")
    ap.add_argument("--jobs", type=int, default=1, help="children at once")
    ap.add_argument("--no-generations", action="store_true",
                    help="leave out sampled generations (fluency, free generation): minutes per record on a CPU")
    ap.add_argument("--curve-every", type=int, default=0, metavar="EDITS",
                    help="the retention curve (all live edits) and the monitor's drift every EDITS edits")
    ap.add_argument("--drift-text", help="local text/JSON file of held-out text for the drift (real models)")
    ap.add_argument("--drift-field", default="text", help="its text field (e.g. answer for unke.json)")
    ap.add_argument("--extra", default="", help="further overrides for every row (one string, shell-quoted)")
    ap.add_argument("--tag", default="main", help="the docs block the rows go to")
    ap.add_argument("--write", action="store_true", help="write the rows into docs/results.md")
    ap.add_argument("--keep", type=Path, help="keep every run's directory (metrics.json, scores.jsonl, edits.jsonl) "
                    "under this folder instead of a temporary one, e.g. for benchmarks/realisation_bins.py later")
    args = ap.parse_args(argv)
    if args.model == "world:deep" and args.dataset != "counterfact":
        ap.error("--dataset: the deep world has its own stream")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    keys = KEYS[args.dataset] if args.model != "world:deep" else KEYS["counterfact"][:3]
    rows = rows_for(args.model, args.dataset)
    todo = plan(args, rows)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/method_compare.py", *(argv or sys.argv[1:])])
    env = None
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    label_extra = f" + `{args.extra}`" if args.extra else ""
    results: dict[tuple[str, int | None], dict] = {}
    if args.keep is not None:  # each run's directory must be new: fit_child reads the one metrics.json under it
        taken = sorted({str(Path("" if s is None else f"seed{s}") / n) for n, s, _ in todo
                        if (args.keep / ("" if s is None else f"seed{s}") / n).exists()})
        if taken:
            ap.error(f"--keep {args.keep}: already holds {', '.join(taken)} from an earlier run; give a new folder")
    with (tempfile.TemporaryDirectory() if args.keep is None else contextlib.nullcontext(args.keep)) as tmp, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        seed_dir = lambda seed: Path(tmp) / ("" if seed is None else f"seed{seed}")  # noqa: E731
        futures = {pool.submit(run_row, name, rows[name], extra, seed_dir(seed), keys, env, label_extra,
                               args.batch_size): (name, seed) for name, seed, extra in todo}
        for fut in concurrent.futures.as_completed(futures):
            name, seed = futures[fut]
            row = results[(name, seed)] = {**fut.result(), "seed": seed}
            print(f"ROW {json.dumps({k: v for k, v in row.items() if k not in ('bins', 'curve')})}", flush=True)
            if row.get("bins"):
                print(row["bins"], flush=True)
    runs = [results[(name, seed)] for name, seed, _ in todo]
    table_rows = [r for r in [pre_row(runs, keys)] if r] + [
        aggregate([r for r in runs if r["name"] == name], keys) for name in args.rows]
    print(table(table_rows, keys))
    curves = curve_table(runs, keys)
    if curves:
        print(curves)
    summary = " ".join(f"{r['name']}_{k}={r[k][0]:.2f}" for r in table_rows for k in keys if r[k][0] is not None)
    print(f"RESULT {summary}")
    if args.write:
        bins = [f"{r['label']}{'' if r['seed'] is None else ' (seed %d)' % r['seed']}:\n\n```\n{r['bins']}\n```"
                for r in runs if r.get("bins")]
        write_block("method_compare", args.tag, command, [table(table_rows, keys), *([curves] if curves else []),
                                                          *bins])
    return table_rows


if __name__ == "__main__":
    main()
