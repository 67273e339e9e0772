"""The seeded generator: subjects, facts, prompts and the CounterFact-schema records of a :class:`World`."""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Sequence

from lit_edit.world.spec import (GENERATION_TEMPLATES, N_PARAPHRASES, NEUTRAL_FILLER, RELATIONS, Relation,
                                 WorldSpec, _CODAS, _ENDINGS, _ONSETS, _VOWELS, _resolve_spec)


def _rng(seed: int, tag: str) -> random.Random:
    # str seeds are hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED
    return random.Random(f"lit_edit.world:{seed}:{tag}")


def _make_names(n: int, seed: int, forbidden: set[str], n_surnames: int = 0) -> list[str]:
    """``n`` subjects "First Last": unique first names; last names unique (``n_surnames=0``) or drawn
    from ``n_surnames`` shared family names, so that only the first name identifies the subject.

    Measured on the tiny preset (12 epochs, canonical top-1): two unique words 0.99; one unique
    word 0.30; a shared first name + unique last name 0.29 (0.84 after 30 epochs). The 4-layer
    model learns facts of two-token subjects several times faster, so subjects keep two words.
    """
    rng = _rng(seed, "names")
    word = lambda parts: "".join(rng.choice(p) for p in parts).capitalize()  # noqa: E731
    first_parts = (_ONSETS, _VOWELS, _ONSETS, _VOWELS, _CODAS + ("",))
    last_parts = (_ONSETS, _VOWELS, _CODAS, _ENDINGS)
    family: list[str] = []
    while len(family) < n_surnames:
        last = word(last_parts)
        if last not in family and last.lower() not in forbidden:
            family.append(last)
    firsts: set[str] = set()
    lasts: set[str] = set(family)
    names: list[str] = []
    while len(names) < n:
        first = word(first_parts)
        last = family[len(names) % len(family)] if family else word(last_parts)
        if first in firsts or first.lower() in forbidden:
            continue
        if family:  # a shared family name; a first name never doubles as one
            if first in lasts:
                continue
        elif last in lasts or last.lower() in forbidden:
            continue
        lasts.add(last)
        firsts.add(first)
        names.append(f"{first} {last}")
    return names




@dataclass
class World:
    """A generated world. Build with :func:`build_world`; everything is a pure function of ``spec``."""

    spec: WorldSpec
    subjects: list[str]
    relations: list[Relation]  # objects restricted to the ``n_objects`` used in this world
    facts: dict[tuple[str, str], str]  # (subject, relation_id) -> object
    trained_heldout: dict[tuple[str, str], tuple[str, ...]]  # held-out templates trained for the pair
    untrained_heldout: dict[tuple[str, str], tuple[str, ...]]  # -> CounterFact paraphrase templates
    object_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (relation_id, object) -> "Q..."

    # -- lookups -------------------------------------------------------------------------------
    def relation(self, relation_id: str) -> Relation:
        for r in self.relations:
            if r.relation_id == relation_id:
                return r
        raise KeyError(relation_id)

    @property
    def relation_ids(self) -> list[str]:
        return [r.relation_id for r in self.relations]

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    def trained_templates(self, subject: str, relation_id: str) -> list[str]:
        """All templates the model trains on for this (subject, relation)."""
        r = self.relation(relation_id)
        return [r.canonical, *r.always, *self.trained_heldout[(subject, relation_id)]]

    @property
    def edit_subjects(self) -> list[str]:
        """Subjects the CounterFact records edit (all but the background)."""
        return self.subjects[: len(self.subjects) - self.spec.n_background]

    @property
    def background_subjects(self) -> list[str]:
        """Subjects never edited: the source of neighbourhood prompts and of the statistics corpus."""
        return self.subjects[len(self.subjects) - self.spec.n_background:]

    def subjects_with(self, relation_id: str, obj: str) -> list[str]:
        return [s for s in self.subjects if self.facts[(s, relation_id)] == obj]

    # -- texts ---------------------------------------------------------------------------------
    def fact_sentences(self, subjects: Sequence[str] | None = None) -> list[str]:
        """Every trained (subject, relation, template) sentence (of ``subjects``, default all), in a fixed order."""
        out = []
        for s in self.subjects if subjects is None else subjects:
            for r in self.relations:
                obj = self.facts[(s, r.relation_id)]
                for t in self.trained_templates(s, r.relation_id):
                    out.append(f"{t.format(s)} {obj}.")
        return out

    def filler_texts(self) -> list[str]:
        """Subject-free sentences: one or two per object, plus a few neutral ones."""
        out = []
        for r in self.relations:
            for o in r.objects:
                for f in r.filler:
                    out.append(f.format(o=o, O=o[:1].upper() + o[1:]))
        out.extend(NEUTRAL_FILLER)
        return out

    def training_texts(self) -> list[str]:
        """The model's training sentences: all fact sentences, then the filler."""
        return self.fact_sentences() + self.filler_texts()

    def corpus_texts(self) -> list[str]:
        """Text corpus for second-moment key statistics, in a seeded order.

        With a background (``n_background > 0``): the background subjects' sentences and the filler,
        so that, as for a real model's Wikipedia statistics, no edited subject is a sizeable part of
        C0 (else ``λC0`` and AlphaEdit's null space protect exactly the keys an edit must move).
        Without one: all training sentences."""
        if self.spec.n_background:
            texts = self.fact_sentences(self.background_subjects) + self.filler_texts()
        else:
            texts = self.training_texts()
        _rng(self.spec.seed, "corpus").shuffle(texts)
        return texts

    def tokenizer_texts(self) -> list[str]:
        """Everything the tokenizer should know: training text plus all evaluation prompts."""
        extra = []
        for s in self.subjects:
            extra.extend(t.format(s) for t in GENERATION_TEMPLATES)
            for r in self.relations:
                extra.extend(t.format(s) for t in self.untrained_heldout[(s, r.relation_id)])
        return self.training_texts() + extra

    # -- evaluation items ----------------------------------------------------------------------
    def canonical_prompts(self) -> list[tuple[str, str]]:
        """(filled canonical prompt, true object) for every fact."""
        return [
            (r.canonical.format(s), self.facts[(s, r.relation_id)]) for s in self.subjects for r in self.relations
        ]

    def heldout_prompts(self) -> list[tuple[str, str]]:
        """(filled prompt, true object) for every held-out template *not* trained for that subject."""
        return [
            (t.format(s), self.facts[(s, r.relation_id)])
            for s in self.subjects
            for r in self.relations
            for t in self.untrained_heldout[(s, r.relation_id)]
        ]

    def trained_paraphrase_prompts(self) -> list[tuple[str, str]]:
        """(filled prompt, true object) for every trained non-canonical template."""
        return [
            (t.format(s), self.facts[(s, r.relation_id)])
            for s in self.subjects
            for r in self.relations
            for t in self.trained_templates(s, r.relation_id)[1:]
        ]

    def neighborhood_truth(self, record: dict) -> list[str]:
        """True object of each of ``record["neighborhood_prompts"]`` (see module docstring)."""
        rid = record["requested_rewrite"]["relation_id"]
        r = self.relation(rid)
        by_prompt = {r.canonical.format(s): self.facts[(s, rid)] for s in self.subjects}
        return [by_prompt[p] for p in record["neighborhood_prompts"]]

    # -- CounterFact -----------------------------------------------------------------------------
    def counterfact_records(self) -> list[dict]:
        """One CounterFact-schema record per (subject, relation), in a seeded shuffled order."""
        spec = self.spec
        rng = _rng(spec.seed, "counterfact")
        records = []
        edited, background = self.edit_subjects, self.background_subjects
        for si, s in enumerate(edited):
            for ri, r in enumerate(self.relations):
                rid = r.relation_id
                true = self.facts[(s, rid)]
                new = rng.choice([o for o in r.objects if o != true])
                others = background or [x for x in self.subjects if x != s]
                same = [x for x in others if self.facts[(x, rid)] == true]
                neigh = rng.sample(same, min(spec.n_neighbors, len(same)))
                if len(neigh) < spec.n_neighbors and not spec.n_background:  # fill-up only without a background
                    pool = [x for x in others if self.facts[(x, rid)] not in (true, new)]
                    neigh += rng.sample(pool, min(spec.n_neighbors - len(neigh), len(pool)))
                attr = [x for x in others if self.facts[(x, rid)] == new]
                attr = rng.sample(attr, min(spec.n_attribute, len(attr)))
                records.append(
                    {
                        "case_id": -1,
                        "pararel_idx": si * len(self.relations) + ri,
                        "requested_rewrite": {
                            "prompt": r.canonical,
                            "relation_id": rid,
                            "target_new": {"str": new, "id": self.object_ids[(rid, new)]},
                            "target_true": {"str": true, "id": self.object_ids[(rid, true)]},
                            "subject": s,
                        },
                        "paraphrase_prompts": [t.format(s) for t in self.untrained_heldout[(s, rid)]],
                        "neighborhood_prompts": [r.canonical.format(x) for x in neigh],
                        "attribute_prompts": [r.canonical.format(x) for x in attr],
                        "generation_prompts": [t.format(s) for t in GENERATION_TEMPLATES],
                    }
                )
        # Order: R rounds; in each, every subject appears once (its relations dealt round-robin from a
        # seeded offset), shuffled within the round. So any prefix of up to n_subjects records edits
        # distinct subjects: two edits of one subject share their keys and would compete (§4).
        R = len(self.relations)
        offset = {si: rng.randrange(R) for si in range(len(edited))}
        ordered = []
        for rnd in range(R):
            batch = [records[si * R + (offset[si] + rnd) % R] for si in range(len(edited))]
            rng.shuffle(batch)
            ordered += batch
        for i, rec in enumerate(ordered):
            rec["case_id"] = i
        return ordered


def build_world(spec: WorldSpec | str = "default") -> World:
    """Generate the world for ``spec`` (a :class:`WorldSpec` or a preset/"world:..." name)."""
    if isinstance(spec, str):
        spec = _resolve_spec(spec)[1]
    relations: list[Relation] = []
    object_ids: dict[tuple[str, str], str] = {}
    for ri, base in enumerate(RELATIONS[: spec.n_relations]):
        rng = _rng(spec.seed, f"objects:{base.relation_id}")
        chosen = set(rng.sample(range(len(base.objects)), min(spec.n_objects, len(base.objects))))
        objs = tuple(o for i, o in enumerate(base.objects) if i in chosen)  # keep vocabulary order
        relations.append(dataclasses.replace(base, objects=objs))
        for oi, o in enumerate(base.objects):
            object_ids[(base.relation_id, o)] = f"Q{1000 + 100 * ri + oi}"

    forbidden = {w.strip(".,").lower() for r in RELATIONS for t in r.templates + r.filler + r.objects for w in t.split()}
    forbidden |= {w.strip(".,").lower() for t in NEUTRAL_FILLER + GENERATION_TEMPLATES for w in t.split()}
    subjects = _make_names(spec.n_subjects, spec.seed, forbidden, spec.n_surnames)

    facts: dict[tuple[str, str], str] = {}
    trained: dict[tuple[str, str], tuple[str, ...]] = {}
    untrained: dict[tuple[str, str], tuple[str, ...]] = {}
    for r in relations:
        rid = r.relation_id
        # balanced fact assignment: a seeded permutation of subjects, objects dealt round-robin
        rng = _rng(spec.seed, f"facts:{rid}")
        order = list(range(len(subjects)))
        rng.shuffle(order)
        objs = list(r.objects)
        rng.shuffle(objs)
        for k, si in enumerate(order):
            facts[(subjects[si], rid)] = objs[k % len(objs)]
        # balanced held-out split: every subject trains len(heldout) - N_PARAPHRASES held-out templates
        rng = _rng(spec.seed, f"heldout:{rid}")
        combos = list(itertools.combinations(range(len(r.heldout)), len(r.heldout) - N_PARAPHRASES))
        rng.shuffle(combos)
        order = list(range(len(subjects)))
        rng.shuffle(order)
        for k, si in enumerate(order):
            tr = set(combos[k % len(combos)])
            trained[(subjects[si], rid)] = tuple(t for i, t in enumerate(r.heldout) if i in tr)
            untrained[(subjects[si], rid)] = tuple(t for i, t in enumerate(r.heldout) if i not in tr)
    return World(spec, subjects, relations, facts, trained, untrained, object_ids)
