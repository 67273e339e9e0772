"""Progress in a log (lit_edit.progress): lines for the set-up phases, each editing step and long loops, never
minutes of silence; on a terminal the bars as before."""
import re
import sys

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lit_edit import progress
from lit_edit.callbacks import (EditRichLines, EditRichProgressBar, EditTQDMLines, EditTQDMProgressBar,
                                progress_bar)
from lit_edit.data import EditDataModule
from lit_edit.methods import ProbabilityEvaluator, VStar
from lit_edit.module import EditModule
from lit_edit.solvers import AlphaEdit
from lit_edit.stats import StatsConfig


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def lines(monkeypatch):
    monkeypatch.setenv("LIT_EDIT_PROGRESS", "lines")
    clock = FakeClock()
    monkeypatch.setattr(progress, "clock", clock)
    return clock


def logged(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("[lit_edit] ")]


def test_track_prints_a_first_line_then_at_most_one_per_interval_and_a_last_one(lines, capsys):
    with progress.track(total=100, desc="C0 statistics", unit="text", disable=False, mininterval=2.0) as bar:
        assert logged(capsys) == ["[lit_edit] C0 statistics: 0/100 text | elapsed 0s"]
        lines.now += 10
        bar.update(10)
        lines.now += 10
        bar.update(10)
        assert logged(capsys) == []  # 20 s < the 30 s interval: silent
        lines.now += 42
        bar.update(30)  # 50 of 100 after 62 s: 62 s more to go
        assert logged(capsys) == ["[lit_edit] C0 statistics: 50/100 text | elapsed 1m02s | eta 1m02s"]
        lines.now += 5
        bar.update(50)
    assert logged(capsys) == ["[lit_edit] C0 statistics: 100/100 text | elapsed 1m07s | done"]


def test_track_wraps_an_iterable_and_can_be_disabled(lines, capsys):
    assert list(progress.track(range(3), desc="scores", unit="req", interval=0.0)) == [0, 1, 2]
    assert logged(capsys) == ["[lit_edit] scores: 0/3 req | elapsed 0s"] + \
        [f"[lit_edit] scores: {i}/3 req | elapsed 0s | eta 0s" for i in (1, 2, 3)] + \
        ["[lit_edit] scores: 3/3 req | elapsed 0s | done"]
    assert list(progress.track(iter("ab"), desc="quiet", disable=True)) == ["a", "b"]
    assert logged(capsys) == []


def test_phase_names_its_start_and_its_duration(lines, capsys):
    with progress.phase("C0 statistics"):
        lines.now += 12.34
    assert logged(capsys) == ["[lit_edit] C0 statistics ...", "[lit_edit] C0 statistics done in 12.3s"]
    assert progress.hms(42) == "42s" and progress.hms(250) == "4m10s" and progress.hms(7500) == "2h05m"


def test_on_a_terminal_the_bars_stay(monkeypatch, capsys):
    monkeypatch.setenv("LIT_EDIT_PROGRESS", "bars")
    assert progress.is_interactive()
    bar = progress.track(total=3, desc="pre-edit scores", unit="req")
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
    with progress.phase("C0 statistics"):
        pass
    assert logged(capsys) == []
    for default, edit in ((RichProgressBar, EditRichProgressBar), (TQDMProgressBar, EditTQDMProgressBar)):
        assert type(progress_bar(L.Trainer(callbacks=[default()], logger=False))) is edit
    monkeypatch.setenv("LIT_EDIT_PROGRESS", "lines")
    for default, edit in ((RichProgressBar, EditRichLines), (TQDMProgressBar, EditTQDMLines)):
        assert type(progress_bar(L.Trainer(callbacks=[default()], logger=False))) is edit
    assert progress_bar(L.Trainer(enable_progress_bar=False, logger=False)) is None
    monkeypatch.delenv("LIT_EDIT_PROGRESS")
    assert not progress.is_interactive()  # capsys's stderr is no terminal
    terminal = type("Terminal", (), {"isatty": lambda self: True})()
    proxy = type("RichProxy", (), {"rich_proxied_file": terminal, "isatty": lambda self: False})()
    monkeypatch.setattr(sys, "stderr", proxy)
    assert progress.is_interactive()  # stderr seen through a Rich live bar's proxy: still the terminal


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_a_fit_and_a_test_in_a_log_print_each_phase_and_each_step(bar, tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIT_EDIT_PROGRESS", "lines")
    module = EditModule(model="world:tiny", layers=[0, 1], solver=AlphaEdit(L2=10.0, nullspace_threshold=5e-2),
                        method=VStar(v_num_grad_steps=5, clamp_norm_factor=4.0, fact_token="subject_first"),
                        stats=StatsConfig(dataset="world:tiny", max_length=64), context_templates=[[10, 2]],
                        eval_every_n_steps=2)
    dm = EditDataModule(path="world:tiny", limit=8, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=tmp_path, callbacks=[bar()],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, dm)
    out = capsys.readouterr()
    log = [l for l in out.err.splitlines() if l.startswith("[lit_edit] ")]
    print("\n".join(log))  # shown when the test fails
    for name in ("load world:tiny", "context templates", "C0 statistics", "solver set-up", "pre-edit scores",
                 "final scores"):
        start = log.index(f"[lit_edit] {name} ...")  # then maybe the lines of its loop (track), then its end
        assert any(re.fullmatch(rf"\[lit_edit\] {name} done in \d+\.\ds", l) for l in log[start + 1:]), name
    steps = [l for l in log if l.startswith("[lit_edit] step ")]
    assert len(steps) == 2
    for k, line in enumerate(steps, 1):
        assert re.fullmatch(rf"\[lit_edit\] step {k}/2 \| edits {4 * k}/8 \| targets \d+\.\ds write \d+\.\ds "
                            rf"eval \d+\.\ds{' retention [0-9.]+s' if k == 2 else ''} \| batch/\w+ [0-9.]+%.* \| "
                            rf"elapsed \d+s \| eta \d+s", line), line
    assert "[lit_edit] editing: 2 steps, 8 edits" in log and any(l.startswith("[lit_edit] editing done") for l in log)
    editing = out.err.split("[lit_edit] editing: ")[1]
    assert "Editing" not in editing and "\r" not in editing  # no bar was drawn (transformers' load bar may be)
    trainer = L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path / "test", callbacks=[bar()],
                        logger=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.test(module, dm)  # the test loop: a line per batch
    log = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[lit_edit] ")]
    assert [re.sub(r"elapsed \d+s \| eta \d+s", "…", l) for l in log if re.match(r"\[lit_edit\] test batch \d/", l)] == \
        ["[lit_edit] test batch 1/2 | …", "[lit_edit] test batch 2/2 | …"]
    # and within each batch, the scoring's own lines (minutes per batch with generations on a real model), when its
    # requests span more than one evaluator call (here 2 records per call)
    monkeypatch.setattr(ProbabilityEvaluator, "shown_chunk", property(lambda self: 2))
    L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path / "test2", callbacks=[bar()], logger=False,
              enable_model_summary=False, use_distributed_sampler=False).test(module, dm)
    log = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[lit_edit] ")]
    assert "[lit_edit] test batch 1 scores: 0/4 req | elapsed 0s" in log and \
        any(l.startswith("[lit_edit] test batch 2 scores: 4/4 req") for l in log)


def test_a_long_scoring_in_a_log_prints_lines_before_it_ends(monkeypatch, capsys):
    """The pre-edit scoring of a real stream (seconds per request) is scored in chunks of SHOWN_CHUNK when its progress
    is shown, so a log gets its lines while it runs; the scores are the evaluator's, in order, whatever the chunks."""
    from lit_edit import evaluation

    class Evaluator:
        keys = ("efficacy",)
        calls = []

        def scores(self, env, requests, full=True):
            self.calls.append(len(requests))
            progress.clock = lambda: 31.0 * len(self.calls)  # each chunk "takes" 31 s: past the interval
            return [{"efficacy": float(r.case_id)} for r in requests]

    monkeypatch.setenv("LIT_EDIT_PROGRESS", "lines")
    monkeypatch.setattr(progress, "clock", lambda: 0.0)
    reqs = [type("R", (), {"case_id": i})() for i in range(40)]
    ev = Evaluator()
    got = evaluation.Scores(ev).records(None, reqs, "pre-edit scores")
    assert got == {i: {"efficacy": float(i)} for i in range(40)}
    assert ev.calls == [16, 16, 8]
    log = logged(capsys)
    assert log[0] == "[lit_edit] pre-edit scores: 0/40 req | elapsed 0s" and len(log) >= 3, log
    assert log[-1].startswith("[lit_edit] pre-edit scores: 40/40 req") and log[-1].endswith("| done")
    ev.calls.clear()
    evaluation.Scores(ev).records(None, reqs)  # no progress asked for: one call
    assert ev.calls == [40]


def test_with_generations_a_shown_scoring_reports_per_generate_batch(monkeypatch, capsys):
    """With sampled generations (fluency) a record costs its generation prompts: a shown scoring then calls the
    evaluator with as many records as fill one generate() batch, so its lines come that often; without, SHOWN_CHUNK;
    the non-full scores (no generations) keep SHOWN_CHUNK either way."""
    from lit_edit import evaluation

    assert ProbabilityEvaluator(fluency=True).shown_chunk == 6  # 64 prompts per generate(), 10 per record
    assert ProbabilityEvaluator(fluency=True, generation_prompts=2).shown_chunk == 32
    assert ProbabilityEvaluator(fluency=False).shown_chunk == evaluation.SHOWN_CHUNK

    class Evaluator:
        keys, shown_chunk, calls = ("efficacy",), 6, []

        def scores(self, env, requests, full=True):
            self.calls.append(len(requests))
            return [{"efficacy": 1.0} for _ in requests]

    monkeypatch.setenv("LIT_EDIT_PROGRESS", "lines")
    ev, reqs = Evaluator(), [type("R", (), {"case_id": i})() for i in range(20)]
    assert len(evaluation.Scores(ev).records(None, reqs, "final scores")) == 20
    assert ev.calls == [6, 6, 6, 2]
    ev.calls.clear()
    evaluation.Scores(ev).records(None, reqs, "batch scores", full=False)
    assert ev.calls == [16, 4]
    capsys.readouterr()
