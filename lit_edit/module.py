"""The Lightning glue: ``EditModule`` loads the frozen model and, each training step, asks its target method for
the batch's targets; ``lit_edit.editing.ClosedFormEdit`` writes them and ``lit_edit.callbacks`` keeps the run's
record.

One training step = one batch of edit requests. ``training_step`` runs the method's inner optimisation of the
targets (the LLM stays frozen; only per-request δ's are optimised) and returns an :class:`EditPlan`;
``ClosedFormEdit`` writes it with the solver's closed-form multi-layer update, atomically, and the module logs
edit quality; ``RunRecord`` appends the ledger.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_edit import checks, runs
from lit_edit import distributed as dist
from lit_edit.callbacks import RunRecord, defer_logger_files, progress_bar
from lit_edit.editing import ClosedFormEdit, StepStats
from lit_edit.layouts import edited_weights, get_layout, get_weight
from lit_edit.methods import Columns, Env, TargetMethod, VStar
from lit_edit.data.lengths import fitting_requests
from lit_edit.evaluation import LiveEdits, Scores
from lit_edit.gguf_export import check_export
from lit_edit.models import generate_context_templates, load_model
from lit_edit.monitor import Monitor
from lit_edit.progress import is_interactive, phase
from lit_edit.requests import EditRequest
from lit_edit.solvers import AlphaEdit, Solver
from lit_edit.stats import StatsConfig, c0_files
from lit_edit.targets import TargetResult, hidden_size, opt_dtype
from lit_edit.timing import timed


@dataclass
class EditPlan:
    """What training_step hands to the callbacks: the requests, their columns and the targets Z at layer L."""

    requests: list[EditRequest]
    Z: torch.Tensor  # [n_target_rows, d]: the rows of each write are columns.rows[j]
    targets: TargetResult | None  # None when the batch only removes edits
    columns: Columns  # of the writing requests, built once by the method
    started: float = field(default_factory=time.perf_counter)
    info: dict = field(default_factory=dict)  # the method's refinement and diagnostics (MetaKE)
    stats: StepStats | None = None  # filled by the write
    batch_scores: dict | None = None  # the writes' scores right after the write
    seconds: dict = field(default_factory=dict)  # wall time of the step's phases: targets, write, eval (time/*)

    @property
    def writes(self) -> list[EditRequest]:
        """The requests with rows in Z (all but removals), in order."""
        return [r for r in self.requests if r.writes]


# Lightning messages that describe an editing run's design, not a problem: the LLM is frozen (no optimizer, every
# module in eval mode, ModelCheckpoint's note on manual optimisation), Lightning 2.6's own pytree call is deprecated
# in torch 2.13, the step's scalars go to the logger directly (not through log_every_n_steps) and the fit start
# advertises a cloud logger. Matched narrowly, once.
for _message in (r".*configure_optimizers` returned `None`", r"Found \d+ module\(s\) in eval mode",
                 r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"Using ModelCheckpoint with manual optimization",
                 r"The number of training batches \(\d+\) is smaller than the logging interval"):
    warnings.filterwarnings("ignore", message=_message)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


def _warn_if_outputs_are_normalised(llm, tok, layout, layers: list[int]) -> None:
    """The closed-form write (docs/algorithms.md §4) spreads the residual z − h_L over the edited layers as changes of
    the edited matrix's output, assuming each reaches the residual stream unchanged. Gemma 3 normalises its MLP output
    first (post_feedforward_layernorm): without the layout's ``post_norm`` (which maps each share through that norm)
    the write does not realise the targets there (seen on Gemma-3-270M: residual norms growing from 21 to 3640 across
    layers 4-8, docs/results.md §10.3). Probed once per edited layer
    (:func:`~lit_edit.truncated.output_reaches_block_output`) when the layout names no ``post_norm``; said, not
    refused."""
    from lit_edit.truncated import output_reaches_block_output

    if layout.post_norm is not None:  # the write maps the residual through the norm (editing.through_post_norm)
        return
    ids = tok("The Eiffel Tower is in Paris")["input_ids"]
    off = [l for l in layers if not output_reaches_block_output(llm, layout, l, ids)]
    if off:
        warnings.warn(f"model.layers {off}: the edited matrix's output ({layout.rewrite_module}) does not reach the "
                      f"residual stream unchanged (e.g. Gemma 3's post-feed-forward norm), which MEMIT-style writes "
                      f"assume: the edits may not land; check target_loss and residual_norm in edits.jsonl "
                      f"(docs/results.md §10.3)", stacklevel=2)


class EditModule(L.LightningModule):
    """A frozen causal LM being edited one batch of requests per step.

    Args:
        model: hub id, local path, or ``world[:preset]`` (the built-in fact world).
        layers: edited layers; targets are optimised at the last one (L = max(layers)).
        solver: the downstream closed-form solver (MEMIT, AlphaEdit, ...); default AlphaEdit.
        method: the target method (``lit_edit.methods``): ``VStar`` (default), ``MetaKE`` (v* refined through the
            solver's gate) or ``Windows`` (long-form answers: One-for-All, AnyEdit, μKE; the stream must then hold
            unstructured requests, readers unke, akew, editeverything, world_long).
        stats: corpus for the key second moment C0 (docs/algorithms.md §3); ``dataset`` unset follows ``model`` for
            the built-in world (``world:large`` reads ``world:large``'s corpus), see :meth:`StatsConfig.for_model`.
        layout: architecture layout override (see ``lit_edit.layouts``) for models not in the registry.
        context_templates: [[length, count], ...] of generated context prefixes (§1.4); [] = bare prompts only.
        eval_every_n_steps: evaluate all requests edited so far every N steps (retention curve); 0 = never.
        eval_pre: evaluate the unedited model on the whole stream once (the ``pre.`` metrics).
        export_dir: if set, ``save_pretrained`` the edited model (safetensors) at the end of fit, written whole (a
            temporary folder renamed over it). Checked before the first edit: it must be writable, and empty or this
            run's own earlier export (a resume's), unless ``export_replace``.
        export_replace: let the export replace a non-empty ``export_dir`` that holds something else.
        export_format: ``safetensors`` (``save_pretrained``: the model and its tokenizer) or ``gguf`` (one GGUF file
            built from the model's source GGUF, its metadata, tokenizer and chat template carried over:
            lit_edit/gguf_export.py; a packaged model or a ``.gguf`` ``model.model`` only).
        export_gguf_type: the GGUF export's tensor type: F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, or ``source`` (the
            source file's own types: unedited tensors keep their bytes).
        export_gguf_edited_type: the edited tensors' type in a GGUF export, if not ``export_gguf_type`` (e.g. Q8_0
            with ``source``: the source's 4-bit file with 8-bit edited matrices, which keeps the edits).
        protocol: how the final metrics are taken (docs/metrics.md, "Protocols"): ``"sequential"`` (every live edit
            scored on the final model: AlphaEdit's, MEMIT's and OTE–SE's protocol), ``"immediate"`` (each batch scored
            right after its own write, edits kept) or ``"independent"`` (each batch written, scored, then the edited
            weights and the solver state restored: MUKE's and EasyEdit's single-edit protocol).
        sync_check_every_n_steps: under DDP, compare a checksum of the edited weights across ranks every N steps
            (a raise if they ever differ); 0 = never. No-op on one process.
        trust_remote_code: let transformers run the custom modelling code a hub or local model ships (passed to
            both ``from_pretrained`` calls); off by default, so such a model is refused rather than run.
        allow_changed: settings (or prefixes, e.g. ``model.method``) that may differ from the checkpoint's on
            resume. A resume compares every setting that changes the result (:meth:`run_settings`) and stops before
            any edit on a difference not listed here. Always free to change: export_dir, export_replace,
            export_format, export_gguf_type, export_gguf_edited_type,
            eval_every_n_steps, eval_pre, sync_check_every_n_steps, trust_remote_code, allow_changed and the trainer's
            options.
    """

    def __init__(self, model: str = "world", layers: list[int] = [1, 2], solver: Solver | None = None,
                 method: TargetMethod | None = None, stats: StatsConfig = StatsConfig(),
                 layout: dict | None = None, dtype: str = "float32", context_templates: list[list[int]] = [[10, 5]],
                 context_seed: int = 0, eval_every_n_steps: int = 0, eval_pre: bool = True,
                 export_dir: str | None = None, sync_check_every_n_steps: int = 1, protocol: str = "sequential",
                 trust_remote_code: bool = False, allow_changed: list[str] = [], export_replace: bool = False,
                 export_format: str = "safetensors", export_gguf_type: str = "F16",
                 export_gguf_edited_type: str | None = None) -> None:
        super().__init__()
        # hparams.yaml / TensorBoard: the run's settings as plain values (components are added below as dicts);
        # a resume compares run_settings(), stored in the checkpoint, not these
        self.save_hyperparameters(ignore=["solver", "method", "stats", "allow_changed"])
        checks.edit_module_args(model, layers, dtype, context_templates, context_seed, eval_every_n_steps,
                                sync_check_every_n_steps, allow_changed, protocol)
        self.model_name, self.layers, self.dtype_name = model, sorted(layers), dtype
        self.solver = solver if solver is not None else AlphaEdit()
        self.method = method if method is not None else VStar()
        if not isinstance(self.method, TargetMethod):
            raise TypeError(f"model.method must be a lit_edit.methods.TargetMethod, got {type(self.method).__name__}")
        # model.stats.dataset unset: the built-in world's own corpus, resolved here once (StatsConfig.for_model)
        self.stats_cfg = (stats if isinstance(stats, StatsConfig) else StatsConfig(**stats)).for_model(model)
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.hparams.update(method={"class_path": _path(self.method), "init_args": self.method.settings()},
                            solver={"class_path": _path(self.solver), "init_args": self.solver.settings()},
                            stats=self.stats_cfg.__dict__.copy())
        self._hparams_initial = copy.deepcopy(self._hparams)  # what the logger writes to hparams.yaml
        self.layout_override, self.context_spec, self.context_seed = layout, context_templates, context_seed
        self.eval_every_n_steps, self.eval_pre, self.export_dir = eval_every_n_steps, eval_pre, export_dir
        self.sync_check_every_n_steps, self.protocol = sync_check_every_n_steps, protocol
        self.trust_remote_code, self.allow_changed = trust_remote_code, list(allow_changed)
        self.export_replace = checks.boolean("model.export_replace", export_replace)
        check_export(model, export_format, export_gguf_type, export_gguf_edited_type)
        self.export_format, self.export_gguf_type = export_format, export_gguf_type
        self.export_gguf_edited_type = export_gguf_edited_type
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the edited matrices
        self.llm = None
        self.edits = LiveEdits()  # the edits live in the model, in order (lit_edit.evaluation)
        self.connect([])
        self.context: list[str] = []
        self.scores = Scores(self.method.evaluator)  # pre-edit, per-batch and final scores (lit_edit.evaluation)
        self.final_scores: dict[str, float] = {}
        self.setup_seconds: dict[str, float] = {}  # load (with the context templates), c0, solver_setup, pre_eval

    # -- set-up ---------------------------------------------------------------------------
    def connect(self, requests: list, on_invalid: str = "raise", drop=None, settings: dict | None = None) -> None:
        """The hand-off of the stream (``EditDataModule.setup`` calls it; without a data module, call it yourself):
        the requests this run edits, what to do with one that does not fit the model (``on_invalid``), how to
        drop it from the stream (``drop(case_ids)``, so the checkpointed stream is the filtered one) and the
        stream's settings (``data.*``, compared on resume)."""
        self.requests, self._on_invalid, self._drop = list(requests), on_invalid, drop
        self.data_settings = dict(settings or {})
        self.edits.connect(self.requests)

    def configure_model(self) -> None:
        """Load the LLM and everything measured on the *unedited* model (context templates, C0, pre metrics).
        Lightning calls this before restoring a checkpoint, so a resumed run sees the same values."""
        if self.llm is not None:
            return
        self.setup_seconds = {}  # the set-up's phases (time/* at step 0)
        # each phase named in a log as it starts and ends (lit_edit.progress); "load" times the first two
        with timed(self.setup_seconds, "load"):  # with the context templates and the stream's length check
            with phase(f"load {self.model_name}"):
                self.llm, self.tok, self.model_path = load_model(self.model_name, self.dtype_name,
                                                                 self.trust_remote_code)
            self.llm.requires_grad_(False).eval()
            self.layout = get_layout(self.llm, self.layout_override)
            n_layers = self.layout.n_layers(self.llm)
            if self.layers[-1] >= n_layers or self.layers[0] < 0:
                raise ValueError(f"layers {self.layers} out of range for a model with {n_layers} blocks")
            _warn_if_outputs_are_normalised(self.llm, self.tok, self.layout, self.layers)
            with phase("context templates"):
                self.context = generate_context_templates(self.llm, self.tok, self.context_spec, self.context_seed)
            for cb in self.trainer.callbacks if self._trainer is not None else []:
                if isinstance(cb, Monitor):  # the unedited matrices, before a checkpoint's are restored
                    cb.capture_unedited(self)
            self.env = Env(self.llm, self.tok, self.layout, self.layers, self.context, self.solver)
            self.method.bind(self.env)
            self.connect(fitting_requests(self.method, self.requests, self._on_invalid, self._drop), self._on_invalid,
                         self._drop, self.data_settings)
        with timed(self.setup_seconds, "c0", "C0 statistics"):  # computed, or read from its disk cache
            C0 = c0_files(self.llm, self.tok, self.layout, self.layers, self.stats_cfg, self.model_path)
        with timed(self.setup_seconds, "solver_setup", "solver set-up"):  # re-reads C0 from its cache files, no A_0
            self.solver.setup(C0.load_all(), source=C0)
        if self.eval_pre and self.requests and not (self._trainer is not None and (self.trainer.ckpt_path or
                                                                                 self.trainer.testing)):
            with timed(self.setup_seconds, "pre_eval", "pre-edit scores"):
                self.scores.pre = self.scores.records(self.env, [r for r in self.requests if r.writes],
                                                      "pre-edit scores")

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            dist.check_strategy(self.trainer)
            # checkpoints written all or nothing, unreadable ones reported with their path (lit_edit.runs)
            if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                self.trainer.strategy.checkpoint_io = runs.AtomicCheckpointIO()

    def configure_optimizers(self):
        return None  # the LLM is frozen; the inner optimisations own their optimisers

    def configure_callbacks(self):
        defer_logger_files(self.trainer)  # nothing in the run directory before RunRecord has claimed it
        bar = progress_bar(self.trainer)
        return [ClosedFormEdit(), RunRecord()] + ([bar] if bar else [])  # in this order: the write, then its record

    # -- the step -------------------------------------------------------------------------
    def training_step(self, batch: list, batch_idx: int):
        """The targets of the batch's writes, from the method. Under DDP every rank gets the same global batch,
        optimises the targets of its shard (:func:`lit_edit.distributed.own_writes`) and gathers everyone's, in
        the global order; a refinement (MetaKE) then sees all of them."""
        started = time.perf_counter()
        writes = [r for r in batch if r.writes]  # removals need no target
        columns = self.method.columns(writes)
        d = hidden_size(self.llm)
        res, own = None, []
        if writes:
            own, capacity = dist.own_writes(batch, columns)
            with torch.enable_grad():
                local = self.method.optimise(columns, own) if own else None
            res = dist.gather_targets(local, capacity, d, opt_dtype(self.llm), self.device)
        # Lightning counts global_step through optimizer steps; with no optimizer it hands us a mock one whose
        # step() must be called inside training_step (ModelCheckpoint/max_steps read global_step).
        self.optimizers().step()
        Z, info = torch.zeros(0, d, device=self.device), {}
        if res is not None:
            Z, info = self.method.refine(columns, writes, res, own if dist.is_distributed() else None)
        plan = EditPlan(batch, Z, res, columns, started, info)
        plan.seconds["targets"] = time.perf_counter() - started
        return {"plan": plan}

    @property
    def edited_ids(self) -> list:
        return self.edits.ids

    def edited_requests(self) -> list:
        return self.edits.edited()

    def final_evaluation(self) -> tuple[dict, list[dict]] | None:
        """The final metrics over the live edits (with their pre-edit values) and the per-record scores; None when
        nothing was edited. Collective under DDP."""
        edited = self.edits.edited()
        if not edited:
            return None
        result, per_record = self.scores.final(self.env, edited, self.protocol != "sequential", self.device)
        self.final_scores = {k: v for k, v in result.items() if k in self.method.evaluator.keys}
        return result, per_record

    # -- evaluate only: ``train.py test [--ckpt_path C]`` -------------------------------------
    def on_test_start(self) -> None:
        self.scores.post = {}  # the scores of this test, by case id

    def test_step(self, batch: list, batch_idx: int) -> None:
        """Score the batch's requests on the model as it is: the unedited model, or a checkpoint's (then only its
        live edits are scored, as its fit's final evaluation did). A collective under DDP."""
        live = set(self.edits.ids)
        todo = [r for r in batch if r.writes and (not live or r.case_id in live)]
        # in a log, lines within the batch too (with generations a batch takes minutes; lit_edit.progress)
        desc = None if is_interactive() else f"test batch {batch_idx + 1} scores"
        self.scores.post.update(self.scores.records(self.env, todo, desc))

    # -- checkpoints: only what changed ------------------------------------------------------
    def edited_weights(self) -> list[torch.Tensor]:
        return [get_weight(self.llm, self.layout, l) for l in self.layers]

    def run_settings(self) -> dict:
        """Every setting that changes what a run writes, flat, named as in the YAML config
        (``model.method.init_args.v_lr``, ``data.batch_size``): stored in each checkpoint and compared on resume."""
        s = {"model.model": self.model_name, "model.dtype": self.dtype_name, "model.layers": self.layers,
             "model.layout": self.layout_override, "model.context_templates": self.context_spec,
             "model.context_seed": self.context_seed, "model.protocol": self.protocol}
        for key in ("solver", "method"):
            s[f"model.{key}.class_path"] = self.hparams[key]["class_path"]
            s.update(runs.flatten(self.hparams[key]["init_args"], f"model.{key}.init_args"))
        s.update(runs.flatten(self.hparams["stats"], "model.stats"))
        s.update(runs.flatten(self.data_settings, "data"))
        return s

    def edited_param_names(self) -> list[str]:
        """The edited weights' names in this module's state dict (``llm.`` + their names in the model)."""
        return ["llm." + n for n in edited_weights(self.llm, self.layout, self.layers)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.edited_param_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        runs.seal_checkpoint(checkpoint, {
            "solver": self.solver.state_dict(), "context": self.context, "edited_ids": list(self.edits.ids),
            "n_removed": self.edits.n_removed, "pre_records": self.scores.pre, "post_records": self.scores.post,
            "settings": self.run_settings()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, before any edit, a checkpoint that is corrupted or was written with other settings."""
        path = self.trainer.ckpt_path if self._trainer is not None else None
        state = runs.open_checkpoint(checkpoint, path)
        for key, old, new in runs.compare_settings(state["settings"], self.run_settings(), self.allow_changed, path):
            print(f"lit_edit: resuming with {key} changed on purpose: {old!r} -> {new!r}")
        self.solver.load_state_dict(state["solver"])
        self.context[:] = state["context"]  # in place: the method's Env holds this list
        self.edits.ids, self.edits.n_removed = list(state["edited_ids"]), int(state["n_removed"])
        self.scores.pre, self.scores.post = state["pre_records"], state["post_records"]


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"
