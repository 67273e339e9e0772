"""Progress of a run's long phases, on a terminal or in a log (README, "Outputs and monitoring").

On a terminal (stderr is a TTY) long loops show tqdm bars and the fit shows Lightning's bar
(``lit_edit.callbacks``). In a log (``> run.log 2>&1``, a cluster job) a bar is useless, so the run prints
plain lines to stderr instead: ``[lit_edit] C0 statistics ...`` / ``... done in 12.3s`` around each set-up phase
(:func:`phase`), a line at most every 30 s in a long loop (:func:`track`) and a line per editing step.
``LIT_EDIT_PROGRESS=lines`` or ``bars`` overrides the choice. Only rank 0 prints; each line is one write, so
nested or concurrent use never splits a line.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

from lit_edit import distributed as dist

INTERVAL = 30.0  # seconds between two lines of a loop in a log
clock = time.monotonic  # the clock of every line here (tests replace it)
_lock = threading.Lock()


def is_interactive() -> bool:
    """Bars (a terminal) rather than lines (a log): ``LIT_EDIT_PROGRESS=bars|lines``, else whether stderr is a TTY."""
    mode = os.environ.get("LIT_EDIT_PROGRESS", "").strip().lower()
    if mode in ("bars", "lines"):
        return mode == "bars"
    return getattr(sys.stderr, "rich_proxied_file", sys.stderr).isatty()  # the terminal under a Rich live bar too


def say(message: str) -> None:
    """Print ``[lit_edit] message`` to stderr as one line, flushed (rank 0 only; stdout flushed first, so a log
    of both streams keeps their order)."""
    if dist.rank() != 0:
        return
    with _lock:
        sys.stdout.flush()
        sys.stderr.write(f"[lit_edit] {message}\n")
        sys.stderr.flush()


def hms(seconds: float) -> str:
    """A duration as ``42s``, ``4m10s`` or ``2h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(elapsed: float, done: float, total: float | None) -> str:
    """`` | eta 3m10s`` at the mean rate so far; empty when nothing is done yet or the total is unknown."""
    if not done or total is None or total == float("inf"):
        return ""
    return f" | eta {hms(elapsed / done * max(total - done, 0))}"


@contextmanager
def phase(name: str):
    """``[lit_edit] name ...`` before the body and ``[lit_edit] name done in 12.3s`` after it, in a log only."""
    if is_interactive():
        yield
        return
    say(f"{name} ...")
    start = clock()
    yield
    say(f"{name} done in {clock() - start:.1f}s")


class Lines:
    """tqdm's interface (iterate, ``update``, ``with``, ``close``) printing lines: the first at once, then at most
    one every ``interval`` seconds, and the last on close."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it",
                 interval: float = INTERVAL) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc or "progress", unit, interval
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.start = 0, clock()
        self.printed, self.closed = self.start, False
        self._print()

    def _print(self, last: bool = False) -> None:
        elapsed = clock() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        tail = " | done" if last else eta(elapsed, self.n, self.total)
        say(f"{self.desc}: {count} {self.unit} | elapsed {hms(elapsed)}{tail}")
        self.printed = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        if clock() - self.printed >= self.interval:
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(last=True)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it",
          disable: bool = False, mininterval: float = 0.1, interval: float = INTERVAL):
    """A progress bar over ``iterable`` (or updated by hand: ``with track(total=n) as bar: bar.update(k)``): tqdm
    on a terminal, :class:`Lines` every ``interval`` seconds in a log; nothing when ``disable``."""
    if disable or is_interactive():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, mininterval=mininterval)
    return Lines(iterable, desc, total, unit, interval)
