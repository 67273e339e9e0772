"""The two callbacks of an editing fit, added by ``EditModule.configure_callbacks`` in this order.

* :class:`ClosedFormEdit` — the write: applies each step's plan with the solver (atomically, docs/algorithms.md
  §4), advances the stream cursor, lets the method measure the write, updates the module's live edit set and the
  batch's scores, checks that the ranks agree and, in independent mode, restores the weights and solver state.
* :class:`RunRecord` — the run's record: claims the run directory (lock, no second run, a resume only into its
  own directory), logs each step (:func:`log_step`: norms, solver figures, batch scores, the retention curve)
  and appends its ledger lines, and at the end writes ``metrics.json`` and
  ``scores.jsonl``, prints the table, logs ``final/*`` and exports the edited model. Its checkpointed state is the
  ledger's length, so a resume rolls the ledger back to exactly the checkpoint's edits (lit_edit.runs).

Lightning runs callbacks in list order and every ModelCheckpoint after them, so a step's ledger lines are
written and its batch marked applied before any checkpoint of that step is taken.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from lit_edit import distributed as dist
from lit_edit import runs
from lit_edit.editing import StepStats, apply_batch


class ClosedFormEdit(L.Callback):
    """Writes the plan of each training step with the module's solver, atomically."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if dm is not None and not callable(getattr(dm, "mark_applied", None)):
            raise TypeError(f"{type(dm).__name__} cannot record applied batches (no mark_applied()): an editing run "
                            f"needs lit_edit.data.EditDataModule or a data module with its resumable stream cursor")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        plan, m = outputs["plan"], pl_module
        if m.independent:  # snapshot to restore after the batch is evaluated (the solver replaces, never mutates)
            saved = ([w.clone() for w in m.edited_weights()], m.solver.state_dict())
        stats = apply_batch(m.llm, m.layout, m.solver, m.layers, plan.requests, plan.Z, plan.columns)
        if trainer.datamodule is not None:
            trainer.datamodule.mark_applied()
        if plan.writes:
            plan.info["after_write"] = m.method.after_write(plan.columns, plan.writes, plan.Z, plan.info)
        plan.stats = stats
        m.edits.record(plan.requests, stats.dropped)
        if plan.writes:  # the batch's scores on the model as written (RunRecord logs them)
            plan.batch_scores = m.scores.batch(m.env, plan.writes, m.independent, m.device)
        if m.sync_check_every_n_steps and trainer.global_step % m.sync_check_every_n_steps == 0:
            dist.assert_in_sync(m.edited_weights(), f"edited weights after step {trainer.global_step}")
        if m.independent:
            with torch.no_grad():
                for w, w0 in zip(m.edited_weights(), saved[0]):
                    w.copy_(w0)
            m.solver.load_state_dict(saved[1])


class RunRecord(L.Callback):
    """The run directory and everything written into it (see the module docstring)."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.ledger_lines = 0  # lines of edits.jsonl written so far (counted on every rank; rank 0 writes)
        self._resume: dict | None = None  # {ledger_lines, run_dir} of the checkpoint being resumed
        self._lock: runs.RunLock | None = None

    # -- the run directory ----------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        """Claim the run directory before any edit. trainer.log_dir is a collective under DDP: every rank reads it;
        rank 0 decides and every rank stops on a problem."""
        log_dir = trainer.log_dir
        self.run_dir = Path(log_dir) if log_dir else None
        problem = None
        if trainer.is_global_zero and self.run_dir is not None:
            try:
                self._claim(self.run_dir, trainer.ckpt_path)
            except (runs.RunDirError, runs.CheckpointError, OSError) as err:
                problem = str(err)
        problem = dist.broadcast_object(problem)
        if problem is not None:
            raise runs.RunDirError(problem)

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
                "run_dir": str(self.run_dir.resolve()) if self.run_dir is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.ledger_lines = int(state["ledger_lines"])
        self._resume = dict(state)

    # -- the ledger -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        plan = outputs["plan"]
        log_step(trainer, pl_module, plan)
        self.ledger_lines += len(plan.requests)
        if trainer.is_global_zero and self.run_dir is not None:
            runs.Ledger(self.run_dir).append(ledger_lines(plan, plan.stats, trainer.global_step, pl_module))

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        final = pl_module.final_evaluation()  # collective under DDP: every rank
        if final is None or not trainer.is_global_zero:
            return
        result, per_record = final
        print_table(result, result["n_edits"], pl_module.method.evaluator.keys)
        if self.run_dir is not None:
            runs.atomic_write(self.run_dir / runs.METRICS, json.dumps(result, indent=2))
            runs.atomic_write(self.run_dir / runs.SCORES, "".join(json.dumps(line) + "\n" for line in per_record))
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({f"final/{k}": v for k, v in result.items()}, step=trainer.global_step)
        if pl_module.export_dir:
            pl_module.llm.save_pretrained(pl_module.export_dir)
            pl_module.tok.save_pretrained(pl_module.export_dir)


def log_step(trainer, m, plan) -> None:
    """The step's scalars: update and residual norms per layer, the solver's own figures, the method's post-write
    diagnostics, the batch's scores, the live edit count, every ``eval_every_n_steps`` the retention evaluation
    over all live edits (a collective under DDP), and the step's time."""
    n, stats = len(plan.requests), plan.stats
    if plan.targets is not None:
        res = plan.targets
        logs = {"targets/loss": res.loss.mean(), "targets/nll": res.nll.mean(), "targets/steps": res.steps.float().mean(),
                "targets/delta_norm": res.delta.norm(dim=-1).mean()}
        if m.method.row_name:
            logs[f"targets/{m.method.row_name}"] = float(len(res.loss))
        m.log_dict(logs, batch_size=len(plan.writes))
        log_info(trainer, m, plan.info, len(plan.writes))
    if stats.dropped:
        m.log("n_removed", float(m.edits.n_removed), batch_size=n)
    for name, per_layer in (("residual_norm", stats.residual_norm), ("delta_norm", stats.update_norm),
                            ("forget_norm", stats.forget_norm), ("regularizer_change", stats.regularizer_change)):
        for l, v in per_layer.items():
            m.log(f"update/{name}/layer_{l}", v, batch_size=n)
    for k, v in m.solver.describe().items():
        m.log(f"solver/{k}", float(v), batch_size=n)
    if plan.writes:
        log_info(trainer, m, plan.info.get("after_write", {}), len(plan.writes))
        m.log_dict({f"batch/{k}": v for k, v in plan.batch_scores.items()}, batch_size=len(plan.writes), prog_bar=True)
    m.log("n_edits", float(len(m.edited_ids)), batch_size=n)
    step = trainer.global_step
    if m.eval_every_n_steps and step % m.eval_every_n_steps == 0 and not m.independent:
        scores = m.scores.mean(m.env, m.edited_requests(), device=m.device)
        # straight to the logger: self.log from a batch-end hook re-emits the cached value at every later
        # step until it is logged again (measured: 5 identical points per 5-step interval in TensorBoard)
        if m.logger is not None and trainer.is_global_zero:
            m.logger.log_metrics({f"edited/{k}": v for k, v in scores.items()}, step=step)
    m.log("time/step_seconds", time.perf_counter() - plan.started, batch_size=n)


def log_info(trainer, m, info: dict, n: int) -> None:
    """Scalars and histograms a method reports (``logs``, ``histograms``)."""
    if info.get("logs"):
        m.log_dict(info["logs"], batch_size=n)
    exp = getattr(m.logger, "experiment", None)
    if info.get("histograms") and hasattr(exp, "add_histogram") and trainer.is_global_zero:
        for k, v in info["histograms"].items():
            exp.add_histogram(k, v.detach().float().cpu(), trainer.global_step)


def ledger_lines(plan, stats: StepStats, step: int, m) -> list[dict]:
    """One line per request of the step: what was done to which fact, and per writing request its target loss,
    residual norm per layer (the mean over its target rows) and the method's own fields."""
    dropped = set(stats.dropped)
    lines, j = [], 0  # j: index among the requests that wrote a value
    for r in plan.requests:
        line = {"case_id": r.case_id, "step": step, "operation": r.op, "fact": r.fact_id, "layers": m.layers,
                "update_norm": stats.update_norm}
        if r.op == "insert" and r.fact_id in dropped:
            line["operation"] = "insert (replaced earlier edit)"
        if r.writes:
            rows = plan.columns.rows[j]
            line["target_loss"] = round(float(plan.targets.loss[rows].mean()), 6)
            line["residual_norm"] = {l: sum(v[c] for c in rows) / len(rows) for l, v in stats.request_residual.items()}
            if m.method.row_name:
                line[m.method.row_name] = len(rows)
            line.update(m.method.ledger_fields({**plan.info, **plan.info.get("after_write", {})}, j))
            j += 1
        if r.fact_id in dropped:
            line["forget_norm"] = stats.forget_norm
        lines.append(line)
    return lines


def print_table(result: dict, n: int, keys: tuple[str, ...]) -> None:
    rows = [(k, result.get(f"pre.{k}"), result.get(k)) for k in keys]
    print(f"\nlit_edit: final evaluation over {n} edited requests")
    print(f"{'metric':<16}{'pre':>10}{'post':>10}")
    for k, pre, post in rows:
        f = lambda x: f"{100 * x:10.2f}" if x is not None else f"{'-':>10}"  # noqa: E731
        print(f"{k:<16}{f(pre)}{f(post)}")
