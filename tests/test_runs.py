"""A run's record survives faults: strict resume, one run directory, atomic and checked files (lit_edit.runs),
and the CLI's strictness. Fits use the tiny world through the real CLI (in-process, or a subprocess to kill)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_edit import runs
from lit_edit.cli import main
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "tests" / "configs" / "tiny_world.yaml"  # 9 requests in batches of 4: 3 steps, a checkpoint each


def fit(save_dir: Path, *extra: str):
    """``train.py fit`` on the tiny world, in this process; returns the CLI (its trainer and module)."""
    return main(["fit", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
                 "--model.eval_pre", "false", "--model.eval_every_n_steps", "0", *extra])


def run_dir(save_dir: Path, version: int = 0) -> Path:
    return save_dir / "tiny" / f"version_{version}"


def ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / runs.LEDGER).read_text().splitlines()]


def ids_and_steps(lines: list[dict]) -> list[tuple]:
    return [(x["case_id"], x["step"]) for x in lines]


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    save = tmp_path_factory.mktemp("full")
    cli = fit(save)
    return run_dir(save), cli


# -- strict resume ----------------------------------------------------------------------------------------------


def test_resume_refuses_changed_settings_before_any_edit_and_names_them(tiny_world, tmp_path):
    fit(tmp_path, "--trainer.max_steps", "1")
    run = run_dir(tmp_path)
    ckpt = run / "checkpoints" / "step=1.ckpt"
    before = (run / runs.LEDGER).read_bytes()
    with pytest.raises(runs.CheckpointError) as err:
        fit(tmp_path, "--ckpt_path", str(ckpt), "--model.method.init_args.v_lr", "0.1",
            "--model.solver.init_args.L2", "1.0", "--model.layers", "[0, 2]", "--data.batch_size", "3")
    msg = str(err.value)
    for expected in ("model.method.init_args.v_lr: checkpoint 0.5, this run 0.1", "model.solver.init_args.L2: checkpoint 10.0, "
                     "this run 1.0", "model.layers: checkpoint [0, 1], this run [0, 2]",
                     "data.batch_size: checkpoint 4, this run 3", str(ckpt), "--model.allow_changed"):
        assert expected in msg
    assert (run / runs.LEDGER).read_bytes() == before  # stopped before any edit
    assert not (run / "checkpoints" / "step=2.ckpt").exists()


def test_allowed_change_resumes_and_the_rest_may_always_change(tiny_world, tmp_path, uninterrupted):
    fit(tmp_path, "--trainer.max_steps", "1")
    run = run_dir(tmp_path)
    # v_lr changed on purpose; export_dir and the evaluation cadence are free to change
    fit(tmp_path, "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"), "--model.method.init_args.v_lr", "0.25",
        "--model.allow_changed", "[model.method.init_args.v_lr]", "--model.eval_every_n_steps", "1",
        "--model.export_dir", str(tmp_path / "export"))
    assert ids_and_steps(ledger(run)) == ids_and_steps(ledger(uninterrupted[0]))
    assert (tmp_path / "export" / "model.safetensors").exists()


# -- one run, one directory, one complete record ----------------------------------------------------------------


def test_resume_continues_in_its_run_directory_with_the_uninterrupted_ledger(tiny_world, tmp_path, uninterrupted):
    """A run that died after its step-3 ledger line but whose last checkpoint is step 1 (and whose ledger ends in a
    half-written line) resumes in its own directory and ends with exactly the uninterrupted run's ledger."""
    fit(tmp_path)  # 3 steps, checkpoints at 1, 2, 3
    run = run_dir(tmp_path)
    (run / "checkpoints" / "step=2.ckpt").unlink()
    (run / "checkpoints" / "step=3.ckpt").unlink()
    with open(run / runs.LEDGER, "a") as f:
        f.write('{"case_id": 8, "st')  # a kill in the middle of a write
    stale = run / "checkpoints" / ".step=3.ckpt.tmp-999999"  # a kill in the middle of a checkpoint's write
    stale.write_bytes(b"PK\x03\x04 partial")
    cli = fit(tmp_path, "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"))
    assert Path(cli.trainer.log_dir) == run and not run_dir(tmp_path, 1).exists()
    assert not stale.exists()
    got, want = ledger(run), ledger(uninterrupted[0])
    assert ids_and_steps(got) == ids_and_steps(want) == [(i, 1 + i // 4) for i in range(9)]
    for a, b in zip(got, want):  # the same edits, recomputed from the same state
        assert a["target_loss"] == pytest.approx(b["target_loss"], rel=1e-5)
    assert json.loads((run / runs.METRICS).read_text())["n_edits"] == 9


def test_killed_run_resumes_to_the_uninterrupted_ledger(tiny_world, tmp_path, uninterrupted):
    """kill -9 of a real train.py process once its first checkpoint exists (wherever it then is), then resume."""
    env = {**os.environ, "LIT_EDIT_CACHE": str(REPO_ROOT / "data" / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(CONFIG),
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.eval_pre", "false",
           "--model.eval_every_n_steps", "0"]
    run = run_dir(tmp_path)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step=1.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "step=1.ckpt").exists()
    last = max(run.glob("checkpoints/step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    fit(tmp_path, "--ckpt_path", str(last))
    assert ids_and_steps(ledger(run)) == ids_and_steps(ledger(uninterrupted[0]))


def test_a_second_fit_into_a_run_directory_is_refused(tiny_world, tmp_path, uninterrupted):
    run = uninterrupted[0]
    before = (run / runs.LEDGER).read_bytes()
    with pytest.raises(runs.RunDirError, match="already holds an editing run") as err:
        fit(run.parent.parent, "--trainer.logger.init_args.version", "0")
    assert str(run) in str(err.value)
    assert (run / runs.LEDGER).read_bytes() == before


def test_a_run_directory_in_use_is_refused(tiny_world, tmp_path):
    lock = runs.RunLock(run_dir(tmp_path))
    lock.acquire()
    try:
        with pytest.raises(runs.RunDirError, match="is in use by pid"):
            fit(tmp_path, "--trainer.logger.init_args.version", "0")
        assert not (run_dir(tmp_path) / runs.LEDGER).exists()
    finally:
        lock.release()


def test_resume_into_another_directory_is_refused(tiny_world, tmp_path):
    """From Python (no CLI to point the logger), a resume that would write elsewhere stops with both paths."""
    import lightning as L

    from lit_edit.data import EditDataModule
    from lit_edit.methods import VStar
    from lit_edit.module import EditModule
    from lit_edit.solvers import AlphaEdit

    fit(tmp_path, "--trainer.max_steps", "1")
    ckpt = run_dir(tmp_path) / "checkpoints" / "step=1.ckpt"
    cfg = yaml.safe_load(CONFIG.read_text())
    model = {**cfg["model"], "solver": AlphaEdit(**cfg["model"]["solver"]["init_args"]),
             "method": VStar(**cfg["model"]["method"]["init_args"]), "eval_pre": False}
    module = EditModule(**model)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path / "other"),
                        enable_progress_bar=False, enable_checkpointing=False, use_distributed_sampler=False)
    with pytest.raises(runs.RunDirError, match="continues in its checkpoint's run directory") as err:
        trainer.fit(module, EditDataModule(**cfg["data"]), ckpt_path=str(ckpt))
    assert str(run_dir(tmp_path)) in str(err.value) and str(tmp_path / "other") in str(err.value)


# -- atomic, checked files --------------------------------------------------------------------------------------


def _fail_fsync_for(monkeypatch, suffix: str):
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(runs.os, "fsync", fsync)


def test_disk_full_while_checkpointing_keeps_the_files_and_a_resume_completes(tiny_world, tmp_path, monkeypatch,
                                                                              uninterrupted):
    run = run_dir(tmp_path)
    _fail_fsync_for(monkeypatch, f".step=2.ckpt.tmp-{os.getpid()}")
    with pytest.raises(OSError, match="step=2.ckpt") as err:
        fit(tmp_path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=1.ckpt"]  # no partial, no temp file
    fit(tmp_path, "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"))
    assert ids_and_steps(ledger(run)) == ids_and_steps(ledger(uninterrupted[0]))


def test_atomic_write_failure_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    runs.atomic_write(path, '{"old": 1}')
    _fail_fsync_for(monkeypatch, ".metrics.json.tmp-" + str(os.getpid()))
    with pytest.raises(OSError, match=str(path)):
        runs.atomic_write(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["metrics.json"]


def _flip_a_tensor_byte(ckpt: Path) -> None:
    """Flip one byte in the middle of the first edited matrix's stored bytes (the zip stores tensors raw)."""
    state = torch.load(ckpt, weights_only=True)
    w = next(iter(state["state_dict"].values()))
    raw = bytearray(ckpt.read_bytes())
    at = bytes(raw).find(w.contiguous().view(torch.uint8).numpy().tobytes())
    assert at > 0
    raw[at + w.numel() * w.element_size() // 2] ^= 0x5A
    ckpt.write_bytes(bytes(raw))


def test_corrupted_checkpoint_is_refused_with_its_path(tiny_world, tmp_path):
    fit(tmp_path, "--trainer.max_steps", "1")
    run = run_dir(tmp_path)
    ckpt = run / "checkpoints" / "step=1.ckpt"
    _flip_a_tensor_byte(ckpt)
    with pytest.raises(runs.CheckpointError, match=f"checkpoint {ckpt} is corrupted"):
        fit(tmp_path, "--ckpt_path", str(ckpt))
    ckpt.write_bytes(b"")
    with pytest.raises(runs.CheckpointError, match=r"is empty \(0 bytes\)"):
        fit(tmp_path, "--ckpt_path", str(ckpt))
    assert len(ledger(run)) == 4  # neither attempt edited anything


def test_ledger_truncation_drops_a_partial_line_and_refuses_a_short_ledger(tmp_path):
    led = runs.Ledger(tmp_path)
    led.append([{"case_id": 0}, {"case_id": 1}])
    led.append([{"case_id": 2}])
    with open(led.path, "a") as f:
        f.write('{"case_')
    assert led.truncate(2) == 1 and led.path.read_text() == '{"case_id": 0}\n{"case_id": 1}\n'
    with pytest.raises(runs.CheckpointError, match=f"{led.path} holds 2 complete lines"):
        led.truncate(3)


def test_settings_comparison_names_each_change_and_honours_prefixes():
    saved = {"model.targets.v_lr": 0.5, "model.layers": [0, 1], "data.limit": None}
    current = {"model.targets.v_lr": 0.1, "model.layers": [0, 1], "data.limit": 5}
    with pytest.raises(runs.CheckpointError, match="data.limit: checkpoint None, this run 5"):
        runs.compare_settings(saved, current, ["model.targets"], "c.ckpt")
    assert runs.compare_settings(saved, current, ["model.targets", "data.limit"], "c.ckpt") == [
        ("data.limit", None, 5), ("model.targets.v_lr", 0.5, 0.1)]


def test_a_setting_newer_than_the_checkpoint_is_the_same_when_left_null():
    """A checkpoint written before a setting existed (no key) resumes when this run leaves the setting null or false
    (its behaviour from before), and is refused when this run sets it."""
    saved = {"data.limit": 5}
    assert runs.compare_settings(saved, {"data.limit": 5, "data.order_seed": None, "data.drop_repeats": False}, [],
                                 "c.ckpt") == []
    with pytest.raises(runs.CheckpointError, match="data.drop_repeats: checkpoint '<not set>', this run True"):
        runs.compare_settings(saved, {"data.limit": 5, "data.drop_repeats": True}, [], "c.ckpt")
    with pytest.raises(runs.CheckpointError, match="data.order_seed: checkpoint '<not set>', this run 3"):
        runs.compare_settings(saved, {"data.limit": 5, "data.order_seed": 3}, [], "c.ckpt")
    with pytest.raises(runs.CheckpointError, match="data.limit: checkpoint 5, this run '<not set>'"):
        runs.compare_settings(saved, {}, [], "c.ckpt")  # a setting this run does not have is still a change


# -- CLI strictness ---------------------------------------------------------------------------------------------


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--model.method.init_args.v_num_grad_step", "5"])
    assert "v_num_grad_step" in capsys.readouterr().err


def test_only_fit_and_test_are_offered(capsys):
    """validate and predict have no meaning here (test scores without editing: tests/test_reporting.py)."""
    for sub in ("validate", "predict"):
        with pytest.raises(SystemExit):
            main([sub, "--config", str(CONFIG)])
    assert "invalid choice" in capsys.readouterr().err


def test_shipped_checkpoint_names_match_the_readme_resume_command():
    """Every shipped config that names its checkpoints writes step=N.ckpt (not stepstep=N.ckpt), as the README
    resumes (the real-model configs keep Lightning's default name and a bounded number of checkpoints)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    readme = (REPO_ROOT / "README.md").read_text()
    assert "checkpoints/step=5.ckpt" in readme
    from lit_edit.cli import load_config
    from tests.test_configs import CONFIGS

    seen = 0
    for path in CONFIGS:  # the run configs, each with its base: chain expanded
        for cb in (load_config(path).get("trainer") or {}).get("callbacks") or []:
            if cb["class_path"].endswith("ModelCheckpoint") and "filename" in cb["init_args"]:
                name = ModelCheckpoint(**cb["init_args"]).format_checkpoint_name({"step": torch.tensor(5)})
                assert Path(name).name == "step=5.ckpt", path
                seen += 1
    assert seen >= 18  # the 18 world configs (demo.yaml among them) and the tests' tiny world
