"""Training a world: its BPE tokenizer, a GPT-2 trained with Lightning on its text, and how well it knows it."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from typing import Iterable, Sequence

import torch

from lit_edit.world.generator import World, _rng
from lit_edit.world.spec import EOS, WorldSpec


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """Train a GPT-2-style byte-level BPE (leading-space tokens) on ``texts``; it adds a BOS.

    ``add_prefix_space=True``: a text is tokenised as if a space preceded it, so a word has ONE
    token form whether it starts a sequence or not. (Without it, a subject at the start of a prompt
    — "{} was born in" — is split into word-internal pieces whose first one is shared by many
    subjects, unlike the same subject mid-sentence; the model then learns the facts ~3x slower and
    keys them on varying positions.)
    Returns a ``transformers.PreTrainedTokenizerFast`` whose bos/eos/pad/unk token is
    ``<|endoftext|>`` (id 0), padding on the right, prepending it as BOS when encoding with special tokens.
    The vocabulary may come out smaller than ``vocab_size`` if the text supports no more merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # every text starts with <|endoftext|> as BOS (GPT-2 separates documents with it): the first real
    # token then never sits at position 0, the attention sink. With subjects at position 0
    # ("{} was born in") the tiny world reached 0.22 canonical top-1 instead of 0.99.
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, eos_id)])
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        padding_side="right",
        **kwargs,
    )


def check_tokenizer(world: World, tokenizer) -> None:
    """Raise ``ValueError`` if objects of a relation share a first token."""
    for r in world.relations:
        firsts: dict[int, str] = {}
        for o in r.objects:
            t = tokenizer(" " + o, add_special_tokens=False).input_ids[0]
            if t in firsts:
                raise ValueError(
                    f"objects {firsts[t]!r} and {o!r} of {r.relation_id} share their first token; "
                    "increase vocab_size"
                )
            firsts[t] = o




@torch.no_grad()
def top1_predictions(model, tokenizer, prompts: Sequence[str], batch_size: int = 256) -> list[int]:
    """Argmax next-token id after each prompt (right padding; BOS added as in training)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[int] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        out.extend(logits[torch.arange(len(chunk), device=device), last].argmax(-1).tolist())
    model.train(was_training)
    return out


def top1_accuracy(model, tokenizer, items: Sequence[tuple[str, str]], batch_size: int = 256) -> float:
    """Share of (prompt, object) items whose argmax next token is the first token of ``" " + object``."""
    if not items:
        return float("nan")
    preds = top1_predictions(model, tokenizer, [p for p, _ in items], batch_size)
    want = [tokenizer(" " + o, add_special_tokens=False).input_ids[0] for _, o in items]
    return sum(int(a == b) for a, b in zip(preds, want)) / len(items)


def evaluate_world(model, tokenizer, world: World) -> dict:
    return {
        "canonical_top1": top1_accuracy(model, tokenizer, world.canonical_prompts()),
        "heldout_paraphrase_top1": top1_accuracy(model, tokenizer, world.heldout_prompts()),
        "trained_paraphrase_top1": top1_accuracy(model, tokenizer, world.trained_paraphrase_prompts()),
    }




def make_model(spec: WorldSpec, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def _pack_epochs(world: World, tokenizer, spec: WorldSpec) -> list[list[list[int]]]:
    """Token-id sequences for every epoch: seeded random packs of 1..pack_max sentences + eos."""
    texts = world.training_texts()
    # add_prefix_space: a sentence has the same ids anywhere in a pack; the first one gets the BOS in front
    inner = tokenizer(texts, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    limit = spec.n_positions
    epochs = []
    for e in range(spec.epochs):
        rng = _rng(spec.seed, f"pack:{e}")
        order = list(range(len(texts)))
        rng.shuffle(order)
        seqs: list[list[int]] = []
        i = 0
        while i < len(order):
            k = rng.randint(1, spec.pack_max)
            seq = [tokenizer.bos_token_id] + inner[order[i]]
            i += 1
            for _ in range(k - 1):
                if i >= len(order) or len(seq) + len(inner[order[i]]) + 1 > limit:
                    break
                seq += inner[order[i]]
                i += 1
            seqs.append((seq + [eos])[:limit])
        epochs.append(seqs)
    return epochs


def _collate(batch: list[list[int]], pad_id: int) -> dict:
    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # pad == eos: mask by position, not by id
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lightning_module(model, spec: WorldSpec, epochs: list[list[list[int]]], pad_id: int):
    import lightning as L
    from torch.utils.data import DataLoader

    steps = sum(math.ceil(len(e) / spec.batch_size) for e in epochs)

    class WorldLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def train_dataloader(self):
            e = min(self.current_epoch, len(epochs) - 1)
            g = torch.Generator().manual_seed(spec.seed * 1000 + e)
            return DataLoader(
                epochs[e], batch_size=spec.batch_size, shuffle=True, generator=g,
                collate_fn=lambda b: _collate(b, pad_id), num_workers=0,
            )

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=spec.lr, betas=(0.9, 0.98),
            )
            warm = max(1, int(spec.warmup_frac * steps))

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                t = min(1.0, (step - warm) / max(1, steps - warm))
                return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return WorldLM()


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_threads() -> int:
    """Threads for training a world: ``$LIT_EDIT_WORLD_THREADS``, default 1, never the number of cores.

    A fixed count makes the build reproducible: CPU reductions split across threads round differently, so the same
    seed trained with 1 and 2 threads gave weights differing by up to 0.03 (tiny preset), while equal counts gave
    bit-identical weights. One thread is also the safe choice on a loaded machine, where threads that wait for a busy
    core slow training down. The count is recorded in report.json."""
    raw = os.environ.get("LIT_EDIT_WORLD_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"LIT_EDIT_WORLD_THREADS must be a whole number >= 1, got {raw!r}")
    return n


def _train_model(world: World, tokenizer, verbose: bool = True):
    """Train a fresh GPT-2 on the world's text; returns (model, info dict)."""
    import lightning as L

    spec = world.spec
    L.seed_everything(spec.seed, verbose=False)
    model = make_model(spec, tokenizer)
    epochs = _pack_epochs(world, tokenizer, spec)
    module = _lightning_module(model, spec, epochs, tokenizer.pad_token_id)
    quiet = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    try:
        if not verbose:
            for lg in quiet:
                lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*reload_dataloaders_every_n_epochs.*")
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")  # lightning vs torch 2.13
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=spec.epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=verbose,
                enable_model_summary=False,
                gradient_clip_val=spec.grad_clip,
                reload_dataloaders_every_n_epochs=1,
                num_sanity_val_steps=0,
                default_root_dir=None,
            )
            t0 = time.perf_counter()
            trainer.fit(module)
            seconds = time.perf_counter() - t0
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    model.eval()
    tail = module.losses[-max(1, len(module.losses) // 20):]
    info = {
        "train_seconds": round(seconds, 2),
        "steps": len(module.losses),
        "final_loss": round(sum(tail) / len(tail), 5),
        "n_sequences_per_epoch": len(epochs[0]),
    }
    return model, info
