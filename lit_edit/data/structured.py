"""Structured readers: CounterFact (and the fact world, its schema) and ZsRE (MEND eval format)."""
from __future__ import annotations

from typing import Any

from lit_edit.data.files import load_records
from lit_edit.data.records import ZSRE_TARGET_FIELDS, _check_on_invalid, _collect, _get, _str_list
from lit_edit.requests import EditRequest, EditRequestError


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
        target_new_id=_target_id(target_new),
        source=source,
    )


def _target_id(target: dict) -> str | None:
    """A target's id (CounterFact: the Wikidata id of the object), kept as text; None when absent."""
    value = target.get("id") if isinstance(target, dict) else None
    return None if value is None else str(value)


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
