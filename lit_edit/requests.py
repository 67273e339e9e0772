"""One edit request, whatever benchmark it came from, and its validation.

Readers (``lit_edit.data``) turn CounterFact, ZsRE and the synthetic fact world into
:class:`EditRequest`; everything downstream (targets, solvers, metrics) reads only this type.
Unstructured benchmarks (UnKEBench, AKEW, EditEverything, the world's long-form paragraphs)
become :class:`UnstructuredRequest` (a question and a long answer); :func:`chat_prompt` and
:func:`edit_answer` wrap them for instruct models.
"""
from __future__ import annotations

from dataclasses import dataclass, field


OPERATIONS = ("insert", "replace", "remove")


class EditRequestError(ValueError):
    """A record that cannot be edited. Names the record (case id) and the offending field."""

    def __init__(self, case_id, field_name: str, message: str):
        self.case_id = case_id
        self.field = field_name
        self.message = message
        super().__init__(f"edit record case_id={case_id!r}, field {field_name!r}: {message}")


class _Operation:
    """The operation a request carries (``op``: insert, replace or remove), shared by both request types."""

    @property
    def writes(self) -> bool:
        """Whether the request writes a value (insert, replace); a removal only drops an earlier edit."""
        return self.op != "remove"

    def _check_op(self) -> None:
        if self.op not in OPERATIONS:
            raise EditRequestError(self.case_id, "op", f"must be one of {OPERATIONS}, got {self.op!r}")


@dataclass
class EditRequest(_Operation):
    """A structured edit: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` holds exactly one ``{}`` for the subject. Evaluation prompts come with it:
    paraphrases (generalization), neighbourhood prompts (specificity; scored against
    ``target_true`` for CounterFact, or against ``neighborhood_targets`` for ZsRE, where each
    neighbourhood prompt has its own answer), attribute prompts (not scored) and generation prompts
    (fluency and consistency, ``docs/metrics.md``). ``target_new_id``: the new object's id (CounterFact's
    Wikidata id, ``requested_rewrite.target_new.id``), which selects the consistency reference texts.
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] | None = None
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None
    target_new_id: str | None = None
    source: str = "counterfact"  # "counterfact" | "zsre" | "world": selects the metric family
    op: str = "insert"  # "insert" | "replace" (new value for an edited fact) | "remove" (forget an edited fact)

    @property
    def fact_id(self) -> str:
        """The fact an edit writes: its filled prompt. ``replace`` and ``remove`` find earlier edits by it."""
        return self.filled_prompt

    @property
    def filled_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def validate(self) -> "EditRequest":
        """Schema checks that need no tokenizer; raises :class:`EditRequestError`."""
        cid = self.case_id
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise EditRequestError(cid, "prompt", f"must contain exactly one '{{}}' for the subject, got {self.prompt!r}")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditRequestError(cid, "subject", "missing or empty")
        self._check_op()
        if self.writes and (not isinstance(self.target_new, str) or not self.target_new.strip()):
            raise EditRequestError(cid, "target_new", "missing or empty")
        if self.writes and self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditRequestError(cid, "target_new", f"equals target_true ({self.target_true!r}): nothing to edit")
        prefix = self.prompt.split("{}")[0]
        if prefix and not prefix.endswith(" "):
            # The fact-token rule (docs/algorithms.md §1.3) needs the subject to start a new word.
            raise EditRequestError(cid, "prompt", f"text before '{{}}' must end with a space, got {prefix!r}")
        if self.neighborhood_targets is not None and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise EditRequestError(cid, "neighborhood_targets", "must have one target per neighbourhood prompt")
        return self


# --------------------------------------------------------------------------------------------
# Unstructured (long-form) edits: UnKEBench, AKEW, EditEverything, the fact world's paragraphs
# --------------------------------------------------------------------------------------------

UNSTRUCTURED_SOURCES = ("unke", "akew_mquake", "akew_counterfact", "editeverything", "world_long")


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass
class UnstructuredRequest(_Operation):
    """An unstructured edit: after ``question`` the model should answer with the long text ``answer``.

    ``question`` and ``answer`` are plain text as the dataset stores them: no chat template and no
    end-of-turn string. Wrapping is a model-side step (:func:`chat_prompt`, :func:`edit_answer`),
    so one stream of requests serves base and instruct models alike.

    Evaluation fields (docs/algorithms.md §9, §11):

    * ``paraphrase_questions``: rephrasings of the question whose answers are scored against
      ``answer`` like the question's (UnKE ``para_question``, AKEW-CounterFact
      ``paraphrase_prompts[0]``, the world's second question); empty when the dataset has none
      (EditEverything, AKEW-MQuAKE).
    * ``sub_questions`` / ``sub_answers``: short questions about facts inside ``answer`` and their
      answers (UnKE ``sub_question``/``sub_answer``; AKEW: the first 5 ``unsfact_triplets_GPT`` as
      ``prompt.format(subject)`` / ``target``, as MUKE builds them; the world: cloze prompts of the
      facts the paragraph states).
    * ``category``: EditEverything's category (math, code, poetry, ...), reported per category.
    * ``subject``: the entity the text is about, when the dataset names it.
    * ``original_answer``: the text before the counterfactual rewrite, when known (the world).
    * ``extra``: further dataset fields a user may want (AKEW: the structured rewrite, MQuAKE's
      multi-hop ``questions`` and ``new_answer``...); never read by lit_edit itself.
    """

    case_id: int | str
    question: str
    answer: str
    paraphrase_questions: list[str] = field(default_factory=list)
    sub_questions: list[str] = field(default_factory=list)
    sub_answers: list[str] = field(default_factory=list)
    source: str = "unke"
    category: str | None = None
    subject: str | None = None
    original_answer: str | None = None
    extra: dict = field(default_factory=dict)
    op: str = "insert"  # as EditRequest.op: "replace" / "remove" find the earlier edit of the same question

    @property
    def fact_id(self) -> str:
        """What the edit is keyed by in the solver's ledger: the question (all of its window columns)."""
        return self.question

    @property
    def para_question(self) -> str | None:
        """The first paraphrased question (the one the reference code evaluates), or ``None``."""
        return self.paraphrase_questions[0] if self.paraphrase_questions else None

    def validate(self) -> "UnstructuredRequest":
        """Schema checks that need no tokenizer; raises :class:`EditRequestError`."""
        cid = self.case_id
        if cid is None or (isinstance(cid, str) and not cid.strip()):
            raise EditRequestError(cid, "case_id", "missing or empty")
        if not _nonempty_str(self.question):
            raise EditRequestError(cid, "question", f"missing or empty, got {self.question!r}")
        if not _nonempty_str(self.answer):
            raise EditRequestError(cid, "answer", f"missing or empty, got {self.answer!r}")
        for name in ("paraphrase_questions", "sub_questions", "sub_answers"):
            values = getattr(self, name)
            if not isinstance(values, list):
                raise EditRequestError(cid, name, f"must be a list of strings, got {type(values).__name__}")
            for i, value in enumerate(values):
                if not _nonempty_str(value):
                    raise EditRequestError(cid, name, f"item {i} is missing or empty, got {value!r}")
        if len(self.sub_questions) != len(self.sub_answers):
            raise EditRequestError(
                cid, "sub_answers",
                f"{len(self.sub_answers)} sub-answers for {len(self.sub_questions)} sub-questions; need one each",
            )
        self._check_op()
        if self.source not in UNSTRUCTURED_SOURCES:
            raise EditRequestError(cid, "source", f"must be one of {UNSTRUCTURED_SOURCES}, got {self.source!r}")
        if self.category is not None and not _nonempty_str(self.category):
            raise EditRequestError(cid, "category", f"must be a non-empty string when given, got {self.category!r}")
        if self.original_answer is not None and self.original_answer.strip() == self.answer.strip():
            raise EditRequestError(cid, "answer", "equals original_answer: nothing to edit")
        return self


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

# MUKE's fixed prompt strings (docs/algorithms.md §11) for reproducing its inputs exactly. The leading
# BOS of the Llama-3 string is left out: lit_edit adds a tokenizer's BOS once, up front, when it
# encodes (tokens.bos_ids); MUKE's inputs carry it twice (§12.1).
MUKE_TEMPLATES: dict[str, tuple[str, str]] = {  # name -> (prompt with "{q}", end-of-turn string)
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2.5": ("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
}

_MARK = "\u2063LITEDITMARK\u2063"  # a marker no chat template alters, to find what follows an answer


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # some versions may hand back a list for a single conversation
        text = text[0]
    return text


def _strip_bos(tokenizer, text: str) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    while bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def chat_prompt(question: str, tokenizer=None, *, template: str | None = None, system: str | None = None,
                strip_bos: bool = True) -> str:
    """The text a model is prompted with for ``question``.

    * ``template=None`` and a tokenizer with a chat template: the question as one user turn
      (after an optional ``system`` turn), rendered with the tokenizer's own template and the
      assistant generation prompt (``add_generation_prompt=True``). Note that some templates add
      text of their own: Qwen2.5-Instruct's inserts a default system turn when none is given, so
      it does not equal MUKE's string; use ``template="qwen2.5"`` to reproduce MUKE.
    * ``template="llama3"`` / ``"qwen2.5"``: MUKE's literal strings (:data:`MUKE_TEMPLATES`).
    * otherwise (no chat template, e.g. the fact world's model): ``question`` unchanged.

    ``strip_bos`` drops a leading BOS string the template writes itself: lit_edit encodes with
    ``add_special_tokens=False`` and puts the tokenizer's BOS in front once, so keeping it would
    give the doubled BOS of the reference inputs (docs/algorithms.md §11 ⚠, §12.1).
    """
    if template is not None:
        if template not in MUKE_TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(MUKE_TEMPLATES)}")
        if system is not None:
            raise ValueError("MUKE's fixed templates have no system turn")
        return MUKE_TEMPLATES[template][0].format(q=question)
    if tokenizer is None or not has_chat_template(tokenizer):
        return question
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}
    ]
    text = _render(tokenizer, messages, generation_prompt=True)
    return _strip_bos(tokenizer, text) if strip_bos else text


def end_of_turn(tokenizer=None, *, template: str | None = None) -> str | None:
    """The string that closes an assistant turn, appended to edit targets (docs/algorithms.md §8, §11).

    MUKE appends ``<|eot_id|>`` (Llama-3-Instruct) or ``<|im_end|>`` (Qwen2.5-Instruct) to the
    answer, so that the edited model also learns to *stop* after it. Here it is read off the
    tokenizer's chat template: an assistant message is rendered and the special token that
    directly follows its content is taken (falling back to ``tokenizer.eos_token`` when the
    template writes none there). That gives ``<|eot_id|>`` for Llama-3 and ``<|im_end|>`` for
    Qwen2.5, the same strings as MUKE. ``None`` without a chat template (a base model: the answer
    is plain continuation text).
    """
    if template is not None:
        if template not in MUKE_TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(MUKE_TEMPLATES)}")
        return MUKE_TEMPLATES[template][1]
    if tokenizer is None or not has_chat_template(tokenizer):
        return None
    text = _render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}],
                   generation_prompt=False)
    after = text.split(_MARK, 1)[1] if _MARK in text else ""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        specials |= set(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        pass
    matches = [s for s in specials if s and after.startswith(s)]
    if matches:
        return max(matches, key=len)
    return getattr(tokenizer, "eos_token", None)


def edit_answer(answer: str, tokenizer=None, *, template: str | None = None) -> str:
    """The edit target text: ``answer`` followed by the end-of-turn string (:func:`end_of_turn`).

    Without a chat template (and no ``template``) the plain ``answer`` comes back unchanged.
    The reference answer that generations are *scored* against is always the plain ``answer``
    (the reference code strips the end-of-turn string before scoring, §9).
    """
    eot = end_of_turn(tokenizer, template=template)
    return answer + eot if eot else answer
