"""Unstructured (long-form) edits: readers, validation, chat wrapping, the world's paragraphs, metrics.

Real samples come from ``../shared/data`` beside the checkout; the tests that need them skip
(with the reason) when it is absent. No test touches the network, trains a world model or
writes to the world cache.
"""
from __future__ import annotations

import collections
import math
import copy
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from lit_edit.data import (
    READERS,
    EditDataModule,
    check_length,
    check_lengths,
    read_akew,
    read_editeverything,
    read_requests,
    read_unke,
    read_world_long,
)
from lit_edit.requests import (
    EditRequestError,
    UnstructuredRequest,
    chat_prompt,
    edit_answer,
    end_of_turn,
)
from tests.helpers import shared_file, tiny_tokenizer



def _write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _unke_record(i, **overrides) -> dict:
    record = {"id": i, "question": f"Who is person {i}?", "para_question": f"Tell me who person {i} is.",
              "answer": f"Person {i} is a painter. She lives in Rome.", "sub_question": [f"Where does person {i} live?"],
              "sub_answer": ["Rome"]}
    record.update(overrides)
    return record


# --------------------------------------------------------------------------------------------
# Readers on the real samples
# --------------------------------------------------------------------------------------------


def test_unke_sample():
    path = shared_file("unke_sample.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    requests = read_unke(str(path))
    assert len(requests) == len(raw) == 50
    assert [r.case_id for r in requests] == list(range(50))
    assert all(isinstance(r, UnstructuredRequest) and r.source == "unke" for r in requests)
    first = requests[0]
    assert first.question == "What is George Rankin's occupation?"
    assert first.paraphrase_questions == ["What does George Rankin do for a living?"]
    assert first.para_question == "What does George Rankin do for a living?"
    assert first.answer.startswith("George Rankin has been actively involved in politics for over a decade.")
    assert first.answer.endswith("George Rankin's occupation is that of a political figure.")
    assert first.sub_questions[0] == "How long has George Rankin been involved in politics?"
    assert first.sub_answers == ["Over a decade.", "City council member and state representative.",
                                 "Environmental protection and social justice.", "Political issues.",
                                 "Local and national news outlets."]
    assert sum(len(r.sub_questions) for r in requests) == 245
    for request, record in zip(requests, raw):
        assert (request.question, request.answer) == (record["question"], record["answer"])
        assert request.sub_questions == record["sub_question"] and request.sub_answers == record["sub_answer"]
    # the same through the dispatcher and the DataModule
    assert [r.case_id for r in read_requests("unke", str(path), limit=3)] == [0, 1, 2]
    dm = EditDataModule(dataset="unke", path=str(path), batch_size=8, offset=2, limit=20)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert [len(b) for b in batches] == [8, 8, 4]
    assert batches[0][0].case_id == 2 and isinstance(batches[0][0], UnstructuredRequest)


def test_akew_mquake_sample_first_rewrite_as_muke():
    path = shared_file("akew_mquake_sample.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    requests = read_akew(str(path))
    assert len(requests) == 50
    assert [r.case_id for r in requests] == [rec["case_id"] for rec in raw]
    first = requests[0]
    assert first.case_id == 1 and first.source == "akew_mquake"
    assert first.question == "What is the country of citizenship of Ellie Kemper?"
    assert first.answer.startswith("Croatia, a country located in Southeast Europe, is home to many notable")
    assert first.paraphrase_questions == []
    assert first.subject == "Ellie Kemper"
    assert first.sub_questions == ["Croatia is located in", "Ellie Kemper was born in", "Ellie Kemper has",
                                   "Ellie Kemper is known for", "Ellie Kemper has also written"]  # first 5 of 7
    assert first.sub_answers[:2] == ["Southeast Europe", "Kansas City, Missouri"]
    assert first.extra["target_new"] == "Croatia" and first.extra["target_true"] == "United States of America"
    assert first.extra["new_answer"] == "Kolinda Grabar-Kitarović" and len(first.extra["questions"]) == 3
    assert requests[1].question == "Who was Tetris created by?"
    assert all(len(r.sub_questions) <= 5 for r in requests)


def test_akew_mquake_all_rewrites_and_all_triplets():
    path = shared_file("akew_mquake_sample.json")
    requests = read_akew(str(path), rewrites="all", n_sub=None)
    assert len(requests) == 62
    assert [r.case_id for r in requests[:8]] == [1, 6, "6_1", 14, 23, 24, "24_1", 30]
    assert len(requests[0].sub_questions) == 7
    assert requests[2].answer != requests[1].answer
    with pytest.raises(ValueError, match="rewrites"):
        read_akew(str(path), rewrites="some")


def test_akew_counterfact_format(tmp_path):
    """AKEW's CounterFact file is not in the samples: build two records from the CounterFact sample."""
    raw = json.loads(shared_file("counterfact_sample.json").read_text(encoding="utf-8"))[:2]
    for record in raw:
        rw = record["requested_rewrite"]
        rw["prompt_full"] = rw["prompt"].format(rw["subject"])
        rw["fact_new_uns"] = f"{rw['subject']} is now made by {rw['target_new']['str']}. It is a fine car."
        rw["unsfact_triplets_GPT"] = [{"subject": rw["subject"], "prompt": "{} is made by",
                                       "target": rw["target_new"]["str"]}] * 6
    path = _write_json(tmp_path / "CounterFact.json", raw)
    requests = read_akew(str(path))
    first = requests[0]
    assert first.case_id == 18 and first.source == "akew_counterfact"
    assert first.question == "Porsche 911, created by"
    assert first.paraphrase_questions == [raw[0]["paraphrase_prompts"][0]]
    assert first.answer == "Porsche 911 is now made by Honda. It is a fine car."
    assert first.sub_questions == ["Porsche 911 is made by"] * 5 and first.sub_answers == ["Honda"] * 5
    assert first.extra["neighborhood_prompts"][0] == "Porsche RS Spyder is produced by"
    # a record without the unstructured fact names its case and field
    del raw[1]["requested_rewrite"]["fact_new_uns"]
    with pytest.raises(EditRequestError) as info:
        read_akew(str(_write_json(tmp_path / "bad.json", raw)))
    assert (info.value.case_id, info.value.field) == (55, "fact_new_uns")


def test_editeverything_sample():
    path = shared_file("editeverything_sample.json")
    requests = read_editeverything(str(path))
    assert len(requests) == 50
    assert collections.Counter(r.category for r in requests) == {
        "math": 8, "code": 7, "poetry": 7, "news": 7, "chemistry": 7, "biology": 7, "physics": 7}
    first = requests[0]
    assert (first.case_id, first.category, first.source) == (0, "math", "editeverything")
    assert first.question == "Find the sum of 100 consecutive odd numbers from 1."
    assert first.answer.startswith("To find the sum of 100 consecutive odd numbers starting from 1,")
    assert first.paraphrase_questions == [] and first.sub_questions == []
    poem = requests[15]
    assert (poem.case_id, poem.category) == (134, "poetry")
    assert poem.question == "Write a poem about the serenity of a quiet forest morning."


def test_readers_registered():
    assert set(READERS) >= {"unke", "akew", "editeverything", "world_long", "counterfact", "zsre", "world"}


# --------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"question": ""}, "question"),
        ({"question": None}, "question"),
        ({"answer": "   "}, "answer"),
        ({"para_question": ""}, "para_question"),
        ({"sub_answer": ["Rome", "Paris"]}, "sub_answer"),
        ({"sub_question": [""]}, "sub_question"),
    ],
)
def test_unke_bad_record_names_case_and_field(tmp_path, caplog, overrides, field):
    records = [_unke_record(0), _unke_record(1, **overrides), _unke_record(2)]
    path = _write_json(tmp_path / "unke.json", records)
    with pytest.raises(EditRequestError) as info:
        read_unke(str(path))
    assert (info.value.case_id, info.value.field) == (1, field)
    assert "case_id=1" in str(info.value) and repr(field) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        kept = read_unke(str(path), on_invalid="skip")
    assert [r.case_id for r in kept] == [0, 2]
    assert "case_id=1" in caplog.text


def test_missing_id_and_duplicate_id(tmp_path):
    record = _unke_record(0)
    del record["id"]
    with pytest.raises(EditRequestError) as info:
        read_unke(str(_write_json(tmp_path / "a.json", [_unke_record(5), record])))
    assert (info.value.case_id, info.value.field) == ("<record #1>", "id")
    with pytest.raises(EditRequestError) as info:
        read_unke(str(_write_json(tmp_path / "b.json", [_unke_record(5), _unke_record(5)])), on_invalid="skip")
    assert (info.value.case_id, info.value.field) == (5, "case_id")


def test_editeverything_bad_records(tmp_path):
    good = {"id": 3, "question": "Write a haiku.", "answer": "Old pond, a frog jumps.", "category": "poetry"}
    for key, value in (("category", ""), ("answer", ""), ("question", " ")):
        bad = dict(good, id=4, **{key: value})
        with pytest.raises(EditRequestError) as info:
            read_editeverything(str(_write_json(tmp_path / "e.json", [good, bad])))
        assert (info.value.case_id, info.value.field) == (4, key)


def test_akew_bad_triplet_and_unverified(tmp_path):
    raw = json.loads(shared_file("akew_mquake_sample.json").read_text(encoding="utf-8"))[:3]
    raw = copy.deepcopy(raw)
    raw[1]["requested_rewrite"][0]["unsfact_triplets_GPT"][2]["prompt"] = "no slot here"
    raw[2]["requested_rewrite"][0]["verify_unsfact_GPT"] = False
    path = _write_json(tmp_path / "mq.json", raw)
    with pytest.raises(EditRequestError) as info:
        read_akew(str(path))
    assert (info.value.case_id, info.value.field) == (6, "unsfact_triplets_GPT[2].prompt")
    assert len(read_akew(str(path), n_sub=2)) == 3  # the bad triplet is not used
    with pytest.raises(EditRequestError) as info:
        read_akew(str(path), n_sub=2, require_verified=True)
    assert (info.value.case_id, info.value.field) == (14, "verify_unsfact_GPT")


def test_unstructured_request_validate():
    ok = UnstructuredRequest("a", "Q?", "A long answer.")
    assert ok.validate() is ok and ok.para_question is None
    for kwargs, field in (
        (dict(question=""), "question"),
        (dict(answer=""), "answer"),
        (dict(paraphrase_questions=["ok", " "]), "paraphrase_questions"),
        (dict(sub_questions=["q1"], sub_answers=[]), "sub_answers"),
        (dict(source="nonsense"), "source"),
        (dict(original_answer="A long answer. "), "answer"),
    ):
        request = UnstructuredRequest(**{"case_id": 7, "question": "Q?", "answer": "A long answer.", **kwargs})
        with pytest.raises(EditRequestError) as info:
            request.validate()
        assert (info.value.case_id, info.value.field) == (7, field)


# --------------------------------------------------------------------------------------------
# Chat templates and length checks
# --------------------------------------------------------------------------------------------

QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_LIKE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture
def chat_tok():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    return tok


def test_chat_prompt_without_template_is_plain_text():
    tok = tiny_tokenizer()
    assert chat_prompt("Who is Anna Berk?", tok) == "Who is Anna Berk?"
    assert chat_prompt("Who is Anna Berk?") == "Who is Anna Berk?"
    assert end_of_turn(tok) is None
    assert edit_answer("She lives in Paris.", tok) == "She lives in Paris."


def test_chat_prompt_with_templates(chat_tok):
    chat_tok.chat_template = QWEN_LIKE
    assert chat_prompt("Who?", chat_tok) == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("Who?", chat_tok, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert end_of_turn(chat_tok) == "<|im_end|>"
    assert edit_answer("Paris.", chat_tok) == "Paris.<|im_end|>"
    assert chat_prompt("Who?", chat_tok) == chat_prompt("Who?", template="qwen2.5")  # MUKE's string
    chat_tok.chat_template = LLAMA_LIKE
    expected = "<|start_header_id|>user<|end_header_id|>\n\nWho?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert chat_prompt("Who?", chat_tok) == expected  # the template's BOS is dropped: it is added once when encoding
    assert chat_prompt("Who?", chat_tok, strip_bos=False) == chat_tok.bos_token + expected
    assert chat_prompt("Who?", template="llama3") == expected
    assert end_of_turn(chat_tok) == "<|eot_id|>" == end_of_turn(template="llama3")
    with pytest.raises(ValueError):
        chat_prompt("Who?", template="mistral")


def test_check_length_names_record_and_field(caplog):
    tok = tiny_tokenizer()  # "Anna Berk lives in the city of Paris." is 9 tokens + BOS
    short = UnstructuredRequest(1, "Anna Berk lives in the city of", "Paris. Tom Lund works as a baker.",
                                paraphrase_questions=["Anna Berk lives in the city of Paris. Tom Lund works as a"])
    n_q = 1 + len(tok("Anna Berk lives in the city of", add_special_tokens=False)["input_ids"])
    n_a = len(tok("Paris. Tom Lund works as a baker.", add_special_tokens=False)["input_ids"])
    assert check_length(UnstructuredRequest(0, short.question, short.answer), tok, n_q + n_a - 1)
    with pytest.raises(EditRequestError) as info:
        check_length(UnstructuredRequest(0, short.question, short.answer), tok, n_q + n_a - 2)
    assert (info.value.case_id, info.value.field) == (0, "answer")
    assert "context is" in str(info.value)
    with pytest.raises(EditRequestError) as info:
        check_length(short, tok, n_q + n_a - 1)
    assert (info.value.case_id, info.value.field) == (1, "paraphrase_questions")
    with pytest.raises(EditRequestError) as info:
        check_length(short, tok, 3)
    assert info.value.field == "question"

    class Config:
        n_positions = n_q + n_a - 1

    class Model:
        config = Config()

    ok = UnstructuredRequest(2, short.question, short.answer)
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        assert check_lengths([short, ok], tok, Model(), on_invalid="skip") == [ok]
    assert "case_id=1" in caplog.text


# --------------------------------------------------------------------------------------------
# The fact world's long-form records
# --------------------------------------------------------------------------------------------


def test_world_long_records_are_deterministic_and_vary():
    from lit_edit.world import build_world
    from lit_edit.world_long import long_record, long_records

    world = build_world("tiny")
    records = long_records(world)
    assert records == long_records(build_world("tiny"))
    assert len(records) == len(world.subjects)
    sentences = [r["n_sentences"] for r in records]
    assert min(sentences) >= 2 and max(sentences) <= 8 and len(set(sentences)) >= 4
    assert len({len(r["answer"]) for r in records}) > len(records) // 2
    for r in records:
        s = r["subject"]
        assert r["question"] == f"Tell me about {s}." and s in r["para_question"] and r["para_question"] != r["question"]
        assert r["answer"] != r["original_answer"] and r["answer"].count(".") == r["n_sentences"]
        assert 1 <= len(r["rewrites"]) <= 3
        for rw in r["rewrites"]:  # the rewrite replaces the fact by another object of the same relation
            relation = world.relation(rw["relation_id"])
            assert rw["target_true"] == world.facts[(s, rw["relation_id"])] != rw["target_new"]
            assert rw["target_new"] in relation.objects
            assert f" {rw['target_new']}." in r["answer"] and f" {rw['target_true']}." in r["original_answer"]
        for q, a in zip(r["sub_question"], r["sub_answer"]):  # cloze prompts of the paragraph's facts
            assert q in {rel.canonical.format(s) for rel in world.relations}
            assert f" {a}." in r["answer"]
    # a record depends on the subject and the seed only, not on the other subjects
    s = world.subjects[5]
    assert long_record(world, s, 5) == records[5]


def test_world_long_fits_the_context_and_reads(tmp_path):
    from lit_edit.world import build_world
    from lit_edit.world_long import long_records, world_tokenizer

    world = build_world("tiny")
    tok = world_tokenizer("world:tiny", cache_dir=tmp_path / "cache")  # trained afresh (a second), not cached
    assert not (tmp_path / "cache").exists()
    fitted = long_records(world, tokenizer=tok, max_tokens=40)
    free = long_records(world)
    assert any(f["n_sentences"] < g["n_sentences"] for f, g in zip(fitted, free))
    assert all(f["n_sentences"] <= g["n_sentences"] for f, g in zip(fitted, free))
    for request in read_world_long(str(_write_json(tmp_path / "long.json", fitted))):
        check_length(request, tok, 40)
        assert request.extra["rewrites"] and request.source == "world_long"
    # from the spec: nothing is trained or written to the world cache
    requests = read_requests("world_long", "world:tiny", limit=5)
    assert [r.case_id for r in requests] == [0, 1, 2, 3, 4]
    assert requests[0].question == free[0]["question"] and requests[0].original_answer


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_identical_text_scores_one_and_disjoint_zero():
    from lit_edit.metrics import text_scores

    text = "Anna Berk lives in the city of Paris and plays the violin."
    assert text_scores([text], [text]) == {"bleu": [pytest.approx(1.0)], "rouge_l": [pytest.approx(1.0)]}
    assert text_scores([text], [text], style="reference") == {"bleu": [pytest.approx(1.0)],
                                                              "rouge_l": [pytest.approx(1.0)]}
    assert text_scores(["one two three four"], ["five six seven eight"]) == {"bleu": [0.0], "rouge_l": [0.0]}


def test_word_bleu_and_rouge_l_by_hand():
    from lit_edit.metrics import bleu_scores, rouge_l_scores

    # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3 (the second "the" is clipped); equal lengths: no brevity penalty
    assert bleu_scores(["the cat sat on the mat"], ["the cat sat on a mat"]) == [pytest.approx((1 / 12) ** 0.25, abs=1e-6)]
    # brevity penalty exp(1 - r/c): a 4-word prefix of a 6-word reference has all precisions 1
    assert bleu_scores(["the cat sat on"], ["the cat sat on a mat"]) == [pytest.approx(math.exp(1 - 6 / 4), abs=1e-6)]
    # fewer than 4 words: no 4-gram, so unsmoothed BLEU is 0 even for identical texts
    assert bleu_scores(["the cat"], ["the cat"]) == [0.0]
    # LCS("the cat sat on the mat today", "the cat sat on a mat") = 5 words: P = 5/7, R = 5/6, F = 10/13
    pred, ref = ["The cat sat on the mat today."], ["the cat sat on a mat"]  # lowercased, punctuation dropped
    assert rouge_l_scores(pred, ref) == [pytest.approx(10 / 13, abs=1e-6)]
    assert rouge_l_scores(pred, ref, stat="recall") == [pytest.approx(5 / 6, abs=1e-6)]
    assert rouge_l_scores(pred, ref, stat="precision") == [pytest.approx(5 / 7, abs=1e-6)]


def test_reference_char_level_bleu_by_hand():
    """NLTK's sentence_bleu on raw strings: character n-grams, the space included."""
    from lit_edit.metrics import bleu_scores, text_scores

    # "the cap" vs "the cat": 7 characters each; 1..4-gram precisions 6/7, 5/6, 4/5, 3/4 -> BLEU = (3/7)^(1/4)
    assert bleu_scores(["the cap"], ["the cat"], level="char") == [pytest.approx((3 / 7) ** 0.25, abs=1e-6)]
    assert bleu_scores(["the cap"], ["the cat"], level="word") == [0.0]  # two words: no 4-gram
    # whitespace counts as a character: "ab cd" vs "abcd": 1-grams 4/5, 2-grams "ab","cd" of 4 -> 2/4,
    # 3-grams 0 of 3 -> 0
    assert bleu_scores(["ab cd"], ["abcd"], level="char") == [0.0]
    # brevity penalty on characters: "abcde" vs "abcdefgh": precisions 1, BP = exp(1 - 8/5)
    assert bleu_scores(["abcde"], ["abcdefgh"], level="char") == [pytest.approx(math.exp(1 - 8 / 5), abs=1e-6)]
    # the reference style appends a space to a prediction that has none (before scoring), and uses
    # the rouge package's ROUGE-L recall: "abcdefgh " vs "abcdefgh" -> char BLEU with c = 9 > r = 8: the extra space costs
    # precision (1-grams 8/9, 2-grams 7/8, 3-grams 6/7, 4-grams 5/6 -> (5/9)^(1/4))
    scores = text_scores(["abcdefgh"], ["abcdefgh"], style="reference")
    assert scores["bleu"] == [pytest.approx((5 / 9) ** 0.25, abs=1e-6)]
    assert scores["rouge_l"] == [pytest.approx(1.0)]
    assert text_scores(["abcdefgh"], ["abcdefgh"], style="reference", append_space=False)["bleu"] == [
        pytest.approx(1.0)]
    with pytest.raises(ValueError):
        text_scores(["a"], ["a"], style="nltk")


def test_reference_rouge_l_recall_by_hand():
    """The rouge package's ROUGE-L recall (what the reference reports) vs torchmetrics' recall."""
    from lit_edit.metrics import reference_rouge_l_recall, rouge_l_scores, text_scores

    assert reference_rouge_l_recall("the cat sat on the mat today.", "the cat sat on a mat") == pytest.approx(5 / 6)
    # sentences are cut at "." and matched pairwise (summary-level union LCS): swapped sentences
    # still recall every reference word, while one LCS over the whole text finds only 2 of 4
    assert reference_rouge_l_recall("c d. a b", "a b. c d.") == 1.0
    assert rouge_l_scores(["c d. a b"], ["a b. c d."], stat="recall") == [pytest.approx(0.5)]
    # distinct words: "a a b" has 2 distinct words, both recalled by "a b"
    assert reference_rouge_l_recall("a b", "a a b") == 1.0
    assert rouge_l_scores(["a b"], ["a a b"], stat="recall") == [pytest.approx(2 / 3)]
    # case and punctuation are kept
    assert reference_rouge_l_recall("paris ", "Paris") == 0.0
    assert rouge_l_scores(["paris "], ["Paris"], stat="recall") == [pytest.approx(1.0)]
    assert reference_rouge_l_recall("", "Paris") == 0.0
    assert text_scores(["c d. a b"], ["a b. c d."], style="reference")["rouge_l"] == [1.0]
    assert rouge_l_scores(["c d. a b"], ["a b. c d."], stat="reference_recall") == [1.0]


def _chaotic_gpt2(tok, seed=0):
    """A tiny random GPT-2 with large weights, so greedy continuations do not just repeat one token."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=0.5,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False).to(torch.float64)


PROMPTS = ["Anna Berk lives in", "Tom", "Mira Voss speaks French. Ola Dunn plays the", "The city is", "Ola"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("tokenizer_side", ["left", "right"])
def test_greedy_generation_batched_equals_one_at_a_time(padding_side, tokenizer_side):
    import torch

    from lit_edit.metrics import generate_greedy

    tok = tiny_tokenizer()
    tok.padding_side = tokenizer_side  # ignored: generate_greedy pads itself
    model = _chaotic_gpt2(tok)
    limits = [7, 12, 5, 9, 3]
    single = [generate_greedy(model, tok, [p], [n], stop_ids=set(), return_ids=True)[0] for p, n in zip(PROMPTS, limits)]
    assert [len(s) for s in single] == limits and all(len(set(s)) > 1 for s in single[:4])
    batched = generate_greedy(model, tok, PROMPTS, limits, batch_size=3, padding_side=padding_side, stop_ids=set(),
                              return_ids=True)
    assert batched == single

    # ... and both equal a plain loop that re-runs the whole unpadded sequence for every token
    from lit_edit.tokens import bos_ids, encode

    for prompt, n, want in zip(PROMPTS, limits, single):
        ids = bos_ids(tok) + encode(tok, prompt)
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[-n:] == want
    texts = generate_greedy(model, tok, PROMPTS, limits, batch_size=2, padding_side=padding_side, stop_ids=set())
    assert texts == [tok.decode(s, skip_special_tokens=True).strip() for s in single]


def test_greedy_generation_stops_at_a_stop_token():
    from lit_edit.metrics import generate_greedy

    tok = tiny_tokenizer()
    model = _chaotic_gpt2(tok)
    full = generate_greedy(model, tok, PROMPTS[:2], 12, stop_ids=set(), return_ids=True)
    stop_token = full[0][4]
    cut = generate_greedy(model, tok, PROMPTS[:2], 12, stop_ids={stop_token}, batch_size=2, return_ids=True)
    assert cut[0] == full[0][: full[0].index(stop_token)]
    assert cut[1] == (full[1][: full[1].index(stop_token)] if stop_token in full[1] else full[1])
    with pytest.raises(ValueError, match="context"):
        generate_greedy(model, tok, ["Tom"], 64)


def test_unstructured_scores_on_a_tiny_model(capsys):
    from lit_edit.metrics import generate_answers, score_generations, text_scores, unstructured_scores

    tok = tiny_tokenizer()
    model = _chaotic_gpt2(tok)
    requests = [
        UnstructuredRequest(1, "Anna Berk lives in", "the city of Paris. Tom Lund works as a baker.",
                            paraphrase_questions=["Tom", "The city is"], source="unke"),
        UnstructuredRequest(2, "Ola", "Dunn plays the violin.", source="editeverything", category="music"),
    ]
    gens = generate_answers(model, tok, requests, batch_size=2)
    assert len(gens[0]["para"]) == 2 and gens[1]["para"] == []
    scores = unstructured_scores(model, tok, requests, batch_size=2)
    assert "BERTScore skipped" in capsys.readouterr().out
    assert set(scores) == {"bleu", "rouge_l", "para.bleu", "para.rouge_l", "music.bleu", "music.rouge_l"}
    by_text = text_scores([gens[0]["question"], gens[1]["question"]], [requests[0].answer, requests[1].answer])
    assert scores["rouge_l"] == pytest.approx(sum(by_text["rouge_l"]) / 2)
    para = text_scores(gens[0]["para"], [requests[0].answer] * 2)
    assert scores["para.bleu"] == pytest.approx(sum(para["bleu"]) / 2)
    assert scores["music.rouge_l"] == pytest.approx(by_text["rouge_l"][1])
    # a generation equal to the answer scores 1
    perfect = score_generations(requests[:1], [{"question": requests[0].answer, "para": [], "sub": []}])
    assert perfect == [{"bleu": pytest.approx(1.0), "rouge_l": pytest.approx(1.0)}]
    # a record that cannot be generated within the context names its case and field
    long = UnstructuredRequest(9, "Tom", " ".join(["Tom Lund works as a baker."] * 12))
    with pytest.raises(EditRequestError) as info:
        unstructured_scores(model, tok, [long])
    assert (info.value.case_id, info.value.field) == (9, "answer")


def test_sub_question_rouge(tmp_path):
    from lit_edit.metrics import score_generations

    request = UnstructuredRequest(1, "Q?", "A long answer.", sub_questions=["s1", "s2"], sub_answers=["Paris", "red car"])
    per = score_generations([request], [{"question": "A long answer.", "para": [], "sub": ["Paris", "car"]}],
                            style="reference")
    assert per[0]["sub.rouge_l"] == pytest.approx((1.0 + 0.5) / 2)  # recall per sub-answer, mean over them


def test_bertscore_needs_a_local_model(tmp_path, capsys):
    from lit_edit.metrics import embedding_scores
    from tests.helpers import tiny_bert

    assert embedding_scores(["a b"], ["a b"], None) is None
    assert "no local scoring model" in capsys.readouterr().out
    assert embedding_scores(["a b"], ["a b"], "sentence-transformers/all-MiniLM-L6-v2") is None  # never downloaded
    assert "not a local model directory" in capsys.readouterr().out

    tiny_bert(tmp_path)
    preds, refs = ["the cat sat on a mat", "the dog ran"], ["the cat sat on a mat", "a cat sat in the park today"]
    for mode in ("cosine", "bertscore"):
        same, other = embedding_scores(preds, refs, str(tmp_path), mode=mode)
        assert same == pytest.approx(1.0, abs=1e-5) and other < 0.999
