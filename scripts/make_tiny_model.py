#!/usr/bin/env python3
"""Write a deterministic tiny HF-format model directory (no network, same seed → same bytes).

scripts/make_tiny_model.py --arch qwen3 --out /tmp/tiny-qwen3
scripts/make_tiny_model.py --arch deepseek_v2 --out /tmp/tiny-ds --dtype bfloat16 --quantize 4
"""

from __future__ import annotations

import argparse
import sys

from dnet.runtime.tiny import ARCHES, DTYPES, TinySpec, make_tiny_model


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", choices=ARCHES, required=True)
    p.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="MLX affine quantization bits")
    p.add_argument("--group-size", type=int, default=32, help="quantization group size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size to train")
    p.add_argument("--shards", type=int, default=1, help="safetensors files (>1 writes an index)")
    p.add_argument("--dense", action="store_true", help="deepseek_v2: no MoE layers")
    a = p.parse_args()
    try:
        spec = TinySpec(
            arch=a.arch,
            layers=a.layers,
            hidden=a.hidden,
            dtype=a.dtype,
            quantize=a.quantize,
            group_size=a.group_size,
            seed=a.seed,
            vocab=a.vocab,
            shards=a.shards,
            moe=not a.dense,
        )
    except ValueError as exc:
        p.error(str(exc))
    path = make_tiny_model(a.out, spec)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
