"""Drift and capability monitoring of an editing run (docs/algorithms.md §9.1): the :class:`Monitor` callback.

What is measured, on the model as edited so far, against the *unedited* model:

* ``drift/perplexity`` — exp of the mean next-token NLL over every predicted token of the drift text;
* ``drift/kl`` — the mean over those positions of KL(p_unedited ‖ p_edited) = Σ_v p₀(v) (log p₀(v) − log p(v)),
  the expectation under the unedited model (what it predicted and the edit made less likely weighs most);
* ``drift/agreement`` — the share of those positions whose top-1 next token is the unedited model's;
* ``drift/update_norm/layer_<l>`` = ‖W_l − W_l,0‖_F and ``drift/update_rel/layer_<l>`` = that / ‖W_l,0‖_F, the
  accumulated update of every edited layer;
* ``probe/<name>/<key>`` — the probes' scalars (:mod:`lit_edit.probes`);
* ``time/monitor_seconds`` — what the measurement cost.

The drift text: for the fact world (``text.dataset`` unset) its never-edited, never-trained sentences — every
held-out template not trained for an untouched subject (:func:`lit_edit.probes.untouched_subjects`), filled with
the subject's true object, two sentences a text; otherwise ``text.dataset``, a local file or hub id read through
``datasets`` (:func:`lit_edit.data.files.iter_texts`).

The reference: no second model is kept. Only the edited matrices change, so their unedited values W₀ are kept on
the CPU (taken before the first edit, or on a resume re-read from ``model.model``) and swapped back in for one
forward pass per chunk of the drift text. Memory: one copy of the edited matrices in host RAM (what a checkpoint
holds: 2 MB for the default world, ~0.6 GB for Llama-3-8B's five bf16 down_proj); W₀ is needed anyway for the
update norms. Storing the unedited log-probabilities instead would cost n_samples × max_tokens × vocabulary floats
(64 × 128 × 128,256 × 4 B = 4.2 GB for Llama-3) on top.

When: before the first edit (step 0, ``pre``), every ``every_n_steps`` applied batches (measured when the next
batch starts, so at step k exactly k batches are written whatever the callback order) and at the end of training
(``final``). Scalars go straight to the logger at the applied-batch step, with the figures so far
(``drift/curves``, ``drift/update_norms``: :mod:`lit_edit.figures`). Under DDP every rank measures its shard
(every world-th text and probe item) and the torchmetrics means are reduced, as the edit metrics are.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass

import lightning as L
import torch
from torchmetrics import MeanMetric

from lit_edit import board, checks, figures
from lit_edit import distributed as dist
from lit_edit.data.files import iter_texts
from lit_edit.editing import set_weight
from lit_edit.layouts import get_weight
from lit_edit.probes import WORLD_PROBES, ProbeContext, log_softmax, make_probes, untouched_subjects, world_of
from lit_edit.tokens import bos_ids, context_length, encode, pad_batch, pad_id

NAME = "lit_edit.monitor.Monitor"


@dataclass
class DriftText:
    """Where the drift text comes from. ``dataset`` unset: the fact world's held-out sentences (world models
    only); else a local .txt/.json/.jsonl/.csv/.parquet file or directory, or a hub id (``config_name``, ``split``,
    ``text_field``). The first ``n_samples`` non-empty texts, each cut to ``max_tokens`` tokens (and the model's
    context), scored ``batch_size`` texts a forward pass."""

    dataset: str | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    n_samples: int = 64
    max_tokens: int = 128
    batch_size: int = 8
    seed: int = 0  # the world's sentences are drawn with it

    def __post_init__(self):
        n = lambda f: f"{NAME} text.{f}"  # noqa: E731
        checks.corpus(f"{NAME} text", self.dataset, self.config_name, self.split, self.text_field, self.n_samples)
        checks.integer(n("max_tokens"), self.max_tokens, ge=2)
        checks.integer(n("batch_size"), self.batch_size, ge=1)


def world_texts(world, edited: frozenset, n: int, seed: int) -> list[str]:
    """``n`` texts of two never-edited, never-trained sentences: held-out templates not trained for an untouched
    subject, filled with the subject and its true object, in a seeded order."""
    sentences = [f"{t.format(s)} {world.facts[(s, r.relation_id)]}." for s in untouched_subjects(world, edited)
                 for r in world.relations for t in world.untrained_heldout[(s, r.relation_id)]]
    random.Random(f"lit_edit.monitor:{seed}").shuffle(sentences)
    return [" ".join(sentences[i:i + 2]) for i in range(0, min(len(sentences), 2 * n), 2)]


# ------------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_weights(model, layout, weights: dict[int, torch.Tensor]):
    """The edited matrices temporarily set to ``weights`` ({layer: [d_out, d_in]}, any device); the current ones
    are kept on the CPU meanwhile and written back, bit for bit, on exit (also after an exception)."""
    saved = {l: get_weight(model, layout, l).to("cpu", copy=True) for l in weights}
    try:
        for l, w in weights.items():
            set_weight(model, layout, l, w)
        yield
    finally:
        for l, w in saved.items():
            set_weight(model, layout, l, w)


@torch.no_grad()
def update_norms(model, layout, W0: dict[int, torch.Tensor]) -> dict[str, float]:
    """``update_norm/layer_l`` = ‖W_l − W_l,0‖_F and ``update_rel/layer_l`` = that / ‖W_l,0‖_F (float32, a layer at
    a time on the model's device)."""
    out = {}
    for l, w0 in W0.items():
        w = get_weight(model, layout, l)
        ref = w0.to(w.device, torch.float32)
        diff = float((w.float() - ref).norm())
        out[f"update_norm/layer_{l}"] = diff
        out[f"update_rel/layer_{l}"] = diff / max(float(ref.norm()), 1e-30)
    return out


@torch.no_grad()
def drift(model, tok, layout, seqs: list[list[int]], W0: dict[int, torch.Tensor] | None,
          batch_size: int = 8) -> dict[str, float]:
    """Perplexity of ``seqs`` (token ids) under the model as it is, and the mean KL(p_unedited ‖ p_edited) and
    top-1 agreement against the model with ``W0`` swapped in (``None``: the model is unedited, KL 0, agreement
    1), over every position that predicts a next token. Under DDP each rank takes every world-th sequence and the
    torchmetrics means are reduced (call it on every rank)."""
    dev = next(model.parameters()).device
    nll, kl, agree = (MeanMetric().to(dev).set_dtype(torch.float64) for _ in range(3))
    mine = [s for i, s in enumerate(seqs) if i % dist.world_size() == dist.rank()]
    for c in range(0, len(mine), batch_size):
        ids, mask = pad_batch(mine[c:c + batch_size], pad_id(tok))
        ids, mask = ids.to(dev), mask.to(dev)
        run = lambda: log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1])  # noqa: E731
        logp = run()
        if W0 is None:
            ref = logp
        else:
            with swapped_weights(model, layout, W0):
                ref = run()
        real = mask[:, 1:].bool()
        nll.update(-logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[real])
        kl.update((ref.exp() * (ref - logp)).sum(-1)[real])
        agree.update((ref.argmax(-1) == logp.argmax(-1))[real].double())
    return {"perplexity": float(nll.compute().exp()), "kl": float(kl.compute()), "agreement": float(agree.compute())}


# ------------------------------------------------------------------------------------------------
# The callback
# ------------------------------------------------------------------------------------------------


class Monitor(L.Callback):
    """Drift and probe measurements of an editing fit (see the module docstring), added to ``trainer.callbacks``.

    Args:
        every_n_steps: measure every N applied batches as well (0 = only before the first edit and at the end).
        text: the drift text (:class:`DriftText`).
        probes: probe names or ``{name: ..., <setting>: ...}`` dicts (:data:`lit_edit.probes.PROBES`); unset: the
            world probes for the fact world, none for other models.
        drift: measure drift (``drift/*``); false leaves only the probes.

    After a fit, ``pre`` and ``final`` hold the measurements before the first edit and at the end (flat,
    ``drift/perplexity``, ``probe/sst2/acc``); :meth:`metrics` gives them as ``metrics.json`` keys, ``history``
    every (step, values) measured in this process. ``pre`` is checkpointed, so a resumed run keeps it.
    """

    def __init__(self, every_n_steps: int = 0, text: DriftText | None = None, probes: list[str | dict] | None = None,
                 drift: bool = True) -> None:
        self.every_n_steps = checks.integer(f"{NAME} every_n_steps", every_n_steps, ge=0)
        self.text = text if isinstance(text, DriftText) else DriftText(**(text or {}))
        self.probe_specs = probes
        self.measure_drift = checks.boolean(f"{NAME} drift", drift)
        # built (and checked) here, so a bad entry fails before the model is loaded
        self.probes = make_probes(probes, f"{NAME} probes") if probes is not None else {}
        self.pre: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.W0: dict[int, torch.Tensor] | None = None
        self._seqs: list[list[int]] | None = None
        self._ctx: ProbeContext | None = None
        self._last_step = -1
        self._resumed, self._prepare_seconds = False, 0.0  # set by on_fit_start for on_train_start

    # -- set-up -------------------------------------------------------------------------------------
    def capture_unedited(self, pl_module) -> None:
        """Keep W₀, the unedited edited matrices, on the CPU. ``on_fit_start`` calls it on a fresh run; a resume needs
        it called before the checkpoint is restored (``EditModule.configure_model`` may), else W₀ is re-read from
        ``model.model`` (one load of the model on the CPU)."""
        m = pl_module
        self.W0 = {l: get_weight(m.llm, m.layout, l).to("cpu", copy=True) for l in m.layers}

    def _reload_unedited(self, pl_module) -> None:
        from lit_edit.layouts import get_layout
        from lit_edit.models import load_model

        m = pl_module
        llm, _, _ = load_model(m.model_name, m.dtype_name, m.trust_remote_code)
        layout = get_layout(llm, m.layout_override)
        self.W0 = {l: get_weight(llm, layout, l).to("cpu", copy=True) for l in m.layers}
        del llm

    def _prepare(self, pl_module) -> None:
        m = pl_module
        edited = frozenset(getattr(r, "subject", None) for r in m.requests) - {None}
        cap = min(self.text.max_tokens, context_length(m.llm) or self.text.max_tokens)
        self._ctx = ProbeContext(m.model_name, edited, cap)
        if self.probe_specs is None:
            from lit_edit.data import is_world_spec

            self.probes = make_probes(list(WORLD_PROBES) if is_world_spec(m.model_name) else [])
        if not self.measure_drift:
            return
        t = self.text
        if t.dataset is None:
            texts = world_texts(world_of(m.model_name, "text.dataset (unset)"), edited, t.n_samples, t.seed)
        else:
            texts = list(iter_texts(t.dataset, t.text_field, t.n_samples, config_name=t.config_name, split=t.split,
                                    settings=f"{NAME} text"))
        seqs = [(bos_ids(m.tok) + encode(m.tok, x))[:cap] for x in texts]
        self._seqs = [s for s in seqs if len(s) >= 2]
        if not self._seqs:
            raise ValueError(f"{NAME} text: {t.dataset or 'the world'} gave no text of 2 or more tokens")

    def on_fit_start(self, trainer, pl_module) -> None:
        """W₀, the drift text and the probes' data: read (and checked) before the run directory is claimed."""
        started = time.perf_counter()
        self._resumed = bool(trainer.ckpt_path) or bool(getattr(pl_module, "edited_ids", None))
        if not self._resumed:
            self.capture_unedited(pl_module)
        elif self.W0 is None:  # nobody captured them before the checkpoint was restored
            self._reload_unedited(pl_module)
        self._prepare(pl_module)
        self._prepare_seconds = time.perf_counter() - started

    def on_train_start(self, trainer, pl_module) -> None:
        """The pre-edit measurement, logged: after RunRecord's on_fit_start has claimed the run directory, so that a
        run refused there has logged nothing into it."""
        if not self.pre:  # a resume keeps the checkpoint's; a monitor added on resume measures W₀ swapped in
            started = time.perf_counter()
            swap = (swapped_weights(pl_module.llm, pl_module.layout, self.W0) if self._resumed
                    else contextlib.nullcontext())
            with swap:
                self.pre = self.measure(pl_module, unedited=True)
            # with W₀, the text and the probes' data
            self.pre["time/monitor_seconds"] = time.perf_counter() - started + self._prepare_seconds
            self._log(trainer, pl_module, self.pre, 0)

    # -- measuring ----------------------------------------------------------------------------------
    def measure(self, pl_module, unedited: bool = False) -> dict[str, float]:
        """Every value on the model as it is now (a collective under DDP: every rank calls it). ``unedited``: the
        model holds W₀, so the reference pass is skipped (KL 0, agreement 1)."""
        m, started = pl_module, time.perf_counter()
        out: dict[str, float] = {}
        if self.measure_drift:
            norms = update_norms(m.llm, m.layout, self.W0)
            same = unedited or not any(v for k, v in norms.items() if k.startswith("update_norm"))
            values = drift(m.llm, m.tok, m.layout, self._seqs, None if same else self.W0, self.text.batch_size)
            out.update({f"drift/{k}": v for k, v in {**values, **norms}.items()})
        for name, probe in self.probes.items():
            out.update({f"probe/{name}/{k}": float(v) for k, v in probe.evaluate(m.llm, m.tok, self._ctx).items()})
        out["time/monitor_seconds"] = time.perf_counter() - started
        return out

    def _log(self, trainer, pl_module, values: dict[str, float], step: int) -> None:
        self.history.append((step, values))
        self._last_step = step
        # straight to the logger at the applied-batch step (as RunRecord logs the retention curve)
        if pl_module.logger is not None and trainer.is_global_zero:
            pl_module.logger.log_metrics(values, step=step)
        self._log_figures(trainer, pl_module, step)

    def _log_figures(self, trainer, pl_module, step: int) -> None:
        """The drift curves (``drift/curves``) and the per-layer relative update norms (``drift/update_norms``) so
        far, as TensorBoard images (rank 0; :mod:`lit_edit.figures`)."""
        tb = board.writer(trainer, pl_module)
        if tb is None or not self.measure_drift:
            return
        points, title = self.points(), board.title(pl_module)
        board.draw("the drift curves", lambda: figures.drift_curves(points, title), tb, "drift/curves", step)
        board.draw("the update norms", lambda: figures.update_norms(points, title), tb, "drift/update_norms", step)

    def points(self) -> list[tuple[int, dict[str, float]]]:
        """Every measurement known, (step, values) by step: ``pre`` at step 0 (kept by a resume's checkpoint) and
        this process's ``history``."""
        known = {0: self.pre} if self.pre else {}
        known.update({step: values for step, values in self.history})
        return sorted(known.items())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step  # batches applied so far
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self._log(trainer, pl_module, self.measure(pl_module), step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = self.measure(pl_module)
        self._log(trainer, pl_module, self.final, trainer.global_step)

    # -- results and checkpoints --------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``pre`` and ``final`` as ``metrics.json`` keys: ``pre.drift.perplexity``, ``drift.perplexity``, ..."""
        flat = lambda d, p: {p + k.replace("/", "."): v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
        return {**flat(self.pre, "pre."), **flat(self.final, "")}

    def state_dict(self) -> dict:
        return {"pre": dict(self.pre)}

    def load_state_dict(self, state: dict) -> None:
        self.pre = dict(state.get("pre", {}))
