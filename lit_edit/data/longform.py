"""Long-form (unstructured) readers: UnKEBench, AKEW, EditEverything and the fact world's biographies."""
from __future__ import annotations

from typing import Any

from lit_edit.data.files import load_records
from lit_edit.data.records import _check_on_invalid, _collect, _get, is_world_spec
from lit_edit.requests import EditRequestError, UnstructuredRequest


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
