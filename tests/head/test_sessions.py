"""Sessions over an in-process ring: concurrency, cancel, stops, big prefill, idle KV."""

from __future__ import annotations

from contextlib import aclosing

import mlx.core as mx
import pytest
import trio
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.head.stops import StopMatcher
from dnet.identity import Identity
from dnet.protocol.messages import StartRequest
from dnet.sampling import SamplingParams

from ..processes import CLUSTER_KEY, open_peers


async def collect(ring, prompt, n=16, **kw):
    async with aclosing(ring.generate(prompt, max_tokens=n, **kw)) as events:
        return [e async for e in events]


def plan(cluster, cuts):
    return [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, cuts, strict=True)]


@pytest.mark.parametrize("lanes", [None, 2])
async def test_four_concurrent_requests_match_their_solo_runs(tiny_model, lanes):
    path = tiny_model(arch="qwen3", dtype="bfloat16")
    prompts = [
        [5, 9, 13, 200, 4, 77],
        [300, 2, 2, 41, 7],
        [11, 12, 13, 14, 15, 16, 17, 18, 19],
        [450, 3],
    ]
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(),
        SamplingParams(temperature=1.2, seed=9, top_k=20),
    ]
    async with (
        open_peers(2) as peers,
        open_cluster(
            [a for a, _ in peers], Identity.generate(), CLUSTER_KEY, decode_lanes=lanes
        ) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        assert ring.lanes.count == (lanes or 1)  # loopback: one machine, one lane
        alone = [
            [e.token_id for e in await collect(ring, p, 24, params=q)]
            for p, q in zip(prompts, params, strict=True)
        ]
        together: dict[int, list[int]] = {}
        seen_interleaved = trio.Event()
        progress = [0] * 4

        async def one(i):
            tokens = []
            async with aclosing(ring.generate(prompts[i], params[i], max_tokens=24)) as events:
                async for e in events:
                    tokens.append(e.token_id)
                    progress[i] += 1
                    if all(progress):
                        seen_interleaved.set()
            together[i] = tokens

        sizes = []

        async def watch():
            while True:
                sizes.append(ring.lanes.sizes())
                await trio.sleep(0.01)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as requests:
                    for i in range(4):
                        requests.start_soon(one, i)
                nursery.cancel_scope.cancel()
        if lanes == 2:  # both lanes ran requests at once
            assert any(min(s) >= 1 for s in sizes), sizes[-5:]
        assert seen_interleaved.is_set(), "the four requests never ran at the same time"
        assert [together[i] for i in range(4)] == alone
        # They ran as batches: every peer saw decode steps of several requests.
        most = 3 if lanes is None else 2
        assert all(max(d.step_sizes) >= most for _, d in peers), [d.step_sizes for _, d in peers]
        with trio.fail_after(5):  # End is queued behind work; freeing is asynchronous
            while any(s.active_requests for s in await ring.status()):
                await trio.sleep(0.02)


async def test_a_long_prompt_does_not_freeze_running_streams(tiny_model):
    """While a long prompt is prefilled in chunks, the running streams keep getting
    tokens: each peer lets a decode step in between any two chunks."""
    path = tiny_model(arch="qwen3")
    long_prompt = [(7 * i) % 400 + 5 for i in range(96)]
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        alone = [e.token_id for e in await collect(ring, long_prompt, 4, prefill_chunk=4)]
        started, first_token = trio.Event(), trio.Event()
        during = [0, 0, 0]

        async def stream(i):
            async with aclosing(ring.generate([3 + i, 9, 27], max_tokens=400)) as events:
                async for _ in events:
                    if started.is_set() and not first_token.is_set():
                        during[i] += 1
                    if first_token.is_set():
                        return

        async def long():
            await trio.sleep(0.2)
            started.set()
            tokens = []
            async with aclosing(ring.generate(long_prompt, max_tokens=4, prefill_chunk=4)) as ev:
                async for e in ev:
                    first_token.set()
                    tokens.append(e.token_id)
            assert tokens == alone

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(stream, i)
                nursery.start_soon(long)
        # 24 chunks went through each peer, and a waiting step never waited for more
        # than one of them; in arrival order the streams would have got 1 or 2 tokens.
        assert min(during) >= 6, during


async def test_leaving_early_frees_kv_on_every_peer(tiny_model):
    path = tiny_model(arch="qwen3")
    async with (
        open_peers(3) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 1), (1, 2), (2, 4)]))
        async with aclosing(ring.generate([1, 2, 3, 4], max_tokens=100)) as events:
            async for e in events:
                if e.index == 3:
                    busy = await ring.status()
                    assert all(s.active_requests == 1 and s.kv_bytes > 0 for s in busy)
                    break
        with trio.fail_after(5):
            while any(s.active_requests for s in await ring.status()):
                await trio.sleep(0.02)
        assert all(s.kv_bytes == 0 for s in await ring.status())


async def test_stop_strings_and_finish_reasons(tiny_model):
    path = tiny_model(arch="qwen3", dtype="float32")
    model, tokenizer = load(str(path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True
    )
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        events = await collect(ring, prompt, 20)
        assert events[-1].finish_reason in ("length", "stop")
        text = "".join(e.text for e in events)
        expected_ids = [
            int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=len(events))
        ]
        assert [e.token_id for e in events] == expected_ids[: len(events)]
        if events[-1].finish_reason == "length":
            assert len(events) == 20
            assert text == tokenizer.decode(expected_ids[:20])
        # Stop at a string from the middle of that text.
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = await collect(ring, prompt, 20, stop=[stop])
        cut_text = "".join(e.text for e in cut)
        assert cut[-1].finish_reason == "stop"
        assert cut_text == text[: text.index(stop)]
        assert stop not in cut_text


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D more") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("EN") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.flush() == ""
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False)
    assert m.flush() == "a"
    assert StopMatcher([]).feed("anything") == ("anything", False)


async def test_prefill_activation_over_one_mib(tiny_model):
    path = tiny_model(arch="qwen3", hidden=256, dtype="float32")
    model, _ = load(str(path))
    prompt = [(i * 37) % 500 + 3 for i in range(1100)]  # 1100 x 256 x 4 bytes > 1 MiB
    expected = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=8)]
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        got = await collect(ring, prompt, 8, prefill_chunk=4096)
        assert [e.token_id for e in got] == expected[: len(got)]


async def test_idle_requests_are_freed(tiny_model):
    path = tiny_model(arch="qwen3")
    async with (
        open_peers(2, idle_timeout=1.0) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(str(path), plan(cluster, [(0, 2), (2, 4)]))
        # A head that starts a request and vanishes without ending it.
        await ring.order[0].send(StartRequest("orphan"))
        with trio.fail_after(5):
            while sum(s.active_requests for s in await ring.status()) < 2:
                await trio.sleep(0.05)
        with trio.fail_after(8):
            while sum(s.active_requests for s in await ring.status()):
                await trio.sleep(0.2)


async def test_requests_before_load_fail_cleanly(tiny_model):
    async with (
        open_peers(1) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        from dnet.errors import ModelNotFound, ModelNotLoaded
        from dnet.head.coordinator import Coordinator
        from dnet.head.serving import GenerationOptions
        from dnet.head.text import Prompt

        # No model loaded: no ring to generate on, and serving says so.
        assert cluster.ring is None
        serving = Coordinator(cluster).serving
        with pytest.raises(ModelNotLoaded):
            async with serving.open_generation(None, Prompt(ids=(1, 2, 3)), GenerationOptions()):
                pass
        with pytest.raises(ModelNotFound):
            await cluster.load("/nonexistent/model", [PlanEntry(cluster.peers[0].peer_id, 0, 4)])


async def test_ping_echoes_its_payload():
    async with (
        open_peers(1) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        peer = cluster.peers[0]
        times = await peer.ping(bytes(range(256)) * 16)
        assert 0 < times.to_peer < times.round_trip < 5
        assert 0 < times.from_peer < times.round_trip
        assert times.to_peer + times.from_peer <= times.round_trip
        # The payload really travels both ways: a bigger one takes longer on average.
        small = sorted([(await peer.ping(b"")).round_trip for _ in range(20)])[10]
        big = sorted([(await peer.ping(bytes(8 << 20))).round_trip for _ in range(3)])[1]
        assert big > small
