"""Unstructured editing in the fit loop on the tiny fact world's long-form records (docs/algorithms.md §8)."""
import json
from pathlib import Path

import pytest

from lit_edit.data import EditDataModule, read_requests
from lit_edit.module import EditModule
from lit_edit.methods import Windows
from lit_edit.requests import EditRequestError
from lit_edit.solvers import MEMIT
from lit_edit.stats import StatsConfig
from tests.test_module import make_module, make_trainer


def shortest_record(path="world:tiny", n=50) -> int:
    recs = read_requests("world_long", path, limit=n)
    return min(range(len(recs)), key=lambda i: len(recs[i].answer))


def test_muke_edit_regenerates_the_paragraph(tiny_world, tmp_path):
    """One μKE edit (windows of one token, memories at block 2) of a counterfactual biography: greedy generation
    after the question reproduces it (BLEU ≥ 0.9), where the unedited model does not; ledger and per-record scores
    say how many windows were written."""
    module = EditModule(model="world:tiny", layers=[0, 1, 2], solver=MEMIT(mom2_update_weight=100.0),
                        method=Windows(method="muke", window_size=1, coefficients="matryoshka"),
                        stats=StatsConfig(dataset="world:tiny", n_samples=2000, max_length=64), context_templates=[])
    dm = EditDataModule(dataset="world_long", path="world:tiny", offset=shortest_record(), limit=1, batch_size=1)
    trainer = make_trainer(tmp_path, ckpt=False)
    trainer.fit(module, dm)
    run = Path(trainer.log_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"bleu", "rouge_l", "para.bleu", "para.rouge_l", "pre.bleu", "pre.rouge_l", "n_edits"}
    assert metrics["n_edits"] == 1
    assert metrics["bleu"] >= 90 and metrics["rouge_l"] >= 90  # percent
    assert metrics["pre.bleu"] <= 30
    (ledger,) = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    (scores,) = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert ledger["windows"] == scores["answer_tokens"]  # window size 1: one memory per answer token
    assert module.solver.ledger_ids == [dm.requests[0].question] * ledger["windows"]


def test_structured_module_refuses_an_unstructured_stream(tiny_world, tmp_path):
    module = make_module()
    dm = EditDataModule(dataset="world_long", path="world:tiny", limit=2, batch_size=2)
    with pytest.raises(EditRequestError, match="lit_edit.methods.Windows"):
        make_trainer(tmp_path, ckpt=False).fit(module, dm)
