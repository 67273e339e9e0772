"""Causal tracing of factual recall (ROME §2.1, Meng et al. 2022): ``python train.py trace --config <yaml>``.

For each CounterFact-schema record whose true object the model predicts, three kinds of forward pass on the
prompt ``prompt.format(subject)`` (docs/algorithms.md §13):

1. *clean*: p_clean = P(o | prompt), o the first token of " " + target_true at the last prompt position; the
   output of every layer's MLP (the layout's ``rewrite_module``: down_proj / c_proj / fc_out) is kept;
2. *corrupted*: Gaussian noise N(0, ν²) added to the input embeddings at the subject's tokens only, ν = 3 × the
   standard deviation of the embeddings of the records' subject tokens; p_corr;
3. *corrupted-with-restoration*: corrupted, but at the subject's last token the clean MLP outputs are put back
   in a window of W consecutive layers centred on layer l; p_rest(l).

Indirect effect IE(l) = p_rest(l) − p_corr, total effect TE = p_clean − p_corr, both averaged over K noise
draws and over the records. One record's K corrupted rows and K × n_layers restored rows run as a batch of
copies of the prompt (``batch_size`` rows per forward), each row with its own noise draw and restoration set.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lit_edit import checks
from lit_edit.hooks import capture_outputs, rewrite_output
from lit_edit.layouts import ModelLayout, edited_module
from lit_edit.requests import EditRequest
from lit_edit.tokens import encode_prompt, target_ids

TRACE_DATASETS = ("counterfact", "world")  # readers that give CounterFact-schema records (target_true)
NOISE_FACTOR = 3.0  # ROME §2.1: ν = 3 σ


class TraceError(ValueError):
    """A setting or record the trace cannot use; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Prompts, windows, noise
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TracePrompt:
    """One record's prompt as token ids, its subject's token span [first, last] and the true object's first token."""

    case_id: Any
    ids: list[int]
    subject_first: int
    subject_last: int
    target: int

    @property
    def subject_span(self) -> tuple[int, int]:
        return self.subject_first, self.subject_last


def encode_trace_prompt(tok, request: EditRequest) -> TracePrompt:
    """Tokenise ``request.prompt.format(subject)`` with the package's exact subject positions (lit_edit/tokens.py,
    docs/algorithms.md §1.3) and take the first token of ``" " + target_true`` (§1.5) as the object o."""
    if not request.target_true or not request.target_true.strip():
        raise TraceError(f"record case_id={request.case_id!r} has no target_true: causal tracing needs the true "
                         f"object of a CounterFact-schema record")
    first = encode_prompt(tok, request.prompt, request.subject, "subject_first")
    last = encode_prompt(tok, request.prompt, request.subject, "subject_last")
    target = target_ids(tok, request.target_true)
    if not target:
        raise TraceError(f"record case_id={request.case_id!r}: target_true {request.target_true!r} has no tokens")
    return TracePrompt(request.case_id, first.ids, first.index, last.index, target[0])


def window_layers(center: int, window: int, n_layers: int) -> range:
    """The W layers restored for the point ``center``, clipped to [0, n_layers): as ROME's code
    (``trace_important_window``), ``range(center − W//2, center + ⌈W/2⌉)``, so W = 10 restores l−5 … l+4 and
    W = 1 restores l alone."""
    return range(max(0, center - window // 2), min(n_layers, center + (window + 1) // 2))


def embedding_std(model: nn.Module, prompts: Sequence[TracePrompt]) -> float:
    """The standard deviation σ of the input-embedding *outputs* (``model.get_input_embeddings()``, which for
    Gemma 3 includes its √d scale) at the subject tokens of ``prompts``, over all their entries: ROME's code
    (``collect_embedding_std``) takes it over the subjects' embeddings. ν = 3 σ (ROME §2.1)."""
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    ids = [torch.tensor(p.ids[p.subject_first:p.subject_last + 1], device=dev) for p in prompts]
    if not ids:
        raise TraceError("no records to estimate the embedding noise level from")
    with torch.no_grad():
        values = emb(torch.cat(ids)[None])[0].double()
    return float(values.std()) if values.numel() > 1 else 0.0


def noise_draws(prompt: TracePrompt, draws: int, hidden: int, std: float, seed: int, index: int) -> torch.Tensor:
    """``[draws, n_subject_tokens, hidden]`` float32 Gaussian noise of standard deviation ``std``, from a generator
    seeded by (seed, the record's index in the stream): a record's draws depend on neither the other records, nor
    which of them were skipped, nor the batch size. Every restoration layer of a draw sees the same noise (as ROME's
    code, which re-seeds for each restored state)."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1
    gen = torch.Generator().manual_seed(state)
    span = prompt.subject_last - prompt.subject_first + 1
    return torch.randn((draws, span, hidden), generator=gen, dtype=torch.float32) * std


# --------------------------------------------------------------------------------------------------------------
# Hooks and forwards
# --------------------------------------------------------------------------------------------------------------


def mlp_modules(model: nn.Module, layout: ModelLayout) -> list[nn.Module]:
    """The MLP output module of every layer: the layout's ``rewrite_module`` (the MLP's output projection; its
    output is the MLP's contribution to the residual stream, dropout being off in eval)."""
    return [edited_module(model, layout, layer) for layer in range(layout.n_layers(model))]


@contextmanager
def corrupted(model: nn.Module, layout: ModelLayout, subject: tuple[int, int], noise: torch.Tensor | None,
              restore: torch.Tensor | None = None, token: int | None = None,
              clean_mlp: Sequence[torch.Tensor] | None = None):
    """Forwards of R copies of one prompt inside the ``with`` are corrupted and restored row by row.

    ``noise``: ``[R, n_subject_tokens, d]`` added to the embedding output at the subject's tokens
    ``subject = (first, last)`` (ROME §2.1, the corrupted run); ``None`` adds nothing. ``restore``: ``[R, n_layers]``
    bool; where true, layer l's MLP output at position ``token`` is replaced by ``clean_mlp[l][token]`` (the clean
    run's, ``[T, d]``; the restored run). Built on :func:`lit_edit.hooks.rewrite_output`."""
    first, last = subject
    with ExitStack() as stack:
        if noise is not None:
            def add_noise(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[:, first:last + 1] += noise.to(device=h.device, dtype=h.dtype)
                return h
            stack.enter_context(rewrite_output(model.get_input_embeddings(), add_noise))
        if restore is not None:
            if token is None or clean_mlp is None:
                raise ValueError("restore needs the token and the clean MLP outputs")
            for layer, module in enumerate(mlp_modules(model, layout)):
                rows = restore[:, layer]
                if not bool(rows.any()):
                    continue

                def put_back(h: torch.Tensor, rows=rows, value=clean_mlp[layer][token]) -> torch.Tensor:
                    h = h.clone()
                    h[rows.to(h.device), token] = value.to(device=h.device, dtype=h.dtype)
                    return h
                stack.enter_context(rewrite_output(module, put_back))
        yield


def _last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of each row of ``ids`` (all rows one prompt, unpadded). The LM head runs on
    the last position only where the model accepts ``logits_to_keep``."""
    mask = torch.ones_like(ids)
    try:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits[:, -1]


def _probs_dtype(model: nn.Module) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


@torch.no_grad()
def clean_run(model: nn.Module, layout: ModelLayout, prompt: TracePrompt) -> tuple[float, bool, list[torch.Tensor]]:
    """Step 1: (p_clean, whether o is the argmax, the clean MLP output ``[T, d]`` of every layer)."""
    mlps = mlp_modules(model, layout)
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=dev)
    with capture_outputs(dict(enumerate(mlps))) as store:
        logits = _last_logits(model, ids)[0].to(_probs_dtype(model))
    probs = torch.softmax(logits, -1)
    clean = [store[layer][0][0].detach() for layer in range(len(mlps))]
    return float(probs[prompt.target]), int(logits.argmax()) == prompt.target, clean


@torch.no_grad()
def corrupted_runs(model: nn.Module, layout: ModelLayout, prompt: TracePrompt, clean_mlp: Sequence[torch.Tensor],
                   noise: torch.Tensor, window: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 for one record: ``p_corr [K]`` (one per noise draw) and ``p_rest [n_layers, K]``.

    Rows: K corrupted ones, then for each layer l the K draws restored over ``window_layers(l, W, n)`` at the
    subject's last token; ``batch_size`` rows per forward (the result does not depend on it)."""
    n = len(clean_mlp)
    k = noise.shape[0]
    rows = k + n * k
    draw = torch.arange(rows) % k
    restore = torch.zeros((rows, n), dtype=torch.bool)
    for layer in range(n):
        restore[k + layer * k:k + (layer + 1) * k, list(window_layers(layer, window, n))] = True
    dev = next(model.parameters()).device
    p = torch.empty(rows, dtype=torch.float64)
    ids = torch.tensor(prompt.ids, device=dev)
    for start in range(0, rows, batch_size):
        stop = min(rows, start + batch_size)
        with corrupted(model, layout, prompt.subject_span, noise[draw[start:stop]].to(dev), restore[start:stop],
                       prompt.subject_last, clean_mlp):
            logits = _last_logits(model, ids[None].expand(stop - start, -1)).to(_probs_dtype(model))
        p[start:stop] = torch.softmax(logits, -1)[:, prompt.target].double().cpu()
    return p[:k], p[k:].view(n, k)


# --------------------------------------------------------------------------------------------------------------
# The trace over a stream of records
# --------------------------------------------------------------------------------------------------------------


def causal_trace(model: nn.Module, tok, layout: ModelLayout, requests: Sequence[EditRequest], *,
                 noise_draws_per_record: int = 10, window: int = 10, seed: int = 0,
                 min_p_clean: float | None = None, noise_factor: float = NOISE_FACTOR,
                 noise_std: float | None = None, batch_size: int = 256,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """The MLP indirect-effect curve of ``model`` on ``requests`` (ROME §2.1; module docstring).

    A record is used when the model knows it: with ``min_p_clean=None`` when o is the argmax of the clean run,
    otherwise when p_clean ≥ ``min_p_clean``. ``noise_std`` (ν) overrides ``noise_factor`` × σ (:func:`embedding_std`).
    Returns the content of ``trace.json`` less the model name: per-layer ``ie`` (mean over used records of
    mean_k p_rest − mean_k p_corr), ``ie_over_te`` (``ie`` / ``te``; None when te = 0), ``te``, mean ``p_clean`` /
    ``p_corr``, counts, settings, and ``records`` (per record: p_clean, whether used, p_corr and its ie list)."""
    checks.integer("--noise_draws", noise_draws_per_record, ge=1)
    checks.integer("--window", window, ge=1)
    checks.integer("--seed", seed)
    checks.integer("--batch_size", batch_size, ge=1)
    checks.number("--noise_factor", noise_factor, ge=0)
    if min_p_clean is not None:
        checks.number("--min_p_clean", min_p_clean, ge=0, le=1)
    if noise_std is not None:
        checks.number("noise_std", noise_std, ge=0)
    prompts = [encode_trace_prompt(tok, r) for r in requests]
    if not prompts:
        raise TraceError("no records to trace (data.limit / --limit / data.offset leave none)")
    n = layout.n_layers(model)
    sigma = embedding_std(model, prompts) if noise_std is None else None
    nu = noise_std if noise_std is not None else noise_factor * sigma
    hidden = model.get_input_embeddings().weight.shape[1]
    records, ie_rows, p_clean_used, p_corr_used = [], [], [], []
    for index, (request, prompt) in enumerate(zip(requests, prompts)):
        p_clean, top1, clean = clean_run(model, layout, prompt)
        used = top1 if min_p_clean is None else p_clean >= min_p_clean
        entry: dict[str, Any] = {"case_id": request.case_id, "prompt": request.filled_prompt,
                                 "subject": request.subject, "target_true": request.target_true,
                                 "p_clean": p_clean, "top1": top1, "used": bool(used)}
        if used:
            noise = noise_draws(prompt, noise_draws_per_record, hidden, nu, seed, index)
            p_corr, p_rest = corrupted_runs(model, layout, prompt, clean, noise, window, batch_size)
            ie = (p_rest.mean(1) - p_corr.mean()).tolist()
            entry.update(p_corr=float(p_corr.mean()), ie=ie)
            ie_rows.append(ie)
            p_clean_used.append(p_clean)
            p_corr_used.append(float(p_corr.mean()))
        records.append(entry)
        if progress is not None:
            progress(index + 1, len(prompts))
    if not ie_rows:
        rule = "predicts target_true as its top-1 token" if min_p_clean is None else f"has p_clean >= {min_p_clean}"
        raise TraceError(f"the model {rule} for none of the {len(prompts)} records: nothing to trace "
                         f"(lower --min_p_clean, or check model.model against data.path)")
    ie = np.mean(np.array(ie_rows), axis=0).tolist()
    p_clean_mean, p_corr_mean = float(np.mean(p_clean_used)), float(np.mean(p_corr_used))
    te = p_clean_mean - p_corr_mean
    return {
        "layers": list(range(n)),
        "ie": ie,
        "ie_over_te": [v / te for v in ie] if te != 0 else None,
        "te": te,
        "p_clean": p_clean_mean,
        "p_corr": p_corr_mean,
        "peak_layer": int(np.argmax(ie)),
        "n_records": len(ie_rows),
        "n_skipped": len(prompts) - len(ie_rows),
        "noise_std": nu,
        "embedding_std": sigma,
        "noise_factor": noise_factor if noise_std is None else None,
        "window": window,
        "noise_draws": noise_draws_per_record,
        "seed": seed,
        "min_p_clean": min_p_clean,
        "records": records,
    }


# --------------------------------------------------------------------------------------------------------------
# Figure, files, command line
# --------------------------------------------------------------------------------------------------------------


def trace_figure(result: dict, model_name: str, edited_layers: Sequence[int] | None = None):
    """Indirect effect per layer, the peak marked; the config's ``model.layers`` shaded
    (:func:`lit_edit.figures.trace_curve`)."""
    from lit_edit import figures

    return figures.trace_curve(result, model_name, edited_layers)


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / "trace" / (re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model")


def write_outputs(result: dict, model_name: str, out: Path, edited_layers: Sequence[int] | None = None) -> None:
    """``trace.json``, ``trace.png`` and the figure in TensorBoard (``trace/mlp_indirect_effect``) under ``out``."""
    from torch.utils.tensorboard import SummaryWriter

    from lit_edit import figures
    from lit_edit.runs import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "trace.json", json.dumps({"model": model_name, **result}, indent=1, default=str) + "\n")
    fig = trace_figure(result, model_name, edited_layers)
    atomic_write(out / "trace.png", lambda f: fig.savefig(f, format="png", dpi=figures.DPI))
    writer = SummaryWriter(str(out))
    try:
        figures.log_figure(writer, "trace/mlp_indirect_effect", fig, 0)
        for layer, value in zip(result["layers"], result["ie"]):
            writer.add_scalar("trace/mlp_indirect_effect_by_layer", value, layer)
    finally:
        writer.close()


def format_table(result: dict) -> str:
    ratios = result["ie_over_te"] or [math.nan] * len(result["ie"])
    lines = ["layer        IE     IE/TE"]
    for layer, value, ratio in zip(result["layers"], result["ie"], ratios):
        mark = "  <- peak" if layer == result["peak_layer"] else ""
        lines.append(f"{layer:5d}  {value:8.4f}  {ratio:8.3f}{mark}")
    lines.append(f"peak layer {result['peak_layer']}; p_clean {result['p_clean']:.4f}, p_corr {result['p_corr']:.4f}, "
                 f"TE {result['te']:.4f}; {result['n_records']} records used, {result['n_skipped']} skipped; "
                 f"noise std {result['noise_std']:.4g}")
    return "\n".join(lines)


_OVERRIDES = {  # option -> (config section, key, type)
    "--model.model": ("model", "model", str),
    "--model.dtype": ("model", "dtype", str),
    "--model.trust_remote_code": ("model", "trust_remote_code", "bool"),
    "--data.dataset": ("data", "dataset", str),
    "--data.path": ("data", "path", str),
    "--data.split": ("data", "split", str),
    "--data.offset": ("data", "offset", int),
    "--data.limit": ("data", "limit", int),
    "--data.on_invalid": ("data", "on_invalid", str),
}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py trace", allow_abbrev=False,
        description="Causal tracing (ROME §2.1): the indirect effect of restoring each layer's MLP output at the "
                    "subject's last token, for the config's model and CounterFact-schema records "
                    "(docs/algorithms.md §13).")
    p.add_argument("--config", default=None, help="a run config (its model.* and data.*); default configs/default.yaml")
    p.add_argument("--limit", type=int, default=None, help="trace the first N records (after data.offset, at most data.limit)")
    p.add_argument("--noise_draws", type=int, default=10, help="noise samples per record (K, default 10)")
    p.add_argument("--window", type=int, default=10, help="layers restored around each layer (W, default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--min_p_clean", type=float, default=None,
                   help="use records with p_clean >= this (default: those whose true object is the top-1 token)")
    p.add_argument("--noise_factor", type=float, default=NOISE_FACTOR, help="ν = factor × embedding std (default 3)")
    p.add_argument("--batch_size", type=int, default=256, help="rows (prompt copies) per forward")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--out", default=None, help="output directory (default runs/trace/<model name>)")
    for option, (section, key, kind) in _OVERRIDES.items():
        p.add_argument(option, dest=f"{section}__{key}", metavar=key.upper(), default=None,
                       type=_bool if kind == "bool" else kind,
                       help=f"overrides the config's {section}.{key}")
    return p


def _settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """The config's ``model`` and ``data`` sections (``base:`` resolved) with the command line's overrides."""
    from lit_edit.cli import DEFAULT_CONFIG, load_config

    path = args.config or DEFAULT_CONFIG
    cfg = load_config(path)
    sections = {}
    for name in ("model", "data"):
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise TraceError(f"{name} in {path} must be a mapping, got {type(section).__name__}")
        sections[name] = dict(section)
    for section, key, _ in _OVERRIDES.values():
        value = getattr(args, f"{section}__{key}")
        if value is not None:
            sections[section][key] = value
    return sections["model"], sections["data"]


def _check_data(data: dict) -> dict:
    """data.* with the data module's defaults (lit_edit.data.EditDataModule), checked."""
    data = {"dataset": "world", "path": "world", "split": "train", "offset": 0, "limit": None, "on_invalid": "raise",
            **data}
    if data["dataset"] not in TRACE_DATASETS:
        raise TraceError(f"data.dataset must be one of {TRACE_DATASETS} (CounterFact-schema records with a "
                         f"target_true) for causal tracing, got {data['dataset']!r}")
    checks.integer("data.offset", data["offset"], ge=0)
    if data["limit"] is not None:
        checks.integer("data.limit", data["limit"], ge=0)
    return data


def read_trace_requests(data: dict, limit: int | None = None) -> list[EditRequest]:
    """Requests ``offset .. offset + limit`` of the stream, as the data module reads them; then the first ``limit``."""
    from lit_edit.data import read_requests

    data = _check_data(data)
    if limit is not None:
        checks.integer("--limit", limit, ge=1)
    count = data["limit"] if limit is None else limit if data["limit"] is None else min(limit, data["limit"])
    end = None if count is None else data["offset"] + count
    requests = read_requests(data["dataset"], data["path"], split=data["split"], limit=end,
                             on_invalid=data["on_invalid"])
    return requests[data["offset"]:end]


def run_trace(args: argparse.Namespace) -> dict:
    from lit_edit.layouts import get_layout
    from lit_edit.models import load_model

    model_cfg, data = _settings(args)
    # the checks that need no model first, so that a bad option stops before a model is loaded
    checks.integer("--noise_draws", args.noise_draws, ge=1)
    checks.integer("--window", args.window, ge=1)
    checks.integer("--batch_size", args.batch_size, ge=1)
    requests = read_trace_requests(data, args.limit)
    name = model_cfg.get("model", "world")
    dtype = model_cfg.get("dtype", "float32")
    if not isinstance(name, str) or not name:
        raise TraceError(f"model.model must be a model name or path, got {name!r}")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise TraceError(f"model.dtype must be a torch dtype name (float32, bfloat16, ...), got {dtype!r}")
    model, tok, _ = load_model(name, dtype, bool(model_cfg.get("trust_remote_code", False)))
    try:
        layout = get_layout(model, model_cfg.get("layout"))
    except ValueError as err:
        raise TraceError(f"model.layout: {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval().requires_grad_(False)
    print(f"causal trace of {name}: {len(requests)} records, {layout.n_layers(model)} layers, window {args.window}, "
          f"{args.noise_draws} noise draws, on {device}", flush=True)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {done}/{total} records", flush=True)

    result = causal_trace(model, tok, layout, requests, noise_draws_per_record=args.noise_draws, window=args.window,
                          seed=args.seed, min_p_clean=args.min_p_clean, noise_factor=args.noise_factor,
                          batch_size=args.batch_size, progress=progress)
    out = Path(args.out) if args.out else default_out_dir(name)
    edited = model_cfg.get("layers")
    write_outputs(result, name, out, edited if isinstance(edited, list) else None)
    print(format_table(result))
    print(f"wrote {out / 'trace.json'}, {out / 'trace.png'} and TensorBoard events (tensorboard --logdir {out})")
    return result


def main(argv: list[str] | None = None) -> dict:
    """``python train.py trace ...``: errors in the settings, the config or the data exit with status 2 and a
    message naming the setting, file or record."""
    from lit_edit.cli import ConfigBaseError
    from lit_edit.data import EditDataError
    from lit_edit.requests import EditRequestError
    try:  # model.model that no source provides (lit_edit/sources.py, where present)
        from lit_edit.sources import ModelSourceError
    except ImportError:
        ModelSourceError = TraceError

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_trace(args)
    except (TraceError, ConfigBaseError, EditDataError, EditRequestError, ModelSourceError, FileNotFoundError,
            NotADirectoryError) as err:
        parser.error(str(err))
    except ValueError as err:  # the package's checks: "<setting> must be ..., got ..."
        if " must be " not in str(err):
            raise
        parser.error(str(err))
