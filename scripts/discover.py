#!/usr/bin/env python3
"""Find peers over mDNS, prepare a topology and generate: the head, as a command.

    scripts/discover.py --interface 192.168.1.10 --expect 2 --model DIR --prompt "Hello"

Prints one JSON object: how long discovery took, the peers, the topology and the
generated token ids and text.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import aclosing
from pathlib import Path

import trio

from dnet.config import default_state_dir
from dnet.errors import DnetError
from dnet.identity import load_cluster_key, load_identity


async def run(args: argparse.Namespace) -> dict:
    from dnet.discovery.mdns import browse
    from dnet.head.cluster import open_cluster
    from dnet.head.membership import follow_discovery
    from dnet.head.topology import load_topology, prepare_topology, topology_json

    state = Path(args.state_dir) if args.state_dir else default_state_dir({}) / "head"
    identity = load_identity(state)
    key, _, _ = load_cluster_key(
        state, Path(args.cluster_key_file) if args.cluster_key_file else None
    )
    from dnet.discovery.static import announce_static, read_peers_file

    static = list(args.peer or []) + (
        read_peers_file(Path(args.peers_file)) if args.peers_file else []
    )
    async with open_cluster([], identity, key) as cluster, trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel(100)
        start = time.perf_counter()
        nursery.start_soon(follow_discovery, cluster, receive)
        if not args.no_mdns:
            await nursery.start(browse, args.interface, send)
        await announce_static(static, send)
        with trio.fail_after(args.timeout):
            await cluster.wait_peers(args.expect)
        discovered = time.perf_counter() - start
        topology = await prepare_topology(cluster, args.model, context=args.context)
        ring = await load_topology(cluster, topology)
        prompt = (
            [int(t) for t in args.prompt_ids.split(",")]
            if args.prompt_ids
            else ring.tokenizer.chat_prompt([{"role": "user", "content": args.prompt}])
        )
        tokens, text = [], []
        async with aclosing(ring.generate(prompt, max_tokens=args.max_tokens)) as events:
            async for e in events:
                tokens.append(e.token_id)
                text.append(e.text)
        nursery.cancel_scope.cancel()
        return {
            "discovered_s": discovered,
            "peers": [
                {"peer_id": p.peer_id, "name": p.name, "address": p.address} for p in cluster.peers
            ],
            "topology": topology_json(topology),
            "prompt": prompt,
            "tokens": tokens,
            "text": "".join(text),
        }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--interface", action="append", default=[], help="IPv4 address to browse on (mDNS)"
    )
    p.add_argument("--peer", action="append", help="HOST:PORT of a peer (repeatable)")
    p.add_argument("--peers-file", help="a file of HOST:PORT lines")
    p.add_argument("--no-mdns", action="store_true", help="only the --peer / --peers-file peers")
    p.add_argument("--expect", type=int, default=1, help="wait for this many peers")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="Hello!")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--cluster-key-file")
    p.add_argument("--state-dir")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args()
    if not args.no_mdns and not args.interface:
        p.error("give --interface to browse mDNS on, or --no-mdns with --peer/--peers-file")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        print(json.dumps(trio.run(run, args)))
    except DnetError as exc:
        print(f"discover: {exc.message}", file=sys.stderr)
        return 2
    except trio.TooSlowError:
        print(f"discover: fewer than {args.expect} peers found in {args.timeout}s", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
