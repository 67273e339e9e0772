"""Causal tracing (lit_edit/trace.py, ROME §2.1): the hooks' properties on a tiny random GPT-2, the batched
trace against a one-row-at-a-time reference, and the ``train.py trace`` command."""
import json

import pytest
import torch
import yaml

from lit_edit.cli import main as cli_main
from lit_edit.layouts import get_layout
from lit_edit.trace import (causal_trace, clean_run, corrupted, corrupted_runs, encode_trace_prompt, main,
                            mlp_modules, noise_draws, window_layers)
from tests.helpers import tiny_gpt2, tiny_requests, tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok, n_layer=4)
    return model, tok, get_layout(model)


def _prompt(tok, index=3):
    """Request 4 ("The instrument of {} is the", subject "Ola Dunn"): text before and after the subject."""
    request = tiny_requests()[index]
    prompt = encode_trace_prompt(tok, request)
    assert 0 < prompt.subject_first <= prompt.subject_last < len(prompt.ids) - 1
    return request, prompt


def test_window_layers_follow_rome():
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))  # l-5 .. l+4
    assert list(window_layers(0, 10, 48)) == [0, 1, 2, 3, 4]
    assert list(window_layers(47, 10, 48)) == [42, 43, 44, 45, 46, 47]
    assert list(window_layers(7, 1, 48)) == [7]
    assert list(window_layers(2, 3, 4)) == [1, 2, 3]
    assert list(window_layers(1, 100, 4)) == [0, 1, 2, 3]


def test_zero_noise_gives_clean_probabilities_and_no_effect(setup):
    model, tok, layout = setup
    result = causal_trace(model, tok, layout, tiny_requests(), noise_draws_per_record=3, window=2, min_p_clean=0.0,
                          noise_std=0.0)
    assert result["n_records"] == 4 and result["n_skipped"] == 0
    for record in result["records"]:
        assert record["p_corr"] == pytest.approx(record["p_clean"], rel=1e-9, abs=1e-12)
        assert record["ie"] == pytest.approx([0.0] * 4, abs=1e-12)
    assert result["ie"] == pytest.approx([0.0] * 4, abs=1e-12)
    assert result["te"] == pytest.approx(0.0, abs=1e-12)


def test_noise_changes_only_the_subject_and_what_follows(setup):
    model, tok, layout = setup
    _, prompt = _prompt(tok)
    first, last = prompt.subject_span
    noise = noise_draws(prompt, 2, model.config.n_embd, 1.0, seed=0, index=0).double()
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        clean = model(input_ids=ids, output_hidden_states=True).hidden_states
        with corrupted(model, layout, prompt.subject_span, noise):
            noisy = model(input_ids=ids.expand(2, -1), output_hidden_states=True).hidden_states
    for layer, (c, n) in enumerate(zip(clean, noisy)):
        for row in range(2):
            assert torch.allclose(n[row, :first], c[0, :first], atol=1e-12), layer  # before the subject: clean
            changed = slice(first, last + 1) if layer == 0 else slice(first, None)  # blocks carry it forward
            assert ((n[row, changed] - c[0, changed]).abs().amax(-1) > 1e-6).all(), layer
    # the embedding layer's output (GPT-2: token + position embedding) moved by exactly the noise, at the subject only
    assert torch.allclose(noisy[0][:, first:last + 1] - clean[0][:, first:last + 1], noise, atol=1e-12)
    assert torch.allclose(noisy[0][:, last + 1:], clean[0][:, last + 1:].expand(2, -1, -1), atol=1e-12)


def test_restoration_puts_back_exactly_the_clean_mlp_output(setup):
    model, tok, layout = setup
    _, prompt = _prompt(tok)
    first, last = prompt.subject_span
    _, _, clean = clean_run(model, layout, prompt)
    noise = noise_draws(prompt, 3, model.config.n_embd, 1.0, seed=1, index=0).double()
    restore = torch.tensor([[False, False, False, False],   # corrupted only
                            [False, True, True, False],     # layers 1, 2
                            [True, False, False, True]])    # layers 0, 3
    mlps = mlp_modules(model, layout)
    from lit_edit.hooks import capture_outputs
    with torch.no_grad(), corrupted(model, layout, prompt.subject_span, noise, restore, last, clean):
        with capture_outputs(dict(enumerate(mlps))) as seen:  # registered after: sees the restored outputs
            model(input_ids=torch.tensor([prompt.ids]).expand(3, -1))
    for layer in range(4):
        out = seen[layer][0]
        for row in range(3):
            if restore[row, layer]:
                assert torch.equal(out[row, last], clean[layer][last])
            else:
                assert (out[row, last] - clean[layer][last]).abs().max() > 1e-6
            # only the subject's last token is restored: its first token keeps the corrupted output
            assert (out[row, first] - clean[layer][first]).abs().max() > 1e-6


def _reference_p(model, layout, prompt, clean, noise, restore_layers):
    """One corrupted (and restored) row with plain torch hooks, written independently of lit_edit.trace."""
    first, last = prompt.subject_span
    handles = [model.get_input_embeddings().register_forward_hook(
        lambda _m, _a, out: torch.cat([out[:, :first], out[:, first:last + 1] + noise, out[:, last + 1:]], 1))]
    for layer in restore_layers:
        def hook(_m, _a, out, layer=layer):
            out = out.clone()
            out[0, last] = clean[layer][last]
            return out
        handles.append(mlp_modules(model, layout)[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt.ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits.double(), -1)[prompt.target])


@pytest.mark.parametrize("window,batch_size", [(1, 3), (3, 256), (10, 7)])
def test_batched_runs_equal_one_row_at_a_time(setup, window, batch_size):
    model, tok, layout = setup
    _, prompt = _prompt(tok)
    _, _, clean = clean_run(model, layout, prompt)
    noise = noise_draws(prompt, 2, model.config.n_embd, 0.5, seed=3, index=5).double()
    p_corr, p_rest = corrupted_runs(model, layout, prompt, clean, noise, window, batch_size)
    assert p_rest.shape == (4, 2)
    for k in range(2):
        assert p_corr[k].item() == pytest.approx(_reference_p(model, layout, prompt, clean, noise[k], []), rel=1e-9)
        for layer in range(4):
            expected = _reference_p(model, layout, prompt, clean, noise[k], window_layers(layer, window, 4))
            assert p_rest[layer, k].item() == pytest.approx(expected, rel=1e-9)
    if window == 10:  # every centre's window covers all 4 layers: the same restoration for every layer
        assert torch.allclose(p_rest, p_rest[:1].expand(4, -1))


def test_trace_is_seeded_and_filters_unknown_records(setup):
    model, tok, layout = setup
    requests = tiny_requests()
    a = causal_trace(model, tok, layout, requests, noise_draws_per_record=2, window=1, min_p_clean=0.0, seed=4)
    b = causal_trace(model, tok, layout, requests, noise_draws_per_record=2, window=1, min_p_clean=0.0, seed=4,
                     batch_size=3)
    c = causal_trace(model, tok, layout, requests, noise_draws_per_record=2, window=1, min_p_clean=0.0, seed=5)
    assert a["ie"] == pytest.approx(b["ie"], rel=1e-9, abs=1e-15) and a["ie"] != c["ie"]
    assert a["ie_over_te"] == pytest.approx([v / a["te"] for v in a["ie"]])
    # W = 1: the last layer's MLP output at the subject (not the last prompt token) is read by no later layer
    assert a["ie"][-1] == pytest.approx(0.0, abs=1e-12) and max(abs(v) for v in a["ie"][:-1]) > 1e-9
    # the threshold keeps exactly the records at or above it; the others are listed, unused, without an ie
    p = sorted(r["p_clean"] for r in a["records"])
    d = causal_trace(model, tok, layout, requests, noise_draws_per_record=2, window=1, min_p_clean=p[2], seed=4)
    assert (d["n_records"], d["n_skipped"]) == (2, 2)
    assert [r["used"] for r in d["records"]] == [r["p_clean"] >= p[2] for r in a["records"]]
    assert all(("ie" in r) == r["used"] for r in d["records"])
    # a record's numbers do not depend on which others were skipped
    for ra, rd in zip(a["records"], d["records"]):
        if rd["used"]:
            assert rd["ie"] == pytest.approx(ra["ie"], rel=1e-9, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def _cf_record(request):
    return {"case_id": request.case_id,
            "requested_rewrite": {"prompt": request.prompt, "subject": request.subject, "relation_id": "P1",
                                  "target_new": {"str": request.target_new, "id": "Q1"},
                                  "target_true": {"str": request.target_true, "id": "Q2"}},
            "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [], "generation_prompts": []}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    tiny_gpt2(tok, n_layer=4, dtype=torch.float32).save_pretrained(path)
    (path / "cf.json").write_text(json.dumps([_cf_record(r) for r in tiny_requests()]))
    return path


def _config(tmp_path, model_dir, **sections):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"model": str(model_dir), "layers": [1, 2], "dtype": "float32"},
                                    "data": {"dataset": "counterfact", "path": str(model_dir / "cf.json"),
                                             "limit": 3}}))
    cfg = tmp_path / "trace.yaml"
    cfg.write_text(yaml.safe_dump({"base": "base.yaml", **sections}))
    return cfg


def test_command_writes_json_png_and_tensorboard(tmp_path, model_dir, capsys):
    cfg = _config(tmp_path, model_dir)
    out = tmp_path / "out"
    result = cli_main(["trace", "--config", str(cfg), "--noise_draws", "2", "--window", "1", "--min_p_clean", "0",
                       "--out", str(out), "--device", "cpu"])
    written = json.loads((out / "trace.json").read_text())
    assert written["model"] == str(model_dir)
    assert written["layers"] == [0, 1, 2, 3] and len(written["ie"]) == 4 and len(written["ie_over_te"]) == 4
    assert (written["n_records"], written["n_skipped"], written["window"], written["noise_draws"]) == (3, 0, 1, 2)
    assert [r["case_id"] for r in written["records"]] == [1, 2, 3]  # data.limit: 3
    assert written["ie"] == pytest.approx(result["ie"])
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.glob("events.out.tfevents.*"))
    text = capsys.readouterr().out
    assert "peak layer" in text and "layer        IE" in text

    # --data.offset / --limit / --data.path overrides, and --model.model
    out2 = tmp_path / "out2"
    main(["--config", str(cfg), "--data.offset", "1", "--limit", "2", "--noise_draws", "1", "--min_p_clean", "0",
          "--out", str(out2), "--model.model", str(model_dir), "--data.path", str(model_dir / "cf.json"),
          "--device", "cpu"])
    assert [r["case_id"] for r in json.loads((out2 / "trace.json").read_text())["records"]] == [2, 3]


@pytest.mark.parametrize("argv,sections,message", [
    (["--bogus", "1"], {}, "unrecognized arguments: --bogus"),
    (["--noise", "3"], {}, "unrecognized arguments: --noise"),  # no abbreviations
    (["--window", "0"], {}, "--window must be an integer >= 1"),
    (["--data.offset", "-1"], {}, "data.offset must be an integer >= 0"),
    ([], {"data": {"dataset": "unke"}}, "data.dataset must be one of"),
    ([], {"model": {"layout": {"rewrite_module": "transformer.h.{}.mlp.nope"}}}, "model.layout: layout key 'rewrite_module'"),
    ([], {"model": {"layout": {"typo": "x"}}}, "model.layout: unknown layout key(s) ['typo']"),
    ([], {"model": {"model": "/nonexistent/model"}}, "/nonexistent/model does not exist (model.model)"),
    (["--min_p_clean", "1"], {}, "for none of the 3 records"),
])
def test_bad_input_names_the_setting(tmp_path, model_dir, capsys, argv, sections, message):
    cfg = _config(tmp_path, model_dir, **sections)
    with pytest.raises(SystemExit) as err:
        main(["--config", str(cfg), "--noise_draws", "1", "--out", str(tmp_path / "out"), *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "trace.json").exists()


def test_missing_config_base_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: nowhere.yaml\n")
    with pytest.raises(SystemExit):
        main(["--config", str(cfg)])
    assert "nowhere.yaml" in capsys.readouterr().err
