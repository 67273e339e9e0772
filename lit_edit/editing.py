"""Downstream write (ALGORITHMS.md §4–5): keys, current block-L states and the multi-layer update.

For a batch with targets Z at layer L and edited layers l_0 < … < l_{m−1} = L, for each l_i:
  K  = keys at l_i on the current model (earlier layers of this batch already written),
  H  = block-L output at the fact token of the bare prompts, current model,
  R  = (Z − H) / (m − i)          (the remaining gap spread over the layers not yet written),
  Δ  = solver.solve(l_i, K, R),   W_{l_i} += Δ.
Afterwards the keys of the batch are recomputed at every layer on the edited model and committed
to the solver's accumulated constraint. :func:`apply_batch` is atomic: on any error or a
non-finite Δ the edited matrices and the solver state are restored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lit_edit.hooks import capture_inputs, capture_outputs
from lit_edit.layouts import add_to_weight, block_module, edited_module, get_weight
from lit_edit.requests import EditRequest
from lit_edit.tokens import encode_prompt, fill_context, pad_batch, pad_id


class EditStepError(RuntimeError):
    """A step that could not be applied; the model and solver state were restored."""


def _forward_positions(model, tok, seqs, index, capture, chunk: int = 64):
    """Run ``seqs`` in chunks; return {key: [len(seqs), dim]} of captured tensors at ``index`` per sequence."""
    dev = next(model.parameters()).device
    out: dict = {}
    for c in range(0, len(seqs), chunk):
        ids, mask = pad_batch(seqs[c : c + chunk], pad_id(tok))
        idx = torch.tensor(index[c : c + chunk])
        with capture() as store, torch.no_grad():
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        for k, v in store.items():
            out.setdefault(k, []).append(v[0][torch.arange(len(idx)), idx.to(v[0].device)].float())
    return {k: torch.cat(v) for k, v in out.items()}


def compute_keys(model, tok, layout, layers: list[int], requests: list[EditRequest], context_templates: list[str],
                 fact_token: str = "subject_last", legacy_bos_shift: bool = False) -> dict[int, torch.Tensor]:
    """Template-averaged keys (§3): K_l (d_in × n) per layer — the input of the edited matrix at the fact token,
    averaged inside the group {bare prompt} and inside the group {generated contexts}, then over the two groups."""
    seqs, index = [], []
    for r in requests:
        for ctx in context_templates:
            e = encode_prompt(tok, fill_context(ctx, r.prompt), r.subject, fact_token, legacy_bos_shift)
            seqs.append(e.ids), index.append(e.index)
    mods = {l: edited_module(model, layout, l) for l in layers}
    got = _forward_positions(model, tok, seqs, index, lambda: capture_inputs(mods))
    n, c = len(requests), len(context_templates)
    keys = {}
    for l in layers:
        k = got[l].view(n, c, -1)
        k = 0.5 * (k[:, 0] + k[:, 1:].mean(1)) if c > 1 else k[:, 0]
        keys[l] = k.T.contiguous()
    return keys


def compute_block_states(model, tok, layout, layer: int, requests: list[EditRequest], fact_token: str = "subject_last",
                         legacy_bos_shift: bool = False) -> torch.Tensor:
    """H_L (n × d): block-``layer`` output at the fact token of the bare (context-free) prompts."""
    enc = [encode_prompt(tok, r.prompt, r.subject, fact_token, legacy_bos_shift) for r in requests]
    blocks = {layer: block_module(model, layout, layer)}
    got = _forward_positions(model, tok, [e.ids for e in enc], [e.index for e in enc], lambda: capture_outputs(blocks))
    return got[layer]


@dataclass
class StepStats:
    residual_norm: dict[int, float] = field(default_factory=dict)  # mean ‖R‖ per column, per layer
    update_norm: dict[int, float] = field(default_factory=dict)  # ‖Δ‖_F per layer


def apply_batch(model, tok, layout, solver, layers: list[int], requests: list[EditRequest], Z: torch.Tensor,
                context_templates: list[str], fact_token: str = "subject_last", legacy_bos_shift: bool = False) -> StepStats:
    """Write targets Z (n × d) into ``layers`` (§4 layer loop), commit keys to the solver. Atomic."""
    layers = sorted(layers)
    L, m = layers[-1], len(layers)
    saved_w = {l: get_weight(model, layout, l).clone() for l in layers}
    saved_solver = solver.state_dict()  # references: commit() never mutates in place
    stats = StepStats()
    ids = [r.case_id for r in requests]
    try:
        for i, l in enumerate(layers):
            K = compute_keys(model, tok, layout, [l], requests, context_templates, fact_token, legacy_bos_shift)[l]
            H = compute_block_states(model, tok, layout, L, requests, fact_token, legacy_bos_shift)
            R = (Z.to(H.device).float() - H).T / (m - i)  # d × n
            delta = solver.solve(l, K, R)
            if not torch.isfinite(delta).all():
                raise EditStepError(f"non-finite update at layer {l}")
            add_to_weight(model, layout, l, delta)
            stats.residual_norm[l] = R.norm(dim=0).mean().item()
            stats.update_norm[l] = delta.norm().item()
        K_all = compute_keys(model, tok, layout, layers, requests, context_templates, fact_token, legacy_bos_shift)
        for l in layers:
            solver.commit(l, K_all[l])
        solver.finish_batch(len(requests))
        for l in layers:
            if not torch.isfinite(get_weight(model, layout, l)).all():
                raise EditStepError(f"non-finite weights at layer {l}")
    except Exception as e:
        with torch.no_grad():
            for l, w in saved_w.items():
                get_weight(model, layout, l).copy_(w)
        solver.load_state_dict(saved_solver)
        raise EditStepError(
            f"edit step failed for request ids {ids}: {e}. The edited matrices and solver state were restored "
            f"to their values before this step."
        ) from e
    return stats
