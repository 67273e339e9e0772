"""The layout registry points at the right modules, in the right orientation, for every family.

Each model is a tiny random one built from a config (no downloads); behaviour, not names, is checked:
the weight delta must show up in the module output as ``k @ delta.T``, and the final norm + LM head
applied to the last block's output must reproduce the model's logits.
"""

import pytest
import torch
import transformers as T

from lit_edit.editing import add_to_weight, set_weight
from lit_edit.layouts import (
    LAYOUTS,
    ModelLayout,
    block_hidden,
    block_module,
    edited_module,
    get_layout,
    get_weight,
    logit_head,
    replace_block_hidden,
    weight_shape,
)

D, FFN, V = 32, 64, 100
LLAMA_LIKE = dict(num_hidden_layers=3, hidden_size=D, num_attention_heads=4, num_key_value_heads=2, intermediate_size=FFN, vocab_size=V)
CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=D, n_inner=FFN, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gptj": lambda: T.GPTJConfig(n_layer=3, n_embd=D, n_inner=FFN, n_head=4, rotary_dim=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=D, num_attention_heads=4, intermediate_size=FFN, vocab_size=V, max_position_embeddings=64),
    "llama": lambda: T.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: T.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: T.Qwen2Config(**LLAMA_LIKE),
    # Gemma 3: scaled embeddings, post-feed-forward norms, tied head, local (sliding-window) layers. The window (64) is
    # longer than the test rows, as Gemma-3-270M's (512) is longer than CounterFact's: with a window of 4, v* with
    # early stop differed from the plain forward (lit_edit/truncated.py, RowForward, which warns of such rows).
    "gemma3_text": lambda: T.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=64,
                                              max_position_embeddings=128),
}
OPT_LAYOUT = dict(
    rewrite_module="model.decoder.layers.{}.fc2",
    layer_module="model.decoder.layers.{}",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
)


def make_model(config):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def make_opt():
    return make_model(T.OPTConfig(num_hidden_layers=3, hidden_size=D, num_attention_heads=4, ffn_dim=FFN, vocab_size=V, word_embed_proj_dim=D, max_position_embeddings=64))


def tokens():
    return torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))


def capture(model, module, ids):
    """Run the model; return the (input, output) that ``module`` saw."""
    seen = {}
    pre = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("k", args[0].detach().clone()))
    post = module.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
    with torch.no_grad():
        model(ids)
    pre.remove()
    post.remove()
    return seen["k"], seen["out"]


def check_orientation(model, layout, layer):
    """After ``W += delta`` the edited module's output moves by exactly ``k @ delta.T``."""
    module, ids = edited_module(model, layout, layer), tokens()
    k, before = capture(model, module, ids)
    delta = 0.01 * torch.randn(weight_shape(model, layout, layer), dtype=torch.float64)  # cast is the callee's job
    add_to_weight(model, layout, layer, delta)
    k_after, after = capture(model, module, ids)
    torch.testing.assert_close(k_after, k)  # the edit happens after its own input
    torch.testing.assert_close(after - before, k @ delta.T.float(), atol=1e-5, rtol=1e-4)


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return make_model(CONFIGS[request.param]())


def test_registry_covers_the_families():
    assert set(CONFIGS) <= set(LAYOUTS)


def test_layout_and_shape(model):
    layout = get_layout(model)
    assert layout is LAYOUTS[model.config.model_type]
    assert layout.n_layers(model) == 3
    for layer in (0, 2):
        assert weight_shape(model, layout, layer) == (D, FFN)


@pytest.mark.parametrize("layer", [0, 2])
def test_orientation(model, layer):
    check_orientation(model, get_layout(model), layer)


def test_get_weight_is_a_view(model):
    layout = get_layout(model)
    W, param = get_weight(model, layout, 1), edited_module(model, layout, 1).weight
    assert W.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    new = torch.randn(D, FFN)
    set_weight(model, layout, 1, new)
    torch.testing.assert_close(W, new)  # the earlier view sees the write
    stored = param.T if layout.weight_layout == "in_out" else param
    torch.testing.assert_close(stored.detach(), new)
    with pytest.raises(ValueError, match="d_out, d_in"):
        add_to_weight(model, layout, 1, torch.zeros(FFN, D))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_square_matrix_orientation(name):
    """d_model == d_ffn: shapes cannot tell the orientation, the layout must."""
    config = CONFIGS[name]()
    config.n_inner = D if name == "gpt2" else None
    if name == "llama":
        config.intermediate_size = D
    model = make_model(config)
    layout = get_layout(model)
    assert weight_shape(model, layout, 0) == (D, D)
    check_orientation(model, layout, 0)


def test_block_hidden_and_hook_edits_are_honoured(model):
    layout, ids, pos = get_layout(model), tokens(), 3
    block = block_module(model, layout, 1)
    shapes = []
    h = block.register_forward_hook(lambda m, a, out: shapes.append(block_hidden(out).shape))
    with torch.no_grad():
        clean = model(ids).logits
    h.remove()
    assert shapes == [torch.Size([2, 6, D])]

    def steer(module, args, out):
        hidden = block_hidden(out).clone()
        hidden[:, pos] += 5.0
        return replace_block_hidden(out, hidden)

    h = block.register_forward_hook(steer)
    with torch.no_grad():
        steered = model(ids).logits
    h.remove()
    torch.testing.assert_close(steered[:, :pos], clean[:, :pos])  # causal: earlier positions untouched
    assert not torch.allclose(steered[:, pos], clean[:, pos])


def softcapped_gemma3():
    """Gemma 3 with a logit softcap (Gemma 2's; a field of Gemma 3's config, unset in the 270M model), set low so that
    it bends these tiny random logits: at Gemma 2's 30, tanh would be the identity here and a missing cap go unseen."""
    config = CONFIGS["gemma3_text"]()
    config.final_logit_softcapping = 0.05
    return make_model(config)


def test_final_norm_and_logit_head_give_the_model_logits(model):
    """What the truncated forwards read: the final norm on the last block's output, then :func:`logit_head` (the LM
    head and, where the config sets one, its logit softcap), equal the model's own logits."""
    check_logit_head(model)


def test_logit_head_applies_the_softcap():
    check_logit_head(softcapped_gemma3())


def check_logit_head(model):
    layout, ids = get_layout(model), tokens()
    last = block_module(model, layout, layout.n_layers(model) - 1)
    seen = {}
    h = last.register_forward_hook(lambda m, a, out: seen.__setitem__("h", block_hidden(out)))
    with torch.no_grad():
        logits = model(ids).logits
        h.remove()
        ours = logit_head(model, layout)(model.get_submodule(layout.final_norm)(seen["h"]))
    torch.testing.assert_close(ours, logits, atol=1e-6, rtol=1e-5)
    if getattr(model.config, "final_logit_softcapping", None):
        assert not torch.allclose(model.get_submodule(layout.lm_head)(model.get_submodule(layout.final_norm)(seen["h"])),
                                  logits, atol=1e-4)  # the cap matters for this model: without it the test would fail


@pytest.mark.parametrize("name", ["gemma3_text"])
def test_gemma_embeddings_scaled_and_head_tied(name):
    """Gemma's embedding module scales by sqrt(d) (states read at its output, e.g. causal tracing's noise, are in the
    scaled space); its LM head is the embedding matrix, which no edit touches; and a change of down_proj's output is
    not a change of the block's output (the post-feed-forward norm), which the truncated look-ahead must know."""
    from lit_edit.truncated import output_reaches_block_output

    model = make_model(CONFIGS[name]())
    layout, ids = get_layout(model), tokens()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), emb.weight[ids] * D ** 0.5)
    head = model.get_submodule(layout.lm_head)
    assert head.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr()
    before = emb.weight.detach().clone()
    add_to_weight(model, layout, 1, 0.01 * torch.randn(weight_shape(model, layout, 1), dtype=torch.float64))
    torch.testing.assert_close(emb.weight.detach(), before, rtol=0, atol=0)
    assert not output_reaches_block_output(model, layout, 1, ids[0].tolist())


def test_replace_block_hidden_keeps_structure():
    h, new, extra = torch.zeros(1, 2, 3), torch.ones(1, 2, 3), object()
    assert replace_block_hidden(h, new) is new
    out = replace_block_hidden((h, extra), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is extra
    assert block_hidden((h, extra)) is h and block_hidden(h) is h
    with pytest.raises(TypeError):
        block_hidden({"hidden": h})


def test_unknown_model_type_has_a_clear_error():
    with pytest.raises(ValueError) as err:
        get_layout(make_opt())
    msg = str(err.value)
    assert "'opt'" in msg and "model.layout" in msg and "rewrite_module" in msg
    assert all(t in msg for t in CONFIGS)


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_override_path_for_unregistered_model(as_dataclass):
    model = make_opt()
    layout = get_layout(model, ModelLayout(**OPT_LAYOUT) if as_dataclass else OPT_LAYOUT)
    assert weight_shape(model, layout, 2) == (D, FFN)
    check_orientation(model, layout, 2)
    with pytest.raises(ValueError, match="missing"):
        get_layout(model, {"rewrite_module": OPT_LAYOUT["rewrite_module"]})


def test_partial_override_of_registered_layout():
    model = make_model(CONFIGS["llama"]())
    layout = get_layout(model, {"rewrite_module": "model.layers.{}.mlp.up_proj"})
    assert layout.layer_module == "model.layers.{}" and weight_shape(model, layout, 0) == (FFN, D)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"rewrite_module": "model.layers.{}.mlp.down_projection"}, "rewrite_module"),
        ({"layer_module": "model.blocks.{}"}, "layer_module"),
        ({"final_norm": "model.final_norm"}, "final_norm"),
        ({"lm_head": "head"}, "lm_head"),
        ({"weight_layout": "in_out"}, "weight_layout"),  # nn.Linear stores out_in
        ({"weight_layout": "rows"}, "weight_layout"),
        ({"rewrite_module": "model.layers.0.mlp.down_proj"}, "rewrite_module"),  # no {} placeholder
        ({"lm_heads": "lm_head"}, "lm_heads"),
    ],
)
def test_bad_override_names_the_key(override, key):
    model = make_model(CONFIGS["llama"]())
    with pytest.raises(ValueError, match=key):
        get_layout(model, override)


def test_layer_out_of_range():
    model = make_model(CONFIGS["llama"]())
    with pytest.raises(IndexError):
        edited_module(model, get_layout(model), 3)


def test_a_write_through_the_post_norm_moves_the_block_output_by_the_residual_share():
    """Gemma 3's MLP output passes an RMSNorm before the residual sum. :func:`through_post_norm` turns a wanted change
    r of the block's output into the change d of down_proj's output that realises it, to first order: after W += d kᵀ /
    ‖k‖² (so that W k = m + d) the block's output at that token moves by r up to O(‖r‖²), less r's part along the one
    direction the norm cannot move (v = m / g); writing r itself, as for the other families, does not (here it is off
    by hundreds of times r's size)."""
    from lit_edit.editing import through_post_norm
    from lit_edit.layouts import post_norm_module

    model = make_model(CONFIGS["gemma3_text"]()).double()
    with torch.no_grad():  # a gain unlike 1 at every coordinate, as a trained Gemma's (the tiny model's is all zeros)
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 2.0)
    layout, ids, layer, pos = get_layout(model), tokens(), 1, 3
    module, block = edited_module(model, layout, layer), block_module(model, layout, layer)

    def run():
        seen = {}
        hk = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0][0, pos].detach().clone()))
        hb = block.register_forward_hook(lambda m, a, out: seen.__setitem__("h", block_hidden(out)[0, pos].clone()))
        with torch.no_grad():
            model(ids[:1])
        hk.remove()
        hb.remove()
        return seen["k"], seen["h"]

    k, h = run()
    r = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = 1e-4 * r * h.norm() / r.norm()
    W0 = get_weight(model, layout, layer).clone()
    norm = post_norm_module(model, layout, layer)
    g = norm(torch.ones(1, D, dtype=torch.float64))[0] * (1 + norm.eps) ** 0.5
    v = (W0 @ k) / g
    v = v / v.norm()
    reach = r - v * (v @ r)
    assert (r - reach).norm() < r.norm()  # one direction out of D
    errors = {}
    for how in ("mapped", "plain"):
        d = through_post_norm(post_norm_module(model, layout, layer), W0, k[:, None], r[:, None])[:, 0] \
            if how == "mapped" else r
        set_weight(model, layout, layer, W0 + torch.outer(d, k) / (k @ k))
        errors[how] = ((run()[1] - h) - reach).norm().item() / r.norm().item()
    set_weight(model, layout, layer, W0)
    assert errors["mapped"] < 1e-3 and errors["plain"] > 1.0, errors
    assert post_norm_module(model, layout, layer) is model.model.layers[layer].post_feedforward_layernorm
    assert post_norm_module(make_model(CONFIGS["llama"]()), LAYOUTS["llama"], layer) is None
