"""Long-form (unstructured) edit records for the synthetic fact world.

For a world subject, a short biography paragraph is written from its facts (each fact as one
sentence, with a template drawn from the relation's prompt templates, plus sentences about the
objects and neutral filler), and a counterfactual version of the same paragraph in which some of
the subject's facts are replaced by other objects of the same relation. The counterfactual text
is the edit target; the original is kept as ``original_answer``. Paragraphs have 2-8 sentences
(by default), so the records vary in length.

Everything is a pure function of the world (its spec and seed) and the subject: the generator
reads :func:`lit_edit.world.build_world` only, never the trained model or its cache, and does not
add to the world's training corpus (the world's model and its cache key are unchanged). Phrasings
the model has never seen (the questions, some filler) are therefore new text to it.

Records use the UnKEBench field names (``id``, ``question``, ``para_question``, ``answer``,
``sub_question``, ``sub_answer``) plus ``subject``, ``original_answer`` and ``rewrites``, so they
can be written to JSON and read back with the ``world_long`` reader.
"""
from __future__ import annotations

from lit_edit.world import NEUTRAL_FILLER, World, build_world
from lit_edit.world.generator import _rng

QUESTION = "Tell me about {}."
PARAPHRASES = (
    "What do you know about {}?",
    "Who is {}?",
    "Describe {} in a few sentences.",
    "Give a short biography of {}.",
)
MIN_SENTENCES, MAX_SENTENCES = 2, 8


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fact_sentence(template: str, subject: str, obj: str) -> str:
    return f"{_cap(template.format(subject))} {obj}."


def long_record(world: World, subject: str, case_id: int | str = 0, *, min_sentences: int = MIN_SENTENCES,
                max_sentences: int = MAX_SENTENCES, tokenizer=None, max_tokens: int | None = None) -> dict:
    """The long-form record of one subject (see the module docstring); deterministic.

    The paragraph has ``n`` sentences, ``n`` uniform in ``min_sentences..max_sentences``: ``k``
    fact sentences (about half of them or more, at most one per relation), the first of which
    opens the paragraph, and ``n - k`` filler sentences (about one of the paragraph's objects, or
    neutral). Between 1 and 3 of the ``k`` facts are rewritten to another object of the relation;
    a filler sentence about a rewritten object follows the rewrite. ``sub_question`` holds the
    canonical cloze prompt of every fact in the paragraph, ``sub_answer`` its object in the
    rewritten text; ``rewrites`` the rewritten facts.

    With a ``tokenizer`` and ``max_tokens`` (the model's context), sentences are dropped from the
    end until the record fits: BOS + the longer of question and paraphrase + the longer of the two
    paragraphs, minus one (the last answer token is never an input), at most ``max_tokens``.
    Filler goes first, then unchanged facts, then rewritten facts, keeping at least one rewritten
    fact; so a fitted paragraph may have fewer than ``min_sentences`` sentences. ``ValueError`` if
    even that does not fit.
    """
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(f"need 1 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}")
    if subject not in world.subjects:
        raise KeyError(f"{subject!r} is not a subject of this world")
    rng = _rng(world.spec.seed, f"long:{subject}")
    n = rng.randint(min_sentences, max_sentences)
    k = min(len(world.relations), max(1, n - rng.randint(0, n // 2)))
    relations = rng.sample(world.relations, k)
    rewritten = {r.relation_id for r in rng.sample(relations, rng.randint(1, min(k, 3)))}

    # facts[i] = (relation, template, true object, new object); slots are rendered twice
    facts = []
    for r in relations:
        true = world.facts[(subject, r.relation_id)]
        new = rng.choice([o for o in r.objects if o != true]) if r.relation_id in rewritten else true
        facts.append((r, rng.choice(r.templates), true, new))
    slots: list[tuple] = [("fact", i) for i in range(k)]
    for _ in range(n - k):
        i = rng.randrange(k)
        r = facts[i][0]
        if r.filler and rng.random() < 0.6:
            slots.append(("object", i, rng.choice(r.filler)))
        else:
            slots.append(("neutral", rng.choice(NEUTRAL_FILLER)))
    body = slots[1:]
    rng.shuffle(body)
    slots = slots[:1] + body
    question = QUESTION.format(subject)
    para_question = rng.choice(PARAPHRASES).format(subject)

    def render(slots: list[tuple], which: int) -> str:  # which: 2 = true object, 3 = new object
        out = []
        for slot in slots:
            if slot[0] == "fact":
                template = facts[slot[1]][1]
                out.append(_fact_sentence(template, subject, facts[slot[1]][which]))
            elif slot[0] == "object":
                o = facts[slot[1]][which]
                out.append(slot[2].format(o=o, O=_cap(o)))
            else:
                out.append(slot[1])
        return " ".join(out)

    if tokenizer is not None and max_tokens is not None:
        slots = _fit(slots, facts, rewritten, render, question, para_question, tokenizer, max_tokens, subject)
    present = [facts[slot[1]] for slot in slots if slot[0] == "fact"]
    return {
        "id": case_id,
        "question": question,
        "para_question": para_question,
        "answer": render(slots, 3),
        "sub_question": [r.canonical.format(subject) for r, _, _, _ in present],
        "sub_answer": [new for _, _, _, new in present],
        "subject": subject,
        "original_answer": render(slots, 2),
        "rewrites": [
            {"relation_id": r.relation_id, "prompt": r.canonical, "target_true": true, "target_new": new}
            for r, _, true, new in present
            if r.relation_id in rewritten
        ],
        "n_sentences": len(slots),
    }


def _fit(slots, facts, rewritten, render, question, para_question, tokenizer, max_tokens, subject):
    """Drop sentences (filler, then unchanged facts, then rewritten ones but the last) until it fits."""
    from lit_edit.tokens import bos_ids

    def n_tokens(text: str) -> int:  # verbose=False: no "longer than the maximum" warning while fitting
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    n_prompt = len(bos_ids(tokenizer)) + max(n_tokens(q) for q in (question, para_question))

    def fits(s):
        return n_prompt + max(n_tokens(render(s, w)) for w in (2, 3)) - 1 <= max_tokens

    def rank(slot):  # lower goes first
        if slot[0] != "fact":
            return 0
        return 2 if facts[slot[1]][0].relation_id in rewritten else 1

    slots = list(slots)
    while not fits(slots):
        n_rewritten = sum(1 for s in slots if rank(s) == 2)
        candidates = [j for j, s in enumerate(slots) if rank(s) < 2 or n_rewritten > 1]
        if len(slots) == 1 or not candidates:
            raise ValueError(f"the long-form record of {subject!r} does not fit {max_tokens} tokens even with "
                             "one sentence")
        low = min(rank(slots[j]) for j in candidates)
        del slots[max(j for j in candidates if rank(slots[j]) == low)]
    return slots


def long_records(world: World | str = "default", *, min_sentences: int = MIN_SENTENCES,
                 max_sentences: int = MAX_SENTENCES, tokenizer=None, max_tokens: int | None = None) -> list[dict]:
    """One long-form record per subject, in the world's subject order, ``id`` = index.

    ``world``: a :class:`~lit_edit.world.World`, or a preset / ``"world"`` / ``"world:<preset>"``
    name (built from the spec only: nothing is trained or cached). ``tokenizer`` and
    ``max_tokens``: fit every record into the model's context (see :func:`long_record`).
    """
    if isinstance(world, str):
        world = build_world(world)
    return [
        long_record(world, s, i, min_sentences=min_sentences, max_sentences=max_sentences, tokenizer=tokenizer,
                    max_tokens=max_tokens)
        for i, s in enumerate(world.subjects)
    ]


def world_tokenizer(name: str, cache_dir=None):
    """The tokenizer of the world ``name`` (a preset or ``"world[:<preset>]"``), without training a model.

    The cached world's tokenizer when that world has been built; otherwise the same tokenizer
    trained afresh (tokenizer training is deterministic and takes seconds), with nothing written
    to the cache.
    """
    from lit_edit.world import PRESETS, resolve_world_name, train_tokenizer, world_dir
    from lit_edit.world.cache import _complete

    preset = resolve_world_name(name)
    path = world_dir(preset, cache_dir)
    if _complete(path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path / "model")
    spec = PRESETS[preset]
    return train_tokenizer(build_world(spec).tokenizer_texts(), spec.vocab_size, model_max_length=spec.n_positions)


def world_long_records(name: str = "world", *, fit_context: bool = True, cache_dir=None,
                       min_sentences: int = MIN_SENTENCES, max_sentences: int = MAX_SENTENCES) -> list[dict]:
    """The long-form records of a named world; with ``fit_context`` each fits the world model's context.

    The context is the spec's ``n_positions`` (64 tokens for the presets, so the longest
    paragraphs lose a few sentences) and lengths are counted with :func:`world_tokenizer`.
    """
    from lit_edit.world import PRESETS, resolve_world_name

    spec = PRESETS[resolve_world_name(name)]
    tokenizer = world_tokenizer(name, cache_dir) if fit_context else None
    return long_records(build_world(spec), min_sentences=min_sentences, max_sentences=max_sentences,
                        tokenizer=tokenizer, max_tokens=spec.n_positions if fit_context else None)
