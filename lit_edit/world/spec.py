"""The world's specification: :class:`WorldSpec` (its hash is the cache key), presets, and the tables the
generator draws from (relations and their templates, name parts, filler text)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

WORLD_FORMAT_VERSION = 4  # bump when generated content or training changes for an unchanged spec (4: fixed threads)
EOS = "<|endoftext|>"





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
    # built in 476-479 s by one thread on an otherwise idle 2-core machine (`make demo` from a fresh clone, after
    # the 95 s `make setup`: 577 s in all).
    "default": WorldSpec(n_subjects=300, n_background=100, n_surnames=24, n_objects=10, epochs=11),
    # For long sequential runs (OTE-SE's 1000 edits): 1100 subjects (1000 edited, 100 background), same model.
    "large": WorldSpec(n_subjects=1100, n_background=100, n_surnames=24, n_objects=10, epochs=8),
    # Issue 19's deep world: the default world's facts (300 subjects: 200 edited, 100 never-edited background) in
    # 8 blocks x 192 wide (~3.9 M parameters), so that edits at blocks 1-2 are followed by 5 blocks (real models have
    # 20-40 after the edited layers; default has 2). Trained in 1115 s on one thread of the shared 2-core machine
    # (load 2.5-5; ~13 min of CPU time), top-1 0.999 (docs/results.md §9).
    "deep": WorldSpec(
        n_subjects=300, n_background=100, n_surnames=24, n_objects=10, n_layer=8, n_embd=192, n_head=4, epochs=12,
    ),
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
