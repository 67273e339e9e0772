"""C0 = E[k kᵀ] (docs/algorithms.md §3): value, streaming/truncation, the disk cache's key, and published statistics
read from the reference code's .npz files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_edit import stats as S
from lit_edit.hooks import capture_inputs
from lit_edit.editing import add_to_weight
from lit_edit.layouts import edited_module, get_layout, get_weight

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


def write_layer_stats_npz(path, keys, precision=np.float32):
    """A file as the ROME/MEMIT/AlphaEdit ``layer_stats`` writes it: a CombinedStat(mom2=SecondMoment()) state saved
    with numpy.savez, i.e. the running *sum* of k kᵀ and the token count under the prefix "mom2.", and tally's args."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = keys.double()
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(len(k)), "mom2.mom2": (k.T @ k).numpy().astype(precision),
                      "sample_size": np.array(7)})


@pytest.mark.parametrize("as_template", [False, True])
def test_published_npz_stats_are_the_sum_divided_by_the_count(setup, tmp_path, as_template):
    tok, model, layout = setup
    want, n = explicit_second_moment(model, tok, layout, 2, TEXTS, 12)
    mod = {2: edited_module(model, layout, 2)}
    keys = []
    for t in TEXTS:
        with capture_inputs(mod) as store, torch.no_grad():
            model(input_ids=torch.tensor([tok(t, truncation=True, max_length=12)["input_ids"]]))
        keys.append(store[2][0][0])
    keys = torch.cat(keys)
    assert len(keys) == n
    name = layout.rewrite_module.format(2)  # the reference names files after the edited module
    folder = tmp_path / "stats" / "tiny" / "wikipedia_stats"
    write_layer_stats_npz(folder / f"{name}_float64_mom2_7.npz", keys, np.float64)
    source = str(folder / f"{layout.rewrite_module}_float64_mom2_7.npz") if as_template else str(tmp_path / "stats")
    cfg = S.StatsConfig(npz=source)  # no corpus needed: the dataset stays unresolved
    got = S.layer_stats(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(got[2], want, rtol=1e-10, atol=1e-12)
    assert not (tmp_path / "cache").exists()  # read, never computed or cached


def test_published_npz_stats_errors(setup, tmp_path):
    tok, model, layout = setup
    name = layout.rewrite_module.format(1)
    d_in = edited_module(model, layout, 1).weight.shape[0]  # GPT-2's Conv1D stores [d_in, d_out]
    with pytest.raises(FileNotFoundError, match="found none"):
        S.layer_stats(model, tok, layout, [1], S.StatsConfig(npz=str(tmp_path)), "tiny")
    write_layer_stats_npz(tmp_path / "a" / f"{name}_float32_mom2_100000.npz", torch.randn(5, d_in))
    C = S.layer_stats(model, tok, layout, [1], S.StatsConfig(npz=str(tmp_path)), "tiny")[1]
    assert C.dtype == torch.float64 and C.shape == (d_in, d_in)
    write_layer_stats_npz(tmp_path / "b" / f"{name}_float64_mom2_all.npz", torch.randn(5, d_in))
    with pytest.raises(FileNotFoundError, match="expected one"):  # two candidates: ambiguous
        S.layer_stats(model, tok, layout, [1], S.StatsConfig(npz=str(tmp_path)), "tiny")
    wrong = tmp_path / "wrong_{}.npz"
    write_layer_stats_npz(Path(str(wrong).format(1)), torch.randn(5, d_in + 1))
    with pytest.raises(ValueError, match="takes"):
        S.layer_stats(model, tok, layout, [1], S.StatsConfig(npz=str(wrong)), "tiny")
    np.savez(tmp_path / "other_1.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="mom2.count"):
        S.layer_stats(model, tok, layout, [1], S.StatsConfig(npz=str(tmp_path / "other_{}.npz")), "tiny")


def test_self_corpus_is_seeded_kept_beside_the_statistics_and_sampled_once(setup, tmp_path, monkeypatch):
    """``model.stats.dataset: self``: texts sampled from the model itself, the same for the same seed and others for
    another, without touching the caller's random state; written to texts.jsonl beside the statistics and read from
    there (not sampled again) when the statistics are computed again; C0 is the second moment over exactly those
    texts."""
    tok, model, layout = setup
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = S.sample_texts(model, tok, n=5, length=8, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # forked: the caller's stream is untouched
    assert a == S.sample_texts(model, tok, n=5, length=8, seed=1) and a != S.sample_texts(model, tok, 5, 8, seed=2)
    assert len(a) == 5 and all(isinstance(t, str) for t in a)

    cfg = S.StatsConfig(dataset="self", n_samples=6, sample_length=8, max_length=16, batch_tokens=64, dtype="float64")
    files = S.c0_files(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path))
    [kept] = list(tmp_path.rglob("texts.jsonl"))
    assert kept.parent == files.paths[2].parent  # beside the statistics
    texts = [json.loads(line)["text"] for line in kept.read_text().splitlines()]
    assert texts == S.sample_texts(model, tok, n=6, length=8, seed=cfg.shuffle_seed)
    ref, _ = explicit_second_moment(model, tok, layout, 2, [t for t in texts if t], 16)
    torch.testing.assert_close(files.load_all()[2], ref, rtol=1e-10, atol=1e-12)

    files.paths[2].unlink()  # the statistic again, from the kept texts: no sampling
    monkeypatch.setattr(S, "sample_texts", lambda *a, **k: pytest.fail("sampled again"))
    again = S.c0_files(model, tok, layout, [2], cfg, "tiny", cache_dir=str(tmp_path))
    torch.testing.assert_close(again.load_all()[2], ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="model.stats.sample_length"):
        S.StatsConfig(dataset="self", sample_length=0)
