"""How a run scores requests on the current model, with the method's evaluator (``lit_edit.methods``).

Under DDP each rank scores its shard of the requests and the torchmetrics states (sums and counts) are reduced by
``compute()``, so every method here is a collective: call it on every rank. Per-record scores (:meth:`Scores.records`)
are the evaluator's full ones unless asked otherwise (the pre-edit and final scores); the means it scores itself
(:meth:`Scores.mean`: the per-batch curve) leave out what the evaluator skips when not ``full`` (generations:
docs/metrics.md). :class:`Scores` also keeps what the final metrics need: the pre-edit scores of the stream and,
under the immediate and independent protocols, each request's scores right after its own batch (both checkpointed
by the module).
"""
from __future__ import annotations

from lit_edit import distributed as dist
from lit_edit.metrics import compute_metrics, make_metrics, update_metrics
from lit_edit.progress import is_interactive, track


CHUNK = 256  # requests scored per call of the evaluator (its own batching is within a call)
# ... when the progress is shown: a real model's pre-edit scoring (generations for fluency) takes seconds per request,
# so a chunk of 256 would be minutes of silence in a log
SHOWN_CHUNK = 16


class Scores:
    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.pre: dict = {}  # case_id -> pre-edit scores, so "pre." covers exactly the edited set
        self.post: dict = {}  # immediate / independent protocols: case_id -> scores right after its own batch
        self.batch_metrics = make_metrics(keys=evaluator.keys)

    def records(self, env, requests: list, desc: str | None = None, full: bool = True) -> dict:
        """case_id -> scores of ``requests``; each rank scores its shard and every rank gets the union. ``desc``:
        show the progress (rank 0; a bar, or lines in a log: lit_edit.progress) of a long scoring, e.g. the pre-edit
        evaluation of a real stream; ``full``: the evaluator's costly metrics too (generations), as metrics.json has
        them."""
        mine = [requests[i] for i in dist.shard(len(requests))]
        scores = []
        chunk = CHUNK  # shown: smaller chunks, a generate() batch's worth when generations are scored
        if desc is not None:
            chunk = getattr(self.evaluator, "shown_chunk", SHOWN_CHUNK) if full else SHOWN_CHUNK
        with track(total=len(mine), desc=desc, unit="req", disable=desc is None or dist.rank() != 0 or
                   len(mine) <= chunk) as bar:
            for start in range(0, len(mine), chunk):  # chunks: the same scores, a live progress bar
                scores += self.evaluator.scores(env, mine[start:start + chunk], full=full)
                bar.update(len(mine[start:start + chunk]))
        parts = dist.all_gather_objects(list(zip([r.case_id for r in mine], scores)))
        return dict(pair for part in parts for pair in part)

    def mean(self, env, requests: list, scores: list[dict] | None = None, metrics=None, device=None) -> dict:
        """Mean scores of ``requests`` (or of precomputed per-record ``scores``)."""
        keys = self.evaluator.keys
        metrics = make_metrics(keys=keys).to(device) if metrics is None else metrics
        metrics.reset()
        if scores is None:
            mine = [requests[i] for i in dist.shard(len(requests))]
            scores = self.evaluator.scores(env, mine, full=False) if mine else []
        else:
            scores = [scores[i] for i in dist.shard(len(scores))]
        update_metrics(metrics, scores)
        return compute_metrics(metrics, keys)

    def batch(self, env, writes: list, keep: bool, device) -> dict:
        """The scores of a batch right after its write; ``keep``: remember them per record (the final metrics of the
        immediate and independent protocols)."""
        if not keep:
            return self.mean(env, writes, metrics=self.batch_metrics.to(device))
        got = self.records(env, writes)
        self.post.update(got)
        return self.mean(env, [], [got[r.case_id] for r in writes], metrics=self.batch_metrics.to(device))

    def tested(self, env, requests: list, n_edits: int, device) -> tuple[dict, list[dict]] | None:
        """A test's metrics over the ``requests`` it scored (kept in ``post``), with the checkpoint's pre-edit values
        (on the unedited model, ``n_edits`` 0, ``pre.*`` equals the scores), and the per-record scores; None when
        nothing was scored."""
        scored = [r for r in requests if r.case_id in self.post]
        if not scored:
            return None
        if not n_edits:
            self.pre = dict(self.post)
        result, per_record = self.final(env, scored, True, device)
        return {**result, "n_edits": n_edits}, per_record

    def final(self, env, edited: list, kept: bool, device) -> tuple[dict, list[dict]]:
        """The final metrics over the live edits with their pre-edit values, and the per-record scores: the scores
        kept right after each batch (``kept``), else those of the current model."""
        # in a log, lines while scoring; on a terminal no bar under Lightning's live one (the fit's end)
        post = self.post if kept else self.records(env, edited, None if is_interactive() else "final scores")
        final = self.mean(env, [], [post[r.case_id] for r in edited], device=device)
        pre = [self.pre[r.case_id] for r in edited if r.case_id in self.pre]
        pre_scores = self.mean(env, [], pre, device=device) if pre else {}
        result = {**final, **{f"pre.{k}": v for k, v in pre_scores.items()}, "n_edits": len(edited)}
        per_record = [{"case_id": r.case_id, **post[r.case_id],
                       **{f"pre.{k}": v for k, v in self.pre.get(r.case_id, {}).items()},
                       **self.evaluator.info(env, r)} for r in edited]
        return result, per_record


class LiveEdits:
    """The edits live in the model, in the order they were applied: a replaced or removed fact leaves the set."""

    def __init__(self) -> None:
        self.requests: dict = {}  # case_id -> request of the stream
        self.ids: list = []
        self.n_removed = 0

    def connect(self, requests: list) -> None:
        self.requests = {r.case_id: r for r in requests}

    def record(self, requests: list, dropped: list[str]) -> None:
        """After a successful write of ``requests``: ``dropped`` are the fact ids the solver forgot or replaced."""
        if dropped:
            gone = set(dropped)
            self.ids = [i for i in self.ids if self.requests[i].fact_id not in gone]
            self.n_removed += sum(r.op == "remove" for r in requests)
        self.ids.extend(r.case_id for r in requests if r.writes)

    def edited(self) -> list:
        return [self.requests[i] for i in self.ids]
