"""The Python entry point, for notebooks and scripts::

    from lit_edit import Editor
    from lit_edit.methods import VStar
    from lit_edit.solvers import AlphaEdit

    editor = Editor(model="world", layers=[0, 1], solver=AlphaEdit(L2=10.0, nullspace_threshold=0.05),
                    method=VStar(v_num_grad_steps=40, clamp_norm_factor=4.0, fact_token="subject_first"))
    result = editor.edit(records, batch_size=20)      # CounterFact-schema dicts, or EditRequests
    result.metrics["efficacy"], result.model, result.run_dir

It builds the same components as ``train.py`` (an :class:`~lit_edit.module.EditModule` with its solver, target
method and evaluator, an edit stream) and runs the same Lightning fit loop: the same validation before any edit,
the same run directory (ledger, ``metrics.json``, TensorBoard events, checkpoints if asked for).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from lit_edit.data import EditDataModule, check_unique_case_ids, requests_from_records
from lit_edit.module import EditModule
from lit_edit.requests import EditRequest, UnstructuredRequest


@dataclass
class EditResult:
    model: Any  # the edited transformers model (the module's, in memory)
    tokenizer: Any
    metrics: dict  # metrics.json: final scores, their pre-edit values, n_edits
    run_dir: Path | None  # edits.jsonl, metrics.json, scores.jsonl, TensorBoard events
    module: EditModule  # for everything else (the solver's state, per-record scores)


class _GivenStream(EditDataModule):
    """An edit stream given as requests in memory (validated like a reader's), batched and resumable as any."""

    def __init__(self, requests: list, batch_size: int, on_invalid: str = "raise"):
        super().__init__(dataset="counterfact", path="<python>", batch_size=batch_size, on_invalid=on_invalid)
        self._given = list(requests)
        # the data settings (metrics.json's run.data, compared on resume): not the requests themselves, whose
        # fingerprint the stream cursor checkpoints
        self.save_hyperparameters({"dataset": "python", "n_requests": len(self._given), "batch_size": batch_size,
                                   "on_invalid": on_invalid})

    def _read_stream(self) -> list:
        check_unique_case_ids(self._given)
        return list(self._given)


class Editor:
    """Edit a model from Python with the same loop as ``train.py fit``.

    Args: those of :class:`~lit_edit.module.EditModule` (``model``, ``layers``, ``solver``, ``method``, ``stats``,
    ``context_templates``, ...), plus ``root_dir`` / ``name`` for the run directories (a new
    ``<root_dir>/<name>/version_N`` per call) and ``trainer`` for extra ``lightning.Trainer`` options (e.g.
    ``{"accelerator": "gpu"}``). Each :meth:`edit` starts from the unedited model.
    """

    def __init__(self, root_dir: str | Path = "runs", name: str = "python", trainer: dict | None = None,
                 **module_args: Any):
        self.root_dir, self.name = Path(root_dir), name
        self.trainer_args = dict(trainer or {})
        self.module_args = module_args
        EditModule(**module_args)  # the settings are checked now, not at the first edit

    def edit(self, requests: list, batch_size: int = 20, schema: str = "counterfact",
             on_invalid: str = "raise") -> EditResult:
        """Edit ``requests`` (``EditRequest``/``UnstructuredRequest`` objects, or dicts in the ``schema`` reader's
        format: ``counterfact``, ``zsre``, ``world``, ``unke``, ``editeverything``) in batches of ``batch_size``."""
        reqs = [r for r in requests if isinstance(r, (EditRequest, UnstructuredRequest))]
        if len(reqs) != len(requests):
            if reqs:
                raise TypeError("give either request objects or record dicts, not both")
            reqs = requests_from_records(list(requests), schema, on_invalid=on_invalid)
        module = EditModule(**self.module_args)
        stream = _GivenStream(reqs, batch_size, on_invalid)
        options = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_checkpointing": False,
                   "enable_model_summary": False, "use_distributed_sampler": False, "log_every_n_steps": 1,
                   "logger": L.pytorch.loggers.TensorBoardLogger(self.root_dir, name=self.name,
                                                                   default_hp_metric=False), **self.trainer_args}
        trainer = L.Trainer(**options)
        trainer.fit(module, stream)
        run_dir = Path(trainer.log_dir) if trainer.log_dir else None
        metrics_file = run_dir / "metrics.json" if run_dir else None
        metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.exists() else {}
        return EditResult(module.llm, module.tok, metrics, run_dir, module)
