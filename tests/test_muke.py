"""μKE / AnyEdit / One-for-All window targets (docs/algorithms.md §8; μKE paper Eq. 2, 4, 10–12).

Exactness checks run a tiny random float64 GPT-2 and compare the batched implementation with independent,
deliberately plain single-request loops written here (torch.optim.Adam, explicit Python sums over tokens).
"""
import math

import pytest
import torch

from lit_edit.hooks import rewrite_output
from lit_edit.layouts import block_module, edited_module, get_layout
from lit_edit.muke import (WindowedSequence, WindowConfig, affinity_lambdas, compute_affinities,
                           compute_window_keys, compute_window_states,
                           matryoshka_token_weights, memory_positions, optimise_windows, split_windows,
                           tokenize_unstructured)
from tests.helpers import tiny_gpt2, tiny_tokenizer

LAYER = 1  # z_layer = layers[-1] of the tiny 3-layer model
W = 3


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok, n_layer=3, n_embd=32)
    return tok, model, get_layout(model)


def make_requests(tok, window=W):
    """Three requests of different question / answer lengths: N = 3 (last window short), 1 (T < W), 2 (T = 2W)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for q, t in ((4, 7), (6, 2), (3, 6)):
        ids = torch.randint(1, len(tok), (q + t,), generator=g).tolist()
        T = len(ids[q:])
        out.append(WindowedSequence(tuple([0] + ids[:q - 1]), tuple(ids[q:]), tuple(split_windows(T, window))))
    return out


def one_window(r):
    return WindowedSequence(r.question_ids, r.target_ids, ((0, r.T),))


# ---------------------------------------------------------------------------------------------- windows, tokens

def test_split_windows_edge_cases():
    assert split_windows(2, 5) == [(0, 2)]  # answer shorter than one window
    assert split_windows(6, 3) == [(0, 3), (3, 6)]  # exact multiple: no empty last window
    assert split_windows(7, 3) == [(0, 3), (3, 6), (6, 7)]  # short last window
    assert split_windows(1, 1) == [(0, 1)] and split_windows(1, 30) == [(0, 1)]  # a single token
    assert split_windows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert memory_positions(5, split_windows(7, 3)) == [4, 7, 10]  # Q − 1 + start_w
    for T, Wn in ((0, 3), (3, 0), (-1, 2), (3, 2.0), (True, 2), (3, None)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            split_windows(T, Wn)
    with pytest.raises(ValueError, match="contiguous"):
        WindowedSequence((0,), (1, 2, 3), ((0, 2), (1, 3)))
    with pytest.raises(ValueError, match="at least one token"):
        WindowedSequence((), (1,), ((0, 1),))


def test_tokenize_unstructured(setup):
    tok, _, _ = setup
    q, a = "Anna Berk lives in", " the city of Paris. Tom Lund works as a baker."
    r = tokenize_unstructured(tok, q, a, window_size=4)
    assert r.joint_matches
    assert r.question_ids[0] == tok.bos_token_id and r.question_ids[1:] == tuple(tok(q, add_special_tokens=False)["input_ids"])
    assert r.target_ids == tuple(tok(a)["input_ids"][1:])  # the answer's leading BOS dropped
    assert r.input_ids == list(r.question_ids) + list(r.target_ids[:-1])
    assert list(r.question_ids) + list(r.target_ids) == tok(q + a)["input_ids"]
    assert r.windows == tuple(split_windows(r.T, 4)) and r.positions == [r.Q - 1 + s for s, _ in r.windows]
    assert r.input_ids[r.Q - 1] == r.question_ids[-1]  # the first memory is the last question token
    for p, (s, _) in zip(r.positions[1:], r.windows[1:]):
        assert r.input_ids[p] == r.target_ids[s - 1]  # …later ones the token just before their window
    assert tokenize_unstructured(tok, q, a).windows == ((0, r.T),)  # window_size None: One-for-All
    # this tokenizer prefixes a space to every text, so "Paris." alone is not how "…inParis." tokenises jointly
    bad = tokenize_unstructured(tok, q, "Paris.", window_size=4)
    assert not bad.joint_matches
    with pytest.raises(ValueError, match=f"jointly differs .* at token {r.Q} "):  # the first answer token
        tokenize_unstructured(tok, q, "Paris.", window_size=4, on_mismatch="error")
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_unstructured(tok, q, "")


# ------------------------------------------------------------------------------------------------ coefficients

def test_matryoshka_token_weights_by_hand():
    wins = split_windows(5, 2)  # (0,2) (2,4) (4,5), N = 3
    c = lambda w, lam=None: matryoshka_token_weights(wins, w, lam).tolist()  # noqa: E731
    # constant λ = 1: window j ≥ w gets (N − j)/(N − w)
    assert c(0) == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 3], abs=1e-15)
    assert c(1) == pytest.approx([0, 0, 1, 1, 1 / 2], abs=1e-15)
    assert c(2) == pytest.approx([0, 0, 0, 0, 1], abs=1e-15)
    # λ_{0,·} = (1, 1.5, 1.2): window 0 in all three figures, window 1 in two, window 2 in one; all / (N − w) = 3
    assert c(0, [1, 1.5, 1.2]) == pytest.approx([3.7 / 3, 3.7 / 3, 2.7 / 3, 2.7 / 3, 1.2 / 3], abs=1e-15)
    with pytest.raises(ValueError, match="N − w = 2"):
        c(1, [1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        c(3)


def test_matryoshka_loss_is_eq_10_figure_sum():
    """Σ_j c_j (−log p_j) regrouped per window (Eq. 11) equals Eq. 10's figure-by-figure sum."""
    g = torch.Generator().manual_seed(1)
    T, Wn = 11, 3
    wins = split_windows(T, Wn)
    N = len(wins)
    logp = -torch.rand(T, generator=g, dtype=torch.float64) * 4
    for w in range(N):
        lam = (1 + 2 * torch.rand(N - w, generator=g, dtype=torch.float64)).tolist()
        s_w = wins[w][0]
        eq10 = 0.0
        for m in range(w, N):  # figure F_{w,m} = Y_w … Y_m
            eq10 += lam[m - w] * sum(logp[j].item() for j in range(s_w, wins[m][1]))
        eq10 = -eq10 / (N - w)
        c = matryoshka_token_weights(wins, w, lam)
        assert (c[:s_w] == 0).all() and (c[s_w:] > 0).all()
        assert -(c * logp).sum().item() == pytest.approx(eq10, rel=1e-13)


def test_affinity_pairings():
    row = [1.0, 0.8, 0.3]  # a(w,w), a(w,w+1), a(w,w+2)
    assert affinity_lambdas(row) == pytest.approx([1.0, 1.2, 1.7])  # paper Eq. 12: 2 − a(w, m)
    assert affinity_lambdas(row, "legacy") == pytest.approx([1.7, 1.2, 1.0])  # figure m gets 2 − a(w, w+N−1−m)
    assert affinity_lambdas([1.0], "legacy") == affinity_lambdas([1.0]) == [1.0]  # last window: identical
    wins = split_windows(8, 3)
    paper = matryoshka_token_weights(wins, 0, affinity_lambdas(row))
    legacy = matryoshka_token_weights(wins, 0, affinity_lambdas(row, "legacy"))
    # the longest figure's weight is shared by every window, so only the inner sums differ
    assert paper[0] == pytest.approx(legacy[0]) and paper[-1] == pytest.approx(1.7 / 3) and legacy[-1] == pytest.approx(1 / 3)
    assert not torch.allclose(paper, legacy)
    with pytest.raises(ValueError, match="pairing"):
        affinity_lambdas(row, "reversed")


# ------------------------------------------------------------------------------------ independent reference loops

def _logp(model, block, ids, adds):
    """log-softmax of the model on ``ids`` (one sequence) with ``adds`` = [(position, vector)] added to the
    block's output; also returns the block output at those positions before adding."""
    seen = {}

    def fn(h):
        seen["h"] = h[0].detach().clone()
        h = h.clone()
        for p, v in adds:
            h[0, p] = h[0, p] + v
        return h

    with rewrite_output(block, fn):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits, -1), seen["h"]


def reference_affinity(model, block, r, cfg):
    """Eq. 12 for one request, straightforwardly: torch.optim.Adam, one backward per figure."""
    out = []
    for w in range(r.N - 1):
        s_w, p = r.windows[w][0], r.positions[w]
        delta = torch.zeros(block_hidden_size(model), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        cos = [0.0] * (r.N - w)
        h_init = None
        for _ in range(cfg.affinity_steps):
            grads = []
            for m in range(w, r.N):
                logp, h = _logp(model, block, r.input_ids, [(p, delta)])
                h_init = h[p] if h_init is None else h_init
                toks = range(s_w, r.windows[m][1])
                nll = -sum(logp[r.Q - 1 + j, r.target_ids[j]] for j in toks) / len(toks)
                loss = nll + cfg.v_weight_decay * delta.norm() / h_init.norm() ** 2
                grads.append(torch.autograd.grad(loss, delta)[0])
            for k, gk in enumerate(grads):
                cos[k] += torch.nn.functional.cosine_similarity(grads[0], gk, dim=0, eps=0).item() / cfg.affinity_steps
            opt.zero_grad()
            delta.grad = grads[0]
            opt.step()
        out.append([1.0] + cos[1:])
    return out + [[1.0]]


def block_hidden_size(model):
    return model.config.n_embd


def reference_targets(model, block, r, cfg, affinity=None):
    """§8.2 for one request: windows in order, torch.optim.Adam, explicit token sums, frozen earlier deltas."""
    done, z, losses = [], [], []
    for w, (s, e) in enumerate(r.windows):
        N, p = r.N, r.positions[w]
        if cfg.method == "muke":
            ids, toks, n = r.input_ids, range(s, r.T), r.T - s
            row = affinity[w] if cfg.coefficients == "context-affinity" else [1.0] * (N - w)
            lam = [2 - a for a in (row if cfg.affinity_pairing == "paper" else row[::-1])]
            win = lambda j: next(k for k, (ks, ke) in enumerate(r.windows) if ks <= j < ke)  # noqa: E731
            coef = {j: sum(lam[m - w] for m in range(win(j), N)) / (N - w) for j in toks}
        else:
            ids, toks, n = r.input_ids[: r.Q - 1 + e], range(s, e), e - s
            coef = {j: 1.0 for j in toks}
        delta = torch.zeros(block_hidden_size(model), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        h_init = None
        for it in range(cfg.v_num_grad_steps):
            adds = [(r.positions[j], done[j]) for j in range(w)] + [(p, delta)]
            logp, h = _logp(model, block, ids, adds)
            h_init = h[p] if h_init is None else h_init
            nll = -sum(coef[j] * logp[r.Q - 1 + j, r.target_ids[j]] for j in toks) / n
            loss = nll + cfg.v_weight_decay * delta.norm() / h_init.norm() ** 2
            if loss.item() < cfg.early_stop_loss or it == cfg.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > cfg.clamp_norm_factor * h_init.norm():
                    delta.mul_(cfg.clamp_norm_factor * h_init.norm() / delta.norm())
        done.append(delta.detach())
        z.append(h_init + delta.detach())
        losses.append(loss.item())
    return torch.stack(z), losses


# -------------------------------------------------------------------------------------------------- affinity

def test_affinity_follows_eq_12(setup):
    tok, model, layout = setup
    reqs = make_requests(tok)
    cfg = WindowConfig(method="muke")
    got = compute_affinities(model, layout, LAYER, reqs, cfg)
    block = block_module(model, layout, LAYER)
    assert [len(a) for a in got] == [r.N for r in reqs]
    for r, a in zip(reqs, got):
        want = reference_affinity(model, block, r, cfg)
        assert [len(x) for x in a] == [r.N - w for w in range(r.N)]
        for x, y in zip(a, want):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12)
    inner = [x for a in got for row in a for x in row[1:]]
    assert inner and all(-1 <= x < 1 - 1e-6 for x in inner)  # genuine cosines, not the trivial 1
    # one request alone gives the same affinities as inside the batch
    for x, y in zip(compute_affinities(model, layout, LAYER, reqs[2:], cfg)[0], got[2]):
        assert x == pytest.approx(y, rel=1e-10, abs=1e-13)


# -------------------------------------------------------------------------------------------- window targets

CASES = [dict(method="one_for_all"), dict(method="anyedit"), dict(method="muke", coefficients="matryoshka"),
         dict(method="muke"), dict(method="muke", affinity_pairing="legacy")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c.values()))
@pytest.mark.parametrize("variant", ["plain", "mixed_stop", "clamp"])
def test_batched_targets_equal_independent_single_request_loop(setup, case, variant):
    tok, model, layout = setup
    reqs = make_requests(tok)
    if case["method"] == "one_for_all":
        reqs = [one_window(r) for r in reqs]
    cfg = WindowConfig(window_size=W, v_num_grad_steps=5, **case)
    if variant == "mixed_stop":  # a threshold between the windows' initial losses: some stop at once, others run
        first = optimise_windows(model, layout, LAYER, reqs, WindowConfig(window_size=W, v_num_grad_steps=1, **case))
        cfg.early_stop_loss = float(torch.cat([t.loss for t in first]).median()) + 1e-9
    if variant == "clamp":
        cfg.clamp_norm_factor, cfg.v_lr = 0.05, 0.1
    got = optimise_windows(model, layout, LAYER, reqs, cfg)
    block = block_module(model, layout, LAYER)
    aff = compute_affinities(model, layout, LAYER, reqs, cfg) if cfg.coefficients == "context-affinity" else None
    steps = []
    for i, (r, t) in enumerate(zip(reqs, got)):
        z, losses = reference_targets(model, block, r, cfg, aff[i] if aff and cfg.method == "muke" else None)
        torch.testing.assert_close(t.z, z, rtol=1e-9, atol=1e-11)
        assert t.loss.tolist() == pytest.approx(losses, rel=1e-9)
        torch.testing.assert_close(t.z, t.h_init + t.delta)
        assert t.positions == r.positions and t.windows == list(r.windows) and t.z.shape == (r.N, 32)
        steps += t.steps.tolist()
        # a request alone gives the same targets as inside the batch
        alone = optimise_windows(model, layout, LAYER, [r], cfg)[0]
        torch.testing.assert_close(alone.z, t.z, rtol=1e-9, atol=1e-11)
    if variant == "mixed_stop":
        assert 0 in steps and max(steps) > 0  # per-window early stop: some windows stop at once, others step
    if variant == "clamp":
        ratio = torch.cat([t.delta.norm(dim=-1) / t.h_init.norm(dim=-1) for t in got])
        assert (ratio <= 0.05 + 1e-12).all() and (ratio > 0.05 - 1e-9).any()


def test_h_init_is_block_output_at_memory_position(setup):
    tok, model, layout = setup
    reqs = make_requests(tok)
    got = optimise_windows(model, layout, LAYER, reqs, WindowConfig(method="anyedit", window_size=W, v_num_grad_steps=1))
    for r, t in zip(reqs, got):
        full = list(r.question_ids) + list(r.target_ids)
        hs = model(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        torch.testing.assert_close(t.h_init, hs[r.positions])
        assert (t.delta == 0).all()  # one iteration never steps


@pytest.mark.parametrize("pairing", ["paper", "legacy"])
def test_first_iteration_loss_is_eq_10_11_on_the_clean_model(setup, pairing):
    """With one iteration nothing steps, so every window's loss is its objective on the unedited model:
    μKE = −1/((N − w) n_w) Σ_m λ_{w,m} log P(F_{w,m}) with λ from given affinities; AnyEdit = mean window NLL."""
    tok, model, layout = setup
    reqs = make_requests(tok)
    aff = [[[1.0] + [0.8 - 0.3 * k + 0.05 * w for k in range(r.N - w - 1)] for w in range(r.N)] for r in reqs]
    cfg = WindowConfig(method="muke", window_size=W, v_num_grad_steps=1, affinity_pairing=pairing)
    got = optimise_windows(model, layout, LAYER, reqs, cfg, affinities=aff)
    ae = optimise_windows(model, layout, LAYER, reqs, WindowConfig(method="anyedit", window_size=W, v_num_grad_steps=1))
    for i, r in enumerate(reqs):
        logp = torch.log_softmax(model(input_ids=torch.tensor([r.input_ids])).logits[0], -1)
        lp = [logp[r.Q - 1 + j, r.target_ids[j]].item() for j in range(r.T)]
        for w, (s, e) in enumerate(r.windows):
            row = aff[i][w] if pairing == "paper" else aff[i][w][::-1]
            eq10 = sum((2 - row[m - w]) * sum(lp[s: r.windows[m][1]]) for m in range(w, r.N))
            assert got[i].loss[w].item() == pytest.approx(-eq10 / (r.N - w) / (r.T - s), rel=1e-10)
            assert got[i].lam[w] == pytest.approx([2 - a for a in row])
            assert ae[i].loss[w].item() == pytest.approx(-sum(lp[s:e]) / (e - s), rel=1e-10)
    paper = optimise_windows(model, layout, LAYER, reqs, WindowConfig(method="muke", window_size=W, v_num_grad_steps=1),
                             affinities=aff)
    if pairing == "legacy":  # the pairings differ exactly where a window has ≥ 2 figures
        for i, r in enumerate(reqs):
            for w in range(r.N):
                same = math.isclose(paper[i].loss[w].item(), got[i].loss[w].item(), rel_tol=1e-12)
                assert same == (r.N - w == 1)


def test_single_window_methods_coincide(setup):
    """With one window (W ≥ T) μKE (any coefficients) and AnyEdit reduce to One-for-All (Eq. 2)."""
    tok, model, layout = setup
    reqs = [one_window(r) for r in make_requests(tok)]
    base = optimise_windows(model, layout, LAYER, reqs, WindowConfig(method="one_for_all", v_num_grad_steps=4))
    for case in CASES[1:]:
        other = optimise_windows(model, layout, LAYER, reqs, WindowConfig(v_num_grad_steps=4, **case))
        for a, b in zip(base, other):
            torch.testing.assert_close(a.z, b.z, rtol=1e-12, atol=1e-12)


def test_config_and_input_errors(setup):
    tok, model, layout = setup
    with pytest.raises(ValueError, match="method"):
        WindowConfig(method="unke")
    with pytest.raises(ValueError, match="affinity_pairing"):
        WindowConfig(affinity_pairing="reversed")
    with pytest.raises(ValueError, match="one window per request"):
        optimise_windows(model, layout, LAYER, make_requests(tok), WindowConfig(method="one_for_all"))
    with pytest.raises(ValueError, match="one row per window"):
        optimise_windows(model, layout, LAYER, make_requests(tok), WindowConfig(), affinities=[[[1.0]]] * 3)


def test_the_windows_method_tokenises_and_optimises(setup):
    """lit_edit.methods.Windows: its columns window each answer (one window for One-for-All) and its targets have
    one row per window, at the memory positions."""
    from lit_edit.methods import Env, Windows
    from lit_edit.requests import UnstructuredRequest

    tok, model, layout = setup
    writes = [UnstructuredRequest(1, "Anna Berk lives in", "the city of Paris."),
              UnstructuredRequest(2, "Tom Lund", "works as a baker. Mira Voss speaks French.")]
    for method, windows in ((Windows(window_size=4, v_num_grad_steps=2, coefficients="matryoshka", chat=False), 4),
                            (Windows(method="one_for_all", v_num_grad_steps=2, chat=False), None)):
        method.bind(Env(model, tok, layout, [LAYER], ["{}"], None))
        cols = method.columns(writes)
        reqs = cols.seqs
        if windows:
            assert [r.windows for r in reqs] == [tuple(split_windows(r.T, windows)) for r in reqs]
        else:
            assert [len(r.windows) for r in reqs] == [1, 1]
        got = method.optimise(cols, [0, 1])
        assert got.v_star.shape[0] == sum(r.N for r in reqs) == cols.n_targets
        assert cols.rows == [list(range(reqs[0].N)), list(range(reqs[0].N, reqs[0].N + reqs[1].N))]


# ------------------------------------------------------------------------------------------------------ keys

def test_window_keys_and_states_batched_equal_single(setup):
    tok, model, layout = setup
    reqs = make_requests(tok)
    keys = compute_window_keys(model, layout, LAYER, reqs, preservation=True)
    assert keys.columns == [(i, w) for i, r in enumerate(reqs) for w in range(r.N)]
    n_mem = sum(r.N for r in reqs)
    assert keys.K.shape == (128, n_mem)  # c_proj input = 4·n_embd
    assert keys.K_p.shape == (128, sum(r.Q + r.T - 1 - r.N for r in reqs))
    K, K_p, H = [], [], []
    for r in reqs:
        one = compute_window_keys(model, layout, LAYER, [r], preservation=True)
        K.append(one.K), K_p.append(one.K_p)
        H.append(compute_window_states(model, layout, LAYER, [r]))
        # directly: the edited module's input on the unpadded joint sequence
        got = {}

        def grab(_m, args):
            got["x"] = args[0][0]

        h = edited_module(model, layout, LAYER).register_forward_pre_hook(grab)
        try:
            hs = model(input_ids=torch.tensor([r.input_ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        finally:
            h.remove()
        rest = [p for p in range(r.Q + r.T - 1) if p not in r.positions]
        torch.testing.assert_close(one.K, got["x"][r.positions].T)
        torch.testing.assert_close(one.K_p, got["x"][rest].T)
        torch.testing.assert_close(H[-1], hs[r.positions])
    torch.testing.assert_close(keys.K, torch.cat(K, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(keys.K_p, torch.cat(K_p, 1), rtol=1e-12, atol=1e-12)
    states = compute_window_states(model, layout, LAYER, reqs, chunk=2)
    torch.testing.assert_close(states, torch.cat(H), rtol=1e-12, atol=1e-12)
    assert compute_window_keys(model, layout, LAYER, reqs).K_p is None


def test_reference_preservation_positions_add_the_answers_last_token(setup):
    """preservation_positions "reference" (the μKE code's choice): the keys are read from question ⧺ the whole answer,
    so each request gains exactly one preservation key, the edited module's input at the answer's last token; the
    memory keys and the other preservation keys are those of the Q + T − 1 input (causal attention)."""
    from lit_edit.muke import WindowColumns

    tok, model, layout = setup
    reqs = make_requests(tok)
    base = compute_window_keys(model, layout, LAYER, reqs, preservation=True)
    full = compute_window_keys(model, layout, LAYER, reqs, preservation=True, full=True)
    torch.testing.assert_close(full.K, base.K, rtol=1e-12, atol=1e-12)
    assert full.K_p.shape[1] == base.K_p.shape[1] + len(reqs)
    start = 0
    for i, r in enumerate(reqs):  # row-major: each request's positions in order, its last token last
        n = r.Q + r.T - 1 - r.N
        got = {}
        h = edited_module(model, layout, LAYER).register_forward_pre_hook(lambda _m, a: got.update(x=a[0][0]))
        try:
            model(input_ids=torch.tensor([list(r.input_ids) + [r.target_ids[-1]]]))
        finally:
            h.remove()
        block = full.K_p[:, start + i: start + i + n + 1]
        torch.testing.assert_close(block[:, :n], base.K_p[:, start: start + n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block[:, n], got["x"][-1], rtol=1e-12, atol=1e-12)
        start += n
    cols = WindowColumns(reqs, [f"f{i}" for i in range(len(reqs))], preservation=True, pad=0, full=True)
    assert len(cols.ids) == full.K.shape[1] + full.K_p.shape[1]
    with pytest.raises(ValueError, match="preservation_positions"):
        WindowConfig(preservation_positions="all")


def test_batch_update_with_preservation_keys_is_eq_8_5(setup):
    """§8.5 through apply_batch: one layer, a fresh MEMIT solver, targets at that layer, preservation on. The written
    Δ must equal R Kᵀ (λ C0 + K_p K_pᵀ + K Kᵀ)⁻¹ computed here from the keys, with R = Z − H; the ledger gets every
    window and preservation column under its request's id."""
    from lit_edit.editing import apply_batch
    from lit_edit.layouts import get_weight
    from lit_edit.muke import WindowColumns
    from lit_edit.requests import UnstructuredRequest
    from lit_edit.solvers import MEMIT

    tok, model, layout = setup
    model = tiny_gpt2(tok, n_layer=3, n_embd=32)  # a private copy: this test writes
    seqs = make_requests(tok)
    reqs = [UnstructuredRequest(i, f"question {i}", "answer") for i in range(len(seqs))]
    d_in = get_weight(model, layout, LAYER).shape[1]
    g = torch.Generator().manual_seed(1)
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    C0 = A @ A.T / d_in + torch.eye(d_in, dtype=torch.float64)
    lam = 3.0
    solver = MEMIT(mom2_update_weight=lam)
    solver.setup({LAYER: C0})
    cols = WindowColumns(seqs, [r.fact_id for r in reqs], preservation=True, pad=0)
    keys = compute_window_keys(model, layout, LAYER, seqs, preservation=True)
    H = compute_window_states(model, layout, LAYER, seqs)
    Z = H + torch.randn(H.shape, generator=g, dtype=H.dtype)
    W0 = get_weight(model, layout, LAYER).clone()
    apply_batch(model, layout, solver, [LAYER], reqs, Z, cols)
    K, K_p = keys.K, keys.K_p
    expected = (Z - H).T @ K.T @ torch.linalg.inv(lam * C0 + K_p @ K_p.T + K @ K.T)
    torch.testing.assert_close(get_weight(model, layout, LAYER) - W0, expected, rtol=1e-8, atol=1e-10)
    n_t, n_p = K.shape[1], K_p.shape[1]
    assert cols.n_targets == n_t and len(cols.ids) == n_t + n_p
    assert n_p == sum(len(s.input_ids) - s.N for s in seqs)
    assert solver.ledger_ids == cols.ids and solver.knows("question 0")


def test_keys_of_a_request_that_exactly_fills_the_context(setup):
    """Q + T − 1 = n_positions is what the length check allows: keys, states and preservation keys must fit it
    (reading them from question ⧺ full answer, Q + T tokens, overflowed the position table)."""
    tok, model, layout = setup
    n_pos = model.config.n_positions
    q, t = 4, n_pos - 3
    r = WindowedSequence(tuple(range(1, q + 1)), tuple(range(1, t + 1)), tuple(split_windows(t, 8)))
    assert len(r.input_ids) == n_pos
    keys = compute_window_keys(model, layout, LAYER, [r], preservation=True)
    assert keys.K.shape[1] == r.N and keys.K_p.shape[1] == n_pos - r.N
    assert compute_window_states(model, layout, LAYER, [r]).shape[0] == r.N
