"""Edit-request streams: benchmark readers and the resumable :class:`EditDataModule`.

A run is one pass (one epoch) over a stream of :class:`~lit_edit.requests.EditRequest`; each
training step applies one batch of edits. Three pieces:

* **Readers** turn benchmark records (loaded through HF ``datasets``, from a local JSON/JSONL
  file or directory, or a hub id) into validated requests: :func:`read_counterfact`,
  :func:`read_zsre`, the ``"world"`` reader (CounterFact schema, ``source="world"``), and the
  dispatcher :func:`read_requests`. Unstructured benchmarks give
  :class:`~lit_edit.requests.UnstructuredRequest`: :func:`read_unke`, :func:`read_akew`
  (MQuAKE-CF and CounterFact formats), :func:`read_editeverything`, :func:`read_world_long`
  (the fact world's long-form paragraphs); :func:`check_lengths` checks them against a model's
  context (:func:`check_structured_lengths` the structured ones). Every request is validated when it
  is read, so a bad record
  fails at load time with an :class:`~lit_edit.requests.EditRequestError` naming its case id and
  field, not halfway through an editing run.
* :class:`StreamCursor` records how many batches of the stream have been *applied*.
* :class:`EditLoader` / :class:`EditDataModule` batch the stream in order and checkpoint the
  cursor, so ``Trainer.fit(ckpt_path=...)`` continues with the first unapplied batch.

Why the cursor counts *applied* batches rather than batches handed out: Lightning's fetcher
prefetches one batch ahead, so a loader that counted its own yields would be one ahead of the
edits actually written into the model when a checkpoint is saved. The editing callback calls
:meth:`EditDataModule.mark_applied` after each successful step instead (it must run before
``ModelCheckpoint`` in ``on_train_batch_end``; Lightning orders checkpoint callbacks last).

Distributed runs: the module does its own batching. Every rank gets the same, full batch (the
editing module shards it, gathers keys and targets, and applies the identical update on every
rank), so the trainer must not inject a ``DistributedSampler``: use
``Trainer(use_distributed_sampler=False)``.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Sampler

from lit_edit.metrics import scored_pairs, scored_prefix
from lit_edit.requests import EditRequest, EditRequestError, UnstructuredRequest, chat_prompt, edit_answer
from lit_edit.tokens import bos_ids, context_length, encode, encode_prompt, fill_context, target_ids

log = logging.getLogger(__name__)

ON_INVALID = ("raise", "skip")
ZSRE_TARGET_FIELDS = ("answers", "alt")
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Raw records
# --------------------------------------------------------------------------------------------


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


def _get(record: dict, key: str, case_id: Any, field_name: str | None = None) -> Any:
    """``record[key]``, or an :class:`EditRequestError` naming the case and field.

    A key absent from every record of a file is missing from the dict; a key absent from only
    some records is ``None`` after ``datasets`` unified the schema. Both mean "missing".
    """
    value = record.get(key, _MISSING) if isinstance(record, dict) else _MISSING
    if value is _MISSING or value is None:
        raise EditRequestError(case_id, field_name or key, f"missing key {key!r} in the record")
    return value


def _str_list(record: dict, key: str) -> list[str]:
    """An optional list-of-prompts field; missing (or ``None`` after unification) means empty."""
    value = record.get(key)
    return list(value) if value is not None else []


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _check_on_invalid(on_invalid: str) -> None:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")


def _collect(records: list[dict], build: Callable[[int, dict], list], on_invalid: str) -> list:
    """Build and validate the requests of every record; bad records raise or are skipped.

    ``build(index, record)`` returns the record's requests (one, or several for MQuAKE-style
    multi-rewrite records) or raises :class:`EditRequestError`. With ``on_invalid="skip"`` a bad
    record is dropped whole (all of its rewrites) and logged with its case id and reason, so a
    benchmark with a few unusable records can still be run, visibly.
    """
    _check_on_invalid(on_invalid)
    requests: list[EditRequest] = []
    n_skipped = 0
    for index, record in enumerate(records):
        try:
            built = [request.validate() for request in build(index, record)]
        except EditRequestError as err:
            if on_invalid == "raise":
                raise
            n_skipped += 1
            log.warning("skipping invalid edit record: %s", err)
            continue
        requests.extend(built)
    if n_skipped:
        log.warning("skipped %d of %d edit records as invalid", n_skipped, len(records))
    check_unique_case_ids(requests)
    return requests


def check_unique_case_ids(requests: list[EditRequest]) -> None:
    """Reject a stream with a repeated case id.

    Case ids key metrics and checkpoints; a repeat usually means the same data was concatenated
    twice, which would apply an edit twice. This is never skipped, whatever ``on_invalid`` says.
    """
    seen: set = set()
    for request in requests:
        if request.case_id in seen:
            raise EditRequestError(request.case_id, "case_id", "duplicate case id in the edit stream")
        seen.add(request.case_id)


def _counterfact_rewrite(case_id: Any, rewrite: Any, record: dict, source: str) -> EditRequest:
    """One CounterFact ``requested_rewrite`` (plus the record's evaluation prompts) as a request."""
    if not isinstance(rewrite, dict):
        raise EditRequestError(case_id, "requested_rewrite", f"expected an object, got {type(rewrite).__name__}")
    # lit_edit extension: a record-level "op" (insert | replace | remove); a removal names the fact only
    op = record.get("op") or "insert"  # datasets fills a column missing from some records with None
    if op == "remove":
        target_new = rewrite.get("target_new") or {"str": ""}
        target_true = rewrite.get("target_true") or {"str": None}
    else:
        target_new = _get(rewrite, "target_new", case_id)
        target_true = _get(rewrite, "target_true", case_id)
    return EditRequest(
        case_id=case_id,
        prompt=_get(rewrite, "prompt", case_id),
        subject=_get(rewrite, "subject", case_id),
        target_new=_get(target_new, "str", case_id, "target_new"),
        target_true=target_true.get("str") if op == "remove" else _get(target_true, "str", case_id, "target_true"),
        op=op,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts"),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts"),
        neighborhood_targets=None,  # CounterFact neighbours are scored against target_true
        attribute_prompts=_str_list(record, "attribute_prompts"),
        generation_prompts=_str_list(record, "generation_prompts"),
        relation_id=rewrite.get("relation_id"),
        source=source,
    )


def _counterfact_requests(index: int, record: dict, source: str) -> list[EditRequest]:
    """The requests of one CounterFact record.

    ``requested_rewrite`` may be a single rewrite (CounterFact) or a list of them (MQuAKE-CF,
    AKEW). A list is flattened, as MQuAKE-style loaders do: one request per rewrite, in order,
    the first keeping the record's case id and rewrite ``i > 0`` getting ``f"{case_id}_{i}"``.
    """
    case_id = record.get("case_id") if isinstance(record, dict) else None
    if case_id is None:
        raise EditRequestError(f"<record #{index}>", "case_id", "missing key 'case_id' in the record")
    rewrites = _get(record, "requested_rewrite", case_id)
    if not isinstance(rewrites, list):
        return [_counterfact_rewrite(case_id, rewrites, record, source)]
    if not rewrites:
        raise EditRequestError(case_id, "requested_rewrite", "empty list of rewrites")
    return [
        _counterfact_rewrite(case_id if i == 0 else f"{case_id}_{i}", rewrite, record, source)
        for i, rewrite in enumerate(rewrites)
    ]


def read_counterfact(
    path_or_id: str,
    split: str = "train",
    limit: int | None = None,
    *,
    on_invalid: str = "raise",
    source: str = "counterfact",
) -> list[EditRequest]:
    """Read CounterFact-schema records (CounterFact, MQuAKE-CF/AKEW, the fact world).

    ``limit`` counts records, so with multi-rewrite records it can yield more requests.
    """
    _check_on_invalid(on_invalid)
    records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, lambda i, r: _counterfact_requests(i, r, source), on_invalid)


def read_world(
    path_or_id: str, split: str = "train", limit: int | None = None, *, on_invalid: str = "raise"
) -> list[EditRequest]:
    """Read the synthetic fact world's records: CounterFact schema, tagged ``source="world"``."""
    return read_counterfact(path_or_id, split=split, limit=limit, on_invalid=on_invalid, source="world")


def _zsre_target(record: dict, case_id: int, target_field: str) -> str:
    """The new target of a ZsRE record: ``answers[0]`` (MEMIT/ROME) or ``alt`` (EasyEdit)."""
    value = _get(record, target_field, case_id)
    if target_field == "answers":
        if not isinstance(value, list) or not value:
            raise EditRequestError(case_id, "answers", "empty list of answers")
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise EditRequestError(case_id, target_field, f"empty target {value!r}")
    return value


def _zsre_request(index: int, record: dict, target_field: str) -> list[EditRequest]:
    """One ZsRE (MEND eval format) record as a request; its case id is its index in the file.

    The prompt is ``src`` with the first occurrence of the subject replaced by ``{}``. The
    neighbourhood prompt is ``loc + "?"`` scored against ``loc_ans``, as in MEMIT's loader.
    """
    case_id = index
    subject = _get(record, "subject", case_id)
    src = _get(record, "src", case_id)
    if not isinstance(subject, str) or not subject.strip():
        raise EditRequestError(case_id, "subject", "missing or empty")
    if subject not in src:
        raise EditRequestError(case_id, "subject", f"subject {subject!r} does not occur in src {src!r}")
    prompt = src.replace(subject, "{}", 1)
    if prompt.count("{}") != 1 or prompt.replace("{}", subject, 1) != src:
        raise EditRequestError(case_id, "src", f"contains braces, cannot template it: {src!r}")
    return [
        EditRequest(
            case_id=case_id,
            prompt=prompt,
            subject=subject,
            target_new=_zsre_target(record, case_id, target_field),
            target_true=None,
            paraphrase_prompts=[_get(record, "rephrase", case_id)],
            neighborhood_prompts=[_get(record, "loc", case_id) + "?"],
            neighborhood_targets=[_get(record, "loc_ans", case_id)],
            source="zsre",
        )
    ]


def read_zsre(
    path_or_id: str,
    split: str = "train",
    limit: int | None = None,
    *,
    target_field: str = "answers",
    on_invalid: str = "raise",
) -> list[EditRequest]:
    """Read ZsRE records in the MEND eval format (``zsre_mend_eval.json``).

    ``target_field="answers"`` edits towards ``answers[0]`` (the MEMIT/AlphaEdit convention);
    ``"alt"`` towards ``alt`` (EasyEdit). Some ``alt`` values are empty in the real file: use
    ``on_invalid="skip"`` to drop (and log) those records.
    """
    if target_field not in ZSRE_TARGET_FIELDS:
        raise ValueError(f"target_field must be one of {ZSRE_TARGET_FIELDS}, got {target_field!r}")
    _check_on_invalid(on_invalid)
    records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, lambda i, r: _zsre_request(i, r, target_field), on_invalid)


# --------------------------------------------------------------------------------------------
# Unstructured (long-form) readers: UnKEBench, AKEW, EditEverything, the world's paragraphs
# --------------------------------------------------------------------------------------------

AKEW_REWRITES = ("first", "all")


def _validated(request: UnstructuredRequest, field_names: dict[str, str]) -> UnstructuredRequest:
    """``request.validate()``, with the error naming the dataset's field rather than the dataclass's."""
    try:
        return request.validate()
    except EditRequestError as err:
        if err.field in field_names:
            raise EditRequestError(err.case_id, field_names[err.field], err.message) from None
        raise


def _record_id(record: Any, index: int, key: str) -> Any:
    case_id = record.get(key) if isinstance(record, dict) else None
    if case_id is None:
        raise EditRequestError(f"<record #{index}>", key, f"missing key {key!r} in the record")
    return case_id


def _opt_str_list(record: dict, key: str, case_id: Any) -> list[str]:
    """An optional list-of-strings field: missing or ``None`` is empty, anything but a list is an error."""
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise EditRequestError(case_id, key, f"expected a list of strings, got {type(value).__name__}")
    return list(value)


UNKE_FIELDS = {"question": "question", "answer": "answer", "paraphrase_questions": "para_question",
               "sub_questions": "sub_question", "sub_answers": "sub_answer"}
UNKE_EXTRA = ("mmlu_questions", "mmlu_choices", "mmlu_answer")


def _unke_request(index: int, record: dict, source: str = "unke") -> list[UnstructuredRequest]:
    """One UnKEBench record (also the world's long-form records, which share its field names)."""
    case_id = _record_id(record, index, "id")
    para = record.get("para_question")
    request = UnstructuredRequest(
        case_id=case_id,
        question=_get(record, "question", case_id),
        answer=_get(record, "answer", case_id),
        paraphrase_questions=[para] if para is not None else [],
        sub_questions=_opt_str_list(record, "sub_question", case_id),
        sub_answers=_opt_str_list(record, "sub_answer", case_id),
        source=source,
        subject=record.get("subject"),
        original_answer=record.get("original_answer"),
        extra={k: record[k] for k in UNKE_EXTRA + ("rewrites",) if record.get(k) is not None},
    )
    return [_validated(request, {**UNKE_FIELDS, "original_answer": "original_answer"})]


def read_unke(
    path_or_id: str, split: str = "train", limit: int | None = None, *, on_invalid: str = "raise"
) -> list[UnstructuredRequest]:
    """Read UnKEBench records (``id``, ``question``, ``para_question``, ``answer``, ``sub_question``,
    ``sub_answer``; docs/algorithms.md §11). ``case_id`` is the record's ``id``.

    ``limit`` keeps the first N records in file order (MUKE instead shuffles with seed 2024 before
    truncating when it takes fewer records than the file has, §11).
    """
    _check_on_invalid(on_invalid)
    records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, _unke_request, on_invalid)


def _akew_sub_questions(rewrite: dict, case_id: Any, n_sub: int | None) -> tuple[list[str], list[str]]:
    """MUKE's sub-questions: ``prompt.format(subject)`` -> ``target`` of the first ``n_sub`` triplets."""
    triplets = rewrite.get("unsfact_triplets_GPT")
    if triplets is None:
        return [], []
    if not isinstance(triplets, list):
        raise EditRequestError(case_id, "unsfact_triplets_GPT", f"expected a list, got {type(triplets).__name__}")
    questions, answers = [], []
    for i, triplet in enumerate(triplets[:n_sub] if n_sub is not None else triplets):
        where = f"unsfact_triplets_GPT[{i}]"
        if not isinstance(triplet, dict):
            raise EditRequestError(case_id, where, f"expected an object, got {type(triplet).__name__}")
        prompt, subject, target = (_get(triplet, k, case_id, f"{where}.{k}") for k in ("prompt", "subject", "target"))
        if not isinstance(prompt, str) or prompt.count("{}") != 1:
            raise EditRequestError(case_id, f"{where}.prompt", f"must contain exactly one '{{}}', got {prompt!r}")
        questions.append(prompt.replace("{}", str(subject)))
        answers.append(target)
    return questions, answers


def _akew_structured(rewrite: dict) -> dict:
    """The structured rewrite behind an AKEW text, kept in ``extra`` (strings only, ``None`` if absent)."""
    def text(value):
        return value.get("str") if isinstance(value, dict) else value

    return {
        "prompt": rewrite.get("prompt"),
        "relation_id": rewrite.get("relation_id"),
        "target_new": text(rewrite.get("target_new")),
        "target_true": text(rewrite.get("target_true")),
        "fact_new": rewrite.get("fact_new"),
        "verify_unsfact_GPT": rewrite.get("verify_unsfact_GPT"),
    }


AKEW_FIELDS = {"question": "question", "answer": "fact_new_uns", "paraphrase_questions": "paraphrase_prompts",
               "sub_questions": "unsfact_triplets_GPT", "sub_answers": "unsfact_triplets_GPT"}


def _akew_requests(index: int, record: dict, rewrites: str, n_sub: int | None,
                   require_verified: bool) -> list[UnstructuredRequest]:
    """The requests of one AKEW record: MQuAKE-CF (a list of rewrites) or CounterFact (one rewrite).

    MQuAKE-CF (MUKE's ``mquake.py``): question = the rewrite's ``question``, answer =
    ``fact_new_uns``, no paraphrase. CounterFact (MUKE's ``counterfact.py``): question =
    ``prompt_full``, paraphrase = ``paraphrase_prompts[0]``, answer = ``fact_new_uns``. Both: the
    first ``n_sub`` triplets as sub-questions.
    """
    case_id = _record_id(record, index, "case_id")
    raw = _get(record, "requested_rewrite", case_id)
    mquake = isinstance(raw, list)
    if mquake and not raw:
        raise EditRequestError(case_id, "requested_rewrite", "empty list of rewrites")
    chosen = (raw if rewrites == "all" else raw[:1]) if mquake else [raw]
    out = []
    for i, rewrite in enumerate(chosen):
        cid = case_id if i == 0 else f"{case_id}_{i}"
        if not isinstance(rewrite, dict):
            raise EditRequestError(cid, "requested_rewrite", f"expected an object, got {type(rewrite).__name__}")
        if require_verified and rewrite.get("verify_unsfact_GPT") is not True:
            raise EditRequestError(cid, "verify_unsfact_GPT", "the unstructured fact is not marked as verified")
        sub_q, sub_a = _akew_sub_questions(rewrite, cid, n_sub)
        extra = _akew_structured(rewrite)
        if mquake:
            question = _get(rewrite, "question", cid)
            paraphrases: list[str] = []
            extra.update({k: record.get(k) for k in ("questions", "new_answer", "new_answer_alias")})
        else:
            question = _get(rewrite, "prompt_full", cid)
            paraphrases = _opt_str_list(record, "paraphrase_prompts", cid)[:1]
            extra["neighborhood_prompts"] = _opt_str_list(record, "neighborhood_prompts", cid)
        request = UnstructuredRequest(
            case_id=cid,
            question=question,
            answer=_get(rewrite, "fact_new_uns", cid),
            paraphrase_questions=paraphrases,
            sub_questions=sub_q,
            sub_answers=sub_a,
            source="akew_mquake" if mquake else "akew_counterfact",
            subject=rewrite.get("subject"),
            extra=extra,
        )
        fields = dict(AKEW_FIELDS, question="question" if mquake else "prompt_full")
        out.append(_validated(request, fields))
    return out


def read_akew(
    path_or_id: str,
    split: str = "train",
    limit: int | None = None,
    *,
    on_invalid: str = "raise",
    rewrites: str = "first",
    n_sub: int | None = 5,
    require_verified: bool = False,
) -> list[UnstructuredRequest]:
    """Read AKEW records as unstructured edits, in either format (docs/algorithms.md §11).

    * MQuAKE-CF (``requested_rewrite`` is a list): ``rewrites="first"`` uses only rewrite 0, as
      MUKE does; ``"all"`` gives one request per rewrite (case ids ``case_id``, ``f"{case_id}_1"``,
      ...; every one carries the record's multi-hop ``questions`` / ``new_answer`` in ``extra``).
    * CounterFact (``requested_rewrite`` is an object with ``prompt_full`` and ``fact_new_uns``).

    ``n_sub``: how many ``unsfact_triplets_GPT`` become sub-questions (5 as in MUKE; ``None``:
    all). ``require_verified``: treat a record whose ``verify_unsfact_GPT`` is not true as invalid.
    """
    if rewrites not in AKEW_REWRITES:
        raise ValueError(f"rewrites must be one of {AKEW_REWRITES}, got {rewrites!r}")
    if n_sub is not None and n_sub < 0:
        raise ValueError(f"n_sub must be None or >= 0, got {n_sub}")
    _check_on_invalid(on_invalid)
    records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, lambda i, r: _akew_requests(i, r, rewrites, n_sub, require_verified), on_invalid)


def _editeverything_request(index: int, record: dict) -> list[UnstructuredRequest]:
    case_id = _record_id(record, index, "id")
    request = UnstructuredRequest(
        case_id=case_id,
        question=_get(record, "question", case_id),
        answer=_get(record, "answer", case_id),
        source="editeverything",
        category=_get(record, "category", case_id),
    )
    return [_validated(request, {})]


def read_editeverything(
    path_or_id: str, split: str = "train", limit: int | None = None, *, on_invalid: str = "raise"
) -> list[UnstructuredRequest]:
    """Read EditEverything records (``id``, ``question``, ``answer``, ``category``; §11).

    No paraphrases or sub-questions; the reference reports its metrics per ``category``.
    """
    _check_on_invalid(on_invalid)
    records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, _editeverything_request, on_invalid)


def read_world_long(
    path_or_id: str = "world", split: str = "train", limit: int | None = None, *, on_invalid: str = "raise",
    fit_context: bool = True,
) -> list[UnstructuredRequest]:
    """The fact world's long-form records (:mod:`lit_edit.world_long`) as unstructured edits.

    ``path_or_id``: a world spec (``"world"``, ``"world:tiny"``) generates them from the world's
    spec, without training or touching the world cache (``fit_context``: each record fits the
    world model's context); a JSON/JSONL file holds records written from
    :func:`~lit_edit.world_long.long_records` (UnKEBench field names). ``case_id`` = ``id``.
    """
    _check_on_invalid(on_invalid)
    if is_world_spec(path_or_id):
        from lit_edit.world_long import world_long_records

        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0, got {limit}")
        records = world_long_records(path_or_id, fit_context=fit_context)
        records = records[:limit] if limit is not None else records
    else:
        records = load_records(path_or_id, split=split, limit=limit)
    return _collect(records, lambda i, r: _unke_request(i, r, source="world_long"), on_invalid)


def request_lengths(request: UnstructuredRequest, tokenizer, *, template: str | None = None,
                    chat: bool = True) -> dict[str, int]:
    """Token counts of an unstructured request as the model sees it.

    ``question`` / ``paraphrase_questions`` / ``sub_questions``: the longest prompt of each kind
    (BOS included, chat-wrapped with :func:`~lit_edit.requests.chat_prompt` when ``chat``);
    ``answer``: the edit target (answer plus end-of-turn string, :func:`~lit_edit.requests.edit_answer`);
    ``sub_answers``: the longest sub-answer.
    """
    n_bos = len(bos_ids(tokenizer))

    def prompt_len(question: str) -> int:
        return n_bos + text_len(chat_prompt(question, tokenizer, template=template) if chat else question)

    def text_len(text: str) -> int:
        return len(encode(tokenizer, text))

    answer = edit_answer(request.answer, tokenizer, template=template) if chat else request.answer
    return {
        "question": prompt_len(request.question),
        "paraphrase_questions": max((prompt_len(q) for q in request.paraphrase_questions), default=0),
        "answer": text_len(answer),
        "sub_questions": max((prompt_len(q) for q in request.sub_questions), default=0),
        "sub_answers": max((text_len(a) for a in request.sub_answers), default=0),
    }


def check_length(request: UnstructuredRequest, tokenizer, max_length, *, template: str | None = None,
                 chat: bool = True) -> UnstructuredRequest:
    """Raise :class:`EditRequestError` naming the record and field if the request does not fit the context.

    ``max_length``: the context in tokens, or a model / config to read it from
    (:func:`~lit_edit.tokens.context_length`). A prompt of ``Q`` tokens followed by a target of
    ``T`` tokens needs ``Q + T - 1`` positions, both to edit (the last target token is never an
    input, docs/algorithms.md §8.1) and to generate ``T`` tokens for scoring. Checked: question +
    answer (field ``answer``, or ``question`` if the question alone is too long), every
    paraphrase + answer (``paraphrase_questions``) and every sub-question + its answer
    (``sub_questions``).
    """
    limit = context_length(max_length)
    if limit is None:
        raise ValueError(f"cannot tell the model's context length from {type(max_length).__name__}")
    n = request_lengths(request, tokenizer, template=template, chat=chat)
    cid = request.case_id
    if n["question"] > limit:
        raise EditRequestError(cid, "question", f"the prompt alone is {n['question']} tokens; the model's context is "
                               f"{limit} tokens")
    pairs = [("answer", n["question"]), ("paraphrase_questions", n["paraphrase_questions"])]
    for name, q in pairs:
        if q and q + n["answer"] - 1 > limit:
            raise EditRequestError(cid, name, f"prompt ({q} tokens) + answer ({n['answer']} tokens) needs "
                                   f"{q + n['answer'] - 1} positions; the model's context is {limit} tokens")
    if n["sub_questions"] and n["sub_questions"] + n["sub_answers"] - 1 > limit:
        raise EditRequestError(cid, "sub_questions", f"a sub-question ({n['sub_questions']} tokens) + its answer "
                               f"(up to {n['sub_answers']} tokens) does not fit the model's context of {limit} tokens")
    return request


def _keep_fitting(requests: list, check: Callable, on_invalid: str) -> list:
    """``check(request)`` for every request (it raises :class:`EditRequestError` when one does not fit the model);
    ``on_invalid="skip"`` drops and logs those. Returns the requests kept, in order."""
    _check_on_invalid(on_invalid)
    kept = []
    for request in requests:
        try:
            kept.append(check(request))
        except EditRequestError as err:
            if on_invalid == "raise":
                raise
            log.warning("skipping edit record that does not fit the model: %s", err)
    if len(kept) < len(requests):
        log.warning("skipped %d of %d edit records as too long", len(requests) - len(kept), len(requests))
    return kept


def check_lengths(requests: list[UnstructuredRequest], tokenizer, max_length, *, template: str | None = None,
                  chat: bool = True, on_invalid: str = "raise") -> list[UnstructuredRequest]:
    """:func:`check_length` for every request; ``on_invalid="skip"`` drops (and logs) those that do not fit."""
    return _keep_fitting(requests, lambda r: check_length(r, tokenizer, max_length, template=template, chat=chat),
                         on_invalid)


def _scored_field(key: str, slot: int) -> str:
    return {"efficacy": "prompt", "generalization": f"paraphrase_prompts[{slot}]",
            "specificity": f"neighborhood_prompts[{slot}]"}[key]


def _target_field(key: str, slot: int, which: str) -> str:
    if which == "acc":  # ZsRE: one target per prompt, the neighbourhood prompt's own answer for specificity
        return f"neighborhood_targets[{slot}]" if key == "specificity" else "target_new"
    return "target_new" if which == "new" else "target_true"


def check_structured_length(request: EditRequest, tokenizer, max_length, *, context: str = "{}",
                            fact_token: str = "subject_last") -> EditRequest:
    """Raise :class:`EditRequestError` naming the record, the field and both lengths if a sequence of a structured
    request does not fit the model's context; removals (nothing edited or scored) pass.

    ``max_length``: the context in tokens, or a model / config (:func:`~lit_edit.tokens.context_length`).
    Checked, in this order:

    * the edit sequence: ``context`` (the longest context template) filled with the prompt, then
      ``target_new``, as the targets are optimised; its last token is never an input (``- 1``). Field ``prompt``.
    * every sequence :func:`~lit_edit.metrics.record_scores` runs through the model, whole (BOS + prompt + the
      target, :func:`~lit_edit.metrics.scored_prefix`): the rewrite prompt (field ``prompt``), each paraphrase
      (``paraphrase_prompts[i]``) and each neighbourhood prompt (``neighborhood_prompts[i]``; ZsRE's locality
      question), each with every target it is scored against (``target_new`` / ``target_true``; ZsRE
      neighbourhood: ``neighborhood_targets[i]``). The pairs come from :func:`~lit_edit.metrics.scored_pairs`,
      so the check follows the scorer.

    Attribute and generation prompts are not checked: no metric runs them.
    """
    limit = context_length(max_length)
    if limit is None:
        raise ValueError(f"cannot tell the model's context length from {type(max_length).__name__}")
    if not request.writes:
        return request
    cid = request.case_id
    enc = encode_prompt(tokenizer, fill_context(context, request.prompt), request.subject, fact_token)
    n = len(enc.ids) + len(target_ids(tokenizer, request.target_new)) - 1
    if n > limit:
        raise EditRequestError(cid, "prompt", f"prompt + target_new is {n} tokens with the longest context template; "
                               f"the model allows {limit}")
    prompt_len: dict[str, int] = {}  # each prompt is scored against two targets: tokenise it once
    target_len: dict[str, int] = {}
    for key, slot, which, prompt, target in scored_pairs(request):
        if target is None:  # nothing to append (and nothing record_scores could score)
            continue
        if prompt not in prompt_len:
            prompt_len[prompt] = len(scored_prefix(tokenizer, prompt))
        if target not in target_len:
            target_len[target] = len(target_ids(tokenizer, target))
        n_p, n_t = prompt_len[prompt], target_len[target]
        if n_p + n_t > limit:
            raise EditRequestError(cid, _scored_field(key, slot),
                                   f"scored as prompt ({n_p} tokens) + {_target_field(key, slot, which)} ({n_t} "
                                   f"tokens) = {n_p + n_t} tokens; the model's context is {limit} tokens")
    return request


def check_structured_lengths(requests: list[EditRequest], tokenizer, max_length, *, context: str = "{}",
                             fact_token: str = "subject_last", on_invalid: str = "raise") -> list[EditRequest]:
    """:func:`check_structured_length` for every request; ``on_invalid="skip"`` drops (and logs) those that do not
    fit. Returns the requests kept, in order."""
    return _keep_fitting(requests, lambda r: check_structured_length(r, tokenizer, max_length, context=context,
                                                                     fact_token=fact_token), on_invalid)


def requests_from_records(records: list[dict], schema: str = "counterfact", *, on_invalid: str = "raise",
                          target_field: str = "answers") -> list:
    """Records already in memory (dicts in a reader's format) as validated requests, exactly as the reader of
    ``schema`` builds them from a file: ``counterfact`` / ``world`` (CounterFact schema), ``zsre`` (MEND eval),
    ``unke`` or ``editeverything``."""
    builders: dict[str, Callable[[int, dict], list]] = {
        "counterfact": lambda i, r: _counterfact_requests(i, r, "counterfact"),
        "world": lambda i, r: _counterfact_requests(i, r, "world"),
        "zsre": lambda i, r: _zsre_request(i, r, target_field),
        "unke": _unke_request,
        "editeverything": _editeverything_request,
    }
    if schema not in builders:
        raise ValueError(f"schema must be one of {sorted(builders)}, got {schema!r} (other formats: write them to a "
                         f"file and use the data module's reader)")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TypeError("records must be a list of dicts (one record each)")
    return _collect(records, builders[schema], on_invalid)


READERS: dict[str, Callable[..., list[EditRequest] | list[UnstructuredRequest]]] = {
    "counterfact": read_counterfact,
    "zsre": read_zsre,
    "world": read_world,
    "unke": read_unke,
    "akew": read_akew,
    "editeverything": read_editeverything,
    "world_long": read_world_long,
}
# Readers that take a world spec ("world", "world:tiny") themselves, rather than the path of the
# trained world's counterfact.json (which would build the world's model first).
WORLD_SPEC_READERS = frozenset({"world_long"})


def is_world_spec(path: str) -> bool:
    """``"world"`` or ``"world:<name>"`` names the built-in synthetic fact world, not a path."""
    return path == "world" or path.startswith("world:")


def resolve_records_path(path_or_id: str) -> str:
    """Turn a world spec into the world's ``counterfact.json`` (generating it if needed).

    The world module is imported here, not at the top: it is only needed for world runs.
    """
    if not is_world_spec(path_or_id):
        return path_or_id
    from lit_edit.world import ensure_world, resolve_world_name

    return str(Path(ensure_world(resolve_world_name(path_or_id))) / "counterfact.json")


def read_requests(
    kind: str, path_or_id: str, split: str = "train", limit: int | None = None, **options: Any
) -> list[EditRequest]:
    """Read a stream of validated, uniquely identified requests with the reader for ``kind``.

    ``options`` go to the reader (``on_invalid``; ``target_field`` for ZsRE). ``path_or_id`` may
    also be a world spec (``"world"``, ``"world:tiny"``).
    """
    if kind not in READERS:
        raise ValueError(f"unknown edit dataset {kind!r}; known: {sorted(READERS)}")
    path = path_or_id if kind in WORLD_SPEC_READERS else resolve_records_path(path_or_id)
    requests = READERS[kind](path, split=split, limit=limit, **options)
    check_unique_case_ids(requests)  # readers check too; this guards readers added later
    return requests


# --------------------------------------------------------------------------------------------
# Resumable stream position
# --------------------------------------------------------------------------------------------


class StreamStateError(ValueError):
    """A saved stream position does not fit the stream being read (the data or batching changed)."""


def stream_fingerprint(requests: list[EditRequest]) -> str:
    """A short hash of the stream's case ids, in order: changes if the data, order, split,
    offset or limit changed, so a resumed run cannot silently continue on a different stream."""
    digest = hashlib.sha256("\n".join(repr(r.case_id) for r in requests).encode("utf-8"))
    return digest.hexdigest()[:16]


@dataclass
class StreamCursor:
    """How many batches of a stream have been applied.

    Shared by the DataModule and every loader it builds, so both of Lightning's checkpoint paths
    (the datamodule state and the train-dataloader state) save and restore the same number.
    """

    n_requests: int
    batch_size: int
    fingerprint: str
    consumed: int = 0

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_requests / self.batch_size)

    def advance(self, n_batches: int = 1) -> None:
        if n_batches < 0 or self.consumed + n_batches > self.n_batches:
            raise ValueError(
                f"cannot mark {n_batches} more batch(es) applied: {self.consumed} of {self.n_batches} already are"
            )
        self.consumed += n_batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "n_requests": self.n_requests,
            "batch_size": self.batch_size,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``consumed`` after checking the state was saved for this very stream.

        It *sets* the position, so loading the same state twice (datamodule and loader paths)
        is harmless.
        """
        if state.get("batch_size") != self.batch_size:
            raise StreamStateError(
                f"checkpoint was saved with batch_size={state.get('batch_size')}, this run has "
                f"batch_size={self.batch_size}; resuming would regroup the edits"
            )
        if state.get("fingerprint") != self.fingerprint or state.get("n_requests") != self.n_requests:
            raise StreamStateError(
                f"checkpoint was saved for a different edit stream ({state.get('n_requests')} requests, "
                f"fingerprint {state.get('fingerprint')}) than this one ({self.n_requests} requests, "
                f"fingerprint {self.fingerprint}): dataset, path, split, offset or limit changed"
            )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.n_batches:
            raise StreamStateError(f"saved position {consumed} is outside 0..{self.n_batches} batches")
        self.consumed = consumed


class _StreamBatchSampler(Sampler[list[int]]):
    """Consecutive index batches, starting at the cursor's first unapplied batch.

    ``len()`` is the full number of batches of the stream: on resume Lightning continues
    ``batch_idx`` from its restored counter and ends the epoch on ``StopIteration``.
    """

    def __init__(self, cursor: StreamCursor):
        self.cursor = cursor

    def __len__(self) -> int:
        return self.cursor.n_batches

    def __iter__(self) -> Iterator[list[int]]:
        # Read the start now, not lazily: marking batches applied while iterating must not move
        # an iteration that is already under way.
        start, n, size = self.cursor.consumed, self.cursor.n_requests, self.cursor.batch_size
        return (list(range(b * size, min((b + 1) * size, n))) for b in range(start, self.cursor.n_batches))


def collate_requests(batch: list[EditRequest]) -> list[EditRequest]:
    """A batch is just the list of requests: targets and tensors are built by the editing step."""
    return list(batch)


class EditLoader(DataLoader):
    """In-order batches of requests that resume at the first unapplied batch.

    Lightning saves ``state_dict()`` with the fit loop and calls ``load_state_dict()`` before it
    creates the iterator, so the next ``iter()`` starts at the restored position. No shuffling,
    no worker processes (the requests are tiny; the editing step is the work).
    """

    def __init__(self, requests: list[EditRequest], batch_size: int, cursor: StreamCursor | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cursor is None:
            cursor = StreamCursor(len(requests), batch_size, stream_fingerprint(requests))
        if (cursor.n_requests, cursor.batch_size) != (len(requests), batch_size):
            raise ValueError("cursor does not describe these requests and batch size")
        super().__init__(
            requests, batch_sampler=_StreamBatchSampler(cursor), collate_fn=collate_requests, num_workers=0
        )
        self.cursor = cursor

    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class EditDataModule(L.LightningDataModule):
    """The edit stream of a run: read once, batched in order, resumable mid-stream.

    Args:
        dataset: reader name, a key of :data:`READERS` (``"counterfact"``, ``"zsre"``, ``"world"``;
            unstructured: ``"unke"``, ``"akew"``, ``"editeverything"``, ``"world_long"``, whose
            batches hold :class:`~lit_edit.requests.UnstructuredRequest`).
        path: local JSON/JSONL file or directory, hub id, or a world spec (``"world"``,
            ``"world:tiny"``: the built-in synthetic fact world, generated on first use; for
            ``"world_long"`` the long-form records are generated from the world's spec alone).
        split: dataset split.
        limit: number of requests in the stream (after ``offset``); ``None`` = all.
        batch_size: edits per training step.
        offset: skip the first ``offset`` requests (e.g. to edit records 1000..1999).
        target_field: ZsRE only, ``"answers"`` (MEMIT) or ``"alt"`` (EasyEdit).
        on_invalid: ``"raise"`` on an invalid record, or ``"skip"`` it with a logged warning. This also holds for
            requests the model cannot run (longer than its context), which the editing module finds at set-up
            and drops from the stream through :meth:`drop_requests`.

    The editing callback must call :meth:`mark_applied` after each successfully applied batch;
    that count is what checkpoints save and what a resumed run starts from.
    """

    def __init__(
        self,
        dataset: str = "world",
        path: str = "world",
        split: str = "train",
        limit: int | None = None,
        batch_size: int = 20,
        offset: int = 0,
        target_field: str = "answers",
        on_invalid: str = "raise",
    ):
        super().__init__()
        if dataset not in READERS:
            raise ValueError(f"unknown edit dataset {dataset!r}; known: {sorted(READERS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        if target_field not in ZSRE_TARGET_FIELDS:
            raise ValueError(f"target_field must be one of {ZSRE_TARGET_FIELDS}, got {target_field!r}")
        _check_on_invalid(on_invalid)
        self.save_hyperparameters()
        self.dataset, self.path, self.split, self.limit = dataset, path, split, limit
        self.batch_size, self.offset = batch_size, offset
        self.target_field, self.on_invalid = target_field, on_invalid
        self.requests: list[EditRequest] = []
        self._cursor: StreamCursor | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- reading -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the stream once; later calls (every ``fit``, every stage) keep it and its position. Every call hands
        it to the module being fitted."""
        if self._cursor is None:
            self._read_and_position()
        self._hand_over()

    def _read_and_position(self) -> None:
        self.requests = self._read_stream()
        if not self.requests:
            raise ValueError(
                f"the edit stream is empty ({self.dataset} at {self.path!r}, split={self.split!r}, "
                f"offset={self.offset}, limit={self.limit})"
            )
        self._cursor = StreamCursor(len(self.requests), self.batch_size, stream_fingerprint(self.requests))
        if self._pending_state is not None:
            self._cursor.load_state_dict(self._pending_state)
            self._pending_state = None

    def _hand_over(self) -> None:
        """Give the stream to the module being fitted (its ``connect``), with the record policy and the way to drop
        a request that does not fit the model."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and callable(getattr(module, "connect", None)):
            settings = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
            module.connect(self.requests, self.on_invalid, self.drop_requests, settings)

    def _read_stream(self) -> list[EditRequest]:
        """Requests ``offset .. offset+limit`` of the reader's output.

        The reader is asked for ``offset + limit`` records: every record yields at least one
        request, so that is enough, and it spares reading a hub split's tail for nothing.
        """
        options: dict[str, Any] = {"on_invalid": self.on_invalid}
        if self.dataset == "zsre":
            options["target_field"] = self.target_field
        read_limit = None if self.limit is None else self.offset + self.limit
        requests = read_requests(self.dataset, self.path, split=self.split, limit=read_limit, **options)
        end = None if self.limit is None else self.offset + self.limit
        return requests[self.offset : end]

    # -- position ------------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Number of batches whose edits have been applied (0 before :meth:`setup`)."""
        if self._cursor is not None:
            return self._cursor.consumed
        return int(self._pending_state["consumed"]) if self._pending_state else 0

    @property
    def n_batches(self) -> int:
        return self._require_cursor().n_batches

    def mark_applied(self, n_batches: int = 1) -> None:
        """Record that the next ``n_batches`` batches of the stream have been edited into the model."""
        self._require_cursor().advance(n_batches)

    def drop_requests(self, case_ids) -> None:
        """Drop requests from the stream after :meth:`setup`, before any batch is applied.

        For checks that need the model, which the data module does not have: with ``on_invalid="skip"``,
        :meth:`lit_edit.module.EditModule.validate_lengths` drops the requests that do not fit its context here, in
        ``configure_model``. The cursor is rebuilt on the filtered stream, so checkpoints save *its* size and
        fingerprint. Lightning calls ``configure_model`` before it restores a checkpoint's stream position, so a
        resumed run filters the same way first and then finds the same stream; had it dropped other requests
        (another model or tokenizer), the fingerprint check refuses the resume (:class:`StreamStateError`).
        """
        cursor = self._require_cursor()
        if cursor.consumed:
            raise RuntimeError(f"cannot drop requests from the edit stream: {cursor.consumed} batch(es) of it are "
                               "already applied")
        drop = set(case_ids)
        unknown = drop - {r.case_id for r in self.requests}
        if unknown:
            raise ValueError(f"cannot drop case ids that are not in the edit stream: {sorted(map(repr, unknown))}")
        kept = [r for r in self.requests if r.case_id not in drop]
        if not kept:
            raise ValueError(f"the edit stream is empty: all {len(self.requests)} requests were dropped as invalid "
                             f"({self.dataset} at {self.path!r}, split={self.split!r}, offset={self.offset}, "
                             f"limit={self.limit})")
        if len(kept) < len(self.requests):
            log.warning("dropped %d of %d requests from the edit stream; it now has %d", len(self.requests) - len(kept),
                        len(self.requests), len(kept))
        self.requests = kept
        self._cursor = StreamCursor(len(kept), self.batch_size, stream_fingerprint(kept))

    def _require_cursor(self) -> StreamCursor:
        if self._cursor is None:
            raise RuntimeError("EditDataModule.setup() has not been called yet")
        return self._cursor

    # -- loaders -------------------------------------------------------------------------------

    def train_dataloader(self) -> EditLoader:
        """Batches of ``batch_size`` consecutive requests, starting at the first unapplied one."""
        self._check_no_distributed_sampler()
        return EditLoader(self.requests, self.batch_size, cursor=self._require_cursor())

    def _check_no_distributed_sampler(self) -> None:
        """Fail early, with the fix, if Lightning is about to re-shard our loader across ranks."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise RuntimeError(
                "EditDataModule batches the edit stream itself and every rank must see the same batch: "
                "use Trainer(use_distributed_sampler=False)"
            )

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stream position, saved by Lightning under the datamodule's checkpoint key."""
        if self._cursor is not None:
            return self._cursor.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; before :meth:`setup` it is kept and checked when the stream is read."""
        if not state_dict:
            return
        if self._cursor is not None:
            self._cursor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)
