"""Loading a causal LM and what is measured on the unedited model before any edit (context templates)."""
from __future__ import annotations

from pathlib import Path

import torch

def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """The model, its tokenizer and the folder (or hub id) they were read from, for ``model.model``: the built-in
    fact world, a packaged real model (``smollm2-135m-instruct``, ``gemma3-270m``), a ``.gguf`` file (dequantised
    once, cached), a local folder or a hub id (:func:`lit_edit.sources.resolve`).

    ``trust_remote_code`` goes to both ``from_pretrained`` calls explicitly, so a model with custom code is
    refused (unless it is ``True``), never met with an interactive "run the custom code? [y/N]" prompt. A hub id
    that cannot be fetched is an error naming ``model.model`` and the id, not transformers' bare OSError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    from lit_edit.progress import is_interactive
    from lit_edit.sources import hub_error, resolve

    if not is_interactive():  # in a log, transformers' loading bars are '\r'-joined noise; lit_edit's phase lines say it
        hf_logging.disable_progress_bar()
    path = resolve(name_or_path, dtype, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:
        if path != name_or_path or Path(path).exists():  # a local folder: transformers names the missing file
            raise
        raise hub_error(name_or_path, err) from err
    tok.padding_side = "right"  # all position arithmetic assumes right padding (§1.5)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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
