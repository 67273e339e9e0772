"""Prompt tokenisation with exact token positions.

The reference repos tokenise prefix / subject / suffix separately to *compute* the subject's
token index, then tokenise the joined string to *run* the model, and hope both agree
(docs/algorithms.md §1.3, §1.5; they do not for Llama-3's BOS). Here the model input is built by
concatenating the separately tokenised pieces, so every index is exact by construction, for any
tokenizer and any padding side; the BOS (if the tokenizer adds one) is added once, up front.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


@lru_cache(maxsize=None)
def _special_prefix(tok) -> tuple[int, ...]:
    """Ids a tokenizer puts in front of every text (Llama-3's BOS; nothing for GPT-2/Qwen)."""
    with_special = tok("x", add_special_tokens=True)["input_ids"]
    without = tok("x", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    if n <= 0 or with_special[n:] != without:
        return ()
    return tuple(with_special[:n])


def bos_ids(tok) -> list[int]:
    return list(_special_prefix(tok))


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def target_ids(tok, target: str) -> list[int]:
    """Target tokens; a leading space is added as the reference does for BPE vocabularies (§1.5)."""
    if not target.startswith(" "):
        target = " " + target
    return encode(tok, target)


@dataclass
class Encoded:
    ids: list[int]
    index: int  # the fact-token position (§1.3)


def encode_prompt(tok, template: str, subject: str, fact_token: str = "subject_last",
                  legacy_bos_shift: bool = False) -> Encoded:
    """Tokenise ``template.format(subject)`` and locate the fact token.

    ``template`` holds one ``{}``; text before it must end with a space (checked at load time),
    which is moved onto the subject so that it tokenises as a word-initial piece (§1.3).
    ``legacy_bos_shift`` reproduces the AE/OTE Llama-3 off-by-one (index one token late).
    """
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
    prefix, suffix = template.split("{}")
    if prefix:
        prefix, subject = prefix[:-1] if prefix.endswith(" ") else prefix, " " + subject
    bos = bos_ids(tok)
    p, s, x = encode(tok, prefix), encode(tok, subject), encode(tok, suffix)
    ids = bos + p + s + x
    start = len(bos) + len(p)
    index = {
        "subject_last": start + len(s) - 1,
        "subject_first": start,
        "subject_first_after_last": start + len(s) if x else start + len(s) - 1,
        "last": len(ids) - 1,
    }[fact_token]
    if legacy_bos_shift and bos:
        index += len(bos)
    return Encoded(ids, index)


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a [B, T] id tensor and its attention mask (all positions here assume right padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    if tok.eos_token_id is not None:
        return tok.eos_token_id
    return 0


def fill_context(context: str, prompt: str) -> str:
    """Prefix a prompt template with a context template ("<ctx>. {}") keeping one ``{}`` slot."""
    return context.replace("{}", prompt)


def context_length(model_or_config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, ``n_positions`` or ``n_ctx``);
    an ``int`` passes through; ``None`` if the config does not say."""
    if isinstance(model_or_config, int):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
