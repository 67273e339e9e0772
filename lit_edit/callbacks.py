"""The callbacks of an editing fit, added by ``EditModule.configure_callbacks`` in this order.

* ``lit_edit.editing.ClosedFormEdit`` — the write: applies each step's plan with the solver (atomically,
  docs/algorithms.md §4), advances the stream cursor, lets the method measure the write, updates the module's live
  edit set and the batch's scores, checks that the ranks agree and, under the independent protocol, restores
  weights and solver. It lives with the write itself, so one edit reads top-down in one file.
* :class:`RunRecord` — the run's record: checks everything a fit can check before its first edit, then claims the
  run directory (lock, no second run, a resume only into its own directory), then writes its first files (the
  cut-back of a resume, ``config.yaml`` through :class:`RunConfig`), so that a refused run writes nothing; logs,
  on one step axis (applied batches, 0 = the unedited model), each step's scalars and histograms
  (:mod:`lit_edit.report`), the retention curve and heat map and sample generations (:mod:`lit_edit.board`,
  figures: :mod:`lit_edit.figures`); appends the ledger; at the end writes ``metrics.json``, ``scores.jsonl``,
  ``retention.json``, ``retention.png`` and ``summary.png``, prints the table, logs ``final/*`` and the run's
  settings with them (HPARAMS), and exports the edited model. Its checkpointed state holds the ledger's length, so a
  resume rolls the ledger back to exactly the checkpoint's edits (lit_edit.runs).
* An editing progress bar (:func:`progress_bar`) in place of Lightning's default one; in a log rather than on a
  terminal (:func:`lit_edit.progress.is_interactive`), a line per step instead.

Lightning runs callbacks in list order and every ModelCheckpoint after them, so a step's ledger lines are
written and its batch marked applied before any checkpoint of that step is taken.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import SaveConfigCallback

from lit_edit import board, figures, progress, runs
from lit_edit import distributed as dist
from lit_edit.editing import check_operations
from lit_edit.monitor import Monitor
from lit_edit.report import in_units, ledger_lines, metrics_document, print_table, step_histograms, step_scalars
from lit_edit.timing import timed


class RunRecord(L.Callback):
    """The run directory and everything written into it (see the module docstring)."""

    def __init__(self, n_samples: int = 3, sample_tokens: int = 12) -> None:
        self.n_samples, self.sample_tokens = n_samples, sample_tokens
        self.sample_now: tuple[int, list[str]] | None = None  # (step, the samples' continuations at that step)
        self.samples: list = []  # case ids of the fixed sample requests (the stream's first writes)
        self.sample_pre: list[str] = []  # their pre-edit continuations
        self.edit_step: dict = {}  # case_id -> the step that applied it (the heat map's columns)
        self.retention: list[dict] = []  # the heat map's rows: {step, key, row}
        self.latest: dict = {}  # the last step's scalars (the progress bar reads them)
        self.inner_iterations = 0
        self.run_dir: Path | None = None
        self.ledger_lines = 0  # lines of edits.jsonl written so far (counted on every rank; rank 0 writes)
        self._resume: dict | None = None  # {ledger_lines, run_dir} of the checkpoint being resumed
        self._lock: runs.RunLock | None = None

    # -- the run directory: every check, then the claim, then the first write ---------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._open_run(trainer, pl_module, trainer.ckpt_path)

    def on_test_start(self, trainer, pl_module) -> None:
        self._resume = None  # a test writes a new run directory, whatever checkpoint it scores
        self._open_run(trainer, pl_module, None)

    def _open_run(self, trainer, m, ckpt_path: str | None) -> None:
        """Open the run directory so that a refused run leaves every file in it as it was (byte for byte):

        1. checks, read only: the directory (a resume continues only in its checkpoint's, a new run only in one
           holding no run), ``edits.jsonl`` and every rank's solver ledger against the checkpoint, every batch's
           operations against the stream and the checkpoint's ledger, the export directory. Everything else was
           checked before this hook: the config when parsed, model, statistics and records in ``configure_model``,
           the checkpoint and its settings when Lightning restored it, probe files by the Monitor.
        2. the claim: the lock on ``.lock``; then the directory's checks again, since another fit may have written
           into it between 1 and 2.
        3. the writes: the pid in ``.lock``, leftovers of killed writes removed, ``edits.jsonl`` and the solver
           ledgers cut back to the checkpoint, ledgers of ranks this resume lacks removed, ``config.yaml``.

        ``trainer.log_dir`` is a collective under DDP; a check that fails on any rank stops every rank."""
        self.run_dir = Path(trainer.log_dir) if trainer.log_dir else None
        fitting = not trainer.testing
        rank0 = trainer.is_global_zero and self.run_dir is not None
        self._checks(trainer, m, ckpt_path, fitting)
        _together(lambda: self._lock_dir() if rank0 else None)
        self._checks(trainer, m, ckpt_path, fitting, again=True)
        self._first_writes(trainer, m, ckpt_path, fitting)

    def _checks(self, trainer, m, ckpt_path: str | None, fitting: bool, again: bool = False) -> None:
        """Phase 1; ``again``: its part that reads the run directory, under the lock."""
        rank0 = trainer.is_global_zero and self.run_dir is not None
        _together(lambda: self._check_dir(ckpt_path) if rank0 else None)
        # the fact ids with a live edit in the checkpoint's solver ledger (each rank reads its own copy)
        live = _together(lambda: m.solver.check_ledger(self._ledger_dir())) if fitting else None
        if not again:
            if fitting:
                _together(self._check_operations, trainer, m, live)
            _together(lambda: runs.check_export_dir(m.export_dir, self.run_dir, m.export_replace)
                      if m.export_dir and trainer.is_global_zero else None)

    def _check_dir(self, ckpt_path: str | None) -> None:
        run_dir = self.run_dir
        if self._resume is None:
            found = runs.run_outputs(run_dir)
            if found:
                raise runs.RunDirError(f"run directory {run_dir} already holds an editing run ({', '.join(found)}): "
                                       f"resume it with --ckpt_path, or write to a new directory (logger version)")
            return
        home = runs.checkpoint_run_dir(ckpt_path, self._resume["run_dir"])
        if run_dir.resolve() != home:
            raise runs.RunDirError(
                f"a resumed run continues in its checkpoint's run directory {home}, but this trainer writes to "
                f"{run_dir}: point the logger there (save_dir/name/version; train.py does it from --ckpt_path)")
        runs.Ledger(run_dir).check(self._resume["ledger_lines"])

    def _ledger_dir(self) -> Path | None:
        return runs.solver_ledger_dir(self.run_dir, dist.rank())

    @staticmethod
    def _check_operations(trainer, m, live: set[str]) -> None:
        """Every batch still to apply planned now: a remove or replace of a fact nothing inserted stops the run here,
        not at its own step after earlier steps were written (lit_edit.editing.check_operations)."""
        dm = trainer.datamodule
        if not callable(getattr(dm, "pending_batches", None)):
            return  # a stream of another kind: each step checks its own batch
        check_operations(m.solver, dm.pending_batches(), live, first_step=dm.consumed + 1,
                         persistent=m.protocol != "independent")

    def _lock_dir(self) -> None:
        """The claim: the lock, taken without writing to the lock file (a refused run leaves it as it was)."""
        self._lock = runs.RunLock(self.run_dir)
        self._lock.acquire(announce=False)

    def _first_writes(self, trainer, m, ckpt_path: str | None, fitting: bool) -> None:
        """Phase 3. Each cut is a rename of a whole file (lit_edit.runs.atomic_write), ``edits.jsonl`` first, then
        the solver ledgers' indexes and their later shards: a kill at any point leaves files that the same resume
        checks and cuts again. Rank 0 writes the run's files; a failure still stops every rank."""
        rank0 = trainer.is_global_zero and self.run_dir is not None
        _together(lambda: self._announce_and_cut(ckpt_path) if rank0 else None)
        if fitting:  # on a resume attaching cuts the solver ledger back (checked in phase 1, on every rank)
            _together(m.solver.attach, self._ledger_dir())
        _open_logger_files(trainer)  # deferred until now (defer_logger_files)
        _together(lambda: self._tidy(trainer) if rank0 else None)

    def _announce_and_cut(self, ckpt_path: str | None) -> None:
        self._lock.announce()
        runs.remove_stale_temps(self.run_dir)  # of writes a killed run never finished
        if self._resume is not None:
            dropped = runs.Ledger(self.run_dir).truncate(self._resume["ledger_lines"])
            if dropped:
                print(f"lit_edit: resuming {ckpt_path}: dropped {dropped} ledger line(s) of steps after it")

    def _tidy(self, trainer) -> None:
        """The solver ledgers of ranks a resume on fewer devices lacks (they stop at the checkpoint, so no later
        checkpoint could use them), then config.yaml."""
        if self._resume is not None:
            for stale in runs.stale_rank_ledgers(self.run_dir, trainer.world_size):
                shutil.rmtree(stale)
                print(f"lit_edit: resuming on {trainer.world_size} device(s): removed {stale}, the solver ledger of a "
                      f"rank this run no longer has")
        for cb in trainer.callbacks:
            if isinstance(cb, RunConfig):
                cb.write(self.run_dir)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown hook after a failure

    def state_dict(self) -> dict:
        return {"ledger_lines": self.ledger_lines,
                "run_dir": str(self.run_dir.resolve()) if self.run_dir is not None else None,
                "samples": self.samples, "sample_pre": self.sample_pre, "edit_step": self.edit_step,
                "retention": self.retention, "inner_iterations": self.inner_iterations}

    def load_state_dict(self, state: dict) -> None:
        self.ledger_lines = int(state["ledger_lines"])
        self.samples, self.sample_pre = list(state["samples"]), list(state["sample_pre"])
        self.edit_step, self.retention = dict(state["edit_step"]), list(state["retention"])
        self.inner_iterations = int(state["inner_iterations"])
        self._resume = dict(state)

    # -- the unedited model: step 0 -------------------------------------------------------------
    def on_train_start(self, trainer, m) -> None:
        """Step 0 of the run's one step axis: the retention curve's pre-edit point (the unedited model on the
        stream's writes) and the samples' pre-edit generations."""
        if not self.samples:
            self.samples = [r.case_id for r in m.requests if r.writes][: self.n_samples]
        if trainer.global_step == 0:
            pre = [m.scores.pre[r.case_id] for r in m.requests if r.writes and r.case_id in m.scores.pre]
            if pre:
                scores = m.scores.mean(m.env, [], pre, device=m.device)
                edited = {f"edited/{k}": v for k, v in in_units(m.method.evaluator, scores).items()}
                self.write_scalars(trainer, m, edited, 0)
            self.write_scalars(trainer, m, {f"time/{k}_seconds": v for k, v in m.setup_seconds.items()}, 0)
            self.sample_pre = self._generate(m) if self.n_samples else []
            self._log_samples(trainer, m, 0)

    # -- each step ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx) -> None:
        plan, step = outputs["plan"], trainer.global_step
        scalars = step_scalars(m, plan)
        for r in plan.writes:
            self.edit_step[r.case_id] = step
        if m.eval_every_n_steps and step % m.eval_every_n_steps == 0 and m.protocol != "independent":
            with timed(scalars, "time/retention_seconds"):
                scalars.update(self._retention(trainer, m, step))
                self._log_samples(trainer, m, step)
        scalars["time/step_seconds"] = time.perf_counter() - plan.started
        self.latest = scalars
        self.write_scalars(trainer, m, scalars, step)
        tb = board.writer(trainer, m)
        if tb is not None:
            for k, v in step_histograms(plan).items():
                tb.add_histogram(k, torch.as_tensor(v).detach().float().cpu(), step)
            if plan.targets is not None and plan.targets.history:
                # the inner optimisation, on its own axis: iterations over the run (targets/steps maps it to steps)
                for loss in plan.targets.history:
                    tb.add_scalar("inner/target_loss", loss, self.inner_iterations)
                    self.inner_iterations += 1
        self.ledger_lines += len(plan.requests)
        if trainer.is_global_zero and self.run_dir is not None:
            runs.Ledger(self.run_dir).append(ledger_lines(plan, plan.stats, step, m))

    def _retention(self, trainer, m, step: int) -> dict:
        """All live edits scored on the current model (a collective under DDP): the curve ``edited/*`` and a row
        of the retention heat map (mean efficacy of each edit step's edits, docs/outputs.md), drawn
        (:func:`lit_edit.figures.retention_heatmap`) on rank 0."""
        edited = m.edits.edited()
        per = m.scores.records(m.env, edited, full=False)  # the cheap metrics: no generations
        scores = in_units(m.method.evaluator, m.scores.mean(m.env, [], [per[r.case_id] for r in edited],
                                                            device=m.device))
        key = next((k for k in m.method.evaluator.keys if any(k in s for s in per.values())), "")  # e.g. efficacy
        self.retention.append({"step": step, "key": key, "row": board.retention_row(per, self.edit_step, step, key),
                               "scores": scores})  # scores: the curve's values (percent), for summary.png
        tb = board.writer(trainer, m)
        if tb is not None:
            board.draw("the retention heat map", lambda: figures.retention_heatmap(self.retention, board.title(m)),
                       tb, "retention/heatmap", step)
        return {f"edited/{k}": v for k, v in scores.items()}

    def _generate(self, m) -> list[str]:
        by_id = {r.case_id: r for r in m.requests}
        prompts = [board.sample_prompt(by_id[i])[0] for i in self.samples]
        return board.generate(m.llm, m.tok, prompts, self.sample_tokens) if prompts else []

    def _log_samples(self, trainer, m, step: int) -> None:
        """The fixed sample requests: prompt, targets, pre-edit and current greedy continuation (TensorBoard text).
        Generation runs on rank 0 only; under the independent protocol the model is the unedited one."""
        tb = board.writer(trainer, m)
        if tb is None or not self.samples:
            return
        by_id = {r.case_id: r for r in m.requests}
        now = self._generate(m) if step else self.sample_pre
        self.sample_now = (step, now)
        tb.add_text("samples", board.samples_markdown([by_id[i] for i in self.samples], self.sample_pre, now), step)

    @staticmethod
    def write_scalars(trainer, m, scalars: dict, step: int) -> None:
        """Scalars on the run's one step axis (applied batches; 0 = unedited), straight to the logger (rank 0)."""
        if m.logger is not None and trainer.is_global_zero and scalars:
            m.logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer, m) -> None:
        with progress.phase("final scores"):
            final = m.final_evaluation()  # collective under DDP: every rank
        if final is not None:  # drift and probes, before and after (lit_edit.monitor)
            for cb in trainer.callbacks:
                if isinstance(cb, Monitor):
                    final[0].update(cb.metrics())
        self._write_final(trainer, m, final, {})

    def on_test_end(self, trainer, m) -> None:
        tested = m.scores.tested(m.env, m.requests, len(m.edits.ids), m.device)  # collective under DDP
        self._write_final(trainer, m, tested, {"test_of": trainer.ckpt_path or "the unedited model"})

    def _write_final(self, trainer, m, final, about: dict) -> None:
        step = trainer.global_step
        if final is None or not trainer.is_global_zero:
            return
        result, per_record = final
        ev = m.method.evaluator
        doc = metrics_document(m, result, step)
        doc["run"].update(about)
        print_table(doc, len(per_record), ev.keys, ev)
        if self.run_dir is not None:
            runs.atomic_write(self.run_dir / runs.METRICS, json.dumps(doc, indent=2, default=str))
            runs.atomic_write(self.run_dir / runs.SCORES,
                              "".join(json.dumps(in_units(ev, line)) + "\n" for line in per_record))
            if self.retention:
                runs.atomic_write(self.run_dir / "retention.json", json.dumps(self.retention))
        numbers = {k: v for k, v in doc.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.write_scalars(trainer, m, {f"final/{k}": v for k, v in numbers.items()}, step)
        if not trainer.testing and (step % max(m.eval_every_n_steps, 1) or not m.eval_every_n_steps):
            self._log_samples(trainer, m, step)
        if not trainer.testing and self.sample_now is not None and self.sample_now[0] == step and step:
            by_id = {r.case_id: r for r in m.requests}
            print(board.samples_text([by_id[i] for i in self.samples], self.sample_pre, self.sample_now[1]))
        if m.logger is not None:  # the run's settings with the final metrics (TensorBoard's HPARAMS tab)
            board.log_hparams(m.logger, board.hparams_table(m),
                              {f"hp/{k}": v for k, v in numbers.items() if not k.startswith("pre.")}, step)
        if not trainer.testing:
            self._draw_final(trainer, m, doc)
        if m.export_dir:  # whole: a temporary folder renamed over it (checked writable before the first edit)
            runs.write_export(m.export_dir, lambda folder: self._export(m, Path(folder)), self.run_dir)

    @staticmethod
    def _export(m, folder: Path) -> None:
        """The edited model into ``folder``: ``save_pretrained`` (model and tokenizer), or one GGUF file."""
        if m.export_format == "safetensors":
            m.llm.save_pretrained(folder)
            m.tok.save_pretrained(folder)
            return
        from lit_edit import sources
        from lit_edit.gguf_export import export_gguf

        source = sources.gguf_file(m.model_name)
        from lit_edit.layouts import edited_weights

        weights = edited_weights(m.llm, m.layout, m.layers)  # as stored: GGUF's orientation
        kind = m.export_gguf_type + (f"+{m.export_gguf_edited_type}" if m.export_gguf_edited_type else "")
        out = folder / f"{source.stem}.edited.{kind}.gguf"
        done = export_gguf(source, out, weights, m.export_gguf_type, m.export_gguf_edited_type)
        swapped = "; ".join(f"{k}: {v}" for k, v in sorted(done.substituted.items()))
        print(f"lit_edit: GGUF export {Path(m.export_dir) / out.name} ({kind}; edited tensors "
              f"{', '.join(done.edited)}" + (f"; stored otherwise: {swapped}" if swapped else "") + ")")

    def _draw_final(self, trainer, m, doc: dict) -> None:
        """``retention.png`` and ``summary.png`` (the final table, the retention curve, drift and the heat map on
        one page: :func:`lit_edit.figures.summary`) in the run directory, the summary also in TensorBoard."""
        tb, out = board.writer(trainer, m), self.run_dir
        if self.retention and out is not None:
            board.draw("retention.png", lambda: figures.retention_heatmap(self.retention, board.title(m)),
                       path=out / "retention.png")
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, Monitor)), None)
        drift = monitor.points() if monitor is not None else []
        page = lambda: figures.summary(doc, self.retention or None, drift, m.method.evaluator.keys)  # noqa: E731
        board.draw("summary.png", page, tb, "summary", trainer.global_step,
                   out / "summary.png" if out is not None else None)


class RunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written by :class:`RunRecord` into the run directory once every check has
    passed and the directory is claimed. (Lightning's SaveConfigCallback writes it at set-up, before either, so a
    refused fit rewrote the config of the run it was refused for.) Written whole; a resume writes the settings it
    continues with (the checkpoint's, but for those free to change)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass  # not yet: RunRecord calls write() after the claim

    def write(self, run_dir: Path) -> None:
        runs.atomic_write(run_dir / self.config_filename, self.parser.dump(self.config, skip_unset=False))


class _DeferredExperiment:
    """Stands in for a TensorBoard or CSV logger's writer until RunRecord has claimed the run directory. Lightning
    creates the writer at set-up, before any check, and TensorBoard's writes an events file into the run directory
    as it is created: a refused run would leave one behind. flush/close (a failed run's finalize) do nothing; any
    other use creates the real writer."""

    def __init__(self, logger) -> None:
        self._logger = logger

    def open(self):
        """The real writer (created now, if this still stands in for it)."""
        if self._logger._experiment is self:
            self._logger._experiment = None
        return self._logger.experiment

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self.open(), name)


def defer_logger_files(trainer) -> None:
    """Let the loggers that write into the run directory create their files only when RunRecord opens the run
    (``EditModule.configure_callbacks`` calls this; Lightning calls that before set-up)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)) and getattr(logger, "_experiment", 0) is None:
            logger._experiment = _DeferredExperiment(logger)


def _open_logger_files(trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(getattr(logger, "_experiment", None), _DeferredExperiment):
            logger._experiment.open()


def _together(check, *args):
    """Run ``check(*args)`` on this rank and return its result; when it fails on any rank, every rank stops (the
    failing one with its own error, the others naming it)."""
    failed, result = None, None
    try:
        result = check(*args)
    except Exception as err:  # re-raised below; the other ranks must hear of it first
        failed = err
    problems = [p for p in dist.all_gather_objects(failed and str(failed)) if p]
    if failed is not None:
        raise failed
    if problems:
        raise runs.RunDirError(f"another rank stopped the run: {problems[0]}")
    return result


class EditProgress:
    """The progress bar of an editing run: "Editing", edits done / total, and the latest batch and retention
    efficacy (no epoch, no version number). Mixed into Lightning's own bars by :func:`progress_bar`."""

    def get_metrics(self, trainer, m) -> dict:
        record = next((c for c in trainer.callbacks if isinstance(c, RunRecord)), None)
        total = sum(r.writes for r in m.requests)
        items: dict = {"edits": f"{len(m.edits.ids)}/{total}"}
        latest = record.latest if record is not None else {}
        key = next((k for k in m.method.evaluator.keys if f"batch/{k}" in latest), "")  # e.g. efficacy
        for name in (f"batch/{key}", f"edited/{key}"):
            if name in latest:
                items[name] = f"{latest[name]:.1f}%"
        return items


class EditRichProgressBar(EditProgress, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return "Editing"


class EditTQDMProgressBar(EditProgress, TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("Editing")


class EditLines(EditProgress):
    """The editing progress in a log: Lightning's bar stays off and each step prints one line to stderr (rank 0),
    ``[lit_edit] step 3/10 | edits 60/200 | targets 12.1s write 0.4s eval 3.0s | batch/efficacy 95.0% |
    elapsed 4m10s | eta 9m45s`` (the ETA at this run's mean step time); a test prints one per batch. Mixed into
    the class of Lightning's bar so that it replaces that bar (``configure_callbacks`` replaces by class)."""

    @property
    def is_enabled(self) -> bool:
        return False  # the bar itself never draws

    @staticmethod
    def _steps(trainer) -> float:
        """The run's last step: the stream's batches (a resumed run's sampler counts them all), or max_steps."""
        total = trainer.num_training_batches
        return min(total, trainer.max_steps) if trainer.max_steps is not None and trainer.max_steps > 0 else total

    def on_train_start(self, trainer, m) -> None:
        super().on_train_start(trainer, m)
        self._start, self._first = progress.clock(), trainer.global_step
        total, edits = self._steps(trainer), sum(r.writes for r in m.requests)
        progress.say(f"editing: {total} steps, {edits} edits" + (f", from step {self._first}" if self._first else ""))

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, m, outputs, batch, batch_idx)
        step, total = trainer.global_step, self._steps(trainer)
        items = self.get_metrics(trainer, m)
        record = next((c for c in trainer.callbacks if isinstance(c, RunRecord)), None)
        seconds = dict(outputs["plan"].seconds)
        if record is not None and "time/retention_seconds" in record.latest:
            seconds["retention"] = record.latest["time/retention_seconds"]
        parts = [f"step {step}/{total}", f"edits {items.pop('edits')}",
                 " ".join(f"{k} {v:.1f}s" for k, v in seconds.items())]
        parts += [" ".join(f"{k} {v}" for k, v in items.items())] if items else []
        elapsed = progress.clock() - self._start
        progress.say(" | ".join(parts) + f" | elapsed {progress.hms(elapsed)}" +
                     progress.eta(elapsed, step - self._first, total - self._first))

    def on_train_end(self, trainer, m) -> None:
        super().on_train_end(trainer, m)
        progress.say(f"editing done: {trainer.global_step - self._first} steps in "
                     f"{progress.hms(progress.clock() - self._start)}")

    def on_test_start(self, trainer, m) -> None:
        super().on_test_start(trainer, m)
        self._start = progress.clock()

    def on_test_batch_end(self, trainer, m, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_end(trainer, m, outputs, batch, batch_idx, dataloader_idx)
        total = trainer.num_test_batches[dataloader_idx]
        elapsed = progress.clock() - self._start
        progress.say(f"test batch {batch_idx + 1}/{total} | elapsed {progress.hms(elapsed)}" +
                     progress.eta(elapsed, batch_idx + 1, total))


class EditRichLines(EditLines, RichProgressBar):
    pass


class EditTQDMLines(EditLines, TQDMProgressBar):
    pass


def progress_bar(trainer) -> L.Callback | None:
    """The editing bar replacing Lightning's default one, or in a log its lines (None when the bar is off or a
    custom one is given)."""
    bar, lines = trainer.progress_bar_callback, not progress.is_interactive()
    if type(bar) is RichProgressBar:
        return EditRichLines() if lines else EditRichProgressBar()
    if type(bar) is TQDMProgressBar:
        return EditTQDMLines() if lines else EditTQDMProgressBar()
    return None
