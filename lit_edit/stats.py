"""Second moment C0 = E[k kᵀ] of each edited layer's keys over a text corpus (docs/algorithms.md §3).

Texts are streamed (never loaded whole), truncated to ``max_length`` tokens, packed into forward
passes of at most ``batch_tokens`` tokens; every non-padding token contributes one key; the sum is
accumulated in float64 and divided by the token count (uncentred, as the reference). The result is
cached on disk per (model, layer, corpus, sample count, length cap, dtype) and reused.

``npz`` reads published statistics instead: the ``.npz`` files the ROME/MEMIT/AlphaEdit code writes
(``layer_stats``: a ``CombinedStat`` holding a ``SecondMoment`` under the name ``mom2``, saved as the
arrays ``mom2.count``, the number of tokens, and ``mom2.mom2``, the *sum* Σ k kᵀ over them, so
C0 = mom2.mom2 / mom2.count; :func:`read_npz_stats`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from lit_edit import checks
from lit_edit.hooks import capture_inputs, stop_after
from lit_edit import distributed as dist
from lit_edit.layouts import edited_module, weight_shape
from lit_edit.progress import track
from lit_edit.solver_state import C0Files
from lit_edit.tokens import context_length, pad_batch, pad_id

STAT_DTYPES = ("float32", "float64", "bfloat16", "float16")  # the cached statistic's; torch dtype names


DEFAULT_DATASET = "world"  # the corpus of a model that is not the fact world, when model.stats.dataset is unset


@dataclass
class StatsConfig:
    # "world[:preset]" (the fact world's own text), "self" (texts sampled from the edited model itself, for a model
    # whose corpus cannot be had; see sample_texts), a local .txt/.json(l) file, or a hub id; None: see for_model
    dataset: str | None = None
    config_name: str | None = None  # hub config, e.g. "20231101.en" for "wikimedia/wikipedia"
    split: str = "train"
    text_field: str = "text"
    n_samples: int = 100000  # number of texts (articles), as mom2_n_samples in the reference
    max_length: int = 1024  # per-text token cap (also capped by the model's context)
    batch_tokens: int = 8192  # tokens per forward pass
    dtype: str = "float32"  # dtype of the cached statistic (accumulation is always float64)
    shuffle_seed: int | None = 1  # hub corpora: a fixed pseudo-random subset (reference: seed 1); "self": the sampling seed
    sample_length: int = 128  # "self": tokens sampled per text (the texts end earlier where the model ends them)
    # published statistics in the ROME/MEMIT/AlphaEdit layer_stats .npz format instead of a corpus: a directory
    # (searched for "<edited module>_*.npz" of every edited layer), or a file path with {} for the layer index
    npz: str | None = None

    def __post_init__(self):
        n = lambda field: f"model.stats.{field}"  # noqa: E731  (the setting as written in the YAML config)
        checks.corpus("model.stats", self.dataset, self.config_name, self.split, self.text_field, self.n_samples)
        checks.integer(n("max_length"), self.max_length, ge=1)
        checks.integer(n("batch_tokens"), self.batch_tokens, ge=1)
        checks.integer(n("sample_length"), self.sample_length, ge=1)
        checks.choice(n("dtype"), self.dtype, STAT_DTYPES)
        if self.shuffle_seed is not None:  # null: the corpus order (numpy seeds are >= 0)
            checks.integer(n("shuffle_seed"), self.shuffle_seed, ge=0)
        checks.text(n("npz"), self.npz, optional=True)

    def for_model(self, model: str) -> StatsConfig:
        """This config with ``dataset`` resolved for the edited ``model`` (``model.model``): unset (None) means the
        model's own corpus when the model is the built-in fact world (``world`` / ``world:<preset>``), else the
        default corpus, ``"world"``. A dataset that is set is kept. ``EditModule`` calls this once, when built, so
        its hyper-parameters, checkpoints and the C0 cache key all hold the resolved name."""
        from lit_edit.data import is_world_spec

        if self.dataset is not None:
            return self
        return replace(self, dataset=model if is_world_spec(model) else DEFAULT_DATASET)


def cache_root(cache_dir: str | None = None) -> Path:
    from lit_edit.world.cache import cache_root as root

    return root(cache_dir)


def iter_texts(cfg: StatsConfig) -> Iterator[str]:
    """Stream the corpus through HF ``datasets`` (:func:`lit_edit.data.files.iter_texts`); yields at most
    ``n_samples`` non-empty texts. ``world[:preset]`` is the world's own ``corpus.txt``."""
    from lit_edit.data.files import iter_texts as corpus_texts

    src = cfg.dataset
    if src.startswith("world"):
        from lit_edit.world import ensure_world, resolve_world_name

        src = str(ensure_world(resolve_world_name(src)) / "corpus.txt")
    yield from corpus_texts(src, cfg.text_field, cfg.n_samples, config_name=cfg.config_name, split=cfg.split,
                            shuffle_seed=cfg.shuffle_seed, settings="model.stats")


SELF = "self"  # model.stats.dataset: texts sampled from the edited (unedited) model itself
SAMPLE_BATCH = 64  # texts generated per call of generate(): on a CPU, 64 rows cost little more per step than 16


@torch.no_grad()
def sample_texts(model, tok, n: int, length: int, seed: int | None) -> list[str]:
    """``n`` texts sampled from ``model`` itself: plain ancestral sampling (temperature 1, no top-k / top-p cut, so
    the texts follow the model's own distribution, whose keys C0 is meant to describe), ``length`` new tokens each
    from the tokenizer's start of text (its BOS, else its EOS as a separator), ``SAMPLE_BATCH`` at a time. Seeded
    (torch's generator forked, so the caller's random state is untouched); the same seed, model and batch size give
    the same texts on the same kind of device."""
    dev = next(model.parameters()).device
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ValueError("model.stats.dataset 'self': the tokenizer has neither a BOS nor an EOS token to start from")
    out: list[str] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0 if seed is None else seed)
        for i in track(range(0, n, SAMPLE_BATCH), total=-(-n // SAMPLE_BATCH), unit="batch",
                       desc=f"sampling {n} C0 texts from the model", disable=dist.rank() != 0):
            b = min(SAMPLE_BATCH, n - i)
            ids = torch.full((b, 1), start, dtype=torch.long, device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=length, pad_token_id=tok.pad_token_id or start)
            out += [t.strip() for t in tok.batch_decode(gen[:, 1:], skip_special_tokens=True)]
    return out


def self_texts(model, tok, cfg: StatsConfig, folder: Path) -> list[str]:
    """The ``self`` corpus: ``texts.jsonl`` beside the statistics (kept, so the texts can be read and reused as a
    local corpus), sampled on rank 0 the first time (:func:`sample_texts`) and handed to every rank."""
    path = folder / "texts.jsonl"
    texts = None
    if dist.rank() == 0:
        if path.is_file():
            texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        else:
            texts = sample_texts(model, tok, cfg.n_samples, cfg.sample_length, cfg.shuffle_seed)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
            tmp.replace(path)
    texts = dist.broadcast_object(texts)
    return [t for t in texts if t]


def compute_second_moments(model, tok, layout, layers: list[int], texts, max_length: int, batch_tokens: int):
    """Σ k kᵀ / N per layer in float64 over all real tokens of ``texts``. Returns ({layer: C0}, N).

    Under DDP each rank takes every world-th text and the sums and the token count are all-reduced, so every
    rank gets the statistic of the whole corpus (the same up to float64 summation order)."""
    dev = next(model.parameters()).device
    mods = {l: edited_module(model, layout, l) for l in layers}
    d_in = {l: weight_shape(model, layout, l)[1] for l in layers}
    sums = {l: torch.zeros(d_in[l], d_in[l], device=dev, dtype=torch.float64) for l in layers}
    count = 0
    cap = min(max_length, context_length(model) or max_length)

    def run(batch):
        nonlocal count
        ids, mask = pad_batch(batch, pad_id(tok))
        with capture_inputs(mods) as store, torch.no_grad(), stop_after(mods[max(layers)]):
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        real = mask.bool().to(dev)
        for l in layers:
            k = store[l][0][real].double()
            sums[l] += k.T @ k
        count += int(real.sum())

    batch, tokens = [], 0
    world, me = dist.world_size(), dist.rank()
    for i, text in enumerate(texts):
        if i % world != me:
            continue
        ids = tok(text, truncation=True, max_length=cap)["input_ids"]
        if not ids:
            continue
        batch.append(ids)
        tokens += len(ids)
        if tokens >= batch_tokens:
            run(batch)
            batch, tokens = [], 0
    if batch:
        run(batch)
    sums = {l: dist.all_reduce_sum(sums[l]) for l in layers}
    count = int(dist.all_reduce_sum(torch.tensor(count, device=dev)))
    if count == 0:
        raise ValueError("the statistics corpus yielded no tokens")
    return {l: sums[l] / count for l in layers}, count


@torch.no_grad()
def weights_fingerprint(model, stride: int = 4099) -> str:
    """sha1 over a strided sample (every ``stride``-th element) of every parameter's bytes.

    Cheap (≈1/4099 of the weights leave the device) and exact: any edit of a matrix changes the
    sampled entries, so statistics of an *edited* model never reuse the unedited model's cache.
    """
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        sample = p.detach().reshape(-1)[::stride].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def npz_stats_file(source: str, module_name: str, layer: int) -> Path:
    """The published statistics file of one layer: ``source`` with ``{}`` filled by the layer index, or the one
    ``<module_name>_*.npz`` under the directory ``source`` (the reference names them
    ``<model>/<corpus>_stats/<module>_<precision>_mom2_<samples>.npz``)."""
    if "{}" in source:
        path = Path(source.format(layer)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.stats.npz: no statistics file {path} for layer {layer}")
        return path
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model.stats.npz: {root} is neither a directory nor a file path with {{}} for the "
                                f"layer index")
    found = sorted(p for p in root.rglob(f"{module_name}_*.npz") if "mom2" in p.name)
    if len(found) != 1:
        raise FileNotFoundError(f"model.stats.npz: expected one '{module_name}_*mom2*.npz' under {root} for layer "
                                f"{layer}, found {[str(p) for p in found] or 'none'}; give a file path with {{}} "
                                f"for the layer index instead")
    return found[0]


class NpzStatsError(ValueError):
    """A ``model.stats.npz`` file that is not a readable ``layer_stats`` second moment."""


def read_npz_stats(path: Path, d_in: int) -> tuple[torch.Tensor, int]:
    """C0 (float64) and the token count from a ``layer_stats`` .npz: ``mom2.mom2`` is the sum Σ k kᵀ over
    ``mom2.count`` tokens (runningstats.SecondMoment keeps the sum and divides only in ``moment()``). Anything else
    raises :class:`NpzStatsError` naming the file, ``model.stats.npz`` and what is wrong. Nothing is unpickled: the
    reference stores its None values NaN-boxed, never pickled, so a file that needs pickle is not one of its files."""
    import zipfile

    import numpy as np

    def bad(what: str) -> NpzStatsError:
        return NpzStatsError(f"model.stats.npz: {path} {what}")

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise bad("is a single .npy array, not a .npz archive of a layer_stats second moment")
        with loaded as f:
            if "mom2.mom2" not in f or "mom2.count" not in f:
                raise bad(f"is not a layer_stats second-moment file (arrays {sorted(f.files)}; need 'mom2.mom2' "
                          f"and 'mom2.count')")
            total, count = (_npz_array(f, key, bad) for key in ("mom2.mom2", "mom2.count"))
    except NpzStatsError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # numpy's messages name no file
        if "pickle" in str(err).lower():  # numpy's last guess, with its advice to unpickle: not taken
            raise bad("is neither a .npz (zip) archive nor a .npy array; numpy could read it only as pickled Python "
                      "objects, which lit_edit never loads") from None
        raise bad(f"cannot be read as a .npz archive ({type(err).__name__}: {err})") from None
    if total.dtype.kind not in "fiu" or count.dtype.kind not in "iuf":
        raise bad(f"holds mom2.mom2 of dtype {total.dtype} and mom2.count of dtype {count.dtype}; both must be numbers")
    if count.size != 1 or count.reshape(-1)[0] != int(count.reshape(-1)[0]):
        raise bad(f"holds mom2.count {count.tolist()!r}; it must be one whole number (the token count)")
    count = int(count.reshape(-1)[0])
    if tuple(total.shape) != (d_in, d_in):
        raise bad(f"holds mom2.mom2 of shape {list(total.shape)}; the edited matrix takes {d_in} inputs, so it "
                  f"must be [{d_in}, {d_in}]")
    if count <= 0:
        raise bad(f"holds mom2.count {count}; it must be positive (the number of tokens summed)")
    total = torch.from_numpy(np.ascontiguousarray(total)).double()
    if not torch.isfinite(total).all():
        raise bad(f"holds {int((~torch.isfinite(total)).sum())} non-finite value(s) in mom2.mom2")
    return total / count, count


def _npz_array(f, key: str, bad):
    """One array of an open .npz; an object array (pickled) refused by name."""
    try:
        return f[key]
    except ValueError as err:
        if "object" not in str(err).lower() and "pickle" not in str(err).lower():
            raise
        raise bad(f"holds {key} as an array of Python objects (pickled), which lit_edit never loads; it must be a "
                  f"numeric array") from None


def c0_files(model, tok, layout, layers: list[int], cfg: StatsConfig, model_id: str,
             cache_dir: str | None = None) -> C0Files:
    """The cache file of C0 per layer, computing the missing ones first. The cache key covers the model id, the
    corpus config and a fingerprint of the weights (:func:`weights_fingerprint`). With ``cfg.npz`` the published
    statistics are read instead (:func:`read_npz_stats`), never computed, and kept as a temporary float64 copy."""
    if cfg.npz is not None:
        files = C0Files.spill({l: read_npz_stats(npz_stats_file(cfg.npz, layout.rewrite_module.format(l), l),
                                                 weight_shape(model, layout, l)[1])[0] for l in layers})
        files.device = next(model.parameters()).device
        return files
    if cfg.dataset is None:
        raise ValueError("model.stats.dataset is unresolved: pass StatsConfig.for_model(<model.model>)")
    # npz is unset here (computed statistics), and sample_length matters only for "self": left out otherwise, so that
    # caches written before the options existed still match
    unused = {"npz"} | ({"sample_length"} if cfg.dataset != SELF else set())
    ident = {"model": model_id, "weights": weights_fingerprint(model),
             **{k: v for k, v in asdict(cfg).items() if k not in unused}}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_id)[-80:]
    folder = cache_root(cache_dir) / "stats" / safe / f"{Path(cfg.dataset).name}_{cfg.n_samples}_{cfg.dtype}_{key}"
    path = {l: folder / f"{edited_module(model, layout, l).__class__.__name__}_layer{l}_mom2.safetensors" for l in layers}
    missing = dist.broadcast_object([l for l in layers if not path[l].exists()])  # rank 0 decides for all
    if missing:
        source = self_texts(model, tok, cfg, folder) if cfg.dataset == SELF else iter_texts(cfg)
        texts = track(source, total=cfg.n_samples, desc=f"C0 statistics, layers {missing}", unit="text",
                      disable=dist.rank() != 0, mininterval=2.0)  # the long phase of a real model's set-up
        C, n = compute_second_moments(model, tok, layout, missing, texts, cfg.max_length, cfg.batch_tokens)
        if dist.rank() == 0:  # computed in shards by every rank, cached once
            folder.mkdir(parents=True, exist_ok=True)
            for l in missing:
                tmp = path[l].with_suffix(".tmp")
                stat = C[l].to(getattr(torch, cfg.dtype)).contiguous().cpu()
                save_file({C0Files.KEY: stat, "count": torch.tensor(n)}, tmp)
                tmp.replace(path[l])
            (folder / "config.json").write_text(json.dumps({**ident, "tokens": n}, indent=2))
        dist.barrier()
    return C0Files(path, next(model.parameters()).device)


def layer_stats(model, tok, layout, layers: list[int], cfg: StatsConfig, model_id: str,
                cache_dir: str | None = None) -> dict[int, torch.Tensor]:
    """C0 per layer (float64 on the model's device), from the disk cache when present (:func:`c0_files`)."""
    return c0_files(model, tok, layout, layers, cfg, model_id, cache_dir).load_all()
