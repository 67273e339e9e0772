"""Downstream write (docs/algorithms.md §4–5): keys, current block-L states and the multi-layer update.

For a batch with targets Z at layer L and edited layers l_0 < … < l_{m−1} = L, for each l_i:
  K  = keys at l_i on the current model (earlier layers of this batch already written),
  H  = block-L output at the fact token of the bare prompts, current model,
  R  = (Z − H) / (m − i)          (the remaining gap spread over the layers not yet written),
  Δ  = solver.solve(l_i, K, R),   W_{l_i} += Δ.
Afterwards the keys of the batch are recomputed at every layer on the edited model and committed
to the solver's accumulated constraint with the values each layer was asked to store
(V = W_before K + R, the ledger that removal needs). Requests that replace or remove earlier edits
first drop those edits (OTE–SE Prop. 3.5). :func:`apply_batch` is atomic: on any error or a
non-finite Δ the edited matrices and the solver state are restored. :class:`ClosedFormEdit` is the
Lightning callback that applies each training step's plan through it, and :func:`add_to_weight` /
:func:`set_weight` are the only writes of an edited weight, so one edit reads top-down in this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor, nn

from lit_edit import distributed as dist
from lit_edit.hooks import capture_inputs, capture_outputs, stop_after
from lit_edit.layouts import ModelLayout, block_module, edited_module, get_weight, post_norm_module
from lit_edit.requests import EditRequest, EditRequestError
from lit_edit.timing import timed
from lit_edit.tokens import encode_prompt, fill_context, pad_batch, pad_id


class EditStepError(RuntimeError):
    """A step that could not be applied; the model and solver state were restored."""


@torch.no_grad()
def add_to_weight(model: nn.Module, layout: ModelLayout, layer: int, delta: Tensor) -> None:
    """``W += delta`` in place; ``delta`` is ``[d_out, d_in]`` in any float dtype or device."""
    weight = get_weight(model, layout, layer)
    _check_shape(weight, delta)
    weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def set_weight(model: nn.Module, layout: ModelLayout, layer: int, W: Tensor) -> None:
    """``W_layer = W`` in place (the parameter object is kept, so optimizers and hooks stay valid)."""
    weight = get_weight(model, layout, layer)
    _check_shape(weight, W)
    weight.copy_(W)


def _check_shape(weight: Tensor, value: Tensor) -> None:
    if tuple(value.shape) != tuple(weight.shape):
        raise ValueError(f"expected a [d_out, d_in] = {list(weight.shape)} tensor, got {list(value.shape)}")


def capture_at(model, seqs: list[list[int]], positions: list[list[int]], capture, pad: int, chunk: int = 64,
               grad: bool = False, others: bool = False, stop: nn.Module | None = None) -> tuple[dict, dict | None]:
    """Run ``seqs`` (right padded, ``chunk`` at a time) with the forward hooks of ``capture()`` and gather each
    captured tensor at ``positions[i]`` of sequence i, in order: {key: [Σ_i len(positions[i]), dim]} (float32, or
    float64 for a float64 model). With ``others``, also every other real (non-padding) position, row-major.
    ``grad=True`` keeps the graph (MetaKE's proxy-fidelity diagnostic differentiates through keys and states).
    ``stop``: the last module the captures need; the forward ends after it (:func:`~lit_edit.hooks.stop_after`).
    The one chunked capture forward: keys, states, window keys and window states all read through it."""
    dev = next(model.parameters()).device
    at: dict = {}
    rest: dict = {}
    for c in range(0, len(seqs), chunk):
        ids, mask = pad_batch(seqs[c : c + chunk], pad)
        pos = positions[c : c + chunk]
        rows = torch.tensor([b for b, p in enumerate(pos) for _ in p])
        cols = torch.tensor([j for p in pos for j in p])
        with capture() as store, torch.set_grad_enabled(grad), stop_after(stop):
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        for k, v in store.items():
            x = v[0] if v[0].dtype == torch.float64 else v[0].float()
            at.setdefault(k, []).append(x[rows.to(x.device), cols.to(x.device)])
            if others:
                keep = mask == 1
                keep[rows, cols] = False
                rest.setdefault(k, []).append(x[keep.to(x.device)])
    return ({k: torch.cat(v) for k, v in at.items()},
            {k: torch.cat(v) for k, v in rest.items()} if others else None)


def compute_keys(model, tok, layout, layers: list[int], requests: list[EditRequest], context_templates: list[str],
                 fact_token: str = "subject_last", legacy_bos_shift: bool = False, grad: bool = False) -> dict[int, torch.Tensor]:
    """Template-averaged keys (§3): K_l (d_in × n) per layer — the input of the edited matrix at the fact token,
    averaged inside the group {bare prompt} and inside the group {generated contexts}, then over the two groups."""
    seqs, index = [], []
    for r in requests:
        for ctx in context_templates:
            e = encode_prompt(tok, fill_context(ctx, r.prompt), r.subject, fact_token, legacy_bos_shift)
            seqs.append(e.ids), index.append(e.index)
    mods = {l: edited_module(model, layout, l) for l in layers}
    got, _ = capture_at(model, seqs, [[i] for i in index], lambda: capture_inputs(mods), pad_id(tok), grad=grad,
                        stop=mods[max(layers)])
    n, c = len(requests), len(context_templates)
    keys = {}
    for l in layers:
        k = got[l].view(n, c, -1)
        k = 0.5 * (k[:, 0] + k[:, 1:].mean(1)) if c > 1 else k[:, 0]
        keys[l] = k.T.contiguous()
    return keys


def compute_block_states(model, tok, layout, layer: int, requests: list[EditRequest], fact_token: str = "subject_last",
                         legacy_bos_shift: bool = False, grad: bool = False) -> torch.Tensor:
    """H_L (n × d): block-``layer`` output at the fact token of the bare (context-free) prompts."""
    enc = [encode_prompt(tok, r.prompt, r.subject, fact_token, legacy_bos_shift) for r in requests]
    blocks = {layer: block_module(model, layout, layer)}
    got, _ = capture_at(model, [e.ids for e in enc], [[e.index] for e in enc], lambda: capture_outputs(blocks),
                        pad_id(tok), grad=grad, stop=blocks[layer])
    return got[layer]


def post_norm_map(norm: nn.Module, W: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear map r ↦ d of :func:`through_post_norm` at the keys ``K`` [d_in, n]: (scale [d_out, n], v [d_out, n])
    with d = scale ⊙ (r − v vᵀr) per column (:func:`apply_post_norm_map`). Differentiable in ``W`` and ``K`` (MetaKE's
    true hypergradient differentiates through keys that move with lower layers' writes); float64."""
    dt = torch.float64
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)) or 0.0)
    ones = torch.ones(1, W.shape[0], device=W.device, dtype=next(norm.parameters()).dtype)
    with torch.no_grad():
        g = norm(ones)[0].to(dt) * (1.0 + eps) ** 0.5
    # a coordinate whose gain is (nearly) 0 cannot be moved at all, or only by a huge output change that would wreck
    # the linearisation: its share of r is left out (ginv 0 there, and v is 0 there too). Gemma-3-270M's gains (1 + w)
    # at layers 4-8 have medians 6-19 and 1 % quantiles down to 0.002; the cut is 1 % of the median
    ok = g.abs() > 1e-2 * g.abs().median()
    ginv = torch.where(ok, 1.0 / torch.where(ok, g, torch.ones_like(g)), torch.zeros_like(g))[:, None]
    M = W.to(dt) @ K.to(W.device, dt)  # [d_out, n]: the matrix's current outputs at the keys
    rho = (M.pow(2).mean(0) + eps).sqrt()  # [n]
    v = M * ginv
    v = v / v.norm(dim=0).clamp(min=1e-30)
    return ginv * rho, v


def apply_post_norm_map(scale: torch.Tensor, v: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """d = scale ⊙ (r − v vᵀr) for every column of ``R`` [d_out, n] (:func:`post_norm_map`); linear in R."""
    return scale * (R - v * (v * R).sum(0))


def through_post_norm(norm: nn.Module, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The change of the edited matrix's output that moves the residual by ``R`` when an RMSNorm with an elementwise
    gain g sits between them (Gemma 3's post-feed-forward norm): y = g ⊙ m / ρ(m), ρ(m) = (mean(m²) + ε)^½, m = W k.
    To first order (and in ε), J = diag(g)/ρ · (I − m̂ m̂ᵀ): the norm is blind to a change along m, so the one
    residual direction v = m / g (normalised) cannot be reached (vᵀ J = 0). Per column, d = ρ · (r − v v·r) / g is the
    least-squares solution of J d = r: J d is r less its part along v (m̂ · d = 0, so no ρ change). The §4 layer loop
    re-reads h_L after each layer, so later layers (other m, other v) take up that part and what the linearisation
    missed. Coordinates whose gain is under 1 % of the median gain are left out (:func:`post_norm_map`). g is read
    from the module itself (its output for an all-ones input, whose ρ is (1 + ε)^½), so Gemma's (1 + w) and a plain
    w gain both work. ``W`` [d_out, d_in], ``K`` [d_in, n], ``R`` [d_out, n]; zero columns stay zero. Differentiable
    (MetaKE's true hypergradient, :func:`lit_edit.metake.solved_meta_loss`); the write calls it without gradients."""
    scale, v = post_norm_map(norm, W, K)
    return apply_post_norm_map(scale, v, R.to(scale.dtype)).to(R.dtype)


def layer_residuals(layers: list[int], Z: torch.Tensor, keys, states):
    """The §4 layer loop: for each edited layer l_i, low to high, yield (l_i, K, R) with K = keys(l_i) and
    H = states(L) read on the model *as it is when the caller resumes the loop*, and R = (Z − H)ᵀ / (m − i), the
    remaining gap spread over the layers not yet written (d × n; zero columns appended when K has more
    columns than Z rows: preservation columns keep their current outputs). The caller writes layer l_i's Δ, for
    real (:func:`apply_batch`) or by a hook (MetaKE's true hypergradient), before asking for the next layer."""
    layers = sorted(layers)
    L, m = layers[-1], len(layers)
    for i, l in enumerate(layers):
        K = keys(l)
        H = states(L)
        R = (Z.to(H.device, H.dtype) - H).T / (m - i)  # H is float32, or float64 for a float64 model
        if K.shape[1] > R.shape[1]:
            R = torch.cat([R, R.new_zeros(R.shape[0], K.shape[1] - R.shape[1])], 1)
        yield l, K, R


class FactColumns:
    """The columns of a structured batch: one per request, its key at the fact token (template-averaged, §3) and
    its target row at the fact token of the bare prompt. Unstructured batches have their own provider with the
    same interface (:class:`lit_edit.muke.WindowColumns`): ``ids`` (the ledger id of every column, target columns
    first, then preservation columns whose residual is 0), ``n_targets``, ``keys(model, layout, layers)`` and
    ``states(model, layout, L)`` on the current model."""

    def __init__(self, tok, requests: list[EditRequest], context_templates: list[str], fact_token: str = "subject_last",
                 legacy_bos_shift: bool = False):
        self.tok, self.requests, self.context = tok, requests, context_templates
        self.fact_token, self.legacy = fact_token, legacy_bos_shift
        self.ids = [r.fact_id for r in requests]
        self.n_targets = len(requests)
        self.rows = [[j] for j in range(len(requests))]  # one target row per request

    def keys(self, model, layout, layers: list[int]) -> dict[int, torch.Tensor]:
        return compute_keys(model, self.tok, layout, layers, self.requests, self.context, self.fact_token, self.legacy)

    def states(self, model, layout, layer: int) -> torch.Tensor:
        return compute_block_states(model, self.tok, layout, layer, self.requests, self.fact_token, self.legacy)


@dataclass
class StepStats:
    residual_norm: dict[int, float] = field(default_factory=dict)  # mean ‖R‖ per column, per layer
    update_norm: dict[int, float] = field(default_factory=dict)  # ‖Δ‖_F written per layer (after finalize)
    request_residual: dict[int, list[float]] = field(default_factory=dict)  # ‖R_j‖ per layer, per inserted request
    forget_norm: dict[int, float] = field(default_factory=dict)  # ‖Δ‖_F of the removal phase per layer
    regularizer_change: dict[int, float] = field(default_factory=dict)  # ‖Φ(Δ) − Δ‖ / ‖Δ‖ per layer (PRUNE/RECT)
    dropped: list[str] = field(default_factory=list)  # fact ids whose earlier edits were removed this step


def plan_operations(solver, requests: list[EditRequest]) -> tuple[list[EditRequest], list[str]]:
    """Split a batch into the requests that write a value (insert, replace) and the facts whose earlier edits
    must be dropped first (replace, remove, and inserts of an already edited fact under ``on_conflict:
    replace``). Raises :class:`EditRequestError` naming the record before anything is written."""
    writes, drops, seen = [], [], {}
    for r in requests:
        fid = r.fact_id
        if fid in seen:
            raise EditRequestError(r.case_id, "prompt", f"edits the same fact ({fid!r}) as case_id={seen[fid]!r} "
                                   f"in the same batch; put them in different steps")
        seen[fid] = r.case_id
        known = solver.knows(fid)
        if r.op in ("replace", "remove") and not known:
            raise EditRequestError(r.case_id, "op", f"{r.op} of fact {fid!r}, which has no applied edit in the "
                                   f"solver's ledger: no earlier step, nor the checkpoint resumed, inserted it")
        if r.op == "insert" and known:
            if solver.on_conflict == "error":
                raise EditRequestError(r.case_id, "op", f"fact {fid!r} is already edited; use op 'replace' "
                                       f"(or the solver's on_conflict: replace)")
            if solver.on_conflict == "replace":
                drops.append(fid)
        if r.op in ("replace", "remove"):
            drops.append(fid)
        if r.writes:
            writes.append(r)
    return writes, drops


class _LedgerView:
    """What :func:`plan_operations` asks of a solver, over a set of fact ids instead of its ledger."""

    def __init__(self, live: set[str], on_conflict: str) -> None:
        self.live, self.on_conflict = live, on_conflict

    def knows(self, fact_id: str) -> bool:
        return fact_id in self.live


def check_operations(solver, batches: list[list[EditRequest]], live: set[str], first_step: int = 1,
                     persistent: bool = True) -> None:
    """Plan every batch's operations before the first edit, as :func:`apply_batch` will at each step: a
    ``remove`` / ``replace`` of a fact that neither ``live`` (the facts the checkpoint's solver ledger holds) nor an
    earlier batch inserted, an insert that ``on_conflict: error`` refuses, or one fact twice in a batch raises
    :class:`EditRequestError` naming the record and its step. ``persistent`` false (the independent protocol, which
    undoes each batch): no batch's edits are known to the next one."""
    view = _LedgerView(set(live), solver.on_conflict)
    for step, batch in enumerate(batches, start=first_step):
        for r in batch:
            if r.op in ("replace", "remove") and not solver.keeps_ledger:
                raise EditRequestError(r.case_id, "op", f"{r.op} at step {step}: {type(solver).__name__} keeps no "
                                       f"ledger of applied edits and cannot remove or replace them; use an aligned "
                                       f"solver (mode: aligned, keep_ledger: true)")
        try:
            writes, drops = plan_operations(view, batch)
        except EditRequestError as err:
            raise EditRequestError(err.case_id, err.field, f"{err.message} (step {step}; checked before the first "
                                   f"edit)") from None
        if persistent:
            view.live.difference_update(drops)
            view.live.update(r.fact_id for r in writes)


def apply_batch(model, layout, solver, layers: list[int], requests: list, Z: torch.Tensor, cols) -> StepStats:
    """Apply one step: first remove the earlier edits of dropped facts (Prop. 3.5), then write the targets
    Z (one row per target column of the writing requests, in order) into ``layers`` (§4 layer loop) and commit
    keys and stored values to the solver; the solver's ``finalize`` (PRUNE/RECT) decides what is finally
    written. ``cols``: the writing requests' columns (``lit_edit.methods.Columns``: :class:`FactColumns`, or
    windows for unstructured edits), as the step built them. Atomic: on any error the edited matrices and the
    solver state are restored."""
    layers = sorted(layers)
    writes, drops = plan_operations(solver, requests)
    if Z.shape[0] != cols.n_targets:
        raise ValueError(f"{Z.shape[0]} targets for {cols.n_targets} target columns of {len(writes)} inserted/replaced "
                         f"requests")
    saved_w = {l: get_weight(model, layout, l).clone() for l in layers}
    saved_solver = solver.state_dict()  # references: the solver never writes in place what a state_dict covers
    stats = StepStats(dropped=list(drops))
    ids = [r.case_id for r in requests]
    try:
        if drops:
            deltas = solver.forget(drops, {l: get_weight(model, layout, l) for l in layers})
            for l, delta in deltas.items():
                _check_finite(delta, l)
                add_to_weight(model, layout, l, delta)
                stats.forget_norm[l] = delta.norm().item()
        if writes:
            W_before = {l: get_weight(model, layout, l).clone() for l in layers} if drops else saved_w
            raw, values = {}, {}
            for l, K, R in layer_residuals(layers, Z, lambda l: cols.keys(model, layout, [l])[l],
                                           lambda L: cols.states(model, layout, L)):
                stats.residual_norm[l] = R[:, : cols.n_targets].norm(dim=0).mean().item()  # in the residual stream
                stats.request_residual[l] = R[:, : cols.n_targets].norm(dim=0).tolist()
                norm = post_norm_module(model, layout, l)
                if norm is not None:  # R is a change of the residual: the matrix must move its output by J⁺R
                    with torch.no_grad():
                        R = through_post_norm(norm, get_weight(model, layout, l), K, R)
                raw[l] = solver.solve(l, K, R)
                _check_finite(raw[l], l)
                values[l] = W_before[l].double() @ K.double() + R.double()  # what this layer is asked to store
                add_to_weight(model, layout, l, raw[l])
            K_all = cols.keys(model, layout, layers)
            for l in layers:
                solver.commit(l, K_all[l], values[l])
            for l in layers:
                applied = solver.finalize(l, raw[l], W_before[l])
                if solver.regularizer:  # how much PRUNE/RECT changed this step (0: did not fire)
                    stats.regularizer_change[l] = ((applied - raw[l]).norm() / raw[l].norm().clamp(min=1e-30)).item()
                if applied is not raw[l]:  # a regulariser changed Δ: write W_before + Φ(Δ) instead of the raw Δ
                    _check_finite(applied, l)
                    set_weight(model, layout, l, W_before[l] + applied.to(W_before[l].device, W_before[l].dtype))
                stats.update_norm[l] = applied.norm().item()
        solver.finish_batch(cols.ids)
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


def _check_finite(delta: torch.Tensor, layer: int) -> None:
    if not torch.isfinite(delta).all():
        raise EditStepError(f"non-finite update at layer {layer}")


class ClosedFormEdit(L.Callback):
    """Writes the plan of each training step with the module's solver, atomically."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if dm is not None and not callable(getattr(dm, "mark_applied", None)):
            raise TypeError(f"{type(dm).__name__} cannot record applied batches (no mark_applied()): an editing run "
                            f"needs lit_edit.data.EditDataModule or a data module with its resumable stream cursor")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        plan, m = outputs["plan"], pl_module
        if m.protocol == "independent":  # snapshot to restore after the batch is evaluated (the solver replaces, never mutates)
            saved = ([w.clone() for w in m.edited_weights()], m.solver.state_dict())
        with timed(plan.seconds, "write"):  # keys, solve, the update, the solver's ledger
            stats = apply_batch(m.llm, m.layout, m.solver, m.layers, plan.requests, plan.Z, plan.columns)
            if trainer.datamodule is not None:
                trainer.datamodule.mark_applied()
            if plan.writes:
                plan.info["after_write"] = m.method.after_write(plan.columns, plan.writes, plan.Z, plan.info)
            plan.stats = stats
            m.edits.record(plan.requests, stats.dropped)
        if plan.writes:  # the batch's scores on the model as written (RunRecord logs them)
            with timed(plan.seconds, "eval"):
                plan.batch_scores = m.scores.batch(m.env, plan.writes, m.protocol != "sequential", m.device)
        if m.sync_check_every_n_steps and trainer.global_step % m.sync_check_every_n_steps == 0:
            dist.assert_in_sync(m.edited_weights(), f"edited weights after step {trainer.global_step}")
        if m.protocol == "independent":
            with torch.no_grad():
                for w, w0 in zip(m.edited_weights(), saved[0]):
                    w.copy_(w0)
            m.solver.load_state_dict(saved[1])
