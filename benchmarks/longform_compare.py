"""μKE against AnyEdit and One-for-All by answer length, independent and sequential (issue 19 b, docs/results.md §9.2).

Each (method, protocol) is one ``train.py fit`` in its own child process, one after the other, on the same
long-form records of the fact world (``world_long``: biographies with counterfactual facts, 10–60 tokens): the
shipped ``configs/world/{muke,anyedit,one_for_all}.yaml`` with the world, its edited layers and the protocol set
here, without callbacks and without evaluation during the run.

* ``independent`` — the μKE paper's protocol (and EasyEdit's): batches of 1, each edit scored right after its write
  and then rolled back (``model.protocol: independent``).
* ``sequential`` — the configs' batches of 4, every edit kept and scored on the final model.

Printed per run: ``metrics.json``'s BLEU / ROUGE-L (percent) on the question and on its paraphrases, and the same two
per answer-length bin, from ``scores.jsonl`` (each record's scores and ``answer_tokens``). With ``--write`` the
table, with the exact command, replaces the block between ``<!-- longform_compare:<tag> -->`` markers in
docs/results.md.

    python benchmarks/longform_compare.py --world world:deep --layers "[1, 2]" --limit 40 --write
    python benchmarks/longform_compare.py --protocols sequential --methods muke anyedit   # a subset
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
from method_compare import fit_child, write_block  # noqa: E402  (one child-fit runner, one docs writer)

METHODS = {"muke": "μKE", "anyedit": "AnyEdit", "one_for_all": "One-for-All"}
PROTOCOLS = {"independent": ["--model.protocol", "independent", "--data.batch_size", "1"],
             "sequential": ["--model.protocol", "sequential", "--data.batch_size", "4"]}
KEYS = ("bleu", "rouge_l", "para.bleu", "para.rouge_l")


def length_bins(edges: list[int]) -> list[tuple[int, int]]:
    """[(lo, hi), ...] inclusive token ranges between consecutive edges (the last bin open above)."""
    return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])] + [(edges[-1], 10**9)]


def by_length(records: list[dict], bins: list[tuple[int, int]]) -> list[dict]:
    """Per bin: n and the mean BLEU / ROUGE-L of the records whose answer has that many tokens."""
    out = []
    for lo, hi in bins:
        rows = [r for r in records if lo <= r["answer_tokens"] <= hi]
        mean = lambda k: sum(r[k] for r in rows) / len(rows) if rows else None  # noqa: E731
        out.append({"lo": lo, "hi": hi, "n": len(rows), "bleu": mean("bleu"), "rouge_l": mean("rouge_l")})
    return out


def run(method: str, protocol: str, common: list[str], out: Path, bins) -> dict:
    metrics, wall = fit_child(f"configs/world/{method}.yaml", [*common, *PROTOCOLS[protocol]],
                              out / f"{method}_{protocol}", f"{method} {protocol}")
    doc = json.loads(metrics.read_text())
    records = [json.loads(x) for x in (metrics.parent / "scores.jsonl").read_text().splitlines()]
    return {"method": method, "protocol": protocol, "wall_s": round(wall, 1), "n": doc.get("n_edits"),
            **{k: doc.get(k) for k in KEYS}, "bins": by_length(records, bins)}


def table(rows: list[dict], bins) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    rng = lambda b: f"{b[0]}–{b[1]}" if b[1] < 10**9 else f"≥ {b[0]}"  # noqa: E731
    head = ("| method | protocol | edits | BLEU | ROUGE-L | para BLEU | para ROUGE-L | BLEU by answer length "
            f"{' / '.join(rng(b) for b in bins)} tokens | ROUGE-L by length | wall |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        n = " / ".join(str(b["n"]) for b in r["bins"])
        lines.append(f"| {METHODS[r['method']]} | {r['protocol']} | {r['n']} | {fmt(r['bleu'])} | {fmt(r['rouge_l'])} "
                     f"| {fmt(r['para.bleu'])} | {fmt(r['para.rouge_l'])} "
                     f"| {' / '.join(fmt(b['bleu']) for b in r['bins'])} (n = {n}) "
                     f"| {' / '.join(fmt(b['rouge_l']) for b in r['bins'])} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="world:deep", help="the world preset: its model and its long-form records")
    ap.add_argument("--layers", default="[1, 2]", help="model.layers (the configs' [0, 1, 2] are the default world's)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--bins", type=int, nargs="+", default=[10, 25, 40], help="lower edges of the length bins")
    ap.add_argument("--extra", default="", help="further overrides for every run (one string, shell-quoted)")
    ap.add_argument("--tag", default="main")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep every run's directory (metrics.json, scores.jsonl, edits.jsonl) "
                    "under this folder instead of a temporary one")
    a = ap.parse_args()
    bins = length_bins(a.bins)
    common = ["--model.model", a.world, "--data.path", a.world, "--model.layers", a.layers,
              "--data.limit", str(a.limit), *shlex.split(a.extra)]
    command = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/longform_compare.py", *sys.argv[1:]])
    if a.keep is not None:  # each run's directory must be new: fit_child reads the one metrics.json under it
        taken = [f"{m}_{p}" for p in a.protocols for m in a.methods if (a.keep / f"{m}_{p}").exists()]
        if taken:
            ap.error(f"--keep {a.keep}: already holds {', '.join(taken)} from an earlier run; give a new folder")
    rows = []
    with tempfile.TemporaryDirectory() if a.keep is None else contextlib.nullcontext(a.keep) as out:
        out = Path(out)
        for protocol in a.protocols:
            for method in a.methods:
                row = run(method, protocol, common, out, bins)
                rows.append(row)
                print(f"ROW {json.dumps(row)}", flush=True)
    text = table(rows, bins)
    print(text)
    if a.write:
        write_block("longform_compare", a.tag, command, [text])
    print("RESULT " + " ".join(f"{r['method']}_{r['protocol']}_{k.replace('.', '_')}={r[k]}" for r in rows
                               for k in ("bleu", "rouge_l")))


if __name__ == "__main__":
    main()
