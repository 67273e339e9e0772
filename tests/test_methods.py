"""Target methods are components: a new one (tests/fixed_targets.py) runs through the CLI by its class_path, and
the module writes exactly what it asks for."""
import json
from pathlib import Path

import torch

from lit_edit.cli import main
from lit_edit.editing import FactColumns
from lit_edit.methods import Columns, MetaKE, VStar, Windows
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "tests" / "configs" / "tiny_world.yaml"


def fit(save_dir: Path, method: dict, *extra: str):
    return main(["fit", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
                 "--model.eval_pre", "false", "--model.eval_every_n_steps", "0", "--model.context_templates", "[]",
                 "--model.layers", "[1]", "--model.method", json.dumps(method), "--trainer.enable_checkpointing",
                 "false", "--trainer.callbacks", "[]", "--data.limit", "4", *extra])


def test_a_new_method_is_one_file_named_by_its_class_path(tiny_world, tmp_path):
    """shift 0: the targets are the current states, the residual is 0 and the weights do not move; shift s along
    one hidden unit: the edited requests' block-L states move along that unit only."""
    zero = fit(tmp_path / "zero", {"class_path": "tests.fixed_targets.FixedTargets", "init_args": {"shift": 0.0}},
               "--model.export_dir", str(tmp_path / "w0"))
    from safetensors.torch import load_file

    w0 = load_file(tmp_path / "w0" / "model.safetensors")
    base = load_file(tiny_world / "model" / "model.safetensors")
    cli = fit(tmp_path / "shift", {"class_path": "tests.fixed_targets.FixedTargets", "init_args": {"shift": 3.0,
                                                                                                   "unit": 5}})
    m = cli.model
    name = m.edited_param_names()[0].removeprefix("llm.")
    assert (w0[name] - base[name]).abs().max() < 1e-5  # a zero residual writes (numerically) nothing
    assert (m.llm.state_dict()[name] - base[name]).abs().max() > 1e-2
    cols = FactColumns(m.tok, m.requests, [], "subject_first")
    moved = cols.states(m.llm, m.layout, 1) - cols.states(zero.model.llm, zero.model.layout, 1)
    # R has one non-zero row (unit 5), so Δ = R·M changes only output unit 5 of the edited projection, which adds
    # into the residual stream: every other unit of the block-1 state is unchanged; unit 5 moves towards the
    # target by the solver's realisation (AlphaEdit's ridge and null-space projection keep it below 1)
    others = torch.cat([moved[:, :5], moved[:, 6:]], 1)
    assert others.abs().max() < 1e-5
    assert ((moved[:, 5] > 0.1) & (moved[:, 5] <= 3.0 + 1e-5)).all()
    ledger = [json.loads(x) for x in (Path(cli.trainer.log_dir) / "edits.jsonl").read_text().splitlines()]
    assert [x["case_id"] for x in ledger] == [r.case_id for r in m.requests]


def test_registered_methods_build_their_columns_through_one_protocol():
    for method in (VStar(), MetaKE(), Windows()):
        assert callable(method.columns) and callable(method.optimise)
    assert isinstance(FactColumns(None, [], [], "subject_first"), Columns)
    assert MetaKE(base={"v_lr": 0.25}).base == VStar(v_lr=0.25)  # a plain dict (a checkpoint's) becomes its v*


def test_bertscore_is_reachable_from_the_long_form_method(tmp_path):
    """model.method.init_args.bertscore_model (a local directory) adds bertscore / para.bertscore to the scores; a
    path that is not a local directory is refused when the method is built."""
    import pytest

    from lit_edit.methods import Env
    from lit_edit.requests import UnstructuredRequest
    from tests.helpers import tiny_bert, tiny_gpt2, tiny_tokenizer

    method = Windows(chat=False, bertscore_model=str(tiny_bert(tmp_path)))
    assert method.evaluator.keys[-2:] == ("bertscore", "para.bertscore")
    tok = tiny_tokenizer()
    env = Env(tiny_gpt2(tok), tok, None, [1], ["{}"], None)
    reqs = [UnstructuredRequest(1, "Anna Berk lives in", "the city of Paris.", paraphrase_questions=["Anna is in"])]
    (scores,) = method.evaluator.scores(env, reqs)
    assert {"bleu", "rouge_l", "bertscore", "para.bertscore"} <= set(scores)
    with pytest.raises(ValueError, match="bertscore_model must be a local model directory"):
        Windows(bertscore_model="sentence-transformers/all-MiniLM-L6-v2")


def test_one_edit_reads_top_down_through_at_most_six_files(tiny_world, tmp_path):
    """From the YAML to ``W += Δ`` (the step, not the set-up): the lit_edit files on the call stack when the target
    method makes the targets (``optimise``, ``refine``), when the solver makes Δ (``solve``) and when Δ is written
    (``add_to_weight``). The callers of these four are the path a reader follows; helpers they call (tokens,
    hooks, the truncated forward, the solver's parts) are below it."""
    import os
    import sys

    import lit_edit
    from lit_edit import editing, module

    root = os.path.dirname(lit_edit.__file__)
    events, stacks = {"optimise", "refine", "solve", "add_to_weight"}, {}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in events and frame.f_code.co_filename.startswith(root):
            f, files = frame, []
            while f is not None:
                if f.f_code.co_filename.startswith(root):
                    files.append(os.path.relpath(f.f_code.co_filename, root))
                f = f.f_back
            stacks.setdefault(frame.f_code.co_name, set()).update(files)

    def traced(fn):
        def run(*args, **kwargs):
            sys.setprofile(profile)
            try:
                return fn(*args, **kwargs)
            finally:
                sys.setprofile(None)
        return run

    step, write = module.EditModule.training_step, editing.apply_batch
    module.EditModule.training_step, editing.apply_batch = traced(step), traced(write)
    try:
        fit(tmp_path, {"class_path": "lit_edit.methods.VStar", "init_args": {"v_num_grad_steps": 2}},
            "--data.limit", "2", "--data.batch_size", "2")
    finally:
        module.EditModule.training_step, editing.apply_batch = step, write
    assert set(stacks) == events  # every event happened (a rename would otherwise pass silently)
    files = set().union(*stacks.values())
    assert len(files) <= 6, f"the step's path runs through {len(files)} files: {sorted(files)}"
