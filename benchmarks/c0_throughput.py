"""Throughput of the C0 statistic (lit_edit/stats.py, docs/algorithms.md §3) in tokens per second, at real shapes.

A randomly initialised model of the family's shape (benchmarks/gpu_suite.py's configs, no hub access) streams random
token sequences of Wikipedia-like lengths through ``compute_second_moments`` for the published edited layers: the
forward up to the last edited matrix (it stops there) and the float64 accumulation of Σ k kᵀ per layer. Also prints
how long the ~10·d_in keys the docs recommend as the sample cap would take at that rate.

    python benchmarks/c0_throughput.py --models llama3-8b --tokens 150000      # GPU
    python benchmarks/c0_throughput.py --models gpt2-xl --real --tokens 4000       # real shape on CPU
    python benchmarks/c0_throughput.py --tiny                                    # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lit_edit  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its thread pool)
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import MODELS, TINY, TINY_LAYERS  # noqa: E402

from lit_edit.layouts import get_layout, weight_shape  # noqa: E402
from lit_edit.stats import compute_second_moments  # noqa: E402


class TokenIds:
    """Stands in for a tokenizer: the "texts" are already token ids (random ones: the cost does not depend on them)."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, truncation=True, max_length=None):
        return {"input_ids": list(text[:max_length])}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, default=0, help="tokens to stream (0: 2 x the largest key width)")
    p.add_argument("--max_length", type=int, default=1024, help="per-text cap, as model.stats.max_length")
    p.add_argument("--batch_tokens", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="small shapes (default on a machine without CUDA)")
    p.add_argument("--real", action="store_true", help="the real shapes even without CUDA (slow; GPT-2 XL fits)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    args.tiny = args.tiny or (dev.type != "cuda" and not args.real)
    out = []
    for name in args.models:
        spec = MODELS[name]
        config = spec["cls"](**(TINY[name] if args.tiny else spec["config"]))
        layers = TINY_LAYERS if args.tiny else spec["layers"]
        torch.manual_seed(0)
        with torch.device(dev):
            model = T.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, "float32" if args.tiny else
                                                                               spec["dtype"])).eval()
        layout = get_layout(model)
        d_in = max(weight_shape(model, layout, l)[1] for l in layers)
        total = args.tokens or 2 * d_in
        g = torch.Generator().manual_seed(0)
        texts, n = [], 0
        while n < total:  # lengths uniform up to the cap (a Wikipedia article is often longer than 1024 tokens)
            length = min(int(torch.randint(32, args.max_length + 1, (1,), generator=g)), total - n)
            texts.append(torch.randint(1, config.vocab_size, (length,), generator=g).tolist())
            n += length
        compute_second_moments(model, TokenIds(), layout, layers, iter(texts[:2]), args.max_length, args.batch_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        _, count = compute_second_moments(model, TokenIds(), layout, layers, iter(texts), args.max_length,
                                          args.batch_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t
        rate = count / seconds
        r = dict(model=name, d_in=d_in, layers=len(layers), tokens=count, seconds=seconds, tokens_per_s=rate,
                 cap_tokens=10 * d_in, cap_seconds=10 * d_in / rate)
        out.append(r)
        print(f"{name}: {len(layers)} layers, d_in {d_in}: {count} tokens in {seconds:.2f} s = {rate:,.0f} tokens/s; "
              f"the 10·d_in = {10 * d_in:,} key cap would take {10 * d_in / rate:.1f} s", flush=True)
        del model
    print("RESULT " + " ".join(f"{r['model']}:tokens_per_s={r['tokens_per_s']:.0f},cap_s={r['cap_seconds']:.1f}"
                               for r in out) + f" device={dev.type} tiny={args.tiny}")
    return out


if __name__ == "__main__":
    main()
