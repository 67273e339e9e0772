"""Algebra of the closed-form solvers, in float64, without a model.

Every expected value is computed independently, from the normal equations of the objective with a
dense solve (never through the solver's incremental inverse)."""
import pytest
import torch

from lit_edit.solvers import (
    sym_downdate,
    MEMIT,
    AlignedSolver,
    AlphaEdit,
    nullspace_basis,
    prune,
    rect,
    rect_mask,
    woodbury_response,
)

D_IN, D_OUT, LAYER = 24, 10, 3
F64 = torch.float64


def make_C0(seed=0, null_dims=8):
    """An SPD second moment with a known set of tiny eigenvalues (an approximate null space)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=F64))
    s = torch.cat([torch.rand(D_IN - null_dims, generator=g, dtype=F64) + 0.5, torch.full((null_dims,), 1e-4, dtype=F64)])
    return Q @ torch.diag(s) @ Q.T


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


C0 = make_C0()
THR = 1e-2

# name -> (constructor, one-time objective weights (λ, α, projected?)); all aligned solvers
ALIGNED = {
    "memit_seq": (lambda: MEMIT(mom2_update_weight=3.0), (3.0, 0.0, False)),
    "memit_seq_fold_each_step": (lambda: MEMIT(mom2_update_weight=3.0, fold_every=1), (3.0, 0.0, False)),
    "alphaedit_fold_every_4": (lambda: AlphaEdit(L2=0.7, nullspace_threshold=THR, fold_every=4), (0.0, 0.7, True)),
    "alphaedit": (lambda: AlphaEdit(L2=0.7, nullspace_threshold=THR), (0.0, 0.7, True)),
    "aligned_projected_ridge": (lambda: AlignedSolver(mom2_update_weight=2.0, L2=0.3, projector="nullspace",
                                                      nullspace_threshold=THR), (2.0, 0.3, True)),
    "memit_ridge": (lambda: MEMIT(mom2_update_weight=3.0, L2=1.0), (3.0, 1.0, False)),
}
ALL = {
    **{k: v[0] for k, v in ALIGNED.items()},
    "memit_naive": lambda: MEMIT(mom2_update_weight=3.0, mode="naive"),
    "alphaedit_naive": lambda: AlphaEdit(L2=0.7, nullspace_threshold=THR, mode="naive"),
    "memorize_latest": lambda: MEMIT(mom2_update_weight=3.0, mode="memorize_latest"),
    "prune": lambda: MEMIT(mom2_update_weight=3.0, L2=1.0, regularizer="prune"),
    "prune_err": lambda: MEMIT(mom2_update_weight=3.0, L2=1.0, regularizer="prune", error_correction=True),
    "rect": lambda: MEMIT(mom2_update_weight=3.0, L2=1.0, regularizer="rect", rect_keep=40.0),
    "rect_err": lambda: MEMIT(mom2_update_weight=3.0, L2=1.0, regularizer="rect", rect_keep=20.0, error_correction=True),
}


def build(name):
    s = ALL[name]()
    s.setup({LAYER: C0})
    return s


def step(s, W, K, V, ids):
    """One single-layer step as ``apply_batch`` runs it: raw solve on the current weights, commit with the
    stored values V = W K + R, then write what ``finalize`` returns. Returns (new W, raw Δ)."""
    R = V - W @ K
    raw = s.solve(LAYER, K, R)
    s.commit(LAYER, K, W @ K + R)
    W_new = W + s.finalize(LAYER, raw, W)
    s.finish_batch(ids)
    return W_new, raw


def one_time(lam, alpha, projected, W0, Ks, Vs):
    """argmin over Δ = G Pᵀ of λ‖Δ K0‖² + α‖G‖² + Σ‖(W0 + Δ)K − V‖², from the dense normal equations."""
    K, V = torch.cat(Ks, 1), torch.cat(Vs, 1)
    P = torch.linalg.eigh(C0).eigenvectors[:, torch.linalg.eigh(C0).eigenvalues < THR] if projected else torch.eye(D_IN, dtype=F64)
    Kt = P.T @ K
    A = lam * P.T @ C0 @ P + alpha * torch.eye(P.shape[1], dtype=F64) + Kt @ Kt.T
    return torch.linalg.solve(A, Kt @ (V - W0 @ K).T).T @ P.T


def dense_alphaedit(alpha, Cp, K, R):
    """docs/algorithms.md §5 verbatim: Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with the dense projector from an SVD."""
    U, S, _ = torch.linalg.svd(C0)
    P = U[:, S < THR] @ U[:, S < THR].T
    return R @ K.T @ P @ torch.linalg.inv((Cp + K @ K.T) @ P + alpha * torch.eye(D_IN, dtype=F64))


def stream(n_steps=5, n=3, seed=0, scale=1.0):
    Ks = [rand(D_IN, n, seed=seed + 20 + t) for t in range(n_steps)]
    Vs = [scale * rand(D_OUT, n, seed=seed + 40 + t) for t in range(n_steps)]
    return Ks, Vs


# -- gate == response ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_gate_equals_the_R_dependent_part_of_the_update(name):
    """§7.6: Δ = R·M + c. Checked after steps have accumulated state (C_p, the fed-back error F, the running sum S)."""
    s = build(name)
    W = 0.05 * rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream(scale=5.0)
    for t, (K, V) in enumerate(zip(Ks, Vs)):
        K2 = rand(D_IN, 4, seed=90 + t)
        M = s.gate(LAYER, K2)
        assert M.shape == (4, D_IN)
        const = s.solve(LAYER, K2, torch.zeros(D_OUT, 4, dtype=F64))
        for seed in range(2):
            R = rand(D_OUT, 4, seed=100 * t + seed)
            torch.testing.assert_close(s.solve(LAYER, K2, R) - const, R @ M, rtol=1e-9, atol=1e-10)
        W, _ = step(s, W, K, V, [f"{t}.{j}" for j in range(K.shape[1])])


def test_memit_matches_closed_form():
    s = build("memit_seq")
    K1, K2, R = rand(D_IN, 4, seed=1), rand(D_IN, 5, seed=2), rand(D_OUT, 5, seed=3)
    s.commit(LAYER, K1, rand(D_OUT, 4, seed=4))
    want = R @ K2.T @ torch.linalg.inv(3.0 * C0 + K1 @ K1.T + K2 @ K2.T)
    torch.testing.assert_close(s.solve(LAYER, K2, R), want, rtol=1e-9, atol=1e-11)


def test_alphaedit_basis_form_equals_dense_projector_form():
    s = build("alphaedit")
    assert s.U[LAYER].shape == (D_IN, 8)
    K1, K2, R = rand(D_IN, 4, seed=1), rand(D_IN, 5, seed=2), rand(D_OUT, 5, seed=3)
    s.commit(LAYER, K1, rand(D_OUT, 4, seed=4))
    want = dense_alphaedit(0.7, K1 @ K1.T, K2, R)
    torch.testing.assert_close(s.solve(LAYER, K2, R), want, rtol=1e-9, atol=1e-11)
    # the update lives in the null space: it leaves preserved keys (top eigvectors of C0) untouched
    evals, evecs = torch.linalg.eigh(C0)
    assert (s.solve(LAYER, K2, R) @ evecs[:, evals > 0.1]).abs().max() < 1e-10


def test_naive_alphaedit_is_the_formula_without_Cp():
    s = build("alphaedit_naive")
    K1, K2, R = rand(D_IN, 4, seed=1), rand(D_IN, 5, seed=2), rand(D_OUT, 5, seed=3)
    s.commit(LAYER, K1, rand(D_OUT, 4, seed=4))  # ignored by the naive objective
    torch.testing.assert_close(s.solve(LAYER, K2, R), dense_alphaedit(0.7, torch.zeros_like(C0), K2, R),
                               rtol=1e-9, atol=1e-11)


# -- the OTE-SE alignment property --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALIGNED))
def test_sum_of_sequential_updates_equals_one_time_solution(name):
    lam, alpha, projected = ALIGNED[name][1]
    W0 = rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream()
    s = build(name)
    W = W0.clone()
    for t, (K, V) in enumerate(zip(Ks, Vs)):
        W, _ = step(s, W, K, V, [str(t)] * K.shape[1])
        torch.testing.assert_close(W - W0, one_time(lam, alpha, projected, W0, Ks[: t + 1], Vs[: t + 1]),
                                   rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["memit_naive", "alphaedit_naive"])
def test_naive_mode_is_not_aligned(name):
    """The ablation really differs: without C_p the sequential sum drifts from the one-time solution."""
    W0 = rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream()
    s = build(name)
    W = W0.clone()
    for K, V in zip(Ks, Vs):
        W, _ = step(s, W, K, V, ["x"] * K.shape[1])
    lam, alpha, projected = ALIGNED["memit_seq" if name == "memit_naive" else "alphaedit"][1]
    assert (W - W0 - one_time(lam, alpha, projected, W0, Ks, Vs)).norm() > 1e-2 * W0.norm()


# -- post-processing regularisers and Algorithm 1 -----------------------------------------------------


def test_prune_operator():
    W = rand(D_OUT, D_IN, seed=1)
    smax = torch.linalg.matrix_norm(W, ord=2)
    small = rand(D_OUT, D_IN, seed=2)
    small = small / torch.linalg.matrix_norm(small, ord=2) * 0.9 * smax
    assert prune(small, W) is small  # nothing above σ_max: unchanged
    U, _, Vh = torch.linalg.svd(rand(D_OUT, D_IN, seed=3), full_matrices=False)
    s = torch.linspace(0.1, 3.0, D_OUT, dtype=F64) * smax
    got = torch.linalg.svdvals(prune((U * s) @ Vh, W))
    want = torch.where(s > smax, torch.log(s) - torch.log(smax) + smax, s).sort(descending=True).values
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_rect_operator_keeps_the_top_k_percent_by_relative_change():
    W, delta = rand(D_OUT, D_IN, seed=1), rand(D_OUT, D_IN, seed=2)
    for k in (20.0, 40.0, 100.0):
        mask = rect_mask(delta, W, k)
        assert mask.sum().item() == D_OUT * D_IN - int(D_OUT * D_IN * (100 - k) // 100) + (1 if k < 100 else 0)
        r = (delta / (W + 1e-8)).abs()
        if k < 100:
            assert r[mask].min() >= r[~mask].max()
        out = rect(delta, W, k)
        assert torch.equal(out[mask], delta[mask]) and (out[~mask] == 0).all()


@pytest.mark.parametrize("reg", ["prune", "rect"])
def test_error_correction_invariant(reg):
    """Algorithm 1: (W_t − W_0) A_t = B_t + E_t. Equivalently, at every step the raw update lands exactly on
    the one-time solution, and the written weights differ from it by the current step's Φ(Δ) − Δ only.
    Without the feedback the raw step misses the one-time solution by the accumulated errors."""
    W0 = 0.02 * rand(D_OUT, D_IN, seed=7)  # small σ_max so that PRUNE fires
    Ks, Vs = stream(scale=5.0)
    kwargs = dict(mom2_update_weight=3.0, L2=1.0, regularizer=reg, rect_keep=20.0)
    with_ec, without = MEMIT(error_correction=True, **kwargs), MEMIT(**kwargs)
    with_ec.setup({LAYER: C0}), without.setup({LAYER: C0})
    W, Wn = W0.clone(), W0.clone()
    fired = []
    for t, (K, V) in enumerate(zip(Ks, Vs)):
        target = W0 + one_time(3.0, 1.0, False, W0, Ks[: t + 1], Vs[: t + 1])
        W_prev, Wn_prev = W, Wn
        W, raw = step(with_ec, W, K, V, ["a"] * 3)
        Wn, raw_n = step(without, Wn, K, V, ["a"] * 3)
        torch.testing.assert_close(W_prev + raw, target, rtol=1e-9, atol=1e-10)
        err = (W - W_prev) - raw  # Φ(Δ_t) − Δ_t
        fired.append(err.norm() > 1e-3 * raw.norm())
        torch.testing.assert_close(W - target, err, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(with_ec.F[LAYER], err)  # F = E_t A_t⁻¹
        if t >= 1:
            assert (Wn_prev + raw_n - target).norm() > 1e-3 * target.norm()
    assert fired[0] and sum(fired) >= 1 + (reg == "rect"), f"the regulariser must change Δ for this test to mean anything: {fired}"


def test_regularizer_options_are_checked():
    with pytest.raises(ValueError, match="null space"):
        AlignedSolver(projector="nullspace", regularizer="rect")
    with pytest.raises(ValueError, match="needs a regularizer"):
        MEMIT(error_correction=True)
    with pytest.raises(ValueError, match="mode"):
        MEMIT(mode="sequential")


# -- conflicts and forgetting -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALIGNED))
def test_edit_A_edit_B_remove_A_equals_edit_B_alone(name):
    W0 = rand(D_OUT, D_IN, seed=7)
    (KA, KB), (VA, VB) = stream(n_steps=2)
    s = build(name)
    W, _ = step(s, W0, KA, VA, ["a1", "a2", "a3"])
    W, _ = step(s, W, KB, VB, ["b1", "b2", "b3"])
    W = W + s.forget(["a1", "a2", "a3"], {LAYER: W})[LAYER]
    only_b = build(name)
    W_b, _ = step(only_b, W0, KB, VB, ["b1", "b2", "b3"])
    torch.testing.assert_close(W, W_b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s.inverse(LAYER), only_b.inverse(LAYER), rtol=1e-8, atol=1e-10)
    assert s.ledger_ids == ["b1", "b2", "b3"] and s.n_edits == 3
    # and the solver keeps working: a next edit C is the one-time solution of {B, C}
    KC, VC = rand(D_IN, 2, seed=77), rand(D_OUT, 2, seed=78)
    W, _ = step(s, W, KC, VC, ["c1", "c2"])
    lam, alpha, projected = ALIGNED[name][1]
    torch.testing.assert_close(W - W0, one_time(lam, alpha, projected, W0, [KB, KC], [VB, VC]), rtol=1e-9, atol=1e-10)


def test_removing_part_of_a_batch_and_replacing_a_value():
    """Remove one column of a batch; replace another fact's value (Prop. 3.5 with the OLD stored value)."""
    W0 = rand(D_OUT, D_IN, seed=7)
    (KA, KB), (VA, VB) = stream(n_steps=2)
    s = build("memit_seq")
    W, _ = step(s, W0, KA, VA, ["a1", "a2", "a3"])
    W, _ = step(s, W, KB, VB, ["b1", "b2", "b3"])
    W = W + s.forget(["a2", "b1"], {LAYER: W})[LAYER]  # a2 is removed, b1 gets a new value
    V_new = rand(D_OUT, 1, seed=99)
    W, _ = step(s, W, KB[:, :1], V_new, ["b1"])
    K_keep = [KA[:, [0, 2]], KB[:, 1:], KB[:, :1]]
    V_keep = [VA[:, [0, 2]], VB[:, 1:], V_new]
    torch.testing.assert_close(W - W0, one_time(3.0, 0.0, False, W0, K_keep, V_keep), rtol=1e-9, atol=1e-10)
    with pytest.raises(KeyError, match="a2"):
        s.forget(["a2"], {LAYER: W})


def test_forgetting_keeps_the_error_correction_invariant():
    """With error feedback, removing an edit keeps (W − W_0) A = B + E: the next raw step still lands on the
    one-time solution of the remaining edits plus the new one."""
    W0 = 0.02 * rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream(n_steps=3, scale=5.0)
    s = build("rect_err")
    W, _ = step(s, W0, Ks[0], Vs[0], ["a"] * 3)
    W, _ = step(s, W, Ks[1], Vs[1], ["b"] * 3)
    W = W + s.forget(["a"], {LAYER: W})[LAYER]
    W_prev = W
    W, raw = step(s, W, Ks[2], Vs[2], ["c"] * 3)
    torch.testing.assert_close(W_prev + raw - W0, one_time(3.0, 1.0, False, W0, Ks[1:], Vs[1:]), rtol=1e-9, atol=1e-10)


def test_forgetting_needs_a_ledger():
    with pytest.raises(ValueError, match="no ledger"):
        build("memit_naive").forget(["a"], {LAYER: torch.zeros(D_OUT, D_IN, dtype=F64)})


@pytest.mark.parametrize("projected", [False, True], ids=["memit", "alphaedit"])
def test_memorize_latest_keeps_only_the_newest_batch(projected):
    """§6.5: after every step the weights are the one-time solution of K0 and the newest batch only, which is
    also what "drop the previous batch (Prop. 3.5), then insert" gives."""
    W0 = rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream()
    if projected:
        s, ref, weights = AlphaEdit(L2=0.7, nullspace_threshold=THR, mode="memorize_latest"), build("alphaedit"), (0.0, 0.7)
        s.setup({LAYER: C0})
    else:
        s, ref, weights = build("memorize_latest"), build("memit_seq"), (3.0, 0.0)
    W, W_ref = W0.clone(), W0.clone()
    for t, (K, V) in enumerate(zip(Ks, Vs)):
        W, _ = step(s, W, K, V, [str(t)] * 3)
        torch.testing.assert_close(W - W0, one_time(*weights, projected, W0, [K], [V]), rtol=1e-9, atol=1e-10)
        if t:
            W_ref = W_ref + ref.forget([str(t - 1)], {LAYER: W_ref})[LAYER]
        W_ref, _ = step(ref, W_ref, K, V, [str(t)] * 3)
        torch.testing.assert_close(W, W_ref, rtol=1e-9, atol=1e-10)


# -- the incremental algebra --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["memit_seq", "alphaedit"])
def test_commit_reuses_the_solve_only_for_its_own_keys(name):
    """commit after solve(K) reuses the solve's projected keys and factors; with other keys it computes its own.
    Either way the kept constraint is what a commit without a preceding solve gives."""
    K1, K2 = rand(D_IN, 3, seed=21), rand(D_IN, 3, seed=22)
    V = rand(D_OUT, 3, seed=23)
    for solve_keys, commit_keys in ((K1, K1), (K1, K2)):
        s, ref = build(name), build(name)
        s.solve(LAYER, solve_keys, V)
        s.commit(LAYER, commit_keys, V)
        ref.commit(LAYER, commit_keys, V)
        torch.testing.assert_close(s.inverse(LAYER), ref.inverse(LAYER), rtol=0, atol=0)
        s.finish_batch(["x"] * 3), ref.finish_batch(["x"] * 3)  # the ledger's entries are written per step
        torch.testing.assert_close(s.ledger.entries(LAYER), ref.ledger.entries(LAYER), rtol=0, atol=0)
        torch.testing.assert_close(s.ledger.entries(LAYER)[0], commit_keys, rtol=0, atol=0)


def test_woodbury_update_equals_the_dense_inverse():
    K0 = rand(D_IN, 40, seed=1)
    A = K0 @ K0.T + 0.5 * torch.eye(D_IN, dtype=F64)
    K = rand(D_IN, 5, seed=2)
    X, Z = woodbury_response(K.T @ torch.linalg.inv(A), K)
    A_new = A + K @ K.T
    torch.testing.assert_close(torch.linalg.inv(A) - Z.T @ Z, torch.linalg.inv(A_new), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(X, K.T @ torch.linalg.inv(A_new), rtol=1e-9, atol=1e-11)


def test_nullspace_basis_is_orthonormal_and_matches_threshold():
    U, evals = nullspace_basis(make_C0(null_dims=5), 1e-2)
    assert U.shape[1] == 5 and (evals < 1e-2).all()
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=F64), atol=1e-12, rtol=0)
    assert (make_C0(null_dims=5) @ U).norm() < 1e-3


def test_alphaedit_refuses_empty_nullspace():
    s = AlphaEdit(nullspace_threshold=1e-9)
    with pytest.raises(ValueError, match="no eigenvalue"):
        s.setup({LAYER: C0})


def test_singular_preservation_system_is_refused():
    with pytest.raises(ValueError, match="not positive definite"):
        MEMIT(mom2_update_weight=0.0).setup({LAYER: C0})


@pytest.mark.parametrize("name", ["memit_seq", "alphaedit", "rect_err", "memorize_latest"])
def test_state_dict_round_trip_and_snapshot(name):
    s = build(name)
    W = 0.02 * rand(D_OUT, D_IN, seed=7)
    Ks, Vs = stream(n_steps=3, scale=5.0)
    W, _ = step(s, W, Ks[0], Vs[0], ["a"] * 3)
    snap = s.state_dict()
    frozen = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in snap.get("Ainv", {}).items()}
    pending = {k: z[: snap["Zs_rows"][k]].clone() for k, z in snap.get("Zs", {}).items()}
    W, _ = step(s, W, Ks[1], Vs[1], ["b"] * 3)  # must not mutate the snapshot
    torch.testing.assert_close(snap.get("Ainv", {}), frozen)
    # the pending factors are appended in place after the snapshot's rows, which stay as they were
    assert all(s.inv[int(k)].buf is z for k, z in snap.get("Zs", {}).items())
    assert all(v.shape[0] == 3 for v in pending.values())
    torch.testing.assert_close({k: z[: snap["Zs_rows"][k]] for k, z in snap.get("Zs", {}).items()}, pending)
    if "ledger" in snap:  # the length of the ledger on disk and its checksum, not its entries
        assert snap["ledger"]["lines"] == 1 and "ids" not in snap["ledger"]
    t = build(name)
    t.load_state_dict(s.state_dict())
    t.attach(s.ledger.dir if s.keep_ledger else None)  # as a resume: the state refers to the ledger in s's directory
    K, R = rand(D_IN, 2, seed=5), rand(D_OUT, 2, seed=6)
    torch.testing.assert_close(t.solve(LAYER, K, R), s.solve(LAYER, K, R))
    if s.keep_ledger:
        torch.testing.assert_close(t.forget(["a"], {LAYER: W})[LAYER], s.forget(["a"], {LAYER: W})[LAYER])
        s.load_state_dict(snap)  # rolling back to the snapshot truncates the ledger on disk to its step
        assert s.ledger_ids == ["a"] * 3 and len(s.ledger.index.complete_lines()) == 1
        torch.testing.assert_close(s.ledger.entries(LAYER)[0], Ks[0])


@pytest.mark.parametrize("d,nb", [(37, 3), (64, 8), (50, 1), (2048, None)])
def test_sym_downdate_equals_the_full_product_and_is_symmetric(d, nb):
    G = rand(d, d, seed=1)
    A = G @ G.T + torch.eye(d, dtype=torch.float64)
    Z = rand(13, d, seed=2)
    out = sym_downdate(A, Z, nb)
    torch.testing.assert_close(out, A - Z.T @ Z, rtol=1e-12, atol=1e-10)
    blocks = nb or max(1, min(8, d // 1024))
    edges = [d * i // blocks for i in range(blocks + 1)]
    for i in range(1, blocks):  # off-diagonal blocks are exact mirrors
        a, b = edges[i], edges[i + 1]
        assert torch.equal(out[:a, a:b], out[a:b, :a].T)
    assert torch.equal(A, G @ G.T + torch.eye(d, dtype=torch.float64))  # the input is not modified
