"""``dnet-peer`` as separate processes: parity, a peer killed mid-request, restarts."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import aclosing

import mlx.core as mx
import pytest
import trio
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.errors import PeerError, PeerUnavailable
from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity
from dnet.peer.process import PeerProcess

from ..processes import CLUSTER_KEY, LINE


def plan(cluster, cuts):
    return [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, cuts, strict=True)]


@pytest.mark.parametrize(
    ("arch", "bits", "moe"),
    [
        ("qwen3", None, True),
        ("qwen3", 4, True),
        ("deepseek_v2", None, False),
        ("deepseek_v2", 4, True),
    ],
)
async def test_subprocess_rings_match_mlx_lm(tiny_model, peer_processes, arch, bits, moe):
    # bfloat16 DeepSeek-V2 runs dense (MLA only): MLX's CPU backend has no bf16 MoE.
    path = tiny_model(arch=arch, dtype="bfloat16", quantize=bits, moe=moe)
    model, tokenizer = load(str(path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True
    )
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=32)]
    procs = peer_processes(3)
    for cuts in ([(0, 3), (3, 4)], [(0, 1), (1, 2), (2, 4)]):
        chosen = procs[: len(cuts)]
        async with open_cluster(
            [p.address for p in chosen],
            Identity.generate(),
            CLUSTER_KEY,
            expected_peer_ids=[p.peer_id for p in chosen],
        ) as cluster:
            ring = await cluster.load(str(path), plan(cluster, cuts))
            async with aclosing(ring.generate(prompt, max_tokens=32)) as events:
                got = [e.token_id async for e in events]
            assert got == expected[: len(got)] and (
                len(got) == 32 or got[-1] in tokenizer.eos_token_ids
            )
            await ring.unload()


async def test_quantized_rings_take_the_fused_step_and_match_mlx_lm(tiny_model, peer_processes):
    """A 4-bit model with float32 activations: the peers' decode steps run in C
    (dnet.runtime.fused), alone and as batches of concurrent requests of different
    lengths. Every request's greedy tokens equal mlx_lm's."""
    path = tiny_model(arch="llama", dtype="float32", quantize=4, group_size=32)
    model, _ = load(str(path))
    prompts = [[1, 5, 9, 13, 200, 31, 7], [300, 2, 2, 2, 40], list(range(3, 40, 3)), [4]]
    expected = [
        [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=24)] for p in prompts
    ]
    procs = peer_processes(2)
    async with open_cluster(
        [p.address for p in procs], Identity.generate(), CLUSTER_KEY
    ) as cluster:
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        ring.tokenizer.eos_token_ids = frozenset()  # mlx_lm's generate_step goes on too
        got: dict[int, list[int]] = {}

        async def one(i):
            async with aclosing(ring.generate(prompts[i], max_tokens=24)) as events:
                got[i] = [e.token_id async for e in events]

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        assert [got[i] for i in range(len(prompts))] == expected
        await one(0)  # and alone
        assert got[0] == expected[0]
        await ring.unload()


async def test_killed_peer_fails_the_request_fast_and_the_others_free_it(
    tiny_model, peer_processes
):
    path = tiny_model(arch="qwen3", layers=6)
    a, b, c = peer_processes(3)
    async with open_cluster(
        [a.address, b.address, c.address], Identity.generate(), CLUSTER_KEY
    ) as cluster:
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4), (4, 6)]))
        killed_at = None
        with pytest.raises((PeerUnavailable, PeerError)) as info:
            async with aclosing(ring.generate([1, 2, 3, 4, 5], max_tokens=2000)) as events:
                async for e in events:
                    if e.index == 5:
                        b.kill()
                        killed_at = time.monotonic()
        assert killed_at is not None
        assert time.monotonic() - killed_at < 5.0
        assert b.peer_id[:12] in str(info.value), str(info.value)
        # The survivors were told to free the request.
        survivors = [p for p in cluster.peers if p.peer_id != b.peer_id]
        with trio.fail_after(5):
            while True:
                statuses = [await p.call_status() for p in survivors]
                if all(s.active_requests == 0 for s in statuses):
                    break
                await trio.sleep(0.05)
        # And they still serve.
        assert all(s.layers is not None for s in statuses)


def test_peer_cli_prints_its_address_keeps_its_id_and_stops_on_sigterm(tmp_path):
    state = tmp_path / "state"
    runs = []
    for _ in range(2):
        peer = PeerProcess(state, "cli-test", "--no-openblas")  # no key file: it makes one
        try:
            assert LINE.search(peer.line) and "name=cli-test" in peer.line
            runs.append(peer.peer_id)
        finally:
            assert peer.stop() == 0  # SIGTERM: a clean exit
        if len(runs) == 1:
            assert "generated a new cluster key" in peer.stderr
            assert str(state / "cluster.key") in peer.stderr
        else:
            assert "generated" not in peer.stderr
    assert runs[0] == runs[1], "the peer id must survive a restart"
    assert (state / "identity.key").stat().st_mode & 0o077 == 0


def test_peer_cli_rejects_a_bad_cluster_key_file(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dnet.cli_peer",
            "--state-dir",
            str(tmp_path / "s"),
            "--cluster-key-file",
            str(bad),
            "--no-mdns",
            "--no-openblas",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not hex" in out.stderr
