"""Edits per second of the batched v* optimisation vs a per-request loop (the reference repos' way).

Same model (the fact world), same requests, same hyper-parameters, in one process, one after the other: the batched
loop as it runs (blocks below the edited one computed once, logits read only where scored, rows grouped by length:
lit_edit/truncated.py), the same batched loop with the plain full forward (``reference_forward``: every block, every
logit, one padded batch), and the per-request loop with the full forward. Prints the throughputs (wall clock, and
the process's CPU time, which other processes on a shared machine disturb less), the ratios, the largest relative
difference between the batched and the per-request targets, and the share of padding in the batched forwards.

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
from lit_edit.targets import TargetConfig, build_target_batch, compute_targets, compute_targets_reference
from lit_edit.truncated import length_groups, padded_fraction, reference_forward


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


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
    run = lambda: compute_targets(model, tok, layout, args.layer, requests, ctx, cfg).v_star  # noqa: E731
    batched, t_b, c_b = timed(run)
    with reference_forward():
        full, t_f, c_f = timed(run)
    reference, t_r, c_r = timed(lambda: compute_targets_reference(model, tok, layout, args.layer, requests, ctx, cfg))

    rel = lambda a: ((a - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()  # noqa: E731
    n = len(requests)
    lengths = build_target_batch(tok, requests, ctx, cfg).mask.sum(1)  # every row of the first iteration
    pad_before, pad_after = padded_fraction(lengths), padded_fraction(lengths, length_groups(lengths))
    print(f"device={args.device} dtype={args.dtype} requests={n} steps={args.steps} rows={len(lengths)}")
    for name, t, c in (("batched", t_b, c_b), ("batched, full forward", t_f, c_f), ("per-request", t_r, c_r)):
        print(f"{name:22s} {t:8.2f} s  {n / t:8.2f} edits/s   (CPU time {c:8.2f} s)")
    print(f"speed-up over the per-request loop {t_r / t_b:.2f}x (CPU time {c_r / c_b:.2f}x), over the batched full "
          f"forward {t_f / t_b:.2f}x (CPU time {c_f / c_b:.2f}x)")
    print(f"max relative difference of v* to the per-request loop: batched {rel(batched):.2e}, batched full forward "
          f"{rel(full):.2e}")
    print(f"padded positions in the first iteration: {pad_before:.3f} in one batch, {pad_after:.3f} in length groups")
    print(f"RESULT batched_edits_per_s={n / t_b:.3f} batched_full_edits_per_s={n / t_f:.3f} "
          f"reference_edits_per_s={n / t_r:.3f} speedup={t_r / t_b:.3f} speedup_cpu={c_r / c_b:.3f} "
          f"speedup_over_full={t_f / t_b:.3f} max_rel_diff={rel(batched):.3e} max_rel_diff_full={rel(full):.3e} "
          f"padded_before={pad_before:.3f} padded_after={pad_after:.3f} n={n} steps={args.steps} "
          f"device={args.device} dtype={args.dtype}")

if __name__ == "__main__":
    main()
