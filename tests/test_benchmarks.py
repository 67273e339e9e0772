"""The accelerator benchmarks run end to end at tiny shapes on CPU (their smoke test): benchmarks/gpu_suite.py's v*
agrees with the per-request loop and MetaKE and the write complete; benchmarks/c0_throughput.py counts every token."""
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_suite_at_tiny_shapes(bench, capsys):
    results = bench("gpu_suite").main(["--tiny", "--device", "cpu", "--models", "gpt2-xl", "llama3-8b", "--n", "5",
                                       "--ref_n", "2", "--steps", "3", "--T", "2"])
    assert [r["model"] for r in results] == ["gpt2-xl", "llama3-8b"]
    for r in results:
        assert r["max_rel_diff"] <= 1e-3  # the batched, truncated v* is the per-request loop's
        assert not r["metake_oom"] and r["n"] == 5 and r["steps"] == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and "gpt2-xl:vstar_speedup=" in last and "llama3-8b:" in last


def test_c0_throughput_at_tiny_shapes(bench, capsys):
    out = bench("c0_throughput").main(["--tiny", "--device", "cpu", "--models", "gpt-j-6b", "--tokens", "3000",
                                       "--max_length", "100"])
    assert out[0]["tokens"] == 3000 and out[0]["cap_tokens"] == 10 * out[0]["d_in"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT gpt-j-6b:tokens_per_s=")


def test_realisation_bins_reads_percent_and_fractions(bench, tmp_path):
    """scores.jsonl holds efficacy in percent; a run written before that (fractions) reads the same, in percent."""
    import json

    rb = bench("realisation_bins")
    for scale in (100.0, 1.0):
        run = tmp_path / f"run{scale:g}"
        run.mkdir()
        (run / "edits.jsonl").write_text("".join(
            json.dumps({"case_id": i, "rho": 0.1 * i, "beta": 0.5, "beta_hat": 0.6}) + "\n" for i in range(4)))
        (run / "scores.jsonl").write_text("".join(
            json.dumps({"case_id": i, "efficacy": scale * (i % 2)}) + "\n" for i in range(4)))
        assert [r["efficacy"] for r in rb.load(run)] == [0.0, 100.0, 0.0, 100.0]


def test_realisation_bins_reads_zsre_rewrite_accuracy(bench, tmp_path, capsys):
    """A ZsRE run's scores.jsonl has rewrite_acc, efficacy's analogue, and no efficacy: the bins and the bottom / top
    20 % by ρ read it."""
    import json

    rb = bench("realisation_bins")
    (tmp_path / "edits.jsonl").write_text("".join(
        json.dumps({"case_id": i, "rho": 0.1 * i, "beta": 0.5, "beta_hat": 0.5 + 0.1 * i}) + "\n" for i in range(5)))
    (tmp_path / "scores.jsonl").write_text("".join(
        json.dumps({"case_id": i, "rewrite_acc": 25.0 * i, "paraphrase_acc": 0.0}) + "\n" for i in range(5)))
    assert [r["efficacy"] for r in rb.load(tmp_path)] == [0.0, 25.0, 50.0, 75.0, 100.0]
    rb.main([str(tmp_path), "--bins", "5"])
    assert "bottom 20 % by rho 0.0, top 20 % 100.0" in capsys.readouterr().out


def test_realisation_bins_says_why_per_rho_bin(bench, tmp_path, capsys):
    """Per ρ bin, the residual the solver was asked to realise, the part it left ((1 − β̂)·residual), the refinement's
    shift and the anchor's reach: the bin means of the ledger's per-request values."""
    import json

    rb = bench("realisation_bins")
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(
        {"case_id": i, "rho": float(i), "beta": 0.5, "beta_hat": 0.5 + 0.1 * i, "residual": 10.0 * (i + 1),
         "shift": 0.01 * i, "reach": 0.02 * i}) + "\n" for i in range(4)))
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps({"case_id": i, "efficacy": 100.0}) + "\n" for i in range(4)))
    rb.main([str(tmp_path), "--bins", "2"])
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.strip().startswith("bin"))
    assert head.split()[-4:] == ["resid", "unreal", "shift", "reach"]
    first = next(line for line in lines if line.split()[:2] == ["0", "2"]).split()
    # bin 0 holds requests 0 and 1: residual (10 + 20) / 2, unrealised (0.5·10 + 0.4·20) / 2, shift, reach
    assert [float(x) for x in first[-4:]] == pytest.approx([15.0, 6.5, 0.005, 0.01])


def test_longform_compare_bins_records_by_answer_length(bench):
    """benchmarks/longform_compare.py's by-length columns: each record in the bin of its answer_tokens (edges
    inclusive below, the last bin open above), the mean of that bin's scores, an empty bin None."""
    lc = bench("longform_compare")
    bins = lc.length_bins([10, 25, 40])
    assert bins == [(10, 24), (25, 39), (40, 10**9)]
    records = [{"answer_tokens": n, "bleu": b, "rouge_l": 2 * b} for n, b in ((10, 1.0), (24, 3.0), (25, 5.0), (61, 7.0))]
    got = lc.by_length(records, bins)
    assert [g["n"] for g in got] == [2, 1, 1]
    assert [g["bleu"] for g in got] == [2.0, 5.0, 7.0] and [g["rouge_l"] for g in got] == [4.0, 10.0, 14.0]
    assert lc.by_length([], bins)[0]["bleu"] is None


def test_longform_compare_keep_refuses_a_folder_with_an_earlier_run(bench, tmp_path, monkeypatch, capsys):
    """--keep DIR: a run's directory already there (an earlier run) is refused by name before any fit starts,
    instead of two metrics.json under one run later."""
    lc = bench("longform_compare")
    (tmp_path / "anyedit_sequential").mkdir()
    monkeypatch.setattr(lc, "run", lambda *a: pytest.fail("a fit started"))
    monkeypatch.setattr(sys, "argv", ["longform_compare.py", "--keep", str(tmp_path), "--protocols", "sequential",
                                      "--methods", "muke", "anyedit"])
    with pytest.raises(SystemExit):
        lc.main()
    err = capsys.readouterr().err
    assert f"--keep {tmp_path}" in err and "anyedit_sequential" in err and "muke_sequential" not in err


def test_longform_compare_plans_a_real_models_runs(bench):
    """issue 30 (3): on SmolLM2 every dataset has its shipped config; μKE, AnyEdit and One-for-All run the same
    config with only the method changed; only the first child scores the unedited model; a world keeps its own
    configs and layers. Settings that do not apply are refused by name before any fit."""
    lc = bench("longform_compare")
    args = lambda **kw: type("A", (), {**dict(model="smollm2-135m", dataset="unke", layers=None, offset=0, limit=3,  # noqa: E731
                                              extra="", protocols=["independent", "sequential"],
                                              methods=["muke", "anyedit", "one_for_all"], seq_batch_size=4), **kw})
    for dataset in lc.DATASETS:
        todo = lc.plan(args(dataset=dataset))
        assert {c for _, _, c, _ in todo} == {f"configs/smollm2-135m/{dataset}_muke.yaml"}
        assert (lc.ROOT / todo[0][2]).is_file()
    todo = lc.plan(args())
    assert [(m, p) for m, p, _, _ in todo] == [(m, p) for p in ("independent", "sequential")
                                               for m in ("muke", "anyedit", "one_for_all")]
    for method, protocol, _, o in todo:
        assert o[o.index("--model.method.init_args.method") + 1] == method
        assert o[o.index("--model.protocol") + 1] == protocol
        assert o[o.index("--data.batch_size") + 1] == ("1" if protocol == "independent" else "4")
        assert o[o.index("--data.offset") + 1] == "0" and o[o.index("--data.limit") + 1] == "3"
    assert ["--model.eval_pre" in o for *_, o in todo] == [False] + [True] * 5
    world = lc.plan(args(model="world:deep", dataset=None, offset=None))
    assert [c for _, _, c, _ in world[:3]] == [f"configs/world/{m}.yaml" for m in ("muke", "anyedit", "one_for_all")]
    assert world[0][3][world[0][3].index("--model.layers") + 1] == "[1, 2]" and "--data.offset" not in world[0][3]
    with pytest.raises(SystemExit, match="--layers"):
        lc.plan(args(layers="[1]"))
    with pytest.raises(SystemExit, match="needs --dataset"):
        lc.plan(args(dataset=None))
    with pytest.raises(SystemExit, match="--dataset unke: a world"):
        lc.plan(args(model="world:deep"))
    with pytest.raises(SystemExit, match="--model gemma3-270m"):
        lc.plan(args(model="gemma3-270m"))


def test_longform_compare_end_to_end_on_the_tiny_world(bench, tiny_world, tmp_path, capsys):
    """Both protocols of one method on the tiny world's long-form records: the unedited model is scored once, each
    run's directory is kept with its per-record scores, and the last line is the RESULT line."""
    lc = bench("longform_compare")
    rows = lc.main(["--model", "world:tiny", "--layers", "[0, 1]", "--limit", "2", "--seq-batch-size", "2",
                    "--methods", "anyedit", "--keep", str(tmp_path), "--extra", "--model.method.init_args.v_num_grad_steps 3"])
    assert [(r["method"], r["protocol"], r["n"]) for r in rows] == [("anyedit", "independent", 2), ("anyedit", "sequential", 2)]
    assert rows[0]["pre.bleu"] is not None and rows[1]["pre.bleu"] is None  # the unedited model scored once
    assert all(sum(b["n"] for b in r["bins"]) == 2 and r["exact"] + r["zero"] <= 2 for r in rows)
    assert len(list(tmp_path.glob("anyedit_*/*/version_0/scores.jsonl"))) == 2
    out = capsys.readouterr().out
    assert "| pre-edit |" in out and out.strip().splitlines()[-1].startswith("RESULT anyedit_independent_bleu=")


def test_longform_compare_scores_per_category(bench):
    """EditEverything's records carry a category: its table adds BLEU / ROUGE-L per category; UnKEBench's do not."""
    lc = bench("longform_compare")
    records = [{"category": c, "bleu": b, "rouge_l": r, "answer_tokens": 10}
               for c, b, r in (("math", 10.0, 20.0), ("code", 0.0, 5.0), ("math", 30.0, 40.0))]
    assert lc.by_category(records) == {"code": {"n": 1, "bleu": 0.0, "rouge_l": 5.0},
                                       "math": {"n": 2, "bleu": 20.0, "rouge_l": 30.0}}
    assert lc.by_category([{"category": None, "bleu": 1.0, "rouge_l": 1.0}]) == {}
    assert lc.quartile_edges([80, 10, 20, 30, 40, 50, 60, 70]) == [10, 30, 50, 70]  # a real set's default bins
    assert lc.quartile_edges([5, 5, 5]) == [5] and lc.quartile_edges([]) == [1]
    bins = lc.length_bins([1, 64])
    row = {"method": "muke", "protocol": "independent", "n": 3, "wall_s": 5.0, "exact": 0, "zero": 1,
           "target_loss": 0.5, "bins": lc.by_length(records, bins), "categories": lc.by_category(records),
           **{k: 1.0 for k in lc.KEYS}, **{f"pre.{k}": 0.5 for k in lc.KEYS}}
    text = lc.table([row], bins)
    assert "| pre-edit | | | 0.50 |" in text and "| 0 / 1 | 0.50 | 5 s |" in text
    assert "| method | protocol | code | math |" in text and "20.00 / 30.00 (n = 2)" in text


def test_real_model_benchmark_at_tiny_shapes(bench, tiny_world, capsys):
    """benchmarks/real_model.py end to end on the tiny fact world: the run's phases are read back from its TensorBoard
    events, the per-request baseline's v* agrees with the batched one, and the last line is the RESULT line."""
    sets = ["model.model=world:tiny", "data.path=world:tiny", "model.layers=[0, 1]", "model.context_templates=[[10, 2]]",
            "model.method.init_args.v_num_grad_steps=5", "data.batch_size=2", "trainer.enable_progress_bar=false"]
    out = bench("real_model").main(["--config", "configs/world/alphaedit.yaml", "--n", "4", "--baseline-n", "2",
                                    *[x for s in sets for x in ("--set", s)]])
    assert out["n"] == 4 and out["targets_s"] > 0 and out["write_s"] > 0 and out["eval_s"] > 0
    assert out["vstar_rel_diff"] <= 1e-4 and out["speedup"] > 0 and 0 <= out["efficacy"] <= 100
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT edits_per_min=") and " speedup=" in last and " eval_s=" in last


def test_method_compare_offers_every_real_model_row(bench):
    """benchmarks/method_compare.py (issue 30): every row it names for a real model has its shipped config, on
    CounterFact for both models, and ZsRE offers AlphaEdit, MEMIT and MetaKE with its ablations."""
    mc = bench("method_compare")
    for model in ("smollm2-135m", "gemma3-270m"):
        assert set(mc.rows_for(model, "counterfact")) == set(mc.REAL_ROWS), model
        zsre = mc.rows_for(model, "zsre")
        assert {"alphaedit", "memit", "metake", "key_only", "stop_grad", "relaxed"} <= set(zsre), model
        for config, _, _ in [*mc.rows_for(model, "counterfact").values(), *zsre.values()]:
            assert (mc.ROOT / config).is_file()
    assert set(mc.rows_for("world:deep", "counterfact")) == set(mc.WORLD_ROWS)


def test_method_compare_plan_scores_the_unedited_model_once_and_seeds_each_child(bench):
    mc = bench("method_compare")
    rows = mc.rows_for("smollm2-135m", "counterfact")
    args = type("A", (), dict(offset=100, limit=40, batch_size=20, no_generations=True, extra="", seeds=[0, 1],
                              rows=["alphaedit", "metake"], model="smollm2-135m", dataset="counterfact",
                              curve_every=0))
    todo = mc.plan(args, rows)
    assert [(n, s) for n, s, _ in todo] == [("alphaedit", 0), ("metake", 0), ("alphaedit", 1), ("metake", 1)]
    assert ["--model.eval_pre" in o for _, _, o in todo] == [False, True, True, True]
    for _, seed, o in todo:
        for key in ("--seed_everything", "--model.context_seed", "--data.order_seed"):
            assert o[o.index(key) + 1] == str(seed)
        assert o[o.index("--model.method.init_args.evaluator.fluency") + 1] == "false"
    args.rows = ["nope"]
    with pytest.raises(SystemExit, match="--rows nope: no config"):
        mc.plan(args, rows)


def test_method_compare_mean_and_std_over_seeds(bench):
    mc = bench("method_compare")
    runs = [{"name": "a", "label": "A", "wall_s": 10.0, "efficacy": e, "fluency": None} for e in (90.0, 100.0, 95.0)]
    row = mc.aggregate(runs, ("efficacy", "fluency"))
    assert row["efficacy"] == (95.0, 5.0) and row["fluency"] == (None, None) and row["wall_s"] == 10.0
    text = mc.table([row], ("efficacy", "fluency"))
    assert "| A | 95.00 ± 5.00 | 10 s |" in text and "fluency" not in text  # a column no row has is left out


def test_method_compare_end_to_end_on_the_tiny_world(bench, tiny_world, monkeypatch, capsys):
    """Two rows, two seeds, on the tiny world: the unedited model is scored once (the pre-edit row), each seed edits
    the same records in its own order, MetaKE rows carry their ρ bins, the last line is the RESULT line."""
    mc = bench("method_compare")
    tiny = ["--model.model", "world:tiny", "--data.path", "world:tiny", "--model.layers", "[0, 1]",
            "--model.context_templates", "[[10, 2]]"]
    monkeypatch.setattr(mc, "WORLD_ROWS", {
        "alphaedit": ("configs/world/alphaedit.yaml", tiny + ["--model.method.init_args.v_num_grad_steps", "5"], "AE"),
        "metake": ("configs/world/metake.yaml", tiny + ["--model.method.init_args.T", "2",
                                                        "--model.method.init_args.base.v_num_grad_steps", "5"], "MK")})
    rows = mc.main(["--rows", "alphaedit", "metake", "--limit", "4", "--batch_size", "2", "--seeds", "0", "1",
                    "--curve-every", "2"])
    assert [r["name"] for r in rows] == ["pre", "alphaedit", "metake"]
    assert all(r["n"] == 2 for r in rows[1:]) and rows[0]["efficacy"][1] is None
    assert rows[1]["efficacy"][0] is not None and rows[1]["efficacy"][1] is not None
    out = capsys.readouterr().out
    assert out.count("corr(beta, beta_hat)") == 2 and "<tmp>/metake/" in out  # realisation_bins per MetaKE run
    assert out.strip().splitlines()[-1].startswith("RESULT pre_efficacy=")
    # the retention curve and drift every 2 edits (each step here), for each of the 4 runs
    assert "| run | measure | 2 | 4 |" in out
    assert out.count("| retention efficacy |") == 4 and out.count("| perplexity |") == 4
    with pytest.raises(SystemExit, match="multiple of --batch_size"):
        mc.main(["--rows", "alphaedit", "--limit", "4", "--batch_size", "2", "--curve-every", "3"])


def test_method_compare_keep_refuses_a_folder_with_earlier_runs(bench, tmp_path, capsys):
    """--keep keeps each run's directory under seed<S>/<row>; a folder that already holds one of them is refused before
    any child starts (fit_child reads the one metrics.json under a row's folder)."""
    mc = bench("method_compare")
    (tmp_path / "seed1" / "metake").mkdir(parents=True)
    with pytest.raises(SystemExit):
        mc.main(["--rows", "alphaedit", "metake", "--seeds", "0", "1", "--keep", str(tmp_path)])
    assert "already holds seed1/metake from an earlier run" in capsys.readouterr().err


SHARED_UNKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "unke.json"


def test_window_tune_refuses_reported_records(bench):
    """Settings are chosen on dev records only: a record at or after the config's data.offset is refused before
    any model is loaded."""
    with pytest.raises(SystemExit, match=r"--records \[100\].*data.offset 100"):
        bench("window_tune").main(["--records", "0", "100"])


@pytest.mark.skipif(not SHARED_UNKE.is_file(), reason="needs ../shared/data/unke.json beside the checkout")
def test_window_tune_measures_how_far_the_targets_reach(bench, capsys):
    """On SmolLM2 and UnKEBench's dev record 0: one step (no update: z = h_init) leaves every window's NLL where the
    model has it; three Adam steps lower the mean; the table has a row per setting and the RESULT line names the
    better one."""
    rows = bench("window_tune").main(["--records", "0", "--method", "anyedit", "--steps", "1", "3"])
    assert [r["steps"] for r in rows] == [1, 3] and rows[0]["windows"] == rows[1]["windows"] > 1
    assert rows[1]["mean_nll"] < rows[0]["mean_nll"]
    out = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("| 30 |") for line in out) == 2
    assert out[-1].startswith("RESULT method=anyedit records=1 settings=2 best_window=30 best_steps=3 ")
