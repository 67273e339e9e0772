"""The resumable edit stream: :class:`StreamCursor`, :class:`EditLoader` and :class:`EditDataModule`."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from lit_edit.data.readers import READERS, read_requests
from lit_edit.data.records import ZSRE_TARGET_FIELDS, _check_on_invalid
from lit_edit.requests import EditRequest

log = logging.getLogger("lit_edit.data")


class StreamStateError(ValueError):
    """A saved stream position does not fit the stream being read (the data or batching changed)."""


def stream_fingerprint(requests: list[EditRequest]) -> str:
    """A short hash of the stream's case ids, in order: changes if the data, order, split,
    offset or limit changed, so a resumed run cannot silently continue on a different stream."""
    digest = hashlib.sha256("\n".join(repr(r.case_id) for r in requests).encode("utf-8"))
    return digest.hexdigest()[:16]


def concatenated(dataset: str, paths: list[str], split: str, limit: int | None,
                 options: dict[str, Any]) -> list[EditRequest]:
    """The requests of several files (``data.path`` as a list) as one stream, in order, case ids prefixed with
    their file's stem (``counterfact_sample:18``), at most ``limit`` requests."""
    stems = [Path(p).stem if Path(p).suffix else Path(p).name for p in paths]
    if len(set(stems)) < len(stems):
        twice = sorted(s for s in stems if stems.count(s) > 1)[0]
        raise ValueError(f"data.path: two of {paths} have the same name {twice!r}, which prefixes their case ids; "
                         f"rename or copy one")
    out: list[EditRequest] = []
    for path, stem in zip(paths, stems):
        left = None if limit is None else limit - len(out)
        if left is not None and left <= 0:
            break
        part = read_requests(dataset, path, split=split, limit=left, **options)
        out += [dataclasses.replace(r, case_id=f"{stem}:{r.case_id}") for r in part]
    return out


def without_repeats(requests: list[EditRequest]) -> list[EditRequest]:
    """``requests`` less those that repeat an earlier one exactly: the same fact (``fact_id``) and new target."""
    seen: set = set()
    kept = []
    for r in requests:
        key = (r.op, r.fact_id, getattr(r, "target_new", None) or getattr(r, "answer", None))
        if key not in seen:
            seen.add(key)
            kept.append(r)
    if len(kept) < len(requests):
        log.warning("data.drop_repeats: dropped %d of %d requests that repeat an earlier edit of the same fact to "
                    "the same target", len(requests) - len(kept), len(requests))
    return kept


def shuffled(requests: list[EditRequest], seed: int | None, source: str) -> list[EditRequest]:
    """``requests`` in the order of a seeded permutation (``data.order_seed``), or unchanged for ``None``. A stream
    with a ``replace`` or ``remove`` is refused: its order is part of its meaning."""
    if seed is None:
        return requests
    ordered = [r for r in requests if r.op != "insert"]
    if ordered:
        raise ValueError(f"data.order_seed={seed}: the edit stream ({source}) has {len(ordered)} request(s) whose "
                         f"order matters (op {ordered[0].op!r}, case_id={ordered[0].case_id!r}); edit it in file "
                         f"order (data.order_seed: null)")
    perm = torch.randperm(len(requests), generator=torch.Generator().manual_seed(seed)).tolist()
    return [requests[i] for i in perm]


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
            ``"world_long"`` the long-form records are generated from the world's spec alone). A list of
            them is one stream, the files in order, each read by the same reader; its case ids become
            ``"<file stem>:<case id>"`` (two benchmarks' ids may coincide), e.g. CounterFact then the MQuAKE-CF
            rewrites: ``[../shared/data/counterfact_sample.json, ../shared/data/akew_mquake.json]``.
        split: dataset split.
        limit: number of requests in the stream (after ``offset``); ``None`` = all.
        batch_size: edits per training step.
        offset: skip the first ``offset`` requests (e.g. to edit records 1000..1999).
        target_field: ZsRE only, ``"answers"`` (MEMIT) or ``"alt"`` (EasyEdit).
        on_invalid: ``"raise"`` on an invalid record, or ``"skip"`` it with a logged warning. This also holds for
            requests the model cannot run (longer than its context), which the editing module finds at set-up
            and drops from the stream through :meth:`drop_requests`.
        order_seed: ``None`` keeps the file's order; an integer edits the same requests (``offset .. offset+limit``)
            in an order shuffled with that seed, so a result's spread over record orders can be measured. Only for
            streams of inserts: a ``replace`` or ``remove`` must follow the edit it refers to.
        drop_repeats: drop a request that repeats an earlier one of the stream exactly (the same fact and the same
            new target; MQuAKE-CF's cases share rewrites), logged with its count; applied before ``offset`` and
            ``limit``. A fact given a *different* target later stays: that is the solver's ``on_conflict``.

    The editing callback must call :meth:`mark_applied` after each successfully applied batch;
    that count is what checkpoints save and what a resumed run starts from.
    """

    def __init__(
        self,
        dataset: str = "world",
        path: str | list[str] = "world",
        split: str = "train",
        limit: int | None = None,
        batch_size: int = 20,
        offset: int = 0,
        target_field: str = "answers",
        on_invalid: str = "raise",
        order_seed: int | None = None,
        drop_repeats: bool = False,
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
        if order_seed is not None and (isinstance(order_seed, bool) or not isinstance(order_seed, int)
                                       or order_seed < 0):
            raise ValueError(f"data.order_seed must be null or an integer >= 0, got {order_seed!r}")
        if not isinstance(drop_repeats, bool):
            raise ValueError(f"data.drop_repeats must be true or false, got {drop_repeats!r}")
        if not isinstance(path, str) and (not isinstance(path, (list, tuple)) or not path
                                          or not all(isinstance(p, str) and p for p in path)):
            raise ValueError(f"data.path must be a path or a non-empty list of paths, got {path!r}")
        self.save_hyperparameters()
        self.dataset, self.path, self.split, self.limit = dataset, path, split, limit
        self.batch_size, self.offset = batch_size, offset
        self.target_field, self.on_invalid, self.order_seed = target_field, on_invalid, order_seed
        self.drop_repeats = drop_repeats
        self.requests: list[EditRequest] = []
        self._cursor: StreamCursor | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- reading -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the stream once; later calls (every ``fit``, every stage) keep it and its position. Every call hands
        it to the module being fitted."""
        self._check_no_distributed_sampler()  # here too: before the run directory is claimed, not at the first batch
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
        # enough records for offset + limit (each gives at least one request), unless repeats are dropped first
        read_limit = None if self.limit is None or self.drop_repeats else self.offset + self.limit
        if isinstance(self.path, str):
            requests = read_requests(self.dataset, self.path, split=self.split, limit=read_limit, **options)
        else:
            requests = concatenated(self.dataset, list(self.path), self.split, read_limit, options)
        if self.drop_repeats:
            requests = without_repeats(requests)
        end = None if self.limit is None else self.offset + self.limit
        return shuffled(requests[self.offset : end], self.order_seed, f"{self.dataset} at {self.path!r}")

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

    def pending_batches(self) -> list[list[EditRequest]]:
        """The batches not applied yet, in order, as the train loader will give them (a fit plans their operations
        before the first edit: :func:`lit_edit.editing.check_operations`)."""
        cursor = self._require_cursor()
        size = cursor.batch_size
        return [self.requests[b * size: (b + 1) * size] for b in range(cursor.consumed, cursor.n_batches)]

    def mark_applied(self, n_batches: int = 1) -> None:
        """Record that the next ``n_batches`` batches of the stream have been edited into the model."""
        self._require_cursor().advance(n_batches)

    def drop_requests(self, case_ids) -> None:
        """Drop requests from the stream after :meth:`setup`, before any batch is applied.

        For checks that need the model, which the data module does not have: with ``on_invalid="skip"``,
        :func:`lit_edit.data.lengths.fitting_requests` drops the requests that do not fit its context here, in
        ``EditModule.configure_model``. The cursor is rebuilt on the filtered stream, so checkpoints save *its* size and
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

    def test_dataloader(self) -> EditLoader:
        """The whole stream in order, for an evaluate-only run (``train.py test``): nothing is applied and the
        stream's position (a checkpoint's, if one is given) is left as it is."""
        self._check_no_distributed_sampler()
        self._require_cursor()
        return EditLoader(self.requests, self.batch_size)

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
