"""Rings of peers over loopback WebSockets: parity with mlx_lm, concurrency, failures."""

from __future__ import annotations

from contextlib import aclosing

import mlx.core as mx
import pytest
import trio
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity

from ..processes import CLUSTER_KEY, open_peers

N = 32


def reference(path, prompt, n=N):
    model, _ = load(str(path))
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def chat(tokenizer_path, text="Tell me a story about a fox and a crow."):
    _, tok = load(str(tokenizer_path))
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def plan_for(cluster, cuts):
    return [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, cuts, strict=True)]


async def collect(ring, prompt, n=N, **kw):
    async with aclosing(ring.generate(prompt, max_tokens=n, **kw)) as events:
        return [e async for e in events]


CUTS = {2: [(0, 1), (1, 4)], 3: [(0, 2), (2, 3), (3, 4)]}


@pytest.mark.parametrize(
    ("arch", "dtype", "bits", "moe"),
    [
        ("qwen3", "bfloat16", None, True),
        ("qwen3", "bfloat16", 4, True),
        ("deepseek_v2", "bfloat16", None, False),  # MLA in bf16 (CPU has no bf16 MoE)
        ("deepseek_v2", "bfloat16", 4, True),
    ],
)
async def test_ring_matches_mlx_lm(tiny_model, arch, dtype, bits, moe):
    path = tiny_model(arch=arch, dtype=dtype, quantize=bits, moe=moe)
    prompt = chat(path)
    expected = reference(path, prompt)
    for n, cuts in CUTS.items():
        async with (
            open_peers(n) as peers,
            open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
        ):
            ring = await cluster.load(str(path), plan_for(cluster, cuts))
            events = await collect(ring, prompt, stop=())
            got = [e.token_id for e in events]
            # The ring stops at an EOS token as a server must; mlx_lm's generate_step does not.
            assert got == expected[: len(got)], f"{n} peers"
            assert len(got) == N or events[-1].finish_reason == "stop"
            chunked = [e.token_id for e in await collect(ring, prompt, prefill_chunk=5)]
            assert chunked == got
            statuses = await ring.status()
            assert [s.layers for s in statuses] == [tuple(c) for c in cuts]
            with trio.fail_after(5):  # End is queued behind work; freeing is asynchronous
                while any(s.active_requests for s in await ring.status()):
                    await trio.sleep(0.02)


@pytest.mark.parametrize(
    ("arch", "bits", "moe"),
    [("qwen3", None, True), ("qwen3", 4, True), ("deepseek_v2", None, True)],
)
async def test_float32_compute_of_a_bf16_checkpoint_matches_mlx_lm_in_float32(
    tiny_model, arch, bits, moe
):
    # The CPU fast path: widen at load. mlx_lm, given the same widening, is the
    # reference; a bf16 MoE (which MLX's CPU cannot run) runs this way too.
    path = tiny_model(arch=arch, dtype="bfloat16", quantize=bits, moe=moe)
    prompt = chat(path)
    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=N)]
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan_for(cluster, CUTS[2]), compute_dtype="float32")
        got = [e.token_id for e in await collect(ring, prompt)]
        assert got == expected
        # Widened weights take more memory than stored: twice, for bf16 floats.
        stored = sum(i.nbytes for i in _tensors(path))
        assert sum(r.weight_bytes for r in ring.loaded) > stored


def _tensors(path):
    from dnet.models.model_dir import open_model_dir

    return open_model_dir(path).tensors.values()
