"""Three hosts in network namespaces find each other over mDNS and run a model.

Needs root and iproute2 (CI has both); skips elsewhere. Every address used lives in
namespaces this test creates, and it deletes them at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from ..processes import stop_process

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.77.{}.{}"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"dnprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def lan():
    """A bridge namespace and four host namespaces on 10.77.N.0/24."""
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    subnet = int(tag, 16) % 200 + 20
    bridge = f"dnb{tag}"
    hosts = [f"dnh{tag}{i}" for i in range(4)]
    made = []
    try:
        _ip("netns", "add", bridge)
        made.append(bridge)
        _ip("link", "add", "br0", "type", "bridge", ns=bridge)
        _ip("link", "set", "br0", "up", ns=bridge)
        for i, host in enumerate(hosts):
            _ip("netns", "add", host)
            made.append(host)
            _ip(
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                bridge,
                ns=host,
            )
            _ip("link", "set", f"p{i}", "master", "br0", ns=bridge)
            _ip("link", "set", f"p{i}", "up", ns=bridge)
            _ip("addr", "add", SUBNET.format(subnet, i + 1) + "/24", "dev", "eth0", ns=host)
            _ip("link", "set", "eth0", "up", ns=host)
            _ip("link", "set", "lo", "up", ns=host)
        yield [(host, SUBNET.format(subnet, i + 1)) for i, host in enumerate(hosts)]
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _popen(ns: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, DNET_OPENBLAS="0")
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_three_hosts_discover_each_other_and_generate(lan, tiny_model, tmp_path):
    path = tiny_model(arch="qwen3", dtype="bfloat16", layers=6)
    model, _ = load(str(path))
    prompt = [1, 87, 85, 260, 201, 57, 11, 4]
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
    key = tmp_path / "cluster.key"
    key.write_text(bytes(range(32)).hex())
    procs = []
    try:
        for i, (ns, ip) in enumerate(lan[:3]):
            peer = _popen(
                ns,
                [
                    "-m",
                    "dnet.cli_peer",
                    "--host",
                    ip,
                    "--state-dir",
                    str(tmp_path / f"s{i}"),
                    "--cluster-key-file",
                    str(key),
                    "--name",
                    f"host{i}",
                    "--log-level",
                    "WARNING",
                ],
            )
            procs.append(peer)
            line = peer.stdout.readline()
            assert re.search(r"listening ws://" + re.escape(ip), line), line
        head_ns, head_ip = lan[3]
        head = _popen(
            head_ns,
            [
                str(ROOT / "scripts/discover.py"),
                "--interface",
                head_ip,
                "--expect",
                "3",
                "--timeout",
                "10",
                "--model",
                str(path),
                "--cluster-key-file",
                str(key),
                "--state-dir",
                str(tmp_path / "head"),
                "--max-tokens",
                "16",
                "--prompt-ids",
                ",".join(map(str, prompt)),
            ],
        )
        procs.append(head)
        out, err = head.communicate(timeout=120)
        assert head.returncode == 0, err
        result = json.loads(out)
        print(f"discovered 3 peers in {result['discovered_s']:.2f}s")
        assert result["discovered_s"] < 3.0, result["discovered_s"]
        assert sorted(p["name"] for p in result["peers"]) == ["host0", "host1", "host2"]
        assert all(p["address"].startswith("ws://10.77.") for p in result["peers"])
        assert result["tokens"] == expected[: len(result["tokens"])]
    finally:
        for p in procs:
            stop_process(p)
