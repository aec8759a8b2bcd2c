"""What the solver knows: the model's costs per layer, each device, each link."""

from __future__ import annotations

import attrs

from dnet.errors import DnetError


class NoFeasiblePlan(DnetError):
    """No set of devices can hold the model at the target context."""

    code = "no_feasible_plan"

    def __init__(self, message: str, shortfall_bytes: int) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes


@attrs.frozen
class ModelProfile:
    """Costs of a model as stored (quantization included), from its config and
    safetensors headers.

    ``layer_bytes[i]`` is what layer ``i`` occupies and what decoding one token reads
    from it; ``layer_flops[i]`` the FLOPs one token costs there (active experts only);
    ``kv_bytes_per_token[i]`` its KV cache growth per position.
    """

    name: str
    num_layers: int
    layer_bytes: tuple[int, ...]
    layer_flops: tuple[int, ...]
    kv_bytes_per_token: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # the output head read per token (the embeddings again when tied)
    norm_bytes: int
    head_flops: int
    tied_embeddings: bool
    activation_bytes: int  # one position's hidden state as it crosses a link
    # Whether a first slice keeps the embedding table in memory (False: it looks its
    # tokens' rows up in the file; a tied head still holds it on the last slice).
    embed_resident: bool = True

    def __attrs_post_init__(self) -> None:
        n = self.num_layers
        if not (
            len(self.layer_bytes) == len(self.layer_flops) == len(self.kv_bytes_per_token) == n
        ):
            raise ValueError("per-layer tuples must have num_layers entries")

    @property
    def weight_bytes(self) -> int:
        head = 0 if self.tied_embeddings else self.head_bytes
        return sum(self.layer_bytes) + self.embed_bytes + head + self.norm_bytes

    def edge_bytes(self, start: int, end: int) -> int:
        """What a slice holds besides its layers: the norm and the output head on the
        last (the embeddings, when tied), the embeddings on the first if resident."""
        last = end == self.num_layers
        total = self.norm_bytes + self.head_bytes if last else 0
        if start == 0 and self.embed_resident and not (last and self.tied_embeddings):
            total += self.embed_bytes
        return total

    def slice_memory(self, start: int, end: int, context: int) -> int:
        """Weights and KV cache at ``context`` positions of layers ``[start, end)``."""
        layers = sum(self.layer_bytes[start:end])
        kv = sum(self.kv_bytes_per_token[start:end]) * context
        return layers + kv + self.edge_bytes(start, end)


@attrs.frozen
class DeviceProfile:
    """One peer, as measured. ``memory_bytes`` is what it may use for dnet (free
    memory); the solver keeps ``headroom`` of it free."""

    peer_id: str
    name: str
    memory_bytes: int
    bandwidth_bytes_s: float  # memory bandwidth: decode reads every weight once per token
    flops_s: float  # matmul rate at the model's dtype
    disk_read_bytes_s: float = 0.0  # for predicting load time; 0 if unknown
    layer_overhead_s: float = 0.0  # per layer per step beyond reading weights (dispatch)

    def __attrs_post_init__(self) -> None:
        if self.bandwidth_bytes_s <= 0 or self.flops_s <= 0 or self.memory_bytes < 0:
            raise ValueError(f"device {self.name}: rates must be positive and memory non-negative")


@attrs.frozen
class LinkProfile:
    """A one-way link: fixed latency plus size over throughput."""

    latency_s: float
    bandwidth_bytes_s: float

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_s


HEAD = "head"  # the head's endpoint in link tables
LOOPBACK = LinkProfile(latency_s=0.0, bandwidth_bytes_s=float("inf"))
