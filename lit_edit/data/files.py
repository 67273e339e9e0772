"""Raw edit records from local JSON / JSON Lines files or the hub, through HF ``datasets``; a bad file is
named with what is wrong and where, before ``datasets`` sees it."""
from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any


class EditDataError(ValueError):
    """An edit-records source that cannot be read: names the file (or dataset id) and what is wrong with it."""


RECORD_SUFFIXES = (".json", ".jsonl")
# A hub repo id: "name" or "namespace/name", each part starting with a letter or digit (huggingface_hub's rule,
# less its length and "--"/".." limits, which only matter for telling ids from paths at the edges).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` means a local file or directory rather than a hub id.

    An existing file or directory always is one. Otherwise: an absolute path, one starting with
    ``./``, ``../`` or ``~``, or one with a path separator that is not of the hub's ``"org/name"``
    form (``"models/gpt2/"``, ``"a/b/c"``). ``"gpt2-xl"`` and ``"meta-llama/Llama-3-8B"`` are hub
    ids; so is a missing ``"models/gpt2"``, which cannot be told apart from one. The caller can then
    report a missing path as missing, instead of the hub's "Repo id must be in the form ...".
    """
    if os.path.exists(os.path.expanduser(name)):
        return True
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if name in (".", "..") or name.startswith("~") or os.path.isabs(name):
        return True
    if any(name.startswith(dots + sep) for dots in (".", "..") for sep in seps):
        return True
    # "org/name" is the hub's form; more separators, a trailing one, or characters no repo id has mean a path
    return any(sep in name for sep in seps) and _HUB_ID.fullmatch(name) is None


def _json_values(text: str, path: Path, lines: bool) -> list[tuple[str, Any]]:
    """The records of a JSON (``lines=False``) or JSON Lines text as ``(where, value)`` pairs.

    ``where`` names the record for an error: ``"record 3"`` in a JSON list, ``"line 7"`` in JSON
    Lines. A ``.json`` file may hold JSON Lines too (``datasets`` reads both), which shows as
    "Extra data" after a first complete value.
    """
    if not lines:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise EditDataError(f"edit records file {path} is not valid JSON: {err.msg} at line {err.lineno} "
                                    f"column {err.colno}") from None
        else:
            if not isinstance(value, list):
                raise EditDataError(f"edit records file {path} holds a JSON {_json_type(value)} at the top level; "
                                    f"expected a list of records (objects)")
            return [(f"record {i}", v) for i, v in enumerate(value)]
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise EditDataError(f"edit records file {path} is not valid JSON: {err.msg} at line {number} "
                                f"column {err.colno}") from None
    return values


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def check_records_file(path: str | Path) -> None:
    """Raise :class:`EditDataError` naming ``path`` unless it is a non-empty JSON list of objects or JSON Lines
    of objects, in UTF-8.

    ``datasets`` reports these cases without the file name (``DatasetGenerationError``, a bare
    ``StopIteration`` for an empty file, "Instruction "train" corresponds to no data!" for ``[]``),
    so they are caught here first. One pass over the bytes: decode, then ``json.loads``. The byte of a UTF-8
    error is its 0-based offset in the file (as ``hexdump`` shows it).
    """
    path = Path(path)
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # datasets accepts a BOM
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        line = data.count(b"\n", 0, at) + 1
        raise EditDataError(f"edit records file {path} is not valid UTF-8 at byte {at} (line {line})") from None
    if not text.strip():
        raise EditDataError(f"edit records file {path} is empty")
    values = _json_values(text, path, lines=path.suffix == ".jsonl")
    if not values:
        raise EditDataError(f"edit records file {path} holds no records")
    for where, value in values:
        if not isinstance(value, dict):
            raise EditDataError(f"edit records file {path}: {where} is a JSON {_json_type(value)}, expected an "
                                f"object (one record)")


def _records_files(directory: Path) -> list[Path]:
    """The ``.json``/``.jsonl`` files ``datasets`` reads from a directory (it skips hidden and ``__`` paths)."""
    files = []
    for file in sorted(directory.rglob("*")):
        parts = file.relative_to(directory).parts
        if file.is_file() and file.suffix in RECORD_SUFFIXES and not any(
            p.startswith(".") or p.startswith("__") for p in parts
        ):
            files.append(file)
    return files


def load_records(path_or_id: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Load raw records as plain dicts, in file order, through HF ``datasets``.

    A local ``.json``/``.jsonl`` file or a directory of them is read with the ``json`` builder
    (a directory's files named ``train``/``test``/... become splits, as ``datasets`` infers them;
    otherwise every file is ``train``); anything else is taken as a hub dataset id. ``limit``
    keeps the first N records in file order, not a random sample: the reference protocol edits
    the first N records of a benchmark (``limit=0`` gives no records).

    Every local file is checked first (:func:`check_records_file`), so an empty, non-UTF-8,
    malformed or record-less file fails with an :class:`EditDataError` naming it; so does anything
    else ``datasets`` raises for a local file or a hub id. A missing local path (one that
    :func:`looks_like_local_path`) raises ``FileNotFoundError``, without asking the hub.

    Note that the ``json`` builder unifies the schema across records: a key missing from one
    record comes back as ``None`` (the readers turn that into an :class:`EditRequestError`).
    """
    import datasets  # imported here: `datasets` is heavy and only needed when data is read

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        files = _records_files(path)
        if not files:
            raise EditDataError(f"edit records directory {path} holds no .json or .jsonl files")
        for file in files:
            check_records_file(file)
        source, load = str(path), lambda: datasets.load_dataset("json", data_dir=str(path), split=split)
    elif path.is_file():
        check_records_file(path)
        source, load = str(path), lambda: datasets.load_dataset("json", data_files=str(path), split=split)
    elif path.suffix in RECORD_SUFFIXES or looks_like_local_path(path_or_id):
        raise FileNotFoundError(f"edit records file or directory {path_or_id} does not exist")
    else:
        source, load = f"hub dataset {path_or_id!r}", lambda: datasets.load_dataset(path_or_id, split=split)
    try:
        dataset = load()
    except Exception as err:  # datasets' own errors rarely say which file or id they were loading
        cause = f" (caused by {type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
        raise EditDataError(f"cannot load edit records from {source} (split {split!r}): "
                            f"{type(err).__name__}: {err}{cause}") from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


# -- rows of any table or text corpus (the C0 corpus, the monitor's drift text, probe tasks) ---------------------
ROW_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def stream_rows(path_or_id: str, config_name: str | None = None, split: str = "train", *, setting: str,
                shuffle_seed: int | None = None):
    """The rows (dicts) of a local file, a local dataset directory or a hub dataset, streamed through
    ``datasets.load_dataset`` (nothing is loaded whole). A local file is read with the builder of its suffix
    (:data:`ROW_BUILDERS`: ``.txt`` gives one row ``{"text": line}`` per line); a hub corpus is shuffled with
    ``shuffle_seed`` (a buffer of 10,000 rows) unless it is None. ``setting`` names the config entry in errors: a
    missing local path raises ``FileNotFoundError`` and an unknown suffix or a dataset ``datasets`` cannot open
    an :class:`EditDataError`, both naming the path and the setting."""
    import datasets

    path = Path(path_or_id).expanduser()
    if path.is_file():
        builder = ROW_BUILDERS.get(path.suffix)
        if builder is None:
            raise EditDataError(f"{setting}: cannot read {path}: the suffix {path.suffix!r} is none of "
                                f"{', '.join(ROW_BUILDERS)}")
        source, load = str(path), lambda: datasets.load_dataset(builder, data_files=str(path), split=split,
                                                                streaming=True)
    elif path.is_dir():
        source, load = str(path), lambda: datasets.load_dataset(str(path), split=split, streaming=True)
    elif path.suffix in ROW_BUILDERS or looks_like_local_path(path_or_id):
        raise FileNotFoundError(f"{setting}: file or directory {path_or_id} does not exist")
    else:  # pragma: no cover - needs the hub
        source = f"hub dataset {path_or_id!r}"
        load = lambda: datasets.load_dataset(path_or_id, config_name, split=split, streaming=True)  # noqa: E731
    try:
        ds = load()
    except Exception as err:  # datasets' own errors rarely say which file or id they were loading
        raise EditDataError(f"{setting}: cannot load {source} (split {split!r}): {type(err).__name__}: {err}") from err
    if shuffle_seed is not None and not path.exists():  # pragma: no cover - needs the hub
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=10_000)
    return ds


def row_field(row: dict, field: str, source: str, setting: str) -> Any:
    """``row[field]``, or an :class:`EditDataError` naming the field, the source, its fields and the setting."""
    if field not in row:
        raise EditDataError(f"{setting}: {source} has no field {field!r} (its fields: {', '.join(map(str, row))})")
    return row[field]


def iter_texts(path_or_id: str, text_field: str, n_samples: int, *, config_name: str | None = None,
               split: str = "train", shuffle_seed: int | None = None, settings: str):
    """At most ``n_samples`` non-empty texts (the ``text_field`` of each row) of :func:`stream_rows`. ``settings``
    is where the config names them (``model.stats``): errors name ``<settings>.dataset`` or ``.text_field``."""
    n = 0
    if n_samples <= 0:
        return
    rows = stream_rows(path_or_id, config_name, split, setting=f"{settings}.dataset", shuffle_seed=shuffle_seed)
    for row in rows:
        text = row_field(row, text_field, path_or_id, f"{settings}.text_field")
        if text and str(text).strip():
            yield str(text)
            n += 1
            if n >= n_samples:
                return
