"""CounterFact / ZsRE metrics as the papers define them (docs/metrics.md): magnitudes, ZsRE names, free-generation
efficacy, fluency (n-gram entropy), consistency (TF-IDF against ROME-format reference files), the fact world's
own reference files, and decoding with model.generate."""
import json
import math
import shutil
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_edit.cf_metrics import (References, ReferenceFileError, Tfidf, fluency, free_generation_scores,
                                 generation_scores, ngram_entropy, read_snippets, read_tfidf, word_tokens)
from lit_edit.data import read_counterfact
from lit_edit.generation import _greedy_loop, generate_ids
from lit_edit.methods import MetaKE, ProbabilityEvaluator, VStar
from lit_edit.metrics import record_scores, score_targets, score_targets_whole
from lit_edit.requests import EditRequest, EditRequestError
from lit_edit.tokens import bos_ids, encode, target_ids
from tests.helpers import shared_file, tiny_tokenizer
from tests.test_layouts import CONFIGS
from tests.test_unstructured import _chaotic_gpt2


# ------------------------------------------------------------------------------------------------
# Probability metrics: magnitudes and the ZsRE names, on a model with a fixed next-token distribution
# ------------------------------------------------------------------------------------------------


class FixedLM(torch.nn.Module):
    """Every position predicts the same distribution ``probs`` (whatever the prompt)."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def fixed_lm(tok, assigned: dict[int, float]) -> FixedLM:
    probs = torch.full((len(tok),), (1 - sum(assigned.values())) / (len(tok) - len(assigned)), dtype=torch.float64)
    for i, p in assigned.items():
        probs[i] = p
    return FixedLM(probs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scoring_from_the_kept_prompt_equals_one_forward_per_pair(name):
    """:func:`score_targets` runs each distinct prompt once and continues every target from its kept keys and values,
    with the LM head only where a target token is predicted: the same NLL and top-1 as one plain forward of
    prompt + target per pair, on every family (float64), for one- and multi-token targets, shared and single prompts,
    across chunk boundaries."""
    from tests.test_truncated import family_model

    tok = tiny_tokenizer()
    model = family_model(name, len(tok))
    prompts = ["The city is calm and", "Because the weather was good the", "The city is calm and", "I", "I",
               "Because the weather was good the"]
    targets = [" calm", " weather was good", " city is", " the", " calm and the city", " good"]
    assert min(len(target_ids(tok, t)) for t in targets) == 1 < max(len(target_ids(tok, t)) for t in targets)
    for chunk in (64, 1):
        got, want = score_targets(model, tok, prompts, targets, chunk), score_targets_whole(model, tok, prompts,
                                                                                           targets, chunk)
        assert got[0] == pytest.approx(want[0], rel=1e-9, abs=1e-12) and got[1] == want[1]
    assert len(set(got[0])) == len(targets)  # every pair has its own score


def test_magnitudes_by_hand():
    tok = tiny_tokenizer()
    new, true = target_ids(tok, "Paris"), target_ids(tok, "baker")
    assert new == [221, 281, 82, 266] and true == [221, 286, 290]  # the hand computation below assumes these
    model = fixed_lm(tok, {221: 0.3, 281: 0.15, 82: 0.15, 266: 0.15, 286: 0.05, 290: 0.05})
    req = EditRequest(1, "{} lives in", "Anna Berk", "Paris", "baker", paraphrase_prompts=["Anna Berk is in"],
                      neighborhood_prompts=["Tom Lund lives in", "Mira Voss lives in"])
    p_new, p_true = (0.3 * 0.15 ** 3) ** (1 / 4), (0.3 * 0.05 ** 2) ** (1 / 3)  # per-token geometric means
    (got,) = record_scores(model, tok, [req])
    assert got["efficacy"] == got["generalization"] == 1.0 and got["specificity"] == 0.0
    assert got["efficacy_magnitude"] == pytest.approx(p_new - p_true)  # 0.0875
    assert got["generalization_magnitude"] == pytest.approx(p_new - p_true)
    assert got["specificity_magnitude"] == pytest.approx(p_true - p_new)  # the neighbourhood should keep true
    (seq,) = record_scores(model, tok, [req], magnitude="sequence")  # whole-target probabilities
    assert seq["efficacy_magnitude"] == pytest.approx(0.3 * 0.15 ** 3 - 0.3 * 0.05 ** 2)
    with pytest.raises(ValueError, match="magnitude must be one of"):
        record_scores(model, tok, [req], magnitude="bits")


def test_zsre_scores_are_token_accuracies_under_their_own_names():
    tok = tiny_tokenizer()
    model = fixed_lm(tok, {221: 0.3})  # the argmax is always token 221
    req = EditRequest(0, "What is {} known for?", "Anna Berk", "Paris", None, paraphrase_prompts=["Who is Anna Berk?"],
                      neighborhood_prompts=["nq question: who plays the violin?"], neighborhood_targets=["baker"],
                      source="zsre")
    (got,) = record_scores(model, tok, [req])
    # " Paris" = [221, 281, 82, 266]: 1 of 4 tokens is the argmax; " baker" = [221, 286, 290]: 1 of 3
    assert got == pytest.approx({"rewrite_acc": 0.25, "paraphrase_acc": 0.25, "neighborhood_acc": 1 / 3})


# ------------------------------------------------------------------------------------------------
# Decoding with model.generate
# ------------------------------------------------------------------------------------------------

PROMPTS = ["Anna Berk lives in", "Tom", "Mira Voss speaks French. Ola Dunn plays the", "The city is", "Ola"]


def test_generate_ids_gives_the_hand_written_loops_tokens():
    """model.generate (left padding) and the hand-written KV-cache loop (right padding) agree token for token,
    with a limit per row and with a stop token."""
    tok = tiny_tokenizer()
    model = _chaotic_gpt2(tok)
    limits = [7, 12, 5, 0, 3]
    want = _greedy_loop(model, tok, PROMPTS, limits, 2, "right", set())
    assert [len(w) for w in want] == limits and len(set(want[1])) > 1
    assert generate_ids(model, tok, PROMPTS, limits, stop_ids=set(), batch_size=3) == want
    stop = want[1][3]
    cut = generate_ids(model, tok, PROMPTS, limits, stop_ids={stop}, batch_size=2)
    assert cut == [w[: w.index(stop)] if stop in w else w for w in want]


def test_seeded_top_k_sampling_is_per_row():
    """A sampled row depends on its seed only, not on the rows batched with it; k = 1 is greedy; every sampled
    first token is among the prompt's top k."""
    tok = tiny_tokenizer()
    model = _chaotic_gpt2(tok)
    seeds = [11, 12, 13, 14, 15]
    together = generate_ids(model, tok, PROMPTS, 8, top_k=5, seeds=seeds, stop_ids=set(), batch_size=5)
    alone = [generate_ids(model, tok, [p], 8, top_k=5, seeds=[s], stop_ids=set())[0] for p, s in zip(PROMPTS, seeds)]
    assert together == alone
    assert generate_ids(model, tok, PROMPTS, 8, top_k=5, seeds=[s + 100 for s in seeds], stop_ids=set()) != together
    assert generate_ids(model, tok, PROMPTS, 8, top_k=1, stop_ids=set()) == generate_ids(model, tok, PROMPTS, 8,
                                                                                         stop_ids=set())
    for prompt, row in zip(PROMPTS, together):
        logits = model(input_ids=torch.tensor([bos_ids(tok) + encode(tok, prompt)])).logits[0, -1]
        assert row[0] in logits.topk(5).indices.tolist()


# ------------------------------------------------------------------------------------------------
# Free-generation efficacy, on the tiny world's model, whose greedy continuations are known
# ------------------------------------------------------------------------------------------------


def _greedy(model, tok, prompt, n):
    return _greedy_loop(model, tok, [prompt], [n], 1, "right", set())[0]


def test_free_generation_exact_and_prefix(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "model")
    reqs = read_counterfact(str(tiny_world / "counterfact.json"), limit=12)
    # a fact the unedited model completes greedily: the known output
    r = next(r for r in reqs if _greedy(model, tok, r.filled_prompt, len(target_ids(tok, r.target_true)))
             == target_ids(tok, r.target_true))
    knows = EditRequest(r.case_id, r.prompt, r.subject, r.target_true, r.target_new,
                        paraphrase_prompts=r.paraphrase_prompts)
    (got,) = free_generation_scores(model, tok, [knows])
    assert got["gen_exact"] == got["gen_prefix"] == 1.0
    want = target_ids(tok, r.target_true)
    paras = [_greedy(model, tok, p, len(want)) for p in r.paraphrase_prompts]
    assert got["para.gen_exact"] == pytest.approx(sum(g == want for g in paras) / len(paras))
    assert got["para.gen_prefix"] == pytest.approx(sum(g[:1] == want[:1] for g in paras) / len(paras))
    # the right first token, then not the target: a prefix match, not an exact one
    longer = r.target_true + " city"
    assert _greedy(model, tok, r.filled_prompt, len(target_ids(tok, longer))) != target_ids(tok, longer)
    (got,) = free_generation_scores(model, tok, [EditRequest(1, r.prompt, r.subject, longer, r.target_new)])
    assert (got["gen_exact"], got["gen_prefix"]) == (0.0, 1.0) and "para.gen_exact" not in got
    # the counterfactual target, which the unedited model does not start with
    first = _greedy(model, tok, r.filled_prompt, 1)
    assert first != target_ids(tok, r.target_new)[:1]
    (got,) = free_generation_scores(model, tok, [EditRequest(1, r.prompt, r.subject, r.target_new, r.target_true)])
    assert (got["gen_exact"], got["gen_prefix"]) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# Fluency and consistency
# ------------------------------------------------------------------------------------------------


def test_ngram_entropy_and_fluency_by_hand():
    tokens = "a b a b".split()
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (a b) x2, (b a) x1
    assert ngram_entropy(tokens, 2) == pytest.approx(h2) and ngram_entropy(tokens, 3) == pytest.approx(1.0)
    assert ngram_entropy(["a"], 2) == 0.0
    assert fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)  # the reference code: the mean
    assert fluency("a b a b", weights="paper") == pytest.approx(2 / 3 * h2 + 4 / 3 * 1.0)
    assert word_tokens("I don't know John's well-known dog, 3.5 km.") == [
        "I", "do", "n't", "know", "John", "'s", "well-known", "dog", ",", "3.5", "km", "."]
    with pytest.raises(ValueError, match="weights must be one of"):
        fluency("a b", weights="bits")


def test_tfidf_cosine_on_a_three_word_vocabulary():
    tfidf = Tfidf({"cat": 0, "dog": 1, "sat": 2}, [1.0, 2.0, 3.0])
    # "The cat sat" -> counts (1, 0, 1) -> (1, 0, 3); "dog sat sat" -> (0, 1, 2) -> (0, 2, 6); "the" is not a term
    assert tfidf.similarity("The cat sat", "dog sat sat") == pytest.approx(18 / (math.sqrt(10) * math.sqrt(40)))
    assert tfidf.similarity("The cat SAT", "the cat sat") == pytest.approx(1.0)
    assert tfidf.similarity("a bird", "cat") == 0.0  # no vocabulary word: 0, not a division by zero
    fitted = Tfidf.fit(["cat sat", "dog sat", "cat cat"])  # df: cat 2, dog 1, sat 2 of n = 3
    assert fitted.vocab == {"cat": 0, "dog": 1, "sat": 2}
    assert fitted.idf == pytest.approx([math.log(4 / 3) + 1, math.log(4 / 2) + 1, math.log(4 / 3) + 1])


def _rome_files(d, entries, vocab=None, idf=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "attribute_snippets.json").write_text(json.dumps(entries))
    np.save(d / "idf.npy", np.asarray(idf if idf is not None else [1.0, 2.0, 3.0]))
    (d / "tfidf_vocab.json").write_text(json.dumps(vocab if vocab is not None else {"cat": 0, "dog": 1, "sat": 2}))
    return d


def test_reading_rome_format_reference_files(tmp_path):
    entries = [{"relation_id": "P1", "target_id": "Q5", "samples": [{"name": "Tom", "text": "dog sat sat"}]},
               {"relation_id": "P1", "target_id": "Q6", "samples": [{"name": "Ann", "text": "cat"}]},
               {"relation_id": "P1", "target_id": "Q5", "samples": [{"name": "Ola", "text": "dog"}]}]
    refs = References.load(_rome_files(tmp_path / "rome", entries))
    assert refs.snippets == {("P1", "Q5"): ["dog sat sat", "dog"], ("P1", "Q6"): ["cat"]}
    req = EditRequest(3, "{} owns a", "Anna Berk", "dog", "cat", relation_id="P1", target_new_id="Q5",
                      generation_prompts=["Anna Berk"])
    assert refs.texts(req) == ["dog sat sat", "dog"]
    assert refs.tfidf.similarity("The cat sat", " ".join(refs.texts(req))) == pytest.approx(
        (0 * 4 + 3 * 6) / (math.sqrt(10) * math.sqrt(16 + 36)))  # "dog sat sat dog" -> (0, 4, 6)
    req.target_new_id = "Q7"
    with pytest.raises(EditRequestError, match="no reference texts for relation 'P1' and object 'Q7'") as err:
        refs.texts(req)
    assert (err.value.case_id, err.value.field) == (3, "target_new.id")
    assert "attribute_snippets.json" in str(err.value)


def test_missing_or_malformed_reference_files_name_the_file(tmp_path):
    good = [{"relation_id": "P1", "target_id": "Q5", "samples": [{"name": "Tom", "text": "dog"}]}]
    with pytest.raises(ReferenceFileError, match="not a directory"):
        References.load(tmp_path / "nowhere")
    d = _rome_files(tmp_path / "a", good)
    (d / "idf.npy").unlink()
    with pytest.raises(ReferenceFileError, match=r"idf\.npy: not found") as err:
        References.load(d)
    assert err.value.path == d / "idf.npy"
    d = _rome_files(tmp_path / "b", good, idf=[[1.0, 2.0]])
    with pytest.raises(ReferenceFileError, match=r"idf\.npy: must hold a 1-D array"):
        read_tfidf(d / "idf.npy", d / "tfidf_vocab.json")
    d = _rome_files(tmp_path / "c", good, vocab={"cat": 0, "dog": 7})
    with pytest.raises(ReferenceFileError, match=r"tfidf_vocab\.json: term 'dog' has index 7"):
        References.load(d)
    (d / "tfidf_vocab.json").write_text("{not json")
    with pytest.raises(ReferenceFileError, match=r"tfidf_vocab\.json: not readable as JSON"):
        References.load(d)
    d = _rome_files(tmp_path / "d", [{"relation_id": "P1", "target_id": "Q5"}])
    with pytest.raises(ReferenceFileError, match=r"attribute_snippets\.json: entry 0 must be an object with"):
        read_snippets(d / "attribute_snippets.json")
    d = _rome_files(tmp_path / "e", {"P1": {"Q5": []}})  # the in-memory mapping, not the file's list
    with pytest.raises(ReferenceFileError, match=r"attribute_snippets\.json: must be a JSON list"):
        References.load(d)


def test_counterfact_sample_generation_prompts_are_what_is_generated_from(monkeypatch, tmp_path):
    """The real CounterFact sample: each record's generation_prompts (the first n) are the prompts continued, with
    up to generation_length tokens including the prompt, and consistency looks up (relation_id, target_new.id)."""
    import lit_edit.cf_metrics as cf

    path = shared_file("counterfact_sample.json")
    records = json.loads(path.read_text())[:3]
    reqs = read_counterfact(str(path), limit=3)
    for rec, r in zip(records, reqs):
        assert r.generation_prompts == rec["generation_prompts"] and len(r.generation_prompts) == 10
        assert (r.relation_id, r.target_new_id) == (rec["requested_rewrite"]["relation_id"],
                                                    rec["requested_rewrite"]["target_new"]["id"])
    seen = {}

    def spy(model, tok, prompts, limits, **kw):
        seen.update(prompts=prompts, limits=limits, **kw)
        return [[] for _ in prompts]  # no new tokens: the texts are the prompts

    monkeypatch.setattr(cf, "generate_ids", spy)
    tok = tiny_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(n_positions=1000))
    entries = [{"relation_id": r.relation_id, "target_id": r.target_new_id,
                "samples": [{"name": "x", "text": f"{r.target_new} is where it is"}]} for r in reqs]
    refs = References(read_snippets(_rome_files(tmp_path, entries) / "attribute_snippets.json"),
                      Tfidf.fit([r.target_new for r in reqs] + ["is where it"]), str(tmp_path))
    rows = generation_scores(model, tok, reqs, references=refs, n_prompts=4, length=100)
    assert seen["prompts"] == [p for r in reqs for p in r.generation_prompts[:4]]
    assert seen["limits"] == [max(0, 100 - len(bos_ids(tok) + encode(tok, p))) for p in seen["prompts"]]
    assert seen["top_k"] == 5 and seen["stop_ids"] == set() and len(set(seen["seeds"])) == 12
    for r, row in zip(reqs, rows):
        texts = [unicodedata.normalize("NFKD", tok.decode(encode(tok, p))) for p in r.generation_prompts[:4]]
        assert row["fluency"] == pytest.approx(sum(fluency(t) for t in texts) / 4)
        assert row["consistency"] == pytest.approx(refs.tfidf.similarity(" ".join(texts), " ".join(refs.texts(r))))


# ------------------------------------------------------------------------------------------------
# The fact world's own references, and the evaluator
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_refs(tmp_path_factory):
    from lit_edit.world import build_world
    from lit_edit.world.references import write_references

    return write_references(build_world("tiny"), tmp_path_factory.mktemp("world_refs"))


def test_world_reference_files_cover_every_record(tiny_world, world_refs, tmp_path):
    from lit_edit.world.references import REFERENCE_DIR, ensure_references

    refs = References.load(world_refs)
    reqs = read_counterfact(str(tiny_world / "counterfact.json"), source="world")
    for r in reqs:  # every reference text is a biography of a subject with the new object for the relation
        texts = refs.texts(r)
        assert texts and all(f"{r.prompt.split('{}')[1]} {r.target_new}." in t for t in texts)
    n = len({t for ts in refs.snippets.values() for t in ts})  # one biography per subject
    assert refs.tfidf.idf[refs.tfidf.vocab["lives"]] == pytest.approx(1.0)  # in every biography: ln(1) + 1
    assert n > 1 and max(refs.tfidf.idf) == pytest.approx(math.log((1 + n) / 2) + 1)  # a first name: one document
    # written once into a world's cache directory, beside its records
    world = tmp_path / "w"
    world.mkdir()
    shutil.copy(tiny_world / "report.json", world / "report.json")
    where = ensure_references(world)
    assert where == world / REFERENCE_DIR and References.load(where).snippets == refs.snippets
    stamp = (where / "idf.npy").stat().st_mtime_ns
    assert ensure_references(world) == where and (where / "idf.npy").stat().st_mtime_ns == stamp


def test_the_evaluator_scores_generation_metrics_in_full_evaluations_only(tiny_world, world_refs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = SimpleNamespace(llm=AutoModelForCausalLM.from_pretrained(tiny_world / "model"),
                          tok=AutoTokenizer.from_pretrained(tiny_world / "model"))
    reqs = read_counterfact(str(tiny_world / "counterfact.json"), limit=3, source="world")
    ev = ProbabilityEvaluator(fluency=True, consistency=True, reference_dir=str(world_refs), generation_prompts=2,
                              generation_length=24)
    assert {"fluency", "consistency", "gen_exact", "rewrite_acc", "efficacy_magnitude"} <= set(ev.keys)
    full = ev.scores(env, reqs)
    cheap = ev.scores(env, reqs, full=False)
    generated = {"fluency", "consistency", "gen_exact", "gen_prefix", "para.gen_exact", "para.gen_prefix"}
    for f, c in zip(full, cheap):
        assert set(f) == set(c) | generated and not set(c) & generated
        assert 0 < f["consistency"] <= 1 and f["fluency"] > 0
    assert ev.scores(env, reqs) == full  # seeded per record: the same generations again
    assert ev.check(reqs) == reqs
    reqs[1].target_new_id = "Q424242"
    with pytest.raises(EditRequestError, match="Q424242") as err:
        ev.check(reqs)
    assert err.value.case_id == reqs[1].case_id


def test_evaluator_settings_are_checked_and_belong_to_the_method():
    with pytest.raises(ValueError, match="model.method.init_args.evaluator.consistency needs "
                                         "model.method.init_args.evaluator.reference_dir"):
        ProbabilityEvaluator(consistency=True)
    with pytest.raises(ValueError, match="model.method.init_args.evaluator.magnitude must be one of"):
        ProbabilityEvaluator(magnitude="bits")
    with pytest.raises(ValueError, match="model.method.init_args.evaluator.generation_length must be an integer"):
        ProbabilityEvaluator(generation_length=0)
    v = VStar(evaluator={"fluency": True, "generation_prompts": 3})  # a checkpoint's plain dict
    assert v.evaluator == ProbabilityEvaluator(fluency=True, generation_prompts=3)
    assert v.settings()["evaluator"]["generation_prompts"] == 3
    m = MetaKE(evaluator=ProbabilityEvaluator(fluency=True))
    assert "evaluator" not in m.settings()["base"] and m.settings()["evaluator"]["fluency"] is True
    with pytest.raises(ValueError, match="base.evaluator is not used"):
        MetaKE(base=VStar(evaluator=ProbabilityEvaluator(fluency=True)))


def test_a_fit_writes_the_generation_metrics(tiny_world, world_refs, tmp_path):
    """Set from the CLI (typed, under model.method.init_args.evaluator): metrics.json holds the generation metrics
    with their pre-edit values; a world spec as reference_dir is resolved to the world's own files."""
    from pathlib import Path

    from tests.test_methods import fit

    method = {"class_path": "lit_edit.methods.VStar",
              "init_args": {"v_num_grad_steps": 15, "clamp_norm_factor": 4.0, "fact_token": "subject_first",
                            "evaluator": {"fluency": True, "consistency": True, "reference_dir": str(world_refs),
                                          "generation_prompts": 1, "generation_length": 24}}}
    cli = fit(tmp_path, method, "--data.limit", "2", "--model.eval_pre", "true")
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    for key in ("fluency", "consistency", "gen_exact", "para.gen_prefix", "efficacy_magnitude"):
        assert key in metrics and f"pre.{key}" in metrics
    assert metrics["gen_exact"] > metrics["pre.gen_exact"] == 0.0  # some edits are generated greedily afterwards
    assert not {"rewrite_acc", "pre.rewrite_acc"} & set(metrics)  # ZsRE's names: no ZsRE record


@pytest.mark.parametrize("name", ["gpt2-xl/memit_counterfact.yaml", "gpt2-xl/metake_counterfact.yaml",
                                  "llama3-8b/memit_zsre.yaml", "world/metake.yaml"])
def test_shipped_configs_choose_the_generation_metrics(name, tmp_path, monkeypatch):
    """CounterFact runs report fluency as the papers do (VStar and MetaKE alike); the world demo keeps the cheap
    defaults (free generation only)."""
    from tests.test_configs import ROOT, cli_for

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    ev = cli_for(ROOT / name).model.method.evaluator
    assert ev.free_generation and not ev.consistency
    assert ev.fluency == ("counterfact" in name or "zsre" in name)  # ZsRE records have no generation prompts
