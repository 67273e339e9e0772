"""What the CounterFact metrics cost per evaluation, on the unedited model: the probability metrics (always on),
free-generation efficacy (on by default) and fluency + consistency (off by default). A run scores them twice,
pre-edit and final (the per-batch and retention curves keep the probability metrics only); compare twice the
generation columns with a run's time (``time python train.py fit --config configs/world/alphaedit.yaml --data.limit 40``).

    python benchmarks/cf_metrics_cost.py                          # the default world, its first 40 records
    python benchmarks/cf_metrics_cost.py --model world:tiny --limit 20
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--generation_prompts", type=int, default=10)
    ap.add_argument("--generation_length", type=int, default=100)
    args = ap.parse_args()

    import torch

    from lit_edit.cf_metrics import References, free_generation_scores, generation_scores
    from lit_edit.data import read_requests
    from lit_edit.metrics import record_scores
    from lit_edit.models import load_model
    from lit_edit.world import build_world, resolve_world_name
    from lit_edit.world.references import write_references

    torch.set_num_threads(1)
    model, tok, _ = load_model(args.model)
    requests = read_requests("world", args.model, limit=args.limit)
    refs_dir = write_references(build_world(resolve_world_name(args.model)), Path(tempfile.mkdtemp()) / "refs")
    refs = References.load(refs_dir)
    steps = {
        "probability": lambda: record_scores(model, tok, requests),
        "free_generation": lambda: free_generation_scores(model, tok, requests),
        "fluency+consistency": lambda: generation_scores(model, tok, requests, references=refs,
                                                         n_prompts=args.generation_prompts,
                                                         length=args.generation_length),
    }
    print(f"{args.model}, {len(requests)} records, one thread: seconds per evaluation (wall / CPU)")
    cpu_s = {}
    for name, run in steps.items():
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        cpu_s[name] = time.process_time() - cpu
        print(f"  {name:<22}{time.perf_counter() - wall:8.2f} {cpu_s[name]:8.2f}")
    print("RESULT " + " ".join(f"{k.replace('+', '_')}_cpu_s={v:.2f}" for k, v in cpu_s.items()))


if __name__ == "__main__":
    main()
