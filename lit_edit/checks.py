"""Construction-time checks of configuration values: one place for the rules and their wording.

Every check raises ``ValueError("<name> must be <rule>, got <value>[ (<note>)]")``, where ``name`` is the setting
as the user writes it (``model.method.init_args.v_lr``, ``solver AlphaEdit: L2``) and ``note`` an optional pointer (the
setting's YAML path). Booleans never pass as numbers (``True`` is an ``int`` to Python); an ``int`` passes where
a real number is expected. The checks return the value unchanged.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def _fail(name: str, rule: str, value: Any, note: str | None) -> ValueError:
    return ValueError(f"{name} must be {rule}, got {value!r}" + (f" ({note})" if note else ""))


def _bounds(gt=None, ge=None, lt=None, le=None) -> str:
    lo = "(" if gt is not None else "[" if ge is not None else None
    hi = ")" if lt is not None else "]" if le is not None else None
    a = gt if gt is not None else ge
    b = lt if lt is not None else le
    if lo and hi:
        return f" in {lo}{a:g}, {b:g}{hi}"
    if lo:
        return f" {'>' if lo == '(' else '>='} {a:g}"
    if hi:
        return f" {'<' if hi == ')' else '<='} {b:g}"
    return ""


def number(name: str, value: Any, *, gt=None, ge=None, lt=None, le=None, note: str | None = None):
    """A finite real number (not a bool) within the given bounds."""
    rule = "a finite number" + _bounds(gt, ge, lt, le)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _fail(name, rule, value, note)
    if ((gt is not None and not value > gt) or (ge is not None and not value >= ge)
            or (lt is not None and not value < lt) or (le is not None and not value <= le)):
        raise _fail(name, rule, value, note)
    return value


def integer(name: str, value: Any, *, ge=None, le=None, note: str | None = None):
    """An integer (not a bool, not a float such as 2.0) within the given bounds."""
    rule = "an integer" + _bounds(ge=ge, le=le)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, rule, value, note)
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise _fail(name, rule, value, note)
    return value


def _show(x) -> str:
    return "null" if x is None else repr(x)  # None is written null in the YAML configs


def choice(name: str, value: Any, allowed: Iterable, *, note: str | None = None):
    """One of ``allowed`` (compared with ``==``; a bool never matches an int option)."""
    allowed = tuple(allowed)
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed) or value not in allowed:
        raise _fail(name, "one of " + ", ".join(_show(a) for a in allowed), value, note)
    return value


def boolean(name: str, value: Any, *, note: str | None = None):
    """``True`` or ``False`` (not 0/1, not the string "false")."""
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value, note)
    return value


def text(name: str, value: Any, *, optional: bool = False, note: str | None = None):
    """A non-empty string (or None when ``optional``)."""
    if optional and value is None:
        return value
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, "a non-empty string" + (" or null" if optional else ""), value, note)
    return value


def subject_template(name: str, value: Any, *, note: str | None = None):
    """A prompt with exactly one ``{}`` for the subject, the text before it empty or ending with a space (the
    fact-token rule, as :meth:`lit_edit.requests.EditRequest.validate` checks the prompts)."""
    rule = "a string with exactly one '{}' for the subject, the text before it empty or ending with a space"
    if not isinstance(value, str) or value.count("{}") != 1:
        raise _fail(name, rule, value, note)
    prefix = value.split("{}")[0]
    if prefix and not prefix.endswith(" "):
        raise _fail(name, rule, value, note)
    return value


def corpus(prefix: str, dataset, config_name, split, text_field, n_samples) -> None:
    """A text corpus read through ``datasets`` (C0's, the monitor's drift text): its settings under ``prefix``."""
    text(f"{prefix}.dataset", dataset, optional=True)
    text(f"{prefix}.config_name", config_name, optional=True)
    text(f"{prefix}.split", split)
    text(f"{prefix}.text_field", text_field)
    integer(f"{prefix}.n_samples", n_samples, ge=1)


PROTOCOLS = ("sequential", "immediate", "independent")  # docs/metrics.md, "Protocols"


def edit_module_args(model, layers, dtype, context_templates, context_seed, eval_every_n_steps,
                      sync_check_every_n_steps, allow_changed, protocol="sequential") -> None:
    """EditModule's own settings, refused at construction with the YAML name (lit_edit.checks)."""
    text("model.model", model)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"model.layers must be a non-empty list of block indices, got {layers!r}")
    for i, l in enumerate(layers):
        integer(f"model.layers[{i}]", l, ge=0)
    if len(set(layers)) != len(layers):
        raise ValueError(f"model.layers must not repeat a layer, got {list(layers)}")
    choice("model.dtype", dtype, ("float32", "float64", "bfloat16", "float16"))
    for i, spec in enumerate(context_templates):
        if not isinstance(spec, (list, tuple)) or len(spec) != 2:
            raise ValueError(f"model.context_templates[{i}] must be [length, count], got {spec!r}")
        integer(f"model.context_templates[{i}][0] (length in tokens)", spec[0], ge=1)
        integer(f"model.context_templates[{i}][1] (count)", spec[1], ge=0)
    integer("model.context_seed", context_seed, ge=0)
    integer("model.eval_every_n_steps", eval_every_n_steps, ge=0)
    integer("model.sync_check_every_n_steps", sync_check_every_n_steps, ge=0)
    choice("model.protocol", protocol, PROTOCOLS)
    for i, name in enumerate(allow_changed):
        text(f"model.allow_changed[{i}]", name)
