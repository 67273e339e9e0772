"""Target methods: *what* a step writes, as components chosen by ``class_path`` (``model.method`` in the YAML).

A :class:`TargetMethod` turns a batch's writing requests into target rows Z at the last edited layer L; the solver
(``lit_edit.solvers``) then writes them. The Lightning module never branches on the kind of method: it asks the
method for the batch's :class:`Columns`, the targets of its shard of them (:meth:`TargetMethod.optimise`), an
optional refinement (:meth:`TargetMethod.refine`), and how to score requests (:attr:`TargetMethod.evaluator`).

Registered methods:

* :class:`VStar` — MEMIT-style targets v* (docs/algorithms.md §2), one row per request, its settings those of
  :class:`~lit_edit.targets.TargetConfig`.
* :class:`MetaKE` — v* of its ``base`` refined through the solver's gate (§7; MetaKE Algorithm 1).
* :class:`Windows` — long-form (unstructured) answers: One-for-All, AnyEdit or μKE window targets (§8), one row
  per window.

A new method is one class (a subclass of :class:`TargetMethod` implementing ``columns`` and ``optimise``) named by
its ``class_path`` in a config; nothing else changes (tests/test_methods.py shows one with fixed targets).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lit_edit import checks
from lit_edit.evaluation import SHOWN_CHUNK
from lit_edit.data import check_lengths, check_structured_lengths
from lit_edit.editing import FactColumns, compute_block_states
from lit_edit.metake import MetaKEConfig, refine_targets
from lit_edit.cf_metrics import (FLUENCY_WEIGHTS, FREE_KEYS, WORD_TOKENIZERS, References, free_generation_scores,
                                 generation_scores, load_references)
from lit_edit.metrics import (BERTSCORE_MODES, KEYS, MAGNITUDE_KEYS, MAGNITUDES, UNSTRUCTURED_KEYS, ZSRE_KEYS,
                              add_embedding_scores, generate_answers, record_scores, score_generations)
from lit_edit.muke import WindowColumns, WindowConfig, optimise_windows, windowed
from lit_edit.requests import EditRequest, UnstructuredRequest
from lit_edit.targets import TargetConfig, TargetResult, compute_targets
from lit_edit.tokens import context_length, encode, pad_id


@runtime_checkable
class Columns(Protocol):
    """The columns a step writes, built once by the method and carried by the plan from the step to the write.

    ``ids``: the ledger id of every column (target columns first, then any preservation columns, whose residual
    is 0); ``n_targets``: the number of target columns (= rows of Z); ``rows``: the target rows of each writing
    request, in order; ``keys`` / ``states``: the keys at the edited layers and the block-L states at the target
    positions, read on the model as it is when called."""

    ids: list[str]
    n_targets: int
    rows: list[list[int]]

    def keys(self, model, layout, layers: list[int]) -> dict[int, torch.Tensor]: ...

    def states(self, model, layout, layer: int) -> torch.Tensor: ...


@dataclass
class Env:
    """What a method works with, handed over by the module once the model is loaded."""

    llm: Any
    tok: Any
    layout: Any
    layers: list[int]  # sorted; targets are at L = layers[-1]
    context: list[str]  # context templates (docs/algorithms.md §1.4), "{}" first
    solver: Any


# ------------------------------------------------------------------------------------------------
# Evaluators: how requests are scored
# ------------------------------------------------------------------------------------------------


class Evaluator(Protocol):
    keys: tuple[str, ...]  # the metric names of a record's scores

    def scores(self, env: Env, requests: list, full: bool = True) -> list[dict[str, float]]:
        """Per-record scores. ``full=False`` (the per-batch and retention curves) may leave out costly metrics;
        the pre-edit and final scores (metrics.json) are ``full``."""
        ...

    def info(self, env: Env, request) -> dict: ...


@dataclass
class ProbabilityEvaluator:
    """CounterFact / ZsRE / fact-world scoring (docs/metrics.md), set under ``model.method.init_args.evaluator``.

    Always: the probability comparisons and their magnitudes (CounterFact: ``efficacy``, ``generalization``,
    ``specificity``, ``*_magnitude``; ZsRE: ``rewrite_acc``, ``paraphrase_acc``, ``neighborhood_acc``). In the
    pre-edit and final evaluations (not the per-batch and retention curves) also: ``free_generation`` (greedy
    continuations: ``gen_exact``, ``gen_prefix``, ``para.gen_*``), ``fluency`` and ``consistency`` (sampled
    continuations of up to ``generation_prompts`` generation prompts per record, ``generation_length`` tokens
    with the prompt, top-``top_k``, seeded per record by ``seed``). Consistency reads ``reference_dir``: a
    directory with ROME's ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json``, or a world spec
    (``world``, ``world:tiny``) for the fact world's own. ``magnitude``, ``fluency_weights`` and
    ``word_tokenizer`` choose between the reference code's computation (default) and the papers' (docs/metrics.md).
    """

    raw_keys = {"fluency": "bits×100"}  # not a fraction: entropy ×100 as the papers' tables (lit_edit.report)
    magnitude: str = "token_mean"  # | "sequence"
    free_generation: bool = True
    fluency: bool = False
    consistency: bool = False
    reference_dir: str | None = None
    generation_prompts: int = 10  # per record, the first N (CounterFact has 10, the fact world 3)
    generation_length: int = 100  # tokens with the prompt (ROME's max_out_len), at most the model's context
    top_k: int = 5
    seed: int = 0
    fluency_weights: str = "reference"  # mean(2/3·H2, 4/3·H3) as the code | "paper": 2/3·H2 + 4/3·H3
    word_tokenizer: str = "regex"  # | "nltk" (word_tokenize, as the reference; needs nltk installed)
    batch_size: int = 64  # prompts per generate() call

    def __post_init__(self):
        n = lambda f: f"model.method.init_args.evaluator.{f}"  # noqa: E731
        checks.choice(n("magnitude"), self.magnitude, MAGNITUDES)
        for name in ("free_generation", "fluency", "consistency"):
            checks.boolean(n(name), getattr(self, name))
        checks.text(n("reference_dir"), self.reference_dir, optional=True)
        if self.consistency and self.reference_dir is None:
            raise ValueError(f"{n('consistency')} needs {n('reference_dir')}: a directory with ROME's "
                             f"attribute_snippets.json, idf.npy and tfidf_vocab.json, or a world spec (world:tiny)")
        for name in ("generation_prompts", "generation_length", "top_k", "batch_size"):
            checks.integer(n(name), getattr(self, name), ge=1)
        checks.integer(n("seed"), self.seed)
        checks.choice(n("fluency_weights"), self.fluency_weights, FLUENCY_WEIGHTS)
        checks.choice(n("word_tokenizer"), self.word_tokenizer, WORD_TOKENIZERS)

    @property
    def keys(self) -> tuple[str, ...]:
        extra = (FREE_KEYS if self.free_generation else ()) + (("fluency",) if self.fluency else ()) + (
            ("consistency",) if self.consistency else ())
        return KEYS + MAGNITUDE_KEYS + tuple(ZSRE_KEYS.values()) + extra

    def references(self) -> References:
        """The consistency references (read once per process and directory)."""
        from lit_edit.world.references import resolve_reference_dir

        return load_references(str(resolve_reference_dir(self.reference_dir)))

    @property
    def shown_chunk(self) -> int:
        """Records per call when a long scoring shows its progress (lit_edit.evaluation): with sampled generations,
        as many as fill one ``generate()`` batch (64 prompts, 10 per record: 6), so a log gets a line per batch of
        generations, which takes minutes on a CPU for a large-vocabulary model such as Gemma-3."""
        if self.fluency or self.consistency:
            return max(1, self.batch_size // self.generation_prompts)
        return SHOWN_CHUNK

    def check(self, requests: list) -> list:
        """Before any edit: with consistency on, every record with generation prompts has reference texts (else
        an EditRequestError names it)."""
        if self.consistency:
            for r in requests:
                if r.generation_prompts:
                    self.references().texts(r)
        return requests

    def scores(self, env: Env, requests: list, full: bool = True) -> list[dict[str, float]]:
        per = record_scores(env.llm, env.tok, requests, self.magnitude)
        if full and self.free_generation:
            for row, more in zip(per, free_generation_scores(env.llm, env.tok, requests, self.batch_size)):
                row.update(more)
        if full and (self.fluency or self.consistency):
            more = generation_scores(env.llm, env.tok, requests, fluency_on=self.fluency,
                                     references=self.references() if self.consistency else None,
                                     n_prompts=self.generation_prompts, length=self.generation_length,
                                     top_k=self.top_k, seed=self.seed, weights=self.fluency_weights,
                                     tokenizer=self.word_tokenizer, batch_size=self.batch_size)
            for row, extra in zip(per, more):
                row.update(extra)
        return per

    def info(self, env: Env, request) -> dict:
        return {}


def _evaluator(value) -> ProbabilityEvaluator:
    """``model.method.init_args.evaluator`` as given: the dataclass, or its fields as a dict (a checkpoint's)."""
    if isinstance(value, ProbabilityEvaluator):
        return value
    if isinstance(value, dict):
        return ProbabilityEvaluator(**value)
    raise TypeError(f"model.method.init_args.evaluator must be a ProbabilityEvaluator or a dict of its settings, "
                    f"got {type(value).__name__}")


class GenerationEvaluator:
    """Long-form scoring: BLEU / ROUGE-L of greedy answers to the question and its paraphrases, and with a local
    scoring model (``bertscore_model``) their BERTScore (or the reference code's embedding cosine)."""

    def __init__(self, chat: bool = True, template: str | None = None, metric_style: str | None = None,
                 bertscore_model: str | None = None, bertscore_mode: str = "bertscore"):
        self.chat, self.template, self.metric_style = chat, template, metric_style
        self.bertscore_model, self.bertscore_mode = bertscore_model, bertscore_mode
        self.keys = UNSTRUCTURED_KEYS + (("bertscore", "para.bertscore") if bertscore_model else ())

    def scores(self, env: Env, requests: list, full: bool = True) -> list[dict[str, float]]:
        gens = generate_answers(env.llm, env.tok, requests, chat=self.chat, template=self.template)
        per = score_generations(requests, gens, style=self.metric_style)
        if self.bertscore_model:
            add_embedding_scores(per, gens, requests, self.bertscore_model, self.bertscore_mode)
        return per

    def info(self, env: Env, request) -> dict:
        return {"answer_tokens": len(encode(env.tok, request.answer)), "category": request.category}


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


class TargetMethod:
    """Base of every target method. Subclasses implement :meth:`columns` and :meth:`optimise`; the rest has
    defaults. ``env`` is set by :meth:`bind` before the first step."""

    request_type: type = EditRequest  # the requests it edits
    evaluator: Evaluator = ProbabilityEvaluator()
    row_name: str | None = None  # what a target row is, when a request has several (logged and in the ledger)
    env: Env

    def bind(self, env: Env) -> None:
        self.env = env

    def settings(self) -> dict:
        """Every setting that changes what the method writes (stored in checkpoints, compared on resume)."""
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}

    def check_lengths(self, writes: list, on_invalid: str) -> list:
        """The writes whose every edited and scored sequence fits the model's context (the others raise or are
        dropped, per ``on_invalid``)."""
        return writes

    def columns(self, writes: list) -> Columns:
        raise NotImplementedError

    def optimise(self, columns: Columns, own: list[int]) -> TargetResult:
        """The target rows of the writes ``own`` (indices into the batch's writes), in order."""
        raise NotImplementedError

    def refine(self, columns: Columns, writes: list, res: TargetResult, own: list[int] | None) -> tuple[torch.Tensor, dict]:
        """Z from the gathered targets of all writes (every rank holds them); returns (Z, what to log and keep)."""
        return res.v_star, {}

    def after_write(self, columns: Columns, writes: list, Z: torch.Tensor, info: dict) -> dict:
        """Called once the batch is written (MetaKE measures the realised move here); returns what to log
        (``logs``, ``histograms``) and keep for the ledger."""
        return {}

    def ledger_fields(self, info: dict, j: int) -> dict:
        """Extra ledger fields of the j-th write."""
        return {}


# ------------------------------------------------------------------------------------------------
# v* (MEMIT-style) and MetaKE
# ------------------------------------------------------------------------------------------------


@dataclass
class VStar(TargetConfig, TargetMethod):
    """MEMIT-style v* (docs/algorithms.md §2): per request, δ at the fact token of block L maximising the
    probability of ``target_new`` over the context-prefixed prompts, with a KL term, weight decay and a norm clamp;
    batched over requests. Its settings are :class:`~lit_edit.targets.TargetConfig`'s, and how it scores
    :class:`ProbabilityEvaluator`'s (``evaluator``)."""

    evaluator: ProbabilityEvaluator = field(default_factory=ProbabilityEvaluator)

    def __post_init__(self):
        super().__post_init__()
        self.evaluator = _evaluator(self.evaluator)

    def check_lengths(self, writes: list, on_invalid: str) -> list:
        limit = context_length(self.env.llm)
        if limit:
            writes = check_structured_lengths(writes, self.env.tok, limit, context=max(self.env.context, key=len),
                                              fact_token=self.fact_token, on_invalid=on_invalid)
        return self.evaluator.check(writes)

    def columns(self, writes: list) -> FactColumns:
        return FactColumns(self.env.tok, writes, self.env.context, self.fact_token, self.legacy_bos_shift)

    def optimise(self, columns: FactColumns, own: list[int]) -> TargetResult:
        e = self.env
        return compute_targets(e.llm, e.tok, e.layout, e.layers[-1], [columns.requests[j] for j in own], e.context,
                               self)


@dataclass
class MetaKE(MetaKEConfig, TargetMethod):
    """MetaKE (docs/algorithms.md §7): the v* of ``base`` refined by T steps on the meta-loss through the solver's
    gate (the paper's Algorithm 1), with the realisation diagnostics β, β̂ and ρ logged and kept in the ledger."""

    base: VStar = field(default_factory=VStar)
    evaluator: ProbabilityEvaluator = field(default_factory=ProbabilityEvaluator)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.base, dict):  # from a plain dict (Python or a checkpoint's hyper-parameters)
            self.base = VStar(**self.base)
        elif isinstance(self.base, TargetConfig) and not isinstance(self.base, VStar):
            self.base = VStar(**asdict(self.base))
        self.evaluator = _evaluator(self.evaluator)
        if self.base.evaluator != ProbabilityEvaluator():
            raise ValueError("model.method.init_args.base.evaluator is not used: MetaKE scores with "
                             "model.method.init_args.evaluator")

    def settings(self) -> dict:
        out = super().settings()
        out["base"].pop("evaluator", None)  # unused (the check above): one evaluator setting per run
        return out

    def bind(self, env: Env) -> None:
        super().bind(env)
        self.base.bind(env)

    def check_lengths(self, writes: list, on_invalid: str) -> list:
        return self.evaluator.check(self.base.check_lengths(writes, on_invalid))

    def columns(self, writes: list) -> FactColumns:
        return self.base.columns(writes)

    def optimise(self, columns: FactColumns, own: list[int]) -> TargetResult:
        return self.base.optimise(columns, own)

    def refine(self, columns, writes, res, own):
        e = self.env
        with torch.enable_grad():
            ref = refine_targets(e.llm, e.tok, e.layout, e.solver, e.layers, writes, e.context, res.v_star, self.base,
                                 self, own=own)
        shift = (ref.V - res.v_star.to(ref.V.dtype)).norm(dim=-1).detach()  # [n] ‖V − v*‖, logged and in the ledger
        logs = {"metake/loss_start": ref.history[0], "metake/loss_end": ref.history[-1],
                "metake/nll_end": ref.nll.mean(), "metake/beta_mean": ref.beta.mean(),
                "metake/rho_mean": ref.rho.mean(),
                "metake/target_shift": shift.mean(),
                "metake/grad_norm_start": ref.grad_start.mean()}
        if ref.fidelity is not None:
            logs.update({f"metake/{k}": v for k, v in ref.fidelity.items()})
        return ref.V.to(res.v_star.dtype), {"logs": logs, "histograms": {"metake/beta": ref.beta, "metake/rho": ref.rho},
                                            "refinement": ref,
                                            "shift": shift.cpu()}

    def after_write(self, columns, writes, Z, info) -> dict:
        """Empirical realisation β̂_i = ⟨h_L^post − h_L^pre, r_i⟩ / ‖r_i‖² with r = V − h_L^pre, end to end at the
        last edited layer (§7.5), next to the predicted β."""
        ref, e = info["refinement"], self.env
        post = compute_block_states(e.llm, e.tok, e.layout, e.layers[-1], writes, self.base.fact_token,
                                    self.base.legacy_bos_shift).to(ref.H)
        r = Z.to(ref.H) - ref.H
        beta_hat = ((post - ref.H) * r).sum(-1) / (r.pow(2).sum(-1) + 1e-12)
        return {"logs": {"metake/beta_hat_mean": beta_hat.mean()}, "histograms": {"metake/beta_hat": beta_hat},
                "beta_hat": beta_hat.detach().cpu(), "residual": r.norm(dim=-1).detach().cpu()}

    def ledger_fields(self, info: dict, j: int) -> dict:
        """§7.5 per request (benchmarks/realisation_bins.py): ρ, β, β̂; and why a target moved as far as it did:
        ``shift`` ‖V − V_init‖ (how far the refinement moved it), ``reach`` ‖∇_V L_meta(V_init)‖ / (2 w_anchor) (how
        far the anchor lets it move: the meta-loss's stationary point, to first order, Eq. 9) and ``residual``
        ‖V − h_L‖ (what the solver was asked to realise; (1 − β̂) of it stays unrealised)."""
        ref = info["refinement"]
        out = {"rho": float(ref.rho[j]), "beta": float(ref.beta[j])}
        if "shift" in info:
            out["shift"] = float(info["shift"][j])
        if ref.grad_start is not None and self.w_anchor > 0:
            out["reach"] = float(ref.grad_start[j]) / (2 * self.w_anchor)
        for key in ("beta_hat", "residual"):
            if key in info:
                out[key] = float(info[key][j])
        return out


# ------------------------------------------------------------------------------------------------
# Long-form answers: One-for-All, AnyEdit, μKE
# ------------------------------------------------------------------------------------------------


@dataclass
class Windows(WindowConfig, TargetMethod):
    """Unstructured edits (docs/algorithms.md §8): the answer cut into windows, one target row per window —
    One-for-All (one window), AnyEdit (windows in order, earlier ones re-added) or μKE (Matryoshka or
    context-affinity coefficients), chosen by ``method``. Requests: the unstructured readers' (unke, akew,
    editeverything, world_long); scored by BLEU / ROUGE-L of greedy answers."""

    request_type = UnstructuredRequest
    row_name = "windows"
    bertscore_model: str | None = None  # a local scoring model directory: adds bertscore / para.bertscore
    bertscore_mode: str = "bertscore"  # torchmetrics BERTScore F1 | "cosine" (the reference code's embedding cosine)

    def __post_init__(self):
        super().__post_init__()
        checks.choice("model.method.init_args.bertscore_mode", self.bertscore_mode, BERTSCORE_MODES)
        if self.bertscore_model is not None and not Path(self.bertscore_model).expanduser().is_dir():
            raise ValueError(f"model.method.init_args.bertscore_model must be a local model directory (scoring models "
                             f"are never downloaded), got {self.bertscore_model!r}")
        self.evaluator = GenerationEvaluator(self.chat, self.template, self.metric_style, self.bertscore_model,
                                             self.bertscore_mode)

    def check_lengths(self, writes: list, on_invalid: str) -> list:
        return check_lengths(writes, self.env.tok, self.env.llm, template=self.template, chat=self.chat,
                             on_invalid=on_invalid)

    def columns(self, writes: list) -> WindowColumns:
        seqs = [windowed(self.env.tok, r, self) for r in writes]
        return WindowColumns(seqs, [r.fact_id for r in writes], self.preservation, pad_id(self.env.tok),
                             full=self.preservation_positions == "reference", n_ctx=context_length(self.env.llm))

    def optimise(self, columns: WindowColumns, own: list[int]) -> TargetResult:
        e = self.env
        got = optimise_windows(e.llm, e.layout, e.layers[-1], [columns.seqs[j] for j in own], self,
                               pad=pad_id(e.tok))
        cat = lambda k: torch.cat([getattr(t, k) for t in got])  # noqa: E731
        return TargetResult(cat("z"), cat("h_init"), cat("delta"), cat("loss"), cat("nll"), cat("steps"), [])


METHODS = {"v_star": VStar, "metake": MetaKE, "windows": Windows}
