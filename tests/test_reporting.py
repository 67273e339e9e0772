"""What a run reports: one TensorBoard step axis shared with the ledger (0 = the unedited model), the
TensorBoard extras, a self-describing metrics.json in one unit, the three protocols, and `train.py test`
scoring the unedited model and a checkpoint exactly as the fit did."""
import contextlib
import io
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_edit import board
from lit_edit.cli import main
from lit_edit.methods import ProbabilityEvaluator
from lit_edit.report import in_units

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world" / "alphaedit.yaml"
CKPT = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}}])


def run(sub: str, save_dir: Path, *extra: str):
    return main([sub, "--config", str(CONFIG), "--model.model", "world:tiny", "--model.layers", "[0, 1]",
                 "--model.context_templates", "[[10, 2]]", "--data.path", "world:tiny", "--data.limit", "6",
                 "--data.batch_size", "2",
                 "--model.method.init_args.v_num_grad_steps", "15", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(save_dir), *extra])


def events(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def fitted(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli = run("fit", tmp, "--model.eval_every_n_steps", "1", "--trainer.callbacks", CKPT)
    (tmp / "stdout.txt").write_text(printed.getvalue())
    return cli, Path(cli.trainer.log_dir), tmp


def test_the_end_of_a_fit_prints_the_samples_before_and_after(fitted):
    """After the final table, the fixed samples' prompts with the unedited and the edited model's greedy
    continuations: the same texts TensorBoard's samples table shows at the last step."""
    cli, run_dir, tmp = fitted
    out = (tmp / "stdout.txt").read_text()
    block = out[out.index("samples (greedy continuations"):].splitlines()
    cb = next(c for c in cli.trainer.callbacks if getattr(c, "sample_now", None) is not None)
    step, now = cb.sample_now
    assert step == 3 and len(cb.samples) == 3 and len(block) >= 1 + 3 * 3
    requests = {r.case_id: r for r in cli.model.requests}
    for k, (case, before, after) in enumerate(zip(cb.samples, cb.sample_pre, now)):
        assert repr(requests[case].filled_prompt) in block[1 + 3 * k]
        assert block[2 + 3 * k].strip() == f"before: {before!r}" and block[3 + 3 * k].strip() == f"after:  {after!r}"
    assert now != cb.sample_pre  # the edits changed at least one continuation


def test_tensorboard_step_axis_is_the_ledgers_and_starts_at_the_unedited_model(fitted):
    _, run_dir, _ = fitted
    ledger_steps = sorted({json.loads(line)["step"] for line in (run_dir / "edits.jsonl").read_text().splitlines()})
    assert ledger_steps == [1, 2, 3]
    ea = events(run_dir)
    steps = lambda tag: [e.step for e in ea.Scalars(tag)]  # noqa: E731
    for tag in ("n_edits", "batch/efficacy", "targets/loss", "update/delta_norm/layer_1", "time/step_seconds",
                "time/targets_seconds", "time/write_seconds", "time/eval_seconds", "time/retention_seconds"):
        assert steps(tag) == ledger_steps, tag
    # the step's phases are parts of its wall time; the set-up's are at step 0
    seconds = {k: [e.value for e in ea.Scalars(f"time/{k}_seconds")] for k in
               ("targets", "write", "eval", "retention", "step")}
    for i in range(len(ledger_steps)):
        assert 0 < sum(seconds[k][i] for k in ("targets", "write", "eval", "retention")) <= seconds["step"][i]
    for tag in ("time/load_seconds", "time/c0_seconds", "time/solver_setup_seconds", "time/pre_eval_seconds"):
        assert steps(tag) == [0], tag
    assert steps("edited/efficacy") == [0] + ledger_steps  # the retention curve starts at the unedited model
    assert [e.value for e in ea.Scalars("n_edits")] == [2, 4, 6]
    tags = ea.Tags()
    assert "epoch" not in tags["scalars"] and "hp_metric" not in tags["scalars"]
    assert {"hist/target_loss", "hist/delta_norm", "hist/residual_norm/layer_0"} <= set(tags["histograms"])
    assert [e.step for e in ea.Histograms("hist/target_loss")] == ledger_steps
    assert [e.step for e in ea.Images("retention/heatmap")] == ledger_steps
    # the inner optimisation: one point per iteration of every step's v* descent
    assert len(ea.Scalars("inner/target_loss")) >= 3
    text = [t for t in tags["tensors"] if t.startswith("samples")]
    assert text and [e.step for e in ea.Tensors(text[0])][0] == 0


def test_retention_scalar_at_step_0_is_the_pre_edit_mean(fitted):
    _, run_dir, _ = fitted
    ea = events(run_dir)
    pre = [json.loads(line)["pre.efficacy"] for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    assert ea.Scalars("edited/efficacy")[0].value == pytest.approx(sum(pre) / len(pre), abs=0.01)
    retention = json.loads((run_dir / "retention.json").read_text())
    assert [r["step"] for r in retention] == [1, 2, 3] and [len(r["row"]) for r in retention] == [1, 2, 3]


def test_metrics_json_says_what_produced_it_in_one_unit(fitted):
    cli, run_dir, _ = fitted
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["run"]["model"] == "world:tiny" and doc["run"]["protocol"] == "sequential"
    assert doc["run"]["method"]["class_path"] == "lit_edit.methods.VStar"
    assert doc["run"]["solver"]["class_path"] == "lit_edit.solvers.AlphaEdit"
    assert doc["run"]["data"]["batch_size"] == 2 and doc["run"]["lit_edit_version"]
    assert doc["units"]["efficacy"] == "%" and 0 <= doc["efficacy"] <= 100
    assert all(round(doc[k], 2) == doc[k] for k in doc["units"])
    ledger = [json.loads(line) for line in (run_dir / "edits.jsonl").read_text().splitlines()]
    requests = {r.case_id: r for r in cli.model.requests}
    assert all(x["target_new"] == requests[x["case_id"]].target_new for x in ledger)
    hp = events(run_dir).Tags()["scalars"]
    assert "hp/efficacy" in hp  # the hparams view carries the final metrics


def test_test_subcommand_scores_the_unedited_model_and_a_checkpoint_as_the_fit_did(fitted):
    _, run_dir, tmp = fitted
    fit_doc = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "step=3.ckpt"
    again = run("test", tmp, "--ckpt_path", str(ckpt))
    doc = json.loads((Path(again.trainer.log_dir) / "metrics.json").read_text())
    assert Path(again.trainer.log_dir) != run_dir  # a test writes its own run directory
    assert doc["run"]["test_of"] == str(ckpt)
    for k in ("efficacy", "generalization", "specificity", "pre.efficacy", "pre.specificity", "n_edits"):
        assert doc[k] == pytest.approx(fit_doc[k], abs=0.01), k
    base = run("test", tmp)
    doc0 = json.loads((Path(base.trainer.log_dir) / "metrics.json").read_text())
    assert doc0["n_edits"] == 0 and doc0["run"]["test_of"] == "the unedited model"
    for k in ("efficacy", "generalization", "specificity"):
        assert doc0[k] == pytest.approx(fit_doc[f"pre.{k}"], abs=0.01), k


def test_immediate_protocol_keeps_each_batch_s_scores_right_after_its_write(tiny_world, tmp_path):
    cli = run("fit", tmp_path, "--model.protocol", "immediate", "--trainer.enable_checkpointing", "false",
              "--trainer.callbacks", "[]")
    run_dir = Path(cli.trainer.log_dir)
    doc = json.loads((run_dir / "metrics.json").read_text())
    batch = [e.value for e in events(run_dir).Scalars("batch/efficacy")]  # 2 requests per batch, 3 batches
    assert doc["efficacy"] == pytest.approx(sum(batch) / len(batch), abs=0.01)
    with pytest.raises(ValueError, match="model.protocol"):
        run("fit", tmp_path, "--model.protocol", "one_by_one")


def test_units_and_the_heat_map_by_hand():
    ev = ProbabilityEvaluator()
    assert in_units(ev, {"efficacy": 0.7083333358168602, "pre.specificity": 1.0, "n_edits": 3}) == {
        "efficacy": 70.83, "pre.specificity": 100.0, "n_edits": 3}
    per = {"a": {"efficacy": 1.0}, "b": {"efficacy": 0.0}, "c": {"efficacy": 1.0}}
    assert board.retention_row(per, {"a": 1, "b": 1, "c": 3}, 3, "efficacy") == [0.5, None, 1.0]
    # the heat map's figure: tests/test_figures.py
