"""μKE against AnyEdit and One-for-All by answer length, independent and sequential: on the deep world (issue 19 b,
docs/results.md §9.4) and on a real instruct model's long-form benchmarks (issue 30 (3), docs/results.md §11).

Each (method, protocol) is one ``train.py fit`` in its own child process, one after the other, on the same records,
without callbacks and without evaluation during the run. ``--model`` picks the records and configs:

* a world preset (``world:deep``, the default): the world's long-form records (``world_long``: biographies with
  counterfactual facts, 10–60 tokens), the shipped ``configs/world/{muke,anyedit,one_for_all}.yaml`` with the world
  and ``--layers`` set here.
* ``smollm2-135m``: ``configs/<model>/<dataset>_muke.yaml`` (``--dataset unke | akew | editeverything``: UnKEBench,
  AKEW's unstructured MQuAKE-CF facts, EditEverything), prompts in the model's own chat template; AnyEdit and
  One-for-All are the same config with ``model.method.init_args.method`` set, so every setting but the method is
  shared. ``--offset`` / ``--limit`` pick the records (the configs' 100–299 are the reported ones; 0–99 are for
  choosing settings).

Protocols:

* ``independent`` — the μKE paper's protocol (and EasyEdit's): batches of 1, each edit scored right after its write
  and then rolled back (``model.protocol: independent``).
* ``sequential`` — batches of ``--seq-batch-size`` (4), every edit kept and scored on the final model.

The unedited model is scored once, by the first run (the ``pre-edit`` row); the others run with
``--model.eval_pre false``. Printed per run: ``metrics.json``'s BLEU / ROUGE-L (percent) on the question and on its
paraphrases, the same two per answer-length bin (answer tokens in the model's tokenizer; a real dataset's bins are
the quartiles of its answer lengths) from ``scores.jsonl``, the
records that came back word for word (BLEU 100) and those with nothing right (BLEU 0), the mean final window loss
(``target_loss``, ``edits.jsonl``), and per EditEverything category when the records have one. With ``--write`` the
table, with the exact command, replaces the block between ``<!-- longform_compare:<tag> -->`` markers in
docs/results.md.

    python benchmarks/longform_compare.py --model world:deep --layers "[1, 2]" --limit 40 --write
    python benchmarks/longform_compare.py --protocols sequential --methods muke anyedit   # a subset
    python benchmarks/longform_compare.py --model smollm2-135m --dataset unke --offset 100 --limit 20   # issue 30 (3)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_compare import ROOT, find, fit_child, write_block  # noqa: E402  (one child-fit runner, one docs writer)

METHODS = {"muke": "μKE", "anyedit": "AnyEdit", "one_for_all": "One-for-All"}
PROTOCOLS = ("independent", "sequential")
REAL_MODELS = ("smollm2-135m",)  # the instruct model with a chat template (Gemma-3-270M is a base model)
DATASETS = ("unke", "akew", "editeverything")
KEYS = ("bleu", "rouge_l", "para.bleu", "para.rouge_l")
WORLD_BINS = [10, 25, 40]  # answer-token edges for the world's 10-60-token biographies; a real set: its quartiles


def length_bins(edges: list[int]) -> list[tuple[int, int]]:
    """[(lo, hi), ...] inclusive token ranges between consecutive edges (the last bin open above)."""
    return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])] + [(edges[-1], 10**9)]


def quartile_edges(lengths: list[int]) -> list[int]:
    """Lower edges of four bins holding about a quarter of the answers each (repeated edges merged)."""
    xs = sorted(lengths)
    return sorted({xs[0], *(xs[len(xs) * q // 4] for q in (1, 2, 3))}) if xs else [1]


def by_length(records: list[dict], bins: list[tuple[int, int]]) -> list[dict]:
    """Per bin: n and the mean BLEU / ROUGE-L of the records whose answer has that many tokens."""
    out = []
    for lo, hi in bins:
        rows = [r for r in records if lo <= r["answer_tokens"] <= hi]
        mean = lambda k: sum(r[k] for r in rows) / len(rows) if rows else None  # noqa: E731
        out.append({"lo": lo, "hi": hi, "n": len(rows), "bleu": mean("bleu"), "rouge_l": mean("rouge_l")})
    return out


def by_category(records: list[dict]) -> dict[str, dict]:
    """Per EditEverything category (records without one: none): n and the mean BLEU / ROUGE-L."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("category"):
            c = out.setdefault(r["category"], {"n": 0, "bleu": 0.0, "rouge_l": 0.0})
            c["n"] += 1
            c["bleu"] += r["bleu"]
            c["rouge_l"] += r["rouge_l"]
    return {k: {"n": c["n"], "bleu": c["bleu"] / c["n"], "rouge_l": c["rouge_l"] / c["n"]} for k, c in sorted(out.items())}


def plan(a) -> list[tuple[str, str, str, list[str]]]:
    """(method, protocol, config, overrides) per child, protocols outermost. Only the first child scores the unedited
    model: its scores depend neither on the method nor on the protocol."""
    world = a.model.startswith("world")
    if world:
        if a.dataset is not None:
            raise SystemExit(f"--dataset {a.dataset}: a world's long-form records are its own; --dataset is for "
                             f"--model {' | '.join(REAL_MODELS)}")
        common = ["--model.model", a.model, "--data.path", a.model, "--model.layers", a.layers or "[1, 2]"]
    else:
        if a.model not in REAL_MODELS:
            raise SystemExit(f"--model {a.model}: a world preset (world:deep) or one of {', '.join(REAL_MODELS)}")
        if a.layers is not None:
            raise SystemExit(f"--layers {a.layers}: a real model's layers are its config's (configs/{a.model}/)")
        if a.dataset is None:
            raise SystemExit(f"--model {a.model} needs --dataset {' | '.join(DATASETS)}")
        common = []
    if a.offset is not None:
        common += ["--data.offset", str(a.offset)]
    common += ["--data.limit", str(a.limit), *shlex.split(a.extra)]
    protocol_args = {"independent": ["--model.protocol", "independent", "--data.batch_size", "1"],
                     "sequential": ["--model.protocol", "sequential", "--data.batch_size", str(a.seq_batch_size)]}
    todo = []
    for protocol in a.protocols:
        for method in a.methods:
            if world:
                config, chosen = f"configs/world/{method}.yaml", []
            else:
                config, chosen = f"configs/{a.model}/{a.dataset}_muke.yaml", ["--model.method.init_args.method", method]
                if not (ROOT / config).is_file():
                    raise SystemExit(f"--model {a.model} --dataset {a.dataset}: no config {config}")
            pre = [] if not todo else ["--model.eval_pre", "false"]
            todo.append((method, protocol, config, [*chosen, *common, *protocol_args[protocol], *pre]))
    return todo


def run(method: str, protocol: str, config: str, overrides: list[str], out: Path) -> dict:
    metrics, wall = fit_child(config, overrides, out / f"{method}_{protocol}", f"{method} {protocol}")
    doc = json.loads(metrics.read_text())
    records = [json.loads(x) for x in (metrics.parent / "scores.jsonl").read_text().splitlines()]
    edits = [json.loads(x) for x in (metrics.parent / "edits.jsonl").read_text().splitlines()]
    losses = [e["target_loss"] for e in edits if e.get("target_loss") is not None]
    return {"method": method, "protocol": protocol, "wall_s": round(wall, 1), "n": doc.get("n_edits"),
            **{k: find(doc, k) for k in KEYS}, **{f"pre.{k}": find(doc, f"pre.{k}") for k in KEYS},
            "exact": sum(r["bleu"] >= 99.99 for r in records), "zero": sum(r["bleu"] <= 0.01 for r in records),
            "target_loss": sum(losses) / len(losses) if losses else None,
            "records": [{k: r.get(k) for k in ("bleu", "rouge_l", "answer_tokens", "category")} for r in records]}


def table(rows: list[dict], bins) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    rng = lambda b: f"{b[0]}–{b[1]}" if b[1] < 10**9 else f"≥ {b[0]}"  # noqa: E731
    head = ("| method | protocol | edits | BLEU | ROUGE-L | para BLEU | para ROUGE-L | BLEU by answer length "
            f"{' / '.join(rng(b) for b in bins)} tokens | ROUGE-L by length | BLEU 100 / 0 | window loss | wall |")
    lines = [head, "|" + "---|" * 12]
    if rows and rows[0].get("pre.bleu") is not None:
        r = rows[0]
        lines.append(f"| pre-edit | | | {fmt(r['pre.bleu'])} | {fmt(r['pre.rouge_l'])} | {fmt(r['pre.para.bleu'])} "
                     f"| {fmt(r['pre.para.rouge_l'])} | | | | | |")
    for r in rows:
        n = " / ".join(str(b["n"]) for b in r["bins"])
        lines.append(f"| {METHODS[r['method']]} | {r['protocol']} | {r['n']} | {fmt(r['bleu'])} | {fmt(r['rouge_l'])} "
                     f"| {fmt(r['para.bleu'])} | {fmt(r['para.rouge_l'])} "
                     f"| {' / '.join(fmt(b['bleu']) for b in r['bins'])} (n = {n}) "
                     f"| {' / '.join(fmt(b['rouge_l']) for b in r['bins'])} | {r['exact']} / {r['zero']} "
                     f"| {fmt(r['target_loss'])} | {r['wall_s']:.0f} s |")
    cats = sorted({c for r in rows for c in r.get("categories", {})})
    if cats:  # EditEverything: BLEU / ROUGE-L per category
        lines += ["", "| method | protocol | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
        for r in rows:
            cells = [(lambda c: f"{c['bleu']:.2f} / {c['rouge_l']:.2f} (n = {c['n']})")(r["categories"][k])
                     if k in r["categories"] else "–" for k in cats]
            lines.append(f"| {METHODS[r['method']]} | {r['protocol']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--world", dest="model", default="world:deep",
                    help=f"a world preset (its model and long-form records) or {' | '.join(REAL_MODELS)}")
    ap.add_argument("--dataset", choices=DATASETS, help="a real model's records (configs/<model>/<dataset>_muke.yaml)")
    ap.add_argument("--layers", help="a world's model.layers (default [1, 2], the deep world's)")
    ap.add_argument("--offset", type=int, help="data.offset (default: the config's)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--seq-batch-size", type=int, default=4, help="the sequential protocol's batch size")
    ap.add_argument("--bins", type=int, nargs="+", help="lower edges of the answer-length bins (default: a world "
                    f"{WORLD_BINS}, a real dataset the quartiles of its records' answer lengths)")
    ap.add_argument("--extra", default="", help="further overrides for every run (one string, shell-quoted)")
    ap.add_argument("--tag", default="main")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep every run's directory (metrics.json, scores.jsonl, edits.jsonl) "
                    "under this folder instead of a temporary one")
    a = ap.parse_args(argv)
    todo = plan(a)
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/longform_compare.py", *(argv or sys.argv[1:])])
    if a.keep is not None:  # each run's directory must be new: fit_child reads the one metrics.json under it
        taken = [f"{m}_{p}" for m, p, _, _ in todo if (a.keep / f"{m}_{p}").exists()]
        if taken:
            ap.error(f"--keep {a.keep}: already holds {', '.join(taken)} from an earlier run; give a new folder")
    rows = []
    with tempfile.TemporaryDirectory() if a.keep is None else contextlib.nullcontext(a.keep) as out:
        out = Path(out)
        for method, protocol, config, overrides in todo:
            row = run(method, protocol, config, overrides, out)
            rows.append(row)
            print(f"ROW {json.dumps({k: v for k, v in row.items() if k != 'records'})}", flush=True)
    edges = a.bins or (WORLD_BINS if a.model.startswith("world") else
                       quartile_edges([r["answer_tokens"] for r in rows[0]["records"]]))
    bins = length_bins(edges)
    for row in rows:
        row["bins"], row["categories"] = by_length(row["records"], bins), by_category(row["records"])
    text = table(rows, bins)
    print(text)
    if a.write:
        write_block("longform_compare", a.tag, command, [text])
    print("RESULT " + " ".join(f"{r['method']}_{r['protocol']}_{k.replace('.', '_')}={r[k]}" for r in rows
                               for k in ("bleu", "rouge_l")))
    return rows


if __name__ == "__main__":
    main()
