"""Loading a causal LM and what is measured on the unedited model before any edit (context templates)."""
from __future__ import annotations

from pathlib import Path

import torch

from lit_edit.data import is_world_spec, looks_like_local_path


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """``from_pretrained`` for a hub id or local path; ``world[:preset]`` is the built-in fact world.

    A name that :func:`~lit_edit.data.looks_like_local_path` must exist, as a directory: otherwise a
    ``FileNotFoundError`` names it, where transformers would answer "Repo id must be in the form ...".
    ``trust_remote_code`` goes to both ``from_pretrained`` calls explicitly, so a model with custom code is
    refused (unless it is ``True``), never met with an interactive "run the custom code? [y/N]" prompt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path
    if is_world_spec(name_or_path):  # the one test for "the built-in world": a dir named world_models/... is not it
        from lit_edit.world import ensure_world, resolve_world_name

        path = str(ensure_world(resolve_world_name(name_or_path)) / "model")
    elif looks_like_local_path(name_or_path):
        local = Path(name_or_path).expanduser()  # transformers does not expand "~"
        if not local.exists():
            raise FileNotFoundError(f"model directory {name_or_path} does not exist (model.model)")
        if not local.is_dir():
            raise NotADirectoryError(f"model path {name_or_path} is not a directory (model.model)")
        path = str(local)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # all position arithmetic assumes right padding (§1.5)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model, tok, path


@torch.no_grad()
def generate_context_templates(model, tok, spec: list[list[int]], seed: int) -> list[str]:
    """§1.4: "{}" plus, for each [length, count], ``count`` short samples from the unedited model
    (seeds The/Therefore/Because/I/You, top-k 5), each followed by ". {}". Seeded here (unseeded upstream)."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    out = ["{}"]
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for length, count in spec:
        for i in range(count):
            ids = tok(starts[i % len(starts)], add_special_tokens=True, return_tensors="pt")["input_ids"].to(dev)
            while ids.shape[1] < length:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
                top = logits.topk(5)
                nxt = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                ids = torch.cat([ids, nxt.to(dev)[None]], 1)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(text + ". {}")
    return out
