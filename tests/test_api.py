"""The Python entry point runs the same loop as train.py: dicts or request objects in, the edited model and
metrics.json out, the same validation before any edit."""
import json

import pytest

from lit_edit import Editor
from lit_edit.methods import VStar
from lit_edit.requests import EditRequestError
from lit_edit.solvers import AlphaEdit


def editor(tmp_path):
    return Editor(root_dir=tmp_path, model="world:tiny", layers=[0, 1], context_templates=[[10, 2]],
                  solver=AlphaEdit(L2=10.0, nullspace_threshold=0.05),
                  method=VStar(v_num_grad_steps=15, clamp_norm_factor=4.0, fact_token="subject_first"),
                  trainer={"enable_progress_bar": False})


def test_edit_records_returns_the_edited_model_and_metrics(tiny_world, tmp_path):
    records = json.loads((tiny_world / "counterfact.json").read_text())[:4]
    result = editor(tmp_path).edit(records, batch_size=2)
    assert result.metrics["n_edits"] == 4 and result.metrics["efficacy"] > result.metrics["pre.efficacy"]
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    ledger = [json.loads(x) for x in (result.run_dir / "edits.jsonl").read_text().splitlines()]
    assert [x["case_id"] for x in ledger] == [r["case_id"] for r in records]
    assert [x["step"] for x in ledger] == [1, 1, 2, 2]
    # the model handed back is the edited one: scoring it again gives metrics.json's post-edit values
    module = result.module
    assert result.model is module.llm and result.tokenizer is module.tok
    again = module.scores.mean(module.env, module.edited_requests())
    # metrics.json is in percent, rounded to 2 decimals (lit_edit.report)
    assert {k: 100 * v for k, v in again.items()} == pytest.approx({k: result.metrics[k] for k in again}, abs=0.01)


def test_request_objects_and_bad_records(tiny_world, tmp_path):
    from lit_edit.data import read_requests

    reqs = read_requests("world", "world:tiny", limit=2)
    result = editor(tmp_path).edit(reqs, batch_size=2)
    assert result.metrics["n_edits"] == 2
    bad = json.loads((tiny_world / "counterfact.json").read_text())[:2]
    del bad[1]["requested_rewrite"]["target_new"]
    with pytest.raises(EditRequestError, match="target_new"):
        editor(tmp_path).edit(bad)
    with pytest.raises(ValueError, match="model.layers must not repeat"):
        Editor(root_dir=tmp_path, model="world:tiny", layers=[1, 1])
