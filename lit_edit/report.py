"""What a run reports, as plain functions of the step's plan and the module: the step's scalars, the ledger lines,
the console table and the self-describing ``metrics.json`` (schemas: docs/outputs.md).

Units. The evaluator's scores that are fractions of prompts or tokens (efficacy, BLEU, ...) are reported in
percent everywhere a person reads them: ``metrics.json``, ``scores.jsonl``, the console table and TensorBoard,
rounded to 2 decimals (float32 noise below that is not a result). Its other keys name their unit in ``raw_keys`` (fluency, an entropy,
is reported as bits ×100, the scale of the ROME and MEMIT tables); the monitor's (``drift.*``, ``probe.*``) keep their own unit everywhere, rounded to 4 decimals.
"""
from __future__ import annotations

import lit_edit
from lit_edit.editing import StepStats


SCALED = ("%", "bits×100")  # reported ×100: percent, and fluency on the papers' scale (ROME/MEMIT tables, ≈ 600)


def unit(evaluator, key: str) -> str:
    """"%" for the evaluator's fractions, the unit it names in ``raw_keys`` (``{key: unit}``) for its other keys,
    "" for keys that are not the evaluator's (``n_edits``, the monitor's)."""
    base = key[4:] if key.startswith("pre.") else key
    raw = getattr(evaluator, "raw_keys", {})
    return raw[base] if base in raw else "%" if base in evaluator.keys else ""


def in_units(evaluator, scores: dict) -> dict:
    """Score dict → reported values: percent keys ×100 rounded to 2 decimals, the others rounded to 4."""
    out = {}
    for k, v in scores.items():
        if isinstance(v, bool) or not isinstance(v, float):
            out[k] = v
        else:
            out[k] = round(100 * v, 2) if unit(evaluator, k) in SCALED else round(v, 4)
    return out


def step_scalars(m, plan) -> dict:
    """The step's scalars: the targets' losses, update and residual norms per layer, the solver's own figures, the
    method's diagnostics, the batch's scores (percent), the live edit count and the wall time of the step's phases."""
    n_writes, stats, out = len(plan.writes), plan.stats, {}
    if plan.targets is not None:
        res = plan.targets
        out.update({"targets/loss": res.loss.mean(), "targets/nll": res.nll.mean(),
                    "targets/steps": res.steps.float().mean(), "targets/delta_norm": res.delta.norm(dim=-1).mean()})
        if m.method.row_name:
            out[f"targets/{m.method.row_name}"] = len(res.loss)
        out.update(plan.info.get("logs", {}))
    if stats.dropped:
        out["n_removed"] = m.edits.n_removed
    for name, per_layer in (("residual_norm", stats.residual_norm), ("delta_norm", stats.update_norm),
                            ("forget_norm", stats.forget_norm), ("regularizer_change", stats.regularizer_change)):
        out.update({f"update/{name}/layer_{l}": v for l, v in per_layer.items()})
    out.update({f"solver/{k}": v for k, v in m.solver.describe().items()})
    if n_writes:
        out.update(plan.info.get("after_write", {}).get("logs", {}))
        out.update({f"batch/{k}": v for k, v in in_units(m.method.evaluator, plan.batch_scores).items()})
    out["n_edits"] = len(m.edits.ids)
    out.update({f"time/{k}_seconds": v for k, v in plan.seconds.items()})  # targets, write, eval
    return {k: float(v) for k, v in out.items()}


def step_histograms(plan) -> dict:
    """Per-request distributions of the step: target losses, δ norms and residual norms per layer, and a method's
    own (MetaKE's β, ρ)."""
    out = {}
    if plan.targets is not None:
        out["hist/target_loss"] = plan.targets.loss
        out["hist/delta_norm"] = plan.targets.delta.norm(dim=-1)
    for l, v in plan.stats.request_residual.items():
        out[f"hist/residual_norm/layer_{l}"] = v
    out.update(plan.info.get("histograms", {}))
    out.update(plan.info.get("after_write", {}).get("histograms", {}))
    return out


def ledger_lines(plan, stats: StepStats, step: int, m) -> list[dict]:
    """One line per request of the step: what was done to which fact and its targets, and per writing request its
    target loss, residual norm per layer (the mean over its target rows) and the method's own fields."""
    dropped = set(stats.dropped)
    lines, j = [], 0  # j: index among the requests that wrote a value
    for r in plan.requests:
        line = {"case_id": r.case_id, "step": step, "operation": r.op, "fact": r.fact_id, "layers": m.layers,
                "update_norm": stats.update_norm}
        if hasattr(r, "target_new"):
            line.update(target_new=r.target_new, target_true=r.target_true)
        else:
            line["answer"] = r.answer
        if r.op == "insert" and r.fact_id in dropped:
            line["operation"] = "insert (replaced earlier edit)"
        if r.writes:
            rows = plan.columns.rows[j]
            line["target_loss"] = round(float(plan.targets.loss[rows].mean()), 6)
            line["residual_norm"] = {l: sum(v[c] for c in rows) / len(rows) for l, v in stats.request_residual.items()}
            if m.method.row_name:
                line[m.method.row_name] = len(rows)
            line.update(m.method.ledger_fields({**plan.info, **plan.info.get("after_write", {})}, j))
            j += 1
        if r.fact_id in dropped:
            line["forget_norm"] = stats.forget_norm
        lines.append(line)
    return lines


def metrics_document(m, result: dict, steps: int) -> dict:
    """``metrics.json``: the final scores and their pre-edit values in reported units, ``n_edits``, and what
    produced them (``run``) with each key's unit (``units``)."""
    ev = m.method.evaluator
    scores = in_units(ev, result)
    run = {"model": m.model_name, "layers": m.layers, "method": m.hparams["method"], "solver": m.hparams["solver"],
           "data": m.data_settings, "protocol": m.protocol, "steps": steps, "lit_edit_version": lit_edit.__version__}
    units = {k: unit(ev, k) for k, v in result.items() if isinstance(v, float)}
    return {**scores, "run": run, "units": units}


def print_table(doc: dict, n: int, keys: tuple[str, ...], evaluator) -> None:
    what = f"test of {doc['run']['test_of']}" if "test_of" in doc["run"] else f"{doc['run']['protocol']} protocol"
    print(f"\nlit_edit: final evaluation over {n} requests ({what})")
    print(f"{'metric':<26}{'pre':>10}{'post':>10}  unit")
    for k in [k for k in keys if k in doc or f"pre.{k}" in doc]:  # ZsRE's keys are not in a CounterFact run
        f = lambda x: f"{x:10.2f}" if x is not None else f"{'-':>10}"  # noqa: E731
        print(f"{k:<26}{f(doc.get(f'pre.{k}'))}{f(doc.get(k))}  {unit(evaluator, k)}")
