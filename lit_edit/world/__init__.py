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
# Only effective if this package is the first to load torch; set it in the environment otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lit_edit.world.cache import REPORT_KEYS, cache_root, ensure_world, load_world, world_dir  # noqa: E402
from lit_edit.world.generator import World, build_world  # noqa: E402
from lit_edit.world.spec import (EOS, GENERATION_TEMPLATES, N_PARAPHRASES, NEUTRAL_FILLER, PRESETS,  # noqa: E402
                                 RELATIONS, WORLD_FORMAT_VERSION, Relation, WorldSpec, resolve_world_name,
                                 spec_hash)
from lit_edit.world.training import (build_threads, check_tokenizer, evaluate_world, make_model,  # noqa: E402
                                     top1_accuracy, top1_predictions, train_tokenizer)

__all__ = ["WorldSpec", "PRESETS", "Relation", "World", "RELATIONS", "build_world", "train_tokenizer", "ensure_world",
           "resolve_world_name", "world_dir", "load_world", "spec_hash", "top1_accuracy", "cache_root", "build_threads",
           "check_tokenizer", "evaluate_world", "make_model", "top1_predictions", "REPORT_KEYS", "EOS",
           "GENERATION_TEMPLATES", "N_PARAPHRASES", "NEUTRAL_FILLER", "WORLD_FORMAT_VERSION"]
