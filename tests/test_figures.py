"""The figures a person reads (issue 31): the retention heat map, drift and update norms, the causal trace and the
summary page, drawn from a known small run; a missing or partial retention.json is a clear error, never a blank
figure; the hparams table holds the run's settings and final metrics only."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lit_edit import board, figures
from lit_edit.cli import main
from lit_edit.figures import RetentionDataError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world" / "alphaedit.yaml"
MONITOR = json.dumps([{"class_path": "lit_edit.monitor.Monitor",
                       "init_args": {"every_n_steps": 1, "text": {"n_samples": 8, "max_tokens": 32}, "probes": []}}])
TITLE = "world:tiny · VStar · AlphaEdit"


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """6 edits in 3 batches of 2, retention and drift after every batch."""
    tmp = tmp_path_factory.mktemp("figures")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["fit", "--config", str(CONFIG), "--model.model", "world:tiny", "--model.layers", "[0, 1]",
                    "--model.context_templates", "[[10, 2]]", "--data.path", "world:tiny", "--data.limit", "6",
                    "--data.batch_size", "2", "--model.method.init_args.v_num_grad_steps", "15",
                    "--model.eval_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_checkpointing", "false", "--trainer.callbacks", MONITOR,
                    "--trainer.logger.init_args.save_dir", str(tmp)])
    # every figure was drawn: a drawing failure only warns (lit_edit.board.draw), so none may have
    assert not [str(w.message) for w in caught if "could not draw" in str(w.message)]
    return cli, Path(cli.trainer.log_dir)


def events(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def labels(ax) -> tuple[str, str]:
    return ax.get_xlabel(), ax.get_ylabel()


def test_run_writes_retention_and_summary_pngs(run):
    _, run_dir = run
    with Image.open(run_dir / "retention.png") as img:
        assert img.format == "PNG" and img.size == (750, 500)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 20  # not blank
    with Image.open(run_dir / "summary.png") as img:
        assert img.format == "PNG" and img.size == (1400, 1000)


def test_tensorboard_holds_the_figures_at_readable_size(run):
    _, run_dir = run
    ea = events(run_dir)
    steps = lambda tag: [e.step for e in ea.Images(tag)]  # noqa: E731
    assert steps("retention/heatmap") == [1, 2, 3]  # every evaluation
    assert steps("drift/curves") == [0, 1, 2, 3] and steps("drift/update_norms") == [0, 1, 2, 3]
    assert steps("summary") == [3]  # the end of the fit
    heat = ea.Images("retention/heatmap")[-1]
    assert (heat.width, heat.height) == (750, 500)
    assert (ea.Images("summary")[0].width, ea.Images("summary")[0].height) == (1400, 1000)


def test_heat_map_figure_has_axes_labels_title_and_a_fixed_colour_scale(run):
    _, run_dir = run
    data = figures.read_retention(run_dir / "retention.json")
    assert [e["step"] for e in data] == [1, 2, 3] and all("efficacy" in e["scores"] for e in data)
    fig = figures.retention_heatmap(data, TITLE)
    ax = fig.axes[0]
    assert labels(ax) == ("batch the edits were written in (step)", "evaluation step")
    assert fig.get_suptitle() == TITLE and "efficacy" in ax.get_title()
    image = ax.images[0]
    assert image.get_clim() == (0.0, 100.0)
    bar = image.colorbar
    assert (bar.vmin, bar.vmax) == (0.0, 100.0) and bar.ax.get_ylabel() == "retention: efficacy (%)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert figures.rgb(fig).shape == (500, 750, 3)
    # the scale stays 0-100 whatever the values: a run retaining 40-60 % does not look perfect
    flat = [{"step": 1, "key": "efficacy", "row": [0.4]}, {"step": 2, "key": "efficacy", "row": [0.5, 0.6]}]
    assert figures.retention_heatmap(flat, TITLE).axes[0].images[0].get_clim() == (0.0, 100.0)


def test_drift_and_update_norm_figures(run):
    cli, _ = run
    from lit_edit.monitor import Monitor

    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Monitor))
    points = monitor.points()
    assert [s for s, _ in points] == [0, 1, 2, 3]
    fig = figures.drift_curves(points, TITLE)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["perplexity", "KL(p₀‖p), nats", "top-1 agree %"]
    assert axes[-1].get_xlabel().startswith("step") and fig.get_suptitle() == TITLE
    assert all(len(ax.lines[0].get_xdata()) == 4 for ax in axes)
    assert axes[2].lines[0].get_ydata()[0] == pytest.approx(100.0)  # the unedited model agrees with itself
    fig = figures.update_norms(points, TITLE)
    ax = fig.axes[0]
    assert labels(ax) == ("step (applied batches; 0 = unedited)", "‖ΔW‖_F / ‖W₀‖_F")
    assert [line.get_label() for line in ax.lines] == ["layer 0", "layer 1"]
    assert all(line.get_ydata()[0] == 0 and line.get_ydata()[-1] > 0 for line in ax.lines)
    with pytest.raises(ValueError, match="no drift"):
        figures.drift_curves([(0, {"time/monitor_seconds": 1.0})], TITLE)


def test_summary_page_holds_table_curve_drift_and_heat_map(run):
    cli, run_dir = run
    doc = json.loads((run_dir / "metrics.json").read_text())
    data = figures.read_retention(run_dir)
    from lit_edit.monitor import Monitor

    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Monitor))
    fig = figures.summary(doc, data, monitor.points(), ("efficacy", "generalization", "specificity"))
    assert "world:tiny · VStar · AlphaEdit" in fig.get_suptitle()
    axes = fig.get_axes()
    titles = [ax.get_title() for ax in axes]
    assert "retention curve" in titles and "retention heat map" in titles
    table = next(ax for ax in axes if ax.tables).tables[0]
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in table.get_celld().items()}
    rows = {cells[(r, 0)]: (cells[(r, 1)], cells[(r, 2)]) for r in range(1, 1 + max(r for r, _ in cells))}
    assert rows["efficacy"] == (f"{doc['pre.efficacy']:.2f}", f"{doc['efficacy']:.2f}")
    assert "drift.perplexity" in rows
    curve = next(ax for ax in axes if ax.get_title() == "retention curve")
    eff = next(line for line in curve.lines if line.get_label() == "efficacy")
    assert list(eff.get_xdata()) == [0, 1, 2, 3] and eff.get_ydata()[0] == doc["pre.efficacy"]
    assert curve.get_ylim() == (-2, 102)
    heat = next(ax for ax in axes if ax.get_title() == "retention heat map")
    assert heat.images[0].get_clim() == (0.0, 100.0)
    assert any(ax.get_ylabel() == "perplexity" for ax in axes)


def test_hparams_table_is_the_run_settings_and_final_metrics(run):
    _, run_dir = run
    ea = events(run_dir)
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    names = set(start.session_start_info.hparams)
    assert {"model.model", "model.layers", "model.solver.class_path", "model.method.init_args.v_num_grad_steps",
            "data.batch_size"} <= names
    assert not [n for n in names if n.startswith("_") or "._" in n]  # no _instantiator
    assert start.session_start_info.hparams["model.layers"].string_value == "[0, 1]"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in exp.experiment.metric_infos}
    assert "hp/efficacy" in metrics and not [m for m in metrics if m.startswith("hp/pre.")]


def test_figures_redrawn_from_the_run_directory(run, tmp_path):
    _, run_dir = run
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    for png in ("retention.png", "summary.png"):
        (copy / png).unlink()
    figures.main([str(copy)])
    with Image.open(copy / "summary.png") as img:
        assert img.size == (1400, 1000)
    assert (copy / "retention.png").is_file()
    points = figures.drift_from_events(copy)
    assert [s for s, _ in points] == [0, 1, 2, 3] and "drift/perplexity" in points[0][1]


# -- a missing or partial retention.json: a clear error ------------------------------------------------------


def test_missing_retention_json_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(RetentionDataError, match=r"retention\.json: no such file.*eval_every_n_steps"):
        figures.read_retention(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {}, "units": {}}))
    with pytest.raises(SystemExit) as exit_:
        figures.main([str(tmp_path)])
    assert exit_.value.code == 1 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "summary.png").exists() and not (tmp_path / "retention.png").exists()


@pytest.mark.parametrize("text, message", [
    ('[{"step": 1, "key": "efficacy", "row": [0.5]}, {"step": 2, "key": "effi', r"not complete JSON"),
    ("", r"not complete JSON"),
    ("[]", r"no evaluation step"),
    ('{"step": 1}', r"expected a list"),
    ('[{"step": 1, "key": "efficacy"}]', r"entry 0 lacks row"),
    ('[{"step": 2, "key": "efficacy", "row": [0.5]}]', r"row of 1 values, expected 2"),
    ('[{"step": 2, "key": "e", "row": [0.5, 0.1]}, {"step": 1, "key": "e", "row": [0.2]}]', r"increasing"),
    ('[{"step": 1, "key": "efficacy", "row": [50]}]', r"fractions in \[0, 1\]"),
    ('[{"step": 1, "key": "efficacy", "row": [null]}]', r"every value is null"),
])
def test_partial_retention_json_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "retention.json"
    path.write_text(text)
    with pytest.raises(RetentionDataError, match=message):
        figures.read_retention(path)
    if text.startswith("["):  # the figure functions check their data too: never a blank figure
        data = json.loads(text) if text.endswith("]") else None
        if data is not None:
            with pytest.raises(RetentionDataError, match=message):
                figures.retention_heatmap(data, TITLE)
            with pytest.raises(RetentionDataError, match=message):
                figures.summary({"run": {}, "units": {}}, data)


def test_trace_curve_marks_peak_and_edited_layers():
    result = {"layers": [0, 1, 2, 3], "ie": [0.01, 0.2, 0.05, 0.0], "peak_layer": 1, "window": 3, "noise_draws": 5,
              "n_records": 4, "te": 0.3}
    fig = figures.trace_curve(result, "tiny", edited_layers=[1, 2])
    ax = fig.axes[0]
    assert labels(ax) == ("layer (centre of the restored window)", "indirect effect  p_rest − p_corr")
    assert fig.get_suptitle() == "Causal trace of tiny"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["edited layers (model.layers)", "MLP indirect effect", "peak: layer 1"]
    assert figures.rgb(fig).shape == (500, 750, 3)


def test_a_figure_that_cannot_be_drawn_warns_and_the_run_goes_on(tmp_path):
    def broken():
        raise KeyError("drift/perplexity")

    with pytest.warns(UserWarning, match=r"could not draw the drift curves: KeyError"):
        board.draw("the drift curves", broken, path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
