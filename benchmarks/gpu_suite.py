"""One edit step at real model shapes on an accelerator: GPT2-XL, GPT-J-6B and Llama-3-8B, randomly initialised
from their configs (no hub access), on one batch of synthetic CounterFact-style requests.

Per model, in one process: the batched v* (lit_edit/targets.py, truncated forward) and the per-request v* loop with the
plain full forward (the reference repos' way) on the first ``--ref_n`` requests, whose targets must agree to 1e-3
(relative) in float32 (in bf16 the two loops' different batch shapes round differently: 1e-2 to 1e-1 measured on
random GPT-J / Llama shapes, docs/results.md §7.3); the closed-form write of the batch (MEMIT at the model's published layers, keys and states included);
MetaKE's refinement of the same targets (T steps); edits per second without and with MetaKE; and the peak accelerator
memory of each phase. A random model never reaches v*'s early-stop loss, so every request takes all its steps.

    python benchmarks/gpu_suite.py                                   # all three, 100 requests (GPU)
    python benchmarks/gpu_suite.py --models llama3-8b --n 100 --chunk 50     # 50 requests per forward (v* and MetaKE)
    python benchmarks/gpu_suite.py --tiny                            # small shapes: the CPU smoke test

Prints one ``MODEL`` line per model and ends with one ``RESULT`` line.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import lit_edit  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its thread pool)
import torch
import transformers as T

from lit_edit.editing import FactColumns, apply_batch
from lit_edit.layouts import get_layout, weight_shape
from lit_edit.metake import MetaKEConfig, refine_targets
from lit_edit.models import generate_context_templates
from lit_edit.requests import EditRequest
from lit_edit.solvers import MEMIT
from lit_edit.targets import TargetConfig, compute_targets, compute_targets_reference

# The published shapes (config.json of each hub model), the layers the MEMIT/AlphaEdit configs edit, their v* steps,
# and the dtype each family is run in (bf16 for the families trained in it).
MODELS = {
    "gpt2-xl": dict(cls=T.GPT2Config, dtype="float32", layers=[13, 14, 15, 16, 17], steps=20,
                    config=dict(n_layer=48, n_embd=1600, n_head=25, n_inner=6400, vocab_size=50257, n_positions=1024)),
    "gpt-j-6b": dict(cls=T.GPTJConfig, dtype="bfloat16", layers=[3, 4, 5, 6, 7, 8], steps=25,
                     config=dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_inner=16384, vocab_size=50400,
                                 n_positions=2048)),
    "llama3-8b": dict(cls=T.LlamaConfig, dtype="bfloat16", layers=[4, 5, 6, 7, 8], steps=25,
                      config=dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=8192, rope_theta=500000.0)),
}
# --tiny: the same families a few hundred times smaller (same code paths), float32 so that v* matches closely on CPU
TINY = {
    "gpt2-xl": dict(n_layer=6, n_embd=64, n_head=4, n_inner=256, vocab_size=2000, n_positions=128, bos_token_id=0,
                    eos_token_id=0),
    "gpt-j-6b": dict(n_layer=6, n_embd=64, n_head=4, rotary_dim=8, n_inner=256, vocab_size=2000, n_positions=128,
                     bos_token_id=0, eos_token_id=0),
    "llama3-8b": dict(num_hidden_layers=6, hidden_size=64, intermediate_size=224, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2000, max_position_embeddings=128),
}
TINY_LAYERS = [1, 2]

RELATIONS = ["{} is a citizen of", "The mother tongue of {} is", "{} works in the field of", "{} was developed by",
             "{}, which is located in", "{} plays the position of", "The headquarters of {} is in",
             "{} was originally aired on", "{} is affiliated with the religion of", "{} was born in"]
WORDS = ("north river stone field green castle silver harbor ocean valley mountain garden forest island summer winter "
         "music science history nation empire market bridge tower station city village language french german "
         "italian spanish english japanese physics chemistry biology football guitar piano violin drums london paris "
         "berlin rome madrid tokyo canada brazil india china apple google microsoft nokia sony toyota").split()


def synthetic_requests(n: int, seed: int = 0) -> list[EditRequest]:
    """CounterFact-like records: a two-word subject, one of CounterFact's relation templates, one- or two-word
    objects."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        subject = f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()}{i}"
        new, true = (" ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 1, 2)))) for _ in range(2))
        out.append(EditRequest(i, rng.choice(RELATIONS), subject, new, true))
    return out


def tokenizer_for(requests: list[EditRequest], vocab: int):
    """A byte-level BPE trained on the requests' own text: word-sized tokens, as a real tokenizer gives them."""
    from lit_edit.world import train_tokenizer

    texts = [r.prompt.format(r.subject) + " " + r.target_new + " " + (r.target_true or "") for r in requests]
    return train_tokenizer(texts * 20 + [" ".join(WORDS)] * 20, min(vocab, 4000))


def peak_gb(dev) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def timed(dev, fn):
    """(result, seconds, peak accelerator memory in GiB during the call); the result is None on running out of it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        out = None
        torch.cuda.empty_cache()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t, peak_gb(dev)


def phase(model: str, **values) -> None:
    """One ``PHASE`` line as soon as a phase ends: what a run cut short by a time limit still reports."""
    print(f"PHASE model={model} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in values.items()), flush=True)


def run_model(name: str, args, dev) -> dict:
    spec = MODELS[name]
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else spec["dtype"]))
    layers = TINY_LAYERS if args.tiny else spec["layers"]
    config = spec["cls"](**(TINY[name] if args.tiny else spec["config"]))
    torch.manual_seed(0)
    with torch.device(dev):  # built on the accelerator: no 30 GB host-side initialisation
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    layout = get_layout(model)
    requests = synthetic_requests(args.n)
    tok = tokenizer_for(requests, config.vocab_size)
    ctx = generate_context_templates(model, tok, [[10, 5]], seed=0)
    steps = args.steps or spec["steps"]
    cfg = TargetConfig(v_num_grad_steps=steps, early_stop_loss=0.0, clamp_norm_factor=4.0, chunk_size=args.chunk)
    L = layers[-1]

    weights_gb = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    # warm-up (CUDA context, cuBLAS handles, the allocator's first blocks): two iterations on two requests, untimed
    compute_targets(model, tok, layout, L, requests[:2], ctx, replace(cfg, v_num_grad_steps=2))
    phase(name, weights_gb=weights_gb, params_b=sum(p.numel() for p in model.parameters()) / 1e9)

    def fitting(what: str, fn):
        """fn(cfg) timed; on running out of accelerator memory, again with half as many requests per forward (the
        result does not depend on it)."""
        nonlocal cfg
        while True:
            out, secs, mem = timed(dev, lambda: fn(cfg))
            if out is not None or (cfg.chunk_size or args.n) <= 1:
                return out, secs, mem
            cfg = replace(cfg, chunk_size=max(1, (cfg.chunk_size or args.n) // 2))
            phase(name, **{f"{what}_oom_retry_chunk": cfg.chunk_size})

    res, t_v, mem_v = fitting("vstar", lambda c: compute_targets(model, tok, layout, L, requests, ctx, c))
    if res is None:
        raise SystemExit(f"{name}: v* ran out of accelerator memory at one request per forward")
    phase(name, vstar_s=t_v, peak_vstar_gb=mem_v, chunk=cfg.chunk_size)
    ref, t_r, mem_r = timed(dev, lambda: compute_targets_reference(model, tok, layout, L, requests[: args.ref_n], ctx,
                                                                   cfg))
    V = res.v_star
    rel = ((V[: args.ref_n] - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    phase(name, ref_s=t_r, ref_n=args.ref_n, max_rel_diff=rel)
    tf32 = {}
    # (under --matmul_precision high the whole run is already TF32: nothing to compare)
    if args.tf32 and args.matmul_precision == "highest" and dtype == torch.float32 and dev.type == "cuda":
        # the same v* with TF32 tensor-core matrix products (10-bit mantissa; PyTorch's default and the reference
        # repos' is full float32): what the float32 families gain from it, and how far their targets move
        torch.set_float32_matmul_precision("high")
        try:
            res32, t32, _ = timed(dev, lambda: compute_targets(model, tok, layout, L, requests, ctx, cfg))
        finally:
            torch.set_float32_matmul_precision(args.matmul_precision)
        if res32 is not None:
            rel32 = ((res32.v_star - V).norm(dim=-1) / V.norm(dim=-1)).max().item()
            tf32 = dict(vstar_tf32_s=t32, tf32_rel_diff=rel32)
            phase(name, **tf32)

    g = torch.Generator(device="cpu").manual_seed(0)
    C0 = {}
    for l in layers:  # an SPD second moment of the key width (the solve's cost does not depend on its values)
        d_in = weight_shape(model, layout, l)[1]
        U = torch.randn(d_in, 64, generator=g, dtype=torch.float64).to(dev) / 8
        C0[l] = torch.eye(d_in, dtype=torch.float64, device=dev) + U @ U.T
    solver = MEMIT(mom2_update_weight=15000.0)
    solver.setup(C0)

    def refine(c):
        with torch.enable_grad():
            return refine_targets(model, tok, layout, solver, layers, requests, ctx, V, c, MetaKEConfig(T=args.T))
    ref_meta, t_m, mem_m = fitting("metake", refine)  # before the write: the solver and weights are the pre-batch ones
    phase(name, metake_s=t_m, peak_metake_gb=mem_m, chunk=cfg.chunk_size)

    cols = FactColumns(tok, requests, ctx, cfg.fact_token)
    _, t_s, mem_s = timed(dev, lambda: apply_batch(model, layout, solver, layers, requests, V, cols))
    phase(name, solve_s=t_s, peak_solve_gb=mem_s)

    n = len(requests)
    out = dict(model=name, dtype=str(dtype).replace("torch.", ""), n=n, steps=steps, chunk=cfg.chunk_size, vstar_s=t_v,
               vstar_edits_per_s=n / t_v, ref_edits_per_s=args.ref_n / t_r,
               vstar_speedup=(n / t_v) / (args.ref_n / t_r),
               max_rel_diff=rel, solve_s=t_s, edits_per_s=n / (t_v + t_s),
               metake_s=t_m if ref_meta is not None else float("nan"),
               metake_overhead=(t_v + t_s + t_m) / (t_v + t_s) if ref_meta is not None else float("nan"),
               metake_edits_per_s=n / (t_v + t_s + t_m) if ref_meta is not None else float("nan"),
               peak_vstar_gb=mem_v, peak_ref_gb=mem_r, peak_metake_gb=mem_m, peak_solve_gb=mem_s,
               metake_oom=ref_meta is None, **tf32)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--n", type=int, default=100, help="requests in the batch")
    p.add_argument("--ref_n", type=int, default=10, help="requests the per-request loop optimises (it is linear in n)")
    p.add_argument("--steps", type=int, default=0, help="v* iterations (0: the model's published setting)")
    p.add_argument("--T", type=int, default=15, help="MetaKE refinement steps")
    p.add_argument("--chunk", type=int, default=0, help="requests per forward in v* and MetaKE (0: all; all 100 fit on an "
                   "H200: 62 GB peak for Llama-3-8B; halved automatically on running out of memory)")
    p.add_argument("--tiny", action="store_true", help="small shapes (default on a machine without CUDA)")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                   help="the model's dtype (default: the family's published one; float32 at --tiny)")
    p.add_argument("--tf32", action="store_true", help="also time v* of the float32 families with TF32 matrix products")
    p.add_argument("--matmul_precision", default="highest", choices=["highest", "high"],
                   help="torch.set_float32_matmul_precision for the whole run, both loops ('high': TF32 products)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    args.tiny = args.tiny or dev.type != "cuda"
    args.ref_n = min(args.ref_n, args.n)
    results = []
    for name in args.models:
        r = run_model(name, args, dev)
        if dev.type == "cuda":  # the model and its solver state are gone with run_model's frame
            torch.cuda.empty_cache()
        results.append(r)
        print("MODEL " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
    print("RESULT " + " ".join(
        f"{r['model']}:vstar_speedup={r['vstar_speedup']:.3g},max_rel_diff={r['max_rel_diff']:.1e},"
        f"vstar_s={r['vstar_s']:.3g},solve_s={r['solve_s']:.3g},metake_overhead={r['metake_overhead']:.3g},"
        f"edits_per_s={r['edits_per_s']:.3g},metake_edits_per_s={r['metake_edits_per_s']:.3g},"
        f"peak_gb={max(r['peak_vstar_gb'], r['peak_metake_gb'], r['peak_solve_gb']):.3g}" for r in results)
        + f" n={args.n} device={dev.type} tiny={args.tiny} matmul_precision={args.matmul_precision}")
    return results


if __name__ == "__main__":
    main()
