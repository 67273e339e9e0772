"""A run's files: one directory, one complete record, written so that no crash leaves a half-written file.

* :func:`atomic_write` — every file a run writes whole (``metrics.json``, ``scores.jsonl``, a rolled-back
  ledger, checkpoints) goes to a temporary file in the same directory, is flushed to disk and renamed over the
  final name. A failed write (disk full, a kill) leaves the previous file intact and raises with the path.
* :class:`AtomicCheckpointIO` — Lightning's checkpoint I/O through :func:`atomic_write`; a checkpoint that cannot
  be read is reported with its path instead of a bare ``EOFError`` or zip error.
* :func:`tensor_checksum` — a SHA-256 of tensors' bytes, stored in a checkpoint and verified on load, so a
  corrupted checkpoint is refused at once rather than failing steps later in a Cholesky factorisation.
* :class:`Ledger` — ``edits.jsonl``, one line per applied request. Lines are appended after each step; a
  checkpoint records how many lines existed when it was taken, and a resume truncates the ledger back to that
  count, so after any crash + resume it holds exactly the applied edits, each once. The solver's ledger of keys
  and values (``solver_ledger/``, :mod:`lit_edit.edit_ledger`) keeps its index the same way.
* :class:`RunLock` — an exclusive ``flock`` on ``<run_dir>/.lock`` for the life of a fit, so two fits never
  write into one directory at once (the kernel drops it when the process dies, so a ``kill -9`` leaves no
  stale lock).
* :func:`check_export_dir` / :func:`write_export` — ``model.export_dir`` checked before the first edit (writable;
  empty, this run's own earlier export, or released with ``model.export_replace``) and filled whole at the end.

Every check here reads only (:meth:`Ledger.check`, ``Ledger.truncate`` checks again before it cuts), so that
:class:`lit_edit.callbacks.RunRecord` can check everything before it writes anything.
* :func:`compare_settings` — a resume is strict: every setting that changes the result is stored in the
  checkpoint and compared; a difference stops the run before any edit, naming the setting and both values.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

LEDGER = "edits.jsonl"
METRICS = "metrics.json"
SCORES = "scores.jsonl"
CHECKPOINTS = "checkpoints"
SOLVER_LEDGER = "solver_ledger"  # the solver's keys and values of applied edits (lit_edit.edit_ledger)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (in use, already holds another run, wrong place to resume)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is corrupted, or does not belong to this run's settings."""


# ------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same directory (same file system,
    so the rename is atomic), flushed and fsync'ed, then renamed over ``path``. ``data`` may be a function that
    writes to the open file (a checkpoint streams to disk instead of being held in memory a second time).
    A failure raises :class:`OSError` naming ``path`` (for a full disk: "no space left on device")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    sink = None
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                sink = _RecordingFile(f)
                data(sink)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos":
        # the OSError it swallowed says what happened
        cause = err if isinstance(err, OSError) else sink.error if sink is not None else None
        if cause is not None:
            raise write_error(path, cause) from err
        raise


def write_error(path: Path, err: OSError) -> OSError:
    """An OSError (same errno) naming ``path``, saying in words what happened, and that the old file stays."""
    return OSError(err.errno, f"could not write {path}: {_in_words(err)}; the previous version, if any, is intact")


def _in_words(err: BaseException) -> str:
    """What a failed write says, a full disk as "no space left on device" (also when a library, e.g. safetensors,
    wraps the OSError in its own error)."""
    if isinstance(err, OSError):
        return "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    full = "no space left on device" in str(err).lower() or "StorageFull" in str(err)
    return f"no space left on device ({type(err).__name__}: {err})" if full else f"{type(err).__name__}: {err}"


class _RecordingFile:
    """A file that remembers the first OSError of a write, for writers that replace it by their own error. A short
    write (a disk filling up) is continued, so that it ends in the OSError that says why."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.error = f, None

    def write(self, b) -> int:
        view, done = memoryview(b).cast("B"), 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, "the file took no more bytes")
                done += n
        except OSError as err:
            self.error = self.error or err
            raise
        return done

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`atomic_write` (streamed to the temporary file); loading names the file on any
    failure."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        if p.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {p} is empty (0 bytes): a failed or interrupted write")
        try:
            return torch.load(p, map_location=map_location or "cpu", weights_only=True if weights_only is None
                              else weights_only)
        except Exception as err:  # zip, pickle or storage errors: name the file
            raise CheckpointError(f"checkpoint {p} cannot be read ({type(err).__name__}: {err}); it is corrupted or "
                                  f"not a lit_edit checkpoint") from err


def tensor_checksum(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in the given order."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def state_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list state, with its path, in a deterministic (sorted-key) order."""
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            out.extend(state_tensors(obj[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.extend(state_tensors(v, f"{prefix}[{i}]"))
    return out


def _edit_checksum(checkpoint: dict) -> str:
    """SHA-256 of a checkpoint's edited matrices and solver state."""
    state = checkpoint["lit_edit"]
    return tensor_checksum(state_tensors({"state_dict": checkpoint.get("state_dict", {}), "solver": state["solver"]}))


def seal_checkpoint(checkpoint: dict, state: dict) -> None:
    """Store lit_edit's ``state`` in ``checkpoint`` with the checksum :func:`open_checkpoint` verifies."""
    checkpoint["lit_edit"] = state
    state["checksum"] = _edit_checksum(checkpoint)


def open_checkpoint(checkpoint: dict, path) -> dict:
    """lit_edit's state of a checkpoint, refused (CheckpointError naming ``path``) when it was not written by this
    version or its edited weights / solver state are not the ones sealed."""
    state = checkpoint.get("lit_edit")
    if state is None or "checksum" not in state or "settings" not in state:
        raise CheckpointError(f"checkpoint {path} was not written by this version of lit_edit (it has no checksum "
                              f"and settings record); start a new run")
    if _edit_checksum(checkpoint) != state["checksum"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: the checksum of its edited weights and solver state "
                              f"does not match the one recorded when it was written")
    return state


# ------------------------------------------------------------------------------------------------
# The ledger
# ------------------------------------------------------------------------------------------------


class Ledger:
    """``<run_dir>/edits.jsonl`` (or another ``name``): one JSON line per record, appended step by step."""

    def __init__(self, run_dir: str | os.PathLike, name: str = LEDGER):
        self.path = Path(run_dir) / name

    def append(self, lines: list[dict]) -> bytes:
        """Append one step's lines in one write, flushed to disk (a crash mid-write leaves at most a partial last
        line, which :meth:`truncate` drops on resume). Returns the bytes written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw = "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")
        try:
            with open(self.path, "ab") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise OSError(err.errno, f"could not append to the ledger {self.path}: {_in_words(err)}") from err
        return raw

    def complete_lines(self) -> list[bytes]:
        """The ledger's complete lines (a partial last line, from a crash mid-write, is not one)."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        return [line + b"\n" for line in lines[:-1]]  # the part after the last newline is partial or empty

    def check(self, n: int) -> list[bytes]:
        """The ledger's complete lines, refused (CheckpointError naming the file) unless its first ``n`` lines (those of
        the steps a checkpoint holds) are there and valid JSON. Reads only."""
        lines = self.complete_lines()
        if len(lines) < n:
            raise CheckpointError(f"the ledger {self.path} holds {len(lines)} complete lines, but the checkpoint was "
                                  f"taken after {n}: the ledger was truncated or replaced")
        for i, line in enumerate(lines[:n]):
            try:
                json.loads(line)
            except ValueError as err:
                raise CheckpointError(f"the ledger {self.path} line {i + 1} is not valid JSON ({err})") from err
        return lines

    def truncate(self, n: int) -> int:
        """Keep the first ``n`` lines (see :meth:`check`), atomically; returns how many were dropped."""
        lines = self.check(n)
        size = self.path.stat().st_size if self.path.exists() else 0
        kept = b"".join(lines[:n])
        if len(kept) != size:
            atomic_write(self.path, kept)
        return len(lines) - n


# ------------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``, held until :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._f = None

    def acquire(self, announce: bool = True) -> None:
        """Take the lock or raise :class:`RunDirError`. ``announce`` writes this process's pid into the file; a fit
        takes the lock without it and calls :meth:`announce` once its checks have passed, so that a refused fit leaves
        the file as it was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run directory {self.path.parent} is in use by {holder}: two fits cannot write into "
                              f"one run directory at once") from None
        self._f = f
        if announce:
            self.announce()

    def announce(self) -> None:
        """Write this process's pid into the lock file (what a refused fit names)."""
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes that a killed process never finished (call it holding the lock)."""
    d = Path(run_dir)
    stale = [p for folder in (d, d / CHECKPOINTS) if folder.is_dir() for p in folder.glob(".*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def run_outputs(run_dir: str | os.PathLike) -> list[str]:
    """The files of an editing run already in ``run_dir`` (what makes it "not empty" for a new fit)."""
    d = Path(run_dir)
    found = [name for name in (LEDGER, METRICS, SCORES) if (d / name).exists()]
    if any((d / CHECKPOINTS).glob("*.ckpt")):
        found.append(f"{CHECKPOINTS}/*.ckpt")
    found += [f"{p.name}/" for p in sorted(d.glob(f"{SOLVER_LEDGER}*")) if p.is_dir() and any(p.iterdir())]
    return found


def solver_ledger_dir(run_dir: str | os.PathLike | None, rank: int = 0) -> Path | None:
    """The directory of the solver's ledger of applied edits in a run directory: ``solver_ledger`` for rank 0,
    ``solver_ledger.rank<r>`` for the other ranks of a DDP run (each keeps its own identical copy, so no rank reads
    another's files); None without a run directory."""
    if run_dir is None:
        return None
    return Path(run_dir) / (SOLVER_LEDGER if rank == 0 else f"{SOLVER_LEDGER}.rank{rank}")


def stale_rank_ledgers(run_dir: str | os.PathLike, world_size: int) -> list[Path]:
    """The solver ledgers of ranks that a run resumed on fewer devices no longer has (``solver_ledger.rank<r>``,
    r ≥ ``world_size``): their copies stop at the checkpoint, so no later checkpoint of the run could use them."""
    return sorted(p for p in Path(run_dir).glob(f"{SOLVER_LEDGER}.rank*") if p.is_dir()
                  and p.name.rsplit("rank", 1)[1].isdigit() and int(p.name.rsplit("rank", 1)[1]) >= world_size)


def checkpoint_run_dir(ckpt_path: str | os.PathLike | None, recorded: str | None) -> Path | None:
    """The run directory a checkpoint belongs to: ``<run_dir>/checkpoints/<file>`` (where ModelCheckpoint puts
    it, so a moved run directory still resumes), else the directory recorded in the checkpoint."""
    p = Path(ckpt_path).resolve() if ckpt_path else None
    if p is not None and p.parent.name == CHECKPOINTS:
        return p.parent.parent
    return Path(recorded).resolve() if recorded else None


# ------------------------------------------------------------------------------------------------
# The exported model
# ------------------------------------------------------------------------------------------------

EXPORT_MARK = "lit_edit_export.json"  # in an export: which run directory wrote it


class ExportDirError(RuntimeError):
    """``model.export_dir`` cannot take this run's export."""


def check_export_dir(path: str | os.PathLike, run_dir: Path | None, replace: bool) -> None:
    """Refuse, naming ``model.export_dir``, an export directory that this run could not fill at its end: one that is a
    file, the run directory or above it, not writable, or not empty and neither this run's own earlier export nor
    released with ``model.export_replace``. Writes nothing but a probe folder next to it, removed at once."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ExportDirError(f"model.export_dir {p} is a file, not a directory")
    if run_dir is not None and (p == run_dir.resolve() or p in run_dir.resolve().parents):
        raise ExportDirError(f"model.export_dir {p} would replace the run directory {run_dir}: export elsewhere")
    if p.is_dir() and any(p.iterdir()) and not replace:
        owner = export_owner(p)
        if owner is None or run_dir is None or owner != str(run_dir.resolve()):
            held = f"the export of the run {owner}" if owner else "files that are not a lit_edit export"
            raise ExportDirError(f"model.export_dir {p} is not empty: it holds {held}. Export to an empty directory, "
                                 f"or pass --model.export_replace true to replace it")
    _check_writable(p.parent, "model.export_dir", p)


def _check_writable(folder: Path, setting: str, target: Path) -> None:
    """Whether a folder can be created in ``folder`` (or in its nearest existing parent, where the missing ones would
    be made): an actual try, since permission bits say nothing for root or a read-only file system."""
    existing = next(d for d in (folder, *folder.parents) if d.exists())
    try:
        Path(tempfile.mkdtemp(prefix=".lit_edit-probe-", dir=existing)).rmdir()
    except OSError as err:
        raise ExportDirError(f"{setting} {target} cannot be written: {existing} is not writable "
                             f"({err.strerror or err})") from err


def export_owner(path: Path) -> str | None:
    """The run directory recorded in an export written by :func:`write_export`, else None."""
    try:
        return json.loads((path / EXPORT_MARK).read_text())["run_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_export(path: str | os.PathLike, write: Callable[[Path], Any], run_dir: Path | None) -> None:
    """Fill ``path`` whole: ``write(folder)`` fills a temporary folder next to it, which then replaces ``path`` by
    renames, with a mark naming ``run_dir``. A failure (a full disk) raises naming ``path`` and leaves an earlier
    export as it was. (Between the two renames the old export is at ``.<name>.old-<pid>`` next to it.)"""
    p = Path(path).expanduser().resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = p.parent / f".{p.name}.tmp-{os.getpid()}", p.parent / f".{p.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        atomic_write(tmp / EXPORT_MARK, json.dumps({"run_dir": str(run_dir.resolve()) if run_dir else None}))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):  # an interrupt
            raise
        msg = f"could not export the edited model to model.export_dir {p}: {_in_words(err)}; an earlier export " \
              f"there, if any, is intact"
        raise (OSError(err.errno, msg) if isinstance(err, OSError) else ExportDirError(msg)) from err
    if p.exists():
        os.replace(p, old)
    os.replace(tmp, p)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Strict resume
# ------------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"prefix.a.b": 1}``; lists and scalars are leaves."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: tree}


_ABSENT = "<not set>"
FIXED = ("model.layers", "model.solver.class_path")  # settings no allow_changed can release


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, this run's value) for every setting that differs. A setting the checkpoint does
    not have (it was written before the setting existed) and this run leaves null or false is the same: a new
    option's null or false is the behaviour from before it (``data.order_seed``, ``data.drop_repeats``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if a is _ABSENT and (b is None or b is False):
            continue
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append((key, a, b))
    return out


def compare_settings(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str],
                     ckpt_path: str | None) -> list[tuple[str, Any, Any]]:
    """Raise :class:`CheckpointError` naming every changed setting not in ``allowed`` (a setting or a prefix of
    settings, e.g. ``model.method``); return the allowed changes (the caller reports them)."""
    allowed = list(allowed)
    # the checkpoint's solver state and weights are per layer and per solver: these can never change on resume
    ok = lambda key: key not in FIXED and any(key == a or key.startswith(a + ".") for a in allowed)  # noqa: E731
    changes = changed_settings(saved, current)
    bad = [c for c in changes if not ok(c[0])]
    if bad:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, this run {b!r}" for k, a, b in bad)
        names = ", ".join(k for k, _, _ in bad)
        raise CheckpointError(
            f"cannot resume from {ckpt_path}: {len(bad)} setting(s) differ from the run that wrote it:\n{lines}\n"
            f"Resume with the checkpoint's values, or, to change them on purpose, pass "
            f"--model.allow_changed '[{names}]'.")
    return changes
