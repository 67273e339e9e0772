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
