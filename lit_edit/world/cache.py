"""The on-disk cache of built worlds: one directory per spec hash, built atomically under a file lock."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import time

from lit_edit.world.generator import World, build_world
from lit_edit.world.spec import WORLD_FORMAT_VERSION, WorldSpec, _resolve_spec, spec_hash
from lit_edit.world.training import _torch_threads, _train_model, build_threads, check_tokenizer, evaluate_world, train_tokenizer


REPORT_KEYS = ("train_seconds", "n_params", "canonical_top1", "heldout_paraphrase_top1", "n_facts", "spec")


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``$LIT_EDIT_CACHE``, else ``~/.cache/lit_edit``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("LIT_EDIT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/lit_edit").expanduser()


def world_dir(spec_or_name: WorldSpec | str = "default", cache_dir=None) -> pathlib.Path:
    """Where :func:`ensure_world` keeps this world (whether or not it exists yet)."""
    name, spec = _resolve_spec(spec_or_name)
    return cache_root(cache_dir) / "world" / f"{name}-{spec_hash(spec)}"


def _complete(path: pathlib.Path) -> bool:
    rep = path / "report.json"
    if not rep.is_file() or not (path / "model").is_dir() or not (path / "counterfact.json").is_file():
        return False
    try:
        report = json.loads(rep.read_text())
    except (OSError, ValueError):
        return False
    return all(k in report for k in REPORT_KEYS)


def load_world(path: str | os.PathLike) -> World:
    """Rebuild the :class:`World` of a cached world directory (from the spec in its report)."""
    report = json.loads((pathlib.Path(path) / "report.json").read_text())
    return build_world(WorldSpec.from_dict(report["spec"]))


def ensure_world(spec_or_name: WorldSpec | str = "default", cache_dir=None, verbose: bool = True) -> pathlib.Path:
    """Return the cached world directory for ``spec_or_name``, building it first if needed.

    ``spec_or_name``: a :class:`WorldSpec`, a preset name or ``"world"``/``"world:<preset>"``.
    The directory ``<cache>/world/<name>-<hash>/`` holds ``model/`` (GPT-2 + tokenizer,
    safetensors), ``counterfact.json``, ``corpus.txt`` (one text per line) and ``report.json``.
    A complete existing directory is reused without training. Building happens in a temporary
    sibling directory renamed into place at the end, under a file lock, so concurrent callers
    train once and an interrupted run leaves no partial cache.
    """
    name, spec = _resolve_spec(spec_or_name)
    final = world_dir(spec, cache_dir) if name == "custom" else world_dir(name, cache_dir)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(final):
                return final
            if final.exists():  # incomplete leftover from an older, non-atomic writer
                shutil.rmtree(final)
            tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                _build_into(tmp, name, spec, verbose)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' info messages and progress bars (saving/loading shards) if ``quiet``."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _write_text(path: pathlib.Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _build_into(tmp: pathlib.Path, name: str, spec: WorldSpec, verbose: bool) -> None:
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = print if verbose else (lambda *a, **k: None)
    tmp.mkdir(parents=True)
    t_all = time.perf_counter()
    world = build_world(spec)
    tokenizer = train_tokenizer(world.tokenizer_texts(), spec.vocab_size, model_max_length=spec.n_positions)
    check_tokenizer(world, tokenizer)
    records = world.counterfact_records()
    _write_text(tmp / "counterfact.json", json.dumps(records, indent=1, ensure_ascii=False))
    _write_text(tmp / "corpus.txt", "\n".join(world.corpus_texts()) + "\n")
    log(f"[lit_edit.world] training fact world {name!r} ({spec.n_subjects} subjects x {spec.n_relations} relations, "
        f"{spec.n_layer}L x {spec.n_embd}) ...")
    with _torch_threads(build_threads()), _quiet_transformers(not verbose):
        model, info = _train_model(world, tokenizer, verbose=verbose)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        # measure on what was saved, exactly as users will load it
        model = AutoModelForCausalLM.from_pretrained(tmp / "model")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        metrics = evaluate_world(model, tokenizer, world)
    report = {
        "name": name,
        "spec_hash": spec_hash(spec),
        "format_version": WORLD_FORMAT_VERSION,
        **info,
        "n_params": sum(p.numel() for p in model.parameters()),
        **{k: round(v, 5) for k, v in metrics.items()},
        "n_facts": world.n_facts,
        "n_subjects": len(world.subjects),
        "n_relations": len(world.relations),
        "n_records": len(records),
        "n_training_texts": len(world.training_texts()),
        "vocab_size": len(tokenizer),
        "torch_threads": build_threads(),
        "build_seconds": round(time.perf_counter() - t_all, 2),
        "created_unix": round(time.time(), 3),
        "versions": {p: md.version(p) for p in ("torch", "lightning", "transformers", "tokenizers")},
        "spec": spec.to_dict(),
    }
    _write_text(tmp / "report.json", json.dumps(report, indent=1))  # written last: marks completeness
    log(f"[lit_edit.world] trained in {info['train_seconds']:.1f}s: canonical top-1 {metrics['canonical_top1']:.3f}, "
        f"held-out paraphrase top-1 {metrics['heldout_paraphrase_top1']:.3f}")
