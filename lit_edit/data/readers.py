"""The reader registry (:data:`READERS`, one reader per dataset) and how a path or id names a stream."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_edit.data.longform import (_editeverything_request, _unke_request, read_akew, read_editeverything,
                                   read_unke, read_world_long)
from lit_edit.data.records import _collect, check_unique_case_ids, is_world_spec
from lit_edit.data.structured import _counterfact_requests, _zsre_request, read_counterfact, read_world, read_zsre
from lit_edit.requests import EditRequest, UnstructuredRequest


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


def config_requests(data: dict, root: str | Path, start: int, stop: int) -> list[EditRequest]:
    """Records ``start`` … ``stop − 1`` of the stream a config's ``data`` section names (``dataset``, default
    counterfact; ``path``, a world spec, an absolute path, or a path relative to ``root``, the checkout the config's
    paths are written from), for scripts that read a config's records outside the fit loop (benchmarks/)."""
    path = str(data["path"])
    if not (is_world_spec(path) or Path(path).is_absolute()):
        path = str(Path(root) / path)
    return read_requests(data.get("dataset", "counterfact"), path, limit=stop)[start:stop]
