"""prepare_topology = profile the peers and links + profile the model + solve.

A ``Topology`` is plain data (JSON via ``topology_json``): the model, the devices as
measured, the assignments in ring order, the predictions, and the peers left out.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import attrs
import trio

from dnet.errors import InvalidRequest
from dnet.head.cluster import Cluster
from dnet.head.loaded_ring import LoadedRing
from dnet.head.loading import PlanEntry, Progress
from dnet.models.manifest import slice_spans
from dnet.models.model_dir import ModelDir
from dnet.models.model_profile import model_profile
from dnet.protocol.messages import Have, HaveRequest, LinkReport, ProbeLink, Profile, ProfileRequest
from dnet.solver.plan import Plan
from dnet.solver.profiles import HEAD, DeviceProfile, LinkProfile
from dnet.solver.solve import solve

PROBE_PINGS = 8
BULK_BYTES = 1 << 20
LINK_TTL_S = 300.0


@attrs.frozen
class TopologyAssignment:
    peer_id: str
    name: str
    address: str
    start: int
    end: int
    next_peer_id: str | None
    predicted_stage_s: float
    predicted_memory_bytes: int
    predicted_load_s: float | None  # fetching what it lacks + reading its weights
    predicted_fetch_bytes: int = 0  # of its slice's spans, what its store lacks
    # Those bytes over the head's measured link to it; None: they come from the hub
    # first (no rate known), or there is no link measure.
    predicted_fetch_s: float | None = None


@attrs.frozen
class Topology:
    model: str
    num_layers: int
    devices: tuple[DeviceProfile, ...]
    assignments: tuple[TopologyAssignment, ...]
    excluded: tuple[tuple[str, str], ...]  # (peer id, reason)
    objective: str
    context: int
    predicted_token_latency_s: float
    predicted_tokens_per_s: float
    predicted_ttft_s: float
    compute_dtype: str | None = None  # weights widened at load (None: as stored)
    split_reason: str | None = None  # why the model spans several peers
    name: str = ""  # the model as the user named it (``model`` is where it resolved)

    def plan_entries(self) -> list[PlanEntry]:
        return [PlanEntry(a.peer_id, a.start, a.end) for a in self.assignments]


def topology_json(topology: Topology) -> dict[str, Any]:
    return attrs.asdict(topology, recurse=True)


async def measure_link(cluster: Cluster, peer_id: str) -> LinkProfile:
    """Head-to-peer latency (median half round trip of small pings) and throughput
    (a 1 MiB ping)."""
    peer = cluster.peer(peer_id)
    small = [(await peer.ping(b"")).round_trip / 2 for _ in range(PROBE_PINGS)]
    latency = statistics.median(small)
    bulk = (await peer.ping(bytes(BULK_BYTES))).round_trip / 2
    return LinkProfile(latency, BULK_BYTES / max(bulk - latency, 1e-9))


async def probe_link(cluster: Cluster, src: str, dst: str) -> LinkProfile:
    """The link between two peers, measured by ``src`` dialling ``dst``."""
    target = cluster.peer(dst)
    reply = await cluster.peer(src).call(
        ProbeLink(target.address, target.peer_id, PROBE_PINGS, BULK_BYTES), LinkReport
    )
    return LinkProfile(reply.latency_s, reply.bandwidth_bytes_s)


async def measure_links(
    cluster: Cluster, peer_ids: list[str]
) -> dict[tuple[str, str], LinkProfile]:
    """Every head-peer and peer-peer link, from the ring's cache when fresh."""
    links: dict[tuple[str, str], LinkProfile] = {}
    now = time.monotonic()

    async def get(key: tuple[str, str]) -> LinkProfile:
        cached = cluster.link_cache.get(key)
        if cached is not None and now - cached[0] < LINK_TTL_S:
            link: LinkProfile = cached[1]
            return link
        if key[0] == HEAD:
            link = await measure_link(cluster, key[1])
        else:
            link = await probe_link(cluster, *key)
        cluster.link_cache[key] = (time.monotonic(), link)
        return link

    for pid in peer_ids:
        links[(HEAD, pid)] = links[(pid, HEAD)] = await get((HEAD, pid))
        for other in peer_ids:
            if other != pid:
                links[(pid, other)] = await get((pid, other))
    return links


async def profile_devices(
    cluster: Cluster, dtype: str, hidden: int, bits: int = 0
) -> list[DeviceProfile]:
    """Each connected peer's measured (or cached) rates, in the order connected."""
    profiles: dict[str, Profile] = {}

    async def one(peer_id: str) -> None:
        request = ProfileRequest(dtype, hidden, bits)
        profiles[peer_id] = await cluster.peer(peer_id).call(request, Profile)

    async with trio.open_nursery() as nursery:
        for p in cluster.peers:
            nursery.start_soon(one, p.peer_id)
    return [
        DeviceProfile(
            p.peer_id,
            profiles[p.peer_id].name or p.name,
            profiles[p.peer_id].memory_available,
            profiles[p.peer_id].bandwidth_bytes_s,
            profiles[p.peer_id].flops_s,
            profiles[p.peer_id].disk_read_bytes_s,
            profiles[p.peer_id].layer_overhead_s,
        )
        for p in cluster.peers
    ]


async def prepare_topology(
    cluster: Cluster,
    model: ModelDir | str,
    *,
    context: int = 4096,
    objective: str = "latency",
    prompt_tokens: int = 512,
    compute_dtype: str | None = None,
) -> Topology:
    """Profile the model, the connected peers and their links, and solve.

    Every head-peer and peer-peer link is measured (peers probe each other), and
    remembered for ``LINK_TTL_S`` so that a repeated prepare is quick.

    Raises:
        NoFeasiblePlan, ModelNotFound, PeerUnavailable
    """
    info = model if isinstance(model, ModelDir) else await cluster.open_model(model)
    profile = model_profile(info, compute_dtype)
    dtype = {4: "float32", 2: "bfloat16"}.get(
        profile.activation_bytes // int(info.config["hidden_size"]), "float32"
    )
    if dtype == "bfloat16" and "float16" in str(info.config.get("torch_dtype", "")):
        dtype = "float16"
    # A quantized model is measured quantized: its packed bytes at the rate of the
    # product its slices use (dnet's kernel, for float32 activations).
    bits = int((info.config.get("quantization") or {}).get("bits") or 0)
    bits = bits if bits in (4, 8) else 0
    devices = await profile_devices(cluster, dtype, int(info.config["hidden_size"]), bits)
    links = await measure_links(cluster, [d.peer_id for d in devices])
    plan: Plan = solve(
        profile, devices, links, context=context, objective=objective, prompt_tokens=prompt_tokens
    )
    addresses = {p.peer_id: p.address for p in cluster.peers}
    topology = _topology(info, plan, devices, addresses, objective, context, compute_dtype)
    topology = await _with_fetches(cluster, info, topology, links)
    return attrs.evolve(topology, name=model if isinstance(model, str) else str(info.path))


async def _with_fetches(
    cluster: Cluster,
    info: ModelDir,
    topology: Topology,
    links: dict[tuple[str, str], LinkProfile],
) -> Topology:
    """The topology with each peer's predicted fetch: the spans of its slice its
    store lacks (it says which it holds), over the head's link to it."""
    manifest = await cluster.manifest(info)
    assignments = []
    for a in topology.assignments:
        spans = slice_spans(manifest, info, a.start, a.end)
        have = await cluster.peer(a.peer_id).call(HaveRequest(manifest.model_id), Have)
        held = set(have.spans)
        lacking = sum(
            s.end - s.begin
            for name, v in spans.items()
            for s in v
            if (name, s.begin, s.end) not in held
        )
        link = links.get((HEAD, a.peer_id))
        fetch_s = (
            None
            if manifest.hub is not None or link is None or link.bandwidth_bytes_s <= 0
            else (link.transfer_s(lacking) if lacking else 0.0)
        )
        load_s = a.predicted_load_s
        if load_s is not None and lacking:
            load_s = None if fetch_s is None else load_s + fetch_s
        assignments.append(
            attrs.evolve(
                a, predicted_fetch_bytes=lacking, predicted_fetch_s=fetch_s, predicted_load_s=load_s
            )
        )
    return attrs.evolve(topology, assignments=tuple(assignments))


def _topology(
    info: ModelDir,
    plan: Plan,
    devices: list[DeviceProfile],
    addresses: dict[str, str],
    objective: str,
    context: int,
    compute_dtype: str | None,
) -> Topology:
    order = [a.peer_id for a in plan.assignments]
    disk = {d.peer_id: d.disk_read_bytes_s for d in devices}
    return Topology(
        model=str(info.path),
        num_layers=info.num_layers,
        devices=tuple(devices),
        assignments=tuple(
            TopologyAssignment(
                a.peer_id,
                a.name,
                addresses[a.peer_id],
                a.start,
                a.end,
                order[i + 1] if i + 1 < len(order) else None,
                a.stage_s,
                a.memory_bytes,
                _load_s(a.memory_bytes, disk[a.peer_id]),
            )
            for i, a in enumerate(plan.assignments)
        ),
        excluded=tuple((e.peer_id, e.reason) for e in plan.excluded),
        objective=objective,
        context=context,
        predicted_token_latency_s=plan.token_latency_s,
        predicted_tokens_per_s=plan.tokens_per_s,
        predicted_ttft_s=plan.ttft_s,
        compute_dtype=compute_dtype,
        split_reason=plan.split_reason,
    )


def _load_s(nbytes: int, disk_bytes_s: float) -> float | None:
    return nbytes / disk_bytes_s if disk_bytes_s > 0 else None


async def load_topology(
    cluster: Cluster,
    topology: Topology,
    on_progress: Progress | None = None,
    model: ModelDir | None = None,
) -> LoadedRing:
    """Load every peer of ``topology`` in parallel (``model``: the topology's model,
    already opened); ``on_progress(peer_id, PeerLoading)`` follows each peer's
    fetching and reading of its weights. The ring is held by the cluster until unloaded."""
    return await cluster.load(
        model or topology.model,
        topology.plan_entries(),
        max_context=topology.context,
        on_progress=on_progress,
        compute_dtype=topology.compute_dtype,
    )


def model_context(model: ModelDir, asked: int | None, default: int) -> int:
    """The context to place for: ``asked``, else ``default`` cut to the positions
    the model was trained for.

    Raises:
        InvalidRequest: ``asked`` is beyond them.
    """
    limit = model.config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        return asked if asked is not None else default
    if asked is not None and asked > limit:
        raise InvalidRequest(
            f"context {asked} is beyond the {limit} positions {model.name} was trained for",
            "context",
        )
    return asked if asked is not None else min(default, limit)
