"""Edit-request streams: benchmark readers and the resumable :class:`EditDataModule`.

A run is one pass (one epoch) over a stream of :class:`~lit_edit.requests.EditRequest`; each
training step applies one batch of edits. Three pieces:

* **Readers** turn benchmark records (loaded through HF ``datasets``, from a local JSON/JSONL
  file or directory, or a hub id) into validated requests: :func:`read_counterfact`,
  :func:`read_zsre`, the ``"world"`` reader (CounterFact schema, ``source="world"``), and the
  dispatcher :func:`read_requests`. Unstructured benchmarks give
  :class:`~lit_edit.requests.UnstructuredRequest`: :func:`read_unke`, :func:`read_akew`
  (MQuAKE-CF and CounterFact formats), :func:`read_editeverything`, :func:`read_world_long`
  (the fact world's long-form paragraphs); :func:`check_lengths` checks them against a model's
  context (:func:`check_structured_lengths` the structured ones). Every request is validated when it
  is read, so a bad record
  fails at load time with an :class:`~lit_edit.requests.EditRequestError` naming its case id and
  field, not halfway through an editing run.
* :class:`StreamCursor` records how many batches of the stream have been *applied*.
* :class:`EditLoader` / :class:`EditDataModule` batch the stream in order and checkpoint the
  cursor, so ``Trainer.fit(ckpt_path=...)`` continues with the first unapplied batch.

Why the cursor counts *applied* batches rather than batches handed out: Lightning's fetcher
prefetches one batch ahead, so a loader that counted its own yields would be one ahead of the
edits actually written into the model when a checkpoint is saved. The editing callback calls
:meth:`EditDataModule.mark_applied` after each successful step instead (it must run before
``ModelCheckpoint`` in ``on_train_batch_end``; Lightning orders checkpoint callbacks last).

Distributed runs: the module does its own batching. Every rank gets the same, full batch (the
editing module shards it, gathers keys and targets, and applies the identical update on every
rank), so the trainer must not inject a ``DistributedSampler``: use
``Trainer(use_distributed_sampler=False)``.
"""
from __future__ import annotations

from lit_edit.data.files import (EditDataError, RECORD_SUFFIXES, check_records_file, load_records,  # noqa: F401
                                 looks_like_local_path)
from lit_edit.data.lengths import (check_length, check_lengths, check_structured_length,  # noqa: F401
                                   check_structured_lengths, request_lengths)
from lit_edit.data.longform import AKEW_REWRITES, read_akew, read_editeverything, read_unke, read_world_long  # noqa: F401
from lit_edit.data.readers import (READERS, WORLD_SPEC_READERS, config_requests, read_requests,  # noqa: F401
                                   requests_from_records, resolve_records_path)
from lit_edit.data.records import ON_INVALID, ZSRE_TARGET_FIELDS, check_unique_case_ids, is_world_spec  # noqa: F401
from lit_edit.data.structured import read_counterfact, read_world, read_zsre  # noqa: F401
from lit_edit.data.stream import (EditDataModule, EditLoader, StreamCursor, StreamStateError,  # noqa: F401
                                  collate_requests, stream_fingerprint)
