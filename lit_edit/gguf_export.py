"""An edited model as one GGUF file, built from the GGUF file it was loaded from (llama.cpp, Ollama, LM Studio).

The source file's metadata is copied whole (architecture, hyper-parameters, tokenizer, chat template), and so is
every tensor the edit did not change, converted to the export type; only the edited matrices are the model's. So the
file is what llama.cpp read before, with the edit in it, and the tensor order, names and shapes are the source's.

Export types (``TYPES``):
- ``F32`` and ``F16``: every tensor dequantised from the source and stored in that type (1-D tensors, the norms,
  stay F32 in ``F16``, as llama.cpp's converter keeps them). An unedited tensor is the same in every F32 export.
- ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``: the 2-D tensors quantised with the ``gguf`` package (1-D stay F32).
- ``source``: every unedited tensor keeps the source's bytes, and an edited one is quantised to its source tensor's
  type, or, where the ``gguf`` package cannot quantise that type (the K-quants of Gemma's Q4_K_M), to the nearest
  type it can (:data:`NEAREST`), which the result names.

``edited_type`` (``model.export_gguf_edited_type``) stores the edited tensors as another of these types than the rest,
e.g. ``source`` with ``Q8_0``: every unedited tensor keeps the source's 4-bit bytes and the few edited matrices are
8-bit, which keeps an edit that a 4-bit step of those matrices would erase (docs/results.md §10.6) for a few MB.

The edited tensors are named by their transformers parameter names (e.g. ``model.layers.5.mlp.down_proj.weight``),
mapped to GGUF's (``blk.5.ffn_down.weight``) by the ``gguf`` package's own tensor-name map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "source")
# a type the gguf package reads but cannot write -> the nearest one it writes (same bits per weight or more)
NEAREST = {"Q4_K": "Q5_1", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_1", "Q2_K": "Q4_0", "BF16": "F16",
           "IQ4_NL": "Q4_1", "IQ4_XS": "Q4_1"}


class GGUFExportError(ValueError):
    """A GGUF export that cannot be written: the message names the setting or tensor and what to do."""


@dataclass
class GGUFExport:
    """What an export wrote: the file, its type, and per tensor the type it was stored in; ``edited`` are the
    tensors the model supplied (GGUF names), ``substituted`` the source types written as another (:data:`NEAREST`)."""

    path: Path
    qtype: str
    types: dict[str, str] = field(default_factory=dict)
    edited: list[str] = field(default_factory=list)
    substituted: dict[str, str] = field(default_factory=dict)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the [gguf] extra is installed by make setup
        raise GGUFExportError("a GGUF export needs the gguf package: pip install 'lit_edit[gguf]'") from e
    return gguf


def check_type(qtype: str, setting: str = "model.export_gguf_type") -> str:
    """``qtype`` if it is one of :data:`TYPES`, else an error naming the setting and the choices."""
    if qtype not in TYPES:
        raise GGUFExportError(f"{setting} {qtype!r} is not a GGUF export type; choose one of {', '.join(TYPES)}")
    return qtype


EXPORT_FORMATS = ("safetensors", "gguf")


def check_edited_type(edited_type: str | None, setting: str = "model.export_gguf_edited_type") -> str | None:
    """``edited_type`` if it is None or a type of :data:`TYPES` but ``source``, else an error naming the setting."""
    if edited_type is not None and (edited_type == "source" or edited_type not in TYPES):
        raise GGUFExportError(f"{setting} {edited_type!r} is not a type for the edited tensors; choose one of "
                              f"{', '.join(t for t in TYPES if t != 'source')}, or leave it unset (the export's type)")
    return edited_type


def check_export(model: str, export_format: str, qtype: str, edited_type: str | None = None) -> None:
    """``model.export_format`` / ``model.export_gguf_type`` at construction, before anything is loaded: a known format
    and type, and for ``gguf`` a model read from a GGUF file (a packaged model or a ``.gguf`` path), which the export
    is built from."""
    if export_format not in EXPORT_FORMATS:
        raise GGUFExportError(f"model.export_format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    check_type(qtype)
    check_edited_type(edited_type)
    if export_format == "gguf":
        from lit_edit.sources import PACKAGED

        if model not in PACKAGED and not str(model).lower().endswith(".gguf"):
            raise GGUFExportError(f"model.export_format 'gguf' builds the file from the model's source GGUF, and "
                                  f"model.model {model!r} is not read from one (a packaged model: "
                                  f"{', '.join(sorted(PACKAGED))}, or a .gguf file); export it with "
                                  f"model.export_format safetensors")


def gguf_names(source: str | os.PathLike, hf_names: list[str], reader=None) -> dict[str, str]:
    """transformers parameter name -> the source file's tensor name, by the ``gguf`` package's name map of the file's
    architecture; a name it does not map, or that the file does not hold, is an error naming it. ``reader``: the
    file already open."""
    gguf = _gguf()
    reader = gguf.GGUFReader(source) if reader is None else reader
    arch_name = reader.fields["general.architecture"].contents()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise GGUFExportError(f"{source}: architecture {arch_name!r} is unknown to the gguf package")
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    held = {t.name for t in reader.tensors}
    out = {}
    for name in hf_names:
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None or mapped not in held:
            raise GGUFExportError(f"{source}: the edited parameter {name!r} has no tensor in the file "
                                  f"(mapped to {mapped!r})")
        out[name] = mapped
    return out


def _writable(gguf, qtype) -> bool:
    """Whether the gguf package can quantise to ``qtype`` (it reads more types than it writes)."""
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        return True
    except (NotImplementedError, gguf.quants.QuantError):
        return False


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, weights: dict[str, torch.Tensor],
                qtype: str = "F16", edited_type: str | None = None) -> GGUFExport:
    """Write ``out``: the GGUF file ``source`` with the tensors ``weights`` (transformers names -> the edited values,
    in the model's orientation) replaced, every tensor stored as ``qtype`` and the edited ones as ``edited_type`` if
    given (module docstring). ``out`` is written to a temporary file beside it and renamed, so a failed export leaves
    no partial file."""
    gguf = _gguf()
    check_type(qtype, "the export type")
    check_edited_type(edited_type, "the edited tensors' type")
    source, out = Path(source), Path(out)
    if source.suffix != ".gguf" or not source.is_file():
        raise GGUFExportError(f"the GGUF export is built from the model's source GGUF file; {source} is not one "
                              f"(a model loaded from a folder or a hub id can be exported with save_pretrained)")
    reader = gguf.GGUFReader(source)
    names = gguf_names(source, list(weights), reader)
    edited = {names[k]: v.detach().to(torch.float32).cpu().numpy() for k, v in weights.items()}
    T = gguf.GGMLQuantizationType
    result = GGUFExport(out, qtype, edited=sorted(edited))
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":  # the header's own, and the writer's
                continue
            if key == "general.file_type" and qtype != "source":  # set below for the export's type
                continue
            main = f.types[0]
            sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), main, sub)
        if qtype != "source":
            file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
                qtype, getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", None))
            if file_type is not None:
                writer.add_key_value("general.file_type", int(file_type), gguf.GGUFValueType.UINT32)
        for t in reader.tensors:
            src_type = T(t.tensor_type)
            values = edited.get(t.name)
            if qtype == "source" and values is None:  # the source's bytes, as they are
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=src_type)
                result.types[t.name] = src_type.name
                continue
            if values is None:
                values = gguf.quants.dequantize(t.data, src_type)
            elif tuple(values.shape) != tuple(int(n) for n in reversed(t.shape)):  # GGUF lists dims innermost first
                raise GGUFExportError(f"the edited {t.name} has shape {tuple(values.shape)}, the source's "
                                      f"{tuple(int(n) for n in reversed(t.shape))}")
            want = _target_type(gguf, edited_type if t.name in edited and edited_type else qtype, src_type, values,
                                result, t.name)
            data = gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), want)
            if want in (T.F32, T.F16):
                writer.add_tensor(t.name, data)
            else:
                writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=want)
            result.types[t.name] = want.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GGUFExportError(f"writing the GGUF export {out} failed: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _target_type(gguf, qtype: str, src_type, values: np.ndarray, result: GGUFExport, name: str):
    """The type a tensor of ``values`` is stored as under the export type ``qtype``."""
    T = gguf.GGMLQuantizationType
    if values.ndim < 2:  # norms and biases: F32, as llama.cpp's converter keeps them
        return T.F32
    if qtype == "source":
        if src_type in (T.F32, T.F16) or _writable(gguf, src_type):
            want = src_type
        else:
            want = T[NEAREST.get(src_type.name, "Q8_0")]
            result.substituted[name] = f"{src_type.name} -> {want.name}"
    else:
        want = T[qtype]
    block = gguf.GGML_QUANT_SIZES[want][0]
    if values.shape[-1] % block:  # a row that no block of this type fits: kept in F16, as llama.cpp's converter does
        result.substituted[name] = f"{want.name} -> F16 (rows of {values.shape[-1]})"
        return T.F16
    return want
