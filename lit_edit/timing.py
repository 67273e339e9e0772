"""Wall time of a run's phases: the ``time/*_seconds`` scalars (docs/outputs.md)."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

from lit_edit.progress import phase


@contextmanager
def timed(into: dict, key: str, announce: str | None = None):
    """``into[key]`` = the wall time of the ``with`` body, in seconds (not set when the body raises); ``announce``:
    also name the phase in a log (:func:`lit_edit.progress.phase`)."""
    start = time.perf_counter()
    with phase(announce) if announce else nullcontext():
        yield
    into[key] = time.perf_counter() - start
