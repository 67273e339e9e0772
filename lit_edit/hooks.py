"""Forward hooks: read a module's input, rewrite a block's output, or end a forward early, for the duration of a
``with``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from lit_edit.layouts import block_hidden, replace_block_hidden


@contextmanager
def _hooked(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(modules: dict):
    """Record the first positional input of each module on every forward: ``{key: [tensor, ...]}``."""
    store: dict = {k: [] for k in modules}
    with _hooked([m.register_forward_pre_hook(lambda _m, args, k=k: store[k].append(args[0]))
                  for k, m in modules.items()]):
        yield store


@contextmanager
def capture_outputs(modules: dict):
    """Record the hidden-state output of each block (tuple or bare tensor, see layouts.block_hidden)."""
    store: dict = {k: [] for k in modules}
    with _hooked([m.register_forward_hook(lambda _m, _a, out, k=k: store[k].append(block_hidden(out)))
                  for k, m in modules.items()]):
        yield store


@contextmanager
def rewrite_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the module's hidden output ``h`` by ``fn(h)`` (e.g. add δ at the fact token)."""
    with _hooked([module.register_forward_hook(lambda _m, _a, out: replace_block_hidden(out, fn(block_hidden(out))))]):
        yield


@contextmanager
def add_to_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Output ``y`` of a linear module becomes ``y + fn(x)`` for its input ``x`` (a virtual weight update
    Δ with fn(x) = x Δᵀ, without touching or copying the weight)."""
    with _hooked([module.register_forward_hook(lambda _m, args, out: out + fn(args[0]).to(out.dtype))]):
        yield


class _StopForward(Exception):
    """Raised by :func:`stop_after`'s hook; never leaves the ``with``."""


@contextmanager
def stop_after(module: nn.Module | None):
    """A forward inside the ``with`` ends right after ``module`` runs (None: runs whole): for forwards that only read
    tensors up to there (keys, block states, C0), so the blocks above and the LM head, whose logits over every
    position and the whole vocabulary are the largest tensor of a forward, are not computed. Hooks registered
    before reaching ``module`` have already fired; the model call then returns nothing."""
    if module is None:
        yield
        return

    def stop(_m, _args, _out):
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()
