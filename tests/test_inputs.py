"""Bad input fails early, naming the file / record / field / setting: edit-record files (malformed, empty,
non-UTF-8, record-less), evaluation prompts longer than the model's context, and model paths / custom code.

New names are imported inside the tests, so that against older code each test fails on its own assertion
rather than the whole file failing to import. No test touches the network.
"""
from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import pytest
import torch

from lit_edit.data import EditDataModule, load_records, read_zsre
from lit_edit.requests import EditRequest, EditRequestError
from tests.helpers import shared_file, tiny_gpt2, tiny_tokenizer

RECORD = {"case_id": 1, "requested_rewrite": {"prompt": "{} was born in", "subject": "Anna Berk",
                                              "target_new": {"str": "London"}, "target_true": {"str": "Paris"}}}


# --------------------------------------------------------------------------------------------
# Edit-record files
# --------------------------------------------------------------------------------------------

BAD_FILES = {
    # name: (file name, bytes, what the message must say)
    "empty": ("cf.json", b"", "is empty"),
    "whitespace_only": ("cf.jsonl", b"\n  \n\n", "is empty"),
    "not_utf8": ("cf.json", b'[{"case_id": 1, "x": "caf\xe9"}]', "is not valid UTF-8 at byte 25 (line 1)"),  # 0-based, as hexdump
    "truncated_json": ("cf.json", b'[\n  {"case_id": 1},\n  {"case_id": 2', "is not valid JSON: Expecting ',' delimiter at "
                       "line 3 column 16"),
    # datasets (ujson) used to accept the trailing comma; json.load, as every other reader, does not
    "trailing_comma": ("cf.json", b'[\n  {"case_id": 1},\n  {"case_id": 2,}\n]', "is not valid JSON: Expecting property "
                       "name enclosed in double quotes at line 3 column 17"),
    "bad_jsonl_line": ("cf.jsonl", b'{"case_id": 1}\n\n{"case_id": }\n', "is not valid JSON: Expecting value at line 3 "
                       "column 13"),
    "bad_line_in_json_lines_json": ("cf.json", b'{"case_id": 1}\n{"case_id": 2}\n{"case_id" 3}\n',
                                    "is not valid JSON: Expecting ':' delimiter at line 3 column 12"),
    "empty_list": ("cf.json", b"[]", "holds no records"),
    "top_level_object": ("cf.json", b'{\n "case_id": 1\n}', "holds a JSON object at the top level; expected a list"),
    "non_object_record": ("cf.json", b'[{"case_id": 1}, {"case_id": 2}, [3]]', "record 2 is a JSON array"),
    "non_object_line": ("cf.jsonl", b'{"case_id": 1}\n"two"\n', "line 2 is a JSON string"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_records_file_is_named_with_what_is_wrong(tmp_path, case):
    name, data, says = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    assert f"edit records file {path}" in str(err.value) and says in str(err.value)
    from lit_edit.data import EditDataError

    assert isinstance(err.value, EditDataError)


def test_bad_file_in_a_directory_is_named(tmp_path):
    """Each file of a directory is checked; hidden files, which datasets does not read, are not."""
    (tmp_path / "train.json").write_text(json.dumps([RECORD]), encoding="utf-8")
    (tmp_path / ".notes.json").write_text("not json", encoding="utf-8")
    assert [r["case_id"] for r in load_records(str(tmp_path))] == [1]
    (tmp_path / "test.jsonl").write_text('{"case_id": 2}\n{', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'test.jsonl'} is not valid JSON: .* at line 2 column 2"):
        load_records(str(tmp_path))


def test_formats_datasets_reads_still_load(tmp_path):
    """The pre-check must not refuse what datasets reads: JSON Lines in a .json file, a UTF-8 BOM."""
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps({**RECORD, "case_id": i}) for i in (1, 2)) + "\n", encoding="utf-8")
    assert [r["case_id"] for r in load_records(str(lines))] == [1, 2]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([RECORD]).encode("utf-8"))
    assert [r["case_id"] for r in load_records(str(bom))] == [1]


def test_a_datasets_error_names_the_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([RECORD]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"cannot load edit records from {path} \(split 'test'\).*Unknown split"):
        load_records(str(path), split="test")


def test_limit_zero_gives_no_records_and_an_empty_stream_says_so(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([RECORD]), encoding="utf-8")
    assert load_records(str(path), limit=0) == []
    dm = EditDataModule(dataset="counterfact", path=str(path), limit=0, batch_size=1)
    with pytest.raises(ValueError, match=r"the edit stream is empty \(counterfact at .*cf.json'.*limit=0\)"):
        dm.setup()


@pytest.mark.parametrize("name", ["./absent_dir", "absent/records/", "../absent_dir/cf"])
def test_missing_local_records_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"edit records file or directory {name} does not exist"):
        load_records(name)


def test_hub_dataset_unavailable_offline_names_the_id(monkeypatch):
    """In offline mode datasets answers from its cache only, so this never reaches the network."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot load edit records from hub dataset 'lit-edit-tests/absent' "
                                         r"\(split 'train'\)"):
        load_records("lit-edit-tests/absent")


# --------------------------------------------------------------------------------------------
# Evaluation sequences longer than the model's context
# --------------------------------------------------------------------------------------------


def _words(tok, n_tokens: int, target: str) -> str:
    """A prompt that, scored against ``target`` (BOS + prompt + target ids), is exactly ``n_tokens`` long."""
    from lit_edit.metrics import scored_prefix
    from lit_edit.tokens import target_ids

    k = 0
    while len(scored_prefix(tok, "The city" + " the" * k)) + len(target_ids(tok, target)) < n_tokens:
        k += 1
    prompt = "The city" + " the" * k
    assert len(scored_prefix(tok, prompt)) + len(target_ids(tok, target)) == n_tokens  # " the" is one token
    return prompt


def whole(model, tok, requests):
    """Every pair of ``requests`` scored the reference code's way (prompt + whole target in one forward), which is the
    length the structured check guards; :func:`~lit_edit.metrics.score_targets` never feeds a target's last token, so
    it would need one position less."""
    from lit_edit.metrics import score_targets_whole, scored_pairs

    pairs = [(p, t) for r in requests for _, _, _, p, t in scored_pairs(r)]
    return score_targets_whole(model, tok, [p for p, _ in pairs], [t for _, t in pairs])


def test_structured_check_is_exactly_the_scorers_limit():
    """A paraphrase whose scored sequence is exactly the context passes and scores; one token more is refused
    with case id, field and both lengths, and is exactly what makes the reference-style scorer fail."""
    from lit_edit.data import check_structured_length
    from lit_edit.metrics import record_scores

    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)  # n_positions = 64
    # target_true is the longer target, so it decides the length
    fits = _words(tok, 64, "the city of Paris")
    req = EditRequest(7, "{} lives in the city of", "Anna Berk", "London", "the city of Paris",
                      paraphrase_prompts=["Anna Berk lives in", fits])
    assert check_structured_length(req, tok, model) is req
    assert set(record_scores(model, tok, [req])[0]) == {"efficacy", "generalization", "efficacy_magnitude",
                                                        "generalization_magnitude"}
    req.paraphrase_prompts[1] = fits + " the"
    with pytest.raises(EditRequestError) as err:
        check_structured_length(req, tok, model)
    assert (err.value.case_id, err.value.field) == (7, "paraphrase_prompts[1]")
    assert "+ target_true" in str(err.value) and "= 65 tokens" in str(err.value) and "context is 64" in str(err.value)
    with pytest.raises(IndexError):  # what the check stands in front of: one forward of prompt + target per pair
        whole(model, tok, [req])


def test_structured_check_covers_neighbourhood_prompts_and_skips_removals():
    from lit_edit.data import check_structured_lengths

    tok = tiny_tokenizer()
    long = _words(tok, 30, "Paris")  # " Paris" and " French" are as many tokens
    ok = EditRequest(1, "{} lives in the city of", "Anna Berk", "London", "Paris", neighborhood_prompts=["Tom Lund"])
    bad = EditRequest(2, "{} speaks", "Mira Voss", "Paris", "French", neighborhood_prompts=["Tom Lund", long],
                      attribute_prompts=[long * 3], generation_prompts=[long * 3])  # not scored: not checked
    removal = EditRequest(3, "{} speaks", "Ola Dunn", "", None, op="remove", paraphrase_prompts=[long * 3])
    with pytest.raises(EditRequestError) as err:
        check_structured_lengths([ok, bad, removal], tok, 29)
    assert (err.value.case_id, err.value.field) == (2, "neighborhood_prompts[1]")
    assert check_structured_lengths([ok, bad, removal], tok, 30) == [ok, bad, removal]


def test_zsre_locality_prompt_too_long_for_world_tiny(tiny_world, caplog):
    """The real ZsRE sample on the 64-token world model: some locality question + its answer does not fit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_edit.data import check_structured_lengths
    from lit_edit.metrics import record_scores

    tok = AutoTokenizer.from_pretrained(tiny_world / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "model")
    requests = read_zsre(str(shared_file("zsre_sample.json")), limit=20)
    with pytest.raises(EditRequestError) as err:
        check_structured_lengths(requests, tok, model)
    assert err.value.field == "neighborhood_prompts[0]" and "neighborhood_targets[0]" in str(err.value)
    (bad,) = [r for r in requests if r.case_id == err.value.case_id]
    with pytest.raises(IndexError):
        whole(model, tok, [bad])
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        kept = check_structured_lengths(requests, tok, model, on_invalid="skip")
    assert bad not in kept and len(kept) < len(requests)
    assert f"case_id={bad.case_id!r}, field 'neighborhood_prompts[0]'" in caplog.text
    record_scores(model, tok, kept)  # everything kept can be scored


def test_counterfact_paraphrase_too_long_is_refused_before_any_edit(tiny_world, tmp_path):
    """The real CounterFact sample on world:tiny (64 tokens): record 212 has a paraphrase of 108 tokens, which used
    to end in a bare IndexError in the pre-edit evaluation."""
    from tests.test_module import make_module, make_trainer

    module = make_module()  # eval_pre=True: the pre-edit evaluation is where it used to fail
    dm = EditDataModule(dataset="counterfact", path=str(shared_file("counterfact_sample.json")), offset=5, limit=1,
                        batch_size=1)
    with pytest.raises(EditRequestError) as err:
        make_trainer(tmp_path, ckpt=False).fit(module, dm)
    from lit_edit.metrics import scored_prefix

    (request,) = dm.requests
    assert err.value.case_id == request.case_id == 212
    assert err.value.field.startswith("paraphrase_prompts[")
    slot = int(err.value.field.split("[")[1].rstrip("]"))
    n_prompt = len(scored_prefix(module.tok, request.paraphrase_prompts[slot]))
    assert n_prompt > 64 and f"prompt ({n_prompt} tokens)" in str(err.value) and "context is 64" in str(err.value)
    assert module.solver.n_edits == 0


def _world_file(tiny_world, tmp_path, n: int, long_case: int) -> tuple[Path, list, str]:
    """The first ``n`` world records, the ``long_case``-th with a last paraphrase longer than the model's context;
    returns the file, the case ids and that paraphrase's field name."""
    records = json.loads((tiny_world / "counterfact.json").read_text())[:n]
    paraphrases = records[long_case]["paraphrase_prompts"]
    paraphrases.append("word " * 70 + paraphrases[0])
    path = tmp_path / "world.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, [r["case_id"] for r in records], f"paraphrase_prompts[{len(paraphrases) - 1}]"


def test_skip_drops_a_too_long_request_and_a_resume_sees_the_same_stream(tiny_world, tmp_path, caplog):
    """on_invalid="skip": the request is dropped from the run and from the data module's stream (logged); the
    checkpoint describes the filtered stream, and a resumed run filters the same way and finishes it."""
    from lit_edit.data import StreamStateError, stream_fingerprint
    from tests.test_module import make_module, make_trainer

    path, ids, field = _world_file(tiny_world, tmp_path, 5, long_case=2)
    expect = ids[:2] + ids[3:]
    a, dm_a = make_module(eval_pre=False), EditDataModule(dataset="world", path=str(path), batch_size=2,
                                                          on_invalid="skip")
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        make_trainer(tmp_path / "a", max_steps=1).fit(a, dm_a)
    assert f"case_id={ids[2]!r}, field '{field}'" in caplog.text
    assert [r.case_id for r in dm_a.requests] == [r.case_id for r in a.requests] == expect
    assert a.edited_ids == expect[:2]
    ckpt = torch.load(tmp_path / "a" / "ckpt" / "step=1.ckpt", weights_only=False)
    (state,) = [v for v in ckpt.values() if isinstance(v, dict) and "fingerprint" in v]
    assert (state["n_requests"], state["fingerprint"]) == (4, stream_fingerprint(dm_a.requests))

    b, dm_b = make_module(eval_pre=False), EditDataModule(dataset="world", path=str(path), batch_size=2,
                                                          on_invalid="skip")
    make_trainer(tmp_path / "a").fit(b, dm_b, ckpt_path=str(tmp_path / "a" / "ckpt" / "step=1.ckpt"))  # its run dir
    assert b.edited_ids == expect and dm_b.consumed == 2

    # a resume that would filter differently (the long paraphrase gone) is refused, not run on another stream
    records = json.loads(path.read_text())
    records[2]["paraphrase_prompts"].pop()
    path.write_text(json.dumps(records), encoding="utf-8")
    c, dm_c = make_module(eval_pre=False), EditDataModule(dataset="world", path=str(path), batch_size=2,
                                                          on_invalid="skip")
    with pytest.raises(StreamStateError):
        make_trainer(tmp_path / "a").fit(c, dm_c, ckpt_path=str(tmp_path / "a" / "ckpt" / "step=1.ckpt"))


def test_drop_requests_only_before_any_batch_is_applied(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{**RECORD, "case_id": i} for i in range(5)]), encoding="utf-8")
    dm = EditDataModule(dataset="counterfact", path=str(path), batch_size=2)
    dm.setup()
    dm.drop_requests([1, 3])
    assert [r.case_id for r in dm.requests] == [0, 2, 4] and dm.n_batches == 2
    with pytest.raises(ValueError, match="not in the edit stream"):
        dm.drop_requests([1])
    dm.mark_applied()
    with pytest.raises(RuntimeError, match="already applied"):
        dm.drop_requests([4])


def test_unstructured_skip_follows_the_data_module(tiny_world, tmp_path, caplog):
    """The unstructured length check (check_lengths) honours on_invalid="skip" too."""
    from lit_edit.data import read_requests
    from lit_edit.module import EditModule
    from lit_edit.methods import Windows
    from lit_edit.solvers import MEMIT
    from lit_edit.stats import StatsConfig
    from tests.test_module import make_trainer

    records = [{"id": r.case_id, "question": r.question, "answer": r.answer, "para_question": r.para_question}
               for r in read_requests("world_long", "world:tiny", limit=3)]
    records[1]["para_question"] = "word " * 70 + records[1]["para_question"]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    module = EditModule(model="world:tiny", layers=[0, 1], solver=MEMIT(mom2_update_weight=100.0),
                        method=Windows(method="muke", window_size=1), eval_pre=False,
                        stats=StatsConfig(dataset="world:tiny", max_length=64), context_templates=[])
    dm = EditDataModule(dataset="world_long", path=str(path), batch_size=1, on_invalid="skip")
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        make_trainer(tmp_path, max_steps=0, ckpt=False).fit(module, dm)
    assert [r.case_id for r in dm.requests] == [r.case_id for r in module.requests] == [records[0]["id"],
                                                                                         records[2]["id"]]
    assert f"case_id={records[1]['id']!r}, field 'paraphrase_questions'" in caplog.text


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


def test_local_path_or_hub_id():
    from lit_edit.data import looks_like_local_path

    for hub in ["gpt2-xl", "meta-llama/Llama-3-8B", "openai-community/gpt2-xl", "Qwen/Qwen2.5-7B-Instruct"]:
        assert not looks_like_local_path(hub), hub
    for path in ["/models/gpt2", "./x", "../x", "~/models/gpt2", "models/gpt2/", "a/b/c", ".", "./"]:
        assert looks_like_local_path(path), path


def test_an_existing_directory_is_always_a_path(tmp_path, monkeypatch):
    from lit_edit.data import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("models/gpt2")  # the hub's org/name form, and nothing here
    (tmp_path / "models" / "gpt2").mkdir(parents=True)
    assert looks_like_local_path("models/gpt2")


@pytest.mark.parametrize("name", ["/nonexistent/lit_edit_model", "./absent_model", "models/gpt2/", "~/lit_edit_absent"])
def test_missing_model_directory_is_named(tmp_path, monkeypatch, name):
    from lit_edit.models import load_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"model directory {name} does not exist \(model\.model\)"):
        load_model(name)


def _save_tiny(path: Path) -> Path:
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    tiny_gpt2(tok, n_layer=2, dtype=torch.float32).save_pretrained(path)
    return path


def test_a_local_dir_named_world_something_is_a_path(tmp_path, monkeypatch):
    """Only is_world_spec ("world", "world:<preset>") means the built-in world."""
    from lit_edit.models import load_model

    _save_tiny(tmp_path / "world_models" / "gpt2")
    monkeypatch.chdir(tmp_path)
    model, tok, path = load_model("world_models/gpt2")
    assert Path(path) == Path("world_models/gpt2") and model.config.n_layer == 2 and len(tok) == model.config.vocab_size


def test_trust_remote_code_is_passed_to_both_loaders(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_edit.models import load_model
    from lit_edit.module import EditModule

    path = _save_tiny(tmp_path / "m")
    seen = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(*args, _real=real, _cls=cls, **kwargs):
            seen.append((_cls.__name__, kwargs.get("trust_remote_code", "not passed")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(path))
    assert seen == [("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    seen.clear()
    module = EditModule(model=str(path), layers=[0, 1], trust_remote_code=True, context_templates=[])
    assert module.hparams.trust_remote_code is True

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop  # the loading is what is under test; stop before the rest of the set-up

    monkeypatch.setattr("lit_edit.module.get_layout", stop)
    with pytest.raises(Stop):
        module.configure_model()
    assert seen == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]


def test_custom_code_model_is_refused_without_a_prompt(tmp_path, monkeypatch):
    """A model directory whose config asks for custom code: refused with transformers' explanation, and never an
    interactive "Do you wish to run the custom code? [y/N]" (a prompt here would answer yes)."""
    from lit_edit.models import load_model

    path = _save_tiny(tmp_path / "custom")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="lit_edit_custom_test",
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    prompts = []

    def answer_yes(message=""):
        prompts.append(message)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(str(path))
    assert prompts == []
