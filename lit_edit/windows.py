"""Windows and tokens of an unstructured edit (docs/algorithms.md §8.1): the question and answer tokenised apart,
the answer cut into windows, and each window's memory position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lit_edit.tokens import bos_ids, encode

if TYPE_CHECKING:  # the settings object windowed() reads (no import cycle at run time)
    from lit_edit.muke import WindowConfig

ON_MISMATCH = ("separate", "error")


def split_windows(T: int, W: int) -> list[tuple[int, int]]:
    """Windows ``(start, end)`` over T target tokens: starts 0, W, 2W, …, ``end = min(start + W, T)``; the last
    window may be short (§8.1; overlap 0). N = ⌈T / W⌉ windows."""
    for name, x in (("T", T), ("W", W)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"split_windows: {name} must be an integer >= 1, got {x!r}")
    return [(s, min(s + W, T)) for s in range(0, T, W)]


def memory_positions(Q: int, windows: list[tuple[int, int]]) -> list[int]:
    """Memory position of window w: ``Q − 1 + start_w``, the input token just before the window (the last
    question token for w = 0) in the input question ⧺ target (§8.1)."""
    return [Q - 1 + s for s, _ in windows]


def _check_windows(windows, T: int) -> None:
    if not windows or windows[0][0] != 0 or windows[-1][1] != T:
        raise ValueError(f"windows {list(windows)} must cover the {T} target tokens from 0")
    for (s, e), (s2, _) in zip(windows, list(windows[1:]) + [(T, None)]):
        if not s < e == s2:
            raise ValueError(f"windows {list(windows)} must be non-empty, contiguous and in order")


@dataclass(frozen=True)
class WindowedSequence:
    """One tokenised unstructured edit (a :class:`lit_edit.requests.UnstructuredRequest` after tokenisation):
    question ids Q (with the tokenizer's BOS), target ids T (the answer, no BOS) and its windows. Target token j
    is predicted at input position ``Q − 1 + j``."""

    question_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]
    joint_matches: bool = True  # does tokenising question + answer jointly give the same ids (§8.5 ⚠)?

    def __post_init__(self):
        if len(self.question_ids) < 1:
            raise ValueError("the question must have at least one token (the first memory is its last token)")
        if len(self.target_ids) < 1:
            raise ValueError("the answer must have at least one token")
        _check_windows(self.windows, len(self.target_ids))

    @property
    def Q(self) -> int:
        return len(self.question_ids)

    @property
    def T(self) -> int:
        return len(self.target_ids)

    @property
    def N(self) -> int:
        return len(self.windows)

    @property
    def input_ids(self) -> list[int]:
        """question ⧺ target minus its last token (length Q + T − 1): the teacher-forced model input."""
        return list(self.question_ids) + list(self.target_ids[:-1])

    @property
    def positions(self) -> list[int]:
        return memory_positions(self.Q, list(self.windows))


def tokenize_unstructured(tok, question: str, answer: str, window_size: int | None = None,
                          on_mismatch: str = "separate") -> WindowedSequence:
    """Tokenise an unstructured request (§8.1): question ids = BOS (if the tokenizer adds one) ⧺ question
    tokens; target ids = answer tokens without any added BOS (the reference tokenises with special tokens and
    drops the leading BOS, which is the same); windows of ``window_size`` tokens (None: one window, One-for-All).

    §8.5 ⚠: the reference reads keys from question + answer tokenised *jointly*; BPE merges across the
    boundary (or a tokenizer that prefixes a space) would shift every position. Here the model input is always
    the separate ids concatenated, so the positions are exact for any tokenizer. ``joint_matches`` records
    whether the joint tokenisation agrees; ``on_mismatch="error"`` raises instead when it does not.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    bos = bos_ids(tok)
    q = bos + encode(tok, question)
    t = encode(tok, answer)
    if not t:
        raise ValueError(f"the answer {answer!r} tokenises to no tokens")
    joint = bos + encode(tok, question + answer)
    matches = joint == q + t
    if not matches and on_mismatch == "error":
        i = next((k for k, (a, b) in enumerate(zip(joint, q + t)) if a != b), min(len(joint), len(q + t)))
        raise ValueError(
            f"question + answer tokenised jointly differs from the separate tokenisations at token {i} "
            f"(question has {len(q)} tokens): joint {joint[max(0, i - 2):i + 3]} vs separate "
            f"{(q + t)[max(0, i - 2):i + 3]}; memory positions would shift. Use on_mismatch='separate' to run "
            f"on the separately tokenised ids, or change the question/answer boundary (e.g. a leading space).")
    T = len(t)
    windows = split_windows(T, T if window_size is None else window_size)
    return WindowedSequence(tuple(q), tuple(t), tuple(windows), matches)


def windowed(tok, request, cfg: "WindowConfig") -> WindowedSequence:
    """An :class:`~lit_edit.requests.UnstructuredRequest` as the model sees it: the question in the chat template
    and the answer ended by the end-of-turn string when ``cfg.chat`` (plain text for a tokenizer without a
    template), cut into windows of ``cfg.window_size`` (one window for One-for-All)."""
    from lit_edit.requests import chat_prompt, edit_answer

    q = chat_prompt(request.question, tok, template=cfg.template) if cfg.chat else request.question
    a = edit_answer(request.answer, tok, template=cfg.template) if cfg.chat else request.answer
    W = None if cfg.method == "one_for_all" else cfg.window_size
    return tokenize_unstructured(tok, q, a, W, cfg.on_mismatch)
