#!/usr/bin/env python3
"""Benchmarks; every figure is a ratio against a baseline measured in the same run.

    scripts/bench.py runtime [--dtypes float32 bfloat16] [--prompt-tokens 128]
                             [--new-tokens 32] [--repeats 2] [--layers 28]

``runtime``: decode and prefill tokens/s of the sliced runtime, run as 2 slices in
one process (activations cross the cut as bytes), against ``mlx_lm.stream_generate``
on the whole model, on a Qwen3-0.6B-shaped model with generated weights (hidden
1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, vocab
151936, tied embeddings). Runs alternate between the two sides; the JSON report
gives each run, the medians and the ratios (runtime / mlx_lm; >= 0.97 is the target).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# OpenBLAS must be loaded before anything imports mlx.core.
from dnet.runtime.blas import loaded_blas, preload_openblas

if os.environ.get("DNET_OPENBLAS", "1") != "0":
    preload_openblas()

import mlx.core as mx
from mlx_lm import load, stream_generate

from dnet.config import default_cache_dir
from dnet.runtime.local import even_cuts, generate, load_chain
from dnet.runtime.tiny import TinySpec, ensure_tiny_model

QWEN3_0_6B = dict(
    arch="qwen3",
    hidden=1024,
    heads=16,
    kv_heads=8,
    head_dim=128,
    intermediate=3072,
    model_vocab=151936,
    tie_embeddings=True,
    init_std=0.02,
)


def _time_stream(tokens):
    """(time to first token, decode tokens/s, ids) of an iterator of token ids."""
    start = time.perf_counter()
    ids, first = [], None
    for t in tokens:
        ids.append(t)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (len(ids) - 1) / (end - first) if len(ids) > 1 else 0.0
    return first - start, decode, ids


def run_mlx_lm(model, tokenizer, prompt, n):
    return _time_stream(r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n))


def run_runtime(engines, prompt, n):
    return _time_stream(t.token_id for t in generate(engines, prompt, n))


def bench_runtime(args) -> dict:
    cache = default_cache_dir(os.environ) / "models"
    report: dict = {
        "mode": "runtime",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": str(mx.default_device()),
        },
        "blas": loaded_blas() or "bundled reference BLAS",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "slices": 2,
        "results": {},
    }
    for dtype in args.dtypes:
        spec = TinySpec(layers=args.layers, dtype=dtype, **QWEN3_0_6B)
        t0 = time.perf_counter()
        path = ensure_tiny_model(cache, spec)
        made = time.perf_counter() - t0
        model, tokenizer = load(str(path))
        engines = load_chain(path, even_cuts(args.layers, 2))
        prompt = [(i * 7919) % 150000 + 300 for i in range(args.prompt_tokens)]
        # Warm both sides up (first-call allocations, BLAS thread start-up).
        run_mlx_lm(model, tokenizer, prompt[:8], 2)
        run_runtime(engines, prompt[:8], 2)
        runs = {"mlx_lm": [], "dnet": []}
        same = True
        for _ in range(args.repeats):
            ttft, dec, ref = run_mlx_lm(model, tokenizer, prompt, args.new_tokens)
            runs["mlx_lm"].append(
                {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft, "decode_tok_s": dec}
            )
            ttft, dec, got = run_runtime(engines, prompt, args.new_tokens)
            runs["dnet"].append(
                {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft, "decode_tok_s": dec}
            )
            same = same and got[: len(ref)] == ref
        med = {
            side: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for side, rs in runs.items()
        }
        report["results"][dtype] = {
            "model": str(path),
            "weight_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "generate_model_s": round(made, 1),
            "runs": runs,
            "median": med,
            "ratio_decode": med["dnet"]["decode_tok_s"] / med["mlx_lm"]["decode_tok_s"],
            "ratio_prefill": med["dnet"]["prefill_tok_s"] / med["mlx_lm"]["prefill_tok_s"],
            "greedy_tokens_identical": same,
        }
        print(
            f"{dtype}: decode {med['dnet']['decode_tok_s']:.2f} vs {med['mlx_lm']['decode_tok_s']:.2f} tok/s "
            f"(ratio {report['results'][dtype]['ratio_decode']:.3f}); prefill "
            f"{med['dnet']['prefill_tok_s']:.1f} vs {med['mlx_lm']['prefill_tok_s']:.1f} tok/s "
            f"(ratio {report['results'][dtype]['ratio_prefill']:.3f})",
            file=sys.stderr,
        )
        del model, engines
        mx.clear_cache()
    return report


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("runtime", help="sliced runtime vs mlx_lm.stream_generate")
    r.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "float16", "bfloat16"],
    )
    r.add_argument("--prompt-tokens", type=int, default=128)
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--layers", type=int, default=28)
    r.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args()
    report = bench_runtime(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
