"""How many bytes an aligned solver needs per edited layer (docs/results.md §8), as a function of the widths, the
null-space rank, the number of edits and the options: its state in memory (on the accelerator when the algebra runs
on the model's device, else on the host), the peaks of a step and of a removal, a checkpoint, and the ledger on disk.
The same for the earlier design, which kept A_0 and the whole ledger in memory and in every checkpoint (the reference
of ``benchmarks/lifelong_scale.py``). :func:`measured_state_bytes` counts what a live solver holds; tests and the
benchmark compare the two.
"""
from __future__ import annotations

import torch

CKPT_OVERHEAD, CKPT_PER_TENSOR = 1536, 320  # torch.save's zip and pickle records (measured: 1.3 kB, ~250 B a tensor)
# on disk per step: the shard's safetensors header, the index line (with two tensor hashes), and per edit its fact id
# (a filled prompt, ~50 characters) in that line
SHARD_OVERHEAD, INDEX_PER_STEP, INDEX_PER_EDIT = 128, 224, 64


def solver_bytes(d_in: int, d_out: int, rank: int | None = None, edits: int = 0, b: int = 100,
                 fold_every: int = 1024, inverse_dtype: str = "float64", feedback: bool = False,
                 keep_ledger: bool = True, on_accelerator: bool = True) -> dict[str, int]:
    """Bytes per edited layer. ``rank``: the null-space rank r (AlphaEdit), None for P = I; ``b``: keys per step;
    ``feedback``: error correction or memorize-the-latest (a d_out × d_in term); ``on_accelerator``: the algebra runs
    on the model's accelerator (``device: model``) rather than on the host (``device: cpu``)."""
    s = 4 if inverse_dtype == "float32" else 8
    w = rank or d_in  # the working width: A⁻¹ is w × w
    pending = (fold_every - 1 + b) * w * s  # the buffer of stacked Woodbury factors (fixed size)
    kept = {"Ainv": w * w * s, "Zs": pending, "C": d_out * d_in * s if feedback else 0,
            "U0": d_in * rank * s if rank else 0, "A0_diagonal": rank * 8 if rank else 0}
    state = sum(kept.values())
    # a step: Y, X, Z (b × w), M (b × d_in), Δ and R·M (d_out × d_in); a fold: the new A⁻¹ (w × w)
    step = max(3 * b * w + b * d_in + 2 * d_out * d_in, w * w) * s
    # a removal, in float64: A' (A_0 rebuilt in place from C0 read back, plus the kept keys), its Cholesky factor and
    # its inverse, then that inverse in the solver's dtype (the old A⁻¹ stays in the step's snapshot: in ``state``)
    removal = 3 * w * w * 8 + (w * w * s if s != 8 else 0)
    tensors = 2 + (1 if feedback else 0)  # Ainv, Zs, and F or S
    checkpoint = kept["Ainv"] + kept["Zs"] + kept["C"] + CKPT_OVERHEAD + CKPT_PER_TENSOR * tensors
    steps = -(-edits // b)
    ledger = edits * (d_in + d_out) * s + steps * (SHARD_OVERHEAD + INDEX_PER_STEP) + edits * INDEX_PER_EDIT
    ledger = ledger if keep_ledger else 0
    # the earlier design: float64 only, A_0 kept (w × w) and the ledger in memory and in each checkpoint
    ref_ledger = edits * (d_in + d_out) * 8 if keep_ledger else 0
    ref_a0 = w * w * 8 if keep_ledger else 0
    ref_kept = w * w * 8 + (fold_every - 1 + b) * w * 8 + (d_out * d_in * 8 if feedback else 0)
    out = {"state": state, "step_peak": state + step, "removal_peak": state + removal, "checkpoint": checkpoint,
           "ledger_disk": ledger, "reference_state": ref_kept + ref_a0 + (d_in * rank * 8 if rank else 0) + ref_ledger,
           "reference_checkpoint": ref_kept + ref_ledger + CKPT_OVERHEAD + CKPT_PER_TENSOR * (tensors + 2)}
    staged = b * (d_in + d_out) * s if keep_ledger else 0  # a step's ledger entries, on the host until written
    out["accelerator"] = out["step_peak"] if on_accelerator else d_out * d_in * s  # off it, only Δ passes through
    out["host"] = staged if on_accelerator else out["step_peak"] + staged
    return out


def measured_state_bytes(solver) -> int:
    """Bytes of the tensors an :class:`~lit_edit.solvers.AlignedSolver` keeps between steps (what
    :func:`solver_bytes` calls ``state``), summed over its layers."""
    tensors = [inv.Ainv for inv in solver.inv.values()] + [inv.buf for inv in solver.inv.values()]
    tensors += list(solver.feedback.C.values())
    tensors += [t for p in solver.pres.values() for t in (p.U, p.diag) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
