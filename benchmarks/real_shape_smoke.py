"""Real-shape smoke on CPU: do the code paths hold at real layer sizes?

A randomly initialised model with the shape of a real one (built from a config dict, nothing from a hub; float32,
fixed seed) is saved with ``save_pretrained`` beside the fact world's tokenizer (its ids are a subset of every real
vocabulary here) and edited through the real CLI (``train.py fit``, ``from_pretrained`` on the saved directory):

* C0 from a small local corpus (the tiny world's ``corpus.txt``, ``--n-samples`` texts), computed by the first fit;
* 20 CounterFact-schema requests of the tiny world in 2 steps of 10, AlphaEdit (α = 10, null-space threshold 2e-2)
  with the published v* settings of docs/algorithms.md §10.1 (subject_last, lr 0.5, weight decay 0.5, clamp 0.75,
  KL 0.0625) except ``--v-steps`` inner steps (default 5) so it finishes in minutes; context templates [[10, 2]];
  the evaluator's defaults (free generation on, fluency off: ``--fluency`` adds it);
* a checkpoint after every step;
* then a resume: the run directory is copied, its step-2 checkpoint, ``metrics.json`` and ``scores.jsonl``
  deleted (its ledger lines and solver-ledger shard of step 2 kept, as after a crash right after step 2), and
  ``--ckpt_path .../step=1.ckpt`` redoes step 2. Its step-2 checkpoint's edited weights and solver state (but
  the ledger's directory) must equal the uninterrupted run's bit for bit, and its ``metrics.json`` numbers and
  ``edits.jsonl`` too.

Each fit runs in its own process, which reports its own peak RSS (``ru_maxrss``). Times are the run's TensorBoard
scalars: ``time/{load,c0,solver_setup,pre_eval}_seconds`` at step 0, and per step ``time/targets_seconds`` (v*),
``time/write_seconds`` (keys, the solve and the update, the solver's ledger), ``time/eval_seconds`` (the batch's
scores) and ``time/step_seconds`` (all of it, with the logging). The last line is ``RESULT key=value ...``.

Edited layers: 4–8 for both shapes (of 24 blocks): the layers of the shipped Llama-3-8B and Qwen2.5-7B configs
(docs/algorithms.md §10.1, configs/_base/unke_muke.yaml), lower-middle blocks ending at ROME's GPT-2-medium layer 8.

    python benchmarks/real_shape_smoke.py --shape gpt2-medium          # 24 × 1024, vocab 50257
    python benchmarks/real_shape_smoke.py --shape qwen2.5-0.5b         # 24 × 896 (4864), GQA 14/2, vocab 151936
    python benchmarks/real_shape_smoke.py --shape qwen2.5-0.5b --tiny  # same code path, 2 narrow blocks (the test)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The published configs (openai-community/gpt2-medium, Qwen/Qwen2.5-0.5B config.json), as dicts.
SHAPES = {
    "gpt2-medium": {
        "model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "n_inner": None,
        "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151643,
    },
}
LAYERS = [4, 5, 6, 7, 8]
# --tiny: the same architectures, 2 narrow blocks and the world tokenizer's vocabulary (the test's version)
TINY = {
    "gpt2-medium": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 1000,
                    "bos_token_id": 0, "eos_token_id": 0},
    "qwen2.5-0.5b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 128,
                     "max_window_layers": 2, "bos_token_id": 0, "eos_token_id": 0},
}
TINY_LAYERS = [0, 1]
SETUP = ("load", "c0", "solver_setup", "pre_eval")  # the set-up's phases, time/<phase>_seconds at step 0

# One fit in this process's child: the real CLI, then its own peak RSS (ru_maxrss, KiB on Linux), its CPU time and
# where the peak was (a sampler thread reads VmRSS every 0.2 s and, at each new maximum, the innermost lit_edit frame of
# the main thread) into a file.
RUNNER = """
import json, os, resource, sys, threading, time
import lit_edit
out, args = sys.argv[1], sys.argv[2:]
sys.argv = ["train.py", *args]  # as `python train.py fit ...` sees them
main_id, peak, done = threading.get_ident(), {"kib": 0, "where": ""}, threading.Event()

def where():
    frame, found = sys._current_frames().get(main_id), ""
    while frame is not None and not found:
        name = frame.f_code.co_filename
        if os.sep + "lit_edit" + os.sep in name and os.sep + "site-packages" + os.sep not in name:
            found = name.rsplit(os.sep + "lit_edit" + os.sep, 1)[1] + ":" + frame.f_code.co_name
        frame = frame.f_back
    return found

def sample():
    while not done.wait(0.2):
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
        if kib > peak["kib"]:
            peak.update(kib=kib, where=where())

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
try:
    from lit_edit.cli import main
    main(args)
finally:
    done.set()
    r = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"peak_rss_kib": r.ru_maxrss, "cpu_s": r.ru_utime + r.ru_stime, "wall_s": time.perf_counter() - t0,
               "peak_where": peak["where"]}, open(out, "w"))
"""


def build_model(shape: str, tiny: bool, seed: int, out: Path, world: Path) -> int:
    """The random-init model (float32, ``seed``) and the world's tokenizer in ``out``; returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = {**SHAPES[shape], **(TINY[shape] if tiny else {})}
    cfg = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(world / "model")
    assert len(tok) <= cfg.vocab_size, (len(tok), cfg.vocab_size)
    tok.model_max_length = spec.get("n_positions") or spec["max_position_embeddings"]  # the model's, not the world's
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def config(shape: str, tiny: bool, work: Path, args) -> dict:
    """The run config (laid over configs/_base/counterfact.yaml, the published structured-editing protocol)."""
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}}
    return {
        "base": str(REPO / "configs" / "_base" / "counterfact.yaml"),
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "callbacks": [checkpoint],
                    "logger": {"init_args": {"save_dir": str(work / "runs"), "name": shape, "version": "uninterrupted"}}},
        "model": {
            "model": str(work / "model"),
            "layers": TINY_LAYERS if tiny else LAYERS,
            "solver": {"class_path": "lit_edit.solvers.AlphaEdit", "init_args": {"L2": 10.0, "nullspace_threshold": 2e-2}},
            "method": {"class_path": "lit_edit.methods.VStar",
                       "init_args": {"v_num_grad_steps": args.v_steps, "v_lr": 0.5,
                                     "evaluator": {"fluency": args.fluency}}},
            "stats": {"dataset": str(work / "corpus.txt"), "config_name": None, "n_samples": args.n_samples,
                      "max_length": 1024},
            "context_templates": [[10, 2]],
        },
        "data": {"dataset": "world", "path": str(work / "counterfact.json"), "limit": 20, "batch_size": 10},
    }


def fit(work: Path, name: str, cfg_path: Path, threads: int, extra: list[str] = ()) -> dict:
    """``train.py fit`` in a child process; its peak RSS and wall time. The log goes to ``work/<name>.log``."""
    out = work / f"{name}.rss.json"
    env = {**os.environ, "LIT_EDIT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = work / f"{name}.log"
    cmd = [sys.executable, "-c", RUNNER, str(out), "fit", "--config", str(cfg_path), *extra]
    load = os.getloadavg()[0]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-6000:]
        raise SystemExit(f"fit '{name}' failed (exit {rc}); the end of {log}:\n{tail}")
    return {**json.loads(out.read_text()), "load": (load, os.getloadavg()[0])}  # 1-min load average, start and end


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every TensorBoard events file of the run (a later file wins a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return tags


def checkpoint_parts(path: Path) -> dict:
    """The edited matrices of a checkpoint and the bytes of its parts."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    weights = ck["state_dict"]
    solver = ck["lit_edit"]["solver"]
    if isinstance(solver.get("ledger"), dict):  # the ledger's directory is the run's own: compared without it
        solver["ledger"] = {k: v for k, v in solver["ledger"].items() if k != "dir"}

    def nbytes(tree) -> int:
        if isinstance(tree, torch.Tensor):
            return tree.numel() * tree.element_size()
        if isinstance(tree, dict):
            return sum(nbytes(v) for v in tree.values())
        if isinstance(tree, (list, tuple)):
            return sum(nbytes(v) for v in tree)
        return 0

    return {"weights": weights, "solver": solver, "file": path.stat().st_size, "weight_bytes": nbytes(weights),
            "solver_bytes": nbytes(solver)}


def same_tree(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def numbers(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mb(x: float) -> str:
    return f"{x / 2**20:,.1f} MB"


def describe(fit: dict) -> str:
    return (f"{fit['wall_s']:.1f} s wall, {fit['cpu_s']:.1f} s CPU, peak RSS {mb(fit['peak_rss_kib'] * 1024)} (sampled at "
            f"{fit['peak_where'] or '?'}), load average {fit['load'][0]:.2f} -> {fit['load'][1]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-medium")
    ap.add_argument("--tiny", action="store_true", help="2 narrow blocks of the same architecture (seconds)")
    ap.add_argument("--v-steps", type=int, default=5, help="v* inner steps (published: 20 GPT-2 XL, 25 others)")
    ap.add_argument("--n-samples", type=int, default=2000, help="C0 texts (the tiny world's corpus has 1552)")
    ap.add_argument("--fluency", action="store_true", help="also the fluency metric (sampled generations)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    import lit_edit  # noqa: F401  (OMP_WAIT_POLICY before torch)
    import yaml
    from lit_edit.world import ensure_world

    work = args.work or Path(tempfile.mkdtemp(prefix=f"real_shape_{args.shape}_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        world = ensure_world("tiny", verbose=False)
        shutil.copy(world / "corpus.txt", work / "corpus.txt")
        shutil.copy(world / "counterfact.json", work / "counterfact.json")
        t0 = time.perf_counter()
        n_params = build_model(args.shape, args.tiny, args.seed, work / "model", world)
        build_s = time.perf_counter() - t0
        model_bytes = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
        cfg_path = work / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(config(args.shape, args.tiny, work, args), sort_keys=False))
        print(f"{args.shape}{' (tiny)' if args.tiny else ''}: {n_params / 1e6:.1f}M parameters, "
              f"{mb(model_bytes)} of safetensors (built in {build_s:.1f} s), layers {TINY_LAYERS if args.tiny else LAYERS}, "
              f"{args.threads} thread(s), work directory {work}", flush=True)

        run_a = work / "runs" / args.shape / "uninterrupted"
        a = fit(work, "uninterrupted", cfg_path, args.threads)
        print(f"uninterrupted fit: {describe(a)}", flush=True)

        run_b = work / "runs" / args.shape / "resumed"  # the same run directory, as a crash right after step 2 left it
        shutil.copytree(run_a, run_b)
        for name in ("checkpoints/step=2.ckpt", "metrics.json", "scores.jsonl"):
            (run_b / name).unlink()
        b = fit(work, "resumed", cfg_path, args.threads, ["--ckpt_path", str(run_b / "checkpoints" / "step=1.ckpt")])
        print(f"resumed fit (step 2 again): {describe(b)}", flush=True)

        tags = scalars(run_a)
        at = lambda tag, step: tags.get(tag, {}).get(step, float("nan"))  # noqa: E731
        c1, c2 = checkpoint_parts(run_a / "checkpoints" / "step=1.ckpt"), checkpoint_parts(run_a / "checkpoints" / "step=2.ckpt")
        r2 = checkpoint_parts(run_b / "checkpoints" / "step=2.ckpt")
        weights_equal = same_tree(c2["weights"], r2["weights"])
        solver_equal = same_tree(c2["solver"], r2["solver"])
        diff = max(float((c2["weights"][k] - r2["weights"][k]).abs().max()) for k in c2["weights"])
        ma, mb_ = json.loads((run_a / "metrics.json").read_text()), json.loads((run_b / "metrics.json").read_text())
        metrics_equal = numbers(ma) == numbers(mb_)
        ledger = lambda d: sum(p.stat().st_size for p in (d / "solver_ledger").rglob("*") if p.is_file())  # noqa: E731
        edits_equal = (run_a / "edits.jsonl").read_text() == (run_b / "edits.jsonl").read_text()

        print("\nset-up (uninterrupted fit): load + context templates {:.1f} s, C0 {:.1f} s, solver set-up {:.1f} s, "
              "pre-edit scores {:.1f} s".format(*(at(f"time/{k}_seconds", 0) for k in SETUP)))
        print(f"{'step':>6}{'targets (v*)':>14}{'write':>10}{'eval':>10}{'step':>10}   v* share  nll")
        for s in (1, 2):
            t, w, e, tot = (at(f"time/{k}_seconds", s) for k in ("targets", "write", "eval", "step"))
            print(f"{s:>6}{t:>13.1f}s{w:>9.2f}s{e:>9.1f}s{tot:>9.1f}s   {t / tot:8.2f}  {at('targets/nll', s):.3f}")
        tr = tags.get("time/step_seconds", {})
        print(f"resumed step 2: {scalars(run_b).get('time/step_seconds', {}).get(2, float('nan')):.1f} s "
              f"(uninterrupted {tr.get(2, float('nan')):.1f} s)")
        print(f"checkpoint step=1 {c1['file']:,} B (edited matrices {c1['weight_bytes']:,} B, solver state "
              f"{c1['solver_bytes']:,} B), step=2 {c2['file']:,} B; step 2 / step 1 = {c2['file'] / c1['file']:.4f}")
        print(f"solver ledger {ledger(run_a):,} B after 20 edits; model {model_bytes:,} B")
        print(f"final: efficacy {ma.get('efficacy')} (pre {ma.get('pre.efficacy')}), generalization "
              f"{ma.get('generalization')}, specificity {ma.get('specificity')}, n_edits {ma.get('n_edits')}")
        print(f"resume: step-2 edited weights equal {weights_equal} (max |diff| {diff:.3g}), solver state equal "
              f"{solver_equal}, metrics.json numbers equal {metrics_equal}, edits.jsonl equal {edits_equal}")
        result = {
            "shape": args.shape + ("-tiny" if args.tiny else ""), "params_m": round(n_params / 1e6, 1),
            "layers": "-".join(map(str, TINY_LAYERS if args.tiny else LAYERS)), "v_steps": args.v_steps,
            "threads": args.threads, "fit_s": round(a["wall_s"], 1), "resume_fit_s": round(b["wall_s"], 1),
            "fit_cpu_s": round(a["cpu_s"], 1), "resume_fit_cpu_s": round(b["cpu_s"], 1),
            "load_start": round(a["load"][0], 2), "load_end": round(b["load"][1], 2),
            "peak_at": a["peak_where"] or "?", "resume_peak_at": b["peak_where"] or "?",
            "peak_rss_mb": round(a["peak_rss_kib"] / 1024, 1), "resume_peak_rss_mb": round(b["peak_rss_kib"] / 1024, 1),
            **{f"{k}_s": round(at(f"time/{k}_seconds", 0), 2) for k in SETUP},
            **{f"{k}_s_{s}": round(at(f"time/{k}_seconds", s), 3) for s in (1, 2)
               for k in ("targets", "write", "eval", "step")},
            "ckpt_bytes_1": c1["file"], "ckpt_bytes_2": c2["file"], "ckpt_weight_bytes": c2["weight_bytes"],
            "ckpt_solver_bytes": c2["solver_bytes"], "ledger_bytes": ledger(run_a),
            "efficacy": ma.get("efficacy"), "pre_efficacy": ma.get("pre.efficacy"),
            "resume_weights_equal": weights_equal, "resume_solver_equal": solver_equal,
            "resume_metrics_equal": metrics_equal, "resume_edits_equal": edits_equal,
        }
        print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        if not (weights_equal and solver_equal and metrics_equal and edits_equal):
            raise SystemExit("the resumed run differs from the uninterrupted one")
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
