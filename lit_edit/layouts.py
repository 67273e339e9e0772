"""Where the editable pieces live in each Hugging Face causal-LM family.

Closed-form editors (MEMIT, AlphaEdit, ...) only need to know five things about a model: which
matrix per layer they rewrite (the FFN output projection), which block emits the residual stream,
the final norm and the LM head (to read the residual stream as logits), and how the rewritten
weight is stored. Everything else in the package works on ``ModelLayout`` and the helpers below,
so adding an architecture means adding one registry entry (or a ``model.layout`` block in YAML).

All weights are handed out in *math* layout ``[d_out, d_in]`` (``y = W k``), whatever the
storage: GPT-2's ``Conv1D`` stores ``[d_in, d_out]`` and we hand out a transposed view. The
orientation always comes from the layout, never from the shapes (square matrices are ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import transformers
from torch import Tensor, nn

WeightLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ModelLayout:
    """Module paths (``{}`` stands for the layer index) and the storage order of the edited weight."""

    rewrite_module: str
    layer_module: str
    final_norm: str
    lm_head: str
    weight_layout: WeightLayout = "out_in"  # "out_in": nn.Linear [d_out, d_in]; "in_out": Conv1D [d_in, d_out]
    # an RMSNorm between the edited matrix's output and the residual sum (Gemma 3's post_feedforward_layernorm), with
    # "{}" for the layer: the write maps each layer's residual share through it (lit_edit.editing.through_post_norm)
    post_norm: str | None = None

    def __post_init__(self) -> None:
        if self.weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"layout key 'weight_layout' must be 'out_in' or 'in_out', got {self.weight_layout!r}")
        for key in ("rewrite_module", "layer_module") + (("post_norm",) if self.post_norm is not None else ()):
            if "{}" not in getattr(self, key):
                raise ValueError(f"layout key {key!r} must contain '{{}}' for the layer index, got {getattr(self, key)!r}")

    def n_layers(self, model: nn.Module) -> int:
        """Number of blocks, read from the config (the fields' names differ between families)."""
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            n = getattr(model.config, key, None)
            if isinstance(n, int):
                return n
        raise ValueError(f"cannot find the number of layers in {type(model.config).__name__}")


LAYOUTS: dict[str, ModelLayout] = {}


def register_layout(model_type: str, layout: ModelLayout) -> None:
    """Add (or replace) the layout used for models whose ``config.model_type`` is ``model_type``."""
    LAYOUTS[model_type] = layout


register_layout("gpt2", ModelLayout("transformer.h.{}.mlp.c_proj", "transformer.h.{}", "transformer.ln_f", "lm_head", "in_out"))
register_layout("gptj", ModelLayout("transformer.h.{}.mlp.fc_out", "transformer.h.{}", "transformer.ln_f", "lm_head"))
# transformers 5 renamed GPT-NeoX's head `embed_out` -> `lm_head` (old checkpoints are remapped on load).
_NEOX_HEAD = "lm_head" if int(transformers.__version__.split(".")[0]) >= 5 else "embed_out"
register_layout(
    "gpt_neox", ModelLayout("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}", "gpt_neox.final_layer_norm", _NEOX_HEAD)
)
for _model_type in ("llama", "mistral", "qwen2"):
    register_layout(_model_type, ModelLayout("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.norm", "lm_head"))
# Gemma 3 (text): the same module paths. What differs, and is handled where it matters: the embeddings are scaled
# by sqrt(d) inside the embedding module (so noise or states read at its output are in the scaled space); the MLP
# output passes a post-feed-forward RMSNorm (Gemma 3) before the residual sum, so a change of down_proj's output is
# not a change of the block's output (truncated.output_reaches_block_output probes this and MetaKE's look-ahead then
# re-runs block L), and the write maps each residual share through that norm (``post_norm``); a logit softcap,
# where the config sets one, is applied by :func:`logit_head`; the LM head is tied to the embeddings, and only
# down_proj is ever written.
for _model_type in ("gemma3_text",):
    register_layout(_model_type, ModelLayout("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.norm", "lm_head",
                                             post_norm="model.layers.{}.post_feedforward_layernorm"))

_KEYS = tuple(f.name for f in fields(ModelLayout))


def get_layout(model: nn.Module, override: dict[str, Any] | ModelLayout | None = None) -> ModelLayout:
    """The layout for ``model``: ``override`` wins, else the registry entry for its ``model_type``.

    A dict override may be partial when the model type is registered (e.g. only ``rewrite_module``
    to edit another matrix); for an unregistered type it must name all four module paths.
    The result is checked against the model so a typo fails here, not mid-edit.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = LAYOUTS.get(model_type)
    if isinstance(override, ModelLayout):
        layout = override
    elif override:
        unknown = sorted(set(override) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown layout key(s) {unknown}; valid keys are {list(_KEYS)}")
        if known is not None:
            layout = replace(known, **override)
        else:
            missing = [k for k in _KEYS[:4] if k not in override]
            if missing:
                raise ValueError(f"layout override for model_type {model_type!r} is missing key(s) {missing}")
            layout = ModelLayout(**override)
    elif known is not None:
        layout = known
    else:
        raise ValueError(
            f"no layout registered for model_type {model_type!r}; supported model types: {sorted(LAYOUTS)}. "
            f"Describe the model under `model.layout` in the YAML config with keys {list(_KEYS)} "
            f"(module paths use '{{}}' for the layer index, weight_layout is 'out_in' for nn.Linear or "
            f"'in_out' for Conv1D), or call lit_edit.layouts.register_layout()."
        )
    _validate(model, layout)
    return layout


class LogitHead(nn.Module):
    """The LM head as the model's own forward applies it to the final (normed) hidden states: ``lm_head`` and, where
    the config sets ``final_logit_softcapping`` (Gemma 2; a field of Gemma 3's config), ``cap · tanh(logits / cap)``. The truncated forwards read
    logits through this, so that they equal the full forward's for every family (tests/test_truncated.py)."""

    def __init__(self, head: nn.Module, softcap: float | None):
        super().__init__()
        self.head, self.softcap = head, softcap

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_head(model: nn.Module, layout: ModelLayout | None = None) -> LogitHead:
    """:class:`LogitHead` of ``model``: the layout's ``lm_head``, or the model's output embeddings without a layout."""
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    head = model.get_output_embeddings() if layout is None else _module(model, "lm_head", layout.lm_head)
    return LogitHead(head, softcap)


def _module(model: nn.Module, key: str, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the layout key."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"layout key {key!r}: module {path!r} not found in {type(model).__name__}") from None


def _validate(model: nn.Module, layout: ModelLayout) -> None:
    """Resolve every path for the first and last layer; check the edited module's storage type."""
    _module(model, "final_norm", layout.final_norm)
    _module(model, "lm_head", layout.lm_head)
    for layer in {0, layout.n_layers(model) - 1}:
        _module(model, "layer_module", layout.layer_module.format(layer))
        if layout.post_norm is not None:
            _module(model, "post_norm", layout.post_norm.format(layer))
        module = _module(model, "rewrite_module", layout.rewrite_module.format(layer))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ValueError(f"layout key 'rewrite_module': {layout.rewrite_module.format(layer)!r} has no 2-D weight")
        # Storage order is a property of the module type, not of the shapes: catch the obvious mismatch.
        if isinstance(module, nn.Linear) and layout.weight_layout != "out_in":
            raise ValueError("layout key 'weight_layout': the edited module is nn.Linear, which stores 'out_in'")
        if type(module).__name__ == "Conv1D" and layout.weight_layout != "in_out":
            raise ValueError("layout key 'weight_layout': the edited module is Conv1D, which stores 'in_out'")


def _check_layer(model: nn.Module, layout: ModelLayout, layer: int) -> None:
    n = layout.n_layers(model)
    if not 0 <= layer < n:
        raise IndexError(f"layer {layer} out of range for a model with {n} layers")


def edited_module(model: nn.Module, layout: ModelLayout, layer: int) -> nn.Module:
    """The module whose weight is rewritten at ``layer`` (its input is the key ``k``)."""
    _check_layer(model, layout, layer)
    return _module(model, "rewrite_module", layout.rewrite_module.format(layer))


def edited_weights(model: nn.Module, layout: ModelLayout, layers) -> dict[str, nn.Parameter]:
    """The rewritten weight of each of ``layers`` by its parameter name in ``model``, in layer order (as stored, e.g.
    [out, in] for nn.Linear): what a checkpoint keeps and an export writes."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = [edited_module(model, layout, layer).weight for layer in layers]
    return {names[id(w)]: w for w in weights}


def post_norm_module(model: nn.Module, layout: ModelLayout, layer: int) -> nn.Module | None:
    """The norm between the edited matrix's output and the residual sum at ``layer``, or None (most families)."""
    if layout.post_norm is None:
        return None
    _check_layer(model, layout, layer)
    return _module(model, "post_norm", layout.post_norm.format(layer))


def block_module(model: nn.Module, layout: ModelLayout, layer: int) -> nn.Module:
    """The decoder block at ``layer``; its output is the residual stream after that layer."""
    _check_layer(model, layout, layer)
    return _module(model, "layer_module", layout.layer_module.format(layer))


def get_weight(model: nn.Module, layout: ModelLayout, layer: int) -> Tensor:
    """The edited weight as ``[d_out, d_in]``: a detached view sharing storage with the parameter.

    Detached so closed-form math never builds an autograd graph; the writes are ``lit_edit.editing.add_to_weight`` /
    ``set_weight`` (or in place under ``torch.no_grad``).
    """
    weight = edited_module(model, layout, layer).weight.detach()
    return weight.T if layout.weight_layout == "in_out" else weight


def weight_shape(model: nn.Module, layout: ModelLayout, layer: int) -> tuple[int, int]:
    """``(d_out, d_in)`` of the edited weight."""
    d_out, d_in = get_weight(model, layout, layer).shape
    return d_out, d_in


def block_hidden(output: Tensor | tuple) -> Tensor:
    """The ``[batch, seq, d_model]`` hidden state from a block's output.

    Blocks return either a bare tensor (most families in transformers 5) or a tuple whose first
    element is the hidden state (older versions, or when attention weights are returned).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


def replace_block_hidden(output: Tensor | tuple, new_hidden: Tensor) -> Tensor | tuple:
    """``output`` with its hidden state swapped for ``new_hidden``, same structure (for forward hooks)."""
    if isinstance(output, Tensor):
        return new_hidden
    block_hidden(output)  # raises on an unexpected structure
    return type(output)([new_hidden, *output[1:]])
