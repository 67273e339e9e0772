"""Edits per second of the batched v* optimisation vs a per-request loop (the reference repos' way).

Same model (the fact world), same requests, same hyper-parameters; prints both throughputs,
their ratio and the largest relative difference between the two sets of targets.

    python benchmarks/edit_throughput.py [--world default] [--n 40] [--steps 20] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import lit_edit  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its thread pool)
import torch

from lit_edit.data import read_requests
from lit_edit.layouts import get_layout
from lit_edit.models import generate_context_templates, load_model
from lit_edit.targets import TargetConfig, compute_targets, compute_targets_reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="default")
    ap.add_argument("--n", type=int, default=40, help="requests")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model, tok, _ = load_model(f"world:{args.world}", args.dtype)
    model.to(args.device).requires_grad_(False).eval()
    layout = get_layout(model)
    requests = read_requests("world", f"world:{args.world}", limit=args.n)
    ctx = generate_context_templates(model, tok, [[10, 5]], seed=0)
    # early stop off so both do the same number of iterations and the timing compares like with like
    cfg = TargetConfig(v_num_grad_steps=args.steps, early_stop_loss=0.0)

    compute_targets(model, tok, layout, args.layer, requests[:2], ctx, cfg)  # warm-up
    t0 = time.perf_counter()
    batched = compute_targets(model, tok, layout, args.layer, requests, ctx, cfg).v_star
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = compute_targets_reference(model, tok, layout, args.layer, requests, ctx, cfg)
    t_ref = time.perf_counter() - t0

    rel = ((batched - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    eps_b, eps_r = len(requests) / t_batched, len(requests) / t_ref
    print(f"device={args.device} dtype={args.dtype} requests={len(requests)} steps={args.steps}")
    print(f"batched:     {t_batched:8.2f} s  {eps_b:8.2f} edits/s")
    print(f"per-request: {t_ref:8.2f} s  {eps_r:8.2f} edits/s")
    print(f"speed-up {eps_b / eps_r:.2f}x, max relative difference of v* {rel:.2e}")
    print(f"RESULT batched_edits_per_s={eps_b:.3f} reference_edits_per_s={eps_r:.3f} speedup={eps_b / eps_r:.3f} "
          f"max_rel_diff={rel:.3e} n={len(requests)} steps={args.steps} device={args.device} dtype={args.dtype}")


if __name__ == "__main__":
    main()
