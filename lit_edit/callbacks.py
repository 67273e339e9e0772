"""The callbacks of an editing fit, added by ``EditModule.configure_callbacks`` in this order.

* ``lit_edit.editing.ClosedFormEdit`` — the write: applies each step's plan with the solver (atomically,
  docs/algorithms.md §4), advances the stream cursor, lets the method measure the write, updates the module's live
  edit set and the batch's scores, checks that the ranks agree and, under the independent protocol, restores
  weights and solver. It lives with the write itself, so one edit reads top-down in one file.
* :class:`RunRecord` — the run's record: claims the run directory (lock, no second run, a resume only into its
  own directory); logs, on one step axis (applied batches, 0 = the unedited model), each step's scalars and
  histograms (:mod:`lit_edit.report`), the retention curve and heat map and sample generations
  (:mod:`lit_edit.board`); appends the ledger; at the end writes ``metrics.json``, ``scores.jsonl`` and
  ``retention.json``, prints the table, logs ``final/*`` and the hparams with them, and exports the edited model.
  Its checkpointed state holds the ledger's length, so a resume rolls the ledger back to exactly the
  checkpoint's edits (lit_edit.runs).
* An editing progress bar (:func:`progress_bar`) in place of Lightning's default one.

Lightning runs callbacks in list order and every ModelCheckpoint after them, so a step's ledger lines are
written and its batch marked applied before any checkpoint of that step is taken.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lit_edit import board, runs
from lit_edit import distributed as dist
from lit_edit.monitor import Monitor
from lit_edit.report import in_units, ledger_lines, metrics_document, print_table, step_histograms, step_scalars
from lit_edit.timing import timed


class RunRecord(L.Callback):
    """The run directory and everything written into it (see the module docstring)."""

    def __init__(self, n_samples: int = 3, sample_tokens: int = 12) -> None:
        self.n_samples, self.sample_tokens = n_samples, sample_tokens
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

    # -- the run directory ----------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._claim_dir(trainer, trainer.ckpt_path)
        self._attach_solver(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._resume = None  # a test writes a new run directory, whatever checkpoint it scores
        self._claim_dir(trainer, None)

    def _claim_dir(self, trainer, ckpt_path: str | None) -> None:
        """Claim the run directory before any edit. trainer.log_dir is a collective under DDP: every rank reads it;
        rank 0 decides and every rank stops on a problem."""
        log_dir = trainer.log_dir
        self.run_dir = Path(log_dir) if log_dir else None
        problem = None
        if trainer.is_global_zero and self.run_dir is not None:
            try:
                self._claim(self.run_dir, ckpt_path)
            except (runs.RunDirError, runs.CheckpointError, OSError) as err:
                problem = str(err)
        problem = dist.broadcast_object(problem)
        if problem is not None:
            raise runs.RunDirError(problem)

    def _attach_solver(self, pl_module) -> None:
        """The solver's ledger of applied edits lives in the run directory (docs/algorithms.md §6.6), one copy per
        rank; on a resume attaching checks it against the checkpoint. Every rank stops if any rank's check fails."""
        failed = None
        try:
            pl_module.solver.attach(runs.solver_ledger_dir(self.run_dir, dist.rank()))
        except (runs.RunDirError, runs.CheckpointError, OSError) as err:
            failed = err
        problems = [p for p in dist.all_gather_objects(failed and str(failed)) if p]
        if failed is not None:
            raise failed
        if problems:
            raise runs.CheckpointError(problems[0])

    def _claim(self, run_dir: Path, ckpt_path: str | None) -> None:
        if self._resume is not None:
            home = runs.checkpoint_run_dir(ckpt_path, self._resume["run_dir"])
            if run_dir.resolve() != home:
                raise runs.RunDirError(
                    f"a resumed run continues in its checkpoint's run directory {home}, but this trainer writes to "
                    f"{run_dir}: point the logger there (save_dir/name/version; train.py does it from --ckpt_path)")
        self._lock = runs.RunLock(run_dir)
        self._lock.acquire()
        runs.remove_stale_temps(run_dir)  # of writes a killed run never finished
        if self._resume is None:
            found = runs.run_outputs(run_dir)
            if found:
                raise runs.RunDirError(f"run directory {run_dir} already holds an editing run ({', '.join(found)}): "
                                       f"resume it with --ckpt_path, or write to a new directory (logger version)")
        else:
            dropped = runs.Ledger(run_dir).truncate(self._resume["ledger_lines"])
            if dropped:
                print(f"lit_edit: resuming {ckpt_path}: dropped {dropped} ledger line(s) of steps after it")

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
        of the retention heat map (mean efficacy of each edit step's edits, docs/outputs.md)."""
        edited = m.edits.edited()
        per = m.scores.records(m.env, edited, full=False)  # the cheap metrics: no generations
        scores = m.scores.mean(m.env, [], [per[r.case_id] for r in edited], device=m.device)
        key = next((k for k in m.method.evaluator.keys if any(k in s for s in per.values())), "")  # e.g. efficacy
        self.retention.append({"step": step, "key": key, "row": board.retention_row(per, self.edit_step, step, key)})
        tb = board.writer(trainer, m)
        if tb is not None:
            tb.add_image("retention/heatmap", board.heatmap_image([e["row"] for e in self.retention]), step)
        return {f"edited/{k}": v for k, v in in_units(m.method.evaluator, scores).items()}

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
        tb.add_text("samples", board.samples_markdown([by_id[i] for i in self.samples], self.sample_pre, now), step)

    @staticmethod
    def write_scalars(trainer, m, scalars: dict, step: int) -> None:
        """Scalars on the run's one step axis (applied batches; 0 = unedited), straight to the logger (rank 0)."""
        if m.logger is not None and trainer.is_global_zero and scalars:
            m.logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer, m) -> None:
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
        if m.logger is not None:  # hparams with the final metrics (TensorBoard's HPARAMS tab)
            m.logger.log_hyperparams(dict(m.hparams), metrics={f"hp/{k}": v for k, v in numbers.items()
                                                               if not k.startswith("pre.")})
        if m.export_dir:
            m.llm.save_pretrained(m.export_dir)
            m.tok.save_pretrained(m.export_dir)


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


def progress_bar(trainer) -> L.Callback | None:
    """The editing bar replacing Lightning's default one (None when the bar is off or a custom one is given)."""
    bar = trainer.progress_bar_callback
    if type(bar) is RichProgressBar:
        return EditRichProgressBar()
    if type(bar) is TQDMProgressBar:
        return EditTQDMProgressBar()
    return None
