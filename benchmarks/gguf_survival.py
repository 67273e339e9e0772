"""Does an edit survive GGUF quantisation? The records of an edit run scored on the edited float model and on its GGUF
exports of each type, each loaded back through transformers' GGUF reader as a user's runtime would read the file.

Input: the F32 GGUF export of an edit run (``--model.export_dir DIR --model.export_format gguf
--model.export_gguf_type F32``), which is the edited float model (to 1e-6, tests/test_gguf_export.py), or the run's
checkpoint (``checkpoints/last.ckpt``: the edited matrices, put into the source's float model), and the run's
config (its model, layers and records). For each type the edited matrices of that model are written into the source
GGUF (lit_edit/gguf_export.py: ``source`` keeps every unedited tensor's bytes), the file is loaded back, and the
run's records are scored (efficacy, generalization, specificity and magnitudes; no generations). Also: how many
records keep their float efficacy outcome per type, the unedited source file's scores, and per edited matrix how much
of the change each file stores is the edit (:func:`realised`).

    python benchmarks/gguf_survival.py --export DIR/…F32.gguf --config configs/smollm2-135m/memit_counterfact.yaml
        (or --checkpoint RUN/checkpoints/last.ckpt)
        [--limit 100] [--types F16 Q8_0 Q4_1 Q4_0 source source+Q8_0]

A type ``A+B`` stores the unedited tensors as ``A`` and the edited ones as ``B`` (``model.export_gguf_edited_type``).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("efficacy", "generalization", "specificity", "efficacy_magnitude", "generalization_magnitude",
        "specificity_magnitude")


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval().requires_grad_(False)


def scores(model, tok, requests) -> list[dict]:
    from lit_edit.metrics import record_scores

    return record_scores(model, tok, requests)


def mean(per: list[dict]) -> dict:
    return {k: 100 * sum(p[k] for p in per if k in p) / max(1, sum(k in p for p in per)) for k in KEYS}


def realised(source: Path, out: Path, weights: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per edited matrix: ‖ΔW‖ / ‖W₀‖ and cos(ΔQ, ΔW), with W₀ the source's (dequantised) matrix, ΔW = W − W₀ the
    edit and ΔQ = Q − W₀ the change the file ``out`` stores: how much of the stored change is the edit."""
    import gguf
    import numpy as np

    from lit_edit.gguf_export import gguf_names

    names = gguf_names(source, list(weights))
    src, got = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (source, out))
    res = {}
    for hf, g in names.items():
        W0, Q = (gguf.quants.dequantize(t[g].data, t[g].tensor_type).astype(np.float64).reshape(-1) for t in (src, got))
        dW = weights[hf].detach().double().reshape(-1).numpy() - W0
        dQ = Q - W0
        res[g] = (float(np.linalg.norm(dW) / np.linalg.norm(W0)),
                  float(dQ @ dW / max(np.linalg.norm(dQ) * np.linalg.norm(dW), 1e-300)))
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", help="the run's F32 GGUF export (the edited float model)")
    ap.add_argument("--checkpoint", help="or the run's checkpoint (its last.ckpt), which holds the edited matrices")
    ap.add_argument("--config", required=True, help="the run's config (model.model, model.layers, data.*)")
    ap.add_argument("--limit", type=int, default=None, help="the run's data.limit, if given on its command line")
    ap.add_argument("--offset", type=int, default=None, help="the run's data.offset, if given on its command line")
    ap.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_1", "Q4_0", "source"])
    args = ap.parse_args(argv)
    if (args.export is None) == (args.checkpoint is None):
        ap.error("give the edited model as one of --export (an F32 GGUF export) or --checkpoint (a run's checkpoint)")

    from lit_edit import sources
    from lit_edit.cli import load_config
    from lit_edit.data import config_requests
    from lit_edit.gguf_export import export_gguf
    from lit_edit.layouts import edited_weights, get_layout
    from lit_edit.models import load_model

    cfg = load_config(ROOT / args.config)
    m, d = cfg["model"], cfg["data"]
    offset = args.offset if args.offset is not None else (d.get("offset") or 0)
    limit = args.limit if args.limit is not None else d.get("limit")
    requests = config_requests(d, ROOT, offset, offset + limit)
    source = sources.gguf_file(m["model"])
    model, tok, _ = load_model(m["model"])
    if args.export:
        edited, label = load_gguf(Path(args.export)), "float (the F32 export)"
    else:  # the run's float model: the source, dequantised, with the checkpoint's edited matrices
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        edited, label = model.eval().requires_grad_(False), "float (the checkpoint's model)"
        for name, w in edited_weights(edited, get_layout(edited), m["layers"]).items():
            if "llm." + name not in state:
                raise SystemExit(f"{args.checkpoint}: no edited matrix llm.{name} (layers {m['layers']} of "
                                 f"{args.config}); is it this config's run?")
            w.copy_(state["llm." + name])
    del model
    weights = edited_weights(edited, get_layout(edited), m["layers"])

    rows = {}
    start = time.perf_counter()
    float_per = scores(edited, tok, requests)
    rows[label] = (mean(float_per), len(requests), "")
    del edited
    cosines = {}
    with tempfile.TemporaryDirectory() as tmp:
        unedited = load_gguf(source)
        size = Path(source).stat().st_size / 2**20
        rows[f"unedited source ({size:.1f} MiB)"] = (mean(scores(unedited, tok, requests)), None, "")
        del unedited
        for qtype in args.types:
            base, _, edited_type = qtype.partition("+")
            out = export_gguf(source, Path(tmp) / f"{qtype}.gguf", weights, base, edited_type or None)
            model = load_gguf(out.path)
            per = scores(model, tok, requests)
            kept = sum(a.get("efficacy") == b.get("efficacy") for a, b in zip(per, float_per))
            note = "; ".join(f"{k}: {v}" for k, v in sorted(out.substituted.items()))
            stored = sorted({out.types[n] for n in out.edited})
            mb = out.path.stat().st_size / 2**20
            rows[f"{qtype} (edited tensors {', '.join(stored)}; {mb:.1f} MiB)"] = (mean(per), kept, note)
            cosines[qtype] = realised(source, out.path, weights)
            del model
            (Path(tmp) / f"{qtype}.gguf").unlink()
    print(f"{len(requests)} records of {args.config} (offset {offset}); {time.perf_counter() - start:.0f} s")
    print("| file | " + " | ".join(KEYS) + " | records with the float efficacy outcome | substituted |")
    print("|---|" + "---|" * (len(KEYS) + 2))
    for name, (vals, kept, note) in rows.items():
        print(f"| {name} | " + " | ".join(f"{vals[k]:.2f}" for k in KEYS) +
              f" | {'' if kept is None else kept} | {note} |")
    if cosines:
        mats = list(next(iter(cosines.values())))
        print("\nthe stored change against the edit, per edited matrix: cos(ΔQ, ΔW) (‖ΔW‖ / ‖W₀‖ "
              + ", ".join(f"{next(iter(cosines.values()))[g][0]:.3f}" for g in mats) + ")")
        print("| type | " + " | ".join(mats) + " |\n|---|" + "---|" * len(mats))
        for qtype, per_mat in cosines.items():
            print(f"| {qtype} | " + " | ".join(f"{per_mat[g][1]:.3f}" for g in mats) + " |")
    result = {name.split(" ")[0]: vals["efficacy"] for name, (vals, _, _) in rows.items()}
    print("RESULT " + " ".join(f"{k}_efficacy={v:.2f}" for k, v in result.items()))
    return rows


if __name__ == "__main__":
    main()
