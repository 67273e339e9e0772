"""What every reader shares: field access that names the record, the raise-or-skip policy, unique case ids."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lit_edit.requests import EditRequest, EditRequestError

log = logging.getLogger("lit_edit.data")

ON_INVALID = ("raise", "skip")
ZSRE_TARGET_FIELDS = ("answers", "alt")
_MISSING = object()


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


def is_world_spec(path: str) -> bool:
    """``"world"`` or ``"world:<name>"`` names the built-in synthetic fact world, not a path."""
    return path == "world" or path.startswith("world:")
