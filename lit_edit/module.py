"""The Lightning glue: ``EditModule`` (upstream: what to write) and ``ClosedFormEdit`` (downstream: write it).

One training step = one batch of edit requests. ``training_step`` runs the inner optimisation of
the targets v* (the LLM stays frozen; only per-request δ's are optimised) and returns an
:class:`EditPlan`; the ``ClosedFormEdit`` callback writes it with the solver's closed-form
multi-layer update, atomically, then the module logs edit quality.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_edit import checks, runs
from lit_edit import distributed as dist
from lit_edit.data import check_lengths, check_structured_lengths, is_world_spec, looks_like_local_path
from lit_edit.editing import FactColumns, StepStats, apply_batch, compute_block_states
from lit_edit.layouts import edited_module, get_layout, get_weight
from lit_edit.metake import MetaKEConfig, Refinement, refine_targets
from lit_edit.metrics import (KEYS, UNSTRUCTURED_KEYS, compute_metrics, generate_answers, make_metrics, record_scores,
                              score_generations, update_metrics)
from lit_edit.muke import WindowColumns, WindowConfig, optimise_windows, windowed
from lit_edit.requests import EditRequest, EditRequestError, UnstructuredRequest
from lit_edit.solvers import AlphaEdit, Solver
from lit_edit.stats import StatsConfig, layer_stats
from lit_edit.targets import TargetConfig, TargetResult, compute_targets, hidden_size, opt_dtype
from lit_edit.tokens import context_length, encode, pad_id


@dataclass
class EditPlan:
    """What training_step hands to the callback: the requests and their targets at the last edited layer."""

    requests: list[EditRequest]
    Z: torch.Tensor  # [n_writes, d], one row per request that is not a removal
    targets: TargetResult | None  # None when the batch only removes edits
    started: float = field(default_factory=time.perf_counter)
    refinement: Refinement | None = None  # MetaKE's refinement of the targets, when configured
    seqs: list | None = None  # unstructured: the writes' tokenised windows (WindowedSequence), in order
    beta_hat: torch.Tensor | None = None  # empirical realisation per write, filled after the write (MetaKE runs)

    @property
    def writes(self) -> list[EditRequest]:
        """The requests with rows in Z (all but removals), in order."""
        return [r for r in self.requests if r.writes]

    @property
    def columns_of(self) -> list[list[int]]:
        """The rows of Z of each write: one each, or one per window for unstructured edits."""
        sizes = [s.N for s in self.seqs] if self.seqs is not None else [1] * len(self.writes)
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        return [list(range(b, b + n)) for b, n in zip(starts, sizes)]


def gather_targets(local: TargetResult | None, capacity: int, d: int, dtype: torch.dtype, device) -> TargetResult:
    """Every rank's targets (its shard's rows, ≤ ``capacity``; None when its shard has no write), concatenated
    in rank order = the global order of the batch's writes. One process: ``local`` itself."""
    if not dist.is_distributed():
        return local
    if local is None:
        z, zl = torch.zeros(0, d, device=device, dtype=dtype), torch.zeros(0, device=device, dtype=dtype)
        local = TargetResult(z, z, z, zl, zl, torch.zeros(0, dtype=torch.long), [])
    rows = lambda x: dist.gather_rows(x.to(device), capacity)  # noqa: E731
    return TargetResult(rows(local.v_star), rows(local.h_init), rows(local.delta), rows(local.loss), rows(local.nll),
                        rows(local.steps).cpu(), local.history)


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """``from_pretrained`` for a hub id or local path; ``world[:preset]`` is the built-in fact world.

    A name that :func:`~lit_edit.data.looks_like_local_path` must exist, as a directory: otherwise a
    ``FileNotFoundError`` names it, where transformers would answer "Repo id must be in the form ...".
    ``trust_remote_code`` goes to both ``from_pretrained`` calls explicitly, so a model with custom code is
    refused (unless it is ``True``), never met with an interactive "run the custom code? [y/N]" prompt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path
    if is_world_spec(name_or_path):  # the one test for "the built-in world": a dir named world_models/... is not it
        from lit_edit.world import ensure_world, resolve_world_name

        path = str(ensure_world(resolve_world_name(name_or_path)) / "model")
    elif looks_like_local_path(name_or_path):
        local = Path(name_or_path).expanduser()  # transformers does not expand "~"
        if not local.exists():
            raise FileNotFoundError(f"model directory {name_or_path} does not exist (model.model)")
        if not local.is_dir():
            raise NotADirectoryError(f"model path {name_or_path} is not a directory (model.model)")
        path = str(local)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # all position arithmetic assumes right padding (§1.5)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model, tok, path


@torch.no_grad()
def generate_context_templates(model, tok, spec: list[list[int]], seed: int) -> list[str]:
    """§1.4: "{}" plus, for each [length, count], ``count`` short samples from the unedited model
    (seeds The/Therefore/Because/I/You, top-k 5), each followed by ". {}". Seeded here (unseeded upstream)."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    out = ["{}"]
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for length, count in spec:
        for i in range(count):
            ids = tok(starts[i % len(starts)], add_special_tokens=True, return_tensors="pt")["input_ids"].to(dev)
            while ids.shape[1] < length:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
                top = logits.topk(5)
                nxt = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                ids = torch.cat([ids, nxt.to(dev)[None]], 1)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(text + ". {}")
    return out


def check_module_args(model, layers, dtype, context_templates, context_seed, eval_every_n_steps,
                      sync_check_every_n_steps, allow_changed) -> None:
    """EditModule's own settings, refused at construction with the YAML name (lit_edit.checks)."""
    checks.text("model.model", model)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"model.layers must be a non-empty list of block indices, got {layers!r}")
    for i, l in enumerate(layers):
        checks.integer(f"model.layers[{i}]", l, ge=0)
    if len(set(layers)) != len(layers):
        raise ValueError(f"model.layers must not repeat a layer, got {list(layers)}")
    checks.choice("model.dtype", dtype, ("float32", "float64", "bfloat16", "float16"))
    for i, spec in enumerate(context_templates):
        if not isinstance(spec, (list, tuple)) or len(spec) != 2:
            raise ValueError(f"model.context_templates[{i}] must be [length, count], got {spec!r}")
        checks.integer(f"model.context_templates[{i}][0] (length in tokens)", spec[0], ge=1)
        checks.integer(f"model.context_templates[{i}][1] (count)", spec[1], ge=0)
    checks.integer("model.context_seed", context_seed, ge=0)
    checks.integer("model.eval_every_n_steps", eval_every_n_steps, ge=0)
    checks.integer("model.sync_check_every_n_steps", sync_check_every_n_steps, ge=0)
    for i, name in enumerate(allow_changed):
        checks.text(f"model.allow_changed[{i}]", name)


class EditModule(L.LightningModule):
    """A frozen causal LM being edited one batch of requests per step.

    Args:
        model: hub id, local path, or ``world[:preset]`` (the built-in fact world).
        layers: edited layers; targets are optimised at the last one (L = max(layers)).
        solver: the downstream closed-form solver (MEMIT, AlphaEdit, ...); default AlphaEdit.
        targets: §2 hyper-parameters of the v* optimisation.
        metake: MetaKE bi-level refinement of the targets through the solver's gate (§7); None = off.
        windows: unstructured (long-form) editing (§8): One-for-All, AnyEdit or μKE window targets; the stream must
            then hold unstructured requests (readers unke, akew, editeverything, world_long). None = structured.
        stats: corpus for the key second moment C0 (§3).
        layout: architecture layout override (see ``lit_edit.layouts``) for models not in the registry.
        context_templates: [[length, count], ...] of generated context prefixes (§1.4); [] = bare prompts only.
        eval_every_n_steps: evaluate all requests edited so far every N steps (retention curve); 0 = never.
        eval_pre: evaluate the unedited model on the whole stream once (the ``pre.`` metrics).
        export_dir: if set, ``save_pretrained`` the edited model (safetensors) at the end of fit.
        independent: evaluate each batch right after its edit, then restore the edited weights and the solver state
            (the non-sequential protocol of MUKE and EasyEdit); the final metrics are those per-batch scores.
        sync_check_every_n_steps: under DDP, compare a checksum of the edited weights across ranks every N steps
            (a raise if they ever differ); 0 = never. No-op on one process.
        allow_changed: settings (or prefixes, e.g. ``model.targets``) that may differ from the checkpoint's on
            resume. A resume compares every setting that changes the result (:meth:`run_settings`) and stops before
            any edit on a difference not listed here. Always free to change: export_dir, eval_every_n_steps,
            eval_pre, sync_check_every_n_steps, allow_changed and the trainer's options.
        trust_remote_code: let transformers run the custom modelling code a hub or local model ships (passed to
            both ``from_pretrained`` calls); off by default, so such a model is refused rather than run.
    """

    def __init__(self, model: str = "world", layers: list[int] = [1, 2], solver: Solver | None = None,
                 targets: TargetConfig = TargetConfig(), metake: MetaKEConfig | None = None,
                 windows: WindowConfig | None = None,
                 stats: StatsConfig = StatsConfig(),
                 layout: dict | None = None, dtype: str = "float32", context_templates: list[list[int]] = [[10, 5]],
                 context_seed: int = 0, eval_every_n_steps: int = 0, eval_pre: bool = True,
                 export_dir: str | None = None, sync_check_every_n_steps: int = 1, independent: bool = False,
                 trust_remote_code: bool = False, allow_changed: list[str] = []) -> None:
        super().__init__()
        # hparams.yaml / TensorBoard: the run's settings as plain values (component objects are added below as dicts);
        # a resume compares run_settings(), stored in the checkpoint, not these
        self.save_hyperparameters(ignore=["solver", "targets", "stats", "metake", "windows", "allow_changed"])
        check_module_args(model, layers, dtype, context_templates, context_seed, eval_every_n_steps,
                          sync_check_every_n_steps, allow_changed)
        self.model_name = model
        self.layers = sorted(layers)
        self.solver = solver if solver is not None else AlphaEdit()
        self.target_cfg = targets if isinstance(targets, TargetConfig) else TargetConfig(**targets)
        self.stats_cfg = stats if isinstance(stats, StatsConfig) else StatsConfig(**stats)
        self.metake_cfg = metake if isinstance(metake, MetaKEConfig) or metake is None else MetaKEConfig(**metake)
        self.window_cfg = windows if isinstance(windows, WindowConfig) or windows is None else WindowConfig(**windows)
        if self.window_cfg is not None and self.metake_cfg is not None:
            raise ValueError("metake refines structured targets; it cannot be combined with windows (unstructured)")
        self.metric_keys = KEYS if self.window_cfg is None else UNSTRUCTURED_KEYS
        # plain dicts only, so checkpoints load with torch.load(weights_only=True)
        self.hparams.update(targets=asdict(self.target_cfg), stats=asdict(self.stats_cfg),
                            metake=asdict(self.metake_cfg) if self.metake_cfg else None,
                            windows=asdict(self.window_cfg) if self.window_cfg else None)
        self.layout_override = layout
        self.dtype_name = dtype
        self.context_spec = context_templates
        self.context_seed = context_seed
        self.eval_every_n_steps = eval_every_n_steps
        self.eval_pre = eval_pre
        self.export_dir = export_dir
        self.sync_check_every_n_steps = sync_check_every_n_steps
        self.independent = independent
        self.allow_changed = list(allow_changed)
        self.trust_remote_code = trust_remote_code
        self.post_records: dict = {}  # independent runs: case_id -> scores right after its own batch
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the edited matrices
        self.llm = None
        self.run_dir: str | None = None  # the trainer's log dir: edits.jsonl, metrics.json
        self.edited_ids: list = []  # live edits in order (replaced or removed facts leave it)
        self.n_removed = 0
        self.context: list[str] = []
        self.pre_records: dict = {}  # case_id -> pre-edit scores, so "pre." covers exactly the edited set
        self.final_scores: dict[str, float] = {}
        self._resume: dict | None = None  # set by on_load_checkpoint: what on_fit_start checks and rolls back
        self._lock: runs.RunLock | None = None
        self.ledger_lines = 0  # lines of edits.jsonl written so far (counted on every rank; rank 0 writes)
        self.batch_metrics = make_metrics(keys=self.metric_keys)

    # -- set-up ---------------------------------------------------------------------------
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
        dm = self.trainer.datamodule if self._trainer is not None else None
        self.requests = list(getattr(dm, "requests", []) or [])
        self.requests = self.validate_lengths(self.requests)  # on_invalid="skip" drops what does not fit
        C0 = layer_stats(self.llm, self.tok, self.layout, self.layers, self.stats_cfg, self.model_path)
        self.solver.setup(C0)
        if self.eval_pre and self.requests and not (self._trainer is not None and self.trainer.ckpt_path):
            self.pre_records = self.scored_records([r for r in self.requests if r.writes])

    def validate_lengths(self, requests: list) -> list:
        """Every sequence a request is edited or scored with must fit the model's context (checked before any edit).

        Structured requests: :func:`~lit_edit.data.check_structured_lengths` (the edit sequence with the longest
        context template, and every sequence :func:`~lit_edit.metrics.record_scores` runs: paraphrase and
        neighbourhood prompts with their targets); unstructured: :func:`~lit_edit.data.check_lengths`. A request
        that does not fit follows the data module's ``on_invalid``: ``"raise"`` (also without a data module)
        stops with an :class:`EditRequestError` naming its case id, field and both lengths; ``"skip"`` logs it and
        drops it here *and* from the data module's stream (:meth:`~lit_edit.data.EditDataModule.drop_requests`),
        so the batches and the checkpointed stream fingerprint are those of the filtered stream. Returns the
        requests kept, in order.
        """
        want = EditRequest if self.window_cfg is None else UnstructuredRequest
        bad = next((r for r in requests if not isinstance(r, want)), None)
        if bad is not None:
            hint = "set model.windows for unstructured data" if want is EditRequest else "use an unstructured reader"
            raise EditRequestError(bad.case_id, "prompt" if want is UnstructuredRequest else "question",
                                   f"a {type(bad).__name__} in a run configured for {want.__name__}s: {hint}")
        dm = self.trainer.datamodule if self._trainer is not None else None
        on_invalid = getattr(dm, "on_invalid", "raise")
        writes = [r for r in requests if r.writes]  # removals are neither edited nor scored
        if self.window_cfg is not None:
            fits = check_lengths(writes, self.tok, self.llm, template=self.window_cfg.template,
                                 chat=self.window_cfg.chat, on_invalid=on_invalid)
        else:
            limit = context_length(self.llm)
            if not limit:
                return requests
            fits = check_structured_lengths(writes, self.tok, limit, context=max(self.context, key=len),
                                            fact_token=self.target_cfg.fact_token, on_invalid=on_invalid)
        if len(fits) == len(writes):
            return requests
        kept = {r.case_id for r in fits}  # case ids are unique in a stream (check_unique_case_ids)
        dropped = [r.case_id for r in writes if r.case_id not in kept]
        if dm is not None:
            if not hasattr(dm, "drop_requests"):
                raise RuntimeError(f"{type(dm).__name__} has on_invalid={on_invalid!r} but no drop_requests(): "
                                   f"cannot drop the requests that do not fit the model ({dropped})")
            dm.drop_requests(dropped)
        return [r for r in requests if not r.writes or r.case_id in kept]

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            dist.check_strategy(self.trainer)
            # checkpoints written all or nothing, unreadable ones reported with their path (lit_edit.runs)
            if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                self.trainer.strategy.checkpoint_io = runs.AtomicCheckpointIO()

    def on_fit_start(self) -> None:
        """Claim the run directory before any edit: one fit at a time (a lock), a new fit only into a directory
        without an editing run's outputs, a resume only into its checkpoint's directory, whose ledger is rolled
        back to the checkpoint's lines."""
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): read it here on every rank, once,
        # never inside a rank-0-only branch
        self.run_dir = self.trainer.log_dir
        problem = None
        if self.trainer.is_global_zero and self.run_dir:
            try:
                self._claim_run_dir(Path(self.run_dir))
            except (runs.RunDirError, runs.CheckpointError, OSError) as err:
                problem = str(err)
        problem = dist.broadcast_object(problem)  # every rank stops, not only rank 0
        if problem is not None:
            raise runs.RunDirError(problem)

    def _claim_run_dir(self, run_dir: Path) -> None:
        if self._resume is not None:
            home = runs.checkpoint_run_dir(self._resume["ckpt"], self._resume["run_dir"])
            if run_dir.resolve() != home:
                raise runs.RunDirError(
                    f"a resumed run continues in its checkpoint's run directory {home}, but this trainer writes to "
                    f"{run_dir}: point the logger there (save_dir/name/version; train.py does it from --ckpt_path)")
        self._lock = runs.RunLock(run_dir)
        self._lock.acquire()
        if self._resume is None:
            found = runs.run_outputs(run_dir)
            if found:
                raise runs.RunDirError(f"run directory {run_dir} already holds an editing run ({', '.join(found)}): "
                                       f"resume it with --ckpt_path, or write to a new directory (logger version)")
        else:
            dropped = runs.Ledger(run_dir).truncate(self._resume["ledger_lines"])
            if dropped:
                print(f"lit_edit: resuming {self._resume['ckpt']}: dropped {dropped} ledger line(s) of steps after it")

    def teardown(self, stage: str) -> None:
        self.release_run_dir()

    def release_run_dir(self) -> None:
        """Drop the run directory's lock (at the end of a fit, or when it fails: ClosedFormEdit.on_exception)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def configure_optimizers(self):
        return None  # the LLM is frozen; the inner optimisations own their optimisers

    # -- the step -------------------------------------------------------------------------
    def training_step(self, batch: list, batch_idx: int):
        """Targets for the batch's writes: v* (§2, refined by MetaKE when configured) or, for unstructured edits,
        one window target per window (§8). Under DDP every rank gets the same global batch, optimises the targets
        of its shard (:func:`lit_edit.distributed.shard`) and gathers everyone's, in the global order."""
        started = time.perf_counter()
        writes = [r for r in batch if r.writes]  # removals need no target
        seqs = [windowed(self.tok, r, self.window_cfg) for r in writes] if self.window_cfg is not None else None
        res, own = self.shard_targets(batch, seqs) if writes else (None, [])
        # Lightning counts global_step through optimizer steps; with no optimizer it hands us a mock one whose
        # step() must be called inside training_step (ModelCheckpoint/max_steps read global_step).
        self.optimizers().step()
        Z = res.v_star if res is not None else torch.zeros(0, hidden_size(self.llm), device=self.device)
        ref = None
        if res is not None and self.metake_cfg is not None:
            with torch.enable_grad():
                ref = refine_targets(self.llm, self.tok, self.layout, self.solver, self.layers, writes, self.context,
                                     res.v_star, self.target_cfg, self.metake_cfg,
                                     own=own if dist.is_distributed() else None)
            Z = ref.V.to(Z.dtype)
            self.log_dict({"metake/loss_start": ref.history[0], "metake/loss_end": ref.history[-1],
                           "metake/nll_end": ref.nll.mean(), "metake/beta_mean": ref.beta.mean(),
                           "metake/rho_mean": ref.rho.mean(),
                           "metake/target_shift": (ref.V - res.v_star.to(ref.V.dtype)).norm(dim=-1).mean(),
                           "metake/grad_norm_start": ref.grad_start.mean()},
                          batch_size=len(writes))
            self._histograms({"metake/beta": ref.beta, "metake/rho": ref.rho})
            if ref.fidelity is not None:
                self.log_dict({f"metake/{k}": v for k, v in ref.fidelity.items()}, batch_size=len(writes))
        return {"plan": EditPlan(batch, Z, res, started, ref, seqs)}

    def shard_targets(self, batch: list, seqs: list | None) -> tuple[TargetResult, list[int]]:
        """The targets of all writes of ``batch`` (one row per write, or per window of each write's ``seqs``),
        of which this rank optimises its shard; returns them in the global order and the indices (among the
        writes) of this rank's own."""
        write_pos = [i for i, r in enumerate(batch) if r.writes]
        writes = [batch[i] for i in write_pos]
        n_rows = [s.N for s in seqs] if seqs is not None else [1] * len(writes)
        shards = [dist.shard(len(batch), r=r) for r in range(dist.world_size())]
        own = [j for j, i in enumerate(write_pos) if i in shards[dist.rank()]]
        capacity = max(sum(n for n, i in zip(n_rows, write_pos) if i in sh) for sh in shards)  # gather width
        local = None
        if own:
            with torch.enable_grad():
                if seqs is None:
                    local = compute_targets(self.llm, self.tok, self.layout, self.layers[-1], [writes[j] for j in own],
                                            self.context, self.target_cfg)
                else:
                    got = optimise_windows(self.llm, self.layout, self.layers[-1], [seqs[j] for j in own],
                                           self.window_cfg, pad=pad_id(self.tok))
                    cat = lambda k: torch.cat([getattr(t, k) for t in got])  # noqa: E731
                    local = TargetResult(cat("z"), cat("h_init"), cat("delta"), cat("loss"), cat("nll"), cat("steps"), [])
        res = gather_targets(local, capacity, hidden_size(self.llm), opt_dtype(self.llm), self.device)
        logs = {"targets/loss": res.loss.mean(), "targets/nll": res.nll.mean(), "targets/steps": res.steps.float().mean(),
                "targets/delta_norm": res.delta.norm(dim=-1).mean()}
        if seqs is not None:
            logs["targets/windows"] = float(len(res.loss))
        self.log_dict(logs, batch_size=len(writes))
        return res, own

    def columns(self, writes: list, seqs: list | None = None):
        """The column provider of a batch's writes for :func:`lit_edit.editing.apply_batch` (``seqs``: the writes'
        tokenised windows, when the step already has them)."""
        if self.window_cfg is None:
            return FactColumns(self.tok, writes, self.context, self.target_cfg.fact_token,
                               self.target_cfg.legacy_bos_shift)
        seqs = seqs if seqs is not None else [windowed(self.tok, r, self.window_cfg) for r in writes]
        return WindowColumns(seqs, [r.fact_id for r in writes], self.window_cfg.preservation, pad_id(self.tok))

    def record_scores(self, requests: list) -> list[dict[str, float]]:
        """Per-record scores on the current model: CounterFact/ZsRE probabilities, or BLEU / ROUGE-L of greedy
        generations for unstructured requests."""
        if self.window_cfg is None:
            return record_scores(self.llm, self.tok, requests)
        cfg = self.window_cfg
        gens = generate_answers(self.llm, self.tok, requests, chat=cfg.chat, template=cfg.template)
        return score_generations(requests, gens, style=cfg.metric_style)

    def scored_records(self, requests: list) -> dict:
        """case_id -> :meth:`record_scores` of ``requests`` on the current model; under DDP each rank scores its shard
        and every rank gets the union."""
        mine = [requests[i] for i in dist.shard(len(requests))]
        parts = dist.all_gather_objects(list(zip([r.case_id for r in mine], self.record_scores(mine) if mine else [])))
        return dict(pair for part in parts for pair in part)

    def record_info(self, r) -> dict:
        """What a per-record breakdown needs besides the scores: the answer length in tokens (unstructured)."""
        if self.window_cfg is None:
            return {}
        return {"answer_tokens": len(encode(self.tok, r.answer)), "category": r.category}

    def _histograms(self, values: dict[str, torch.Tensor]) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram") and self.trainer.is_global_zero:
            for k, v in values.items():
                exp.add_histogram(k, v.detach().float().cpu(), self.global_step)

    def log_realisation(self, plan: EditPlan) -> None:
        """Empirical realisation β̂_i = ⟨h_L^post − h_L^pre, r_i⟩ / ‖r_i‖² with r = V − h_L^pre, end to end at the
        last edited layer (ALGORITHMS.md §7.5), next to the predicted β."""
        ref, writes = plan.refinement, plan.writes
        post = compute_block_states(self.llm, self.tok, self.layout, self.layers[-1], writes,
                                    self.target_cfg.fact_token, self.target_cfg.legacy_bos_shift).to(ref.H)
        r = plan.Z.to(ref.H) - ref.H
        beta_hat = ((post - ref.H) * r).sum(-1) / (r.pow(2).sum(-1) + 1e-12)
        self.log("metake/beta_hat_mean", beta_hat.mean(), batch_size=len(writes))
        self._histograms({"metake/beta_hat": beta_hat})
        plan.beta_hat = beta_hat.detach().cpu()

    def on_edit_applied(self, plan: EditPlan, stats: StepStats) -> None:
        """Called by ClosedFormEdit after a successful write: ledger, logs, retention evaluation."""
        n = len(plan.requests)
        writes = plan.writes
        if stats.dropped:  # replaced or forgotten facts leave the set of live edits
            dropped = set(stats.dropped)
            by_id = {r.case_id: r for r in self.requests}
            self.edited_ids = [i for i in self.edited_ids if by_id[i].fact_id not in dropped]
            self.n_removed += sum(r.op == "remove" for r in plan.requests)
            self.log("n_removed", float(self.n_removed), batch_size=n)
        self.edited_ids.extend(r.case_id for r in writes)
        for name, per_layer in (("residual_norm", stats.residual_norm), ("delta_norm", stats.update_norm),
                                ("forget_norm", stats.forget_norm), ("regularizer_change", stats.regularizer_change)):
            for l, v in per_layer.items():
                self.log(f"update/{name}/layer_{l}", v, batch_size=n)
        for k, v in self.solver.describe().items():
            self.log(f"solver/{k}", float(v), batch_size=n)
        if writes and plan.refinement is not None:
            self.log_realisation(plan)
        if writes:
            if self.independent:  # the final metrics are these scores: keep them per record
                got = self.scored_records(writes)
                self.post_records.update(got)
                scores = self.evaluate([], [got[r.case_id] for r in writes], metrics=self.batch_metrics)
            else:
                scores = self.evaluate(writes, metrics=self.batch_metrics)
            self.log_dict({f"batch/{k}": v for k, v in scores.items()}, batch_size=len(writes), prog_bar=True)
        if self.sync_check_every_n_steps and self.global_step % self.sync_check_every_n_steps == 0:
            dist.assert_in_sync(self.edited_weights(), f"edited weights after step {self.global_step}")
        self.log("n_edits", float(len(self.edited_ids)), batch_size=n)
        step = self.global_step
        if self.eval_every_n_steps and step % self.eval_every_n_steps == 0 and not self.independent:
            scores = self.evaluate(self.edited_requests())
            # straight to the logger: self.log from a batch-end hook re-emits the cached value at every later
            # step until it is logged again (measured: 5 identical points per 5-step interval in TensorBoard)
            if self.logger is not None and self.trainer.is_global_zero:
                self.logger.log_metrics({f"edited/{k}": v for k, v in scores.items()}, step=step)
        self.log("time/step_seconds", time.perf_counter() - plan.started, batch_size=n)
        self._write_ledger(plan, stats)

    def _write_ledger(self, plan: EditPlan, stats: StepStats) -> None:
        """One line per request of the step, appended to ``edits.jsonl`` (rank 0); the count is checkpointed, so a
        resume rolls the ledger back to exactly the edits its checkpoint holds."""
        self.ledger_lines += len(plan.requests)
        if self._trainer is None or not self.trainer.is_global_zero or not self.run_dir:
            return
        dropped = set(stats.dropped)
        lines = []
        j = 0  # index among the requests that wrote a value
        columns_of = plan.columns_of
        for r in plan.requests:
            line = {"case_id": r.case_id, "step": self.global_step, "operation": r.op, "fact": r.fact_id,
                    "layers": self.layers, "update_norm": stats.update_norm}
            if r.op == "insert" and r.fact_id in dropped:
                line["operation"] = "insert (replaced earlier edit)"
            if r.writes:  # per target column; an unstructured edit has one column per window (their mean)
                cols = columns_of[j]
                line["target_loss"] = round(float(plan.targets.loss[cols].mean()), 6)
                line["residual_norm"] = {l: sum(v[c] for c in cols) / len(cols) for l, v in stats.request_residual.items()}
                if plan.seqs is not None:
                    line["windows"] = len(cols)
                if plan.refinement is not None:  # §7.5 diagnostics per request (benchmarks/realisation_bins.py)
                    line["rho"] = float(plan.refinement.rho[j])
                    line["beta"] = float(plan.refinement.beta[j])
                    if plan.beta_hat is not None:
                        line["beta_hat"] = float(plan.beta_hat[j])
                j += 1
            if r.fact_id in dropped:
                line["forget_norm"] = stats.forget_norm
            lines.append(line)
        runs.Ledger(self.run_dir).append(lines)

    # -- evaluation -----------------------------------------------------------------------
    def edited_requests(self) -> list[EditRequest]:
        by_id = {r.case_id: r for r in self.requests}
        return [by_id[i] for i in self.edited_ids]

    def evaluate(self, requests: list[EditRequest], scores: list[dict] | None = None, metrics=None) -> dict[str, float]:
        """Mean scores of ``requests`` (or of precomputed per-record ``scores``). Under DDP each rank scores its shard
        and the torchmetrics states (sums and counts) are reduced by ``compute()``: call it on every rank."""
        metrics = make_metrics(keys=self.metric_keys).to(self.device) if metrics is None else metrics
        metrics.reset()
        if scores is None:
            mine = [requests[i] for i in dist.shard(len(requests))]
            scores = self.record_scores(mine) if mine else []
        else:
            scores = [scores[i] for i in dist.shard(len(scores))]
        update_metrics(metrics, scores)
        return compute_metrics(metrics, self.metric_keys)

    def configure_callbacks(self):
        return [ClosedFormEdit()]

    def on_fit_end(self) -> None:
        edited = self.edited_requests()
        if not edited:
            return
        post = self.post_records if self.independent else self.scored_records(edited)
        self.final_scores = self.evaluate([], [post[r.case_id] for r in edited])
        pre = [self.pre_records[r.case_id] for r in edited if r.case_id in self.pre_records]
        pre_scores = self.evaluate([], pre) if pre else {}
        result = {**self.final_scores, **{f"pre.{k}": v for k, v in pre_scores.items()}, "n_edits": len(edited)}
        if self.trainer.is_global_zero:
            print_table(result, len(edited), self.metric_keys)
            if self.run_dir:
                runs.atomic_write(Path(self.run_dir) / runs.METRICS, json.dumps(result, indent=2))
                # per record, for breakdowns (e.g. by length)
                runs.atomic_write(Path(self.run_dir) / runs.SCORES, "".join(
                    json.dumps({"case_id": r.case_id, **post[r.case_id],
                                **{f"pre.{k}": v for k, v in self.pre_records.get(r.case_id, {}).items()},
                                **self.record_info(r)}) + "\n" for r in edited))
            if self.logger is not None:
                self.logger.log_metrics({f"final/{k}": v for k, v in result.items()}, step=self.global_step)
            if self.export_dir:
                self.llm.save_pretrained(self.export_dir)
                self.tok.save_pretrained(self.export_dir)

    # -- checkpoints: only what changed ------------------------------------------------------
    def edited_weights(self) -> list[torch.Tensor]:
        return [get_weight(self.llm, self.layout, l) for l in self.layers]

    def edited_param_names(self) -> list[str]:
        names = {id(p): n for n, p in self.named_parameters()}
        return [names[id(edited_module(self.llm, self.layout, l).weight)] for l in self.layers]

    def run_settings(self) -> dict:
        """Every setting that changes what a run writes, flat, named as in the YAML config (``model.targets.v_lr``,
        ``data.batch_size``): stored in each checkpoint and compared on resume."""
        s = {"model.model": self.model_name, "model.dtype": self.dtype_name, "model.layers": self.layers,
             "model.layout": self.layout_override, "model.context_templates": self.context_spec,
             "model.context_seed": self.context_seed, "model.independent": self.independent,
             "model.solver.class_path": f"{type(self.solver).__module__}.{type(self.solver).__name__}"}
        s.update(runs.flatten(self.solver.settings(), "model.solver.init_args"))
        for key in ("targets", "stats", "metake", "windows"):
            s.update(runs.flatten(self.hparams[key], f"model.{key}"))
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            s.update(runs.flatten({k: v for k, v in dm.hparams.items() if not k.startswith("_")}, "data"))
        return s

    def _checksum(self, state_dict: dict, lit_state: dict) -> str:
        """SHA-256 of the edited matrices and the solver state (verified on load: lit_edit.runs)."""
        return runs.tensor_checksum(runs.state_tensors({"state_dict": state_dict, "solver": lit_state["solver"]}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.edited_param_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        state = {"solver": self.solver.state_dict(), "context": self.context,
                 "edited_ids": list(self.edited_ids), "pre_records": self.pre_records,
                 "post_records": self.post_records,
                 "n_removed": self.n_removed,
                 "model": self.model_name, "layers": self.layers,
                 "solver_class": type(self.solver).__name__,
                 "settings": self.run_settings(), "ledger_lines": self.ledger_lines,
                 "run_dir": str(Path(self.run_dir).resolve()) if self.run_dir else None}
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
        self.context = state["context"]
        self.edited_ids = list(state["edited_ids"])
        self.n_removed = int(state.get("n_removed", 0))
        self.pre_records = state["pre_records"]
        self.post_records = state.get("post_records", {})
        self.ledger_lines = int(state["ledger_lines"])
        self._resume = {"ckpt": path, "ledger_lines": self.ledger_lines, "run_dir": state["run_dir"]}


def print_table(result: dict, n: int, keys: tuple[str, ...] = KEYS) -> None:
    rows = [(k, result.get(f"pre.{k}"), result.get(k)) for k in keys]
    print(f"\nlit_edit: final evaluation over {n} edited requests")
    print(f"{'metric':<16}{'pre':>10}{'post':>10}")
    for k, pre, post in rows:
        f = lambda x: f"{100 * x:10.2f}" if x is not None else f"{'-':>10}"  # noqa: E731
        print(f"{k:<16}{f(pre)}{f(post)}")


class ClosedFormEdit(L.Callback):
    """Writes the plan of each training step with the module's solver (§4 layer loop), atomically."""

    def on_exception(self, trainer, pl_module: EditModule, exception: BaseException) -> None:
        pl_module.release_run_dir()  # Lightning calls no module teardown after a failure

    def on_train_batch_end(self, trainer, pl_module: EditModule, outputs, batch, batch_idx) -> None:
        plan: EditPlan = outputs["plan"]
        m = pl_module
        if m.independent:  # snapshot to restore after the batch is evaluated (the solver replaces, never mutates)
            saved = ([w.clone() for w in m.edited_weights()], m.solver.state_dict())
        stats = apply_batch(m.llm, m.layout, m.solver, m.layers, plan.requests, plan.Z,
                            lambda writes: m.columns(writes, plan.seqs))
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "mark_applied"):
            dm.mark_applied()
        m.on_edit_applied(plan, stats)
        if m.independent:
            with torch.no_grad():
                for w, w0 in zip(m.edited_weights(), saved[0]):
                    w.copy_(w0)
            m.solver.load_state_dict(saved[1])
