"""``scripts/bench.py quant``: quantized decode, dnet against llama.cpp on the same
GGUF file with the same thread count, in one run, and against the memory-bandwidth
limit for the packed bytes a decode step reads.

Models: the default SmolLM2-135M-Instruct Q4_1 GGUF, and a Qwen3-0.6B-shaped model
with generated weights written as a Q4_0 GGUF (its safetensors made once in the
cache, like the other benches' real-size shapes). dnet runs one peer and a 2-peer
ring (dnet-peer processes on loopback, the head in this process); llama.cpp comes
from ``bench_llama_cpp`` (its own virtual environment, built on first use).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_common import _loaded_ring, on_peers, timed_generate
from bench_llama_cpp import decode_rate

from dnet.models.gguf import read_header
from dnet.models.model_dir import open_model_dir
from dnet.models.packaged import DEFAULT_MODEL
from dnet.models.tokenizer import load_tokenizer
from dnet.runtime import qgemv
from dnet.runtime.local import even_cuts

PROMPT = "Write a story about a fox and a crow who become friends."


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """Bytes per second ``threads`` threads read from memory at once (numpy sums of
    arrays far larger than the caches)."""
    arrays = [np.ones(nbytes // 4 // threads, np.float32) for _ in range(threads)]
    for a in arrays:
        a.sum()
    best = 0.0
    for _ in range(3):
        workers = [threading.Thread(target=a.sum) for a in arrays]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, nbytes / (time.perf_counter() - start))
    return best


def step_bytes(gguf: Path) -> int:
    """Bytes a decode step reads: every tensor but the embedding table, which a step
    reads a row of, unless it is also the output head (tied)."""
    tensors = read_header(gguf).tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for n, t in tensors.items() if tied or n != "token_embd.weight")


def qwen3_gguf(cache_dir: Path) -> Path:
    """The Qwen3-0.6B shape with generated weights, as a Q4_0 GGUF (made once)."""
    out = cache_dir / "bench" / "qwen3-0.6b-shape-q4_0.gguf"
    if out.exists():
        return out
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from bench import QWEN3_0_6B

    from dnet.runtime.tiny import TinySpec, ensure_tiny_model
    from tests.models.gguf_files import write_gguf

    spec = TinySpec(**QWEN3_0_6B, layers=28, dtype="float32")
    model = ensure_tiny_model(cache_dir / "models", spec)
    print(f"writing {out} (a minute)", file=sys.stderr)
    tmp = out.with_suffix(".tmp")
    write_gguf(model, tmp, "Q4_0", embed_kind="Q4_0")
    tmp.replace(out)
    return out


async def _dnet_runs(procs, cuts, gguf, prompt, n, repeats):
    async with _loaded_ring(procs, gguf, cuts) as (ring, load_s):
        # Both sides decode all n tokens: llama.cpp's runs go past end-of-sequence,
        # and SmolLM2 ends this story after 6 tokens (5 steps timed, too few).
        ring.tokenizer.eos_token_ids = frozenset()
        await timed_generate(ring, prompt[:8], 2)  # warm-up
        return load_s, [await timed_generate(ring, prompt, n) for _ in range(repeats)]


def bench_model(name: str, gguf: Path, args, bandwidth: float) -> dict:
    info = open_model_dir(gguf)
    tokenizer = load_tokenizer(info.path, eos_token_ids=info.config.get("eos_token_id"))
    prompt = tokenizer.encode(PROMPT)
    result: dict = {"file": str(gguf), "file_bytes": gguf.stat().st_size}
    packed = step_bytes(gguf)
    result["step_bytes"] = packed
    result["bandwidth_limit_tok_s"] = bandwidth / packed
    for peers in (1, 2):
        cuts = even_cuts(info.num_layers, peers)
        load_s, runs = on_peers(cuts, _dnet_runs, gguf, prompt, args.new_tokens, args.repeats)
        result[f"dnet_{peers}_peer"] = {
            "decode_tok_s": statistics.median(r[1] for r in runs),
            "ttft_s": statistics.median(r[0] for r in runs),
            "load_s": load_s,
            "runs": [r[:2] for r in runs],
            "tokens": runs[0][2],
        }
    llama = decode_rate(args.cache_dir, gguf, PROMPT, args.new_tokens, args.threads, args.repeats)
    result["llama_cpp"] = {
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in llama["runs"]),
        "ttft_s": statistics.median(r["ttft_s"] for r in llama["runs"]),
        "prompt_tokens": llama["prompt_tokens"],
        "runs": [[r["ttft_s"], r["decode_tok_s"]] for r in llama["runs"]],
        "tokens": llama["runs"][0]["tokens"],
    }
    lc = result["llama_cpp"]["decode_tok_s"]
    for peers in (1, 2):
        d = result[f"dnet_{peers}_peer"]["decode_tok_s"]
        result[f"ratio_{peers}_peer_to_llama_cpp"] = d / lc
        result[f"ratio_{peers}_peer_to_bandwidth_limit"] = d / result["bandwidth_limit_tok_s"]
    result["ratio_llama_cpp_to_bandwidth_limit"] = lc / result["bandwidth_limit_tok_s"]
    print(
        f"{name}: dnet 1 peer {result['dnet_1_peer']['decode_tok_s']:.1f} tok/s, 2 peers "
        f"{result['dnet_2_peer']['decode_tok_s']:.1f}, llama.cpp {lc:.1f} "
        f"(1 peer / llama.cpp = {result['ratio_1_peer_to_llama_cpp']:.3f}); bandwidth limit "
        f"{result['bandwidth_limit_tok_s']:.0f} tok/s for {packed / 1e6:.0f} MB a step",
        file=sys.stderr,
    )
    return result


def bench_quant(args) -> dict:
    args.cache_dir = Path(args.cache_dir).expanduser()
    bandwidth = read_bandwidth(args.threads)
    report: dict = {
        "mode": "quant",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "quant_kernel": qgemv.enabled() and qgemv.vectorized(),
        "read_bandwidth_bytes_s": bandwidth,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "models": {},
    }
    models = {"smollm2-q4_1": lambda: open_model_dir(DEFAULT_MODEL).path}
    models["qwen3-0.6b-q4_0"] = lambda: qwen3_gguf(args.cache_dir)
    for name in args.models:
        report["models"][name] = bench_model(name, models[name](), args, bandwidth)
    return report


def add_parser(sub) -> None:
    q = sub.add_parser("quant", help="quantized decode: dnet vs llama.cpp on the same GGUF")
    q.add_argument(
        "--models", nargs="+", default=["smollm2-q4_1", "qwen3-0.6b-q4_0"],
        choices=["smollm2-q4_1", "qwen3-0.6b-q4_0"],
    )  # fmt: skip
    q.add_argument("--new-tokens", type=int, default=128)
    q.add_argument("--repeats", type=int, default=2)
    q.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    q.add_argument("--cache-dir", default=os.environ.get("DNET_CACHE_DIR", "~/.cache/dnet"))
    q.add_argument("--out", help="also write the JSON report here")
