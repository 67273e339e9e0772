"""The pictures of a run, drawn with matplotlib: small pure functions from a run's numbers to a ``Figure``.

* :func:`retention_heatmap` — x: the batch (step) an edit was written in, y: the evaluation step, colour: the
  retention (the mean efficacy, in percent, of that batch's live edits at that step) on a fixed 0–100 scale with a
  colour bar; ``retention.png`` and TensorBoard's ``retention/heatmap``;
* :func:`update_norms` — ‖W_l − W_l,0‖_F / ‖W_l,0‖_F of every edited layer over the steps (``drift/update_norms``);
* :func:`drift_curves` — perplexity, KL(p₀ ‖ p) and top-1 agreement against the unedited model over the steps, one
  figure (``drift/curves``);
* :func:`trace_curve` — the causal trace: indirect effect per layer, the peak and the edited layers marked
  (``trace.png``, :mod:`lit_edit.trace`);
* :func:`summary` — one page: the final table (pre → post), the retention curve, drift and the heat map
  (``summary.png`` and TensorBoard's ``summary``, end of a fit).

Every figure is titled with the run's model / method / solver (:func:`run_title`) and sized to be read in a
TensorBoard image card (750 × 500 px; the summary 1400 × 1000 px). The figures are ``matplotlib.figure.Figure``
objects rendered by the Agg canvas: no pyplot, so no GUI backend is touched, no global figure registry fills up
and a notebook's own backend is left alone. Missing or malformed retention data raises
:class:`RetentionDataError`, never a blank figure. ``python -m lit_edit.figures RUN_DIR`` redraws
``retention.png`` and ``summary.png`` from a run directory's files (drift from its TensorBoard events).
"""
from __future__ import annotations

import io
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 100
SIZE = (7.5, 5.0)  # inches: 750 x 500 px, readable in a TensorBoard card
SUMMARY_SIZE = (14.0, 10.0)  # 1400 x 1000 px
CMAP = "viridis"  # perceptually ordered: low retention dark, high bright
NONE_COLOUR = "#d9d9d9"  # no live edit of that batch (not yet written, or all removed)
NO_RETENTION = "no evaluation step\n(model.eval_every_n_steps 0, or the independent protocol)"
STYLE = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "legend.fontsize": 10,
         "xtick.labelsize": 11, "ytick.labelsize": 11, "figure.titlesize": 14}
STEP_LABEL = "step (applied batches; 0 = unedited)"
DRIFT = (("drift/perplexity", "perplexity", 1.0), ("drift/kl", "KL(p₀‖p), nats", 1.0),
         ("drift/agreement", "top-1 agree %", 100.0))


class RetentionDataError(ValueError):
    """retention.json (or the heat map's rows) missing, incomplete or not in its schema (docs/outputs.md)."""


# ------------------------------------------------------------------------------------------------
# Rendering and titles
# ------------------------------------------------------------------------------------------------


@contextmanager
def _style():
    with matplotlib.rc_context(STYLE):
        yield


def _figure(size=SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig and rendering need no pyplot
    return fig


def rgb(fig: Figure) -> np.ndarray:
    """The rendered figure, [H, W, 3] uint8."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, written whole (:func:`lit_edit.runs.atomic_write`)."""
    from lit_edit.runs import atomic_write

    atomic_write(path, png_bytes(fig))
    return Path(path)


def log_figure(writer, tag: str, fig: Figure, step: int) -> None:
    """``fig`` as a TensorBoard image (a ``SummaryWriter``'s ``add_image``, HWC)."""
    writer.add_image(tag, rgb(fig), step, dataformats="HWC")


def short_name(component) -> str:
    """``lit_edit.solvers.AlphaEdit`` (or ``{"class_path": ...}``) → ``AlphaEdit``."""
    if isinstance(component, dict):
        component = component.get("class_path", "?")
    return str(component).rsplit(".", 1)[-1]


def run_title(run: dict) -> str:
    """``model · method · solver`` from metrics.json's ``run`` (or any dict with ``model``, ``method``,
    ``solver``), with the edited layers when known."""
    parts = [str(run.get("model", "?")), short_name(run.get("method", "?")), short_name(run.get("solver", "?"))]
    layers = run.get("layers")
    return " · ".join(parts) + (f"  (layers {', '.join(map(str, layers))})" if layers else "")


# ------------------------------------------------------------------------------------------------
# The retention heat map
# ------------------------------------------------------------------------------------------------


def check_retention(data, where: str = "retention data") -> list[dict]:
    """``data`` (retention.json's list) checked against its schema: one ``{step, key, row}`` per evaluation step,
    steps increasing, ``row[j]`` the mean ``key`` (a fraction, or null) of the live edits of step j+1, so that
    ``len(row) == step``; at least one value. Raises :class:`RetentionDataError` naming what is wrong."""
    if not isinstance(data, list):
        raise RetentionDataError(f"{where}: expected a list of {{step, key, row}} entries, got "
                                 f"{type(data).__name__}")
    if not data:
        raise RetentionDataError(f"{where}: no evaluation step (an empty list): nothing to draw")
    last = 0
    for i, e in enumerate(data):
        missing = [k for k in ("step", "key", "row") if not isinstance(e, dict) or k not in e]
        if missing:
            raise RetentionDataError(f"{where}: entry {i} lacks {', '.join(missing)} (incomplete file?)")
        step, row = e["step"], e["row"]
        if isinstance(step, bool) or not isinstance(step, int) or step <= last:
            raise RetentionDataError(f"{where}: entry {i} has step {step!r}; steps must be integers, increasing "
                                     f"from 1")
        if not isinstance(row, list) or len(row) != step:
            n = len(row) if isinstance(row, list) else type(row).__name__
            raise RetentionDataError(f"{where}: entry {i} (step {step}) has a row of {n} values, expected {step} "
                                     f"(one per edit step 1..{step})")
        for v in row:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1
                                  or math.isnan(v)):
                raise RetentionDataError(f"{where}: entry {i} (step {step}) holds {v!r}; values are fractions in "
                                         f"[0, 1] or null")
        last = step
    if all(v is None for e in data for v in e["row"]):
        raise RetentionDataError(f"{where}: every value is null (no live edit was ever scored): nothing to draw")
    return data


def read_retention(path: str | Path) -> list[dict]:
    """retention.json, checked (:func:`check_retention`); a clear :class:`RetentionDataError` if it is missing,
    cut short or not in its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "retention.json"
    if not path.is_file():
        raise RetentionDataError(f"{path}: no such file. retention.json is written at the end of a fit with "
                                 f"model.eval_every_n_steps > 0 (the retention heat map); this run has none, or "
                                 f"has not finished")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RetentionDataError(f"{path}: not complete JSON ({err.msg} at character {err.pos} of {len(text)}); "
                                 f"the file is cut short or damaged") from None
    return check_retention(data, str(path))


def _heatmap_panel(fig: Figure, ax, data: list[dict], annotate: bool = True):
    key = data[-1]["key"] or "score"
    n_cols, n_rows = data[-1]["step"], len(data)
    grid = np.full((n_rows, n_cols), np.nan)
    for i, e in enumerate(data):
        grid[i, :len(e["row"])] = [np.nan if v is None else 100.0 * v for v in e["row"]]
    steps = [e["step"] for e in data]
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    # evaluations every d steps: y in steps; else (a resume changed the interval) one row per evaluation
    d = gaps.pop() if len(gaps) == 1 else (1 if n_rows == 1 else None)
    y = (lambda i: steps[i]) if d else (lambda i: i)  # noqa: E731
    half = d / 2 if d else 0.5
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=NONE_COLOUR)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto",
                   interpolation="antialiased", extent=(0.5, n_cols + 0.5, y(n_rows - 1) + half, y(0) - half))
    bar = fig.colorbar(im, ax=ax, ticks=[0, 25, 50, 75, 100], pad=0.02)
    bar.set_label(f"retention: {key} (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12, steps=[1, 2, 5, 10]))
    ax.set_xlim(0.5, n_cols + 0.5)
    if d and n_rows > 12:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=10, steps=[1, 2, 5, 10]))
    else:
        every = max(1, math.ceil(n_rows / 12))
        ax.set_yticks([y(i) for i in range(0, n_rows, every)], [str(t) for t in steps[::every]])
    ax.set_xlabel("batch the edits were written in (step)")
    ax.set_ylabel("evaluation step")
    # upper right: edits not yet written, grey in any sequential run
    ax.legend(handles=[Patch(facecolor=NONE_COLOUR, edgecolor="grey", label="no live edit")], loc="upper right",
              fontsize=9, framealpha=0.9)
    if annotate and n_cols <= 20 and n_rows <= 16:  # small grids carry their numbers
        size = 11 if n_cols <= 10 else 9 if n_cols <= 15 else 8
        for i in range(n_rows):
            for j in range(n_cols):
                if not np.isnan(grid[i, j]):
                    ax.text(j + 1, y(i), f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=size,
                            color="white" if grid[i, j] < 60 else "black")
    return im


def retention_heatmap(data: list[dict], title: str) -> Figure:
    """The retention heat map of retention.json's ``data`` (checked first: :class:`RetentionDataError`)."""
    data = check_retention(data)
    with _style():
        fig = _figure()
        ax = fig.subplots()
        _heatmap_panel(fig, ax, data)
        ax.set_title(f"{data[-1]['key'] or 'score'} of each batch's live edits at each evaluation")
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------
# Drift and update norms (lit_edit.monitor's measurements)
# ------------------------------------------------------------------------------------------------


def _points(history: Iterable[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """(step, values) sorted by step, the last measurement of a step kept."""
    return sorted({int(s): v for s, v in history}.items())


def _series(points, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s, v in points:
        if key in v and v[key] is not None:
            xs.append(s)
            ys.append(scale * float(v[key]))
    return xs, ys


def _layer_keys(points, prefix: str) -> list[str]:
    keys = {k for _, v in points for k in v if k.startswith(prefix)}
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else 0)


def _note(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="dimgrey",
            wrap=True)


def _drift_panels(axes, points) -> bool:
    drawn = False
    for ax, (key, label, scale) in zip(axes, DRIFT):
        xs, ys = _series(points, key, scale)
        if xs:
            ax.plot(xs, ys, marker="o", color="tab:blue")
            drawn = True
        ax.set_ylabel(label, fontsize=11)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes[-1].set_xlabel(STEP_LABEL)
    axes[0].figure.align_ylabels(axes)
    return drawn


def drift_curves(history: Iterable[tuple[int, dict]], title: str) -> Figure:
    """Perplexity, KL and top-1 agreement against the unedited model over the steps: ``history`` is
    :attr:`lit_edit.monitor.Monitor.history`'s (step, {``drift/perplexity``: ..., ...})."""
    points = _points(history)
    if not any(_series(points, k)[0] for k, _, _ in DRIFT):
        raise ValueError("drift_curves: no drift/perplexity, drift/kl or drift/agreement measurement to draw")
    with _style():
        fig = _figure((SIZE[0], 6.0))
        axes = fig.subplots(3, 1, sharex=True)
        _drift_panels(axes, points)
        axes[0].set_title("drift against the unedited model (held-out text)")
        fig.suptitle(title)
    return fig


def _norms_panel(ax, points) -> bool:
    keys = _layer_keys(points, "drift/update_rel/layer_")
    for k in keys:
        xs, ys = _series(points, k)
        ax.plot(xs, ys, marker="o", label=f"layer {k.rsplit('_', 1)[-1]}")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("‖ΔW‖_F / ‖W₀‖_F")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(ncol=max(1, math.ceil(len(keys) / 6)))
    return bool(keys)


def update_norms(history: Iterable[tuple[int, dict]], title: str) -> Figure:
    """‖W_l − W_l,0‖_F / ‖W_l,0‖_F of every edited layer over the steps (``drift/update_rel/layer_l`` of
    :attr:`lit_edit.monitor.Monitor.history`)."""
    points = _points(history)
    if not _layer_keys(points, "drift/update_rel/layer_"):
        raise ValueError("update_norms: no drift/update_rel/layer_<l> measurement to draw")
    with _style():
        fig = _figure()
        ax = fig.subplots()
        _norms_panel(ax, points)
        ax.set_title("accumulated update of each edited layer, relative to the unedited weight")
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------
# The causal trace (lit_edit.trace)
# ------------------------------------------------------------------------------------------------


def trace_curve(result: dict, model_name: str, edited_layers: Sequence[int] | None = None) -> Figure:
    """Indirect effect per layer (:func:`lit_edit.trace.causal_trace`'s ``result``), the peak marked and the
    edited layers (the config's ``model.layers``) shaded."""
    layers, ie = result["layers"], result["ie"]
    peak = result["peak_layer"]
    with _style():
        fig = _figure()
        ax = fig.subplots()
        spans: list[list[int]] = []  # consecutive edited layers as one shaded span
        for layer in sorted(set(edited_layers or [])):
            if spans and layer == spans[-1][1] + 1:
                spans[-1][1] = layer
            else:
                spans.append([layer, layer])
        for i, (lo, hi) in enumerate(spans):
            ax.axvspan(lo - 0.5, hi + 0.5, color="tab:orange", alpha=0.2,
                       label="edited layers (model.layers)" if i == 0 else None)
        ax.plot(layers, ie, marker="o", color="tab:green", label="MLP indirect effect")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.plot([peak], [ie[layers.index(peak)] if peak in layers else ie[peak]], marker="*", markersize=16,
                color="tab:red", linestyle="none", label=f"peak: layer {peak}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (centre of the restored window)")
        ax.set_ylabel("indirect effect  p_rest − p_corr")
        ax.set_title(f"MLP at the subject's last token: window {result['window']}, {result['noise_draws']} noise "
                     f"draws, {result['n_records']} records, TE {result['te']:.3f}", fontsize=10)
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
        fig.suptitle(f"Causal trace of {model_name}")
    return fig


# ------------------------------------------------------------------------------------------------
# The summary page
# ------------------------------------------------------------------------------------------------


def _fmt(v, unit: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.2f}" if unit in ("%", "bits×100") else f"{v:.4f}"


def table_rows(doc: dict, keys: Sequence[str] | None = None) -> list[list[str]]:
    """metrics.json's ``doc`` as [metric, pre, post, unit] rows: the evaluator's ``keys`` (default: every key
    with a unit), then drift and probes (not the per-layer update norms: their own figure)."""
    units = doc.get("units", {})
    if keys is None:
        keys = [k for k in units if not k.startswith("pre.")]
    keys = list(keys) + [k for k in units if not k.startswith("pre.") and k not in keys
                         and (k.startswith("drift.") or k.startswith("probe."))]
    rows = []
    for k in keys:
        if k.startswith(("drift.update_norm", "drift.update_rel")) or (k not in doc and f"pre.{k}" not in doc):
            continue
        unit = units.get(k, units.get(f"pre.{k}", ""))
        rows.append([k, _fmt(doc.get(f"pre.{k}"), unit), _fmt(doc.get(k), unit), unit])
    return rows


def _table_panel(ax, doc: dict, keys) -> None:
    ax.set_axis_off()
    rows = table_rows(doc, keys)[:22]
    if not rows:
        _note(ax, "metrics.json holds no scores")
        return
    table = ax.table(cellText=rows, colLabels=["metric", "pre", "post", "unit"], loc="upper center",
                     cellLoc="right", colLoc="right", colWidths=[0.46, 0.18, 0.18, 0.18])
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    table.scale(1.0, 1.35)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#bbbbbb")
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eeeeee")
        if c == 0:
            cell.get_text().set_horizontalalignment("left")
    n = doc.get("n_edits")
    ax.set_title(f"final evaluation{f' over {n} live edits' if n is not None else ''} (pre → post)")


def _curve_keys(doc: dict, scored: list[dict], keys) -> list[str]:
    """The retention curve's scores: the evaluator's first 4 shares of prompts or tokens (efficacy,
    generalization, specificity; BLEU, ROUGE-L, ...), on the 0-100 axis; not the magnitudes (differences of
    probabilities, which may be negative: the table has them)."""
    names = [k for k in (keys or scored[-1]["scores"]) if k in scored[-1]["scores"] and "magnitude" not in k]
    def inside(k: str) -> bool:
        return all(0 <= v <= 100 for v in [doc.get(f"pre.{k}", 0)] + [e["scores"].get(k, 0) for e in scored])

    return [k for k in names if inside(k)][:4]


def _curve_panel(ax, doc: dict, retention: list[dict] | None, keys) -> None:
    scored = [e for e in retention or [] if isinstance(e.get("scores"), dict)]
    if not scored:
        if retention:  # retention.json of an older run: the mean of the heat map's rows
            key = retention[-1]["key"] or "score"
            xs = [e["step"] for e in retention]
            ys = [100.0 * np.mean([v for v in e["row"] if v is not None]) if any(v is not None for v in e["row"])
                  else np.nan for e in retention]
            ax.plot(xs, ys, marker="o", label=f"{key} (mean over batches)")
        else:
            _note(ax, f"no retention curve: {NO_RETENTION}")
            return
    else:
        for k in _curve_keys(doc, scored, keys):
            xs = [e["step"] for e in scored if k in e["scores"]]
            ys = [e["scores"][k] for e in scored if k in e["scores"]]
            if f"pre.{k}" in doc:  # step 0: the unedited model
                xs, ys = [0] + xs, [doc[f"pre.{k}"]] + ys
            ax.plot(xs, ys, marker="o", label=k)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("score of all live edits (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("retention curve")


def summary(doc: dict, retention: list[dict] | None = None, drift: Iterable[tuple[int, dict]] | None = None,
            keys: Sequence[str] | None = None) -> Figure:
    """One page for a finished run: metrics.json's ``doc`` as a table (pre → post), the retention curve and the
    heat map from ``retention`` (retention.json's list; its entries' ``scores``, the curve's values, and step 0
    from ``doc``'s ``pre.``), and ``drift`` (the monitor's (step, values)). A part without data says so. The
    retention data, when given, is checked (:class:`RetentionDataError`)."""
    if retention is not None:
        retention = check_retention(retention)
    run = doc.get("run", {})
    points = _points(drift or [])
    with _style():
        fig = _figure(SUMMARY_SIZE)
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
        ax_table, ax_curve = top.subplots(1, 2, width_ratios=[1.0, 1.25])
        left, right = bottom.subfigures(1, 2, width_ratios=[1.0, 1.25])
        _table_panel(ax_table, doc, keys)
        _curve_panel(ax_curve, doc, retention, keys)
        if any(_series(points, k)[0] for k, _, _ in DRIFT):
            axes = left.subplots(3, 1, sharex=True)
            _drift_panels(axes, points)
            axes[0].set_title("drift against the unedited model")
        else:
            _note(left.subplots(), "no drift measured\n(add the lit_edit.monitor.Monitor callback)")
        ax_heat = right.subplots()
        if retention:
            _heatmap_panel(right, ax_heat, retention)
            ax_heat.set_title("retention heat map")
        else:
            _note(ax_heat, f"no retention heat map: {NO_RETENTION}")
        about = [f"{run['protocol']} protocol" if run.get("protocol") else None,
                 f"{doc['n_edits']} edits" if "n_edits" in doc else None,
                 f"{run['steps']} steps" if "steps" in run else None]
        fig.suptitle(run_title(run) + "\n" + ", ".join(a for a in about if a), fontsize=15)
    return fig


# ------------------------------------------------------------------------------------------------
# From a run directory
# ------------------------------------------------------------------------------------------------


def drift_from_events(run_dir: str | Path) -> list[tuple[int, dict]]:
    """The monitor's drift scalars read back from a run directory's TensorBoard events (the last value of each
    step: a resumed run's own measurements win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 1, "images": 1, "tensors": 1})
    ea.Reload()
    by_step: dict[int, dict] = {}
    for tag in ea.Tags().get("scalars", []):
        if tag.startswith("drift/"):
            for e in ea.Scalars(tag):
                by_step.setdefault(int(e.step), {})[tag] = e.value
    return sorted(by_step.items())


def draw_run(run_dir: str | Path) -> list[Path]:
    """``retention.png`` and ``summary.png`` of a finished run, redrawn from its files (metrics.json,
    retention.json, the events' drift scalars). A missing or damaged retention.json raises
    :class:`RetentionDataError`."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (the run has not finished, or this is no run directory)")
    doc = json.loads(metrics.read_text())
    retention = read_retention(run_dir / "retention.json")
    title = run_title(doc.get("run", {}))
    written = [save_png(retention_heatmap(retention, title), run_dir / "retention.png")]
    written.append(save_png(summary(doc, retention, drift_from_events(run_dir)), run_dir / "summary.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m lit_edit.figures RUN_DIR  (redraws RUN_DIR/retention.png and RUN_DIR/summary.png)")
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    try:
        for p in draw_run(args[0]):
            print(f"wrote {p}")
    except (RetentionDataError, FileNotFoundError) as err:
        print(f"lit_edit.figures: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
