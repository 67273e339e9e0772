"""Edit-quality metrics (ALGORITHMS.md §9), as torchmetrics so they sum across ranks.

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
"""
from __future__ import annotations

import torch
from torchmetrics import MeanMetric, MetricCollection

from lit_edit.requests import EditRequest
from lit_edit.tokens import bos_ids, encode, pad_batch, pad_id, target_ids

KEYS = ("efficacy", "generalization", "specificity")


def make_metrics(prefix: str = "") -> MetricCollection:
    """Means of per-record scores; float64 sum and count states, summed across DDP ranks by ``compute()``."""
    return MetricCollection({k: MeanMetric().set_dtype(torch.float64) for k in KEYS}, prefix=prefix)


@torch.no_grad()
def score_targets(model, tok, prompts: list[str], targets: list[str], chunk: int = 64):
    """For each (prompt, target): mean per-token NLL of the target and whether every target token is the argmax."""
    dev = next(model.parameters()).device
    bos = bos_ids(tok)
    nll, top1 = [], []
    for c in range(0, len(prompts), chunk):
        seqs, spans = [], []
        for p, t in zip(prompts[c : c + chunk], targets[c : c + chunk]):
            pre, tgt = bos + encode(tok, p), target_ids(tok, t)
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


def record_scores(model, tok, requests: list[EditRequest]) -> list[dict[str, float]]:
    """Per-request efficacy / generalization / specificity in [0, 1] (a key is absent when the record has no prompt for it)."""
    prompts, targets, where = [], [], []  # where: (request, metric, prompt slot, which target)
    for i, r in enumerate(requests):
        groups = {"efficacy": [r.filled_prompt], "generalization": r.paraphrase_prompts, "specificity": r.neighborhood_prompts}
        for key, ps in groups.items():
            for j, p in enumerate(ps):
                if r.source == "zsre":
                    tgt = r.neighborhood_targets[j] if key == "specificity" else r.target_new
                    prompts.append(p), targets.append(tgt), where.append((i, key, j, "acc"))
                else:
                    for which in ("new", "true"):
                        prompts.append(p), targets.append(r.target_new if which == "new" else r.target_true)
                        where.append((i, key, j, which))
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
            metrics[k].update(v)
