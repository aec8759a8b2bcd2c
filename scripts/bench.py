#!/usr/bin/env python3
"""Benchmarks; every figure is a ratio against a baseline measured in the same run.

    scripts/bench.py runtime [--dtypes float32 bfloat16] [--prompt-tokens 128]
                             [--new-tokens 32] [--repeats 2] [--layers 28]
    scripts/bench.py ring [--peers 1 2 3] [--dtype float32] [--prompt-tokens 512]
    scripts/bench.py throughput [--concurrency 1 2 4 8] [--dtype float32]
                                [--prompt-tokens 64] [--new-tokens 128]
    scripts/bench.py stall [--streams 3] [--long-prompt 1024] [--chunk 256]
    scripts/bench.py default [--model smollm2-135m] [--new-tokens 128] [--repeats 2]
    scripts/bench.py transfer --model DIR [--peers 2]
    scripts/bench.py quant [--models smollm2-q4_1 qwen3-0.6b-q4_0] [--new-tokens 128]
                           [--threads 2]

Every mode but ``default`` takes ``--shape qwen3-0.6b|qwen3-4b|qwen3-8b`` (default
qwen3-0.6b, the shape every CPU figure uses) and ``--layers`` (default: the shape's).

``default``: the default model, the real SmolLM2-135M-Instruct Q4_1 GGUF, through a
2-peer ring against mlx_lm's own model and ``stream_generate`` over the same weights,
as stored and with ``--compute-dtype float32`` (see ``scripts/bench_default.py``).

``quant``: quantized decode of dnet (one peer, a 2-peer ring) against llama.cpp on
the same GGUF file with the same threads, and against the memory-bandwidth limit
for the packed bytes a step reads (see ``scripts/bench_quant.py``; llama.cpp is
built into a virtual environment of its own on first use, about six minutes).

``throughput``: 1, 2, 4 and 8 concurrent streams on a 2-peer loopback ring (64-token
prompts, 128 new tokens each: about a short chat answer; with only a few new
tokens, prompts' prefill dominates, and it is compute-bound whatever the batch):
aggregate tokens/s, per-stream decode tokens/s, time to first token p50/p90, as
ratios against one stream, single-process ``mlx_lm`` and ``mlx_lm``'s
``batch_generate`` measured in the same run; and mlx_lm's decode against the memory
bandwidth limit (weight bytes read per token over the measured bandwidth).

Each stream's tokens are checked against the same prompt run alone
(``identical_to_alone``); ``decode_aggregate_tok_s`` counts tokens after each
stream's first over the time from the first first-token to the last token.

``stall``: a long prompt arrives while 3 streams decode on a 2-peer ring: the
longest gap between two tokens of a running stream during its prefill, less the
usual gap (the stall), against one prefill chunk's time through the ring (the
mean, and the longest: each chunk timed alone as the difference of the TTFTs of
the prompt cut after and before it).

``ring``: 1, 2 and 3 ``dnet-peer`` processes on loopback against single-process
``mlx_lm.stream_generate`` (measured before and after the rings; the mean is the
baseline): decode tok/s ratio, time to first token for a 512-token prompt, and the
one-way transport cost of a decode-sized activation (half a Ping/Pong round trip
carrying 4 KiB), p50/p90 in µs: ``hop_us`` is one way in the direction activations
travel between peers (a server sending to the client that dialled it: unmasked),
from the encode on one side to the decode on the other (monotonic clocks, one host);
``to_peer_us`` the other direction (masked), ``half_rtt_us`` half the round trip.

``runtime``: decode and prefill tokens/s of the sliced runtime, run as 2 slices in
one process (activations cross the cut as bytes), against ``mlx_lm.stream_generate``
on the whole model, on a Qwen3-0.6B-shaped model with generated weights (hidden
1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, vocab
151936, tied embeddings). Runs alternate between the two sides; the JSON report
gives each run, the medians and the ratios (runtime / mlx_lm; >= 0.97 is the target).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dnet.config import RuntimeSettings

# OpenBLAS must be loaded before anything imports mlx.core.
from dnet.runtime.blas import loaded_blas, preload_openblas

if (_runtime := RuntimeSettings.from_env()).use_openblas:
    preload_openblas(cache_dir=_runtime.cache_dir / "native", skinny=_runtime.use_skinny_kernel)

import mlx.core as mx
from bench_common import _loaded_ring, _on_peers, _pct, _time_stream, run_mlx_lm, timed_generate
from bench_default import add_parser as add_default_parser
from bench_default import bench_default
from bench_quant import add_parser as add_quant_parser
from bench_quant import bench_quant
from bench_transfer import add_parser as add_transfer_parser
from bench_transfer import bench_transfer
from mlx_lm import load

from dnet.head.session import PREFILL_CHUNK
from dnet.runtime import qgemv
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
# Published Qwen3 shapes (config.json of each), with generated weights: name ->
# (TinySpec fields, layers). The default is the one every CPU figure uses.
SHAPES = {
    "qwen3-0.6b": (QWEN3_0_6B, 28),
    "qwen3-4b": ({**QWEN3_0_6B, "hidden": 2560, "heads": 32, "intermediate": 9728}, 36),
    "qwen3-8b": (
        {**QWEN3_0_6B, "hidden": 4096, "heads": 32, "intermediate": 12288, "tie_embeddings": False},
        36,
    ),
}


def _spec(args, dtype: str) -> TinySpec:
    """The model a mode runs: ``--shape`` with ``--layers`` (default: the shape's)."""
    fields, layers = SHAPES[args.shape]
    if args.layers is None:
        args.layers = layers
    return TinySpec(layers=args.layers, dtype=dtype, **fields)


def _report_head(mode: str, path, args) -> dict:
    """The fields every peer-running mode's report starts with."""
    return {
        "mode": mode,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "blas": loaded_blas() or "bundled reference BLAS",
        "model": str(path),
        "dtype": args.dtype,
        "shape": args.shape,
    }


def run_runtime(engines, prompt, n):
    return _time_stream(t.token_id for t in generate(engines, prompt, n))


def bench_runtime(args) -> dict:
    cache = _runtime.cache_dir / "models"
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
        spec = _spec(args, dtype)
        t0 = time.perf_counter()
        path = ensure_tiny_model(cache, spec)
        made = time.perf_counter() - t0
        model, tokenizer = load(str(path))
        engines = load_chain(path, even_cuts(args.layers, 2), args.compute_dtype)
        widened = None
        if args.compute_dtype:
            # The parity reference: mlx_lm given the same widening.
            widened, _ = load(str(path))
            widened.set_dtype(getattr(mx, args.compute_dtype))
        prompt = [(i * 7919) % 150000 + 300 for i in range(args.prompt_tokens)]
        # Warm both sides up (first-call allocations, BLAS thread start-up).
        run_mlx_lm(model, tokenizer, prompt[:8], 2)
        run_runtime(engines, prompt[:8], 2)
        runs: dict[str, list] = {"mlx_lm": [], "dnet": []}
        if widened is not None:
            run_mlx_lm(widened, tokenizer, prompt[:8], 2)
            runs["mlx_lm_widened"] = []
        same = True
        for _ in range(args.repeats):
            ttft, dec, ref = run_mlx_lm(model, tokenizer, prompt, args.new_tokens)
            runs["mlx_lm"].append(
                {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft, "decode_tok_s": dec}
            )
            if widened is not None:
                ttft, dec, ref = run_mlx_lm(widened, tokenizer, prompt, args.new_tokens)
                runs["mlx_lm_widened"].append(
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
        if widened is not None:
            # Tokens are compared with the widened reference (same arithmetic).
            report["results"][dtype]["compute_dtype"] = args.compute_dtype
            report["results"][dtype]["ratio_decode_vs_widened_mlx_lm"] = (
                med["dnet"]["decode_tok_s"] / med["mlx_lm_widened"]["decode_tok_s"]
            )
        print(
            f"{dtype}: decode {med['dnet']['decode_tok_s']:.2f} vs {med['mlx_lm']['decode_tok_s']:.2f} tok/s "
            f"(ratio {report['results'][dtype]['ratio_decode']:.3f}); prefill "
            f"{med['dnet']['prefill_tok_s']:.1f} vs {med['mlx_lm']['prefill_tok_s']:.1f} tok/s "
            f"(ratio {report['results'][dtype]['ratio_prefill']:.3f})",
            file=sys.stderr,
        )
        del model, engines, widened
        mx.clear_cache()
    return report


async def _ring_run(procs, cuts, path, prompt, n, pings):
    async with _loaded_ring(procs, path, cuts) as (ring, load_s):
        await timed_generate(ring, prompt[:8], 2)  # warm-up
        ring.turnarounds.clear()
        ttft, decode, ids = await timed_generate(ring, prompt, n)
        turnaround_us = [t * 1e6 for t in ring.turnarounds]
        payload = bytes(4 * 1024)  # one decode step's float32 activation (hidden 1024)
        for _ in range(20):
            await ring.order[0].ping(payload)
        probes = [await ring.order[0].ping(payload) for _ in range(pings)]
        hop_us = [p.from_peer * 1e6 for p in probes]
        to_peer_us = [p.to_peer * 1e6 for p in probes]
        half_rtt_us = [p.round_trip / 2 * 1e6 for p in probes]
        return {
            "load_s": load_s,
            "ttft_s": ttft,
            "decode_tok_s": decode,
            "hop_us_p50": _pct(hop_us, 0.5),
            "hop_us_p90": _pct(hop_us, 0.9),
            "to_peer_us_p50": _pct(to_peer_us, 0.5),
            "to_peer_us_p90": _pct(to_peer_us, 0.9),
            "half_rtt_us_p50": _pct(half_rtt_us, 0.5),
            "half_rtt_us_p90": _pct(half_rtt_us, 0.9),
            "head_turnaround_us_p50": _pct(turnaround_us, 0.5),
            "head_turnaround_us_p90": _pct(turnaround_us, 0.9),
            # What sending tokens from the last peer straight to the first would
            # save per token: the head's turnaround and one hop, over a token's time.
            "shortcut_saving_fraction": (_pct(turnaround_us, 0.5) + _pct(hop_us, 0.5))
            * 1e-6
            * decode,
        }, ids


def bench_ring(args) -> dict:

    cache = _runtime.cache_dir / "models"
    spec = _spec(args, args.dtype)
    path = ensure_tiny_model(cache, spec)
    prompt = [(i * 7919) % 150000 + 300 for i in range(args.prompt_tokens)]
    model, tokenizer = load(str(path))
    run_mlx_lm(model, tokenizer, prompt[:8], 2)
    base = []
    ttft, dec, ref = run_mlx_lm(model, tokenizer, prompt, args.new_tokens)
    base.append({"ttft_s": ttft, "decode_tok_s": dec})
    report: dict = {
        **_report_head("ring", path, args),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "rings": {},
    }
    for n in args.peers:
        result, ids = _on_peers(
            n, args.layers, _ring_run, path, prompt, args.new_tokens, args.pings
        )
        result["greedy_tokens_identical"] = ids == ref[: len(ids)]
        report["rings"][str(n)] = result
        print(f"{n} peers: {json.dumps(result)}", file=sys.stderr)
    ttft, dec, _ = run_mlx_lm(model, tokenizer, prompt, args.new_tokens)
    base.append({"ttft_s": ttft, "decode_tok_s": dec})
    baseline = {k: statistics.mean(b[k] for b in base) for k in base[0]}
    report["mlx_lm"] = {"runs": base, "mean": baseline}
    for result in report["rings"].values():
        result["ratio_decode"] = result["decode_tok_s"] / baseline["decode_tok_s"]
        result["ratio_ttft"] = result["ttft_s"] / baseline["ttft_s"]
    return report


async def _throughput_run(procs, cuts, path, prompts, n, concurrency) -> dict:
    from contextlib import aclosing

    import trio

    out: dict = {}
    async with _loaded_ring(procs, path, cuts) as (ring, _):

        async def stream(i, record):
            start = time.perf_counter()
            first, tokens = None, []
            async with aclosing(ring.generate(prompts[i], max_tokens=n, stop=())) as events:
                async for e in events:
                    tokens.append(e.token_id)
                    first = first or time.perf_counter()
            end = time.perf_counter()
            count = len(tokens)
            record[i] = {
                "ttft_s": first - start,
                "tokens": tokens,
                "first": first,
                "end": end,
                "decode_tok_s": (count - 1) / (end - first) if count > 1 else 0.0,
            }

        async with aclosing(ring.generate(prompts[0][:8], max_tokens=2)) as warm:
            async for _ in warm:
                pass
        for c in concurrency:
            record: dict[int, dict] = {}
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(c):
                    nursery.start_soon(stream, i, record)
            runs = list(record.values())
            wall = max(r["end"] for r in runs) - started
            decode_window = max(r["end"] for r in runs) - min(r["first"] for r in runs)
            ttfts = [r["ttft_s"] for r in runs]
            out[str(c)] = {
                "aggregate_tok_s": sum(len(r["tokens"]) for r in runs) / wall,
                "decode_aggregate_tok_s": sum(len(r["tokens"]) - 1 for r in runs) / decode_window,
                "per_stream_decode_tok_s": statistics.mean(r["decode_tok_s"] for r in runs),
                "ttft_p50_s": _pct(ttfts, 0.5),
                "ttft_p90_s": _pct(ttfts, 0.9),
                "wall_s": wall,
                "tokens": {i: r["tokens"] for i, r in record.items()},
            }
            statuses = await ring.status()
            out[str(c)]["peer_step_rows"] = [s.step_rows for s in statuses]
            out[str(c)]["peer_decode_step_s"] = [s.decode_step_s for s in statuses]
            shown = {k: v for k, v in out[str(c)].items() if k != "tokens"}
            print(f"  {c} streams: {json.dumps(shown)}", file=sys.stderr)
        # Each prompt alone, one after another: what every stream must have produced.
        alone = {}
        for i in range(max(concurrency)):
            record = {}
            await stream(i, record)
            alone[i] = record[i]["tokens"]
        for c in concurrency:
            tokens = out[str(c)].pop("tokens")
            out[str(c)]["identical_to_alone"] = all(tokens[i] == alone[i] for i in tokens)
    return out


def _read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a plain streaming read: the max of 1 GiB, split over every core
    (numpy's reductions release the GIL), best of ``repeats``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.random.default_rng(0).standard_normal(int(gib * 2**28), dtype=np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def bench_throughput(args) -> dict:
    """Concurrent streams on a 2-peer loopback ring against single-process mlx_lm
    (one stream, and mlx_lm's own batch_generate), and decode against the memory
    bandwidth limit (weight bytes read per token over the measured bandwidth)."""

    from mlx_lm.generate import batch_generate

    from dnet.runtime.device_profile import measure

    cache = _runtime.cache_dir / "models"
    path = ensure_tiny_model(cache, _spec(args, args.dtype))
    prompts = [
        [(i * 7919 + j * 104729) % 150000 + 300 for i in range(args.prompt_tokens)]
        for j in range(max(args.concurrency))
    ]
    model, tokenizer = load(str(path))
    run_mlx_lm(model, tokenizer, prompts[0][:8], 2)
    ttft, single, _ = run_mlx_lm(model, tokenizer, prompts[0], args.new_tokens)
    batched = {}
    for c in args.concurrency:
        t0 = time.perf_counter()
        response = batch_generate(
            model, tokenizer, prompts[:c], max_tokens=args.new_tokens, return_token_ids=True
        )
        wall = time.perf_counter() - t0
        tokens = sum(len(t) for t in response.token_ids)
        batched[str(c)] = {"aggregate_tok_s": tokens / wall, "wall_s": wall}
    weight_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    del model
    mx.clear_cache()
    # The higher of two readings: the peers' own matrix-vector probe and a plain
    # streaming read; the lower one would flatter the ratio.
    matvec_bandwidth = measure(args.dtype, SHAPES[args.shape][0]["hidden"]).bandwidth_bytes_s
    stream_bandwidth = _read_bandwidth()
    bandwidth = max(matvec_bandwidth, stream_bandwidth)
    limit = bandwidth / weight_bytes
    ring = _on_peers(
        2, args.layers, _throughput_run, path, prompts, args.new_tokens, args.concurrency
    )
    one = ring[str(args.concurrency[0])]
    for c, r in ring.items():
        r["ratio_vs_one_stream"] = r["aggregate_tok_s"] / one["aggregate_tok_s"]
        r["decode_ratio_vs_one_stream"] = (
            r["decode_aggregate_tok_s"] / one["decode_aggregate_tok_s"]
        )
        r["ratio_vs_mlx_lm_single"] = r["aggregate_tok_s"] / single
        r["ratio_vs_mlx_lm_batch"] = r["aggregate_tok_s"] / batched[c]["aggregate_tok_s"]
    return {
        **_report_head("throughput", path, args),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "mlx_lm": {"single_decode_tok_s": single, "single_ttft_s": ttft, "batch": batched},
        "bandwidth_bytes_s": bandwidth,
        "bandwidth_matvec_bytes_s": matvec_bandwidth,
        "bandwidth_stream_bytes_s": stream_bandwidth,
        "weight_bytes": weight_bytes,
        "bandwidth_limit_tok_s": limit,
        "mlx_lm_single_vs_limit": single / limit,
        "ring_one_stream_decode_vs_limit": one["per_stream_decode_tok_s"] / limit,
        "ring_2_peers": ring,
    }


async def _stall_run(procs, cuts, path, args) -> dict:
    from contextlib import aclosing

    import trio

    long_prompt = [(i * 7919) % 150000 + 300 for i in range(args.long_prompt)]
    chunks = -(-args.long_prompt // args.chunk)
    async with _loaded_ring(procs, path, cuts) as (ring, _):

        async def ttft(prompt) -> float:
            start = time.perf_counter()
            async with aclosing(
                ring.generate(prompt, max_tokens=1, prefill_chunk=args.chunk)
            ) as events:
                async for _ in events:
                    return time.perf_counter() - start
            raise RuntimeError("no token")

        await ttft(long_prompt[:8])
        # Each chunk's own time: the TTFT of the prompt cut after it, less the TTFT of
        # the prompt cut before it (later chunks attend to more and cost more).
        cuts = [await ttft(long_prompt[: k * args.chunk]) for k in range(1, chunks)]
        alone = await ttft(long_prompt)
        chunk_times = [b - a for a, b in itertools.pairwise([0.0, *cuts, alone])]
        times: list[list[float]] = [[] for _ in range(args.streams)]
        marks: dict = {"chunk_times": chunk_times}
        done = trio.Event()

        async def stream(i):
            prompt = [(j * 104729 + i) % 150000 + 300 for j in range(16)]
            async with aclosing(ring.generate(prompt, max_tokens=10_000, stop=())) as events:
                async for _ in events:
                    times[i].append(time.perf_counter())
                    if done.is_set():
                        return

        async def long():
            while min(len(t) for t in times) < args.warm_tokens:
                await trio.sleep(0.05)
            marks["start"] = time.perf_counter()
            marks["ttft"] = await ttft(long_prompt)
            marks["first"] = time.perf_counter()
            await trio.sleep(2 * (times[0][-1] - times[0][-2]))
            done.set()

        async with trio.open_nursery() as nursery:
            for i in range(args.streams):
                nursery.start_soon(stream, i)
            nursery.start_soon(long)
    before, during = [], []
    for t in times:
        for a, b in itertools.pairwise(t):
            if b <= marks["start"]:
                before.append(b - a)
            elif a < marks["first"]:
                during.append(b - a)
    normal = statistics.median(before[len(before) // 2 :])
    chunk_s = alone / chunks
    chunk_times = marks["chunk_times"]
    longest_chunk_s = max(chunk_times)
    worst = max(during)
    return {
        "long_prompt_tokens": args.long_prompt,
        "prefill_chunk": args.chunk,
        "chunks": chunks,
        "long_prompt_ttft_alone_s": alone,
        "long_prompt_ttft_under_load_s": marks["ttft"],
        "chunk_s": chunk_s,
        "decode_gap_before_p50_s": normal,
        "decode_gap_during_max_s": worst,
        "decode_gap_during_p50_s": statistics.median(during),
        "tokens_during_prefill_per_stream": len(during) / args.streams,
        "stall_s": worst - normal,
        "stall_in_chunks": (worst - normal) / chunk_s,
        "chunk_times_s": chunk_times,
        "longest_chunk_s": longest_chunk_s,
        "stall_in_longest_chunks": (worst - normal) / longest_chunk_s,
    }


def bench_stall(args) -> dict:
    """A long prompt arrives while ``--streams`` streams decode on a 2-peer ring:
    the longest gap between two tokens of a running stream during its prefill,
    over the gap before it (the stall), against the time of one prefill chunk
    through the ring (the long prompt's TTFT alone over its chunk count)."""

    cache = _runtime.cache_dir / "models"
    path = ensure_tiny_model(cache, _spec(args, args.dtype))
    result = _on_peers(2, args.layers, _stall_run, path, args)
    return {
        **_report_head("stall", path, args),
        "streams": args.streams,
        **result,
    }


def main() -> int:
    qgemv.configure(_runtime.cache_dir / "native", _runtime.use_quant_kernel)
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
    r.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    r.add_argument("--layers", type=int, help="default: the shape's")
    r.add_argument(
        "--compute-dtype",
        choices=["float32"],
        help="widen weights at load; adds mlx_lm widened the same way as a baseline",
    )
    r.add_argument("--out", help="also write the JSON report here")
    g = sub.add_parser(
        "ring", help="1, 2, 3 dnet-peer processes on loopback vs mlx_lm.stream_generate"
    )
    g.add_argument("--peers", nargs="+", type=int, default=[1, 2, 3])
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--prompt-tokens", type=int, default=512)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--pings", type=int, default=500)
    g.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    g.add_argument("--layers", type=int, help="default: the shape's")
    g.add_argument("--out", help="also write the JSON report here")
    t = sub.add_parser("throughput", help="concurrent streams on a 2-peer ring vs mlx_lm")
    t.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    t.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    t.add_argument("--prompt-tokens", type=int, default=64)
    t.add_argument("--new-tokens", type=int, default=128)
    t.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    t.add_argument("--layers", type=int, help="default: the shape's")
    t.add_argument("--out", help="also write the JSON report here")
    st = sub.add_parser("stall", help="a long prompt arriving while streams decode")
    st.add_argument("--streams", type=int, default=3)
    st.add_argument("--long-prompt", type=int, default=1024)
    st.add_argument("--chunk", type=int, default=PREFILL_CHUNK)
    st.add_argument("--warm-tokens", type=int, default=6)
    st.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    st.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    st.add_argument("--layers", type=int, help="default: the shape's")
    st.add_argument("--out", help="also write the JSON report here")
    add_default_parser(sub)
    add_transfer_parser(sub)
    add_quant_parser(sub)
    args = p.parse_args()
    modes = {
        "runtime": bench_runtime,
        "ring": bench_ring,
        "throughput": bench_throughput,
        "stall": bench_stall,
        "default": bench_default,
        "transfer": bench_transfer,
        "quant": bench_quant,
    }
    report = modes[args.mode](args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
