"""benchmarks/real_shape_smoke.py keeps working: its --tiny version (the Qwen2.5-0.5B architecture, 2 narrow blocks,
from a config dict) goes through the same path as the real-shape run: a model saved and loaded with from_pretrained,
C0 from a local corpus, 2 steps of 10 edits, a checkpoint per step, a resume that equals the uninterrupted run."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_real_shape_smoke_tiny(tiny_world, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # LIT_EDIT_CACHE: the tiny_world fixture's
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_shape_smoke.py"), "--shape", "qwen2.5-0.5b",
                          "--tiny", "--threads", "1", "--work", str(tmp_path / "work")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("RESULT ")
    result = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert result["shape"] == "qwen2.5-0.5b-tiny" and result["layers"] == "0-1"
    for key in ("resume_weights_equal", "resume_solver_equal", "resume_metrics_equal", "resume_edits_equal"):
        assert result[key] == "True", key
    for key in ("c0_s", "targets_s_1", "write_s_1", "eval_s_1", "step_s_2"):
        assert float(result[key]) > 0, key
    assert int(result["ckpt_bytes_2"]) > int(result["ckpt_weight_bytes"]) > 0 and int(result["ledger_bytes"]) > 0
