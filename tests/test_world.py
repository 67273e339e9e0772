"""The synthetic fact world: generator, tokenizer, cache and the trained tiny model."""
import dataclasses
import json
import os
import pathlib

import pytest
import torch

from lit_edit import world as W
from lit_edit.world import cache as WC  # where ensure_world looks its builders up (monkeypatched here)
from lit_edit.requests import EditRequest
from lit_edit.world import (
    PRESETS,
    RELATIONS,
    WorldSpec,
    build_world,
    ensure_world,
    resolve_world_name,
    spec_hash,
    top1_accuracy,
    train_tokenizer,
)

RECORD_KEYS = {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
               "attribute_prompts", "generation_prompts"}
REWRITE_KEYS = {"prompt", "relation_id", "target_new", "target_true", "subject"}
# a world small enough to train in seconds: only for the cache mechanics, not for accuracy
MICRO = WorldSpec(n_subjects=12, n_objects=3, vocab_size=1000, n_layer=1, n_embd=32, n_head=2, epochs=1,
                  batch_size=32)


@pytest.fixture(scope="module")
def tiny():
    return build_world("tiny")


@pytest.fixture(scope="module")
def tiny_tok(tiny):
    return train_tokenizer(tiny.tokenizer_texts(), PRESETS["tiny"].vocab_size)


# -- names and specs ---------------------------------------------------------------------------


def test_resolve_world_name():
    assert resolve_world_name("world") == "default"
    assert resolve_world_name("world:default") == "default"
    assert resolve_world_name("world:tiny") == "tiny"
    assert resolve_world_name("tiny") == "tiny"
    for bad in ("world:huge", "counterfact", "worldx"):
        with pytest.raises(ValueError):
            resolve_world_name(bad)


def test_presets_have_enough_blocks_and_distinct_hashes():
    assert PRESETS["default"].n_layer >= 4 and PRESETS["tiny"].n_layer >= 4
    assert spec_hash(PRESETS["default"]) != spec_hash(PRESETS["tiny"])
    assert spec_hash(PRESETS["tiny"]) == spec_hash(dataclasses.replace(PRESETS["tiny"]))
    assert spec_hash(PRESETS["tiny"]) != spec_hash(dataclasses.replace(PRESETS["tiny"], seed=1))
    assert WorldSpec.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_EDIT_CACHE", str(tmp_path / "env"))
    assert W.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert W.cache_root() == tmp_path / "env"
    assert W.world_dir("world:tiny").parent == tmp_path / "env" / "world"
    assert W.world_dir("tiny").name == f"tiny-{spec_hash(PRESETS['tiny'])}"
    monkeypatch.delenv("LIT_EDIT_CACHE")
    assert W.cache_root() == pathlib.Path.home() / ".cache" / "lit_edit"


# -- the generated world -----------------------------------------------------------------------


def test_world_is_deterministic():
    a, b = build_world("tiny"), build_world(PRESETS["tiny"])
    assert a.subjects == b.subjects and a.facts == b.facts
    assert a.counterfact_records() == b.counterfact_records()
    assert a.training_texts() == b.training_texts() and a.corpus_texts() == b.corpus_texts()
    c = build_world(dataclasses.replace(PRESETS["tiny"], seed=1))
    assert c.subjects != a.subjects
    assert c.counterfact_records() != a.counterfact_records()
    assert c.training_texts() != a.training_texts()


def test_templates_are_well_formed():
    for r in RELATIONS:
        assert 5 <= len(r.templates) <= 8 and len(set(r.templates)) == len(r.templates)
        assert len(r.heldout) - W.N_PARAPHRASES >= 1
        for t in r.templates:
            assert t.count("{}") == 1 and t == t.strip()
            prefix = t.split("{}")[0]
            assert prefix == "" or prefix.endswith(" ")
        assert len(set(r.objects)) == len(r.objects) >= 10
        assert all(len(o.split()) == 1 for o in r.objects)
    assert len({r.relation_id for r in RELATIONS}) == len(RELATIONS) == 6


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_world_facts_and_heldout_split(name):
    w = build_world(name)
    spec = PRESETS[name]
    assert len(w.subjects) == len(set(w.subjects)) == spec.n_subjects
    assert all(len(s.split()) == 2 for s in w.subjects)
    firsts, lasts = [s.split()[0] for s in w.subjects], {s.split()[1] for s in w.subjects}
    assert len(set(firsts)) == len(firsts) and not set(firsts) & lasts  # the first name identifies the subject
    assert len(lasts) == (spec.n_surnames or spec.n_subjects)
    assert w.edit_subjects + w.background_subjects == w.subjects
    assert len(w.background_subjects) == spec.n_background
    assert len(w.facts) == w.n_facts == spec.n_subjects * spec.n_relations
    texts = set(w.training_texts())
    for r in w.relations:
        rid = r.relation_id
        assert len(r.objects) == spec.n_objects
        counts = [len(w.subjects_with(rid, o)) for o in r.objects]
        assert max(counts) - min(counts) <= 1  # balanced assignment
        for t in r.heldout:  # each held-out template is trained for half of the subjects
            n = sum(t in w.trained_heldout[(s, rid)] for s in w.subjects)
            assert abs(n - spec.n_subjects / 2) <= 1
        for s in w.subjects:
            obj = w.facts[(s, rid)]
            assert obj in r.objects
            for t in w.trained_templates(s, rid):
                assert f"{t.format(s)} {obj}." in texts
            for t in w.untrained_heldout[(s, rid)]:
                assert t not in w.trained_templates(s, rid)
                assert f"{t.format(s)} {obj}." not in texts


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_counterfact_records_schema(name):
    w = build_world(name)
    spec = PRESETS[name]
    records = w.counterfact_records()
    edited, background = w.edit_subjects, set(w.background_subjects)
    assert len(records) == len(edited) * spec.n_relations
    assert [r["case_id"] for r in records] == list(range(len(records)))
    assert len({(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in records}) == len(records)
    # rounds of len(edited) records, each editing every edit subject once: a prefix never repeats a subject
    S = len(edited)
    for rnd in range(len(records) // S):
        assert sorted(r["requested_rewrite"]["subject"] for r in records[rnd * S : (rnd + 1) * S]) == sorted(edited)
    assert [r["requested_rewrite"]["subject"] for r in records[:S]] != edited  # shuffled within a round
    canon_subject = {}
    for rel in w.relations:
        for s in w.subjects:
            canon_subject[rel.canonical.format(s)] = s
    for rec in records:
        assert set(rec) == RECORD_KEYS
        rw = rec["requested_rewrite"]
        assert set(rw) == REWRITE_KEYS
        assert isinstance(rec["case_id"], int) and isinstance(rec["pararel_idx"], int)
        for k in ("target_new", "target_true"):
            assert set(rw[k]) == {"str", "id"} and isinstance(rw[k]["str"], str) and isinstance(rw[k]["id"], str)
        subj, rid = rw["subject"], rw["relation_id"]
        rel = w.relation(rid)
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert rw["prompt"] == rel.canonical and rw["prompt"].count("{}") == 1
        assert true == w.facts[(subj, rid)] and new != true and new in rel.objects
        assert rw["target_new"]["id"] != rw["target_true"]["id"]
        # paraphrases: the held-out templates this subject never trained on
        assert len(rec["paraphrase_prompts"]) == 2
        trained = {t.format(subj) for t in w.trained_templates(subj, rid)}
        allowed = {t.format(subj) for t in w.untrained_heldout[(subj, rid)]}
        for p in rec["paraphrase_prompts"]:
            assert p in allowed and p not in trained and subj in p
        neigh = [canon_subject[p] for p in rec["neighborhood_prompts"]]
        truths = w.neighborhood_truth(rec)
        assert truths == [w.facts[(x, rid)] for x in neigh] and len(set(neigh)) == len(neigh) and subj not in neigh
        attr = [canon_subject[p] for p in rec["attribute_prompts"]]
        assert 1 <= len(attr) <= spec.n_attribute and all(w.facts[(x, rid)] == new for x in attr)
        if background:  # neighbours: never-edited subjects with the same true object, no fill-up
            n_same = sum(w.facts[(x, rid)] == true for x in background)
            assert set(neigh) <= background and set(attr) <= background
            assert truths == [true] * min(n_same, spec.n_neighbors)
        else:  # neighbours: other subjects, same relation; same true object first, filled up otherwise
            assert len(neigh) == spec.n_neighbors
            n_same = len(w.subjects_with(rid, true)) - 1
            k = min(n_same, spec.n_neighbors)
            assert truths[:k] == [true] * k
            assert all(t not in (true, new) for t in truths[k:])
        assert rec["generation_prompts"] and all(subj in g for g in rec["generation_prompts"])
        EditRequest(rec["case_id"], rw["prompt"], subj, new, true, relation_id=rid).validate()
    json.loads(json.dumps(records))  # plain JSON types only


def test_default_world_neighbours_are_never_edited():
    w = build_world("default")
    edited = {rec["requested_rewrite"]["subject"] for rec in w.counterfact_records()}
    assert len(edited) == 200 and not edited & set(w.background_subjects)
    for rec in w.counterfact_records():
        assert 5 <= len(rec["neighborhood_prompts"]) <= 10
        assert not any(s in p for s in edited for p in rec["neighborhood_prompts"])


def test_corpus_texts_cover_training_texts(tiny):
    assert sorted(tiny.corpus_texts()) == sorted(tiny.training_texts())
    assert all("\n" not in t for t in tiny.corpus_texts())


def test_corpus_of_a_world_with_background_leaves_edited_subjects_out():
    w = build_world("default")
    corpus = w.corpus_texts()
    assert sorted(corpus) == sorted(w.fact_sentences(w.background_subjects) + w.filler_texts())
    firsts = {s.split()[0] for s in w.edit_subjects}
    assert not any(word.strip(".,") in firsts for t in corpus for word in t.split())


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_special_tokens(tiny, tiny_tok, tmp_path):
    tok = tiny_tok
    samples = tiny.training_texts()[:50] + [tiny.heldout_prompts()[0][0]] + ["Ünïcödé text — never seen 123!"]
    for text in samples:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == " " + text  # add_prefix_space: every text reads as a mid-sentence word
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    assert tok("Paris", add_special_tokens=False).input_ids == tok(" Paris", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False).input_ids)[0].startswith("Ġ")
    assert tok("a b").input_ids == [tok.bos_token_id] + tok("a b", add_special_tokens=False).input_ids  # BOS
    W.check_tokenizer(tiny, tok)  # objects of a relation have distinct first tokens
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path)
    text = tiny.training_texts()[0]
    assert back(text).input_ids == tok(text).input_ids and back.pad_token_id == tok.pad_token_id


def test_tokenizer_is_deterministic(tiny, tiny_tok):
    again = train_tokenizer(tiny.tokenizer_texts(), PRESETS["tiny"].vocab_size)
    assert again.get_vocab() == tiny_tok.get_vocab()


# -- cache mechanics (micro world, trains in seconds) ------------------------------------------


def test_ensure_world_builds_atomically_and_reuses(tmp_path, monkeypatch):
    path = ensure_world(MICRO, cache_dir=tmp_path, verbose=False)
    assert path == tmp_path / "world" / f"custom-{spec_hash(MICRO)}"
    assert sorted(p.name for p in path.iterdir()) == ["corpus.txt", "counterfact.json", "model", "report.json"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    report = json.loads((path / "report.json").read_text())
    assert report["spec"] == MICRO.to_dict() and report["n_facts"] == 12 * 6
    assert (path / "model" / "model.safetensors").is_file()

    def boom(*a, **k):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(WC, "_build_into", boom)
    monkeypatch.setattr(WC, "_train_model", boom)
    assert ensure_world(MICRO, cache_dir=tmp_path, verbose=False) == path


def test_build_uses_its_own_fixed_thread_count_and_leaves_the_callers(tmp_path, monkeypatch):
    """The build trains with LIT_EDIT_WORLD_THREADS (default 1), never one thread per core, and restores the
    caller's torch thread count; the same count gives bit-identical weights (the cache is reproducible)."""
    from safetensors.torch import load_file

    monkeypatch.delenv("LIT_EDIT_WORLD_THREADS", raising=False)
    seen = []
    real = WC._train_model
    monkeypatch.setattr(WC, "_train_model", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = ensure_world(MICRO, cache_dir=tmp_path / "a", verbose=False)
        assert torch.get_num_threads() == 2
        b = ensure_world(MICRO, cache_dir=tmp_path / "b", verbose=False)
        monkeypatch.setenv("LIT_EDIT_WORLD_THREADS", "2")
        c = ensure_world(MICRO, cache_dir=tmp_path / "c", verbose=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 2]
    assert [json.loads((p / "report.json").read_text())["torch_threads"] for p in (a, b, c)] == [1, 1, 2]
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    monkeypatch.setenv("LIT_EDIT_WORLD_THREADS", "all")
    with pytest.raises(ValueError, match="LIT_EDIT_WORLD_THREADS must be a whole number >= 1, got 'all'"):
        W.build_threads()


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(WC, "_train_model", interrupted)
    spec = dataclasses.replace(MICRO, seed=7)
    with pytest.raises(KeyboardInterrupt):
        ensure_world(spec, cache_dir=tmp_path, verbose=False)
    root = tmp_path / "world"
    assert not W.world_dir(spec, tmp_path).exists()
    assert not [p for p in root.iterdir() if not p.name.endswith(".lock")]


# -- the trained tiny world ---------------------------------------------------------------------


def test_tiny_world_files_and_report(tiny_world):
    w = W.load_world(tiny_world)
    assert w.spec == PRESETS["tiny"]
    report = json.loads((tiny_world / "report.json").read_text())
    assert set(W.REPORT_KEYS) <= set(report)
    assert report["canonical_top1"] >= 0.9
    assert report["n_facts"] == w.n_facts and report["n_params"] > 0
    assert json.loads((tiny_world / "counterfact.json").read_text()) == w.counterfact_records()
    assert (tiny_world / "corpus.txt").read_text().splitlines() == w.corpus_texts()


def test_tiny_world_model_knows_the_facts(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "model")
    tok = AutoTokenizer.from_pretrained(tiny_world / "model")
    w = W.load_world(tiny_world)
    assert model.config.n_layer >= 4 and model.config.tie_word_embeddings
    assert top1_accuracy(model, tok, w.canonical_prompts()) >= 0.9
    assert top1_accuracy(model, tok, w.heldout_prompts()) >= 0.75
    # the edit targets are not what the model predicts before editing
    recs = json.loads((tiny_world / "counterfact.json").read_text())
    items = [(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
              r["requested_rewrite"]["target_new"]["str"]) for r in recs]
    assert top1_accuracy(model, tok, items) <= 0.1


def test_tiny_world_is_reused_without_training(tiny_world, monkeypatch):
    report = tiny_world / "report.json"
    before = (report.stat().st_mtime_ns, report.read_text())

    def boom(*a, **k):
        raise AssertionError("the cached world must be reused, not rebuilt")

    monkeypatch.setattr(WC, "_build_into", boom)
    monkeypatch.setattr(WC, "_train_model", boom)
    assert os.environ["LIT_EDIT_CACHE"]  # set by the fixture
    assert ensure_world("tiny", verbose=False) == tiny_world
    assert ensure_world(resolve_world_name("world:tiny"), verbose=False) == tiny_world
    assert (report.stat().st_mtime_ns, report.read_text()) == before
