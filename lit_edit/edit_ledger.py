"""The aligned solvers' ledger of applied edits, on disk (docs/algorithms.md §6.6; OTE–SE Prop. 3.5, App. A.6).

Removing or replacing an edit needs, per edited layer, the key k of every live edit and the value v = W_before k + r
it was fitted to (§12.8). Both grow with the number of edits, so they are kept neither in memory nor in checkpoints:
they go to a directory (``<run_dir>/solver_ledger``, :func:`lit_edit.runs.solver_ledger_dir`) that is appended to
once per step and read only when an edit is removed or replaced.

* ``index.jsonl`` — one line per step that changed the ledger: ``{"remove": [fact ids], "add": [fact ids], "file":
  "00000007.safetensors" or null, "bytes": <file size>, "sha256": {tensor: hex}}``. A line's removals come before its
  additions (the order of :func:`lit_edit.editing.apply_batch`); a removal drops every live entry of the fact.
* ``<line>.safetensors`` — the line's added entries: ``K.<layer>`` (d_in × n) and ``V.<layer>`` (d_out × n) in the
  solver's dtype; column j belongs to ``add[j]``.

In memory: the (line, column) of every live entry by fact id (for ``knows`` and the ledger order; tens of bytes per
edit, no tensors), the number of lines and a chained SHA-256 over them. A checkpoint stores those two (:meth:`state`);
restoring one (a resume, or a rolled-back step) truncates the index to its lines and deletes later shards, and refuses
a ledger that is shorter, altered, or has a missing or resized shard, naming the file, before it changes anything;
:meth:`EditLedger.check` makes the same checks and changes nothing (a fit checks every rank's copy before any is cut). Every tensor read back is
checked against the hash recorded when it was written.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lit_edit import runs

INDEX = "index.jsonl"


class EditLedger:
    """Per edited layer, the key and stored value of every live edit (see the module docstring for the format)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None  # the directory when no run directory was attached
        self.lines, self.digest = 0, ""
        self.live: dict[str, list[tuple[int, int]]] = {}  # fact id -> (line, column) of its live entries
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's (K, V) per layer
        self._removed: list[str] = []  # this step's removals (already out of ``live``)
        self._expect: dict | None = None  # a restored state waiting for attach()

    # -- where it lives ---------------------------------------------------------------------------
    def attach(self, directory: str | Path | None) -> None:
        """Keep the ledger in ``directory`` (created if needed); None: a temporary directory, deleted at exit. A
        state restored before (a resume: Lightning loads the checkpoint before the run directory is claimed) is
        checked against the directory's ledger now; otherwise the directory must hold no ledger yet."""
        if self.lines or self._staged or self._removed:
            raise RuntimeError(f"attach the solver's ledger before its first edit (it already holds {self.lines} "
                               f"step(s) in {self.dir})")
        if directory is None:
            self._use_temporary()
            print(f"lit_edit: no run directory: the solver's ledger of edits (keys and values for removals) is kept in "
                  f"the temporary directory {self.dir}, deleted at exit")
        else:
            self._drop_temporary()
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
        expect, self._expect = self._expect, None
        if expect is None:
            _check_empty(self.dir)
            return
        self.restore(expect)

    def check(self, directory: str | Path | None) -> set[str]:
        """What :meth:`attach` would find in ``directory``, read only: the fact ids with a live edit in the ledger of
        the restored state (a resume), or nothing for a new run, whose directory must hold no ledger. Raises as
        :meth:`attach` would (naming the file) and writes nothing, so a fit checks every rank's ledger before it
        cuts any back."""
        if self._expect is None:
            if directory is not None and Path(directory).is_dir():
                _check_empty(Path(directory))
            return set()
        if directory is None:  # attach(None) would find an empty temporary directory
            if int(self._expect["lines"]):
                raise runs.CheckpointError(f"the solver state refers to a ledger of {self._expect['lines']} step(s) "
                                           f"in {self._expect.get('dir')}, and this run has no run directory to find "
                                           f"it in")
            return set()
        live, _ = _verified(Path(directory), self._expect)
        return set(live)

    def _use_temporary(self) -> None:
        self._drop_temporary()
        self._tmp = tempfile.TemporaryDirectory(prefix="lit_edit_solver_ledger_")
        self.dir = Path(self._tmp.name)

    def _drop_temporary(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _where(self) -> Path:
        """The directory, a temporary one if none was attached (a solver used without a fit)."""
        if self._expect is not None:
            raise RuntimeError(f"the solver state refers to a ledger of {self._expect['lines']} step(s) in "
                               f"{self._expect.get('dir')}: call solver.attach(<that directory>) before editing")
        if self.dir is None:
            self._use_temporary()
        return self.dir

    @property
    def index(self) -> runs.Ledger:
        return runs.Ledger(self._where(), INDEX)

    # -- queries ----------------------------------------------------------------------------------
    def knows(self, fact_id: str) -> bool:
        self._where()
        return fact_id in self.live

    def ids(self) -> list[str]:
        """The fact id of every live entry, in ledger order."""
        self._where()
        return [f for _, f in sorted((loc, f) for f, locs in self.live.items() for loc in locs)]

    def __len__(self) -> int:
        return sum(len(v) for v in self.live.values())

    # -- one step ---------------------------------------------------------------------------------
    def stage(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> None:
        """This step's entries of ``layer`` (written by :meth:`append`)."""
        self._staged[layer] = (K.to("cpu", self.dtype), V.to("cpu", self.dtype))

    def remove(self, fact_ids: list[str]) -> None:
        """Drop every live entry of ``fact_ids`` (recorded on disk by the next :meth:`append`)."""
        for f in fact_ids:
            self.live.pop(f, None)
        self._removed += list(fact_ids)

    def append(self, fact_ids: list[str]) -> None:
        """Write the step: one shard of the staged entries (column j = ``fact_ids[j]``), then its index line."""
        where = self._where()
        if not fact_ids and not self._removed:
            self._staged = {}
            return
        for l, (K, _) in self._staged.items():
            if K.shape[1] != len(fact_ids):
                raise ValueError(f"the ledger got {K.shape[1]} keys at layer {l} for {len(fact_ids)} fact ids")
        line = {"remove": self._removed, "add": list(fact_ids), "file": None, "bytes": 0, "sha256": {}}
        if fact_ids:
            tensors = {f"{kind}.{l}": t.contiguous() for l, KV in sorted(self._staged.items())
                       for kind, t in zip("KV", KV)}
            raw = safetensors_bytes(tensors)
            line.update(file=f"{self.lines:08d}.safetensors", bytes=len(raw),
                        sha256={k: runs.tensor_checksum([(k, t)]) for k, t in tensors.items()})
            runs.atomic_write(where / line["file"], raw)  # the shard first: an index line never names a missing file
        self._advance(runs.Ledger(where, INDEX).append([line]))
        for j, f in enumerate(fact_ids):
            self.live.setdefault(f, []).append((self.lines - 1, j))
        self._staged, self._removed = {}, []

    def _advance(self, line: bytes) -> None:
        self.lines += 1
        self.digest = _chain(self.digest, line)

    # -- reads (removals) -------------------------------------------------------------------------
    def scan(self, layer: int, gone: set[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Shard by shard in ledger order, the live entries of ``layer``: (K of the entries that stay, K and V of
        those of ``gone``). One shard in memory at a time, each tensor checked against its recorded hash."""
        where = self._where()
        if self._staged:
            raise RuntimeError("the solver ledger holds entries of an unfinished step (commit without finish_batch): "
                               "remove edits before a step's commits, as apply_batch does")
        cols: dict[int, list[tuple[int, bool]]] = {}
        for f, locs in self.live.items():
            for i, j in locs:
                cols.setdefault(i, []).append((j, f in gone))
        lines = self.index.complete_lines()
        for i in sorted(cols):
            entry = json.loads(lines[i])
            K, V = (self._read(where / entry["file"], f"{kind}.{layer}", entry["sha256"]) for kind in "KV")
            keep = [j for j, g in sorted(cols[i]) if not g]
            drop = [j for j, g in sorted(cols[i]) if g]
            yield K[:, keep], K[:, drop], V[:, drop]

    def _read(self, path: Path, name: str, sha256: dict) -> torch.Tensor:
        if not path.is_file():
            raise runs.CheckpointError(f"the solver ledger shard {path} is missing")
        with safe_open(str(path), framework="pt") as f:
            if name not in f.keys():
                raise runs.CheckpointError(f"the solver ledger shard {path} holds no {name}")
            t = f.get_tensor(name)
        if runs.tensor_checksum([(name, t)]) != sha256.get(name):
            raise runs.CheckpointError(f"the solver ledger shard {path} is corrupted: {name} does not match the "
                                       f"checksum recorded when it was written")
        return t

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every live entry of ``layer``, in ledger order (tests, diagnostics)."""
        keys, values = [], []
        for _, K, V in self.scan(layer, set(self.live)):  # every live entry as "dropped": its K and V
            keys.append(K), values.append(V)
        if not keys:
            return torch.zeros(0, 0, dtype=self.dtype), torch.zeros(0, 0, dtype=self.dtype)
        return torch.cat(keys, 1), torch.cat(values, 1)

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint (or a step's snapshot) records: the directory, the number of index lines and their
        chained checksum."""
        if self._expect is not None:
            return dict(self._expect)
        return {"dir": str(self.dir) if self.dir is not None else None, "lines": self.lines, "digest": self.digest}

    def restore(self, state: dict) -> None:
        """Return to ``state``: the index truncated to its lines, later shards deleted, the live entries replayed.
        Refuses (naming the file) an index with fewer lines, other lines, or a missing or resized shard."""
        if self.dir is None:  # not attached yet: checked by attach()
            self._expect, self.live, self.lines, self.digest = dict(state), {}, 0, ""
            self._staged, self._removed = {}, []
            return
        n, want = int(state["lines"]), state["digest"]
        if n == self.lines and want == self.digest and not self._staged and not self._removed:
            return  # nothing written since (a step rolled back before its append)
        self.live, self.digest = _verified(self.dir, state)  # every check before the first change
        self.lines = n
        self._cut(n)
        self._staged, self._removed = {}, []

    def _cut(self, n: int) -> None:
        """Drop what was written after the first ``n`` index lines. The index is cut first (one atomic rename),
        then later shards are deleted: a kill in between leaves shards no index line names, deleted by the next
        restore, so the ledger still resumes."""
        runs.Ledger(self.dir, INDEX).truncate(n)
        for shard in self.dir.glob("*.safetensors"):  # of steps after the checkpoint, or of an unfinished append
            if not shard.stem.isdigit() or int(shard.stem) >= n:
                shard.unlink()
        for stale in self.dir.glob(".*.tmp-*"):  # a shard write a killed process never finished
            stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget the directory (a temporary one is deleted)."""
        self._drop_temporary()
        self.dir = None


def _chain(digest: str, line: bytes) -> str:
    """The ledger's chained SHA-256 after one more index line."""
    return hashlib.sha256(digest.encode() + line).hexdigest()


def _check_empty(directory: Path) -> None:
    """A new run's ledger directory must hold nothing (an earlier run's ledger is resumed with its checkpoint)."""
    found = sorted(p.name for p in directory.iterdir())
    if found:
        raise runs.RunDirError(f"the solver ledger directory {directory} already holds {', '.join(found[:3])}"
                               f"{' ...' if len(found) > 3 else ''}: a new run needs an empty one (resume an "
                               f"earlier run with its checkpoint)")


def _verified(directory: Path, state: dict) -> tuple[dict[str, list[tuple[int, int]]], str]:
    """The live entries (fact id -> (line, column)) and the chained checksum of the first ``state["lines"]`` index
    lines of the ledger in ``directory``, read only. Refuses (CheckpointError naming the file) an index with fewer
    lines or other lines than the state's, or a missing or resized shard."""
    n, want = int(state["lines"]), state["digest"]
    index = runs.Ledger(directory, INDEX)
    lines = index.complete_lines()
    if len(lines) < n:
        raise runs.CheckpointError(f"the solver ledger {index.path} holds {len(lines)} step(s), but the checkpoint "
                                   f"was taken after {n}: the ledger was truncated or replaced")
    digest = ""
    for line in lines[:n]:
        digest = _chain(digest, line)
    if digest != want:
        raise runs.CheckpointError(f"the solver ledger {index.path} is not the one the checkpoint was taken with "
                                   f"(its first {n} lines do not match the recorded checksum)")
    live: dict[str, list[tuple[int, int]]] = {}
    for i, line in enumerate(lines[:n]):
        entry = json.loads(line)
        for f in entry["remove"]:
            live.pop(f, None)
        for j, f in enumerate(entry["add"]):
            live.setdefault(f, []).append((i, j))
        if entry["file"] is not None:
            path = directory / entry["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                raise runs.CheckpointError(
                    f"the solver ledger shard {path} is {'missing' if size is None else f'{size} bytes'}, "
                    f"{entry['bytes']} were written: the ledger was truncated or replaced")
    return live, digest


def directory_bytes(path: str | Path | None) -> int:
    """Bytes of the files under ``path`` (the ledger's footprint on disk)."""
    if path is None or not Path(path).exists():
        return 0
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

