"""Edit-quality metrics (docs/metrics.md, docs/algorithms.md §9), as torchmetrics so they sum across ranks.

CounterFact (and the fact world): for each prompt, the mean per-token NLL of ``" " + target_new``
and of ``" " + target_true`` (a geometric-mean probability, so multi-token targets of different
lengths compare fairly, as the reference does). Efficacy / generalization: fraction of rewrite /
paraphrase prompts where the new target is more likely; specificity: fraction of neighbourhood
prompts where the true target stays more likely (ROME/MEMIT's ES, PS, NS). Their magnitudes (EM, PM,
NM): the mean of p(new) − p(true) (neighbourhood: p(true) − p(new)). Per record the mean over its
prompts, then the mean over records.

ZsRE: teacher-forced token top-1 accuracy of the answer tokens after the question (``rewrite_acc``),
the rephrase (``paraphrase_acc``) and of the NQ answer after ``loc + "?"`` (``neighborhood_acc``, against
the dataset answer as in the reference code — not "unchanged prediction"). These are the reference code's
names; papers print them as Efficacy / Generalization (Paraphrase) / Specificity (:data:`ZSRE_KEYS`,
docs/metrics.md). Built at the token level, so there is no decode/re-encode drift (§9 ⚠ for Llama).

Generation-based CounterFact metrics (free-generation efficacy, fluency, consistency) are in
:mod:`lit_edit.cf_metrics`; unstructured edits (:class:`~lit_edit.requests.UnstructuredRequest`) are
scored by generation in :mod:`lit_edit.text_metrics`.
"""
from __future__ import annotations

import math
import warnings

import torch
from torchmetrics import MeanMetric, MetricCollection
from transformers import PreTrainedModel

from lit_edit.layouts import logit_head
from lit_edit.requests import EditRequest
from lit_edit.truncated import cache_holding, continue_from
from lit_edit.tokens import bos_ids, encode, pad_batch, pad_id, target_ids

KEYS = ("efficacy", "generalization", "specificity")  # CounterFact / world (ES, PS, NS)
MAGNITUDE_KEYS = tuple(f"{k}_magnitude" for k in KEYS)  # EM, PM, NM
# ZsRE's token accuracies are another computation than CounterFact's comparisons: they are reported under the
# reference code's names (summarize.py), not under CounterFact's. The one mapping, also in docs/metrics.md.
ZSRE_KEYS = {"efficacy": "rewrite_acc", "generalization": "paraphrase_acc", "specificity": "neighborhood_acc"}
MAGNITUDES = ("token_mean", "sequence")  # p = exp(-mean token NLL) (reference code) | the sequence probability


def _slot(key: str) -> str:
    return key.replace(".", "_")  # module names cannot hold "." ("para.bleu")


def make_metrics(prefix: str = "", keys: tuple[str, ...] = KEYS) -> MetricCollection:
    """Means of per-record scores; float64 sum and count states, summed across DDP ranks by ``compute()``."""
    return MetricCollection({_slot(k): MeanMetric().set_dtype(torch.float64) for k in keys}, prefix=prefix)


def compute_metrics(metrics: MetricCollection, keys: tuple[str, ...]) -> dict[str, float]:
    """``compute()`` (a collective under DDP: call it on every rank) back under the score names. A key no record
    had on any rank (ZsRE's names in a CounterFact run, fluency of records without generation prompts) is left
    out: its mean is 0/0."""
    with warnings.catch_warnings():  # "compute before update" on a rank (or a key) without any record
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        values = metrics.compute()
    out = {k: float(values[(metrics.prefix or "") + _slot(k)]) for k in keys}
    return {k: v for k, v in out.items() if not math.isnan(v)}


def scored_prefix(tok, prompt: str) -> list[int]:
    """The ids a scored prompt is fed as: BOS (if any) + the prompt. :func:`score_targets` appends the target's
    :func:`~lit_edit.tokens.target_ids` and runs the whole sequence (``lit_edit.data.check_structured_length``
    checks that length against the model's context)."""
    return bos_ids(tok) + encode(tok, prompt)


@torch.no_grad()
def score_targets(model, tok, prompts: list[str], targets: list[str], chunk: int = 64):
    """For each (prompt, target): mean per-token NLL of the target and the share of its tokens that are the argmax.

    Each distinct prompt of a chunk runs once and keeps its keys and values (the model's own cache, as in
    generation); every target of it continues from them, and the LM head runs only where a target token is predicted
    (the prompt's last position and the target's own positions but its last). CounterFact scores each prompt against
    two targets of one or two tokens, so this computes about half the tokens of one forward per (prompt, target) and a
    small part of the logits; the values are the same (:func:`score_targets_whole`, tests/test_cf_metrics.py). A model
    whose sliding window is shorter than a sequence (its cache keeps only the window), or that is not a transformers
    model (no cache to continue from), is scored whole."""
    seqs = [(tuple(scored_prefix(tok, p)), target_ids(tok, t)) for p, t in zip(prompts, targets)]
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if not isinstance(model, PreTrainedModel) or (
            isinstance(window, int) and max((len(p) + len(t) for p, t in seqs), default=0) > window):
        return score_targets_whole(model, tok, prompts, targets, chunk)
    dev = next(model.parameters()).device
    head, pad = logit_head(model), pad_id(tok)
    of_prompt: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(seqs):
        of_prompt.setdefault(p, []).append(i)
    distinct = list(of_prompt)
    nll, top1 = [0.0] * len(seqs), [0.0] * len(seqs)
    for c in range(0, len(distinct), chunk):
        here = distinct[c : c + chunk]
        ids, mask = pad_batch([list(p) for p in here], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
        ends = mask.sum(1) - 1
        first = torch.log_softmax(head(out.last_hidden_state[torch.arange(len(here), device=dev), ends]).float(), -1)
        pairs = [(k, i) for k, p in enumerate(here) for i in of_prompt[p]]
        logp = {i: [first[k]] for k, i in pairs}  # per pair: log-probabilities at each target position
        longer = [(k, i) for k, i in pairs if len(seqs[i][1]) > 1]
        if longer:  # the targets' tokens but the last, after their prompt's kept keys and values
            rows = torch.tensor([k for k, _ in longer], device=dev)
            cont, cmask = pad_batch([seqs[i][1][:-1] for _, i in longer], pad)
            cont, cmask = cont.to(dev), cmask.to(dev)
            cache = cache_holding(model, [(layer.keys[rows], layer.values[rows]) for layer in out.cache.layers])
            position_ids = ends[rows][:, None] + 1 + torch.arange(cont.shape[1], device=dev)
            h = continue_from(model, cache, cont, torch.cat([mask[rows], cmask], 1), position_ids)
            r, j = cmask.nonzero(as_tuple=True)
            read = torch.log_softmax(head(h[r, j]).float(), -1)
            for (_, i), x in zip([longer[int(b)] for b in r], read):
                logp[i].append(x)
        for i, rows_lp in logp.items():
            lp = torch.stack(rows_lp)
            t = torch.tensor(seqs[i][1], device=dev)
            nll[i] = -lp.gather(1, t[:, None]).mean().item()
            top1[i] = (lp.argmax(-1) == t).float().mean().item()
    return nll, top1


@torch.no_grad()
def score_targets_whole(model, tok, prompts: list[str], targets: list[str], chunk: int = 64):
    """:func:`score_targets` as one plain forward of prompt + target per pair with the logits of every position (the
    reference code's way): the fallback past a sliding window, and the reference of the tests."""
    dev = next(model.parameters()).device
    nll, top1 = [], []
    for c in range(0, len(prompts), chunk):
        seqs, spans = [], []
        for p, t in zip(prompts[c : c + chunk], targets[c : c + chunk]):
            pre, tgt = scored_prefix(tok, p), target_ids(tok, t)
            seqs.append(pre + tgt)
            spans.append((len(pre), tgt))
        ids, mask = pad_batch(seqs, pad_id(tok))
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
        for b, (start, tgt) in enumerate(spans):
            pos = torch.arange(start - 1, start - 1 + len(tgt), device=dev)
            t = torch.tensor(tgt, device=dev)
            lp = logp[b, pos]
            nll.append(-lp.gather(1, t[:, None]).mean().item())
            top1.append((lp.argmax(-1) == t).float().mean().item())
    return nll, top1


def scored_pairs(r: EditRequest) -> list[tuple[str, int, str, str, str]]:
    """Every (prompt, target) :func:`record_scores` scores for ``r``, as ``(metric, prompt slot, which target,
    prompt, target)``: the rewrite prompt (efficacy), each paraphrase (generalization) and each neighbourhood
    prompt (specificity), against ``target_new`` and ``target_true`` ("new", "true"), or for ZsRE against one
    target ("acc": ``target_new``, or the neighbourhood prompt's own answer)."""
    pairs = []
    groups = {"efficacy": [r.filled_prompt], "generalization": r.paraphrase_prompts, "specificity": r.neighborhood_prompts}
    for key, ps in groups.items():
        for j, p in enumerate(ps):
            if r.source == "zsre":
                pairs.append((key, j, "acc", p, r.neighborhood_targets[j] if key == "specificity" else r.target_new))
            else:
                pairs += [(key, j, "new", p, r.target_new), (key, j, "true", p, r.target_true)]
    return pairs


def _probability(nll: float, n_tokens: int, magnitude: str) -> float:
    """p(target | prompt) from its mean token NLL: the geometric mean per token (``token_mean``, the reference
    code's ``exp(-NLL)``) or the whole target's probability (``sequence``)."""
    return math.exp(-nll * (n_tokens if magnitude == "sequence" else 1))


def record_scores(model, tok, requests: list[EditRequest], magnitude: str = "token_mean") -> list[dict[str, float]]:
    """Per-request scores (a key is absent when the record has no prompt for it).

    CounterFact / world: ``efficacy``, ``generalization``, ``specificity`` in [0, 1] and their
    ``*_magnitude`` in [-1, 1] (``magnitude``: one of :data:`MAGNITUDES`). ZsRE: ``rewrite_acc``,
    ``paraphrase_acc``, ``neighborhood_acc`` (:data:`ZSRE_KEYS`)."""
    if magnitude not in MAGNITUDES:
        raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {magnitude!r}")
    prompts, targets, where = [], [], []  # where: (request, metric, prompt slot, which target)
    for i, r in enumerate(requests):
        for key, j, which, p, t in scored_pairs(r):
            prompts.append(p), targets.append(t), where.append((i, key, j, which))
    nll, top1 = score_targets(model, tok, prompts, targets)
    table: dict = {}
    for (i, key, j, which), t, a, b in zip(where, targets, nll, top1):
        table.setdefault((i, key, j), {})[which] = (a, b, len(target_ids(tok, t)))
    per: list[dict[str, list[float]]] = [{} for _ in requests]
    for (i, key, j), v in table.items():
        if "acc" in v:
            per[i].setdefault(ZSRE_KEYS[key], []).append(v["acc"][1])
            continue
        p_new, p_true = (_probability(v[w][0], v[w][2], magnitude) for w in ("new", "true"))
        sign = -1.0 if key == "specificity" else 1.0  # the neighbourhood should keep the true target
        per[i].setdefault(key, []).append(float(sign * (v["true"][0] - v["new"][0]) > 0))
        per[i].setdefault(f"{key}_magnitude", []).append(sign * (p_new - p_true))
    return [{k: sum(v) / len(v) for k, v in d.items()} for d in per]


def update_metrics(metrics: MetricCollection, scores: list[dict[str, float]]) -> None:
    for s in scores:
        for k, v in s.items():
            if _slot(k) in metrics:  # scores the run does not track (e.g. sub.rouge_l) are left out
                metrics[_slot(k)].update(v)


# the long-form (generation) metrics live in lit_edit.text_metrics; importable from here too
from lit_edit.text_metrics import (BERTSCORE_MODES, BLEU_LEVELS, ROUGE_STATS, TEXT_STYLES,  # noqa: E402,F401
                                   UNSTRUCTURED_KEYS, add_embedding_scores, aggregate_scores, bleu_scores,
                                   embedding_scores, generate_answers, generate_greedy, reference_rouge_l_recall,
                                   rouge_l_scores, score_generations, text_scores, unstructured_scores)
