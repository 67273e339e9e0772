"""Long-form (unstructured) edit metrics (docs/algorithms.md §9): greedy generations after the question and its
paraphrases, scored against the answer with BLEU and ROUGE-L, and BERTScore with a local model (the reference
code's character-level BLEU and ROUGE recall as options, see the notes below)."""
from __future__ import annotations

import torch

from lit_edit.generation import _chunks, generate_greedy
from lit_edit.tokens import bos_ids, context_length, encode

# --------------------------------------------------------------------------------------------
# Unstructured (long-form) edits: greedy generation scored with BLEU / ROUGE-L (§9 "MUKE")
# --------------------------------------------------------------------------------------------
#
# What lit_edit computes by default, and how the reference code (MUKE's summarize_uns.py) differs:
#
# * Generation: greedy, ``max_new_tokens`` = the reference answer's token length, stopping at
#   EOS / end-of-turn. The reference samples with temperature 0.001 (practically greedy) up to
#   512 new tokens.
# * BLEU: torchmetrics ``BLEUScore`` (4-gram, no smoothing) on whitespace words, one sentence-level
#   score per generation, averaged. The reference passes raw strings to NLTK's ``sentence_bleu``,
#   i.e. a *character*-level 4-gram BLEU: ``bleu_level="char"`` (same formula through BLEUScore on
#   one token per character, whitespace included).
# * ROUGE-L: torchmetrics ``ROUGEScore(rouge_keys=("rougeL",))`` F-measure (its tokenizer lowercases
#   and drops punctuation; one LCS over the whole text). The reference reports the *recall* of the
#   ``rouge`` package (pltrdy), which is a different computation: the texts are split into
#   sentences at ".", words at single spaces (case and punctuation kept), and recall is a
#   summary-level union LCS over distinct words (see :func:`reference_rouge_l_recall`).
#   ``rouge_stat="recall"`` gives torchmetrics' ROUGE-L recall (on UnKE answers about 15-25 %
#   lower than the package's); ``rouge_stat="reference_recall"`` the package's value, reimplemented.
# * ``style="reference"`` selects character BLEU and ``reference_recall``, plus the reference's habit
#   of appending a space to a prediction that contains none.
# * "BERTScore": the reference reports the cosine of all-MiniLM-L6-v2 sentence embeddings;
#   here only with a local model path, either as torchmetrics ``BERTScore`` F1 or as that cosine
#   (mean-pooled embeddings, ``bertscore_mode="cosine"``).

UNSTRUCTURED_KEYS = ("bleu", "rouge_l", "para.bleu", "para.rouge_l")
BLEU_LEVELS = ("word", "char")
ROUGE_STATS = ("fmeasure", "recall", "precision", "reference_recall")
TEXT_STYLES = ("torchmetrics", "reference")
BERTSCORE_MODES = ("bertscore", "cosine")


def _bleu_tokens(text: str) -> str:
    """One whitespace-separated token per character (whitespace characters get a name of their own)."""
    return " ".join(f"<U+{ord(c):04X}>" if c.isspace() else c for c in text)


def bleu_scores(preds: list[str], refs: list[str], *, level: str = "word", n_gram: int = 4,
                smooth: bool = False) -> list[float]:
    """Sentence-level BLEU of each prediction against its reference (torchmetrics ``BLEUScore``).

    ``level="word"``: BLEUScore on whitespace-split words. ``level="char"``: on characters,
    whitespace included: what NLTK's ``sentence_bleu([ref], pred)`` computes on raw strings, as
    the reference code calls it. Without smoothing a text with no matching n-gram of some order
    (e.g. fewer than ``n_gram`` words) scores 0, like NLTK (which returns ~1e-78 there).
    """
    from torchmetrics.text import BLEUScore

    if level not in BLEU_LEVELS:
        raise ValueError(f"level must be one of {BLEU_LEVELS}, got {level!r}")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    metric = BLEUScore(n_gram=n_gram, smooth=smooth)
    scores = []
    for p, r in zip(preds, refs):
        if level == "char":
            p, r = _bleu_tokens(p), _bleu_tokens(r)
        metric.reset()
        scores.append(float(metric([p], [[r]])))
    return scores


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of ``x`` and ``y``, traced back from the end of both.

    On a tie the trace moves along ``y`` (the trace prefers ``x`` only when that keeps a strictly
    longer LCS), which fixes *which* LCS is returned; that matters when distinct words are counted.
    """
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = n, m
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _rouge_sentences(text: str) -> list[list[str]]:
    """Sentences split at ".", whitespace runs collapsed, words split at single spaces (empty pieces kept)."""
    return [" ".join(part.split()).split(" ") for part in text.split(".") if len(part) > 0]


def reference_rouge_l_recall(pred: str, ref: str) -> float:
    """ROUGE-L recall as the ``rouge`` package (pltrdy) computes it; the reference code reports it.

    Summary-level LCS (Lin 2004) with that package's choices: both texts are cut into sentences at
    every "." (:func:`_rouge_sentences`); for each reference sentence and each predicted sentence
    one LCS of words is taken (:func:`_lcs_words`); recall = number of *distinct* words in the
    union of all these LCSs / number of distinct words in the reference. No lowercasing, no
    punctuation removal. An empty prediction is an error in the package; here it scores 0.
    """
    ref_sents, pred_sents = _rouge_sentences(ref), _rouge_sentences(pred)
    ref_words = {w for s in ref_sents for w in s}
    if not ref_words or not pred_sents:
        return 0.0
    union: set[str] = set()
    for r in ref_sents:
        for c in pred_sents:
            union.update(_lcs_words(r, c))
    return len(union) / len(ref_words)


def rouge_l_scores(preds: list[str], refs: list[str], *, stat: str = "fmeasure") -> list[float]:
    """ROUGE-L of each prediction against its reference (torchmetrics ``ROUGEScore``, key rougeL).

    ``stat``: ``"fmeasure"`` (default), ``"recall"``, ``"precision"``, or ``"reference_recall"``:
    the ``rouge`` package's summary-level recall that the reference code reports
    (:func:`reference_rouge_l_recall`; not torchmetrics).
    """
    from torchmetrics.text import ROUGEScore

    if stat not in ROUGE_STATS:
        raise ValueError(f"stat must be one of {ROUGE_STATS}, got {stat!r}")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if stat == "reference_recall":
        return [reference_rouge_l_recall(p, r) for p, r in zip(preds, refs)]
    metric = ROUGEScore(rouge_keys=("rougeL",))
    scores = []
    for p, r in zip(preds, refs):
        metric.reset()
        scores.append(float(metric([p], [r])[f"rougeL_{stat}"]))
    return scores


def _text_options(style: str | None, bleu_level: str | None, rouge_stat: str | None,
                  append_space: bool | None) -> tuple[str, str, bool]:
    if style is not None and style not in TEXT_STYLES:
        raise ValueError(f"style must be one of {TEXT_STYLES}, got {style!r}")
    ref = style == "reference"
    return (bleu_level or ("char" if ref else "word"), rouge_stat or ("reference_recall" if ref else "fmeasure"),
            ref if append_space is None else append_space)


def text_scores(preds: list[str], refs: list[str], *, style: str | None = None, bleu_level: str | None = None,
                rouge_stat: str | None = None, append_space: bool | None = None) -> dict[str, list[float]]:
    """Per-pair ``{"bleu": [...], "rouge_l": [...]}``.

    Defaults: word BLEU and ROUGE-L F-measure. ``style="reference"``: character BLEU, the ``rouge``
    package's ROUGE-L recall and a space appended to predictions without one (MUKE's ``summarize_uns.py``);
    ``bleu_level`` / ``rouge_stat`` / ``append_space`` override single choices.
    """
    bleu_level, rouge_stat, append_space = _text_options(style, bleu_level, rouge_stat, append_space)
    if append_space:
        preds = [p if " " in p else p + " " for p in preds]
    return {"bleu": bleu_scores(preds, refs, level=bleu_level), "rouge_l": rouge_l_scores(preds, refs, stat=rouge_stat)}


def generate_answers(model, tok, requests, *, batch_size: int = 8, chat: bool = True, template: str | None = None,
                     max_new_tokens: int | None = None, padding_side: str = "left",
                     sub_questions: bool = False, stop_at_eos: bool = True) -> list[dict]:
    """Greedy answers of the model to each request's question, paraphrases (and sub-questions).

    Prompts are chat-wrapped with :func:`~lit_edit.requests.chat_prompt` when ``chat`` (plain
    text for a tokenizer without a chat template). Each generation gets as many new tokens as the
    text it is scored against (``answer``, or the sub-answer), unless ``max_new_tokens`` is given.
    A prompt that would not fit the model's context raises :class:`EditRequestError` naming the
    record and field (see :func:`lit_edit.data.check_length`). ``stop_at_eos=False`` always
    generates the full length (a base model such as the fact world's ends its text with EOS).
    Returns one ``{"question": str, "para": [str], "sub": [str]}`` per request.
    """
    from lit_edit.requests import EditRequestError, chat_prompt

    ctx = context_length(model)
    prompts, limits, where = [], [], []
    for k, r in enumerate(requests):
        n_answer = len(encode(tok, r.answer))
        items = [("question", r.question, n_answer)] + [("para", q, n_answer) for q in r.paraphrase_questions]
        if sub_questions:
            items += [("sub", q, len(encode(tok, a))) for q, a in zip(r.sub_questions, r.sub_answers)]
        for kind, question, n in items:
            text = chat_prompt(question, tok, template=template) if chat else question
            n = max_new_tokens if max_new_tokens is not None else n
            need = len(bos_ids(tok)) + len(encode(tok, text)) + n - 1
            if ctx is not None and need > ctx:
                name = {"question": "answer", "para": "paraphrase_questions", "sub": "sub_questions"}[kind]
                raise EditRequestError(r.case_id, name, f"prompt + {n} generated tokens need {need} positions; the "
                                       f"model's context is {ctx} tokens")
            prompts.append(text), limits.append(n), where.append((k, kind))
    texts = generate_greedy(model, tok, prompts, limits, batch_size=batch_size, padding_side=padding_side,
                            stop_ids=None if stop_at_eos else set())
    out = [{"question": "", "para": [], "sub": []} for _ in requests]
    for (k, kind), text in zip(where, texts):
        if kind == "question":
            out[k]["question"] = text
        else:
            out[k][kind].append(text)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def score_generations(requests, generations: list[dict], *, style: str | None = None, bleu_level: str | None = None,
                      rouge_stat: str | None = None, append_space: bool | None = None) -> list[dict[str, float]]:
    """Per-request scores of :func:`generate_answers` output against each request's ``answer``.

    Keys: ``bleu``, ``rouge_l`` (the question's generation); ``para.bleu``, ``para.rouge_l``
    (mean over the request's paraphrases; absent without any); ``sub.rouge_l`` (ROUGE-L of each
    sub-answer, mean over the request's sub-questions, as the reference averages them; absent
    unless sub-questions were generated). Values in [0, 1] (the reference reports ×100).
    """
    if len(generations) != len(requests):
        raise ValueError(f"{len(generations)} generations for {len(requests)} requests")
    opts = dict(style=style, bleu_level=bleu_level, rouge_stat=rouge_stat, append_space=append_space)
    preds, refs, where = [], [], []
    for k, (r, g) in enumerate(zip(requests, generations)):
        for kind, texts, targets in (("", [g["question"]], [r.answer]), ("para.", g["para"], [r.answer] * len(g["para"])),
                                     ("sub.", g["sub"], r.sub_answers[: len(g["sub"])])):
            for text, target in zip(texts, targets):
                preds.append(text), refs.append(target), where.append((k, kind))
    scores = text_scores(preds, refs, **opts)
    table: list[dict[str, list[float]]] = [{} for _ in requests]
    for j, (k, kind) in enumerate(where):
        for name in ("bleu", "rouge_l"):
            if kind == "sub." and name == "bleu":
                continue  # the reference scores sub-answers with ROUGE only
            table[k].setdefault(kind + name, []).append(scores[name][j])
    return [{key: _mean(v) for key, v in row.items()} for row in table]


def aggregate_scores(requests, per_record: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every key over the records that have it; with categories also ``"<category>.<key>"``."""
    sums: dict[str, list[float]] = {}
    for r, scores in zip(requests, per_record):
        for key, value in scores.items():
            sums.setdefault(key, []).append(value)
            if getattr(r, "category", None):
                sums.setdefault(f"{r.category}.{key}", []).append(value)
    return {key: _mean(values) for key, values in sums.items()}


def embedding_scores(preds: list[str], refs: list[str], model_path: str | None, *, mode: str = "bertscore",
                     batch_size: int = 32, device=None) -> list[float] | None:
    """BERTScore-style similarity of each prediction to its reference, with a *local* scoring model.

    ``mode="bertscore"``: torchmetrics ``BERTScore`` F1. ``mode="cosine"``: the reference code's
    "BERTScore", the cosine of mean-pooled sentence embeddings (all-MiniLM-L6-v2 there). Returns
    ``None``, printing why, when ``model_path`` is not given or is not a local directory: scoring
    never downloads a model.
    """
    import os

    if mode not in BERTSCORE_MODES:
        raise ValueError(f"mode must be one of {BERTSCORE_MODES}, got {mode!r}")
    if model_path is None:
        print("BERTScore skipped: no local scoring model path given (bertscore_model=None)")
        return None
    if not os.path.isdir(model_path):
        print(f"BERTScore skipped: {model_path!r} is not a local model directory (models are never downloaded)")
        return None
    if mode == "bertscore":
        from torchmetrics.text.bert import BERTScore

        metric = BERTScore(model_name_or_path=model_path, batch_size=batch_size, device=device, max_length=512,
                           truncation=True)
        return [float(x) for x in metric(list(preds), list(refs))["f1"].reshape(-1)]  # 0-d for a single pair
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    if device is not None:
        encoder = encoder.to(device)
    dev = next(encoder.parameters()).device

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for idx in _chunks(len(texts), batch_size):
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt").to(dev)
            hidden = encoder(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9))
        return torch.cat(out)

    return torch.nn.functional.cosine_similarity(embed(list(preds)), embed(list(refs)), dim=-1).tolist()


def add_embedding_scores(per: list[dict], gens: list[dict], requests, model_path: str | None,
                         mode: str = "bertscore") -> None:
    """Add ``bertscore`` (answer to the question) and ``para.bertscore`` (mean over its paraphrases) to each
    record's scores ``per``, with the local scoring model ``model_path``; nothing (a printed reason) without one."""
    bert = embedding_scores([g["question"] for g in gens], [r.answer for r in requests], model_path, mode=mode)
    if bert is None:
        return
    for row, value in zip(per, bert):
        row["bertscore"] = value
    paired = [(k, p) for k, g in enumerate(gens) for p in g["para"]]
    if paired:
        para = embedding_scores([p for _, p in paired], [requests[k].answer for k, _ in paired], model_path, mode=mode)
        by_record: dict[int, list[float]] = {}
        for (k, _), value in zip(paired, para):
            by_record.setdefault(k, []).append(value)
        for k, values in by_record.items():
            per[k]["para.bertscore"] = _mean(values)


def unstructured_scores(model, tok, requests, *, batch_size: int = 8, chat: bool = True,
                        template: str | None = None, max_new_tokens: int | None = None,
                        padding_side: str = "left", style: str | None = None, bleu_level: str | None = None,
                        rouge_stat: str | None = None, append_space: bool | None = None,
                        sub_questions: bool = False, stop_at_eos: bool = True, bertscore_model: str | None = None,
                        bertscore_mode: str = "bertscore") -> dict[str, float]:
    """Generate greedily and score: ``{"bleu", "rouge_l", "para.bleu", "para.rouge_l", ...}``.

    Means over records (the ``para.`` keys over records with a paraphrase; absent when none has
    one, e.g. EditEverything). With categories (EditEverything) also ``"<category>.bleu"`` etc.;
    with ``sub_questions`` also ``sub.rouge_l``; with a local ``bertscore_model`` also
    ``bertscore`` and ``para.bertscore`` (skipped, with a printed reason, otherwise).
    See the notes above :data:`UNSTRUCTURED_KEYS` for how this differs from the reference code.
    """
    gens = generate_answers(model, tok, requests, batch_size=batch_size, chat=chat, template=template,
                            max_new_tokens=max_new_tokens, padding_side=padding_side, sub_questions=sub_questions,
                            stop_at_eos=stop_at_eos)
    per = score_generations(requests, gens, style=style, bleu_level=bleu_level, rouge_stat=rouge_stat,
                            append_space=append_space)
    add_embedding_scores(per, gens, requests, bertscore_model, bertscore_mode)
    return aggregate_scores(requests, per)
