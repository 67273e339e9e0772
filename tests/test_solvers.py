"""Algebra of the closed-form solvers, in float64, without a model."""
import pytest
import torch

from lit_edit.solvers import MEMIT, AlphaEdit, nullspace_basis

D_IN, D_OUT, LAYER = 24, 10, 3


def make_C0(seed=0, null_dims=8):
    """An SPD-ish second moment with a known set of tiny eigenvalues (an approximate null space)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    s = torch.cat([torch.rand(D_IN - null_dims, generator=g, dtype=torch.float64) + 0.5,
                   torch.full((null_dims,), 1e-4, dtype=torch.float64)])
    return Q @ torch.diag(s) @ Q.T


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_alphaedit(C0, thr, alpha, Cp, K, R):
    """ALGORITHMS.md §5 verbatim: Δ = R Kᵀ P ((C_p + K Kᵀ) P + α I)⁻¹ with the dense projector."""
    U, S, _ = torch.linalg.svd(C0)
    U0 = U[:, S < thr]
    P = U0 @ U0.T
    return R @ K.T @ P @ torch.linalg.inv((Cp + K @ K.T) @ P + alpha * torch.eye(D_IN, dtype=torch.float64))


def solvers():
    return {"memit_seq": MEMIT(mom2_update_weight=3.0), "memit_naive": MEMIT(mom2_update_weight=3.0, sequential=False),
            "alphaedit": AlphaEdit(L2=0.7, nullspace_threshold=1e-2)}


@pytest.mark.parametrize("name", ["memit_seq", "memit_naive", "alphaedit"])
def test_gate_equals_update_for_random_residuals(name):
    s = solvers()[name]
    C0 = make_C0()
    s.setup({LAYER: C0})
    for t in range(3):  # also after constraints have accumulated
        K = rand(D_IN, 5, seed=10 + t)
        M = s.gate(LAYER, K)
        assert M.shape == (5, D_IN)
        for seed in range(3):
            R = rand(D_OUT, 5, seed=100 * t + seed)
            torch.testing.assert_close(s.solve(LAYER, K, R), R @ M, rtol=1e-10, atol=1e-12)
        s.commit(LAYER, K)


def test_memit_matches_closed_form():
    s = MEMIT(mom2_update_weight=3.0)
    C0 = make_C0()
    s.setup({LAYER: C0})
    K1, K2, R = rand(D_IN, 4, seed=1), rand(D_IN, 5, seed=2), rand(D_OUT, 5, seed=3)
    s.commit(LAYER, K1)
    want = R @ K2.T @ torch.linalg.inv(3.0 * C0 + K1 @ K1.T + K2 @ K2.T)
    torch.testing.assert_close(s.solve(LAYER, K2, R), want, rtol=1e-9, atol=1e-11)


def test_alphaedit_basis_form_equals_dense_projector_form():
    s = AlphaEdit(L2=0.7, nullspace_threshold=1e-2)
    C0 = make_C0()
    s.setup({LAYER: C0})
    assert s.U[LAYER].shape == (D_IN, 8)
    K1, K2, R = rand(D_IN, 4, seed=1), rand(D_IN, 5, seed=2), rand(D_OUT, 5, seed=3)
    s.commit(LAYER, K1)
    want = dense_alphaedit(C0, 1e-2, 0.7, K1 @ K1.T, K2, R)
    torch.testing.assert_close(s.solve(LAYER, K2, R), want, rtol=1e-9, atol=1e-11)
    # the update lives in the null space: it leaves preserved keys (top eigvectors of C0) untouched
    evals, evecs = torch.linalg.eigh(C0)
    assert (s.solve(LAYER, K2, R) @ evecs[:, evals > 0.1]).abs().max() < 1e-10


def test_nullspace_basis_is_orthonormal_and_matches_threshold():
    C0 = make_C0(null_dims=5)
    U = nullspace_basis(C0, 1e-2)
    assert U.shape[1] == 5
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (C0 @ U).norm() < 1e-3


def test_alphaedit_refuses_empty_nullspace():
    s = AlphaEdit(nullspace_threshold=1e-9)
    with pytest.raises(ValueError, match="no eigenvalue"):
        s.setup({LAYER: make_C0()})


def run_sequential(s, W0, Ks, Vs):
    """Sequential editing of one layer with fixed keys: R_t measured on the current weights."""
    W = W0.clone()
    for K, V in zip(Ks, Vs):
        W = W + s.solve(LAYER, K, V - W @ K)
        s.commit(LAYER, K)
    return W


def one_time(name, C0, W0, Ks, Vs):
    """The one-time (batch) solution of the objective each aligned solver optimises, from its normal equations."""
    K, V = torch.cat(Ks, 1), torch.cat(Vs, 1)
    R = V - W0 @ K
    if name == "memit_seq":  # min λ‖ΔK0‖² + Σ‖(W0+Δ)K − V‖²
        return R @ K.T @ torch.linalg.inv(3.0 * C0 + K @ K.T)
    return dense_alphaedit(C0, 1e-2, 0.7, torch.zeros_like(C0), K, R)  # min α‖Δ‖² s.t. Δ = Δ P


@pytest.mark.parametrize("name", ["memit_seq", "alphaedit"])
def test_sum_of_sequential_updates_equals_one_time_solution(name):
    C0 = make_C0()
    W0 = rand(D_OUT, D_IN, seed=7)
    Ks = [rand(D_IN, 3, seed=20 + t) for t in range(5)]
    Vs = [rand(D_OUT, 3, seed=40 + t) for t in range(5)]
    s = solvers()[name]
    s.setup({LAYER: C0})
    W = run_sequential(s, W0, Ks, Vs)
    torch.testing.assert_close(W - W0, one_time(name, C0, W0, Ks, Vs), rtol=1e-8, atol=1e-10)


def test_naive_memit_is_not_aligned():
    """The ablation really differs: without C_p the sequential sum drifts from the one-time solution."""
    C0 = make_C0()
    W0 = rand(D_OUT, D_IN, seed=7)
    Ks = [rand(D_IN, 3, seed=20 + t) for t in range(5)]
    Vs = [rand(D_OUT, 3, seed=40 + t) for t in range(5)]
    s = solvers()["memit_naive"]
    s.setup({LAYER: C0})
    W = run_sequential(s, W0, Ks, Vs)
    assert (W - W0 - one_time("memit_seq", C0, W0, Ks, Vs)).norm() > 1e-3


@pytest.mark.parametrize("name", ["memit_seq", "alphaedit"])
def test_state_dict_round_trip_and_snapshot(name):
    s = solvers()[name]
    C0 = make_C0()
    s.setup({LAYER: C0})
    s.commit(LAYER, rand(D_IN, 3, seed=1))
    snap = s.state_dict()
    before = {k: v.clone() for k, v in snap["Cp"].items()}
    s.commit(LAYER, rand(D_IN, 3, seed=2))  # must not mutate the snapshot
    torch.testing.assert_close(snap["Cp"], before)
    t = solvers()[name]
    t.setup({LAYER: C0})
    t.load_state_dict(s.state_dict())
    K, R = rand(D_IN, 2, seed=5), rand(D_OUT, 2, seed=6)
    torch.testing.assert_close(t.solve(LAYER, K, R), s.solve(LAYER, K, R))
