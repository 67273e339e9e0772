"""Edit-quality metrics (docs/algorithms.md §9), as torchmetrics so they sum across ranks.

CounterFact (and the fact world): for each prompt, the mean per-token NLL of ``" " + target_new``
and of ``" " + target_true`` (a geometric-mean probability, so multi-token targets of different
lengths compare fairly, as the reference does). Efficacy / generalization: fraction of rewrite /
paraphrase prompts where the new target is more likely; specificity: fraction of neighbourhood
prompts where the true target stays more likely. Per record the mean over its prompts, then the
mean over records.

ZsRE: teacher-forced token top-1 accuracy of the answer tokens after the question (rewrite,
paraphrase) and of the NQ answer after ``loc + "?"`` (specificity, against the dataset answer as
in the reference code — not "unchanged prediction"). Built at the token level, so there is no
decode/re-encode drift (§9 ⚠ for Llama).

Unstructured edits (:class:`~lit_edit.requests.UnstructuredRequest`) are scored by generation:
:mod:`lit_edit.text_metrics`.
"""
from __future__ import annotations

import torch
from torchmetrics import MeanMetric, MetricCollection

from lit_edit.requests import EditRequest
from lit_edit.tokens import bos_ids, encode, pad_batch, pad_id, target_ids

KEYS = ("efficacy", "generalization", "specificity")


def _slot(key: str) -> str:
    return key.replace(".", "_")  # module names cannot hold "." ("para.bleu")


def make_metrics(prefix: str = "", keys: tuple[str, ...] = KEYS) -> MetricCollection:
    """Means of per-record scores; float64 sum and count states, summed across DDP ranks by ``compute()``."""
    return MetricCollection({_slot(k): MeanMetric().set_dtype(torch.float64) for k in keys}, prefix=prefix)


def compute_metrics(metrics: MetricCollection, keys: tuple[str, ...]) -> dict[str, float]:
    """``compute()`` (a collective under DDP: call it on every rank) back under the score names."""
    values = metrics.compute()
    return {k: float(values[(metrics.prefix or "") + _slot(k)]) for k in keys}


def scored_prefix(tok, prompt: str) -> list[int]:
    """The ids a scored prompt is fed as: BOS (if any) + the prompt. :func:`score_targets` appends the target's
    :func:`~lit_edit.tokens.target_ids` and runs the whole sequence (``lit_edit.data.check_structured_length``
    checks that length against the model's context)."""
    return bos_ids(tok) + encode(tok, prompt)


@torch.no_grad()
def score_targets(model, tok, prompts: list[str], targets: list[str], chunk: int = 64):
    """For each (prompt, target): mean per-token NLL of the target and whether every target token is the argmax."""
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


def record_scores(model, tok, requests: list[EditRequest]) -> list[dict[str, float]]:
    """Per-request efficacy / generalization / specificity in [0, 1] (a key is absent when the record has no prompt for it)."""
    prompts, targets, where = [], [], []  # where: (request, metric, prompt slot, which target)
    for i, r in enumerate(requests):
        for key, j, which, p, t in scored_pairs(r):
            prompts.append(p), targets.append(t), where.append((i, key, j, which))
    nll, top1 = score_targets(model, tok, prompts, targets)
    table: dict = {}
    for (i, key, j, which), a, b in zip(where, nll, top1):
        table.setdefault((i, key, j), {})[which] = (a, b)
    per: list[dict[str, list[float]]] = [{} for _ in requests]
    for (i, key, j), v in table.items():
        if "acc" in v:
            ok = v["acc"][1]
        elif key == "specificity":
            ok = float(v["true"][0] < v["new"][0])
        else:
            ok = float(v["true"][0] > v["new"][0])
        per[i].setdefault(key, []).append(ok)
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
