"""The fact world's consistency references, in ROME's file formats (docs/metrics.md, consistency).

ROME compares generations with Wikipedia snippets about subjects that have the new object. The world's
counterpart: per (relation, object), the "biography" of every world subject with that object for that relation
(one canonical sentence per relation, e.g. "Ada Berk lives in the city of Paris. Ada Berk works as a baker. ...",
under the world's true facts), and a TF-IDF vocabulary and IDF fitted on all subjects' biographies, one
document each (ROME's own recipe for its files, :meth:`lit_edit.cf_metrics.Tfidf.fit`).

The files are a pure function of the world spec. :func:`ensure_references` writes them once into the world's
cache directory, in ``consistency/`` beside ``counterfact.json``, atomically; the world's cached model, records
and :data:`~lit_edit.world.spec.WORLD_FORMAT_VERSION` are untouched.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from lit_edit.cf_metrics import IDF_FILE, SNIPPETS_FILE, VOCAB_FILE, Tfidf
from lit_edit.world.generator import World

REFERENCE_DIR = "consistency"


def biography(world: World, subject: str) -> str:
    """One canonical sentence per relation about ``subject``, with its true objects."""
    return " ".join(f"{r.canonical.format(subject)} {world.facts[(subject, r.relation_id)]}." for r in world.relations)


def reference_snippets(world: World) -> list[dict]:
    """``attribute_snippets.json`` entries: for every relation and object, the biographies of the subjects
    that have it (``name``: the subject)."""
    bios = {s: biography(world, s) for s in world.subjects}
    return [{"relation_id": r.relation_id, "target_id": world.object_ids[(r.relation_id, o)],
             "samples": [{"name": s, "text": bios[s]} for s in world.subjects_with(r.relation_id, o)]}
            for r in world.relations for o in r.objects]


def write_references(world: World, directory: pathlib.Path) -> pathlib.Path:
    """Write ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` of ``world`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SNIPPETS_FILE).write_text(json.dumps(reference_snippets(world), indent=1), encoding="utf-8")
    Tfidf.fit([biography(world, s) for s in world.subjects]).save(directory)
    return directory


def ensure_references(world_path: str | os.PathLike) -> pathlib.Path:
    """The consistency reference directory of the cached world at ``world_path``, written on first use (in a
    temporary sibling renamed into place, so concurrent callers never see a partial directory)."""
    from lit_edit.world.cache import load_world

    final = pathlib.Path(world_path) / REFERENCE_DIR
    complete = lambda: all((final / f).is_file() for f in (SNIPPETS_FILE, IDF_FILE, VOCAB_FILE))  # noqa: E731
    if complete():
        return final
    shutil.rmtree(final, ignore_errors=True)  # an incomplete one (never left by this function)
    tmp = final.parent / f".tmp-{REFERENCE_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_references(load_world(world_path), tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process put it in place first (a non-empty directory is not replaced)
            if not complete():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_reference_dir(path_or_spec: str) -> pathlib.Path:
    """A directory with ROME's three files, or a world spec (``world``, ``world:tiny``): that world's own."""
    from lit_edit.data import is_world_spec

    if not is_world_spec(path_or_spec):
        return pathlib.Path(path_or_spec).expanduser()
    from lit_edit.world import ensure_world, resolve_world_name

    return ensure_references(ensure_world(resolve_world_name(path_or_spec), verbose=False))
