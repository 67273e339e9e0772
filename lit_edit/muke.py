"""Memory targets for unstructured edits: One-for-All, AnyEdit windows and μKE (Matryoshka) (docs/algorithms.md §8;
μKE paper Eq. 2, 4, 10–12).

An unstructured request is a question X (already in the chat template) and a long answer Y of T tokens. Y is
cut into N windows Y_0 … Y_{N−1} of W tokens (:func:`split_windows`); window w owns a *working memory*: the
output of block L = layers[-1] at the token just before the window, ``p_w = Q − 1 + start_w`` (§8.1), to which
a shift δ_w is added. Windows are optimised in order w = 0, 1, …; the shifts of earlier windows stay
(frozen) in every later forward. The three methods differ only in the loss of window w:

* ``one_for_all`` (paper Eq. 2): a single window = the whole answer, memory at the last question token;
* ``anyedit`` (Eq. 4): input X ⧺ Y_{<end_w} (growing), NLL of window w's tokens averaged over |Y_w|;
* ``muke`` (Eq. 10–11): input X ⧺ Y (always the full sequence), NLL of every token from start_w on, token j
  of window k weighted by c_j = Σ_{m≥k} λ_{w,m} / (N − w) (:func:`matryoshka_token_weights`), the sum divided
  by n_w = T − start_w (as the reference code does, §8.2). λ = 1 (``matryoshka``) or λ_{w,m} = 2 − a(w, m)
  with the gradient affinity a of Eq. 12 (``context-affinity``, :func:`compute_affinities`).

Each δ_w is optimised as §2 without the KL term: Adam (lr 0.5), loss + v_weight_decay · ‖δ‖ / ‖h_init‖²,
clamp ‖δ‖ ≤ c · ‖h_init‖ after each step, early stop below ``early_stop_loss``, and the last iteration never
steps. The result is z_w = h_init + δ_w.

Several requests are optimised at once: at step w every request that still has a window w contributes one
right-padded row with its own δ, Adam state, clamp and early stop; rows never interact (causal attention,
right padding), so a batch gives the same z as each request alone (tested).

For the closed-form write (§8.5, MEMIT layer loop) :func:`compute_window_keys` returns one key column per
window (request-then-window order) and optionally the preservation keys at all other real positions, and
:func:`compute_window_states` the current block-L outputs at the memory positions (H_L in R = (Z − H_L)/(m − i)).

Token ids: the model input is always the question ids ⧺ answer ids tokenised *separately*, so every memory
position is exact by construction; :func:`tokenize_unstructured` checks whether tokenising the joined string
gives the same ids (§8.5 ⚠) and either records the mismatch (default, the separate ids are used) or raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_edit import checks
from lit_edit.editing import capture_at
from lit_edit.hooks import capture_inputs, capture_outputs
from lit_edit.layouts import block_module, edited_module
from lit_edit.requests import MUKE_TEMPLATES
from lit_edit.targets import adam_rows, descend_rows, hidden_size, label_logprobs, opt_dtype, weight_decay_term
from lit_edit.tokens import context_length, pad_batch
from lit_edit.truncated import Readout, RowForward
from lit_edit.windows import (ON_MISMATCH, WindowedSequence, _check_windows, memory_positions,  # noqa: F401
                              split_windows, tokenize_unstructured, windowed)

METHODS = ("one_for_all", "anyedit", "muke")
COEFFICIENTS = ("matryoshka", "context-affinity")
PAIRINGS = ("paper", "legacy")


# ----------------------------------------------------------------------------------------------------------
# Matryoshka coefficients (§8.3; Eq. 10–12)

def affinity_lambdas(affinity_row, pairing: str = "paper") -> list[float]:
    """Figure weights λ_{w,m} (m = w … N−1) from the affinity row ``[a(w,w) = 1, a(w,w+1), …, a(w,N−1)]``.

    ``paper`` (Eq. 12): λ_{w,m} = 2 − a(w, m). ``legacy`` (the reference code, §8.3 ⚠): the figures are walked
    from the longest while the affinities are walked from the start, so the figure ending at window m gets
    2 − a(w, w + N − 1 − m): the full figure gets 1, the single-window figure 2 − a(w, N−1).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"affinity pairing must be one of {PAIRINGS}, got {pairing!r}")
    a = [float(x) for x in affinity_row]
    if not a:
        raise ValueError("empty affinity row")
    if pairing == "legacy":
        a = a[::-1]
    return [2.0 - x for x in a]


def matryoshka_token_weights(windows, w: int, lam=None) -> torch.Tensor:
    """Per-target-token coefficients c_j (float64, length T) of window w's Matryoshka loss.

    Eq. 10: L_μ(δ_w) = −1/(N − w) · Σ_{m=w}^{N−1} λ_{w,m} log P(F_{w,m}), figure F_{w,m} = (Y_w … Y_m); regrouped
    per window (Eq. 11) a token of window k ≥ w gets c = Σ_{m=k}^{N−1} λ_{w,m} / (N − w); tokens before start_w
    get 0. ``lam`` = [λ_{w,w}, …, λ_{w,N−1}]; None is the constant variant λ = 1, c = (N − k)/(N − w).
    (The loss then divides Σ_j c_j (−log p_j) by n_w = T − start_w, §8.2.)
    """
    windows = [tuple(x) for x in windows]
    N = len(windows)
    _check_windows(windows, windows[-1][1] if windows else 1)
    if not 0 <= w < N:
        raise ValueError(f"window {w} out of range for {N} windows")
    lam = [1.0] * (N - w) if lam is None else [float(x) for x in lam]
    if len(lam) != N - w:
        raise ValueError(f"need N − w = {N - w} figure weights λ_{{w,w..N−1}}, got {len(lam)}")
    c = torch.zeros(windows[-1][1], dtype=torch.float64)
    tail = 0.0
    for k in range(N - 1, w - 1, -1):  # Eq. 11: the coefficient of window k is the sum of λ over figures m ≥ k
        tail += lam[k - w]
        s, e = windows[k]
        c[s:e] = tail / (N - w)
    return c


# ----------------------------------------------------------------------------------------------------------
# batched per-window optimisation (§8.2, §8.4)

@dataclass
class WindowConfig:
    """§8.2/§8.4 hyper-parameters; defaults = MUKE ``MEMIT_Mat`` on Llama-3-8B-Instruct (§10.4)."""

    method: str = "muke"  # "one_for_all" | "anyedit" | "muke"
    window_size: int = 30  # W (ignored by one_for_all)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    clamp_norm_factor: float = 4.0
    v_weight_decay: float = 1e-3
    early_stop_loss: float = 1e-2
    coefficients: str = "context-affinity"  # μKE λ: "matryoshka" (λ = 1) | "context-affinity" (2 − a, Eq. 12)
    affinity_pairing: str = "paper"  # "paper" | "legacy" (the reference code's reversed pairing, §8.3 ⚠)
    affinity_steps: int = 3  # T_aff
    on_mismatch: str = "separate"  # joint vs separate tokenisation, see tokenize_unstructured
    preservation: bool = False  # §8.5: the other positions of the edited sequences as preservation keys (residual 0)
    # which positions: "input" (the Q + T − 1 model input) or "reference" (Q + T: the answer's last token too, as the
    # μKE code reads them from question and answer tokenised jointly), docs/algorithms.md §8.5
    preservation_positions: str = "input"
    chat: bool = True  # wrap the question in the tokenizer's chat template (and end the answer with its end of turn)
    template: str | None = None  # "llama3" | "qwen2.5": MUKE's fixed prompt strings instead of the tokenizer's template
    metric_style: str | None = None  # None: torchmetrics word BLEU / ROUGE-L F; "reference": the reference code's
    # character-level BLEU and rouge-package ROUGE-L recall (lit_edit.metrics.text_scores), to compare published numbers

    def __post_init__(self):
        n = lambda field: f"model.method.init_args.{field}"  # noqa: E731  (the setting as written in the YAML config)
        for name, allowed in (("method", METHODS), ("coefficients", COEFFICIENTS), ("affinity_pairing", PAIRINGS),
                              ("on_mismatch", ON_MISMATCH), ("template", (None, *MUKE_TEMPLATES)),
                              ("metric_style", (None, "torchmetrics", "reference")),
                              ("preservation_positions", PRESERVATION_POSITIONS)):
            checks.choice(n(name), getattr(self, name), allowed)
        checks.integer(n("window_size"), self.window_size, ge=1)  # tokens per window
        # as for v*: 1 evaluates without a step (z = h_init), 0 would never run
        checks.integer(n("v_num_grad_steps"), self.v_num_grad_steps, ge=1)
        checks.number(n("v_lr"), self.v_lr, gt=0)
        checks.number(n("clamp_norm_factor"), self.clamp_norm_factor, gt=0)  # ‖δ‖ <= factor·‖h_init‖: 0 pins δ = 0
        checks.number(n("v_weight_decay"), self.v_weight_decay, ge=0)
        checks.number(n("early_stop_loss"), self.early_stop_loss, ge=0)  # the loss is >= 0: 0 never stops early
        checks.integer(n("affinity_steps"), self.affinity_steps, ge=1)  # the affinity averages over T_aff steps
        checks.boolean(n("preservation"), self.preservation)
        checks.boolean(n("chat"), self.chat)


@dataclass
class _Rows:
    """One right-padded row per request taking part in a window step."""

    ids: torch.Tensor  # [B, S]
    mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] target id at scored positions, -100 elsewhere
    weights: torch.Tensor  # [B, S] per-token coefficient c_j (0 elsewhere)
    window: torch.Tensor  # [B, S] window index of the scored token (-1 elsewhere)
    norm: torch.Tensor  # [B] divisor of the weighted NLL
    pos: torch.Tensor  # [B] memory position of the window being optimised
    fr_row: torch.Tensor  # [F] frozen earlier deltas: row, position, vector
    fr_pos: torch.Tensor
    fr_vec: torch.Tensor  # [F, d]


def _build_rows(requests, idx, w, method, lam, frozen, pad, dev, dt, d) -> _Rows:
    """Rows of the requests ``idx`` for window w. ``method``: "anyedit"/"one_for_all" (input up to the window's
    end, labels on the window, weight 1, divisor |Y_w|), "muke" (full input, labels from start_w on with the
    Matryoshka weights of ``lam[i]``, divisor n_w = T − start_w), or "figures" (full input, labels from start_w
    on, for the affinity figures). ``frozen[i]`` = δ_0 … δ_{w−1} of request i (re-added, no gradient)."""
    seqs, labs, wts, wins, norm, pos, fr = [], [], [], [], [], [], ([], [], [])
    for b, i in enumerate(idx):
        r = requests[i]
        s, e = r.windows[w]
        if method in ("anyedit", "one_for_all"):
            ids, last, c, n = r.input_ids[: r.Q - 1 + e], e, torch.ones(e - s, dtype=torch.float64), e - s
        else:
            ids, last, n = r.input_ids, r.T, r.T - s
            c = matryoshka_token_weights(r.windows, w, lam[i])[s:] if method == "muke" else torch.ones(r.T - s)
        lab = torch.full((len(ids),), -100, dtype=torch.long)
        lab[r.Q - 1 + s: r.Q - 1 + last] = torch.tensor(r.target_ids[s:last])
        wt = torch.zeros(len(ids), dtype=torch.float64)
        wt[r.Q - 1 + s: r.Q - 1 + last] = c
        win = torch.full((len(ids),), -1, dtype=torch.long)
        for k, (ks, ke) in enumerate(r.windows[w:], start=w):
            win[r.Q - 1 + ks: r.Q - 1 + min(ke, last)] = k
        seqs.append(ids), labs.append(lab), wts.append(wt), wins.append(win), norm.append(n), pos.append(r.positions[w])
        for j, d_j in enumerate(frozen[i][:w]):
            fr[0].append(b), fr[1].append(r.positions[j]), fr[2].append(d_j)
    ids, mask = pad_batch(seqs, pad)

    def padded(rows, fill, dtype):
        out = torch.full(ids.shape, fill, dtype=dtype)
        for b, x in enumerate(rows):
            out[b, : len(x)] = x
        return out.to(dev)

    long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    return _Rows(ids.to(dev), mask.to(dev), padded(labs, -100, torch.long), padded(wts, 0.0, dt), padded(wins, -1, torch.long),
                 torch.tensor(norm, dtype=dt, device=dev), long(pos), long(fr[0]), long(fr[1]),
                 torch.stack(fr[2]).to(device=dev, dtype=dt) if fr[2] else torch.zeros(0, d, device=dev, dtype=dt))


def _forward(run: RowForward, block, rows: _Rows, sel: torch.Tensor, delta: torch.Tensor,
             record: dict | None) -> Readout:
    """One forward of rows ``sel`` (``run`` is a :class:`~lit_edit.truncated.RowForward` over ``rows``) with the
    frozen earlier deltas and ``delta[sel]`` added to ``block``'s output at the memory positions; ``record["h"]``
    gets h_init = the block output at the memory position before any δ (earlier windows' δ do not change block L's
    own output)."""
    if record is not None:
        record["h"] = torch.zeros(len(sel), delta.shape[1], dtype=delta.dtype, device=delta.device)
    local = torch.full((rows.ids.shape[0],), -1, dtype=torch.long, device=sel.device)

    def add(h, sub):  # h: block L's output of the rows sel[sub] (one length group of the forward)
        mine, s = sel[sub], torch.arange(len(sub), device=sel.device)
        local.fill_(-1)
        local[mine] = s
        keep = local[rows.fr_row] >= 0
        fb, fp, fv = local[rows.fr_row[keep]], rows.fr_pos[keep], rows.fr_vec[keep]
        pos = rows.pos[mine]
        if record is not None:
            record["h"][sub] = h[s, pos].detach().to(delta.dtype)
        if len(fb):
            h = h.index_put((fb, fp), fv.to(h.dtype), accumulate=True)
        return h.index_put((s, pos), delta[mine].to(h.dtype), accumulate=True)

    return run(sel, (block, add))


def _weighted_sum(logp: torch.Tensor, row_of: torch.Tensor, c: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(norm), dtype=logp.dtype, device=logp.device).index_add(0, row_of, -c * logp) / norm


def weighted_nll(out: Readout, labels: torch.Tensor, weights: torch.Tensor, norm: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Per row ``−Σ_j c_j log p(y_j) / n``: Eq. 4 (AnyEdit, c = 1, n = |Y_w|), Eq. 2 (One-for-All, one window)
    or Eq. 11 (μKE, c = Matryoshka coefficients, n = n_w). ``labels`` −100 = not scored."""
    logp, row_of = label_logprobs(out, labels, dtype)
    return _weighted_sum(logp, row_of, weights[labels >= 0].to(dtype), norm)


def _optimise_rows(run: RowForward, block, rows: _Rows, cfg: WindowConfig, d: int):
    """The §2 loop without KL for one window step (:func:`~lit_edit.targets.descend_rows`): per-row Adam, clamp,
    early stop, last iteration no step."""
    dt = rows.norm.dtype

    def losses(it: int, sel: torch.Tensor, st, backward: bool) -> None:
        record = {} if it == 0 else None
        out = _forward(run, block, rows, sel, st.delta, record)
        if record is not None:
            st.h_init[sel] = record["h"]
        nll = weighted_nll(out, rows.labels[sel], rows.weights[sel], rows.norm[sel], dt)
        total = nll + weight_decay_term(st.delta[sel], st.h_init[sel], cfg.v_weight_decay)
        st.loss[sel], st.nll[sel] = total.detach(), nll.detach()
        if backward:
            total.sum().backward()

    st = descend_rows(rows.ids.shape[0], d, rows.ids.device, dt, cfg.v_num_grad_steps, cfg.v_lr,
                      cfg.clamp_norm_factor, cfg.early_stop_loss, losses)
    return st.delta, st.h_init, st.loss, st.nll, st.steps


def compute_affinities(model, layout, layer: int, requests: list[WindowedSequence], cfg: WindowConfig,
                       pad: int = 0) -> list[list[list[float]]]:
    """Eq. 12 affinities, batched over requests: ``out[i][w] = [1, a(w,w+1), …, a(w,N−1)]`` (``[1]`` for the last
    window). For query window w (no earlier deltas, §8.4): a fresh δ at p_w takes ``affinity_steps`` Adam steps
    (lr v_lr, no clamp, no early stop) on window w's NLL (+ weight decay); before each step t, with state δ^t,
    g_m^t = ∇_δ [NLL of figure F_{w,m} (tokens start_w … end_m − 1, mean) + wd] for every m ≥ w, and
    a(w, m) = (1/T_aff) Σ_t cos(g_w^t, g_m^t)."""
    block = block_module(model, layout, layer)
    dev, dt, d = next(model.parameters()).device, opt_dtype(model), hidden_size(model)
    out = [[None] * (r.N - 1) + [[1.0]] for r in requests]
    no_frozen = [[] for _ in requests]
    for w in range(max(r.N for r in requests) - 1):
        idx = [i for i, r in enumerate(requests) if r.N - 1 > w]
        rows = _build_rows(requests, idx, w, "figures", None, no_frozen, pad, dev, dt, d)
        B = len(idx)
        n_fig = torch.tensor([requests[i].N - w for i in idx], device=dev)  # figures m = w … N−1
        delta = torch.zeros(B, d, device=dev, dtype=dt, requires_grad=True)
        m_, v_ = torch.zeros(B, d, device=dev, dtype=dt), torch.zeros(B, d, device=dev, dtype=dt)
        steps = torch.zeros(B, dtype=torch.long, device=dev)
        all_rows = torch.ones(B, dtype=torch.bool, device=dev)
        sel = torch.arange(B, device=dev)
        cos = torch.zeros(B, int(n_fig.max()), device=dev, dtype=dt)
        h_init = None
        # δ enters at block L's output at the memory position: the columns before it never change (§2.10)
        run = RowForward(model, layout, rows.ids, rows.mask, start=layer + 1, from_col=rows.pos)
        scored = rows.labels >= 0
        for t in range(cfg.affinity_steps):
            record = {} if t == 0 else None
            read = _forward(run, block, rows, sel, delta, record)
            if record is not None:
                h_init = record["h"]
            wd = weight_decay_term(delta, h_init, cfg.v_weight_decay)
            logp, row_of = label_logprobs(read, rows.labels, dt)  # every figure reads these tokens' log-probabilities
            grads = []
            for k in range(int(n_fig.max())):  # figure F_{w,w+k}: tokens of windows w … w+k, uniform weights
                in_fig = (rows.window >= 0) & (rows.window <= w + k)
                nll = _weighted_sum(logp, row_of, in_fig[scored].to(dt), in_fig.sum(1).clamp(min=1).to(dt))
                has = n_fig > k
                g, = torch.autograd.grad((nll + wd)[has].sum(), delta, retain_graph=True)
                grads.append(g)
            g_q = grads[0]  # the query figure is window w alone
            for k, g in enumerate(grads):
                cos[:, k] += (g_q * g).sum(-1) / (g_q.norm(dim=-1) * g.norm(dim=-1)).clamp(min=1e-30)
            if t < cfg.affinity_steps - 1:  # δ^{t+1}; the state after the last step is never used
                adam_rows(delta, g_q, m_, v_, steps, all_rows, cfg.v_lr, None)
        a = (cos / cfg.affinity_steps).cpu()
        for b, i in enumerate(idx):
            out[i][w] = [1.0] + a[b, 1: requests[i].N - w].tolist()
    return out


@dataclass
class WindowTargets:
    """Targets of one request: one row per window."""

    z: torch.Tensor  # [N, d] = h_init + δ (block-L output at the memory position, shifted)
    h_init: torch.Tensor  # [N, d]
    delta: torch.Tensor  # [N, d]
    positions: list[int]  # memory positions Q − 1 + start_w
    windows: list[tuple[int, int]]
    loss: torch.Tensor  # [N] loss (NLL + wd) at the last evaluated iteration of each window
    nll: torch.Tensor  # [N]
    steps: torch.Tensor  # [N] Adam updates taken
    lam: list[list[float]] | None = None  # μKE figure weights λ_{w, w..N−1} per window (None: not μKE)
    affinity: list[list[float]] | None = None  # [1, a(w,w+1), …] per window (context-affinity only)


def optimise_windows(model, layout, layer: int, requests: list[WindowedSequence], cfg: WindowConfig,
                     affinities: list[list[list[float]]] | None = None, pad: int = 0) -> list[WindowTargets]:
    """§8.2 for a batch of requests: windows in order w = 0, 1, …; at step w every request with a window w
    optimises its own δ_w in one batched forward, with its δ_0 … δ_{w−1} re-added (frozen). ``layer`` is
    z_layer = layers[-1]. For ``muke`` with ``context-affinity``, ``affinities`` (from
    :func:`compute_affinities`, e.g. cached) are computed when not given."""
    if not requests:
        return []
    if cfg.method == "one_for_all" and any(r.N != 1 for r in requests):
        raise ValueError("one_for_all needs one window per request (tokenize_unstructured(..., window_size=None))")
    lam_rows = None
    if cfg.method == "muke":
        if cfg.coefficients == "context-affinity":
            if affinities is None:
                affinities = compute_affinities(model, layout, layer, requests, cfg, pad)
            if [len(a) for a in affinities] != [r.N for r in requests]:
                raise ValueError("affinities must have one row per window of every request")
            lam_rows = [[affinity_lambdas(row, cfg.affinity_pairing) for row in a] for a in affinities]
        else:
            lam_rows = [[[1.0] * (r.N - w) for w in range(r.N)] for r in requests]
    block = block_module(model, layout, layer)
    dev, dt, d = next(model.parameters()).device, opt_dtype(model), hidden_size(model)
    res = {k: [[] for _ in requests] for k in ("delta", "h", "loss", "nll", "steps")}
    for w in range(max(r.N for r in requests)):
        idx = [i for i, r in enumerate(requests) if r.N > w]
        lam_w = {i: lam_rows[i][w] for i in idx} if lam_rows is not None else None
        rows = _build_rows(requests, idx, w, cfg.method, lam_w, res["delta"], pad, dev, dt, d)
        # δ enters at block L's output at the window's memory position; the earlier windows' frozen δ lie before it and
        # are the same at every iteration, so the columns before it never change (§2.10)
        run = RowForward(model, layout, rows.ids, rows.mask, start=layer + 1, from_col=rows.pos)
        delta, h, loss, nll, steps = _optimise_rows(run, block, rows, cfg, d)
        for b, i in enumerate(idx):
            for k, x in (("delta", delta), ("h", h), ("loss", loss), ("nll", nll), ("steps", steps)):
                res[k][i].append(x[b])
    out = []
    for i, r in enumerate(requests):
        delta, h = torch.stack(res["delta"][i]), torch.stack(res["h"][i])
        out.append(WindowTargets(h + delta, h, delta, r.positions, list(r.windows), torch.stack(res["loss"][i]),
                                 torch.stack(res["nll"][i]), torch.stack(res["steps"][i]).cpu(),
                                 lam_rows[i] if lam_rows is not None else None,
                                 affinities[i] if affinities is not None and cfg.method == "muke" else None))
    return out


# ----------------------------------------------------------------------------------------------------------
# keys and states for the batch update (§8.5)

PRESERVATION_POSITIONS = ("input", "reference")


def fed_ids(r: WindowedSequence, full: bool, n_ctx: int | None) -> list[int]:
    """The sequence the keys are read from: the model input, question ⧺ answer minus its last token (Q + T − 1), or
    with ``full`` (``preservation_positions: reference``) question ⧺ the whole answer (Q + T), when that fits the
    context (else the answer's last token cannot be read, and is left out as in the default). The memory
    positions' keys are the same either way (causal attention); ``full`` adds one preservation position."""
    ids = list(r.input_ids)
    if full and (n_ctx is None or len(ids) < n_ctx):
        ids.append(r.target_ids[-1])
    return ids


@dataclass
class WindowKeys:
    K: torch.Tensor  # [d_in, Σ_r N_r]: the edited module's input at each memory position, request-then-window
    columns: list[tuple[int, int]]  # (request, window) of each column of K
    K_p: torch.Tensor | None = None  # [d_in, n_p]: the inputs at every other real position (preservation keys)


def _gather(model, requests, capture, pad: int, chunk: int, preservation: bool, stop, full: bool = False):
    """The captured tensor at every memory position (request-then-window) of the question ⧺ target sequences (Q + T −
    1 tokens: what fits the context; ``full``: :func:`fed_ids`) and, with ``preservation``, at all their other real
    positions; the forwards end after the module ``stop``."""
    n_ctx = context_length(model)
    at, rest = capture_at(model, [fed_ids(r, full and preservation, n_ctx) for r in requests],
                          [list(r.positions) for r in requests], capture, pad, chunk, others=preservation, stop=stop)
    (key,) = at
    return at[key], (rest[key] if preservation else None)


def compute_window_keys(model, layout, layer: int, requests: list[WindowedSequence], preservation: bool = False,
                        pad: int = 0, chunk: int = 16, full: bool = False) -> WindowKeys:
    """§8.5 keys at ``layer``: one column per window of every request (the input of the edited matrix at the
    memory position in question ⧺ answer minus its last token), and with ``preservation`` the preservation keys K_p at all other
    real (non-padding) positions of the same sequences, row-major (request, position); ``full``: also the answer's
    last token (:func:`fed_ids`)."""
    mods = {layer: edited_module(model, layout, layer)}
    K, K_p = _gather(model, requests, lambda: capture_inputs(mods), pad, chunk, preservation, mods[layer], full)
    cols = [(i, w) for i, r in enumerate(requests) for w in range(r.N)]
    return WindowKeys(K.T.contiguous(), cols, K_p.T.contiguous() if K_p is not None else None)


def compute_window_states(model, layout, layer: int, requests: list[WindowedSequence], pad: int = 0,
                          chunk: int = 16) -> torch.Tensor:
    """[Σ_r N_r, d]: block-``layer`` output at every memory position (request-then-window), current model —
    H_L of the residual R = (Z − H_L)/(m − i) in the §4 layer loop."""
    blocks = {layer: block_module(model, layout, layer)}
    return _gather(model, requests, lambda: capture_outputs(blocks), pad, chunk, False, blocks[layer])[0]


class WindowColumns:
    """The columns of an unstructured batch for :func:`lit_edit.editing.apply_batch`: one target column per window
    of every request (request-then-window), then, with ``preservation``, one column per other real position of the
    same sequences with residual 0 (§8.5: their outputs are kept). Every column carries its request's ledger id,
    so removing the edit later drops its windows and its preservation columns together."""

    def __init__(self, seqs: list[WindowedSequence], fact_ids: list[str], preservation: bool, pad: int,
                 full: bool = False, n_ctx: int | None = None):
        self.seqs, self.preservation, self.pad, self.full = seqs, preservation, pad, full
        self.n_targets = sum(s.N for s in seqs)
        self.ids = [f for s, f in zip(seqs, fact_ids, strict=True) for _ in range(s.N)]
        starts = [sum(s.N for s in seqs[:j]) for j in range(len(seqs))]
        self.rows = [list(range(b, b + s.N)) for b, s in zip(starts, seqs)]  # the target rows of each request
        if preservation:
            self.ids += [f for s, f in zip(seqs, fact_ids) for _ in range(len(fed_ids(s, full, n_ctx)) - s.N)]

    def keys(self, model, layout, layers: list[int]) -> dict[int, torch.Tensor]:
        out = {}
        for l in layers:
            wk = compute_window_keys(model, layout, l, self.seqs, self.preservation, self.pad, full=self.full)
            out[l] = torch.cat([wk.K, wk.K_p], 1) if wk.K_p is not None else wk.K
        return out

    def states(self, model, layout, layer: int) -> torch.Tensor:
        return compute_window_states(model, layout, layer, self.seqs, self.pad)
