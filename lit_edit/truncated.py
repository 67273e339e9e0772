"""Forward passes of the inner loops that compute only what the loop changes (docs/algorithms.md §2.10).

v* (§2), MetaKE's look-ahead (§7) and the window targets (§8) evaluate one fixed batch of rows tens of times while
the model changes only from some block ``start`` on: v* and the windows add δ to block L's output (start = L + 1);
the look-ahead changes block L's edited matrix, whose change it adds to block L's output when the matrix feeds the
residual sum directly (start = L + 1, :func:`output_reaches_block_output`), else by a hook inside block L (start =
L); the true multi-layer hypergradient changes every edited layer (start = the lowest). Every block below ``start``
gives the same output at every iteration, so :class:`RowForward` keeps block start − 1's output of each row from
the first forward that computes it (detached) and later forwards skip blocks 0 … start − 1. The model's own forward
still runs around them, so the attention masks, position ids and rotary embeddings the remaining blocks get are the
architecture's own, for every family and any padding side; the skipped blocks return the kept states instead of
computing them, and the forward hooks on them still fire (v*'s δ is added by a hook on block L, which is skipped at
start = L + 1).

Two more savings: the LM head is applied only at the positions a loss reads (:class:`Readout`), not to every
position of every row, and the rows of a forward are run in groups of similar length (:func:`length_groups`), so
short rows (the KL prompts, the bare prompts) are not padded to the longest context-prefixed one.

The third is causal: when the loop changes a row only from a column ``from_col`` on (v* adds δ at the fact token,
the window targets at the window's memory position), the states of the columns before it are the same at every
iteration in *every* block. The first forward of a row then also keeps the keys and values of blocks start … N − 1
(the model's own cache, filled as for generation), and later forwards run only the columns ``from_col`` … end of
each row, attending to those kept keys and values: the model's incremental-decoding path (``cache=`` with explicit
position ids and a 2-D mask over [kept prefix | new columns]), so positions, rotary embeddings and masks are the
architecture's own. On CounterFact's v* rows (context-prefixed prompts; the subject comes late) about a quarter of
the tokens lie at or after the fact token, and the blocks' work shrinks by as much (docs/algorithms.md §2.10).

``with reference_forward():`` makes every :class:`RowForward` created inside run the plain model instead (all
blocks, the logits of every position, one right-padded batch): the reference the exactness tests compare with, and
what the per-request baseline of ``benchmarks/edit_throughput.py`` runs.
"""
from __future__ import annotations

import contextvars
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from lit_edit.hooks import add_to_output, capture_outputs, rewrite_output, stop_after
from lit_edit.layouts import (block_hidden, block_module, edited_module, logit_head, replace_block_hidden,
                              weight_shape)

_REFERENCE = contextvars.ContextVar("lit_edit_reference_forward", default=False)
_WHOLE_ROWS = contextvars.ContextVar("lit_edit_whole_rows", default=False)

# An extra forward pass (one more length group) must save padding worth this fraction of the rows' real tokens: its
# fixed cost (kernel launches, masks, the Python around a forward) is small against the blocks' work on a step's
# hundreds of rows, but not nil. On the default world's v* rows it gives three groups and 6 % padding (25 % as one
# batch); the timings on this shared 2-core machine were too noisy to tune it further.
SPLIT_COST = 0.05


@contextmanager
def reference_forward():
    """Inside, every :class:`RowForward` created runs the plain model: no skipped blocks, full logits, no grouping."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


@contextmanager
def whole_rows():
    """Inside, every :class:`RowForward` created ignores ``from_col`` (every column of a row at every iteration): the
    truncated forward without its causal saving, for benchmarks/real_model.py's comparison."""
    token = _WHOLE_ROWS.set(True)
    try:
        yield
    finally:
        _WHOLE_ROWS.reset(token)


def truncating() -> bool:
    """False inside :func:`reference_forward`."""
    return not _REFERENCE.get()


@torch.no_grad()
def output_reaches_block_output(model, layout, layer: int, ids: list[int]) -> bool:
    """Whether a change ``e`` of the edited matrix's output at ``layer`` moves block ``layer``'s output by exactly
    ``e`` at every position — true when the matrix is the last one before the residual sum (the MLP output
    projection of every registered family), false for a layout that edits another matrix. Then a change of that
    matrix can be applied to the block's output instead, and the block need not run again. Probed on one
    prompt with a random ``e`` as large as the block's output, to the rounding of the model's dtype."""
    block, module = block_module(model, layout, layer), edited_module(model, layout, layer)
    param = next(model.parameters())
    x = torch.tensor([ids], device=param.device)
    with capture_outputs({0: block}) as store, stop_after(block):
        model(input_ids=x, attention_mask=torch.ones_like(x))
    h = store[0][0].double()
    if weight_shape(model, layout, layer)[0] != h.shape[-1]:
        return False
    e = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(h.device)
    e = e * h.norm(dim=-1).mean() / e.norm()
    with capture_outputs({0: block}) as store, stop_after(block), add_to_output(module, lambda k: e.to(k.dtype)):
        model(input_ids=x, attention_mask=torch.ones_like(x))
    moved = store[0][0].double() - h
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(param.dtype, 5e-2)
    return bool((moved - e).norm(dim=-1).max() <= tol * e.norm())


def length_groups(lengths: torch.Tensor, split_cost: float = SPLIT_COST) -> list[torch.Tensor]:
    """Partition rows (their real lengths) into groups of similar length, each run as one right-padded forward:
    contiguous runs of the sorted lengths minimising Σ_groups rows × longest row + ``split_cost`` · (real tokens) per
    group (exact dynamic programme over the distinct lengths). Returns the row indices of each group."""
    lengths = lengths.cpu()
    order = torch.argsort(lengths, stable=True)
    vals, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    v, c = vals.numpy().astype(np.float64), np.concatenate([[0], np.cumsum(counts.numpy())]).astype(np.float64)
    penalty = split_cost * float(lengths.sum())
    m = len(v)
    best, cut = np.zeros(m + 1), np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):  # best[j]: the first j distinct lengths; the last group covers distinct values i … j−1
        cost = best[:j] + (c[j] - c[:j]) * v[j - 1] + penalty
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    bounds, j = [], m
    while j > 0:
        bounds.append((int(c[cut[j]]), int(c[j])))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def padded_fraction(lengths: torch.Tensor, groups: list[torch.Tensor] | None = None) -> float:
    """Share of the computed positions that are padding when rows of these lengths run as ``groups`` (one padded
    batch when None)."""
    groups = [torch.arange(len(lengths))] if groups is None else groups
    computed = sum(len(g) * int(lengths[g].max()) for g in groups)
    return 1.0 - float(lengths.sum()) / computed


class Readout:
    """The logits of one forward at the positions a loss reads: ``at(r, c)`` is ``[k, V]`` for the positions
    ``(r[i], c[i])`` (row within the forwarded rows, token). Holds either the full logits, or the final hidden states
    of each length group and the LM head, applied only to the positions asked for."""

    def __init__(self, parts: list[torch.Tensor], groups: list[torch.Tensor], head: nn.Module | None,
                 offsets: list[torch.Tensor | None] | None = None):
        self.parts, self.head = parts, head
        dev = parts[0].device
        n = sum(len(g) for g in groups)
        self.group = torch.empty(n, dtype=torch.long, device=dev)
        self.local = torch.empty(n, dtype=torch.long, device=dev)
        self.offset = torch.zeros(n, dtype=torch.long, device=dev)  # a part run from a later column holds column c at c − offset
        for k, g in enumerate(groups):
            g = g.to(dev)
            self.group[g] = k
            self.local[g] = torch.arange(len(g), device=dev)
            if offsets is not None and offsets[k] is not None:
                self.offset[g] = offsets[k].to(dev)

    def at(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dev = self.parts[0].device
        r, c = r.to(dev), c.to(dev)
        c = c - self.offset[r]
        if bool((c < 0).any()):
            raise ValueError("a loss read a column before the row's from_col: those columns are not recomputed "
                             "(RowForward's from_col must be at or before every column read)")
        if len(self.parts) == 1:
            x = self.parts[0][self.local[r], c]
        else:
            pieces, order = [], []
            for k, part in enumerate(self.parts):
                sel = (self.group[r] == k).nonzero()[:, 0]
                pieces.append(part[self.local[r[sel]], c[sel]])
                order.append(sel)
            order = torch.cat(order)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=dev)
            x = torch.cat(pieces)[inverse]
        return self.head(x) if self.head is not None else x


@contextmanager
def _keeping_output(block: nn.Module, store: dict):
    """Record ``block``'s own output (before any other forward hook rewrites it, e.g. v*'s δ)."""
    def hook(_m, _args, out):
        store["h"] = block_hidden(out).detach()
        store["template"] = None if isinstance(out, torch.Tensor) else out
    handle = block.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _skipping(blocks: list[nn.Module], output):
    """Blocks ``blocks`` compute nothing: each returns ``output`` (the last one's kept output; what the ones before
    it return is read by no one but the next skipped block). Their forward hooks still run."""
    saved = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (accelerate's hooks) is kept
    for b in blocks:
        b.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


@dataclass
class _Suffix:
    """Where the columns ``from_col`` … end of some rows sit in a suffix-only forward: row b's column ``off[b] + j`` is
    its j-th input (``cols``, clamped into the row on padding; ``valid``: a real token), after ``P`` kept prefix
    columns (``prefix``: the real ones)."""

    off: torch.Tensor  # [n]
    cols: torch.Tensor  # [n, S]
    valid: torch.Tensor  # [n, S]
    prefix: torch.Tensor  # [n, P]
    width: int  # the rows' longest real length (the full-coordinate width an edit sees)


def suffix_geometry(lengths: torch.Tensor, from_col: torch.Tensor) -> _Suffix:
    """The suffix-only layout of rows of real ``lengths`` run from ``from_col`` (clamped to the last real column)."""
    off = torch.minimum(from_col, lengths - 1).clamp(min=0)
    S, P = int((lengths - off).max()), int(off.max())
    j = torch.arange(S)
    cols = torch.minimum(off[:, None] + j, lengths[:, None] - 1)
    return _Suffix(off, cols, j[None, :] < (lengths - off)[:, None], torch.arange(P)[None, :] < off[:, None],
                   int(lengths.max()))


def cache_holding(model, layers):
    """A fresh cache of the model's own kind (``DynamicCache(config)``: sliding layers where the model has them) holding
    ``layers``: one (keys, values) pair per layer, in order."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def continue_from(model, cache, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states of ``ids`` after the keys and values in ``cache`` (transformers' incremental-decoding
    path: ``mask`` covers [kept | new] columns, ``position_ids`` the new columns' positions). The one place the
    causal saving continues a forward: the suffix forward below and the scores (lit_edit/metrics.py)."""
    return model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                            use_cache=True).last_hidden_state


def _kept_cache(model, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, P: int, start: int):
    """:func:`cache_holding` the first ``P`` kept key / value columns of ``rows`` for blocks start … N − 1; the blocks
    below ``start`` are skipped and never read theirs, which are zeros of the same shape (the mask sizes are read from
    any layer)."""
    k0, v0 = kv[start]
    filler = (k0.new_zeros(len(rows), k0.shape[1], P, k0.shape[3]), v0.new_zeros(len(rows), v0.shape[1], P, v0.shape[3]))
    n = model.config.get_text_config().num_hidden_layers
    return cache_holding(model, [(kv[i][0][rows, :, :P], kv[i][1][rows, :, :P]) if i in kv else filler
                                 for i in range(n)])


class RowForward:
    """Forward passes over subsets of the rows of one right-padded batch ``ids`` / ``mask`` [B, T], with blocks
    below ``start`` computed once per row (see the module docstring).

    ``run(rows, edit)`` runs the rows ``rows`` (indices into the batch), each length group trimmed to its longest real
    length, and returns a :class:`Readout` whose rows are ``rows`` in order. ``edit = (module, fn)`` replaces
    ``module``'s hidden output ``h`` by ``fn(h, sub)`` in each forward, where ``sub`` (on h's device) are the indices
    into ``rows`` of the rows of that forward (how v* and the windows add δ at their positions). Hooks that do not
    depend on the row (MetaKE's look-ahead) are installed around the call as for a plain forward. Nothing in blocks
    0 … start − 1 may change between calls.

    ``from_col`` ([B], optional): the first column of each row that any call may change. Later forwards of a row then
    compute only its columns from there on (module docstring); ``fn`` still sees ``h`` in the row's own columns
    (``[rows, longest, d]``), of which it may read and change only those at or after ``from_col`` (the others hold
    zeros), and a :class:`Readout` may be read only there (it raises otherwise)."""

    def __init__(self, model, layout, ids: torch.Tensor, mask: torch.Tensor, start: int,
                 from_col: torch.Tensor | None = None):
        self.model, self.ids, self.mask, self.start = model, ids, mask, start
        self.lengths = mask.sum(1).cpu()
        # right padding (the package's, tokens.pad_batch) lets a forward drop the columns after its longest row and
        # group rows by length; any other mask (left padding) runs whole, as given: the model's own forward then
        # sees exactly the columns, positions and mask it would see without this class
        cols = torch.arange(mask.shape[1])
        self.right = bool((mask.cpu().bool() == (cols[None, :] < self.lengths[:, None])).all())
        self.reference = _REFERENCE.get()
        # a sliding window (Gemma 3's local layers, Mistral) shorter than the rows: on a tiny Gemma 3 with a window of 4,
        # v* with per-request early stop then differed from the plain forward's by 0.17 (running the rows whole, at one
        # width, did not remove it; the cause is not found). Gemma-3-270M's window is 512 tokens, longer than any
        # CounterFact / ZsRE row with its context templates; a longer row is warned about.
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        within_window = not (isinstance(window, int) and window < int(self.lengths.max()))
        if not within_window and not self.reference:
            warnings.warn(f"rows of {int(self.lengths.max())} tokens exceed the model's sliding window ({window}): the "
                          f"truncated inner-loop forward is not checked equal to the full forward there "
                          f"(docs/algorithms.md §2.10)", stacklevel=2)
        self.blocks = [block_module(model, layout, i) for i in range(start)]
        self.n_blocks = layout.n_layers(model)
        self.head = logit_head(model, layout)  # lm_head (+ the softcap of Gemma 2)
        self.kept: torch.Tensor | None = None  # [B, T, d]: block start − 1's output of every row computed so far
        self.has = torch.zeros(len(ids), dtype=torch.bool)
        self.template = None  # a block's output structure when it is not a bare tensor (older transformers)
        # suffix-only forwards: only below the top block (else nothing is left to save), with right padding, within a
        # sliding window (a cache trimmed to the window would lose kept columns)
        self.from_col = None
        if (from_col is not None and not self.reference and self.right and within_window
                and 0 < start < self.n_blocks and not _WHOLE_ROWS.get()):
            self.from_col = from_col.cpu().long()
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block i >= start: keys / values [B, h, T, hd]

    def __call__(self, rows: torch.Tensor, edit: tuple[nn.Module, Callable] | None = None) -> Readout:
        dev = next(self.model.parameters()).device
        rows = rows.cpu()
        one = self.reference or not self.right
        groups = [torch.arange(len(rows))] if one else length_groups(self._lengths(rows))
        parts, offsets = [], []
        for sub in groups:
            here = rows[sub]
            suffix = (suffix_geometry(self.lengths[here], self.from_col[here])
                      if self.from_col is not None and bool(self.has[here].all()) else None)
            with ExitStack() as stack:
                if edit is not None:
                    module, fn = edit
                    sub_dev = sub.to(dev)
                    wrapped = (lambda h, s=sub_dev: fn(h, s)) if suffix is None else _in_row_columns(fn, sub_dev, suffix)
                    stack.enter_context(rewrite_output(module, wrapped))
                parts.append(self._forward(here, dev, suffix))
            offsets.append(None if suffix is None else suffix.off)
        return Readout(parts, groups, None if self.reference else self.head, offsets)

    def _lengths(self, rows: torch.Tensor) -> torch.Tensor:
        """The lengths the rows will be computed at: from ``from_col`` on where their prefix is kept."""
        if self.from_col is None:
            return self.lengths[rows]
        kept = self.has[rows]
        off = torch.minimum(self.from_col[rows], self.lengths[rows] - 1).clamp(min=0)
        return torch.where(kept, self.lengths[rows] - off, self.lengths[rows])

    def _forward(self, rows: torch.Tensor, dev, suffix: _Suffix | None = None) -> torch.Tensor:
        """The logits (reference) or the final hidden states (after the final norm) of ``rows``, trimmed to their
        longest real length (from ``suffix.off`` on, for a suffix-only forward)."""
        width = int(self.lengths[rows].max()) if self.right else self.mask.shape[1]
        ids = self.ids[rows.to(self.ids.device), :width].to(dev)
        mask = self.mask[rows.to(self.mask.device), :width].to(dev)
        if self.reference:
            return self.model(input_ids=ids, attention_mask=mask).logits

        def run(**extra):  # the decoder stack with its final norm: the LM head is applied later, where read
            extra.setdefault("use_cache", False)
            return self.model.base_model(input_ids=ids, attention_mask=mask, **extra)
        if not self.blocks:  # start = 0: only the embeddings lie below, nothing to keep
            return run().last_hidden_state
        if suffix is not None:
            return self._suffix_forward(rows, dev, suffix)
        if bool(self.has[rows].all()):
            h = self.kept[rows.to(self.kept.device), :width]
            with _skipping(self.blocks, h if self.template is None else replace_block_hidden(self.template, h)):
                return run().last_hidden_state
        store: dict = {}
        with _keeping_output(self.blocks[-1], store):
            out = run(use_cache=self.from_col is not None)
        h = store["h"]
        if self.kept is None:
            self.kept = torch.zeros(*self.ids.shape, h.shape[-1], dtype=h.dtype, device=h.device)
        self.kept[rows.to(h.device), :width] = h
        if self.from_col is not None:  # the keys and values of blocks start … N − 1 (only columns < from_col are used)
            for i in range(self.start, self.n_blocks):
                layer = out.cache.layers[i]
                if i not in self.kv:
                    shape = (len(self.ids), layer.keys.shape[1], self.ids.shape[1], layer.keys.shape[3])
                    self.kv[i] = (layer.keys.new_zeros(shape), layer.values.new_zeros(*shape[:3], layer.values.shape[3]))
                self.kv[i][0][rows.to(h.device), :, :width] = layer.keys.detach()
                self.kv[i][1][rows.to(h.device), :, :width] = layer.values.detach()
        self.has[rows] = True
        self.template = store["template"]
        return out.last_hidden_state

    def _suffix_forward(self, rows: torch.Tensor, dev, sx: _Suffix) -> torch.Tensor:
        """Columns ``sx.off`` … end of ``rows`` only, on the kept states of block start − 1 and the kept keys / values of
        the columns before (:class:`_Suffix`)."""
        r = rows.to(self.ids.device)
        ids = self.ids[r[:, None], sx.cols].to(dev)
        kd = self.kept.device
        h = self.kept[rows.to(kd)[:, None], sx.cols.to(kd)]
        mask = torch.cat([sx.prefix, sx.valid], 1).long().to(dev)
        position_ids = sx.cols.to(dev)  # a padded column repeats its row's last position; it is masked out
        cache = _kept_cache(self.model, self.kv, rows.to(kd), sx.prefix.shape[1], self.start)
        with _skipping(self.blocks, h if self.template is None else replace_block_hidden(self.template, h)):
            return continue_from(self.model, cache, ids, mask, position_ids)


def _in_row_columns(fn: Callable, sub: torch.Tensor, sx: _Suffix) -> Callable:
    """``fn`` of an edit, which addresses the row's own columns, applied to a suffix-only forward's output ``h``
    ([n, S, d]): h is placed at its columns of a zero ``[n, width, d]``, ``fn`` runs there, and its result is read
    back at the same columns (differentiable both ways)."""
    def wrapped(h: torch.Tensor) -> torch.Tensor:
        dev = h.device
        cols, valid = sx.cols.to(dev), sx.valid.to(dev)
        r, j = valid.nonzero(as_tuple=True)
        full = h.new_zeros(h.shape[0], sx.width, h.shape[2]).index_put((r, cols[r, j]), h[r, j])
        out = fn(full, sub)
        return out[torch.arange(h.shape[0], device=dev)[:, None], cols]
    return wrapped
