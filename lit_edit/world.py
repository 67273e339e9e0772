"""The synthetic "fact world": the package's built-in default model and benchmark.

A deterministic, seeded generator of a small knowledge world (made-up people, six relations,
one object per person and relation), a byte-level BPE tokenizer trained on its text and a
small GPT-2 trained on it with Lightning until it knows the facts. Everything is cached on
disk (keyed by a hash of the :class:`WorldSpec`) and reused, so a first run of the package
needs no hub access at all::

    path = ensure_world("tiny")          # trains once (~30 s on 2 cores), then reuses
    model = AutoModelForCausalLM.from_pretrained(path / "model")
    tok = AutoTokenizer.from_pretrained(path / "model")
    records = json.loads((path / "counterfact.json").read_text())

Templates
---------
Every relation has a canonical prompt template (used as ``requested_rewrite.prompt``), two
paraphrase templates trained for every subject, and four "held-out" paraphrase templates.
Each held-out template is trained for (about) half of the subjects and never for the other
half: per relation, every subject trains exactly two of the four, chosen so that each
template is trained for the same number of subjects. A subject's CounterFact
``paraphrase_prompts`` are its two held-out templates that it did *not* train on, so
paraphrase accuracy measures generalization of a known fact to a known phrasing, never
memorisation.

Subjects, edits and the background
----------------------------------
A subject is "First Last": the first name is unique, the last name one of ``n_surnames`` shared
family names (or unique when ``n_surnames=0``). With two unique words the 4-block model keys
some relations on the first name and others on the last (measured on the format-2 world:
"plays the" followed the last name in 48 of 56 first/last-name swaps, the other five relations
the first name in 51-56), so no single fact token carries every fact and one relation resisted
every edit; with shared family names (default preset) five relations follow the first name in 65-73
of ~70 swaps and favourite colour in 27 (in 42 the model predicts neither subject's colour).

The last ``n_background`` subjects are never edited, like the bulk of a real model's entities:
``neighborhood_prompts`` are canonical prompts of background subjects with the same relation
and the same true object (up to ``n_neighbors``, no fill-up, so ``target_true`` is always
their answer), ``attribute_prompts`` those of background subjects whose object is
``target_new``, and the statistics corpus (:meth:`World.corpus_texts`) is the background's
sentences plus the filler, so that no edited subject is a sizeable share of C0. Without a
background (``n_background=0``, the ``tiny`` preset) neighbours are other subjects, filled up
with subjects of other objects when too few share the true object, and the corpus is all text.
:meth:`World.neighborhood_truth` gives the true object of every neighbourhood prompt.

Training
--------
Training sequences pack 1..``pack_max`` randomly chosen sentences (joined by a space, ended
by ``<|endoftext|>``), re-drawn every epoch, so facts are learned both at the start of a
sequence (how CounterFact prompts are evaluated) and after unrelated preceding text (how
MEMIT-style context templates present them).
"""
from __future__ import annotations

import os

# OpenMP's default busy-waiting can make CPU training ~20x slower on a loaded 2-core machine.
# Only effective if this module is the first to load torch; set it in the environment otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import math
import pathlib
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

WORLD_FORMAT_VERSION = 4  # bump when generated content or training changes for an unchanged spec (4: fixed threads)
EOS = "<|endoftext|>"

__all__ = [
    "WorldSpec",
    "PRESETS",
    "Relation",
    "World",
    "RELATIONS",
    "build_world",
    "train_tokenizer",
    "ensure_world",
    "resolve_world_name",
    "world_dir",
    "load_world",
    "spec_hash",
    "top1_accuracy",
    "cache_root",
]


# ----------------------------------------------------------------------------------------------
# Spec and presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the world, the tokenizer and the trained model.

    Its hash (see :func:`spec_hash`) is the cache key.
    """

    # world
    n_subjects: int = 200
    n_relations: int = 6
    n_objects: int = 15  # per relation (capped by the relation's vocabulary)
    seed: int = 0
    n_neighbors: int = 10
    n_attribute: int = 10
    # subjects that are never edited: neighbourhood/attribute prompts and the statistics corpus come from them
    n_background: int = 0
    n_surnames: int = 0  # 0: every last name unique; k: last names drawn from k shared family names
    # tokenizer
    vocab_size: int = 2000
    # model
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 64
    # training
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 64
    warmup_frac: float = 0.06
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    pack_max: int = 2  # sentences per training sequence: uniform in 1..pack_max

    def __post_init__(self):
        if self.n_subjects < 12:
            raise ValueError(f"n_subjects must be >= 12, got {self.n_subjects}")
        if not 0 <= self.n_background <= self.n_subjects - 2:
            raise ValueError(f"n_background must be in 0..n_subjects-2, got {self.n_background}")
        if self.n_surnames < 0:
            raise ValueError(f"n_surnames must be >= 0, got {self.n_surnames}")
        if not 1 <= self.n_relations <= len(RELATIONS):
            raise ValueError(f"n_relations must be in 1..{len(RELATIONS)}, got {self.n_relations}")
        if self.n_objects < 3:
            raise ValueError(f"n_objects must be >= 3, got {self.n_objects}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pack_max < 1:
            raise ValueError("pack_max must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})




def spec_hash(spec: WorldSpec, length: int = 10) -> str:
    """Short stable hash of the spec (and of :data:`WORLD_FORMAT_VERSION`)."""
    payload = json.dumps({"format": WORLD_FORMAT_VERSION, "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def resolve_world_name(s: str) -> str:
    """``"world"`` -> ``"default"``; ``"world:tiny"`` -> ``"tiny"``; a bare preset name passes.

    Raises ``ValueError`` for anything else.
    """
    name = s.strip()
    if name == "world":
        name = "default"
    elif name.startswith("world:"):
        name = name[len("world:"):].strip() or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown fact world {s!r}; expected 'world' or 'world:<preset>' with preset in {sorted(PRESETS)}")
    return name


def _resolve_spec(spec_or_name: "WorldSpec | str") -> tuple[str, WorldSpec]:
    if isinstance(spec_or_name, WorldSpec):
        for name, preset in PRESETS.items():
            if preset == spec_or_name:
                return name, spec_or_name
        return "custom", spec_or_name
    name = resolve_world_name(spec_or_name)
    return name, PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Relations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """One relation: its templates and object vocabulary.

    Every template holds exactly one ``{}`` (the subject) and ends right before the object;
    text before ``{}`` ends with a space.
    """

    relation_id: str
    name: str
    canonical: str
    always: tuple[str, ...]  # paraphrases trained for every subject
    heldout: tuple[str, ...]  # paraphrases trained for half of the subjects
    objects: tuple[str, ...]  # the relation's object vocabulary (single words)
    filler: tuple[str, ...] = ()  # subject-free sentences about an object, "{o}"/"{O}" slots

    @property
    def templates(self) -> tuple[str, ...]:
        return (self.canonical,) + self.always + self.heldout


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P551",
        "lives in city",
        "{} lives in the city of",
        ("{} is a resident of the city of", "The home of {} is the city of"),
        ("{} has a house in the city of", "The city where {} lives is", "{} resides in",
         "Every day, {} walks through the streets of"),
        ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Warsaw",
         "Oslo", "Athens", "Cairo", "Tokyo", "Lima", "Boston", "Chicago", "Sydney", "Toronto", "Seoul"),
        ("{O} is a large city.", "Many people visit {o} every year."),
    ),
    Relation(
        "P106",
        "works as",
        "{} works as a",
        ("The profession of {} is", "By profession, {} is a"),
        ("{} earns a living as a", "{} is employed as a", "The job of {} is", "Everyone knows that {} is a"),
        ("doctor", "lawyer", "teacher", "farmer", "baker", "pilot", "nurse", "painter", "writer", "chef",
         "dentist", "plumber", "banker", "sailor", "tailor", "carpenter", "poet", "singer", "judge", "butcher"),
        ("A {o} works hard every day.", "Being a {o} is a real job."),
    ),
    Relation(
        "P1412",
        "speaks language",
        "The native language of {} is",
        ("{} speaks", "The mother tongue of {} is"),
        ("{} grew up speaking", "{} writes letters in", "At home, {} talks in", "The first language of {} is"),
        ("French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish", "Finnish", "Turkish",
         "Russian", "Arabic", "Hindi", "Japanese", "Korean", "Danish", "Czech", "Hungarian", "Portuguese", "Welsh"),
        ("{O} is a language spoken by many people.", "Some books are written in {o}."),
    ),
    Relation(
        "P1303",
        "plays instrument",
        "{} plays the",
        ("The instrument played by {} is the", "{} is a musician who plays the"),
        ("{} practises every evening on the", "The favourite instrument of {} is the", "In the band, {} plays the",
         "{} performs on the"),
        ("piano", "guitar", "violin", "cello", "drums", "flute", "trumpet", "harp", "banjo", "clarinet",
         "saxophone", "organ", "accordion", "oboe", "tuba", "ukulele", "trombone", "mandolin", "bagpipes",
         "xylophone"),
        ("The {o} is a musical instrument.", "Learning the {o} takes years."),
    ),
    Relation(
        "P27",
        "born in country",
        "{} was born in",
        ("The birthplace of {} is", "{} was born and raised in"),
        ("{} is originally from", "The country where {} was born is", "{} comes from", "The homeland of {} is"),
        ("France", "Germany", "Spain", "Italy", "Norway", "Sweden", "Poland", "Greece", "Egypt", "Brazil",
         "Chile", "Peru", "Canada", "Mexico", "India", "Kenya", "Ireland", "Portugal", "Austria", "Morocco"),
        ("{O} is a country.", "Travellers like to visit {o}."),
    ),
    Relation(
        "P462",
        "favourite colour",
        "The favourite colour of {} is",
        ("{} likes the colour", "{} loves everything that is"),
        ("The colour {} likes best is", "{} always wears", "{} painted the house", "Asked about colours, {} picks"),
        ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
         "grey", "silver", "gold", "violet", "teal", "crimson", "indigo", "beige", "maroon", "turquoise"),
        ("{O} is a colour.", "The flag has a stripe of {o}."),
    ),
)

PRESETS: dict[str, WorldSpec] = {
    # 300 subjects (200 edited, 100 background) x 6 relations, 4 blocks x 256 wide (~3.7 M parameters);
    # ~4 min on 2 CPU cores.
    "default": WorldSpec(n_subjects=300, n_background=100, n_surnames=24, n_objects=10, epochs=11),
    # For long sequential runs (OTE-SE's 1000 edits): 1100 subjects (1000 edited, 100 background), same model.
    "large": WorldSpec(n_subjects=1100, n_background=100, n_surnames=24, n_objects=10, epochs=8),
    # For tests: 48 subjects x 6 relations, 4 blocks x 128 wide (~0.9 M parameters); ~35 s on 2 CPU cores.
    "tiny": WorldSpec(
        n_subjects=48, n_objects=8, vocab_size=1000, n_layer=4, n_embd=128, n_head=4, epochs=12, lr=3e-3,
        batch_size=24,
    ),
}

N_PARAPHRASES = 2  # held-out templates per (subject, relation) that stay untrained -> paraphrase prompts

GENERATION_TEMPLATES = ("{} is known for", "{} is", "People who know {} say that")

NEUTRAL_FILLER = (
    "The weather was mild that day.",
    "The train left the station on time.",
    "A small dog slept under the table.",
    "The market opens early in the morning.",
    "The river flows slowly through the valley.",
    "Many people read the news every day.",
    "The museum was closed for repairs.",
    "The children played in the garden.",
    "The library has thousands of books.",
    "A cold wind blew across the hills.",
    "The shop sells bread and cheese.",
    "The meeting lasted for two hours.",
    "The old bridge was built of stone.",
    "The concert started after sunset.",
    "The letter arrived a week later.",
    "Everyone enjoyed the long summer.",
)

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st",
           "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("n", "r", "l", "s", "m", "nd", "rn", "th", "x", "sk")
_ENDINGS = ("by", "ton", "son", "ard", "wick", "mere", "dale", "ley", "row", "stein", "berg", "ford", "ham", "ish")


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


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """Train a GPT-2-style byte-level BPE (leading-space tokens) on ``texts``; it adds a BOS.

    ``add_prefix_space=True``: a text is tokenised as if a space preceded it, so a word has ONE
    token form whether it starts a sequence or not. (Without it, a subject at the start of a prompt
    — "{} was born in" — is split into word-internal pieces whose first one is shared by many
    subjects, unlike the same subject mid-sentence; the model then learns the facts ~3x slower and
    keys them on varying positions.)
    Returns a ``transformers.PreTrainedTokenizerFast`` whose bos/eos/pad/unk token is
    ``<|endoftext|>`` (id 0), padding on the right, prepending it as BOS when encoding with special tokens.
    The vocabulary may come out smaller than ``vocab_size`` if the text supports no more merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # every text starts with <|endoftext|> as BOS (GPT-2 separates documents with it): the first real
    # token then never sits at position 0, the attention sink. With subjects at position 0
    # ("{} was born in") the tiny world reached 0.22 canonical top-1 instead of 0.99.
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, eos_id)])
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        padding_side="right",
        **kwargs,
    )


def check_tokenizer(world: World, tokenizer) -> None:
    """Raise ``ValueError`` if objects of a relation share a first token."""
    for r in world.relations:
        firsts: dict[int, str] = {}
        for o in r.objects:
            t = tokenizer(" " + o, add_special_tokens=False).input_ids[0]
            if t in firsts:
                raise ValueError(
                    f"objects {firsts[t]!r} and {o!r} of {r.relation_id} share their first token; "
                    "increase vocab_size"
                )
            firsts[t] = o


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def top1_predictions(model, tokenizer, prompts: Sequence[str], batch_size: int = 256) -> list[int]:
    """Argmax next-token id after each prompt (right padding; BOS added as in training)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[int] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        out.extend(logits[torch.arange(len(chunk), device=device), last].argmax(-1).tolist())
    model.train(was_training)
    return out


def top1_accuracy(model, tokenizer, items: Sequence[tuple[str, str]], batch_size: int = 256) -> float:
    """Share of (prompt, object) items whose argmax next token is the first token of ``" " + object``."""
    if not items:
        return float("nan")
    preds = top1_predictions(model, tokenizer, [p for p, _ in items], batch_size)
    want = [tokenizer(" " + o, add_special_tokens=False).input_ids[0] for _, o in items]
    return sum(int(a == b) for a, b in zip(preds, want)) / len(items)


def evaluate_world(model, tokenizer, world: World) -> dict:
    return {
        "canonical_top1": top1_accuracy(model, tokenizer, world.canonical_prompts()),
        "heldout_paraphrase_top1": top1_accuracy(model, tokenizer, world.heldout_prompts()),
        "trained_paraphrase_top1": top1_accuracy(model, tokenizer, world.trained_paraphrase_prompts()),
    }


# ----------------------------------------------------------------------------------------------
# Model training
# ----------------------------------------------------------------------------------------------


def make_model(spec: WorldSpec, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def _pack_epochs(world: World, tokenizer, spec: WorldSpec) -> list[list[list[int]]]:
    """Token-id sequences for every epoch: seeded random packs of 1..pack_max sentences + eos."""
    texts = world.training_texts()
    # add_prefix_space: a sentence has the same ids anywhere in a pack; the first one gets the BOS in front
    inner = tokenizer(texts, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    limit = spec.n_positions
    epochs = []
    for e in range(spec.epochs):
        rng = _rng(spec.seed, f"pack:{e}")
        order = list(range(len(texts)))
        rng.shuffle(order)
        seqs: list[list[int]] = []
        i = 0
        while i < len(order):
            k = rng.randint(1, spec.pack_max)
            seq = [tokenizer.bos_token_id] + inner[order[i]]
            i += 1
            for _ in range(k - 1):
                if i >= len(order) or len(seq) + len(inner[order[i]]) + 1 > limit:
                    break
                seq += inner[order[i]]
                i += 1
            seqs.append((seq + [eos])[:limit])
        epochs.append(seqs)
    return epochs


def _collate(batch: list[list[int]], pad_id: int) -> dict:
    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # pad == eos: mask by position, not by id
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lightning_module(model, spec: WorldSpec, epochs: list[list[list[int]]], pad_id: int):
    import lightning as L
    from torch.utils.data import DataLoader

    steps = sum(math.ceil(len(e) / spec.batch_size) for e in epochs)

    class WorldLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def train_dataloader(self):
            e = min(self.current_epoch, len(epochs) - 1)
            g = torch.Generator().manual_seed(spec.seed * 1000 + e)
            return DataLoader(
                epochs[e], batch_size=spec.batch_size, shuffle=True, generator=g,
                collate_fn=lambda b: _collate(b, pad_id), num_workers=0,
            )

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.model.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=spec.lr, betas=(0.9, 0.98),
            )
            warm = max(1, int(spec.warmup_frac * steps))

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                t = min(1.0, (step - warm) / max(1, steps - warm))
                return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return WorldLM()


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_threads() -> int:
    """Threads for training a world: ``$LIT_EDIT_WORLD_THREADS``, default 1, never the number of cores.

    A fixed count makes the build reproducible: CPU reductions split across threads round differently, so the same
    seed trained with 1 and 2 threads gave weights differing by up to 0.03 (tiny preset), while equal counts gave
    bit-identical weights. One thread is also the fast choice on a loaded machine (the tiny world took over 15 min
    with one thread per core on a busy 2-core machine, 57 s with one). The count is recorded in report.json."""
    raw = os.environ.get("LIT_EDIT_WORLD_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"LIT_EDIT_WORLD_THREADS must be a whole number >= 1, got {raw!r}")
    return n


def _train_model(world: World, tokenizer, verbose: bool = True):
    """Train a fresh GPT-2 on the world's text; returns (model, info dict)."""
    import lightning as L

    spec = world.spec
    L.seed_everything(spec.seed, verbose=False)
    model = make_model(spec, tokenizer)
    epochs = _pack_epochs(world, tokenizer, spec)
    module = _lightning_module(model, spec, epochs, tokenizer.pad_token_id)
    quiet = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    try:
        if not verbose:
            for lg in quiet:
                lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*reload_dataloaders_every_n_epochs.*")
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")  # lightning vs torch 2.13
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=spec.epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=verbose,
                enable_model_summary=False,
                gradient_clip_val=spec.grad_clip,
                reload_dataloaders_every_n_epochs=1,
                num_sanity_val_steps=0,
                default_root_dir=None,
            )
            t0 = time.perf_counter()
            trainer.fit(module)
            seconds = time.perf_counter() - t0
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    model.eval()
    tail = module.losses[-max(1, len(module.losses) // 20):]
    info = {
        "train_seconds": round(seconds, 2),
        "steps": len(module.losses),
        "final_loss": round(sum(tail) / len(tail), 5),
        "n_sequences_per_epoch": len(epochs[0]),
    }
    return model, info


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

REPORT_KEYS = ("train_seconds", "n_params", "canonical_top1", "heldout_paraphrase_top1", "n_facts", "spec")


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``$LIT_EDIT_CACHE``, else ``~/.cache/lit_edit``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("LIT_EDIT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/lit_edit").expanduser()


def world_dir(spec_or_name: WorldSpec | str = "default", cache_dir=None) -> pathlib.Path:
    """Where :func:`ensure_world` keeps this world (whether or not it exists yet)."""
    name, spec = _resolve_spec(spec_or_name)
    return cache_root(cache_dir) / "world" / f"{name}-{spec_hash(spec)}"


def _complete(path: pathlib.Path) -> bool:
    rep = path / "report.json"
    if not rep.is_file() or not (path / "model").is_dir() or not (path / "counterfact.json").is_file():
        return False
    try:
        report = json.loads(rep.read_text())
    except (OSError, ValueError):
        return False
    return all(k in report for k in REPORT_KEYS)


def load_world(path: str | os.PathLike) -> World:
    """Rebuild the :class:`World` of a cached world directory (from the spec in its report)."""
    report = json.loads((pathlib.Path(path) / "report.json").read_text())
    return build_world(WorldSpec.from_dict(report["spec"]))


def ensure_world(spec_or_name: WorldSpec | str = "default", cache_dir=None, verbose: bool = True) -> pathlib.Path:
    """Return the cached world directory for ``spec_or_name``, building it first if needed.

    ``spec_or_name``: a :class:`WorldSpec`, a preset name or ``"world"``/``"world:<preset>"``.
    The directory ``<cache>/world/<name>-<hash>/`` holds ``model/`` (GPT-2 + tokenizer,
    safetensors), ``counterfact.json``, ``corpus.txt`` (one text per line) and ``report.json``.
    A complete existing directory is reused without training. Building happens in a temporary
    sibling directory renamed into place at the end, under a file lock, so concurrent callers
    train once and an interrupted run leaves no partial cache.
    """
    name, spec = _resolve_spec(spec_or_name)
    final = world_dir(spec, cache_dir) if name == "custom" else world_dir(name, cache_dir)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(final):
                return final
            if final.exists():  # incomplete leftover from an older, non-atomic writer
                shutil.rmtree(final)
            tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                _build_into(tmp, name, spec, verbose)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' info messages and progress bars (saving/loading shards) if ``quiet``."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _write_text(path: pathlib.Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _build_into(tmp: pathlib.Path, name: str, spec: WorldSpec, verbose: bool) -> None:
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = print if verbose else (lambda *a, **k: None)
    tmp.mkdir(parents=True)
    t_all = time.perf_counter()
    world = build_world(spec)
    tokenizer = train_tokenizer(world.tokenizer_texts(), spec.vocab_size, model_max_length=spec.n_positions)
    check_tokenizer(world, tokenizer)
    records = world.counterfact_records()
    _write_text(tmp / "counterfact.json", json.dumps(records, indent=1, ensure_ascii=False))
    _write_text(tmp / "corpus.txt", "\n".join(world.corpus_texts()) + "\n")
    log(f"[lit_edit.world] training fact world {name!r} ({spec.n_subjects} subjects x {spec.n_relations} relations, "
        f"{spec.n_layer}L x {spec.n_embd}) ...")
    with _torch_threads(build_threads()), _quiet_transformers(not verbose):
        model, info = _train_model(world, tokenizer, verbose=verbose)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        # measure on what was saved, exactly as users will load it
        model = AutoModelForCausalLM.from_pretrained(tmp / "model")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        metrics = evaluate_world(model, tokenizer, world)
    report = {
        "name": name,
        "spec_hash": spec_hash(spec),
        "format_version": WORLD_FORMAT_VERSION,
        **info,
        "n_params": sum(p.numel() for p in model.parameters()),
        **{k: round(v, 5) for k, v in metrics.items()},
        "n_facts": world.n_facts,
        "n_subjects": len(world.subjects),
        "n_relations": len(world.relations),
        "n_records": len(records),
        "n_training_texts": len(world.training_texts()),
        "vocab_size": len(tokenizer),
        "torch_threads": build_threads(),
        "build_seconds": round(time.perf_counter() - t_all, 2),
        "created_unix": round(time.time(), 3),
        "versions": {p: md.version(p) for p in ("torch", "lightning", "transformers", "tokenizers")},
        "spec": spec.to_dict(),
    }
    _write_text(tmp / "report.json", json.dumps(report, indent=1))  # written last: marks completeness
    log(f"[lit_edit.world] trained in {info['train_seconds']:.1f}s: canonical top-1 {metrics['canonical_top1']:.3f}, "
        f"held-out paraphrase top-1 {metrics['heldout_paraphrase_top1']:.3f}")


if __name__ == "__main__":  # python -m lit_edit.world [preset]
    import sys

    p = ensure_world(sys.argv[1] if len(sys.argv) > 1 else "default")
    print(p)
    print((p / "report.json").read_text())
