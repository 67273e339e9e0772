"""Small shared builders for tests: a tiny random GPT-2 and a BPE tokenizer trained on a few sentences."""
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lit_edit.requests import EditRequest
from lit_edit.world import train_tokenizer

SENTENCES = ["Anna Berk lives in the city of Paris.", "Tom Lund works as a baker.", "Mira Voss speaks French.",
             "Ola Dunn plays the violin.", "Because the weather was good. The city is calm."]


def tiny_tokenizer():
    return train_tokenizer(SENTENCES * 40, 300)


def tiny_gpt2(tok, n_layer=4, n_embd=64, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False).to(dtype)


def tiny_bert(path: Path) -> Path:
    """A randomly initialised 2-layer BERT and a word-level tokenizer saved to ``path`` (a local scoring model)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "the cat sat on a mat dog ran in park today".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def tiny_requests():
    return [EditRequest(1, "{} lives in the city of", "Anna Berk", "London", "Paris"),
            EditRequest(2, "{} works as a", "Tom Lund", "pilot of ships", "baker"),
            EditRequest(3, "{} speaks", "Mira Voss", "German", "French"),
            EditRequest(4, "The instrument of {} is the", "Ola Dunn", "drum", "violin")]


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A real benchmark sample from ``../shared/data``; the test is skipped, with the reason printed, without it."""
    path = SHARED_DATA / name
    if not path.is_file():
        reason = f"real benchmark sample {path} not found (CI provides ../shared/data beside the checkout)"
        print(reason)
        pytest.skip(reason)
    return path
