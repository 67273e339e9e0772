"""The Lightning glue: ``EditModule`` loads the frozen model and, each training step, asks its target method for
the batch's targets; the callbacks (``lit_edit.callbacks``) write them and keep the run's record.

One training step = one batch of edit requests. ``training_step`` runs the method's inner optimisation of the
targets (the LLM stays frozen; only per-request δ's are optimised) and returns an :class:`EditPlan`;
``ClosedFormEdit`` writes it with the solver's closed-form multi-layer update, atomically, and the module logs
edit quality; ``RunRecord`` appends the ledger.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_edit import checks, runs
from lit_edit import distributed as dist
from lit_edit.callbacks import ClosedFormEdit, RunRecord
from lit_edit.editing import StepStats
from lit_edit.layouts import edited_module, get_layout, get_weight
from lit_edit.methods import Columns, Env, TargetMethod, VStar
from lit_edit.evaluation import Scores
from lit_edit.models import generate_context_templates, load_model
from lit_edit.requests import EditRequest, EditRequestError
from lit_edit.solvers import AlphaEdit, Solver
from lit_edit.stats import StatsConfig, layer_stats
from lit_edit.targets import TargetResult, hidden_size, opt_dtype


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

    @property
    def writes(self) -> list[EditRequest]:
        """The requests with rows in Z (all but removals), in order."""
        return [r for r in self.requests if r.writes]


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
        export_dir: if set, ``save_pretrained`` the edited model (safetensors) at the end of fit.
        independent: evaluate each batch right after its edit, then restore the edited weights and the solver state
            (the non-sequential protocol of MUKE and EasyEdit); the final metrics are those per-batch scores.
        sync_check_every_n_steps: under DDP, compare a checksum of the edited weights across ranks every N steps
            (a raise if they ever differ); 0 = never. No-op on one process.
        trust_remote_code: let transformers run the custom modelling code a hub or local model ships (passed to
            both ``from_pretrained`` calls); off by default, so such a model is refused rather than run.
        allow_changed: settings (or prefixes, e.g. ``model.method``) that may differ from the checkpoint's on
            resume. A resume compares every setting that changes the result (:meth:`run_settings`) and stops before
            any edit on a difference not listed here. Always free to change: export_dir, eval_every_n_steps,
            eval_pre, sync_check_every_n_steps, trust_remote_code, allow_changed and the trainer's options.
    """

    def __init__(self, model: str = "world", layers: list[int] = [1, 2], solver: Solver | None = None,
                 method: TargetMethod | None = None, stats: StatsConfig = StatsConfig(),
                 layout: dict | None = None, dtype: str = "float32", context_templates: list[list[int]] = [[10, 5]],
                 context_seed: int = 0, eval_every_n_steps: int = 0, eval_pre: bool = True,
                 export_dir: str | None = None, sync_check_every_n_steps: int = 1, independent: bool = False,
                 trust_remote_code: bool = False, allow_changed: list[str] = []) -> None:
        super().__init__()
        # hparams.yaml / TensorBoard: the run's settings as plain values (components are added below as dicts);
        # a resume compares run_settings(), stored in the checkpoint, not these
        self.save_hyperparameters(ignore=["solver", "method", "stats", "allow_changed"])
        checks.edit_module_args(model, layers, dtype, context_templates, context_seed, eval_every_n_steps,
                                sync_check_every_n_steps, allow_changed)
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
        self.layout_override, self.context_spec, self.context_seed = layout, context_templates, context_seed
        self.eval_every_n_steps, self.eval_pre, self.export_dir = eval_every_n_steps, eval_pre, export_dir
        self.sync_check_every_n_steps, self.independent = sync_check_every_n_steps, independent
        self.trust_remote_code, self.allow_changed = trust_remote_code, list(allow_changed)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the edited matrices
        self.llm = None
        self.connect([])
        self.edited_ids: list = []  # live edits in order (replaced or removed facts leave it)
        self.n_removed = 0
        self.context: list[str] = []
        self.scores = Scores(self.method.evaluator)  # pre-edit, per-batch and final scores (lit_edit.evaluation)
        self.final_scores: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------
    def connect(self, requests: list, on_invalid: str = "raise", drop=None, settings: dict | None = None) -> None:
        """The hand-off of the stream (``EditDataModule.setup`` calls it; without a data module, call it yourself):
        the requests this run edits, what to do with one that does not fit the model (``on_invalid``), how to
        drop it from the stream (``drop(case_ids)``, so the checkpointed stream is the filtered one) and the
        stream's settings (``data.*``, compared on resume)."""
        self.requests, self._on_invalid, self._drop = list(requests), on_invalid, drop
        self._data_settings = dict(settings or {})

    def configure_model(self) -> None:
        """Load the LLM and everything measured on the *unedited* model (context templates, C0, pre metrics).
        Lightning calls this before restoring a checkpoint, so a resumed run sees the same values."""
        if self.llm is not None:
            return
        self.llm, self.tok, self.model_path = load_model(self.model_name, self.dtype_name, self.trust_remote_code)
        self.llm.requires_grad_(False).eval()
        self.layout = get_layout(self.llm, self.layout_override)
        n_layers = self.layout.n_layers(self.llm)
        if self.layers[-1] >= n_layers or self.layers[0] < 0:
            raise ValueError(f"layers {self.layers} out of range for a model with {n_layers} blocks")
        self.context = generate_context_templates(self.llm, self.tok, self.context_spec, self.context_seed)
        self.env = Env(self.llm, self.tok, self.layout, self.layers, self.context, self.solver)
        self.method.bind(self.env)
        self.requests = self.validate_lengths(self.requests)
        C0 = layer_stats(self.llm, self.tok, self.layout, self.layers, self.stats_cfg, self.model_path)
        self.solver.setup(C0)
        if self.eval_pre and self.requests and not (self._trainer is not None and self.trainer.ckpt_path):
            self.scores.pre = self.scores.records(self.env, [r for r in self.requests if r.writes])

    def validate_lengths(self, requests: list) -> list:
        """Every request is of the method's kind, and every sequence it is edited or scored with fits the model's
        context (before any edit). A request that does not fit follows the data module's ``on_invalid``: "raise"
        (also without a data module) stops with an EditRequestError naming case id, field and both lengths;
        "skip" logs it and drops it here *and* from the data module's stream (``drop_requests``), so the batches
        and the checkpointed stream fingerprint are those of the filtered stream. Returns the requests kept."""
        want = self.method.request_type
        bad = next((r for r in requests if not isinstance(r, want)), None)
        if bad is not None:
            hint = ("use a long-form method (model.method: lit_edit.methods.Windows) for unstructured data"
                    if want is EditRequest else "use an unstructured reader")
            raise EditRequestError(bad.case_id, "question" if want is EditRequest else "prompt",
                                   f"a {type(bad).__name__} in a run whose method edits {want.__name__}s: {hint}")
        writes = [r for r in requests if r.writes]  # removals are neither edited nor scored
        fits = self.method.check_lengths(writes, self._on_invalid)
        if len(fits) == len(writes):
            return requests
        kept = {r.case_id for r in fits}  # case ids are unique in a stream (check_unique_case_ids)
        if self._drop is not None:
            self._drop([r.case_id for r in writes if r.case_id not in kept])
        return [r for r in requests if not r.writes or r.case_id in kept]

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            dist.check_strategy(self.trainer)
            # checkpoints written all or nothing, unreadable ones reported with their path (lit_edit.runs)
            if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                self.trainer.strategy.checkpoint_io = runs.AtomicCheckpointIO()

    def configure_optimizers(self):
        return None  # the LLM is frozen; the inner optimisations own their optimisers

    def configure_callbacks(self):
        return [ClosedFormEdit(), RunRecord()]  # in this order: the write, then its record

    # -- the step -------------------------------------------------------------------------
    def training_step(self, batch: list, batch_idx: int):
        """The targets of the batch's writes, from the method. Under DDP every rank gets the same global batch,
        optimises the targets of its shard (:func:`lit_edit.distributed.shard`) and gathers everyone's, in the
        global order; a refinement (MetaKE) then sees all of them."""
        started = time.perf_counter()
        writes = [r for r in batch if r.writes]  # removals need no target
        columns = self.method.columns(writes)
        res, own = self.shard_targets(batch, columns) if writes else (None, [])
        # Lightning counts global_step through optimizer steps; with no optimizer it hands us a mock one whose
        # step() must be called inside training_step (ModelCheckpoint/max_steps read global_step).
        self.optimizers().step()
        Z, info = torch.zeros(0, hidden_size(self.llm), device=self.device), {}
        if res is not None:
            Z, info = self.method.refine(columns, writes, res, own if dist.is_distributed() else None)
            self.log_info(info, len(writes))
        return {"plan": EditPlan(batch, Z, res, columns, started, info)}

    def shard_targets(self, batch: list, columns: Columns) -> tuple[TargetResult, list[int]]:
        """The targets of all writes of ``batch`` (the rows ``columns.rows`` of each), of which this rank optimises
        its shard; returns them in the global order and the indices (among the writes) of this rank's own."""
        write_pos = [i for i, r in enumerate(batch) if r.writes]
        n_rows = [len(rows) for rows in columns.rows]
        shards = [dist.shard(len(batch), r=r) for r in range(dist.world_size())]
        own = [j for j, i in enumerate(write_pos) if i in shards[dist.rank()]]
        capacity = max(sum(n for n, i in zip(n_rows, write_pos) if i in sh) for sh in shards)  # gather width
        local = None
        if own:
            with torch.enable_grad():
                local = self.method.optimise(columns, own)
        res = dist.gather_targets(local, capacity, hidden_size(self.llm), opt_dtype(self.llm), self.device)
        logs = {"targets/loss": res.loss.mean(), "targets/nll": res.nll.mean(), "targets/steps": res.steps.float().mean(),
                "targets/delta_norm": res.delta.norm(dim=-1).mean()}
        if self.method.row_name:
            logs[f"targets/{self.method.row_name}"] = float(len(res.loss))
        self.log_dict(logs, batch_size=len(write_pos))
        return res, own

    def log_info(self, info: dict, n: int) -> None:
        """Scalars and histograms a method reports (``logs``, ``histograms``)."""
        if info.get("logs"):
            self.log_dict(info["logs"], batch_size=n)
        exp = getattr(self.logger, "experiment", None)
        if info.get("histograms") and hasattr(exp, "add_histogram") and self.trainer.is_global_zero:
            for k, v in info["histograms"].items():
                exp.add_histogram(k, v.detach().float().cpu(), self.global_step)

    def record_applied(self, plan: EditPlan, stats: StepStats) -> None:
        """Called by ClosedFormEdit after a successful write: the live edit set, and the batch's scores on the model as
        written (``plan.batch_scores``; RunRecord logs them)."""
        if stats.dropped:  # replaced or forgotten facts leave the set of live edits
            dropped = set(stats.dropped)
            by_id = {r.case_id: r for r in self.requests}
            self.edited_ids = [i for i in self.edited_ids if by_id[i].fact_id not in dropped]
            self.n_removed += sum(r.op == "remove" for r in plan.requests)
        self.edited_ids.extend(r.case_id for r in plan.writes)
        if plan.writes:
            plan.batch_scores = self.scores.batch(self.env, plan.writes, self.independent, self.device)

    def edited_requests(self) -> list[EditRequest]:
        by_id = {r.case_id: r for r in self.requests}
        return [by_id[i] for i in self.edited_ids]

    def final_evaluation(self) -> tuple[dict, list[dict]] | None:
        """The final metrics over the live edits (with their pre-edit values) and the per-record scores; None when
        nothing was edited. Collective under DDP."""
        edited = self.edited_requests()
        if not edited:
            return None
        result, per_record = self.scores.final(self.env, edited, self.independent, self.device)
        self.final_scores = {k: v for k, v in result.items() if k in self.method.evaluator.keys}
        return result, per_record

    @property
    def post_records(self) -> dict:
        return self.scores.post

    # -- checkpoints: only what changed ------------------------------------------------------
    def edited_weights(self) -> list[torch.Tensor]:
        return [get_weight(self.llm, self.layout, l) for l in self.layers]

    def edited_param_names(self) -> list[str]:
        names = {id(p): n for n, p in self.named_parameters()}
        return [names[id(edited_module(self.llm, self.layout, l).weight)] for l in self.layers]

    def run_settings(self) -> dict:
        """Every setting that changes what a run writes, flat, named as in the YAML config
        (``model.method.init_args.v_lr``, ``data.batch_size``): stored in each checkpoint and compared on resume."""
        s = {"model.model": self.model_name, "model.dtype": self.dtype_name, "model.layers": self.layers,
             "model.layout": self.layout_override, "model.context_templates": self.context_spec,
             "model.context_seed": self.context_seed, "model.independent": self.independent}
        for key in ("solver", "method"):
            s[f"model.{key}.class_path"] = self.hparams[key]["class_path"]
            s.update(runs.flatten(self.hparams[key]["init_args"], f"model.{key}.init_args"))
        s.update(runs.flatten(self.hparams["stats"], "model.stats"))
        s.update(runs.flatten(self._data_settings, "data"))
        return s

    def _checksum(self, state_dict: dict, lit_state: dict) -> str:
        """SHA-256 of the edited matrices and the solver state (verified on load: lit_edit.runs)."""
        return runs.tensor_checksum(runs.state_tensors({"state_dict": state_dict, "solver": lit_state["solver"]}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.edited_param_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        state = {"solver": self.solver.state_dict(), "context": self.context,
                 "edited_ids": list(self.edited_ids), "pre_records": self.scores.pre,
                 "post_records": self.scores.post,
                 "n_removed": self.n_removed,
                 "model": self.model_name, "layers": self.layers,
                 "solver_class": type(self.solver).__name__,
                 "settings": self.run_settings()}
        state["checksum"] = self._checksum(checkpoint["state_dict"], state)
        checkpoint["lit_edit"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, before any edit, a checkpoint that is corrupted or was written with other settings."""
        path = self.trainer.ckpt_path if self._trainer is not None else None
        state = checkpoint.get("lit_edit")
        if state is None or "checksum" not in state or "settings" not in state:
            raise runs.CheckpointError(f"checkpoint {path} was not written by this version of lit_edit (it has no "
                                       f"checksum and settings record); start a new run")
        if self._checksum(checkpoint.get("state_dict", {}), state) != state["checksum"]:
            raise runs.CheckpointError(f"checkpoint {path} is corrupted: the checksum of its edited weights and "
                                       f"solver state does not match the one recorded when it was written")
        for key, old, new in runs.compare_settings(state["settings"], self.run_settings(), self.allow_changed, path):
            print(f"lit_edit: resuming with {key} changed on purpose: {old!r} -> {new!r}")
        if state["layers"] != self.layers:
            raise ValueError(f"checkpoint edits layers {state['layers']}, this run is configured for {self.layers}")
        if state["solver_class"] != type(self.solver).__name__:
            raise ValueError(f"checkpoint was written by solver {state['solver_class']}, this run is configured with "
                             f"{type(self.solver).__name__}")
        self.solver.load_state_dict(state["solver"])
        self.context[:] = state["context"]  # in place: the method's Env holds this list
        self.edited_ids = list(state["edited_ids"])
        self.n_removed = int(state.get("n_removed", 0))
        self.scores.pre = state["pre_records"]
        self.scores.post = state.get("post_records", {})


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"
