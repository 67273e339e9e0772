"""v* optimisation: batched over requests equals optimising each request alone (docs/algorithms.md §2)."""
import pytest
import torch

from lit_edit.layouts import get_layout
from lit_edit.targets import TargetConfig, build_target_batch, compute_targets, compute_targets_reference
from lit_edit.tokens import encode_prompt
from tests.helpers import tiny_gpt2, tiny_requests, tiny_tokenizer

CTX = ["{}", "The city is calm. {}", "Because the weather was good. {}"]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)
    return tok, model, get_layout(model)


@pytest.mark.parametrize("early_stop", [0.05, "mixed"])
def test_batched_targets_equal_per_request_targets(setup, early_stop):
    tok, model, layout = setup
    reqs = tiny_requests()
    cfg = TargetConfig(v_num_grad_steps=8, v_lr=0.5, clamp_norm_factor=0.75)
    if early_stop == "mixed":
        # a threshold between the requests' losses: some stop early, others run on (per-request early stop)
        first = compute_targets(model, tok, layout, 2, reqs, CTX, TargetConfig(v_num_grad_steps=1))
        cfg.early_stop_loss = float(first.loss.median())
    got = compute_targets(model, tok, layout, 2, reqs, CTX, cfg)
    want = compute_targets_reference(model, tok, layout, 2, reqs, CTX, cfg)
    if early_stop == "mixed":
        assert len(set(got.steps.tolist())) > 1, "the threshold should stop some requests before others"
    torch.testing.assert_close(got.v_star, want, rtol=1e-9, atol=1e-10)
    # chunking the batch changes nothing either
    cfg.chunk_size = 1
    torch.testing.assert_close(compute_targets(model, tok, layout, 2, reqs, CTX, cfg).v_star, got.v_star,
                               rtol=1e-9, atol=1e-10)


def test_targets_lower_the_loss_and_respect_the_clamp(setup):
    tok, model, layout = setup
    cfg = TargetConfig(v_num_grad_steps=15, v_lr=0.05, clamp_norm_factor=0.5, kl_factor=0.0, v_weight_decay=0.0)
    res = compute_targets(model, tok, layout, 2, tiny_requests(), CTX, cfg)
    assert res.history[-1] < res.history[0]
    ratio = res.delta.norm(dim=-1) / res.h_init.norm(dim=-1)
    assert (ratio <= 0.5 + 1e-9).all()
    torch.testing.assert_close(res.v_star, res.h_init + res.delta)


def test_h_init_is_block_output_at_subject_last_token(setup):
    tok, model, layout = setup
    r = tiny_requests()[0]
    res = compute_targets(model, tok, layout, 2, [r], CTX, TargetConfig(v_num_grad_steps=1))
    enc = encode_prompt(tok, r.prompt, r.subject)
    out = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states[3]  # after block 2
    torch.testing.assert_close(res.h_init[0], out[0, enc.index])


def test_target_batch_labels_line_up_with_target_tokens(setup):
    tok, _, _ = setup
    r = tiny_requests()[1]  # multi-token target
    b = build_target_batch(tok, [r], CTX, TargetConfig())
    tgt = tok(" pilot of ships", add_special_tokens=False)["input_ids"]
    for row in range(len(CTX)):
        pos = (b.labels[row] >= 0).nonzero()[:, 0]
        assert b.labels[row, pos].tolist() == tgt
        # the input at the scored positions + 1 is the target itself (teacher forcing), except the last
        assert b.ids[row, pos[1:]].tolist() == tgt[:-1]
    assert (b.labels[len(CTX)] == -100).all()  # the KL prompt has no labels
