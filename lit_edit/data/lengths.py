"""Length checks: every sequence a request is edited or scored with must fit the model's context."""
from __future__ import annotations

import logging
from collections.abc import Callable

from lit_edit.data.records import _check_on_invalid
from lit_edit.metrics import scored_pairs, scored_prefix
from lit_edit.requests import EditRequest, EditRequestError, UnstructuredRequest, chat_prompt, edit_answer
from lit_edit.tokens import bos_ids, context_length, encode, encode_prompt, fill_context, target_ids

log = logging.getLogger("lit_edit.data")


def request_lengths(request: UnstructuredRequest, tokenizer, *, template: str | None = None,
                    chat: bool = True) -> dict[str, int]:
    """Token counts of an unstructured request as the model sees it.

    ``question`` / ``paraphrase_questions`` / ``sub_questions``: the longest prompt of each kind
    (BOS included, chat-wrapped with :func:`~lit_edit.requests.chat_prompt` when ``chat``);
    ``answer``: the edit target (answer plus end-of-turn string, :func:`~lit_edit.requests.edit_answer`);
    ``sub_answers``: the longest sub-answer.
    """
    n_bos = len(bos_ids(tokenizer))

    def prompt_len(question: str) -> int:
        return n_bos + text_len(chat_prompt(question, tokenizer, template=template) if chat else question)

    def text_len(text: str) -> int:
        return len(encode(tokenizer, text))

    answer = edit_answer(request.answer, tokenizer, template=template) if chat else request.answer
    return {
        "question": prompt_len(request.question),
        "paraphrase_questions": max((prompt_len(q) for q in request.paraphrase_questions), default=0),
        "answer": text_len(answer),
        "sub_questions": max((prompt_len(q) for q in request.sub_questions), default=0),
        "sub_answers": max((text_len(a) for a in request.sub_answers), default=0),
    }


def check_length(request: UnstructuredRequest, tokenizer, max_length, *, template: str | None = None,
                 chat: bool = True) -> UnstructuredRequest:
    """Raise :class:`EditRequestError` naming the record and field if the request does not fit the context.

    ``max_length``: the context in tokens, or a model / config to read it from
    (:func:`~lit_edit.tokens.context_length`). A prompt of ``Q`` tokens followed by a target of
    ``T`` tokens needs ``Q + T - 1`` positions, both to edit (the last target token is never an
    input, docs/algorithms.md §8.1) and to generate ``T`` tokens for scoring. Checked: question +
    answer (field ``answer``, or ``question`` if the question alone is too long), every
    paraphrase + answer (``paraphrase_questions``) and every sub-question + its answer
    (``sub_questions``).
    """
    limit = context_length(max_length)
    if limit is None:
        raise ValueError(f"cannot tell the model's context length from {type(max_length).__name__}")
    n = request_lengths(request, tokenizer, template=template, chat=chat)
    cid = request.case_id
    if n["question"] > limit:
        raise EditRequestError(cid, "question", f"the prompt alone is {n['question']} tokens; the model's context is "
                               f"{limit} tokens")
    pairs = [("answer", n["question"]), ("paraphrase_questions", n["paraphrase_questions"])]
    for name, q in pairs:
        if q and q + n["answer"] - 1 > limit:
            raise EditRequestError(cid, name, f"prompt ({q} tokens) + answer ({n['answer']} tokens) needs "
                                   f"{q + n['answer'] - 1} positions; the model's context is {limit} tokens")
    if n["sub_questions"] and n["sub_questions"] + n["sub_answers"] - 1 > limit:
        raise EditRequestError(cid, "sub_questions", f"a sub-question ({n['sub_questions']} tokens) + its answer "
                               f"(up to {n['sub_answers']} tokens) does not fit the model's context of {limit} tokens")
    return request


def _keep_fitting(requests: list, check: Callable, on_invalid: str) -> list:
    """``check(request)`` for every request (it raises :class:`EditRequestError` when one does not fit the model);
    ``on_invalid="skip"`` drops and logs those. Returns the requests kept, in order."""
    _check_on_invalid(on_invalid)
    kept = []
    for request in requests:
        try:
            kept.append(check(request))
        except EditRequestError as err:
            if on_invalid == "raise":
                raise
            log.warning("skipping edit record that does not fit the model: %s", err)
    if len(kept) < len(requests):
        log.warning("skipped %d of %d edit records as too long", len(requests) - len(kept), len(requests))
    return kept


def check_lengths(requests: list[UnstructuredRequest], tokenizer, max_length, *, template: str | None = None,
                  chat: bool = True, on_invalid: str = "raise") -> list[UnstructuredRequest]:
    """:func:`check_length` for every request; ``on_invalid="skip"`` drops (and logs) those that do not fit."""
    return _keep_fitting(requests, lambda r: check_length(r, tokenizer, max_length, template=template, chat=chat),
                         on_invalid)


def _scored_field(key: str, slot: int) -> str:
    return {"efficacy": "prompt", "generalization": f"paraphrase_prompts[{slot}]",
            "specificity": f"neighborhood_prompts[{slot}]"}[key]


def _target_field(key: str, slot: int, which: str) -> str:
    if which == "acc":  # ZsRE: one target per prompt, the neighbourhood prompt's own answer for specificity
        return f"neighborhood_targets[{slot}]" if key == "specificity" else "target_new"
    return "target_new" if which == "new" else "target_true"


def check_structured_length(request: EditRequest, tokenizer, max_length, *, context: str = "{}",
                            fact_token: str = "subject_last") -> EditRequest:
    """Raise :class:`EditRequestError` naming the record, the field and both lengths if a sequence of a structured
    request does not fit the model's context; removals (nothing edited or scored) pass.

    ``max_length``: the context in tokens, or a model / config (:func:`~lit_edit.tokens.context_length`).
    Checked, in this order:

    * the edit sequence: ``context`` (the longest context template) filled with the prompt, then
      ``target_new``, as the targets are optimised; its last token is never an input (``- 1``). Field ``prompt``.
    * every sequence :func:`~lit_edit.metrics.record_scores` runs through the model, whole (BOS + prompt + the
      target, :func:`~lit_edit.metrics.scored_prefix`): the rewrite prompt (field ``prompt``), each paraphrase
      (``paraphrase_prompts[i]``) and each neighbourhood prompt (``neighborhood_prompts[i]``; ZsRE's locality
      question), each with every target it is scored against (``target_new`` / ``target_true``; ZsRE
      neighbourhood: ``neighborhood_targets[i]``). The pairs come from :func:`~lit_edit.metrics.scored_pairs`,
      so the check follows the scorer.

    Attribute and generation prompts are not checked: no metric runs them.
    """
    limit = context_length(max_length)
    if limit is None:
        raise ValueError(f"cannot tell the model's context length from {type(max_length).__name__}")
    if not request.writes:
        return request
    cid = request.case_id
    enc = encode_prompt(tokenizer, fill_context(context, request.prompt), request.subject, fact_token)
    n = len(enc.ids) + len(target_ids(tokenizer, request.target_new)) - 1
    if n > limit:
        raise EditRequestError(cid, "prompt", f"prompt + target_new is {n} tokens with the longest context template; "
                               f"the model allows {limit}")
    prompt_len: dict[str, int] = {}  # each prompt is scored against two targets: tokenise it once
    target_len: dict[str, int] = {}
    for key, slot, which, prompt, target in scored_pairs(request):
        if target is None:  # nothing to append (and nothing record_scores could score)
            continue
        if prompt not in prompt_len:
            prompt_len[prompt] = len(scored_prefix(tokenizer, prompt))
        if target not in target_len:
            target_len[target] = len(target_ids(tokenizer, target))
        n_p, n_t = prompt_len[prompt], target_len[target]
        if n_p + n_t > limit:
            raise EditRequestError(cid, _scored_field(key, slot),
                                   f"scored as prompt ({n_p} tokens) + {_target_field(key, slot, which)} ({n_t} "
                                   f"tokens) = {n_p + n_t} tokens; the model's context is {limit} tokens")
    return request


def check_structured_lengths(requests: list[EditRequest], tokenizer, max_length, *, context: str = "{}",
                             fact_token: str = "subject_last", on_invalid: str = "raise") -> list[EditRequest]:
    """:func:`check_structured_length` for every request; ``on_invalid="skip"`` drops (and logs) those that do not
    fit. Returns the requests kept, in order."""
    return _keep_fitting(requests, lambda r: check_structured_length(r, tokenizer, max_length, context=context,
                                                                     fact_token=fact_token), on_invalid)


def fitting_requests(method, requests: list, on_invalid: str = "raise", drop: Callable | None = None) -> list:
    """The stream a run edits with ``method`` (``lit_edit.methods``): every request is of the method's kind, and
    every sequence it is edited or scored with fits the model's context, checked before any edit. A request that does
    not fit follows ``on_invalid``: "raise" stops with an EditRequestError naming case id, field and both lengths;
    "skip" logs it and drops it here *and*, through ``drop(case_ids)``, from the data module's stream, so the
    batches and the checkpointed stream fingerprint are those of the filtered stream. Returns the requests kept."""
    want = method.request_type
    bad = next((r for r in requests if not isinstance(r, want)), None)
    if bad is not None:
        hint = ("use a long-form method (model.method: lit_edit.methods.Windows) for unstructured data"
                if want is EditRequest else "use an unstructured reader")
        raise EditRequestError(bad.case_id, "question" if want is EditRequest else "prompt",
                               f"a {type(bad).__name__} in a run whose method edits {want.__name__}s: {hint}")
    writes = [r for r in requests if r.writes]  # removals are neither edited nor scored
    fits = method.check_lengths(writes, on_invalid)
    if len(fits) == len(writes):
        return requests
    kept = {r.case_id for r in fits}  # case ids are unique in a stream (check_unique_case_ids)
    if drop is not None:
        drop([r.case_id for r in writes if r.case_id not in kept])
    return [r for r in requests if not r.writes or r.case_id in kept]
