"""Decoding: greedy and top-k sampled continuations of prompts, with transformers' ``model.generate``.

Prompts are encoded as lit_edit encodes them everywhere (the tokenizer's BOS once, then the text without special
tokens) and left-padded; ``model.generate`` derives each row's position ids from the attention mask, so a batched
row gets the tokens it would get alone (up to float round-off in near-ties). :func:`generate_ids` is the one
decoder (free-generation efficacy, fluency, the long-form answers through :func:`generate_greedy`); the
hand-written KV-cache loop :func:`_greedy_loop` (right padding) stays as the independent check that tests compare
it with (tests/test_cf_metrics.py, tests/test_unstructured.py).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_edit.tokens import bos_ids, context_length, encode, pad_id


def _chunks(n: int, size: int):
    return (range(i, min(i + size, n)) for i in range(0, n, size))


def generate_greedy(model, tok, prompts: list[str], max_new_tokens, *, batch_size: int = 8,
                    padding_side: str = "left", stop_ids=None, strip: bool = True,
                    return_ids: bool = False) -> list:
    """Greedy continuations of ``prompts``, in batches, identical to generating one at a time.

    Each prompt is encoded as lit_edit does everywhere (the tokenizer's BOS once, then the text
    without special tokens). ``max_new_tokens`` is one int or one per prompt; a row stops at its
    own limit or after a stop token (default: the tokenizer's EOS and, with a chat template, the
    end-of-turn token), which is not part of the output.

    ``padding_side="left"`` (default): ``model.generate`` (:func:`generate_ids`). ``"right"``: the
    hand-written loop :func:`_greedy_loop`, kept as an independent check of it (tests compare the two).
    Returns the decoded texts (special tokens skipped, ``strip``-ped), or the new token ids.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if padding_side == "left":
        out = generate_ids(model, tok, prompts, max_new_tokens, stop_ids=stop_ids, batch_size=batch_size)
    else:
        out = _greedy_loop(model, tok, prompts, max_new_tokens, batch_size, padding_side, stop_ids)
    if return_ids:
        return out
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in out]
    return [t.strip() for t in texts] if strip else texts


@torch.no_grad()
def _greedy_loop(model, tok, prompts: list[str], max_new_tokens, batch_size: int, padding_side: str,
                 stop_ids) -> list[list[int]]:
    """Greedy decoding by hand: padding on ``padding_side`` ("left" or "right"), whatever the
    tokenizer's own setting: pad columns are masked out and every real token gets its unpadded
    position id (``cumsum(mask) - 1``), and new tokens are appended after the prompt block with the
    KV cache, the row's own next position id and a mask that keeps its pad columns hidden. So both
    sides give the same tokens as unbatched generation (up to float round-off in near-ties)."""
    seqs, limits = _encoded(tok, model, prompts, max_new_tokens)
    stop = torch.tensor(sorted(_stop_ids(tok) if stop_ids is None else stop_ids), dtype=torch.long)
    ctx = context_length(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    stop = stop.to(dev)
    pad = pad_id(tok)
    out: list[list[int]] = [[] for _ in prompts]
    try:
        # long generations first and together: a batch runs until its longest row is done
        order = sorted(range(len(prompts)), key=lambda i: (-limits[i], -len(seqs[i])))
        for chunk in _chunks(len(order), batch_size):
            rows = [order[j] for j in chunk]
            if max(limits[i] for i in rows) == 0:
                continue
            lens = torch.tensor([len(seqs[i]) for i in rows], device=dev)
            width = int(lens.max())
            ids = torch.full((len(rows), width), pad, dtype=torch.long, device=dev)
            mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
            for b, i in enumerate(rows):
                cols = slice(width - len(seqs[i]), width) if padding_side == "left" else slice(0, len(seqs[i]))
                ids[b, cols] = torch.tensor(seqs[i], device=dev)
                mask[b, cols] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            last = torch.full_like(lens, width - 1) if padding_side == "left" else lens - 1
            logits = res.logits[torch.arange(len(rows), device=dev), last]
            past = res.past_key_values
            limit = torch.tensor([limits[i] for i in rows], device=dev)
            done = limit == 0
            for step in range(int(limit.max())):
                nxt = logits.float().argmax(-1)
                done |= torch.isin(nxt, stop)
                for b, i in enumerate(rows):
                    if not done[b]:
                        out[i].append(int(nxt[b]))
                done |= (step + 1) >= limit
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = lens + step
                if ctx is not None:  # rows already done keep being fed; keep their (unused) positions in range
                    pos = pos.clamp(max=ctx - 1)
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                            past_key_values=past, use_cache=True)
                logits, past = res.logits[:, -1], res.past_key_values
    finally:
        model.train(was_training)
    return out


def _batches(order: list[int], seqs: list[list[int]], limits: list[int], size: int, ctx: int | None):
    """Consecutive rows of ``order``, at most ``size`` each, such that every row of a batch fits the context for the
    batch's number of new tokens (``generate`` runs all rows to the longest limit: a row's positions reach its
    length + that limit - 1)."""
    batch: list[int] = []
    for i in order:
        grown = batch + [i]
        if batch and (len(grown) > size or (ctx is not None and max(len(seqs[j]) for j in grown)
                                             + max(limits[j] for j in grown) - 1 > ctx)):
            yield batch
            grown = [i]
        batch = grown
    if batch:
        yield batch


@contextlib.contextmanager
def _no_mask_notice():
    """Hide transformers' "we strongly recommend passing in an attention_mask" while generating: ``generate`` drops
    an all-ones mask itself, and a model whose pad id is its BOS (GPT-2, the fact world) then warns about it."""
    logger = logging.getLogger("transformers.modeling_utils")
    notice = lambda record: "passing in an `attention_mask`" not in record.getMessage()  # noqa: E731
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _stop_ids(tok) -> set[int]:
    """The tokenizer's EOS and, with a chat template, the end-of-turn token."""
    from lit_edit.requests import end_of_turn

    stop = {tok.eos_token_id} - {None}
    eot = end_of_turn(tok)
    if eot is not None:
        stop.add(tok.convert_tokens_to_ids(eot))
    return stop


def _encoded(tok, model, prompts: list[str], max_new_tokens) -> tuple[list[list[int]], list[int]]:
    """Each prompt's ids and its limit of new tokens, checked against the model's context."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or any(n < 0 for n in limits):
        raise ValueError("max_new_tokens must be one int >= 0 or one per prompt")
    seqs = [bos_ids(tok) + encode(tok, p) for p in prompts]
    ctx = context_length(model)
    for i, (s, n) in enumerate(zip(seqs, limits)):
        if not s and n:
            raise ValueError(f"prompt {i} is empty and the tokenizer adds no BOS: nothing to condition on")
        if ctx is not None and n and len(s) + n - 1 > ctx:
            raise ValueError(f"prompt {i} ({len(s)} tokens) + {n} new tokens exceeds the model's context of {ctx}")
    return seqs, limits


class _SeededTopK(LogitsProcessor):
    """Top-k sampling with one random stream per row, as the Gumbel-max trick: the argmax of the top-k logits plus
    independent Gumbel noise is a sample from their softmax. Greedy decoding of the processed scores then samples
    each row from its own generator, so a row's tokens do not depend on the other rows of its batch."""

    def __init__(self, k: int, seeds: list[int]):
        self.k = k
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        vals, idx = scores.float().topk(min(self.k, scores.shape[-1]), dim=-1)
        u = torch.stack([torch.rand(vals.shape[-1], generator=g, dtype=torch.float64) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, idx, (vals + gumbel.to(vals)).to(scores.dtype))


@torch.no_grad()
def generate_ids(model, tok, prompts: list[str], max_new_tokens, *, top_k: int | None = None,
                 seeds: list[int] | None = None, stop_ids=None, batch_size: int = 8) -> list[list[int]]:
    """The new token ids after each prompt, from ``model.generate``: greedy (``top_k=None``) or sampled from the
    ``top_k`` most likely tokens (ROME's fluency generations: top-k 5).

    ``max_new_tokens``: one int or one per prompt; a row ends at its own limit or before its first stop id
    (default: EOS and the end-of-turn token; ``set()`` generates every row to its limit, through EOS, as ROME's
    fluency generation does). A sampled row draws from its own generator seeded by ``seeds[i]`` (default: ``i``):
    its tokens do not depend on the batch it is in (up to float round-off in near-ties), and the global RNG is
    not touched.
    """
    seqs, limits = _encoded(tok, model, prompts, max_new_tokens)
    stop = _stop_ids(tok) if stop_ids is None else set(stop_ids)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    dev = next(model.parameters()).device
    pad = pad_id(tok)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-limits[i], -len(seqs[i])))
    was_training = model.training
    model.eval()
    try:
        with _no_mask_notice():
            for rows in _batches(order, seqs, limits, batch_size, context_length(model)):
                n_new = max(limits[i] for i in rows)
                if n_new == 0:
                    continue
                width = max(len(seqs[i]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for b, i in enumerate(rows):
                    ids[b, width - len(seqs[i]):] = torch.tensor(seqs[i])
                    mask[b, width - len(seqs[i]):] = 1
                cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, num_beams=1, pad_token_id=pad,
                                       eos_token_id=sorted(stop))
                sampler = LogitsProcessorList([_SeededTopK(top_k, [seeds[i] for i in rows])] if top_k else [])
                new = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg,
                                     logits_processor=sampler)
                for b, i in enumerate(rows):
                    row = new[b, width:].tolist()[: limits[i]]
                    cut = next((k for k, t in enumerate(row) if t in stop), len(row))
                    out[i] = row[:cut]
    finally:
        model.train(was_training)
    return out
