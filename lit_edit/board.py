"""What a run shows in TensorBoard besides scalars: sample generations, histograms and the retention heat map.

Everything here is logged against the run's one step axis, the number of applied batches (0 = the unedited
model), the axis of the ledger (``edits.jsonl``'s ``step``). Only rank 0 writes; a logger without the
TensorBoard ``SummaryWriter`` methods (e.g. CSV) gets the scalars only.
"""
from __future__ import annotations

import torch
import transformers

from lit_edit.tokens import bos_ids, encode

# a perceptually ordered ramp (dark blue -> green -> yellow) for the heat map: low retention is dark
_RAMP = torch.tensor([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                      [0.99, 0.91, 0.14]])


def writer(trainer, m):
    """The TensorBoard SummaryWriter of rank 0, or None."""
    exp = getattr(m.logger, "experiment", None) if trainer.is_global_zero else None
    return exp if hasattr(exp, "add_text") and hasattr(exp, "add_histogram") else None


def sample_prompt(request) -> tuple[str, str, str | None]:
    """(prompt, new target, old target) of a request as a sample shows it."""
    if hasattr(request, "filled_prompt"):
        return request.filled_prompt, request.target_new, request.target_true
    return request.question, request.answer, getattr(request, "original_answer", None)


@torch.no_grad()
def generate(llm, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (``model.generate``), one prompt at a time so no padding changes them."""
    out = []
    dev = next(llm.parameters()).device
    # transformers' prefill drops an all-ones mask and then warns that BOS (= the pad id here) may be padding: a
    # single unpadded prompt is not
    quiet = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        for p in prompts:
            prompt = bos_ids(tok) + encode(tok, p)  # as the scores see the prompt (lit_edit.tokens)
            ids = torch.tensor([prompt], device=dev)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad)
            out.append(tok.decode(ids[0, len(prompt):], skip_special_tokens=True))
    finally:
        transformers.utils.logging.set_verbosity(quiet)
    return out


def samples_markdown(requests: list, pre: list[str], now: list[str]) -> str:
    """One markdown table: prompt, targets, the unedited model's and the current model's continuation."""
    esc = lambda s: "" if s is None else str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| case | prompt | new target | old target | pre-edit | now |", "|---|---|---|---|---|---|"]
    for r, a, b in zip(requests, pre, now):
        prompt, new, old = sample_prompt(r)
        lines.append(f"| {esc(r.case_id)} | {esc(prompt)} | {esc(new)} | {esc(old)} | {esc(a)} | {esc(b)} |")
    return "\n".join(lines)


def heatmap_image(values: list[list[float | None]], cell: int = 8) -> torch.Tensor:
    """[3, H, W] image of a matrix in [0, 1] (rows: evaluation steps, columns: edit steps); None (an edit step not
    yet made, or all of its edits removed) is white."""
    rows, cols = len(values), max((len(r) for r in values), default=0)
    img = torch.ones(3, max(rows, 1) * cell, max(cols, 1) * cell)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v is None:
                continue
            x = min(max(float(v), 0.0), 1.0) * (len(_RAMP) - 1)
            lo = min(int(x), len(_RAMP) - 2)
            color = _RAMP[lo] + (x - lo) * (_RAMP[lo + 1] - _RAMP[lo])
            img[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = color[:, None, None]
    return img


def retention_row(per_record: dict, edit_step: dict, n_steps: int, key: str) -> list[float | None]:
    """Mean ``key`` of the live edits of each edit step 1..n_steps (None where a step has none)."""
    sums, counts = [0.0] * n_steps, [0] * n_steps
    for case_id, scores in per_record.items():
        s = edit_step.get(case_id)
        if s is not None and 1 <= s <= n_steps and key in scores:
            sums[s - 1] += scores[key]
            counts[s - 1] += 1
    return [sums[i] / counts[i] if counts[i] else None for i in range(n_steps)]
