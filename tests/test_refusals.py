"""A refused run touches nothing, and every error names its cause (issue 27).

Each refusal below is checked the same way: a SHA-256 of every file of the run directory (``.lock`` and
``config.yaml`` included) before and after the refused ``train.py fit``, required equal, and no call of
``apply_batch`` (the refusal came before the first edit). Fits use the tiny world through the real CLI, in this
process; a finished 3-step run is made once and copied for each test that damages or resumes it.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_edit import editing, runs
from lit_edit.requests import EditRequestError
from tests.test_runs import fit, ids_and_steps, ledger, run_dir

MEMIT = ["--model.solver", json.dumps({"class_path": "lit_edit.solvers.MEMIT", "init_args": {"L2": 10.0}})]


def files(run: Path) -> dict[str, str]:
    """SHA-256 of every file under ``run``, by relative path (an absent directory: none)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def edits(monkeypatch) -> list:
    """The batches ``apply_batch`` was called with in this test (ClosedFormEdit looks it up in lit_edit.editing)."""
    calls, real = [], editing.apply_batch

    def apply_batch(model, layout, solver, layers, requests, *args):
        calls.append([r.case_id for r in requests])
        return real(model, layout, solver, layers, requests, *args)

    monkeypatch.setattr(editing, "apply_batch", apply_batch)
    return calls


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory) -> Path:
    """The save dir of one uninterrupted 3-step run (checkpoints at steps 1, 2 and 3)."""
    save = tmp_path_factory.mktemp("finished")
    fit(save)
    return save


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run's directory, at tmp_path/tiny/version_0 (a checkpoint resumes in the directory it
    lies in, so the copy is a run of its own)."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return run_dir(tmp_path)


def save_dir(run: Path) -> Path:
    return run.parent.parent


# -- 1. every check before the first write ------------------------------------------------------------------------

CHANGES = {
    "solver": (MEMIT, "model.solver.class_path"),
    "batch_size": (["--data.batch_size", "3"], "data.batch_size: checkpoint 4, this run 3"),
    "layers": (["--model.layers", "[0, 2]"], "model.layers: checkpoint [0, 1], this run [0, 2]"),
    "L2": (["--model.solver.init_args.L2", "1.0"], "model.solver.init_args.L2: checkpoint 10.0, this run 1.0"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_resume_refused_for_a_changed_setting_leaves_every_file(run, edits, change):
    args, says = CHANGES[change]
    before = files(run)
    with pytest.raises(runs.CheckpointError, match="cannot resume") as err:
        fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=2.ckpt"), *args)
    assert says in str(err.value)
    assert files(run) == before and edits == []


def test_a_second_fit_into_a_run_directory_leaves_every_file(run, edits):
    before = files(run)
    with pytest.raises(runs.RunDirError, match="already holds an editing run"):
        fit(save_dir(run), "--trainer.logger.init_args.version", "0", *MEMIT)
    assert files(run) == before and edits == []
    assert "lit_edit.solvers.AlphaEdit" in (run / "config.yaml").read_text()  # still the config of the run


def test_a_fit_into_a_directory_in_use_leaves_it_as_the_running_fit_wrote_it(finished, tmp_path, edits):
    """Two fits at once into one new directory: the second (another solver) is refused and the first's config.yaml
    still names the first's solver."""
    run = run_dir(tmp_path)
    run.mkdir(parents=True)
    shutil.copy(run_dir(finished) / "config.yaml", run / "config.yaml")  # what the running fit wrote so far
    lock = runs.RunLock(run)
    lock.acquire()  # the running fit
    try:
        before = files(run)
        with pytest.raises(runs.RunDirError, match="is in use by pid"):
            fit(tmp_path, "--trainer.logger.init_args.version", "0", *MEMIT)
        assert files(run) == before and edits == []
    finally:
        lock.release()
    assert "lit_edit.solvers.AlphaEdit" in (run / "config.yaml").read_text()


def test_a_refused_fit_into_a_new_directory_creates_nothing(tiny_world, tmp_path, edits):
    """A remove at step 3 of a fact that nothing inserted: refused before the first edit (not at step 3, after two
    written and checkpointed steps), naming the record and its step; not even the run directory is made."""
    from lit_edit.world import build_world

    recs = build_world("tiny").counterfact_records()
    stream = recs[:8] + [{**recs[0], "case_id": "rm0", "op": "remove"},  # inserted at step 1: fine
                         {**recs[20], "case_id": "rm20", "op": "replace"}]  # never inserted
    path = tmp_path / "stream.json"
    path.write_text(json.dumps(stream))
    with pytest.raises(EditRequestError) as err:
        fit(tmp_path / "runs", "--data.dataset", "counterfact", "--data.path", str(path), "--data.limit", "10")
    assert "case_id='rm20'" in str(err.value) and "'op'" in str(err.value) and "step 3" in str(err.value)
    assert edits == [] and not (tmp_path / "runs").exists()


# -- 2. cutting back on resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_solver_ledger_cuts_nothing_and_the_newest_checkpoint_still_resumes(run, edits, damage):
    shard = run / "solver_ledger" / "00000001.safetensors"  # step 2's, covered by step=2.ckpt
    saved = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(saved[: len(saved) // 2])
    before = files(run)
    with pytest.raises(runs.CheckpointError, match=str(shard)):
        fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=2.ckpt"))
    assert files(run) == before and edits == []
    assert len(ledger(run)) == 9  # edits.jsonl was not cut back to step 2's 8 lines
    shard.write_bytes(saved)
    fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=3.ckpt"))
    assert ids_and_steps(ledger(run)) == [(i, 1 + i // 4) for i in range(9)] and edits == []


class Killed(BaseException):
    """A kill -9, as far as the files are concerned: the process stops where it is (Lightning's teardown runs, but
    nothing of lit_edit's writes)."""


def _killed_in(monkeypatch, where: str) -> None:
    """A kill during the cut back of a resume: after edits.jsonl was cut, before the solver ledger's index was
    (``index``), or after it, before its later shards were deleted (``shards``)."""
    from lit_edit.edit_ledger import EditLedger

    def cut(self, n):
        if where == "shards":
            runs.Ledger(self.dir, "index.jsonl").truncate(n)
        raise Killed

    monkeypatch.setattr(EditLedger, "_cut", cut)


@pytest.mark.parametrize("where", ["index", "shards"])
def test_a_kill_during_the_cut_back_leaves_a_run_that_resumes(run, monkeypatch, where):
    _killed_in(monkeypatch, where)
    with pytest.raises(Killed):
        fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"))
    monkeypatch.undo()
    assert len(ledger(run)) == 4  # edits.jsonl was cut first
    fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"))
    assert ids_and_steps(ledger(run)) == [(i, 1 + i // 4) for i in range(9)]
    assert sorted(p.name for p in (run / "solver_ledger").glob("*.safetensors")) == [
        "00000000.safetensors", "00000001.safetensors", "00000002.safetensors"]


# -- 3. the export directory -----------------------------------------------------------------------------------------


def test_a_non_empty_export_dir_is_refused_before_the_first_edit_unless_replaced(tiny_world, tmp_path, edits):
    other = tmp_path / "export"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"another model")
    with pytest.raises(runs.ExportDirError, match=f"model.export_dir {other} is not empty"):
        fit(tmp_path / "runs", "--trainer.max_steps", "1", "--model.export_dir", str(other))
    assert edits == [] and not (tmp_path / "runs").exists()
    assert sorted(p.name for p in other.iterdir()) == ["model.safetensors"]
    assert (other / "model.safetensors").read_bytes() == b"another model"
    fit(tmp_path / "runs", "--trainer.max_steps", "1", "--model.export_dir", str(other), "--model.export_replace",
        "true")
    run = run_dir(tmp_path / "runs")
    assert runs.export_owner(other) == str(run.resolve())
    assert (other / "model.safetensors").stat().st_size > 1000 and not list(tmp_path.glob(".export.*"))
    # a resume exports into its own run's earlier export without export_replace
    fit(tmp_path / "runs", "--ckpt_path", str(run / "checkpoints" / "step=1.ckpt"), "--model.export_dir", str(other))
    assert runs.export_owner(other) == str(run.resolve()) and len(ledger(run)) == 9


def test_an_export_dir_that_cannot_be_written_is_refused_before_the_first_edit(tiny_world, tmp_path, edits):
    target = Path("/sys/lit_edit_export")  # sysfs: read-only, for root too
    try:
        Path(__import__("tempfile").mkdtemp(dir="/sys")).rmdir()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    with pytest.raises(runs.ExportDirError, match="model.export_dir /sys/lit_edit_export cannot be written"):
        fit(tmp_path / "runs", "--model.export_dir", str(target))
    assert edits == [] and not (tmp_path / "runs").exists()


def test_export_dir_checks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.ExportDirError, match="is a file"):
        runs.check_export_dir(tmp_path / "file", run, False)
    with pytest.raises(runs.ExportDirError, match="would replace the run directory"):
        runs.check_export_dir(tmp_path, run, True)
    own, theirs = tmp_path / "own", tmp_path / "theirs"
    runs.write_export(own, lambda d: (d / "w").write_text("1"), run)
    runs.write_export(theirs, lambda d: (d / "w").write_text("1"), tmp_path / "another_run")
    runs.check_export_dir(own, run, False)  # this run's earlier export
    runs.check_export_dir(tmp_path / "new" / "deeper", run, False)  # made at the end
    with pytest.raises(runs.ExportDirError, match=f"holds the export of the run {tmp_path / 'another_run'}"):
        runs.check_export_dir(theirs, run, False)
    runs.check_export_dir(theirs, run, True)


def test_a_failed_export_names_the_dir_and_keeps_the_earlier_export(tmp_path):
    out, run = tmp_path / "export", tmp_path / "run"
    runs.write_export(out, lambda d: (d / "model.safetensors").write_text("earlier"), run)

    def full(folder):
        (folder / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"model.export_dir {out}: no space left on device") as err:
        runs.write_export(out, full, run)
    assert err.value.errno == errno.ENOSPC
    assert (out / "model.safetensors").read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == [
        "export"]


# -- 4. every error names its cause ----------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_names_the_checkpoint_and_keeps_the_previous_one(tiny_world, tmp_path,
                                                                                      monkeypatch):
    """The disk fills while step 2's checkpoint is written: torch reports "[enforce fail at inline_container.cc]
    unexpected pos"; the error names the checkpoint and says the disk is full, and step 1's checkpoint is whole."""
    run = run_dir(tmp_path)

    def opened(path, mode="r", *args, **kwargs):
        if ".step=2.ckpt.tmp-" in str(path):
            return builtins.open("/dev/full", "wb", buffering=0)  # every write: ENOSPC
        return builtins.open(path, mode, *args, **kwargs)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # what torch's zip writer makes of the OSError of a write
        try:
            return real_save(obj, f, *args, **kwargs)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(runs, "open", opened, raising=False)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as err:
        fit(tmp_path)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert f"could not write {run / 'checkpoints' / 'step=2.ckpt'}: no space left on device" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=1.ckpt"]
    ckpt = runs.AtomicCheckpointIO().load_checkpoint(run / "checkpoints" / "step=1.ckpt")
    runs.open_checkpoint(ckpt, "step=1.ckpt")  # whole: its checksum verifies


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


BAD_NPZ = {
    # name: (write the file, what the message says)
    "object_array": (lambda p: _npz(p, **{"mom2.mom2": np.array([object(), 1], dtype=object),
                                          "mom2.count": np.array(3)}),
                     "holds mom2.mom2 as an array of Python objects (pickled), which lit_edit never loads"),
    "pickle": (lambda p: p.write_bytes(__import__("pickle").dumps({"mom2.mom2": 1})),
               "is neither a .npz (zip) archive nor a .npy array"),
    "truncated": (lambda p: (_npz(p, **{"mom2.mom2": np.eye(4), "mom2.count": np.array(5)}),
                             p.write_bytes(p.read_bytes()[:100])),
                  "cannot be read as a .npz archive"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read as a .npz archive"),
    "text": (lambda p: _npz(p, **{"mom2.mom2": np.array(["a"]), "mom2.count": np.array(5)}),
             "holds mom2.mom2 of dtype <U1"),
    "nan": (lambda p: _npz(p, **{"mom2.mom2": np.full((4, 4), np.nan), "mom2.count": np.array(5)}),
            "holds 16 non-finite value(s) in mom2.mom2"),
    "count": (lambda p: _npz(p, **{"mom2.mom2": np.eye(4), "mom2.count": np.array([1, 2])}),
              "holds mom2.count [1, 2]; it must be one whole number"),
}


@pytest.mark.parametrize("case", BAD_NPZ)
def test_a_malformed_statistics_file_is_named_with_the_setting_and_what_is_wrong(tmp_path, case):
    from lit_edit.stats import NpzStatsError, read_npz_stats

    write, says = BAD_NPZ[case]
    path = tmp_path / "mlp_0_float32_mom2_100.npz"
    write(path)
    with pytest.raises(NpzStatsError) as err:
        read_npz_stats(path, 4)
    msg = str(err.value)
    assert msg.startswith(f"model.stats.npz: {path} ") and says in msg, msg
    assert "allow_pickle" not in msg and "pickle.load" not in msg and "unsafe" not in msg and "trust" not in msg


def test_a_malformed_statistics_file_stops_a_fit_before_its_run_directory_exists(tiny_world, tmp_path, edits):
    bad = tmp_path / "stats_{}.npz"
    for layer in (0, 1):
        BAD_NPZ["object_array"][0](Path(str(bad).format(layer)))
    with pytest.raises(ValueError, match=f"model.stats.npz: {tmp_path / 'stats_0.npz'} holds mom2.mom2 as an array"):
        fit(tmp_path / "runs", "--model.stats.npz", str(bad))
    assert edits == [] and not (tmp_path / "runs").exists()


# -- 5. per-rank leftovers -------------------------------------------------------------------------------------------


def test_a_resume_on_fewer_devices_removes_the_ledgers_of_the_ranks_it_lacks(run, capsys):
    """A 2-process run resumed on one device: solver_ledger.rank1/ stops at the checkpoint, so it is removed (and
    said so) once the resume's checks have passed; a refused resume leaves it."""
    rank1 = run / "solver_ledger.rank1"
    shutil.copytree(run / "solver_ledger", rank1)
    before = files(run)
    with pytest.raises(runs.CheckpointError):
        fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=3.ckpt"), "--data.batch_size", "3")
    assert files(run) == before
    fit(save_dir(run), "--ckpt_path", str(run / "checkpoints" / "step=3.ckpt"))
    assert not rank1.exists() and f"removed {rank1}" in capsys.readouterr().out


def test_a_check_that_fails_on_one_rank_stops_every_rank_and_leaves_every_file(tiny_world, tmp_path):
    """Two processes: rank 1's copy of the solver ledger is damaged; the resume stops on both ranks (no rank waits
    in a collective for ever) and leaves the run directory as it was."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.test_runs import CONFIG

    env = {**os.environ, "LIT_EDIT_CACHE": str(REPO_ROOT / "data" / "cache"), "OMP_NUM_THREADS": "1"}

    def two_ranks(*extra):
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(CONFIG), "--trainer.devices", "2",
               "--trainer.strategy", "ddp_nowrap", "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--model.eval_pre", "false", "--model.eval_every_n_steps", "0", *extra]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)

    first = two_ranks("--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    run = run_dir(tmp_path)
    shard = run / "solver_ledger.rank1" / "00000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = files(run)
    refused = two_ranks("--ckpt_path", str(run / "checkpoints" / "step=2.ckpt"))
    assert refused.returncode != 0 and str(shard) in refused.stderr
    assert files(run) == before
