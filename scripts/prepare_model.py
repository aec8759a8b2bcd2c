#!/usr/bin/env python3
"""Prepare a topology for a model and load it, through a running head's API.

    scripts/prepare_model.py MODEL [--api http://127.0.0.1:8080] [--api-key KEY]
                             [--context 4096] [--objective latency|throughput]

MODEL is a model directory, a .gguf file (or a directory holding one), a Hugging
Face repo id in the local cache, or a packaged model's short name (smollm2-135m),
that every peer (and the head) can read. Prints the placement the solver chose, then each peer's load.
Exits 1 with the API's error message if either step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def call(api: str, path: str, body: dict, key: str | None) -> dict:
    request = urllib.request.Request(
        api.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {key}"} if key else {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError):
            message = exc.reason
        raise SystemExit(f"prepare_model: {path} failed ({exc.code}): {message}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"prepare_model: cannot reach {api}: {exc.reason}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--api", default=os.environ.get("DNET_API", "http://127.0.0.1:8080"))
    p.add_argument("--api-key", default=os.environ.get("DNET_API_KEY"))
    p.add_argument("--context", type=int)
    p.add_argument("--objective", choices=["latency", "throughput"])
    args = p.parse_args()
    body: dict = {"model": args.model}
    if args.context:
        body["context"] = args.context
    if args.objective:
        body["objective"] = args.objective
    topology = call(args.api, "/v1/prepare_topology", body, args.api_key)
    print(f"placement of {topology['model']} ({topology['num_layers']} layers):")
    for a in topology["assignments"]:
        print(f"  {a['name']:<16} {a['peer_id'][:12]}  layers {a['start']:>3}-{a['end']:<3}")
    for peer_id, reason in topology["excluded"]:
        print(f"  left out {peer_id[:12]}: {reason}")
    if topology.get("split_reason"):
        print(f"  split because {topology['split_reason']}")
    print(
        f"predicted {topology['predicted_tokens_per_s']:.1f} tokens/s, "
        f"time to first token {topology['predicted_ttft_s']:.2f}s"
    )
    loaded = call(args.api, "/v1/load_model", topology, args.api_key)
    for peer in loaded["peers"]:
        print(
            f"  loaded {peer['name']:<16} layers {peer['layers'][0]}-{peer['layers'][1]}: "
            f"{peer['weight_bytes'] / 2**20:.1f} MiB in {peer['load_seconds']:.1f}s"
        )
    print(f"ready: {loaded['model']} ({loaded['load_seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
