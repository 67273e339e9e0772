"""Tests for lit_edit.data: benchmark readers, validation at load time, resumable batching.

Real samples come from ``../shared/data`` beside the checkout; the tests that need them skip
(with the reason) when it is absent. Everything else uses small JSON files in ``tmp_path``.
No test touches the network.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # belt and braces: nothing here needs the hub

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_edit.data import (
    READERS,
    EditDataModule,
    EditLoader,
    StreamStateError,
    load_records,
    read_counterfact,
    read_requests,
    read_zsre,
)
from lit_edit.requests import EditRequestError
from tests.helpers import shared_file



@pytest.fixture
def counterfact_path() -> Path:
    return shared_file("counterfact_sample.json")


@pytest.fixture
def zsre_path() -> Path:
    return shared_file("zsre_sample.json")


def _cf_record(case_id, subject: str | None = None, **rewrite_overrides) -> dict:
    """A valid CounterFact-schema record; ``rewrite_overrides`` replace requested_rewrite keys."""
    subject = subject or f"Subject{case_id}"
    rewrite = {
        "prompt": "{} was born in",
        "relation_id": "P19",
        "target_new": {"str": f"City{case_id}", "id": "Q1"},
        "target_true": {"str": "Paris", "id": "Q90"},
        "subject": subject,
    }
    rewrite.update(rewrite_overrides)
    return {
        "case_id": case_id,
        "pararel_idx": 0,
        "requested_rewrite": rewrite,
        "paraphrase_prompts": [f"Some text. {subject} is a native of"],
        "neighborhood_prompts": ["Someone else was born in"],
        "attribute_prompts": ["Another person was born in"],
        "generation_prompts": [f"{subject} grew up in"],
    }


def _zsre_record(subject="Watts Humphrey", src="What university did Watts Humphrey attend?", **overrides) -> dict:
    record = {
        "subject": subject,
        "src": src,
        "pred": "Trinity College",
        "rephrase": f"Which university did {subject} go to?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "William Shakespeare",
        "cond": "unused",
    }
    record.update(overrides)
    return record


def _write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------


def test_counterfact_sample_all_records_mapped(counterfact_path):
    raw = json.loads(counterfact_path.read_text(encoding="utf-8"))
    requests = read_counterfact(str(counterfact_path))
    assert len(requests) == len(raw) == 300
    assert [r.case_id for r in requests] == [rec["case_id"] for rec in raw]  # file order kept
    assert all(r.source == "counterfact" and r.neighborhood_targets is None for r in requests)

    first = requests[0]  # case 18 of the sample
    assert first.case_id == 18
    assert first.prompt == "{}, created by"
    assert first.subject == "Porsche 911"
    assert first.filled_prompt == "Porsche 911, created by"
    assert first.target_new == "Honda"
    assert first.target_true == "Porsche"
    assert first.relation_id == "P176"
    assert first.paraphrase_prompts[1].endswith("Porsche 911, developed by")
    assert len(first.paraphrase_prompts) == 2
    assert first.neighborhood_prompts[0] == "Porsche RS Spyder is produced by"
    assert len(first.neighborhood_prompts) == 10
    assert first.attribute_prompts[0] == "Honda Mobilio Spike is a product of"
    assert first.generation_prompts[4] == "Porsche 911 is sold by"

    second = requests[1]
    assert (second.case_id, second.subject) == (55, "John James Rickard Macleod")
    assert second.prompt == "{}'s domain of work is"
    assert (second.target_new, second.target_true, second.relation_id) == ("psychology", "physiology", "P101")


def test_counterfact_limit_takes_first_records_in_order(counterfact_path):
    raw = json.loads(counterfact_path.read_text(encoding="utf-8"))
    requests = read_counterfact(str(counterfact_path), limit=7)
    assert [r.case_id for r in requests] == [rec["case_id"] for rec in raw[:7]]
    assert [r.case_id for r in requests] == [18, 55, 70, 106, 116] + [rec["case_id"] for rec in raw[5:7]]


def test_multi_rewrite_records_are_flattened(tmp_path):
    """MQuAKE-style records (a list of rewrites) give one request per rewrite: case_id, case_id_1, ..."""
    record = _cf_record(7)
    second = dict(record["requested_rewrite"], subject="Other", target_new={"str": "Rome", "id": "Q2"})
    record["requested_rewrite"] = [record["requested_rewrite"], second]
    single = _cf_record(8)
    single["requested_rewrite"] = [single["requested_rewrite"]]  # a list of one
    path = _write_json(tmp_path / "mquake.json", [record, single])
    requests = read_counterfact(str(path))
    assert [r.case_id for r in requests] == [7, "7_1", 8]
    assert requests[1].subject == "Other" and requests[1].target_new == "Rome"
    assert requests[1].paraphrase_prompts == record["paraphrase_prompts"]


def test_akew_mquake_sample_flattens():
    path = shared_file("akew_mquake_sample.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    requests = read_counterfact(str(path))
    assert len(requests) == sum(len(rec["requested_rewrite"]) for rec in raw) == 62
    assert requests[0].case_id == raw[0]["case_id"]


def test_world_reader_is_counterfact_schema(tmp_path):
    path = _write_json(tmp_path / "counterfact.json", [_cf_record(i) for i in range(3)])
    requests = read_requests("world", str(path))
    assert [r.source for r in requests] == ["world"] * 3
    assert set(READERS) >= {"counterfact", "zsre", "world"}


# --------------------------------------------------------------------------------------------
# ZsRE
# --------------------------------------------------------------------------------------------


def test_zsre_sample_mapping(zsre_path):
    raw = json.loads(zsre_path.read_text(encoding="utf-8"))
    requests = read_zsre(str(zsre_path))
    assert len(requests) == len(raw) == 300
    assert [r.case_id for r in requests] == list(range(300))
    for request, record in zip(requests, raw):
        assert "{}" in request.prompt
        assert request.filled_prompt == record["src"]
        assert request.subject == record["subject"]
        assert request.target_new == record["answers"][0]
        assert request.target_true is None
        assert request.paraphrase_prompts == [record["rephrase"]]
        assert request.neighborhood_prompts == [record["loc"] + "?"]
        assert request.neighborhood_prompts[0].endswith("?")
        assert request.neighborhood_targets == [record["loc_ans"]]
        assert request.source == "zsre"
    assert requests[0].prompt == "What university did {} attend?"
    assert requests[0].target_new == "Illinois Institute of Technology"


def test_zsre_alt_target_skips_the_two_empty_alts(zsre_path, caplog):
    """Records 54 and 103 of the real sample have alt == "": invalid as an EasyEdit-style target."""
    raw = json.loads(zsre_path.read_text(encoding="utf-8"))
    with pytest.raises(EditRequestError) as info:
        read_zsre(str(zsre_path), target_field="alt")
    assert (info.value.case_id, info.value.field) == (54, "alt")
    assert "54" in str(info.value) and "alt" in str(info.value)

    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        requests = read_zsre(str(zsre_path), target_field="alt", on_invalid="skip")
    assert len(requests) == 298
    assert {54, 103}.isdisjoint(r.case_id for r in requests)
    assert all(r.target_new == raw[r.case_id]["alt"] for r in requests)
    skipped = [rec.getMessage() for rec in caplog.records if "skipping" in rec.getMessage()]
    assert len(skipped) == 2 and "case_id=54" in skipped[0] and "case_id=103" in skipped[1]


def test_zsre_limit_and_bad_options(zsre_path):
    assert [r.case_id for r in read_zsre(str(zsre_path), limit=5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="target_field"):
        read_zsre(str(zsre_path), target_field="pred")
    with pytest.raises(ValueError, match="on_invalid"):
        read_zsre(str(zsre_path), on_invalid="ignore")


@pytest.mark.parametrize(
    "bad, field",
    [
        (_zsre_record(subject="Grace Hopper"), "subject"),  # subject not in src
        (_zsre_record(subject="Hamlet", src='Who wrote "Hamlet"?'), "prompt"),  # glued to a quote
        (_zsre_record(subject="Hamlet", src="Who wrote the play (Hamlet)?"), "prompt"),  # glued to "("
        (_zsre_record(answers=[]), "answers"),
        (_zsre_record(loc_ans=None), "loc_ans"),
    ],
)
def test_zsre_bad_records(tmp_path, caplog, bad, field):
    path = _write_json(tmp_path / "zsre.json", [_zsre_record(), bad, _zsre_record()])
    with pytest.raises(EditRequestError) as info:
        read_zsre(str(path))
    assert (info.value.case_id, info.value.field) == (1, field)
    assert "case_id=1" in str(info.value) and repr(field) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        assert [r.case_id for r in read_zsre(str(path), on_invalid="skip")] == [0, 2]
    assert any("case_id=1" in rec.getMessage() for rec in caplog.records)


def test_zsre_subject_at_start_is_fine(tmp_path):
    path = _write_json(tmp_path / "zsre.json", [_zsre_record(subject="Hamlet", src="Hamlet was written by whom?")])
    assert read_zsre(str(path))[0].prompt == "{} was written by whom?"


# --------------------------------------------------------------------------------------------
# Bad CounterFact input
# --------------------------------------------------------------------------------------------


def _without(record: dict, *keys: str) -> dict:
    record = copy.deepcopy(record)
    target = record
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]
    return record


BAD_COUNTERFACT = {
    "prompt without {}": (_cf_record(501, prompt="The birthplace is"), "prompt"),
    "missing subject": (_without(_cf_record(501), "requested_rewrite", "subject"), "subject"),
    "empty target_new": (_cf_record(501, target_new={"str": " ", "id": "Q1"}), "target_new"),
    "target_new == target_true": (_cf_record(501, target_new={"str": "Paris", "id": "Q90"}), "target_new"),
    "missing requested_rewrite": (_without(_cf_record(501), "requested_rewrite"), "requested_rewrite"),
    "missing target_true": (_without(_cf_record(501), "requested_rewrite", "target_true"), "target_true"),
    "missing target_new str": (_without(_cf_record(501), "requested_rewrite", "target_new", "str"), "target_new"),
    "unknown op": ({**_cf_record(501), "op": "delete"}, "op"),
}


@pytest.mark.parametrize("alone", [False, True], ids=["among-good", "alone"])
@pytest.mark.parametrize("name", list(BAD_COUNTERFACT))
def test_counterfact_bad_record_names_case_and_field(tmp_path, name, alone):
    """Broken records fail at load time with the case id and field, never a bare KeyError.

    "alone": the only record, so a missing key is absent from the dict; "among-good": the
    ``datasets`` schema unification turns the missing key into ``None``.
    """
    bad, field = BAD_COUNTERFACT[name]
    records = [bad] if alone else [_cf_record(500), bad, _cf_record(502)]
    path = _write_json(tmp_path / "cf.json", records)
    with pytest.raises(EditRequestError) as info:
        read_counterfact(str(path))
    assert info.value.case_id == 501 and info.value.field == field
    assert "501" in str(info.value) and field in str(info.value)


def test_counterfact_duplicate_case_id(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(500), _cf_record(501), _cf_record(501, subject="Another")])
    for on_invalid in ("raise", "skip"):  # a duplicate is never skipped silently
        with pytest.raises(EditRequestError) as info:
            read_counterfact(str(path), on_invalid=on_invalid)
        assert info.value.case_id == 501 and info.value.field == "case_id"
        assert "501" in str(info.value) and "case_id" in str(info.value)


def test_counterfact_skip_invalid_logs_each(tmp_path, caplog):
    records = [_cf_record(1), _cf_record(2, prompt="no placeholder"), _cf_record(3), _cf_record(4, subject=" ")]
    path = _write_json(tmp_path / "cf.json", records)
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        requests = read_counterfact(str(path), on_invalid="skip")
    assert [r.case_id for r in requests] == [1, 3]
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert "case_id=2, field 'prompt'" in messages and "case_id=4, field 'subject'" in messages


def test_load_records_local_paths(tmp_path):
    path = _write_json(tmp_path / "cf.json", [_cf_record(i) for i in range(4)])
    assert [r["case_id"] for r in load_records(str(path), limit=2)] == [0, 1]
    (tmp_path / "recs.jsonl").write_text("\n".join(json.dumps(_cf_record(i)) for i in (5, 6)), encoding="utf-8")
    assert [r["case_id"] for r in load_records(str(tmp_path / "recs.jsonl"))] == [5, 6]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_json(folder / "train.json", [_cf_record(9)])
    assert [r["case_id"] for r in load_records(str(folder))] == [9]
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "absent.json"))


# --------------------------------------------------------------------------------------------
# EditDataModule: batching and position
# --------------------------------------------------------------------------------------------


def _stream_file(tmp_path: Path, n: int = 23) -> Path:
    return _write_json(tmp_path / "stream.json", [_cf_record(100 + i) for i in range(n)])


def _datamodule(path: Path, **kwargs) -> EditDataModule:
    kwargs.setdefault("batch_size", 5)
    return EditDataModule(dataset="counterfact", path=path if isinstance(path, (list, int)) else str(path), **kwargs)


def test_batches_in_stream_order(tmp_path):
    dm = _datamodule(_stream_file(tmp_path))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, EditLoader) and len(loader) == 5
    batches = list(loader)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [r.case_id for b in batches for r in b] == list(range(100, 123))
    assert list(loader) == batches  # no shuffling: the same again


def test_offset_and_limit(tmp_path):
    dm = _datamodule(_stream_file(tmp_path), offset=4, limit=7, batch_size=3)
    dm.setup()
    assert [r.case_id for r in dm.requests] == list(range(104, 111))
    assert [[r.case_id for r in b] for b in dm.train_dataloader()] == [[104, 105, 106], [107, 108, 109], [110]]
    empty = _datamodule(_stream_file(tmp_path), offset=23)
    with pytest.raises(ValueError, match="empty"):
        empty.setup()


def test_order_seed_permutes_the_same_requests(tmp_path):
    """data.order_seed: the records offset..offset+limit, each once, in a seeded order; the same seed the same
    order (and fingerprint, so a resume finds its stream), another seed another order; null the file's order."""
    path = _stream_file(tmp_path)
    ids = lambda dm: [r.case_id for r in dm.requests]  # noqa: E731
    plain, a, a2, b = (_datamodule(path, offset=3, limit=15, order_seed=s) for s in (None, 0, 0, 1))
    for dm in (plain, a, a2, b):
        dm.setup()
    assert ids(plain) == list(range(103, 118))
    assert sorted(ids(a)) == sorted(ids(b)) == ids(plain)
    assert ids(a) == ids(a2) and ids(a) != ids(plain) and ids(a) != ids(b)
    assert a.state_dict()["fingerprint"] == a2.state_dict()["fingerprint"] != plain.state_dict()["fingerprint"]
    assert [r.case_id for batch in a.train_dataloader() for r in batch] == ids(a)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_order_seed_bad_values(tmp_path, bad):
    with pytest.raises(ValueError, match="data.order_seed"):
        _datamodule(_stream_file(tmp_path), order_seed=bad)


def test_a_list_of_paths_is_one_stream_with_prefixed_case_ids(tmp_path):
    """data.path as a list: the files in order, each id prefixed by its file's stem (the two files share ids 100 and
    101), offset and limit across the files; the same stem twice is refused; a bad path setting is named."""
    a = _write_json(tmp_path / "first.json", [_cf_record(100 + i) for i in range(3)])
    b = _write_json(tmp_path / "second.json", [_cf_record(100 + i, subject=f"Other{i}") for i in range(4)])
    dm = _datamodule([str(a), str(b)], batch_size=2)
    dm.setup()
    assert [r.case_id for r in dm.requests] == ["first:100", "first:101", "first:102", "second:100", "second:101",
                                                "second:102", "second:103"]
    assert dm.requests[3].subject == "Other0"
    part = _datamodule([str(a), str(b)], offset=2, limit=3)
    part.setup()
    assert [r.case_id for r in part.requests] == ["first:102", "second:100", "second:101"]
    (tmp_path / "sub").mkdir()
    twin = _write_json(tmp_path / "sub" / "first.json", [_cf_record(7)])
    with pytest.raises(ValueError, match="same name 'first'"):
        _datamodule([str(a), str(twin)]).setup()
    for bad in ([], [str(a), 3], 5):
        with pytest.raises(ValueError, match="data.path"):
            _datamodule(bad)


def test_drop_repeats_drops_exact_repeats_only(tmp_path, caplog):
    """data.drop_repeats: a request with an earlier one's fact and new target is dropped (and counted in the log);
    the same fact with another target stays (the solver's on_conflict decides); applied before offset / limit."""
    recs = [_cf_record(1), _cf_record(2), {**_cf_record(1), "case_id": 3},  # 3 repeats 1 exactly
            _cf_record(4, subject="Subject1", target_new={"str": "Rome", "id": "Q2"}), _cf_record(5)]
    path = _write_json(tmp_path / "rep.json", recs)
    keep = _datamodule(path)
    keep.setup()
    assert [r.case_id for r in keep.requests] == [1, 2, 3, 4, 5]
    with caplog.at_level(logging.WARNING, logger="lit_edit.data"):
        dm = _datamodule(path, drop_repeats=True, offset=1, limit=3)
        dm.setup()
    assert [r.case_id for r in dm.requests] == [2, 4, 5]
    assert "dropped 1 of 5 requests" in caplog.text
    with pytest.raises(ValueError, match="data.drop_repeats"):
        _datamodule(path, drop_repeats="yes")


def test_the_long_real_stream_counterfact_then_mquake(counterfact_path):
    """The longest real stream of the shared data (issue 30): CounterFact's 300 records then MQuAKE-CF's 372
    rewrites, exact repeats dropped: 618 distinct edits (54 of MQuAKE's rewrites repeat one of its earlier cases')."""
    mquake = counterfact_path.parent / "akew_mquake.json"
    dm = _datamodule([str(counterfact_path), str(mquake)], drop_repeats=True)
    dm.setup()
    assert len(dm.requests) == 618 and len({r.fact_id for r in dm.requests}) == 618
    assert dm.requests[0].case_id == "counterfact_sample:" + str(json.loads(counterfact_path.read_text())[0]["case_id"])
    assert dm.requests[300].case_id.startswith("akew_mquake:")


def test_order_seed_refuses_a_stream_whose_order_matters(tmp_path):
    """A remove (or replace) refers to an earlier edit: shuffled, it could come first. Refused at set-up, naming
    the request, before any edit."""
    recs = [_cf_record(100 + i) for i in range(4)] + [{**_cf_record(100), "case_id": "rm100", "op": "remove"}]
    path = _write_json(tmp_path / "ops.json", recs)
    dm = _datamodule(path, order_seed=0)
    with pytest.raises(ValueError, match=r"order_seed=0.*'remove'.*rm100"):
        dm.setup()
    _datamodule(path).setup()  # in file order it is a valid stream


def test_zsre_datamodule_options(zsre_path):
    dm = EditDataModule(dataset="zsre", path=str(zsre_path), batch_size=50, target_field="alt", on_invalid="skip")
    dm.setup()
    assert len(dm.requests) == 298 and dm.n_batches == 6


def test_position_state_roundtrip(tmp_path):
    path = _stream_file(tmp_path)
    dm = _datamodule(path)
    dm.setup()
    dm.mark_applied()
    dm.mark_applied(n_batches=2)
    state = dm.state_dict()
    assert state["consumed"] == 3 and state["n_requests"] == 23 and state["batch_size"] == 5
    assert dm.train_dataloader().state_dict() == state  # both checkpoint paths carry the same state

    fresh = _datamodule(path)
    fresh.load_state_dict(state)  # before setup: kept, checked when the stream is read
    fresh.setup()
    loader = fresh.train_dataloader()
    loader.load_state_dict(state)  # the loader path as well: loading twice is harmless
    fresh.load_state_dict(state)
    assert fresh.consumed == 3 and len(loader) == 5  # len stays the full stream
    assert [[r.case_id for r in b] for b in loader] == [list(range(115, 120)), [120, 121, 122]]

    with pytest.raises(ValueError, match="cannot mark"):
        fresh.mark_applied(3)


def test_position_state_rejects_a_changed_stream(tmp_path):
    path = _stream_file(tmp_path)
    dm = _datamodule(path)
    dm.setup()
    state = dm.state_dict()

    other_batching = _datamodule(path, batch_size=4)
    other_batching.setup()
    with pytest.raises(StreamStateError, match="batch_size"):
        other_batching.load_state_dict(state)

    other_data = _datamodule(path, offset=1)
    other_data.load_state_dict(state)
    with pytest.raises(StreamStateError, match="different edit stream"):
        other_data.setup()

    shifted = _datamodule(path, offset=1)
    shifted.setup()
    with pytest.raises(StreamStateError, match="different edit stream"):
        shifted.train_dataloader().load_state_dict(state)


# --------------------------------------------------------------------------------------------
# A real Lightning fit loop: stop after k steps, resume from the step-k checkpoint
# --------------------------------------------------------------------------------------------


class _Recorder(L.LightningModule):
    """Records the case ids of every batch, as the editing module would apply them."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen: list[list] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([r.case_id for r in batch])
        # Without an optimizer step, manual optimization never advances global_step, so
        # max_steps and ModelCheckpoint(every_n_train_steps) would not work. Step the mock one.
        self.optimizers().step()

    def configure_optimizers(self):
        return None


class _MarkApplied(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.datamodule.mark_applied()


def _fit(path: Path, ckpt_dir: Path, max_steps: int = -1, ckpt_path: str | None = None) -> _Recorder:
    module, dm = _Recorder(), _datamodule(path)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        max_steps=max_steps,
        callbacks=[_MarkApplied(), ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_lightning_resume_continues_with_the_next_unapplied_batch(tmp_path, k):
    path = _stream_file(tmp_path)
    run_a = _fit(path, tmp_path / "A")
    assert [len(b) for b in run_a.seen] == [5, 5, 5, 5, 3]
    assert [cid for b in run_a.seen for cid in b] == list(range(100, 123))

    run_b = _fit(path, tmp_path / "B", max_steps=k)
    assert len(run_b.seen) == k
    ckpt = tmp_path / "B" / f"epoch=0-step={k}.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["EditDataModule"]["consumed"] == k  # datamodule path
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == k  # loader path

    run_c = _fit(path, tmp_path / "C", ckpt_path=str(ckpt))
    assert run_b.seen + run_c.seen == run_a.seen  # each batch once, same order, same grouping


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("drop", ["EditDataModule", "combined_loader"])
def test_lightning_resume_from_either_state_path(tmp_path, drop):
    """Each checkpoint path alone (datamodule state, or the fit loop's loader state) resumes right."""
    path = _stream_file(tmp_path)
    run_b = _fit(path, tmp_path / "B", max_steps=2)
    state = torch.load(tmp_path / "B" / "epoch=0-step=2.ckpt", weights_only=False)
    if drop == "EditDataModule":
        del state["EditDataModule"]
    else:
        del state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(state, tmp_path / "partial.ckpt")
    run_c = _fit(path, tmp_path / "C", ckpt_path=str(tmp_path / "partial.ckpt"))
    assert [cid for b in run_b.seen + run_c.seen for cid in b] == list(range(100, 123))


def test_world_spec_resolves_to_the_world_counterfact_file(tmp_path, monkeypatch):
    """"world:<name>" goes through lit_edit.world (faked here: the tests must not build a world)."""
    import sys
    import types

    _write_json(tmp_path / "counterfact.json", [_cf_record(i) for i in range(6)])
    fake = types.ModuleType("lit_edit.world")
    fake.resolve_world_name = lambda spec: {"world": "default", "world:tiny": "tiny"}[spec]
    fake.ensure_world = lambda name: tmp_path if name == "tiny" else pytest.fail(f"unexpected world {name}")
    monkeypatch.setitem(sys.modules, "lit_edit.world", fake)

    dm = EditDataModule(path="world:tiny", batch_size=4)  # dataset defaults to "world"
    dm.setup()
    assert [r.case_id for r in dm.requests] == list(range(6))
    assert {r.source for r in dm.requests} == {"world"}
    requests = dm.requests
    dm.setup("fit")  # idempotent: not read again
    assert dm.requests is requests


def test_config_requests_reads_a_configs_records_from_the_checkout(tmp_path):
    """benchmarks/ read a config's records outside the fit loop: a relative data.path is taken from the given root
    (not the working directory), an absolute one as it is, and records start … stop − 1 come back in file order."""
    from lit_edit.data import config_requests, read_requests

    records = [{"case_id": i, "requested_rewrite": {"prompt": "{} plays", "subject": f"Player {i}",
                                                    "target_new": {"str": "chess"}, "target_true": {"str": "go"}}}
               for i in range(6)]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    rel = config_requests({"path": "cf.json"}, tmp_path, 2, 5)
    absolute = config_requests({"dataset": "counterfact", "path": str(tmp_path / "cf.json")}, "/nonexistent", 2, 5)
    assert [r.case_id for r in rel] == [r.case_id for r in absolute] == [2, 3, 4]
    assert [r.case_id for r in read_requests("counterfact", str(tmp_path / "cf.json"))][2:5] == [2, 3, 4]
