"""What the coordinator answers, as values: the loaded model, a load's result, the
devices as the head sees them, and topologies read back from JSON. The API turns
them into JSON; nothing here does I/O."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import cattrs

from dnet.errors import InvalidRequest
from dnet.head.topology import Topology
from dnet.models.model_dir import ModelDir
from dnet.protocol.messages import Status
from dnet.solver.profiles import DeviceProfile


@attrs.frozen
class LoadedModel:
    """The loaded model as ``/v1/models`` describes it."""

    id: str  # what the client named (short name, repo id or path)
    path: str
    architecture: str
    dtype: str  # as computed (or GGUF's file type, e.g. Q4_1)
    quantization: dict[str, Any] | None
    num_layers: int
    context: int
    created: int
    format: str = "safetensors"  # or "gguf"

    def names(self) -> set[str]:
        """Every name a request may call this model by."""
        from dnet.models.packaged import packaged_name

        path = Path(self.path)
        short = packaged_name(path)
        return {self.id, self.path, path.name} | ({short} if short else set())

    @classmethod
    def describe(cls, model_id: str, info: ModelDir, topology: Topology) -> LoadedModel:
        dtype = topology.compute_dtype or str(info.config.get("torch_dtype", "float32"))
        if info.is_gguf:  # its file type says more: Q4_1 (its scales widened: + float32)
            widened = f" + {topology.compute_dtype}" if topology.compute_dtype else ""
            dtype = f"{info.config['gguf_file_type']}{widened}"
        return cls(
            id=model_id,
            path=str(info.path),
            architecture=info.model_type,
            dtype=dtype,
            quantization=info.config.get("quantization"),
            num_layers=info.num_layers,
            context=topology.context,
            created=int(time.time()),
            format=info.format,
        )


@attrs.frozen
class PeerLoad:
    peer_id: str
    name: str
    layers: tuple[int, int]
    weight_bytes: int
    load_seconds: float


@attrs.frozen
class LoadResult:
    model: str
    load_seconds: float
    peers: tuple[PeerLoad, ...]
    topology: Topology


@attrs.frozen
class Device:
    """A connected peer as the head sees it now."""

    peer_id: str
    name: str
    address: str
    healthy: bool
    error: str | None
    status: Status | None
    profile: DeviceProfile | None
    rtt_ms: float | None
    in_ring: bool


_TOPOLOGY_CONVERTER = cattrs.Converter()


def topology_from_json(data: Any) -> Topology:
    """A topology as ``topology_json`` wrote it (what ``prepare_topology`` returned).

    Raises:
        InvalidRequest
    """
    try:
        return _TOPOLOGY_CONVERTER.structure(data, Topology)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest(f"not a topology from prepare_topology: {exc}", "topology") from None
