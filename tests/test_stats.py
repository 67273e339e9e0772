"""C0 = E[k kᵀ] (docs/algorithms.md §3): value, streaming/truncation, and the disk cache's key."""
import pytest
import torch

from lit_edit import stats as S
from lit_edit.hooks import capture_inputs
from lit_edit.layouts import add_to_weight, edited_module, get_layout, get_weight

from tests.helpers import SENTENCES, tiny_gpt2, tiny_tokenizer

TEXTS = [s * (1 + i % 3) for i, s in enumerate(SENTENCES * 3)]  # varying lengths, some over the cap


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)
    return tok, model, get_layout(model)


def explicit_second_moment(model, tok, layout, layer, texts, cap):
    """One text at a time, no padding: Σ k kᵀ / N over every token of every (truncated) text."""
    mod = {layer: edited_module(model, layout, layer)}
    total, n = 0, 0
    for t in texts:
        ids = tok(t, truncation=True, max_length=cap)["input_ids"]
        with capture_inputs(mod) as store, torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        k = store[layer][0][0].double()
        total, n = total + k.T @ k, n + len(ids)
    return total / n, n


def test_second_moment_equals_explicit_sum_over_tokens(setup):
    tok, model, layout = setup
    cap = 12
    C, n = S.compute_second_moments(model, tok, layout, [1, 3], iter(TEXTS), max_length=cap, batch_tokens=40)
    for l in (1, 3):
        ref, n_ref = explicit_second_moment(model, tok, layout, l, TEXTS, cap)
        assert n == n_ref
        torch.testing.assert_close(C[l], ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(C[l], C[l].T)


def test_layer_stats_cache_reused_and_keyed_on_weights(setup, tmp_path, monkeypatch):
    tok, model, layout = setup
    model = tiny_gpt2(tok, seed=1)  # own copy: this test edits it
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    cfg = S.StatsConfig(dataset=str(corpus), n_samples=10, max_length=16, batch_tokens=64, dtype="float64")
    C1 = S.layer_stats(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path / "cache"))
    ref, _ = explicit_second_moment(model, tok, layout, 2, TEXTS[:10], 16)
    torch.testing.assert_close(C1[2], ref, rtol=1e-10, atol=1e-12)

    calls = []
    real = S.compute_second_moments
    monkeypatch.setattr(S, "compute_second_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    C2 = S.layer_stats(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path / "cache"))
    assert calls == [] and torch.equal(C1[2], C2[2])  # reused from disk

    with torch.no_grad():  # an edit to an earlier layer changes the keys of layer 2: the cache must not be reused
        add_to_weight(model, layout, 1, 0.5 * torch.randn_like(get_weight(model, layout, 1)))
    C3 = S.layer_stats(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path / "cache"))
    assert calls == [1] and not torch.allclose(C3[2], C1[2])


@pytest.mark.parametrize("model,dataset,expected", [
    ("world", None, "world"), ("world:large", None, "world:large"), ("world:tiny", None, "world:tiny"),
    ("openai-community/gpt2-xl", None, "world"),  # not the world: the default corpus, as before the default was None
    ("world:large", "world", "world"), ("world", "wikimedia/wikipedia", "wikimedia/wikipedia"),  # set: kept
])
def test_stats_dataset_unset_follows_the_built_in_world(model, dataset, expected):
    cfg = S.StatsConfig(dataset=dataset, n_samples=7)
    resolved = cfg.for_model(model)
    assert resolved.dataset == expected and resolved.n_samples == 7
    assert cfg.dataset == dataset  # a new config; the given one is unchanged


def test_module_resolves_stats_dataset_once_for_hparams_checkpoints_and_cache(setup):
    from dataclasses import asdict

    from lit_edit.module import EditModule

    module = EditModule(model="world:large", layers=[0, 1], stats=S.StatsConfig(max_length=64))
    assert module.stats_cfg.dataset == "world:large"
    assert module.hparams["stats"] == asdict(module.stats_cfg)  # what run_settings() stores and a resume compares
    assert EditModule(model="world:large", layers=[0, 1], stats={"dataset": None}).stats_cfg.dataset == "world:large"
    tok, model, layout = setup
    with pytest.raises(ValueError, match="model.stats.dataset is unresolved"):
        S.layer_stats(model, tok, layout, [0], S.StatsConfig(), "m")
