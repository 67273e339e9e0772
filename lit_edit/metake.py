"""MetaKE: bi-level refinement of the targets V through the downstream solver's local response
(MetaKE paper Algorithm 1, Eq. 5–9; docs/algorithms.md §7).

With the keys K of the batch at the last edited layer L, the block-L states H (n×d) and the solver's
gate M = solver.gate(L, K) (n×d_in, frozen for the batch), a virtual look-ahead writes

    Δ_proxy(V) = (V − H)ᵀ M          into layer L only (y ← y + x Δ_proxyᵀ, no weight copy; added to block L's
                                      kept output when y feeds the residual sum, docs/algorithms.md §2.10),

and T steps of gradient descent minimise the meta-loss on that virtual model,

    L_meta(V) = w_edit · Σ_i NLL_i(target | rewriting prompts)
              + w_loc  · Σ_i KL(P_pre ‖ P_virtual)("{subject} is a", at the fact token)
              + w_anchor · ‖V − V_init‖²_F,

whose gradient with respect to V is (∂L/∂Δ_proxy) Mᵀ + 2 w_anchor (V − V_init) (Eq. 9; autograd through the
linear map gives exactly this). Because every lit_edit solver exposes gate() (and tests that it equals
its actual response), the refinement works over MEMIT, AlphaEdit and the aligned family alike.

The realisation matrix T = M K (n×n) is what a residual R becomes at the keys (Δ K = R T); its diagonal is
the predicted realisation β and S = T (I − T)⁻¹ the association matrix, ρ = diag S (App. A.1).
"""
from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from lit_edit import checks
from lit_edit.distributed import all_reduce_sum
from lit_edit.editing import (apply_post_norm_map, capture_at, compute_block_states, compute_keys, layer_residuals,
                              post_norm_map, through_post_norm)
from lit_edit.hooks import add_to_output, capture_inputs
from lit_edit.layouts import block_module, edited_module, get_weight, post_norm_module
from lit_edit.targets import TargetConfig, build_target_batch, hidden_size, opt_dtype, request_losses
from lit_edit.tokens import pad_id
from lit_edit.truncated import RowForward, output_reaches_block_output, truncating


@dataclass
class MetaKEConfig:
    """MetaKE options. Defaults are the paper's (T = 15, η = 5e-3, plain gradient descent, unit weights).

    Choices the paper leaves open (docs/algorithms.md §7.2 ⚠), as options: the edit prompts x_e are the
    context-prefixed rewriting prompts of §2 with token-averaged NLL (``edit_prompts: context``) or the bare
    rewriting prompt alone (``bare``: a sixth of the rows per iteration with the world's 5 context templates);
    the locality KL is read at the fact token of ``loc_prompt`` (the MEMIT position); the T steps stop early
    once an iteration lowers the meta-loss by less than ``tol`` of its value (0, the default: never, as the
    paper).
    """

    bilevel: str = "metake"  # "metake" | "none" (plain solver: V = V_init)
    T: int = 15
    eta: float = 5e-3
    optimizer: str = "sgd"  # "sgd" (the paper) | "adam"
    gate: str = "structural"  # "structural" (the solver's gate) | "key_only" (ablation: Kᵀ(KKᵀ + I)⁻¹)
    feedback: str = "full"  # "full" | "stop_grad" (ablation: Δ_proxy detached, only the anchor moves V)
    w_edit: float = 1.0
    w_loc: float = 1.0
    w_anchor: float = 1.0
    loc_prompt: str = "{} is a"
    kl_direction: str = "ref_current"  # KL(P_pre ‖ P_post) as the paper (MEMIT's v* code uses the other one)
    proxy_fidelity: bool = False  # App. C.5 diagnostic: cos(g_proxy, g_true) through the full multi-layer solve
    edit_prompts: str = "context"  # x_e: "context" (the 6 context-prefixed prompts of §2) | "bare" (the prompt alone)
    tol: float = 0.0  # stop once an iteration lowers L_meta by less than tol·|L_meta| (0: run all T steps)

    def __post_init__(self):
        n = lambda field: f"model.method.init_args.{field}"  # noqa: E731  (the setting as written in the YAML config)
        for name, allowed in (("bilevel", ("metake", "none")), ("optimizer", ("sgd", "adam")),
                              ("gate", ("structural", "key_only")), ("feedback", ("full", "stop_grad")),
                              ("kl_direction", ("ref_current", "current_ref")), ("edit_prompts", ("context", "bare"))):
            checks.choice(n(name), getattr(self, name), allowed)
        checks.integer(n("T"), self.T, ge=0)  # 0: V stays V_init, only the diagnostics (β, ρ, the loss) are measured
        checks.number(n("eta"), self.eta, gt=0)
        for name in ("w_edit", "w_loc", "w_anchor"):
            checks.number(n(name), getattr(self, name), ge=0)  # a negative weight would reward its term
        checks.subject_template(n("loc_prompt"), self.loc_prompt)
        checks.boolean(n("proxy_fidelity"), self.proxy_fidelity)
        checks.number(n("tol"), self.tol, ge=0)  # a relative decrease (0: run all T steps)


def key_only_gate(K: torch.Tensor) -> torch.Tensor:
    """Table 2's "w/o structural gate": M_key = Kᵀ (K Kᵀ + I)⁻¹ = (KᵀK + I)⁻¹ Kᵀ (n×d_in), no projector, no C_p."""
    K = K.double()
    return torch.linalg.solve(K.T @ K + torch.eye(K.shape[1], dtype=K.dtype, device=K.device), K.T)


def realisation(M: torch.Tensor, K: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted realisation of a gate M on keys K: T = M K, β = diag T, ρ = diag(T (I − T)⁻¹) (App. A.1)."""
    T = M.double() @ K.double().to(M.device)
    eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
    S = torch.linalg.solve((eye - T).T, T.T).T
    return {"beta": T.diagonal().clone(), "rho": S.diagonal().clone()}


class MetaObjective:
    """The meta-loss of one batch, with everything measured on the pre-batch model frozen: keys K and states
    H at layer L, the gate M, the tokenised prompts and the pre-edit locality distributions."""

    def __init__(self, model, tok, layout, solver, layers: list[int], requests, context_templates: list[str],
                 V_init: torch.Tensor, tcfg: TargetConfig, cfg: MetaKEConfig, own: list[int] | None = None):
        self.model, self.cfg = model, cfg
        self.L = layers[-1]
        dev = next(model.parameters()).device
        self.dt = opt_dtype(model)
        self.K = compute_keys(model, tok, layout, [self.L], requests, context_templates, tcfg.fact_token,
                              tcfg.legacy_bos_shift)[self.L]
        self.H = compute_block_states(model, tok, layout, self.L, requests, tcfg.fact_token,
                                      tcfg.legacy_bos_shift).to(dev, self.dt)
        M = key_only_gate(self.K) if cfg.gate == "key_only" else solver.gate(self.L, self.K)
        self.M64 = M.detach()
        self.M = M.detach().to(dev, self.dt)
        # where layer L's matrix output passes a norm before the residual sum (Gemma 3), the write maps the residual
        # R through it before the solve (editing.through_post_norm), and so does the look-ahead: Δ_proxy = D(R)ᵀ M,
        # D the same per-request linear map at the same keys (``post``: its scale and unreachable direction, d × n)
        norm = post_norm_module(model, layout, self.L)
        self.post = None
        if norm is not None:
            scale, v = post_norm_map(norm, get_weight(model, layout, self.L).detach(), self.K.detach())
            self.post = (scale.to(dev, self.dt), v.to(dev, self.dt))
        self.V_init = V_init.detach().to(dev, self.dt)
        self.tcfg = replace(tcfg, kl_prompt=cfg.loc_prompt, kl_direction=cfg.kl_direction)
        # the gate's keys above stay the solver's (context-averaged); only the meta-loss prompts x_e may be bare
        edit_contexts = ["{}"] if cfg.edit_prompts == "bare" else context_templates
        self.batch = build_target_batch(tok, requests, edit_contexts, self.tcfg)
        # the requests whose loss terms this process evaluates (all of them, or its DDP shard: the meta-loss is a
        # sum over requests, so the shards' gradients add up to the full one)
        self.own = torch.arange(len(requests)) if own is None else torch.tensor(own, dtype=torch.long)
        self.rows = torch.isin(self.batch.req, self.own).nonzero()[:, 0]
        self.block = block_module(model, layout, self.L)
        self.module = edited_module(model, layout, self.L)
        self.zero = torch.zeros(len(requests), hidden_size(model), device=dev, dtype=self.dt)
        self.layout, self.runs, self.P = layout, {}, None
        record: dict = {}
        self.kl_ref = None
        if len(self.rows):
            first = self.batch.ids[self.rows[0], : int(self.batch.mask[self.rows[0]].sum())].tolist()
            if truncating() and output_reaches_block_output(model, layout, self.L, first):
                self.P = self.gate_responses(model, tok)
            start = self.L + 1 if self.P is not None else self.L
            with torch.no_grad():  # also keeps the block outputs below start for the look-ahead's forwards
                request_losses(self.run_from(start), self.block, self.batch, self.rows, self.zero, None,
                               self.tcfg, record)
            idx, ref = record["kl_ref"]
            self.kl_ref = torch.zeros(len(requests), ref.shape[1], device=dev, dtype=self.dt)
            self.kl_ref[idx.to(dev)] = ref

    def run_from(self, start: int) -> RowForward:
        """Forwards of the meta-loss prompts that compute blocks ``start`` … only: the look-ahead changes block L's
        output (start = L + 1, :meth:`gate_responses`) or its edited matrix (start = L), the true multi-layer solve
        every edited layer (start = the lowest)."""
        if start not in self.runs:
            self.runs[start] = RowForward(self.model, self.layout, self.batch.ids, self.batch.mask, start)
        return self.runs[start]

    @torch.no_grad()
    def gate_responses(self, model, tok) -> torch.Tensor:
        """P = X Mᵀ ([rows, T, n], zero at padding): the look-ahead's Δ_proxy = Rᵀ M changes layer L's edited
        matrix's output by X Mᵀ R at the inputs X of every position, and that output reaches block L's output
        unchanged (checked by :func:`~lit_edit.truncated.output_reaches_block_output`): so the look-ahead adds P R
        to block L's output, and block L, whose inputs the look-ahead does not change, is not run again."""
        lengths = self.batch.mask.sum(1)
        seqs = [self.batch.ids[b, : int(lengths[b])].tolist() for b in self.rows]
        got, _ = capture_at(model, seqs, [list(range(len(q))) for q in seqs],
                            lambda: capture_inputs({0: self.module}), pad_id(tok), stop=self.module)
        P = torch.zeros(*self.batch.ids.shape, self.M.shape[0], device=self.M.device, dtype=self.dt)
        real = torch.zeros(self.batch.ids.shape, dtype=torch.bool)
        real[self.rows] = self.batch.mask[self.rows].bool()
        P[real.to(P.device)] = got[0].to(self.dt) @ self.M.T  # row-major over the rows' real positions, as gathered
        return P

    def proxy_residual(self, V: torch.Tensor) -> torch.Tensor:
        """R_L(V) = V − H (n×d), detached for the stop-grad ablation; mapped through the post-norm where there is one
        (rows: requests, so the map's columns are its rows)."""
        R = V - self.H
        if self.post is not None:
            R = apply_post_norm_map(*self.post, R.T).T
        return R.detach() if self.cfg.feedback == "stop_grad" else R

    def row_chunks(self) -> list[torch.Tensor]:
        """The rows of this process's requests in groups of ``chunk_size`` requests (v*'s setting; 0: one group).
        L_meta is a sum over requests plus the anchor, so the groups' losses and gradients add up to the whole
        batch's, and one iteration holds only one group's activations (what lets real-shape batches fit)."""
        size = self.tcfg.chunk_size
        if not size or size >= len(self.own):
            return [self.rows]
        req = self.batch.req[self.rows]
        return [self.rows[torch.isin(req, self.own[c : c + size])] for c in range(0, len(self.own), size)]

    def loss_in_current_model(self, V: torch.Tensor, start: int | None = None, shift=None,
                              rows: torch.Tensor | None = None, anchor: bool = True) -> tuple[torch.Tensor, dict]:
        """L_meta evaluated on the model as it is now (the caller installs the look-ahead or a real update), plus
        ``shift`` at block L's output (see :func:`~lit_edit.targets.request_losses`); blocks below ``start``
        (default L) must be as they were before the batch. ``rows`` (default: all of this process's) restricts the
        NLL and KL terms to those rows' requests; ``anchor=False`` leaves out the anchor term (a chunk after the
        first, :meth:`row_chunks`)."""
        rows = self.rows if rows is None else rows
        if len(rows):
            run = self.run_from(self.L if start is None else start)
            nll, kl = request_losses(run, self.block, self.batch, rows, self.zero, self.kl_ref, self.tcfg, None, shift)
        else:  # an all-padding DDP shard contributes only zeros (it still joins the collectives)
            nll = kl = torch.zeros(len(self.zero), device=V.device, dtype=self.dt)
        own = self.own.to(V.device)
        anchor_term = (V[own] - self.V_init[own]).pow(2).sum() if anchor else V.new_zeros(())
        c = self.cfg
        total = c.w_edit * nll.sum() + c.w_loc * kl.sum() + c.w_anchor * anchor_term
        return total, {"nll": nll.detach(), "kl": kl.detach(), "anchor": anchor_term.detach()}

    def loss(self, V: torch.Tensor, rows: torch.Tensor | None = None, anchor: bool = True) -> tuple[torch.Tensor, dict]:
        """L_meta on the virtual look-ahead model W_L + Δ_proxy(V): P R added to block L's output (blocks from L + 1
        run, :meth:`gate_responses`), or, where that does not hold or inside ``reference_forward``, a hook on layer
        L's edited matrix (blocks from L run). ``rows`` / ``anchor``: as :meth:`loss_in_current_model`."""
        R = self.proxy_residual(V)
        if self.P is not None:
            return self.loss_in_current_model(V, self.L + 1, lambda rows, width: self.P[rows, :width] @ R, rows, anchor)
        with add_to_output(self.module, lambda x: (x.to(self.dt) @ self.M.T) @ R):
            return self.loss_in_current_model(V, rows=rows, anchor=anchor)

    def evaluate(self, V: torch.Tensor, backward: bool) -> tuple[torch.Tensor, dict]:
        """L_meta (detached) and its parts over :meth:`row_chunks`; with ``backward`` each chunk's loss is
        backpropagated as soon as it is computed, so V.grad ends as the whole loss's gradient."""
        total, parts = None, None
        for i, rows in enumerate(self.row_chunks()):
            t, p = self.loss(V, rows, anchor=i == 0)
            if backward and t.requires_grad:
                t.backward()
            total = t.detach() if total is None else total + t.detach()
            parts = p if parts is None else {k: parts[k] + p[k] for k in parts}
        return total, parts


def solved_meta_loss(obj: MetaObjective, tok, layout, solver, layers: list[int], requests, context_templates,
                     V: torch.Tensor, tcfg: TargetConfig) -> torch.Tensor:
    """L_meta after the *actual* multi-layer write of V (§4 loop: keys and block-L states recomputed after each
    layer, residual spread over the layers left, Δ_l = solver.solve), applied virtually by hooks and
    differentiable in V through every stage. Regularisers' Φ is not applied (straight-through, §7.6)."""
    model = obj.model
    keys = lambda l: compute_keys(model, tok, layout, [l], requests, context_templates, tcfg.fact_token,  # noqa: E731
                                  tcfg.legacy_bos_shift, grad=True)[l]
    states = lambda L: compute_block_states(model, tok, layout, L, requests, tcfg.fact_token,  # noqa: E731
                                            tcfg.legacy_bos_shift, grad=True)
    with ExitStack() as stack:
        for l, K, R in layer_residuals(layers, V, keys, states):
            norm = post_norm_module(model, layout, l)
            if norm is not None:  # as the write (editing.apply_batch), differentiably
                R = through_post_norm(norm, get_weight(model, layout, l), K, R)
            delta = solver.solve(l, K, R)
            stack.enter_context(add_to_output(edited_module(model, layout, l), lambda x, D=delta: x.to(D.dtype) @ D.T))
        return obj.loss_in_current_model(V, start=min(layers))[0]


def proxy_fidelity(obj: MetaObjective, tok, layout, solver, layers, requests, context_templates, V: torch.Tensor,
                   tcfg: TargetConfig, eta: float) -> dict[str, float]:
    """App. C.5: cosine between the proxy hypergradient and the true one through the full multi-layer solve, and
    the one-step decrease of the true loss along the proxy step, in basis points: 10⁴ (L(v) − L(v − η g)) / |L(v)|."""
    V = V.detach().requires_grad_(True)
    g_proxy = all_reduce_sum(torch.autograd.grad(obj.loss(V)[0], V)[0])  # sums of the DDP shards' parts
    true = solved_meta_loss(obj, tok, layout, solver, layers, requests, context_templates, V, tcfg)
    g_true = all_reduce_sum(torch.autograd.grad(true, V)[0])
    true = all_reduce_sum(true.detach())
    with torch.no_grad():
        after = all_reduce_sum(solved_meta_loss(obj, tok, layout, solver, layers, requests, context_templates,
                                                V - eta * g_proxy, tcfg))
    cos = torch.nn.functional.cosine_similarity(g_proxy.flatten().double(), g_true.flatten().double(), dim=0)
    return {"proxy_cosine": cos.item(), "one_step_bp": 1e4 * (true.item() - after.item()) / (abs(true.item()) + 1e-12)}


@dataclass
class Refinement:
    V: torch.Tensor  # [n, d] refined targets
    history: list[float]  # L_meta per iteration (before each update) and after the last
    nll: torch.Tensor  # [n] edit NLL on the virtual model at the end
    beta: torch.Tensor  # [n] predicted realisation diag(M K)
    rho: torch.Tensor  # [n] association
    H: torch.Tensor  # [n, d] block-L states before the edit (for the empirical realisation β̂)
    fidelity: dict | None = None  # proxy_cosine, one_step_bp (when cfg.proxy_fidelity)
    # [n] ‖∇_V L_meta‖ per request at V = V_init, where the anchor's gradient is 0 (zeros if V never had a gradient).
    # Since ∇ = ∇(L_edit + L_loc) + 2 w_anchor (V − V_init), the meta-loss's stationary point lies about
    # grad_start / (2 w_anchor) from V_init (to first order): how far MetaKE *can* move V, whatever η.
    grad_start: torch.Tensor | None = None


def refine_targets(model, tok, layout, solver, layers: list[int], requests, context_templates: list[str],
                   V_init: torch.Tensor, tcfg: TargetConfig, cfg: MetaKEConfig, own: list[int] | None = None) -> Refinement:
    """Algorithm 1, batched over all requests of the step. With ``bilevel: none`` V = V_init (diagnostics only).

    Under DDP every rank passes the same ``requests`` and ``V_init`` and, as ``own``, the indices of its shard: it
    evaluates only those requests' loss terms, the gradients are summed across ranks (the meta-loss is a sum over
    requests), and every rank takes the identical step."""
    obj = MetaObjective(model, tok, layout, solver, layers, requests, context_templates, V_init, tcfg, cfg, own)
    fidelity = (proxy_fidelity(obj, tok, layout, solver, layers, requests, context_templates, obj.V_init, tcfg, cfg.eta)
                if cfg.proxy_fidelity else None)
    V = obj.V_init.clone().requires_grad_(True)
    history: list[float] = []
    grad_start = torch.zeros(len(V))
    steps = cfg.T if cfg.bilevel == "metake" else 0
    opt = (torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam)([V], lr=cfg.eta)
    for t in range(steps):
        opt.zero_grad()
        # the gradient is computed with the loss, chunk by chunk (it is discarded if the checks below stop here)
        total, parts = obj.evaluate(V, backward=True)
        history.append(all_reduce_sum(total).item())
        if not (math.isfinite(history[-1]) and torch.isfinite(V).all()):
            raise FloatingPointError(f"MetaKE refinement diverged at iteration {t} (meta-loss {history[-1]:.4g}, "
                                     f"history {history[:-1][-3:]}): lower metake.eta (now {cfg.eta:g})")
        if cfg.tol > 0 and t and history[-2] - history[-1] < cfg.tol * abs(history[-2]):
            history.append(history[-1])  # early stop: this V's loss is already known, and final
            break
        if V.grad is not None:  # stop_grad at V = V_init leaves nothing to differentiate
            V.grad = all_reduce_sum(V.grad)
            if t == 0:
                grad_start = V.grad.norm(dim=-1).detach().float().cpu()
            opt.step()
    else:  # all T steps taken: evaluate the loss at the final V
        with torch.no_grad():
            total, parts = obj.evaluate(V, backward=False)
        history.append(all_reduce_sum(total).item())
    # the paper's plain descent returns V_T whatever happened; a rise within the rounding of the model's dtype is
    # not one (measured on a random bfloat16 Llama-3-8B shape at η = 5e-3: 1134 -> 1134, docs/results.md §7.3)
    rounding = torch.finfo(next(model.parameters()).dtype).eps * abs(history[0]) if steps else 0.0
    if steps and history[-1] - history[0] > rounding:
        warnings.warn(f"MetaKE refinement raised the meta-loss ({history[0]:.4g} -> {history[-1]:.4g}); "
                      f"metake.eta={cfg.eta:g} is too large for this model's scale (measured on the fact world: "
                      f"eta 5 diverges, 0.5 is stable)", RuntimeWarning, stacklevel=2)
    diag = realisation(obj.M64, obj.K)
    return Refinement(V.detach(), history, all_reduce_sum(parts["nll"]), diag["beta"].float(), diag["rho"].float(), obj.H.detach(),
                      fidelity, grad_start)
