"""The inner loops' truncated forward (lit_edit/truncated.py, docs/algorithms.md §2.10) gives what the full forward
gives, on every registered family's tiny model in float64: the logits at every real position (right and left
padding), v*, MetaKE's look-ahead loss and hypergradient, the true multi-layer hypergradient, and the window targets;
the blocks below the first changed one really are skipped; length groups are optimal and cover every row once."""
import contextlib
import itertools

import pytest
import torch
import transformers as T

from lit_edit.hooks import rewrite_output
from lit_edit.layouts import block_module, edited_module, get_layout, weight_shape
from lit_edit.metake import MetaKEConfig, MetaObjective, proxy_fidelity
from lit_edit.muke import WindowConfig, WindowedSequence, optimise_windows, split_windows
from lit_edit.solvers import MEMIT
from lit_edit.targets import TargetConfig, build_target_batch, compute_targets, request_losses
from lit_edit.truncated import (RowForward, length_groups, output_reaches_block_output, padded_fraction,
                                 reference_forward)
from tests.helpers import tiny_requests, tiny_tokenizer
from tests.test_layouts import CONFIGS

FAMILIES = sorted(CONFIGS)
CTX = ["{}", "The city is calm. {}", "Because the weather was good. {}"]
TIGHT = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def family_model(name: str, vocab: int):
    """The family's tiny model in float64 with SDPA attention (from_pretrained's default). The eager attention of
    GPT-NeoX and the LLaMA family takes its softmax in float32 even for a float64 model, whose rounding then depends
    on the padded width: forwards of differently grouped rows would agree only to ~1e-9."""
    config = CONFIGS[name]()
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    return model.eval().requires_grad_(False)


def count_calls(module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("start", [0, 1, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_row_forward_reads_the_models_own_logits(name, start, side):
    """Every real position of any subset of rows, in any order, equals the plain forward of the whole batch; after the
    first forward of a row the blocks below ``start`` no longer compute (the edited matrix of block 0 is not called)."""
    model = family_model(name, 100)
    layout = get_layout(model)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids = torch.where(mask.bool(), torch.randint(1, 100, (6, 6), generator=torch.Generator().manual_seed(0)), 0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    run = RowForward(model, layout, ids, mask, start)
    calls = count_calls(edited_module(model, layout, 0))
    seen = []
    for rows in (torch.tensor([4, 0, 2, 1, 3, 5]), torch.tensor([1, 3]), torch.tensor([5, 2, 0])):
        with torch.no_grad():
            out = run(rows)
        r, c = mask[rows].nonzero(as_tuple=True)
        # equal_nan: with left padding a model's own output may hold NaN (attention of fully masked pad queries); the
        # truncated forward must give the model's output, those NaN included
        torch.testing.assert_close(out.at(r, c), want[rows][r, c], rtol=1e-10, atol=1e-10, equal_nan=True)
        seen.append(len(calls))
    if start == 0:  # nothing lies below block 0: every forward computes it
        assert seen[0] < seen[1] < seen[2]
    else:
        assert seen[0] > 0 and seen[1] == seen[2] == seen[0]


@pytest.mark.parametrize("start", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_from_col_forward_computes_only_the_changing_columns_and_reads_the_models_own_logits(name, start):
    """With ``from_col`` (§2.10), a row's forwards after its first compute only its columns from ``from_col`` on, on
    the kept keys and values of the columns before; with an edit that adds a vector at ``from_col`` of block
    start − 1's output, the logits at every column from there on equal the plain forward with the same edit, for any
    subset of rows in any order; reading a column before ``from_col`` raises."""
    model = family_model(name, 100)
    layout = get_layout(model)
    lengths = torch.tensor([9, 4, 7, 1, 9, 5])
    from_col = torch.tensor([3, 0, 6, 0, 8, 2])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(1, 100, (6, 9), generator=torch.Generator().manual_seed(0)), 0)
    block, d = block_module(model, layout, start - 1), model.config.hidden_size
    push = torch.randn(6, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def add(rows):  # the edit: push[row] at the row's from_col of block start − 1's output
        def fn(h, sub):
            r = rows.to(h.device)[sub]
            return h.index_put((torch.arange(len(sub)), from_col[r]), push[r], accumulate=True)
        return fn

    with torch.no_grad(), rewrite_output(block, lambda h: h.index_put((torch.arange(6), from_col), push,
                                                                       accumulate=True)):
        want = model(input_ids=ids, attention_mask=mask).logits
    run = RowForward(model, layout, ids, mask, start, from_col=from_col)
    computed = []
    handle = block_module(model, layout, start).register_forward_pre_hook(
        lambda _m, args, kwargs: computed.append(args[0].shape[0] * args[0].shape[1] if args else
                                                  kwargs["hidden_states"].shape[0] * kwargs["hidden_states"].shape[1]),
        with_kwargs=True)
    try:
        for rows in (torch.tensor([4, 0, 2, 1, 3, 5]), torch.tensor([1, 2]), torch.tensor([5, 4, 0, 3])):
            computed.clear()
            with torch.no_grad():
                out = run(rows, (block, add(rows)))
            r, c = mask[rows].nonzero(as_tuple=True)
            later = c >= from_col[rows][r]
            torch.testing.assert_close(out.at(r[later], c[later]), want[rows][r[later], c[later]], rtol=1e-10,
                                       atol=1e-10)
            if len(computed) and rows.tolist() != [4, 0, 2, 1, 3, 5]:  # after the first: the changing columns only
                assert sum(computed) < int(lengths[rows].sum())
        with pytest.raises(ValueError, match="from_col"):
            out.at(torch.tensor([0]), torch.tensor([int(from_col[5]) - 1]))
    finally:
        handle.remove()


def test_length_groups_are_the_cheapest_partition():
    """Brute force over every split of the sorted lengths into contiguous groups: the dynamic programme's cost is the
    minimum, each row is in exactly one group, and a large split cost gives one padded batch."""
    lengths = torch.tensor([5, 17, 4, 16, 5, 30, 6, 17, 4, 29])
    cost = lambda groups, penalty: sum(len(g) * int(lengths[g].max()) + penalty for g in groups)  # noqa: E731
    for split_cost in (0.0, 0.02, 0.1):
        groups = length_groups(lengths, split_cost)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        penalty = split_cost * int(lengths.sum())
        order = torch.argsort(lengths, stable=True)
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], penalty)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(groups, penalty) == pytest.approx(best)
    assert len(length_groups(lengths, 10.0)) == 1
    assert padded_fraction(lengths) > padded_fraction(lengths, length_groups(lengths)) >= 0.0


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_request_losses_and_gradients_equal_the_full_forward(tok, name, layer):
    """v*'s per-request NLL and KL (KL prompts included) and their gradient in δ, for any δ and any subset of the
    requests, after the first forward kept blocks 0 … L (layer 2 is the last block: only the head is left to run)."""
    model = family_model(name, len(tok))
    layout, reqs, cfg = get_layout(model), tiny_requests(), TargetConfig()
    batch = build_target_batch(tok, reqs, CTX, cfg)
    block = block_module(model, layout, layer)
    g = torch.Generator().manual_seed(3)
    deltas = [torch.zeros(len(reqs), model.config.hidden_size, dtype=torch.float64)] + [
        torch.randn(len(reqs), model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2)]
    subsets = [torch.arange(len(reqs)), torch.tensor([3, 1]), torch.tensor([0, 2, 3])]
    runs = {}
    for ref in (False, True):
        with reference_forward() if ref else contextlib.nullcontext():
            runs[ref] = RowForward(model, layout, batch.ids, batch.mask, start=layer + 1)
    kl_ref = None
    for delta, reqs_now in zip(deltas, subsets):
        rows = torch.isin(batch.req, reqs_now).nonzero()[:, 0]
        got = []
        for ref in (False, True):
            d = delta.clone().requires_grad_(True)
            record = {} if kl_ref is None else None
            nll, kl = request_losses(runs[ref], block, batch, rows, d, kl_ref, cfg, record)
            (nll + kl)[reqs_now].sum().backward()
            got.append((nll, kl, d.grad, record))
        (nll, kl, grad, record), (nll_r, kl_r, grad_r, record_r) = got
        torch.testing.assert_close(nll, nll_r, **TIGHT)
        torch.testing.assert_close(kl, kl_r, **TIGHT)
        torch.testing.assert_close(grad, grad_r, **TIGHT)
        if record is not None:  # first pass: h_init and the KL reference are recorded alike
            for key in ("h_init", "kl_ref"):
                order, order_r = torch.argsort(record[key][0]), torch.argsort(record_r[key][0])
                torch.testing.assert_close(record[key][1][order], record_r[key][1][order_r], **TIGHT)
            kl_ref = torch.zeros(len(reqs), record["kl_ref"][1].shape[1], dtype=torch.float64)
            kl_ref[record["kl_ref"][0]] = record["kl_ref"][1]
        assert grad[reqs_now].abs().sum() > 0 and kl[reqs_now].abs().sum() >= 0


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", FAMILIES)
def test_targets_equal_the_full_forward(tok, name, layer):
    """v* end to end (§2): with blocks 0 … L computed once per step, the same targets as with the plain forward at
    every iteration, with some requests stopping early (the active rows, hence the groups, change between
    iterations). (At the last block these random models' descent is chaotic — Adam's first steps are sign steps
    of a gradient with near-zero coordinates — so rounding-level differences would grow there; the test above covers
    that layer one forward at a time.)"""
    model = family_model(name, len(tok))
    layout, reqs = get_layout(model), tiny_requests()
    first = compute_targets(model, tok, layout, layer, reqs, CTX, TargetConfig(v_num_grad_steps=1)).loss.sort().values
    # halfway between two requests' first losses: one stops at once, others run on (not a tie rounding could flip)
    cfg = TargetConfig(v_num_grad_steps=6, v_lr=0.2, early_stop_loss=float(first[1] + first[2]) / 2,
                       clamp_norm_factor=2.0)
    got = compute_targets(model, tok, layout, layer, reqs, CTX, cfg)
    with reference_forward():
        want = compute_targets(model, tok, layout, layer, reqs, CTX, cfg)
    assert len(set(got.steps.tolist())) > 1  # per-request early stop took effect
    for key in ("v_star", "h_init", "loss", "nll"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), **TIGHT)
    assert torch.equal(got.steps, want.steps) and got.history == pytest.approx(want.history, rel=1e-9)


def memit_solver(model, layout, layers):
    g = torch.Generator().manual_seed(1)
    C0 = {}
    for l in layers:
        d_in = weight_shape(model, layout, l)[1]
        X = torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64)
        C0[l] = X.T @ X / len(X)
    solver = MEMIT(mom2_update_weight=5.0)
    solver.setup(C0)
    return solver


@pytest.mark.parametrize("name", FAMILIES)
def test_metake_losses_and_hypergradients_equal_the_full_forward(tok, name):
    """MetaKE (§7): the look-ahead's meta-loss and its gradient (blocks below L skipped), and the true hypergradient
    through the two-layer solve (blocks below the lowest edited layer skipped), as with the plain forward."""
    model = family_model(name, len(tok))
    layout, reqs, layers = get_layout(model), tiny_requests(), [0, 2]
    tcfg = TargetConfig(v_num_grad_steps=3)
    d = model.get_output_embeddings().weight.shape[1]
    V = torch.randn(len(reqs), d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for ref in (False, True):
        with reference_forward() if ref else torch.enable_grad():
            solver = memit_solver(model, layout, layers)
            obj = MetaObjective(model, tok, layout, solver, layers, reqs, CTX, V, tcfg, MetaKEConfig())
            W = V.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = obj.loss(W + 0.1)[0]
                grad = torch.autograd.grad(loss, W)[0]
                fidelity = proxy_fidelity(obj, tok, layout, solver, layers, reqs, CTX, W + 0.1, tcfg, 1e-3)
        results.append((loss.detach(), grad, fidelity))
        # the look-ahead skips block L too where the edited matrix feeds the residual (not Gemma 3's: post-FFN norm)
        assert (obj.P is None) == (ref or name == "gemma3_text")
    (l1, g1, f1), (l2, g2, f2) = results
    torch.testing.assert_close(l1, l2, **TIGHT)
    torch.testing.assert_close(g1, g2, **TIGHT)
    assert f1["proxy_cosine"] == pytest.approx(f2["proxy_cosine"], rel=1e-9)
    assert f1["one_step_bp"] == pytest.approx(f2["one_step_bp"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["anyedit", "muke"])
@pytest.mark.parametrize("name", FAMILIES)
def test_window_targets_equal_the_full_forward(name, method):
    """Window targets (§8; μKE's context-affinity included): earlier windows' frozen shifts, the growing AnyEdit
    inputs and rows of different lengths, with blocks 0 … L computed once per window step."""
    model = family_model(name, 100)
    layout = get_layout(model)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for q, t in ((4, 7), (6, 2), (3, 6)):
        ids = torch.randint(1, 100, (q + t,), generator=g).tolist()
        reqs.append(WindowedSequence(tuple([0] + ids[:q - 1]), tuple(ids[q:]), tuple(split_windows(t, 3))))
    cfg = WindowConfig(method=method, window_size=3, v_num_grad_steps=4, affinity_steps=2)
    got = optimise_windows(model, layout, 1, reqs, cfg)
    with reference_forward():
        want = optimise_windows(model, layout, 1, reqs, cfg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.z, b.z, **TIGHT)
        torch.testing.assert_close(a.loss, b.loss, **TIGHT)
        if method == "muke":
            for x, y in zip(a.affinity, b.affinity, strict=True):
                assert x == pytest.approx(y, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_only_a_matrix_that_feeds_the_residual_passes_the_probe(name):
    """The registered edited matrix (the MLP output projection) changes its block's output by exactly its own change;
    a matrix of the right width further from the residual sum (the attention's query projection) does not, and a
    matrix of another width cannot. Gemma 3's MLP output passes a post-feed-forward norm before the sum: its
    registered matrix does not pass either (MetaKE's look-ahead then re-runs block L)."""
    model = family_model(name, 100)
    layout = get_layout(model)
    ids = list(range(1, 7))
    assert output_reaches_block_output(model, layout, 1, ids) == (name != "gemma3_text")
    query = {"gpt2": "transformer.h.{}.attn.c_attn", "gptj": "transformer.h.{}.attn.q_proj",
             "gpt_neox": "gpt_neox.layers.{}.attention.query_key_value"}.get(name, "model.layers.{}.self_attn.q_proj")
    assert not output_reaches_block_output(model, get_layout(model, {"rewrite_module": query}), 1, ids)
    up = {"gpt2": "transformer.h.{}.mlp.c_fc", "gptj": "transformer.h.{}.mlp.fc_in",
          "gpt_neox": "gpt_neox.layers.{}.mlp.dense_h_to_4h"}.get(name, "model.layers.{}.mlp.up_proj")
    assert not output_reaches_block_output(model, get_layout(model, {"rewrite_module": up}), 1, ids)


def test_metake_with_a_matrix_off_the_residual_runs_block_l_and_matches(tok):
    """LLaMA's query projection as the edited matrix (square, so the gate applies, but not summed into the
    residual): the look-ahead falls back to the hook on the matrix, from block L on, and equals the full forward."""
    model = family_model("llama", len(tok))
    layout = get_layout(model, {"rewrite_module": "model.layers.{}.self_attn.q_proj"})
    reqs, tcfg = tiny_requests(), TargetConfig(v_num_grad_steps=3)
    V = torch.randn(len(reqs), 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = []
    for ref in (False, True):
        with reference_forward() if ref else contextlib.nullcontext(), torch.enable_grad():
            obj = MetaObjective(model, tok, layout, memit_solver(model, layout, [2]), [2], reqs, CTX, V, tcfg,
                                MetaKEConfig())
            assert obj.P is None
            W = V.clone().requires_grad_(True)
            loss = obj.loss(W + 0.1)[0]
            out.append((loss.detach(), torch.autograd.grad(loss, W)[0]))
    torch.testing.assert_close(out[0][0], out[1][0], **TIGHT)
    torch.testing.assert_close(out[0][1], out[1][1], **TIGHT)
