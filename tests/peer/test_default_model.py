"""The default model, the real SmolLM2-135M-Instruct GGUF, split over two
``dnet-peer`` processes: it knows the capital of France, token for token as
mlx_lm's model class built straight from the file, and each peer holds only its
share of the file in memory."""

from __future__ import annotations

from contextlib import aclosing

import gguf
import psutil

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.head.topology import profile_devices
from dnet.identity import Identity
from dnet.models.gguf import read_header
from dnet.models.model_dir import open_model_dir
from dnet.models.model_profile import model_profile
from dnet.models.tokenizer import load_tokenizer

from ..models.gguf_files import reference_model
from ..models.test_gguf import smollm2
from ..processes import CLUSTER_KEY
from ..runtime.test_parity import reference_tokens

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def byte_halves(path) -> list[tuple[int, int]]:
    """The cut that splits what the two peers hold most evenly."""
    profile = model_profile(open_model_dir(path))
    n = profile.num_layers
    cut = min(
        range(1, n),
        key=lambda k: abs(profile.slice_memory(0, k, 0) - profile.slice_memory(k, n, 0)),
    )
    return [(0, cut), (cut, n)]


def config_from_llama_cpps_reader(path) -> dict:
    """mlx_lm's llama config, from the file's metadata as llama.cpp's reader sees it."""
    fields = gguf.GGUFReader(str(path)).fields

    def get(key: str):
        return fields[key].contents()

    return {
        "model_type": "llama",
        "hidden_size": get("llama.embedding_length"),
        "num_hidden_layers": get("llama.block_count"),
        "intermediate_size": get("llama.feed_forward_length"),
        "num_attention_heads": get("llama.attention.head_count"),
        "num_key_value_heads": get("llama.attention.head_count_kv"),
        "rms_norm_eps": get("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": get("llama.rope.freq_base"),
        "max_position_embeddings": get("llama.context_length"),
        "vocab_size": len(fields["tokenizer.ggml.tokens"].data),
        "tie_word_embeddings": "output.weight"
        not in {t.name for t in gguf.GGUFReader(str(path)).tensors},
    }


async def test_two_peers_answer_paris_token_for_token_as_mlx_lm(peer_processes):
    path = smollm2()
    tokenizer = load_tokenizer(path, eos_token_ids=2)
    prompt = tokenizer.chat_prompt(QUESTION)
    reference = reference_model(path, config_from_llama_cpps_reader(path))
    expected = []
    for token in reference_tokens(reference, prompt, 48):
        expected.append(token)
        if token in tokenizer.eos_token_ids:
            break
    a, b = peer_processes(2)
    async with open_cluster([a.address, b.address], Identity.generate(), CLUSTER_KEY) as cluster:
        cuts = byte_halves(path)
        ring = await cluster.load(
            "smollm2-135m",
            [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, cuts, strict=True)],
        )
        assert ring.order[0].address != ring.order[1].address
        async with aclosing(
            ring.generate(ring.tokenizer.chat_prompt(QUESTION), max_tokens=48)
        ) as events:
            got = [e async for e in events]
    assert [e.token_id for e in got] == expected
    answer = "".join(e.text for e in got)
    assert "Paris" in answer, answer


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def test_a_peer_holding_half_the_file_holds_little_more_than_half(peer_processes):
    path = smollm2()
    file_weights = sum(t.nbytes for t in read_header(path).tensors.values())
    peers = peer_processes(2)
    async with open_cluster(
        [p.address for p in peers], Identity.generate(), CLUSTER_KEY
    ) as cluster:
        # Idle as in a cluster: connected and profiled (what prepare does), nothing loaded.
        await profile_devices(cluster, "float32", 576)
        baseline = [_rss(p.proc.pid) for p in peers]
        by_address = {p.address: p for p in peers}
        cuts = byte_halves(path)
        entries = [
            PlanEntry(c.peer_id, s, e) for c, (s, e) in zip(cluster.peers, cuts, strict=True)
        ]
        await cluster.load(str(path), entries)
        grown = [
            (_rss(by_address[c.address].proc.pid) - baseline[peers.index(by_address[c.address])])
            / file_weights
            for c in cluster.peers
        ]
        print(f"RSS above idle, as a share of the file's weight bytes, per peer {cuts}: {grown}")
        assert all(g <= 0.65 for g in grown), grown
        assert all(g >= 0.3 for g in grown), grown  # each really holds its half
