#!/usr/bin/env python3
"""Generate through running ``dnet-peer`` daemons, split evenly in the order given.

    dnet-peer --port 9001 --state-dir /tmp/a &      # prints its ws:// address
    dnet-peer --port 9002 --state-dir /tmp/b --cluster-key-file /tmp/a/cluster.key &
    scripts/ring_generate.py --peer ws://127.0.0.1:9001/dnet/2 --peer ws://127.0.0.1:9002/dnet/2 \\
        --cluster-key-file /tmp/a/cluster.key --model PATH --prompt "Hello"

The head's identity lives in --state-dir (default: the same as dnet-peer's).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import aclosing
from pathlib import Path

import trio

from dnet.config import default_state_dir
from dnet.errors import DnetError
from dnet.identity import load_cluster_key, load_identity


async def run(args: argparse.Namespace) -> None:
    from dnet.head.cluster import open_cluster
    from dnet.head.loading import PlanEntry
    from dnet.models.model_dir import open_model_dir
    from dnet.runtime.local import even_cuts
    from dnet.sampling import SamplingParams

    state = Path(args.state_dir) if args.state_dir else default_state_dir({}) / "head"
    identity = load_identity(state)
    key, _, _ = load_cluster_key(
        state, Path(args.cluster_key_file) if args.cluster_key_file else None
    )
    info = open_model_dir(args.model)
    async with open_cluster(args.peer, identity, key) as cluster:
        cuts = even_cuts(info.num_layers, len(cluster.peers))
        t0 = time.perf_counter()
        plan = [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, cuts, strict=True)]
        ring = await cluster.load(info, plan)
        for p, (s, e) in zip(ring.order, cuts, strict=True):
            print(f"{p.label}: layers {s}..{e - 1}", file=sys.stderr)
        print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        prompt = ring.tokenizer.chat_prompt([{"role": "user", "content": args.prompt}])
        params = SamplingParams(temperature=args.temperature, seed=args.seed)
        start, first, n = time.perf_counter(), None, 0
        async with aclosing(ring.generate(prompt, params, max_tokens=args.max_tokens)) as events:
            async for e in events:
                first = first or time.perf_counter()
                n += 1
                print(e.text, end="", flush=True)
        end = time.perf_counter()
        print()
        rate = (n - 1) / (end - first) if first and n > 1 else 0.0
        print(
            f"[first token {((first or end) - start) * 1000:.0f} ms, {rate:.1f} tok/s]",
            file=sys.stderr,
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peer", action="append", required=True, help="ws:// address, in ring order")
    p.add_argument(
        "--model", required=True, help="model directory on this machine (peers fetch their slices)"
    )
    p.add_argument("--prompt", default="Tell me a story about a fox and a crow.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--cluster-key-file")
    p.add_argument("--state-dir")
    args = p.parse_args()
    try:
        trio.run(run, args)
    except DnetError as exc:
        print(f"ring_generate: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
