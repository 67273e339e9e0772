"""Capability probes of the model being edited (docs/algorithms.md §9.1), run by :class:`lit_edit.monitor.Monitor`.

A probe is named in the monitor's ``probes`` list, by its name in :data:`PROBES` (``"sst2"``) or as a dict of its
name, settings and optionally the ``key`` it is logged under (``{name: mmlu, n_samples: 50}``); :func:`register_probe`
adds one. Every built-in probe is a multiple-choice task scored by log-likelihood (:class:`ChoiceProbe`): each
choice is appended to the prompt, the choice with the highest sum of token log-probabilities (or mean,
``length_norm``) is the answer, and the probe reports ``acc`` (share of items answered right) and ``nll`` (mean
per-token NLL of the right choice).

* Tasks read through ``datasets`` (:class:`DatasetTask`), from a local file (json/jsonl/csv/parquet) or a hub id:
  the GLUE-style set AlphaEdit reports (``sst2``, ``mrpc``, ``cola``, ``rte``, ``mmlu``, ``nli``), the first
  ``n_samples`` (default 100) rows of the split, each with its prompt template and choices.
* The fact world's own knowledge (:class:`WorldFacts`, no download): ``world_background``, the canonical prompt of
  facts of *untouched* subjects (the world's background subjects, or when it has none the subjects the run's
  stream never edits) against all other objects of the relation, and ``world_paraphrase``, the same facts asked
  with the held-out templates never trained for that subject (nor used by any edited record).
"""
from __future__ import annotations

import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torchmetrics import MeanMetric

from lit_edit import checks
from lit_edit import distributed as dist
from lit_edit.data.files import row_field, stream_rows
from lit_edit.tokens import bos_ids, context_length, encode, pad_batch, pad_id, target_ids


@dataclass
class ChoiceItem:
    prompt: str
    choices: list[str]
    answer: int  # index into choices


@dataclass
class ProbeContext:
    """What a probe may read about the run: the edited model's name (``world[:preset]`` for the fact world), the
    subjects the run's stream edits and the longest sequence the monitor scores."""

    model_name: str
    edited_subjects: frozenset = frozenset()
    max_length: int = 1024


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in float32, or in the logits' dtype when that is wider (float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


@torch.no_grad()
def choice_logprobs(model, tok, items: list[ChoiceItem], max_length: int, batch_size: int = 32) -> list[list[tuple]]:
    """For each item and choice, ``(sum of log p(choice tokens | BOS + prompt), number of choice tokens)``. A prompt
    too long for ``max_length`` (capped by the model's context) loses tokens from its start, never the BOS. The
    one-token choices of an item are all read from one pass over its prompt, each longer choice gets its own."""
    dev = next(model.parameters()).device
    cap = min(max_length, context_length(model) or max_length)
    bos = bos_ids(tok)
    seqs, reads = [], []  # reads[k]: (item, choice, position of the choice's first token, its ids) of seqs[k]
    for i, it in enumerate(items):
        prompt, ids = encode(tok, it.prompt), [target_ids(tok, c) for c in it.choices]
        single = [c for c, x in enumerate(ids) if len(x) == 1]
        for group in ([single] if single else []) + [[c] for c, x in enumerate(ids) if len(x) > 1]:
            n = len(ids[group[0]])
            keep = cap - len(bos) - n
            pre = bos + (prompt[-keep:] if keep > 0 else [])
            if keep < 1 or not pre:
                raise ValueError(f"choice {it.choices[group[0]]!r} after prompt {it.prompt!r} does not fit: "
                                 f"{n} choice tokens in a context of {cap}, or an empty prompt and no BOS")
            seqs.append(pre + (ids[group[0]] if n > 1 else []))  # one token: read where the prompt ends
            reads.append([(i, c, len(pre), ids[c]) for c in group])
    out = [[None] * len(it.choices) for it in items]
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s:s + batch_size], pad_id(tok))
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        rows, pos, tgt, dest = [], [], [], []  # one entry per scored token
        for b, group in enumerate(reads[s:s + batch_size]):
            for i, c, start, toks in group:
                rows += [b] * len(toks)
                pos += range(start - 1, start - 1 + len(toks))
                tgt += toks
                dest += [(i, c)] * len(toks)
        rows, pos = torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)
        lp = log_softmax(logits[rows, pos]).gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0].tolist()
        for (i, c), v in zip(dest, lp):
            got = out[i][c] or (0.0, 0)
            out[i][c] = (got[0] + v, got[1] + 1)
    return out


def score_items(model, tok, items: list[ChoiceItem], max_length: int, length_norm: bool = False,
                batch_size: int = 32) -> dict[str, float]:
    """``acc`` and ``nll`` (mean per-token NLL of the right choice) over ``items``. Under DDP each rank scores every
    world-th item and the torchmetrics means are reduced, so every rank returns the values of all items (call it
    on every rank)."""
    dev = next(model.parameters()).device  # the states live there: NCCL reduces device tensors only
    acc, nll = (MeanMetric().to(dev).set_dtype(torch.float64) for _ in range(2))
    mine = [it for i, it in enumerate(items) if i % dist.world_size() == dist.rank()]
    for it, scores in zip(mine, choice_logprobs(model, tok, mine, max_length, batch_size)):
        value = [lp / n if length_norm else lp for lp, n in scores]
        best = max(range(len(value)), key=value.__getitem__)
        acc.update(float(best == it.answer))
        lp, n = scores[it.answer]
        nll.update(-lp / n)
    return {"acc": float(acc.compute()), "nll": float(nll.compute())}


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------


@dataclass
class ChoiceProbe:
    """A multiple-choice probe: subclasses build the items (:meth:`items`), read once and kept."""

    name: str = "choice"
    n_samples: int = 100
    length_norm: bool = False  # rank choices by mean (not summed) token log-probability
    batch_size: int = 32  # sequences per forward pass
    _items: list | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        n = lambda f: f"lit_edit.monitor.Monitor probe {self.name!r}: {f}"  # noqa: E731
        checks.integer(n("n_samples"), self.n_samples, ge=1)
        checks.integer(n("batch_size"), self.batch_size, ge=1)
        checks.boolean(n("length_norm"), self.length_norm)

    def items(self, ctx: ProbeContext) -> list[ChoiceItem]:
        raise NotImplementedError

    def evaluate(self, model, tok, ctx: ProbeContext) -> dict[str, float]:
        """The probe's scalars on the model as it is now (every rank calls it; all get the same values)."""
        if self._items is None:
            self._items = self.items(ctx)
        return score_items(model, tok, self._items, ctx.max_length, self.length_norm, self.batch_size)


@dataclass
class DatasetTask(ChoiceProbe):
    """A multiple-choice task read through ``datasets``: the first ``n_samples`` rows of ``split`` of ``path`` (a
    local json/jsonl/csv/parquet file or directory, or a hub id with ``config_name``). The prompt is
    ``template.format(**row)`` (``{choices[0]}`` indexes a list field); the choices are ``choices`` or, when it is
    empty, the list in the row's ``choices_field``; the right one is the row's ``label_field``: an index, or a
    string equal to one of the choices."""

    path: str = ""
    config_name: str | None = None
    split: str = "validation"
    template: str = ""
    choices: list[str] = field(default_factory=list)
    choices_field: str | None = None
    label_field: str = "label"

    def __post_init__(self):
        super().__post_init__()
        n = lambda f: f"lit_edit.monitor.Monitor probe {self.name!r}: {f}"  # noqa: E731
        checks.text(n("path"), self.path)
        checks.text(n("template"), self.template)
        if not self.choices and not self.choices_field:
            raise ValueError(f"{n('choices')} must list the choices, or choices_field name the row field holding them")

    def items(self, ctx: ProbeContext) -> list[ChoiceItem]:
        setting = f"lit_edit.monitor.Monitor probe {self.name!r}"
        out = []
        for row in stream_rows(self.path, self.config_name, self.split, setting=f"{setting} path"):
            choices = list(self.choices) or list(row_field(row, self.choices_field, self.path,
                                                           f"{setting} choices_field"))
            label = row_field(row, self.label_field, self.path, f"{setting} label_field")
            answer = choices.index(label) if isinstance(label, str) and label in choices else label
            if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(choices):
                raise ValueError(f"{setting}: row {len(out)} of {self.path} has {self.label_field}={label!r}, neither "
                                 f"an index into nor one of its {len(choices)} choices {choices}")
            try:
                prompt = self.template.format(**row)
            except (KeyError, IndexError) as err:
                raise ValueError(f"{setting} template: row {len(out)} of {self.path} has no {err} for "
                                 f"{self.template!r} (its fields: {', '.join(map(str, row))})") from None
            out.append(ChoiceItem(prompt, choices, int(answer)))
            if len(out) >= self.n_samples:
                break
        if not out:
            raise ValueError(f"{setting}: {self.path} (split {self.split!r}) holds no rows")
        return out


@dataclass
class WorldFacts(ChoiceProbe):
    """Facts of the fact world's untouched subjects (see the module docstring), asked with the canonical template
    (``templates: canonical``) or the held-out templates never trained for the subject (``heldout``), the true
    object against every other object of the relation; ``n_samples`` of them, drawn with ``seed``."""

    templates: str = "canonical"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        checks.choice(f"lit_edit.monitor.Monitor probe {self.name!r}: templates", self.templates,
                      ("canonical", "heldout"))

    def items(self, ctx: ProbeContext) -> list[ChoiceItem]:
        world = world_of(ctx.model_name, f"probe {self.name!r}")
        out = []
        for s in untouched_subjects(world, ctx.edited_subjects):
            for r in world.relations:
                true = world.facts[(s, r.relation_id)]
                ts = [r.canonical] if self.templates == "canonical" else world.untrained_heldout[(s, r.relation_id)]
                out += [ChoiceItem(t.format(s), list(r.objects), r.objects.index(true)) for t in ts]
        random.Random(f"lit_edit.probes:{self.seed}").shuffle(out)
        return out[:self.n_samples]


def world_of(model_name: str, what: str):
    """The :class:`~lit_edit.world.World` of a ``world[:preset]`` model name; a clear error for any other model."""
    from lit_edit.data import is_world_spec

    if not is_world_spec(model_name):
        raise ValueError(f"lit_edit.monitor.Monitor {what} reads the built-in fact world, but model.model is "
                         f"{model_name!r}: name a dataset for it instead")
    from lit_edit.world import build_world, resolve_world_name

    return build_world(resolve_world_name(model_name))


def untouched_subjects(world, edited: frozenset) -> list[str]:
    """The world's background subjects (never edited), or, for a world without one, the subjects the run's stream
    does not edit; either way none of ``edited``."""
    pool = world.background_subjects if world.spec.n_background else world.subjects
    out = [s for s in pool if s not in edited]
    if not out:
        raise ValueError(f"every subject of the fact world ({len(pool)}) is edited by this run: the monitor's world "
                         f"probes and drift text need untouched ones (lower data.limit)")
    return out


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------

GLUE = "nyu-mll/glue"
PROBES: dict[str, Callable[..., Any]] = {}


def register_probe(name: str, factory: Callable[..., Any]) -> None:
    """Add (or replace) a probe: ``factory(name=name, **settings)`` builds it; it needs an ``evaluate(model, tok,
    ctx)`` returning a dict of floats, equal on every rank under DDP (shard the work and reduce, as
    :func:`score_items` does)."""
    PROBES[name] = factory


def _task(**defaults):
    return lambda **kw: DatasetTask(**{**defaults, **kw})


register_probe("choice", DatasetTask)  # a task of your own: path, template, choices, label_field
register_probe("sst2", _task(path=GLUE, config_name="sst2", template="Review: {sentence}\nSentiment:",
                             choices=["negative", "positive"]))
register_probe("mrpc", _task(path=GLUE, config_name="mrpc", choices=["No", "Yes"],
                             template="Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                                      "Do both sentences mean the same thing? Answer:"))
register_probe("cola", _task(path=GLUE, config_name="cola", choices=["No", "Yes"],
                             template="Sentence: {sentence}\nIs this sentence grammatically correct? Answer:"))
register_probe("rte", _task(path=GLUE, config_name="rte", choices=["True", "False"],  # label 0 = entailment
                            template="{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"))
register_probe("nli", _task(path=GLUE, config_name="mnli", split="validation_matched",  # MultiNLI, 3 classes
                            choices=["True", "Neither", "False"],
                            template="{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"))
register_probe("mmlu", _task(path="cais/mmlu", config_name="all", split="test", label_field="answer",
                             choices=["A", "B", "C", "D"],
                             template="{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\n"
                                      "D. {choices[3]}\nAnswer:"))
register_probe("world_background", lambda **kw: WorldFacts(**{"templates": "canonical", **kw}))
register_probe("world_paraphrase", lambda **kw: WorldFacts(**{"templates": "heldout", **kw}))
WORLD_PROBES = ("world_background", "world_paraphrase")


def make_probes(specs: list, where: str = "lit_edit.monitor.Monitor probes") -> dict[str, Any]:
    """The probes of a config list, by metric name: each entry a registered name, or a dict of ``name``, an optional
    ``key`` (the name in the metrics, default ``name``; two tasks of one kind need two keys) and its settings."""
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f"{where} must be a list of probe names or dicts, got {specs!r}")
    out: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        settings = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else None
        if settings is None or not isinstance(settings.get("name"), str):
            raise ValueError(f"{where}[{i}] must be a probe name or a dict with a 'name', got {spec!r}")
        name = settings["name"]
        key = settings.pop("key", name)
        if name not in PROBES:
            raise ValueError(f"{where}[{i}]: unknown probe {name!r}; registered: {', '.join(sorted(PROBES))} "
                             f"(lit_edit.probes.register_probe adds one)")
        if not isinstance(key, str) or not key or "/" in key or "." in key or key in out:
            raise ValueError(f"{where}[{i}]: key {key!r} must be a new name without '/' or '.' (set 'key' to tell "
                             f"two probes of one kind apart)")
        try:
            out[key] = PROBES[name](**settings)
        except TypeError as err:
            raise ValueError(f"{where}[{i}] ({name}): {err}") from None
    return out
