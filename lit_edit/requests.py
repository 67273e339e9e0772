"""One edit request, whatever benchmark it came from, and its validation.

Readers (``lit_edit.data``) turn CounterFact, ZsRE and the synthetic fact world into
:class:`EditRequest`; everything downstream (targets, solvers, metrics) reads only this type.
"""
from __future__ import annotations

from dataclasses import dataclass, field


OPERATIONS = ("insert", "replace", "remove")


class EditRequestError(ValueError):
    """A record that cannot be edited. Names the record (case id) and the offending field."""

    def __init__(self, case_id, field_name: str, message: str):
        self.case_id = case_id
        self.field = field_name
        super().__init__(f"edit record case_id={case_id!r}, field {field_name!r}: {message}")


@dataclass
class EditRequest:
    """A structured edit: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` holds exactly one ``{}`` for the subject. Evaluation prompts come with it:
    paraphrases (generalization), neighbourhood prompts (specificity; scored against
    ``target_true`` for CounterFact, or against ``neighborhood_targets`` for ZsRE, where each
    neighbourhood prompt has its own answer), attribute and generation prompts (fluency, not
    used by the core metrics).
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
    source: str = "counterfact"  # "counterfact" | "zsre" | "world": selects the metric family
    op: str = "insert"  # "insert" | "replace" (new value for an edited fact) | "remove" (forget an edited fact)

    @property
    def writes(self) -> bool:
        """Whether the request writes a value (insert, replace); a removal only drops an earlier edit."""
        return self.op != "remove"

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
        if self.op not in OPERATIONS:
            raise EditRequestError(cid, "op", f"must be one of {OPERATIONS}, got {self.op!r}")
        if self.writes and (not isinstance(self.target_new, str) or not self.target_new.strip()):
            raise EditRequestError(cid, "target_new", "missing or empty")
        if self.writes and self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditRequestError(cid, "target_new", f"equals target_true ({self.target_true!r}): nothing to edit")
        prefix = self.prompt.split("{}")[0]
        if prefix and not prefix.endswith(" "):
            # The fact-token rule (ALGORITHMS.md §1.3) needs the subject to start a new word.
            raise EditRequestError(cid, "prompt", f"text before '{{}}' must end with a space, got {prefix!r}")
        if self.neighborhood_targets is not None and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise EditRequestError(cid, "neighborhood_targets", "must have one target per neighbourhood prompt")
        return self
