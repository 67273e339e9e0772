"""Wall time of a run's phases: the ``time/*_seconds`` scalars (docs/outputs.md)."""
from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(into: dict, key: str):
    """``into[key]`` = the wall time of the ``with`` body, in seconds (not set when the body raises)."""
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start
