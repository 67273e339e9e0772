"""Target values v* at the last edited layer L (docs/algorithms.md §2), batched over all requests.

For every request a free vector δ is added to block L's output at the fact token of each of its
prompts (context-prefixed rewriting prompts + one KL prompt). Per request the loss is

    NLL(target | rewriting prompts) + kl_factor · KL + v_weight_decay · ‖δ‖ / ‖h_init‖²,

minimised by Adam with a norm clamp and early stop. Requests never interact (each sequence
only sees its own δ, right padding keeps real tokens from attending to pads), so one forward /
backward over the whole batch, with *per-request* Adam state, early stop and clamp, gives the
same v* as optimising each request alone (tested against :func:`compute_targets_reference`). Each iteration runs
only the blocks after L (lit_edit/truncated.py: blocks 0 … L are computed once per call).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_edit import checks
from lit_edit.layouts import block_module
from lit_edit.requests import EditRequest
from lit_edit.tokens import FACT_TOKENS, encode_prompt, fill_context, pad_batch, pad_id, target_ids
from lit_edit.truncated import Readout, RowForward, reference_forward


def hidden_size(model) -> int:
    return model.get_output_embeddings().weight.shape[1]


def opt_dtype(model) -> torch.dtype:
    """δ and the losses are float32 (as the reference), or float64 for a float64 model (exactness tests)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


@dataclass
class TargetConfig:
    """§2 hyper-parameters (names as in the MEMIT/AlphaEdit JSONs)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_direction: str = "current_ref"  # MEMIT code: KL(p_current ‖ p_ref); "ref_current" = the papers' direction
    early_stop_loss: float = 0.05
    fact_token: str = "subject_last"
    kl_prompt: str = "{} is a"
    legacy_bos_shift: bool = False
    chunk_size: int = 0  # requests per forward pass (0 = all); results do not depend on it

    def __post_init__(self):
        n = lambda field: f"model.method.init_args.{field}"  # noqa: E731  (the setting as written in the YAML config)
        # the loop evaluates the loss v_num_grad_steps times and steps after all but the last (1: no step, v* = h_init);
        # 0 would never run and leave v* = 0
        checks.integer(n("v_num_grad_steps"), self.v_num_grad_steps, ge=1)
        checks.number(n("v_lr"), self.v_lr, gt=0)
        checks.number(n("v_weight_decay"), self.v_weight_decay, ge=0)
        checks.number(n("clamp_norm_factor"), self.clamp_norm_factor, gt=0)  # ‖δ‖ <= factor·‖h_init‖: 0 pins δ = 0
        checks.number(n("kl_factor"), self.kl_factor, ge=0)
        checks.choice(n("kl_direction"), self.kl_direction, ("current_ref", "ref_current"))
        # a request stops once its loss (>= 0) is below it: 0 never stops early, inf stops before any step
        checks.number(n("early_stop_loss"), self.early_stop_loss, ge=0)
        checks.choice(n("fact_token"), self.fact_token, FACT_TOKENS)
        checks.subject_template(n("kl_prompt"), self.kl_prompt)
        checks.boolean(n("legacy_bos_shift"), self.legacy_bos_shift)
        checks.integer(n("chunk_size"), self.chunk_size, ge=0)


@dataclass
class TargetBatch:
    """All prompts of all requests, tokenised once. Row kinds: 0 bare rewrite, 1 context rewrite, 2 KL."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    req: torch.Tensor  # [B] request index of each row
    kind: torch.Tensor  # [B]
    lookup: torch.Tensor  # [B] fact-token position
    labels: torch.Tensor  # [B, T] target id at scored positions, -100 elsewhere
    n: int


def build_target_batch(tok, requests: list[EditRequest], context_templates: list[str], cfg: TargetConfig) -> TargetBatch:
    seqs, req, kind, lookup, labels = [], [], [], [], []
    for i, r in enumerate(requests):
        tgt = target_ids(tok, r.target_new)
        for c, ctx in enumerate(context_templates):
            enc = encode_prompt(tok, fill_context(ctx, r.prompt), r.subject, cfg.fact_token, cfg.legacy_bos_shift)
            ids = enc.ids + tgt[:-1]
            lab = [-100] * len(ids)
            start = len(enc.ids) - 1  # logits at the last prompt token predict the first target token
            lab[start : start + len(tgt)] = tgt
            seqs.append(ids), req.append(i), kind.append(0 if c == 0 else 1), lookup.append(enc.index), labels.append(lab)
        enc = encode_prompt(tok, cfg.kl_prompt, r.subject, cfg.fact_token, cfg.legacy_bos_shift)
        kl_ids = enc.ids[: enc.index + 1]  # the KL is read at the fact token; later tokens cannot change it (causal)
        seqs.append(kl_ids), req.append(i), kind.append(2), lookup.append(enc.index)
        labels.append([-100] * len(kl_ids))
    ids, mask = pad_batch(seqs, pad_id(tok))
    lab = torch.full_like(ids, -100)
    for b, l in enumerate(labels):
        lab[b, : len(l)] = torch.tensor(l)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TargetBatch(ids, mask, t(req), t(kind), t(lookup), lab, len(requests))


@dataclass
class TargetResult:
    v_star: torch.Tensor  # [n, d] = h_init + δ
    h_init: torch.Tensor  # [n, d]
    delta: torch.Tensor  # [n, d]
    loss: torch.Tensor  # [n] loss at the last evaluated iteration
    nll: torch.Tensor  # [n]
    steps: torch.Tensor  # [n] Adam updates taken
    history: list[float]  # mean loss of the active requests per iteration


def label_logprobs(out: Readout, labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(label)`` at every scored position (``labels >= 0``, [B, T] over the forwarded rows) of a forward's
    :class:`~lit_edit.truncated.Readout`, in ``dtype``, flattened in row-major order, and the row of each (for
    per-row sums with ``index_add``)."""
    r, c = (labels >= 0).nonzero(as_tuple=True)
    logp = torch.log_softmax(out.at(r, c).to(dtype), dim=-1).gather(1, labels[r, c][:, None])[:, 0]
    return logp, r


def weight_decay_term(delta: torch.Tensor, h_init: torch.Tensor, weight: float) -> torch.Tensor:
    """§2.6: ``weight · ‖δ‖ / ‖h_init‖²`` per row, with the unsquared ‖δ‖ of the reference code (§12.3)."""
    return weight * delta.norm(dim=-1) / h_init.norm(dim=-1).pow(2).clamp(min=1e-12)


@torch.no_grad()
def adam_rows(delta: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, steps: torch.Tensor,
              rows: torch.Tensor, lr: float, max_norm: torch.Tensor | None = None,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One ``torch.optim.Adam`` step (default betas/eps, no weight decay) taken independently by each selected
    row of ``delta`` (``rows``: bool mask), i.e. per-request Adam state ``m``, ``v``, ``steps`` (updated in
    place). With ``max_norm`` ([n_selected, 1]) each stepped row is then rescaled onto the sphere of that
    radius if it left the ball (the §2.8 clamp)."""
    b1, b2 = betas
    a, g, dt = rows, grad, delta.dtype
    steps[a] += 1
    m[a] = b1 * m[a] + (1 - b1) * g[a]
    v[a] = b2 * v[a] + (1 - b2) * g[a] * g[a]
    t = steps[a].double()[:, None]
    bc1, bc2 = (1 - b1**t).to(dt), (1 - b2**t).to(dt)
    denom = (v[a].sqrt() / bc2.sqrt()) + eps
    delta[a] -= (lr / bc1) * m[a] / denom
    if max_norm is not None:
        norm = delta[a].norm(dim=-1, keepdim=True)
        delta[a] = torch.where(norm > max_norm, delta[a] * max_norm / norm, delta[a])


def request_losses(run: RowForward, layer_module, batch: TargetBatch, rows: torch.Tensor, delta: torch.Tensor,
                   kl_ref: torch.Tensor | None, cfg: TargetConfig, record: dict | None, shift=None):
    """Per-request NLL (token-averaged over the rewriting prompts) and KL on the KL prompt at its fact token,
    for the given rows (one forward of ``run``, a :class:`~lit_edit.truncated.RowForward` over ``batch``), with δ
    added to ``layer_module``'s output at each row's fact token. ``record`` (first pass) collects h_init and the KL
    reference. ``shift(batch_rows, width)``, if given, is also added to that output at every position (MetaKE's
    look-ahead, ``[rows, width, d]``). Shared by v* and MetaKE's meta-loss."""
    dev, dt = delta.device, delta.dtype
    req, lookup, kind = batch.req[rows].to(dev), batch.lookup[rows].to(dev), batch.kind[rows].to(dev)
    ar = torch.arange(len(rows), device=dev)
    kept: list = []
    rows_dev = rows.to(dev)

    def add_delta(h, sub):  # h: block L's output of the rows rows[sub] (one length group of the forward)
        s, p, r = ar[: len(sub)], lookup[sub], req[sub]
        if record is not None:  # §2.4: h_init = block-L output of the bare prompt at its fact token, before δ
            bare = kind[sub] == 0
            kept.append((r[bare], h[s[bare], p[bare]].detach().to(dt)))
        if shift is not None:
            h = h + shift(rows_dev[sub], h.shape[1]).to(h.dtype)
        return h.index_put((s, p), delta[r].to(h.dtype), accumulate=True)

    out = run(rows, (layer_module, add_delta))
    if record is not None:
        record["h_init"] = tuple(torch.cat(x) for x in zip(*kept))

    n = delta.shape[0]
    labels = batch.labels[rows].to(dev)
    scored = labels >= 0
    logp, row_of = label_logprobs(out, labels, delta.dtype)
    row_nll = torch.zeros(len(rows), device=dev, dtype=dt).index_add(0, row_of, -logp)
    row_nll = row_nll / scored.sum(1).clamp(min=1)
    rew = kind != 2
    nll = torch.zeros(n, device=dev, dtype=dt).index_add(0, req[rew], row_nll[rew])
    nll = nll / torch.zeros(n, device=dev, dtype=dt).index_add(0, req[rew], torch.ones_like(row_nll[rew])).clamp(min=1)

    kl_rows = ~rew
    kl_logp = torch.log_softmax(out.at(ar[kl_rows], lookup[kl_rows]).to(delta.dtype), dim=-1)
    if record is not None:  # first pass (δ = 0): this distribution is the KL reference
        record["kl_ref"] = (req[kl_rows], kl_logp.detach())
        ref = kl_logp.detach()
    else:
        ref = kl_ref[req[kl_rows]]
    if cfg.kl_direction == "current_ref":
        kl_row = (kl_logp.exp() * (kl_logp - ref)).sum(-1)
    else:
        kl_row = (ref.exp() * (ref - kl_logp)).sum(-1)
    kl = torch.zeros(n, device=dev, dtype=dt).index_add(0, req[kl_rows], kl_row)
    return nll, kl


@dataclass
class RowDescent:
    """The state of a per-row descent (:func:`descend_rows`): δ and, per row, h_init, the last loss and NLL, and
    the Adam step count."""

    delta: torch.Tensor
    h_init: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    steps: torch.Tensor
    history: list[float]


def descend_rows(n: int, d: int, device, dtype, n_steps: int, lr: float, clamp_norm_factor: float,
                 early_stop_loss: float, losses) -> RowDescent:
    """The §2 loop shared by v* and the window targets (§8.2): each of ``n`` rows has its own δ (d-dimensional,
    from 0) and Adam state; per iteration ``losses(it, active, state, backward)`` fills ``state.loss`` /
    ``state.nll`` of the active rows (and ``state.h_init`` at it = 0) and, when ``backward``, backpropagates their
    total into ``state.delta.grad``. A row stops once its loss is below ``early_stop_loss`` (§2.8); the last
    iteration only evaluates; after each step δ is clamped to ‖δ‖ ≤ clamp_norm_factor · ‖h_init‖."""
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
    state = RowDescent(zeros(n, d).requires_grad_(True), zeros(n, d), zeros(n), zeros(n),
                       torch.zeros(n, dtype=torch.long, device=device), [])
    m, v = zeros(n, d), zeros(n, d)
    active = torch.ones(n, dtype=torch.bool, device=device)
    last = n_steps - 1
    for it in range(n_steps):
        act_idx = active.nonzero()[:, 0]
        state.delta.grad = None
        losses(it, act_idx, state, it < last)
        state.history.append(state.loss[act_idx].mean().item())
        active &= ~(state.loss < early_stop_loss)  # §2.8: stop a row once its loss is below the threshold
        if it == last or not active.any():
            break
        adam_rows(state.delta, state.delta.grad, m, v, state.steps, active, lr,
                  clamp_norm_factor * state.h_init[active].norm(dim=-1, keepdim=True))
    state.delta = state.delta.detach()
    return state


def optimise_targets(model, layout, layer: int, batch: TargetBatch, cfg: TargetConfig) -> TargetResult:
    """Batched §2 loop: per-request Adam (betas 0.9/0.999, eps 1e-8, as torch.optim.Adam), clamp, early stop."""
    block = block_module(model, layout, layer)
    dev = next(model.parameters()).device
    n, d = batch.n, hidden_size(model)
    dt = opt_dtype(model)
    kl_ref = [torch.zeros(n, 1, device=dev, dtype=dt)]  # the reference distributions, recorded at it = 0
    chunk = cfg.chunk_size or n
    # δ enters at block L's output at the fact token: blocks 0 … L and the columns before the fact token are the same
    # at every iteration (§2.10)
    run = RowForward(model, layout, batch.ids, batch.mask, start=layer + 1, from_col=batch.lookup)

    def losses(it: int, act_idx: torch.Tensor, st: RowDescent, backward: bool) -> None:
        act_idx = act_idx.cpu()
        for c0 in range(0, len(act_idx), chunk):
            reqs = act_idx[c0 : c0 + chunk]
            rows = torch.isin(batch.req, reqs).nonzero()[:, 0]
            record = {} if it == 0 else None
            nll, kl = request_losses(run, block, batch, rows, st.delta, kl_ref[0], cfg, record)
            if record is not None:
                r_idx, h = record["h_init"]
                st.h_init[r_idx.to(dev)] = h
                k_idx, k = record["kl_ref"]
                if kl_ref[0].shape[1] != k.shape[1]:
                    kl_ref[0] = torch.zeros(n, k.shape[1], device=dev, dtype=dt)
                kl_ref[0][k_idx.to(dev)] = k
                kl = torch.zeros_like(kl)  # δ = 0 on the first pass, so KL is exactly zero
            total = nll + cfg.kl_factor * kl + weight_decay_term(st.delta, st.h_init, cfg.v_weight_decay)
            sel = reqs.to(dev)
            st.loss[sel] = total[sel].detach()
            st.nll[sel] = nll[sel].detach()
            if backward:
                total[sel].sum().backward()

    st = descend_rows(n, d, dev, dt, cfg.v_num_grad_steps, cfg.v_lr, cfg.clamp_norm_factor, cfg.early_stop_loss,
                      losses)
    return TargetResult(st.h_init + st.delta, st.h_init, st.delta, st.loss, st.nll, st.steps.cpu(), st.history)


def compute_targets(model, tok, layout, layer: int, requests: list[EditRequest], context_templates: list[str],
                    cfg: TargetConfig) -> TargetResult:
    return optimise_targets(model, layout, layer, build_target_batch(tok, requests, context_templates, cfg), cfg)


def compute_targets_reference(model, tok, layout, layer, requests, context_templates, cfg: TargetConfig) -> torch.Tensor:
    """The reference repos' way: one request at a time, ``torch.optim.Adam`` on δ (MEMIT ``compute_z``), every
    iteration a plain forward of the whole model (:func:`~lit_edit.truncated.reference_forward`). Kept as the baseline
    of ``benchmarks/edit_throughput.py`` and the equality test."""
    block = block_module(model, layout, layer)
    dev = next(model.parameters()).device
    out = []
    for r in requests:
        b = build_target_batch(tok, [r], context_templates, cfg)
        rows = torch.arange(len(b.req))
        with reference_forward():
            run = RowForward(model, layout, b.ids, b.mask, start=layer + 1)
        delta = torch.zeros(1, hidden_size(model), device=dev, dtype=opt_dtype(model), requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        rec: dict = {}
        nll, _ = request_losses(run, block, b, rows, delta, None, cfg, rec)
        h_init = torch.zeros_like(delta).detach()
        h_init[rec["h_init"][0]] = rec["h_init"][1]
        kl_ref = rec["kl_ref"][1]
        for it in range(cfg.v_num_grad_steps):
            if it > 0:
                nll, kl = request_losses(run, block, b, rows, delta, kl_ref, cfg, None)
            else:
                kl = torch.zeros_like(nll)
            loss = nll + cfg.kl_factor * kl + weight_decay_term(delta, h_init, cfg.v_weight_decay).sum()  # one row
            if loss.item() < cfg.early_stop_loss or it == cfg.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                max_norm = cfg.clamp_norm_factor * h_init.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
        out.append((h_init + delta).detach()[0])
    return torch.stack(out)
