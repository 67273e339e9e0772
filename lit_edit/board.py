"""What a run shows in TensorBoard besides scalars: sample generations, histograms, the figures
(:mod:`lit_edit.figures`: the retention heat map, drift, the summary page) and the hparams table.

Everything here is logged against the run's one step axis, the number of applied batches (0 = the unedited
model), the axis of the ledger (``edits.jsonl``'s ``step``). Only rank 0 writes; a logger without the
TensorBoard ``SummaryWriter`` methods (e.g. CSV) gets the scalars only.
"""
from __future__ import annotations

import json
import time
import warnings

import torch
import transformers

from lit_edit import figures
from lit_edit.tokens import bos_ids, encode


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


def samples_text(requests: list, pre: list[str], now: list[str]) -> str:
    """The samples as the end of a run prints them: each prompt with its targets, the unedited model's greedy
    continuation and the edited model's."""
    lines = ["samples (greedy continuations of the first edited prompts):"]
    for r, a, b in zip(requests, pre, now):
        prompt, new, old = sample_prompt(r)
        lines += [f"  {prompt!r}  (new target {new!r}, old {old!r})", f"    before: {a!r}", f"    after:  {b!r}"]
    return "\n".join(lines)


def retention_row(per_record: dict, edit_step: dict, n_steps: int, key: str) -> list[float | None]:
    """Mean ``key`` of the live edits of each edit step 1..n_steps (None where a step has none)."""
    sums, counts = [0.0] * n_steps, [0] * n_steps
    for case_id, scores in per_record.items():
        s = edit_step.get(case_id)
        if s is not None and 1 <= s <= n_steps and key in scores:
            sums[s - 1] += scores[key]
            counts[s - 1] += 1
    return [sums[i] / counts[i] if counts[i] else None for i in range(n_steps)]


# ------------------------------------------------------------------------------------------------
# Figures and the hparams table
# ------------------------------------------------------------------------------------------------


def run_of(m) -> dict:
    """What produced the run, as metrics.json's ``run`` names it (the figures' titles)."""
    return {"model": m.model_name, "method": m.hparams["method"], "solver": m.hparams["solver"], "layers": m.layers}


def title(m) -> str:
    """``model · method · solver (layers ...)``, every figure's title."""
    return figures.run_title(run_of(m))


def draw(what: str, make, writer=None, tag: str | None = None, step: int = 0, path=None) -> float:
    """Draw a figure (``make()``) and log it to ``writer`` under ``tag`` and/or save it as a PNG at ``path``.
    A figure is a view of numbers already written: a drawing failure warns and the run goes on. The seconds it
    took are returned."""
    started = time.perf_counter()
    if writer is None and path is None:
        return 0.0
    try:
        fig = make()
        if path is not None:
            figures.save_png(fig, path)
        if writer is not None and tag is not None:
            figures.log_figure(writer, tag, fig, step)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"lit_edit: could not draw {what}: {type(err).__name__}: {err}", stacklevel=2)
    return time.perf_counter() - started


def _hparam_value(v):
    """A value TensorBoard's hparams table takes (bool, int, float, str): lists, dicts and None as JSON."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


def hparams_table(m) -> dict:
    """The HPARAMS tab's columns: the run's settings as the YAML config names them (``model.layers``,
    ``model.solver.init_args.L2``, ``data.batch_size``, ...: :meth:`EditModule.run_settings`) and
    ``model.eval_every_n_steps``; no internal keys (Lightning's ``_instantiator``)."""
    settings = dict(m.run_settings())
    settings["model.eval_every_n_steps"] = m.eval_every_n_steps
    return {k: _hparam_value(v) for k, v in sorted(settings.items()) if not k.rsplit(".", 1)[-1].startswith("_")}


def log_hparams(logger, params: dict, metrics: dict, step: int) -> None:
    """The hparams table with the final metrics. To TensorBoard straight through the logger's writer, so the
    logger's own ``hparams.yaml`` (the module's settings, written by Lightning) keeps its content; another
    logger gets ``log_hyperparams``."""
    exp = getattr(logger, "experiment", None)
    if hasattr(exp, "_get_file_writer") and hasattr(exp, "add_scalar"):
        from torch.utils.tensorboard.summary import hparams

        logger.log_metrics(metrics, step=step)
        writer = exp._get_file_writer()
        for summary in hparams(params, metrics):
            writer.add_summary(summary, step)
    else:
        logger.log_hyperparams(params, metrics=metrics)
