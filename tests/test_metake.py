"""MetaKE (docs/algorithms.md §7) on the tiny fact world: the proxy hypergradient through the frozen gate equals the
true hypergradient through the actual solve; ablations do what Table 2 says; diagnostics match their formulas."""
import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_edit.data import EditDataModule
from lit_edit.editing import compute_keys
from lit_edit.layouts import edited_module, get_layout as model_layout, get_weight
from lit_edit.metake import MetaKEConfig, MetaObjective, key_only_gate, realisation, refine_targets
from lit_edit.methods import MetaKE, VStar
from lit_edit.module import EditModule
from lit_edit.solvers import MEMIT, AlignedSolver, AlphaEdit
from lit_edit.stats import StatsConfig
from lit_edit.targets import compute_targets

LAYER = 1
TCFG = VStar(v_num_grad_steps=8, clamp_norm_factor=4.0, fact_token="subject_first")


def setup_module_for(solver, dtype="float64", layers=(LAYER,)):
    module = EditModule(model="world:tiny", layers=list(layers), solver=solver, method=TCFG,
                        stats=StatsConfig(dataset="world:tiny", max_length=64), context_templates=[[10, 2]],
                        dtype=dtype, eval_pre=False)
    module.configure_model()
    dm = EditDataModule(path="world:tiny", limit=10, batch_size=5)
    dm.setup()
    return module, dm.requests


def targets(module, requests):
    with torch.enable_grad():
        return compute_targets(module.llm, module.tok, module.layout, module.layers[-1], requests, module.context,
                               TCFG).v_star


SOLVERS = {"memit": lambda: MEMIT(mom2_update_weight=50.0), "alphaedit": lambda: AlphaEdit(L2=10.0, nullspace_threshold=2e-2),
           "aligned_projected": lambda: AlignedSolver(mom2_update_weight=50.0, L2=1.0, projector="nullspace",
                                                      nullspace_threshold=2e-2),
           "rect_err": lambda: MEMIT(mom2_update_weight=50.0, L2=1.0, regularizer="rect", error_correction=True)}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_proxy_hypergradient_equals_true_hypergradient(tiny_world, name):
    """One edited layer: the gradient of L_meta through Δ_proxy = (V − H)ᵀM (a hook) equals the gradient through the
    solver's actual update written into the weight (differentiating the real solve, with accumulated state)."""
    module, reqs = setup_module_for(SOLVERS[name]())
    m, tok, lay, solver = module.llm, module.tok, module.layout, module.solver
    # accumulate state first (C_p, and for rect_err the fed-back error): one ordinary edit
    first = reqs[5:]
    K0 = compute_keys(m, tok, lay, [LAYER], first, module.context, TCFG.fact_token)[LAYER]
    solver.commit(LAYER, K0, torch.randn(get_weight(m, lay, LAYER).shape[0], 5, dtype=torch.float64))
    solver.finish_batch([r.fact_id for r in first])
    reqs = reqs[:5]
    V_init = targets(module, reqs)
    obj = MetaObjective(m, tok, lay, solver, [LAYER], reqs, module.context, V_init, TCFG, MetaKEConfig())
    V = (V_init + 0.1 * torch.randn(V_init.shape, dtype=V_init.dtype, generator=torch.Generator().manual_seed(0)))
    V = V.detach().requires_grad_(True)
    g_proxy = torch.autograd.grad(obj.loss(V)[0], V)[0]

    V2 = V.detach().clone().requires_grad_(True)
    mod = edited_module(m, lay, LAYER)
    param = mod.weight
    W = get_weight(m, lay, LAYER)
    delta = solver.solve(LAYER, obj.K, (V2 - obj.H).T)  # the real solve, differentiable in V
    new = W.double() + delta
    del mod.weight
    mod.weight = new.T if lay.weight_layout == "in_out" else new  # the actual update, in the stored layout
    try:
        g_true = torch.autograd.grad(obj.loss_in_current_model(V2)[0], V2)[0]
    finally:
        del mod.weight
        mod.register_parameter("weight", param)
    cos = torch.nn.functional.cosine_similarity(g_proxy.flatten(), g_true.flatten(), dim=0)
    assert cos >= 0.9999, cos
    torch.testing.assert_close(g_proxy, g_true, rtol=1e-6, atol=1e-8)


def test_stop_grad_feedback_never_moves_the_targets(tiny_world):
    """Table 2: with Δ_proxy detached only the anchor 2(V − V_init) is left, zero at the start: V stays V_init."""
    module, reqs = setup_module_for(MEMIT(mom2_update_weight=50.0), dtype="float32")
    V_init = targets(module, reqs[:5])
    with torch.enable_grad():
        ref = refine_targets(module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5], module.context,
                             V_init, TCFG, MetaKEConfig(T=3, feedback="stop_grad"))
    assert torch.equal(ref.V, V_init) and not ref.grad_start.any()
    with torch.enable_grad():
        moved = refine_targets(module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5], module.context,
                               V_init, TCFG, MetaKEConfig(T=3))
    assert not torch.equal(moved.V, V_init)
    assert moved.history[-1] < moved.history[0]  # gradient descent on L_meta lowers it


def test_early_stop_keeps_the_iterate_where_the_decrease_fell_below_tol(tiny_world):
    """tol = 1 stops at the first check (no iteration lowers L_meta by 100 %): V is the T = 1 iterate, and the
    history records that iterate's loss twice (before the would-be update and as the final value)."""
    module, reqs = setup_module_for(MEMIT(mom2_update_weight=50.0), dtype="float64")
    V_init = targets(module, reqs[:5])
    run = lambda cfg: refine_targets(module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5],  # noqa: E731
                                     module.context, V_init, TCFG, cfg)
    with torch.enable_grad():
        one, stopped, full = run(MetaKEConfig(T=1, eta=0.05)), run(MetaKEConfig(T=5, eta=0.05, tol=1.0)), run(
            MetaKEConfig(T=5, eta=0.05))
    torch.testing.assert_close(stopped.V, one.V, rtol=0, atol=0)
    # plain descent: the first step moves each request by η·‖g‖, the gradient norm the run reports
    assert one.grad_start.min() > 0
    torch.testing.assert_close((one.V - V_init).norm(dim=-1).float().cpu(), 0.05 * one.grad_start, rtol=1e-5, atol=0)
    assert stopped.history == pytest.approx(one.history[:1] + [one.history[-1]] * 2, rel=1e-12)
    torch.testing.assert_close(stopped.nll, one.nll)
    assert len(full.history) == 6 and not torch.equal(full.V, one.V)
    with pytest.raises(ValueError, match="tol"):
        MetaKEConfig(tol=-1e-3)


def test_chunked_refinement_equals_the_whole_batch(tiny_world):
    """chunk_size splits each iteration's forward into groups of requests (memory of one group): L_meta is a sum over
    requests plus the anchor, so the refined targets, the loss history and the diagnostics equal the one-forward
    refinement's (float64; the chunks only reorder sums)."""
    module, reqs = setup_module_for(AlphaEdit(L2=10.0, nullspace_threshold=2e-2), dtype="float64")
    V_init = targets(module, reqs[:5])
    run = lambda tcfg: refine_targets(module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5],  # noqa: E731
                                      module.context, V_init, tcfg, MetaKEConfig(T=4, eta=0.05))
    with torch.enable_grad():
        whole, chunked = run(TCFG), run(dataclasses.replace(TCFG, chunk_size=2))
    obj = MetaObjective(module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5], module.context,
                        V_init, dataclasses.replace(TCFG, chunk_size=2), MetaKEConfig())
    chunks = obj.row_chunks()
    assert [len(set(obj.batch.req[c].tolist())) for c in chunks] == [2, 2, 1]  # 3 forwards per iteration, not 1
    assert torch.equal(torch.cat(chunks).sort().values, obj.rows.sort().values)
    assert not torch.equal(whole.V, V_init)
    torch.testing.assert_close(chunked.V, whole.V, rtol=1e-10, atol=1e-12)
    assert chunked.history == pytest.approx(whole.history, rel=1e-10)
    torch.testing.assert_close(chunked.nll, whole.nll, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.grad_start, whole.grad_start, rtol=1e-6, atol=0)  # stored in float32


def test_bare_edit_prompts_use_one_row_per_request_and_the_solvers_keys(tiny_world):
    module, reqs = setup_module_for(MEMIT(mom2_update_weight=50.0), dtype="float64")
    V_init = targets(module, reqs[:5])
    args = (module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5], module.context, V_init, TCFG)
    ctx, bare = MetaObjective(*args, MetaKEConfig()), MetaObjective(*args, MetaKEConfig(edit_prompts="bare"))
    n_ctx = len(module.context)
    assert n_ctx > 1 and len(ctx.batch.req) == 5 * (n_ctx + 1) and len(bare.batch.req) == 5 * 2  # + the KL prompt
    torch.testing.assert_close(bare.K, ctx.K, rtol=0, atol=0)  # the gate is built from the same keys
    torch.testing.assert_close(bare.M, ctx.M, rtol=0, atol=0)
    with pytest.raises(ValueError, match="edit_prompts"):
        MetaKEConfig(edit_prompts="prefixed")


def test_key_only_gate_and_realisation_formulas():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(12, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(key_only_gate(K), K.T @ torch.linalg.inv(K @ K.T + torch.eye(12, dtype=torch.float64)))
    # MEMIT gate for one request: β = ρ/(1+ρ) with ρ = kᵀ(λC0 + C_p)⁻¹k (§7.5)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    C0 = Q @ torch.diag(torch.rand(12, generator=g, dtype=torch.float64) + 0.1) @ Q.T
    s = MEMIT(mom2_update_weight=3.0)
    s.setup({0: C0})
    s.commit(0, K, torch.zeros(5, 4, dtype=torch.float64))
    k = torch.randn(12, 1, generator=g, dtype=torch.float64)
    d = realisation(s.gate(0, k), k)
    rho = (k.T @ torch.linalg.solve(3.0 * C0 + K @ K.T, k)).item()
    assert d["rho"].item() == pytest.approx(rho, rel=1e-9)
    assert d["beta"].item() == pytest.approx(rho / (1 + rho), rel=1e-9)


def test_metake_in_the_fit_loop_logs_its_diagnostics(tiny_world, tmp_path):
    module = EditModule(model="world:tiny", layers=[0, 1], solver=AlphaEdit(L2=10.0, nullspace_threshold=2e-2),
                        method=MetaKE(T=3, base=TCFG), stats=StatsConfig(dataset="world:tiny", max_length=64),
                        context_templates=[[10, 2]])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        log_every_n_steps=1)
    trainer.fit(module, EditDataModule(path="world:tiny", limit=10, batch_size=5))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(trainer.log_dir, size_guidance={"histograms": 0})
    ea.Reload()
    assert {"metake/beta", "metake/rho", "metake/beta_hat"} <= set(ea.Tags()["histograms"])
    assert {"metake/loss_start", "metake/loss_end", "metake/beta_hat_mean"} <= set(ea.Tags()["scalars"])
    beta = [e.value for e in ea.Scalars("metake/beta_mean")]
    assert all(0.0 <= b < 1.0 for b in beta)
    assert json.loads((Path(trainer.log_dir) / "metrics.json").read_text())["n_edits"] == 10
    # the ledger's per-request diagnostics (benchmarks/realisation_bins.py) are the logged batch means, request by request
    ledger = [json.loads(x) for x in (Path(trainer.log_dir) / "edits.jsonl").read_text().splitlines()]
    assert len(ledger) == 10 and all(e["residual"] > 0 and 0 <= e["shift"] for e in ledger)
    for step, tag, key, scale in ((0, "metake/target_shift", "shift", 1.0), (1, "metake/target_shift", "shift", 1.0),
                                  (0, "metake/grad_norm_start", "reach", 2 * module.method.w_anchor)):
        logged = [e.value for e in ea.Scalars(tag)][step]
        assert sum(scale * e[key] for e in ledger[5 * step:5 * step + 5]) / 5 == pytest.approx(logged, rel=1e-5)


def test_proxy_fidelity_is_exact_for_one_layer_and_measured_for_several(tiny_world):
    """App. C.5 diagnostic: through the full multi-layer solve. With one edited layer the proxy is exact (cos 1);
    with two layers the keys and states of layer 1 move with layer 0's update, so it is only an estimate."""
    out = {}
    for layers in ([LAYER], [0, 1]):
        module, reqs = setup_module_for(MEMIT(mom2_update_weight=50.0), layers=layers)
        V_init = targets(module, reqs[:5])
        with torch.enable_grad():
            ref = refine_targets(module.llm, module.tok, module.layout, module.solver, layers, reqs[:5], module.context,
                                 V_init, TCFG, MetaKEConfig(T=1, proxy_fidelity=True))
        out[len(layers)] = ref.fidelity
    assert out[1]["proxy_cosine"] >= 0.9999 and out[1]["one_step_bp"] > 0
    assert -1.0 <= out[2]["proxy_cosine"] <= 1.0 and out[2]["proxy_cosine"] < out[1]["proxy_cosine"]


def test_divergent_refinement_is_reported(tiny_world):
    """Plain gradient descent with a far too large η: a non-finite meta-loss stops the step with a clear error
    (before any weight is written); a finite blow-up warns."""
    module, reqs = setup_module_for(MEMIT(mom2_update_weight=50.0), dtype="float32")
    V_init = targets(module, reqs[:5])
    args = (module.llm, module.tok, module.layout, module.solver, [LAYER], reqs[:5], module.context, V_init, TCFG)
    before = get_weight(module.llm, module.layout, LAYER).clone()
    with torch.enable_grad(), pytest.raises(FloatingPointError, match="lower metake.eta"):
        refine_targets(*args, MetaKEConfig(T=15, eta=1e6))
    assert torch.equal(get_weight(module.llm, module.layout, LAYER), before)
    with torch.enable_grad(), pytest.warns(RuntimeWarning, match="raised the meta-loss"):
        refine_targets(*args, MetaKEConfig(T=15, eta=5.0))  # measured: 5.0 -> 4.9e26, still finite


def test_look_ahead_equals_the_write_through_gemmas_post_norm():
    """Gemma 3's edited matrix feeds an RMSNorm before the residual sum, so the write maps the residual through that
    norm before the solve (editing.through_post_norm). The look-ahead must respond as that write does: at one edited
    layer, the virtual model W_L + D(V − H)ᵀM gives the same block-L states and the same L_meta as the model after
    the actual apply_batch of V, to float64 round-off. Without the map (the residual itself through the gate) the
    states move elsewhere."""
    from lit_edit.editing import FactColumns, apply_batch, compute_block_states
    from lit_edit.hooks import add_to_output
    from lit_edit.targets import TargetConfig
    from tests.helpers import tiny_requests, tiny_tokenizer
    from tests.test_truncated import CTX, family_model, memit_solver

    tok = tiny_tokenizer()
    model = family_model("gemma3_text", len(tok))
    with torch.no_grad():  # gains unlike 1 at every coordinate, as a trained Gemma's (the tiny model's are all 1)
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 2.0, generator=torch.Generator().manual_seed(4))
    layout, reqs, layer, tcfg = model_layout(model), tiny_requests(), 1, TargetConfig(v_num_grad_steps=3)
    solver = memit_solver(model, layout, [layer])
    H = compute_block_states(model, tok, layout, layer, reqs, tcfg.fact_token)
    V = H + 0.2 * H.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(
        torch.randn(H.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=1)
    obj = MetaObjective(model, tok, layout, solver, [layer], reqs, CTX, V, tcfg, MetaKEConfig())
    assert obj.post is not None and obj.P is None  # the look-ahead runs block L, through the real norm

    def states_with(R):
        with add_to_output(obj.module, lambda x: (x.to(obj.dt) @ obj.M.T) @ R):
            return compute_block_states(model, tok, layout, layer, reqs, tcfg.fact_token)

    with torch.no_grad():
        look, look_states = obj.loss(V)[0], states_with(obj.proxy_residual(V))
        unmapped = states_with(V - obj.H)
        apply_batch(model, layout, solver, [layer], reqs, V, FactColumns(tok, reqs, CTX, tcfg.fact_token))
        written, written_states = obj.loss_in_current_model(V)[0], compute_block_states(model, tok, layout, layer,
                                                                                           reqs, tcfg.fact_token)
    torch.testing.assert_close(look_states, written_states, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(look, written, rtol=1e-9, atol=1e-11)
    moved = (written_states - H).norm()
    # the write moves the states (a few % of V − H at λ 5), and the unmapped look-ahead lands far from where it does
    assert moved > 1e-2 * (V - H).norm() and (unmapped - written_states).norm() > moved, \
        ((unmapped - written_states).norm(), moved)
