"""What a peer measures when asked: its device (``ProfileRequest``) and its link to
another peer (``ProbeLink``). Kept apart from the daemon's request work."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import attrs
import trio

from dnet.identity import Identity, verify_signature
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import LinkReport, Ping, Pong, ProbeLink, Profile
from dnet.runtime.arrays import DTYPES
from dnet.runtime.compute import ComputeThread
from dnet.runtime.device_profile import DeviceRates, cached_rates, measure, measure_disk, memory
from dnet.transport.connection import open_connection


class PeerMeasurements:
    """A peer's profile (rates measured once, cached in ``state_dir`` when given;
    memory capped by ``max_memory``, its ``--max-memory``) and link probes."""

    def __init__(
        self,
        identity: Identity,
        cluster_key: bytes,
        compute: ComputeThread,
        *,
        name: str = "",
        state_dir: Path | None = None,
        max_memory: int | None = None,
    ) -> None:
        self._identity = identity
        self._cluster_key = cluster_key
        self._compute = compute
        self._name = name
        self._state_dir = state_dir
        self.max_memory = max_memory
        self._rates: dict[tuple[str, int, int], DeviceRates] = {}

    async def profile(self, dtype: str, hidden: int, bits: int = 0) -> Profile:
        """Raises:
        ProtocolError: a dtype, width or quantization no model has.
        """
        if (
            dtype not in DTYPES
            or not 16 <= hidden <= 65536
            or bits not in (0, 4, 8)
            or (bits and hidden % 32)
        ):
            raise ProtocolError(f"cannot profile dtype {dtype!r} at width {hidden}, {bits} bits")
        key = (dtype, hidden, bits)
        if self._state_dir is not None:
            rates, cached = await self._compute.run(
                cached_rates, self._state_dir, dtype, hidden, bits
            )
        elif key in self._rates:
            rates, cached = self._rates[key], True
        else:
            rates = await self._compute.run(measure, dtype, hidden, 64, 1024, bits)
            disk = await trio.to_thread.run_sync(measure_disk, Path(tempfile.gettempdir()))
            rates, cached = attrs.evolve(rates, disk_read_bytes_s=disk), False
        self._rates[key] = rates
        total, available = memory()
        if self.max_memory:
            available = min(available, self.max_memory)
        return Profile(
            self._identity.peer_id,
            self._name,
            dtype,
            total,
            available,
            rates.bandwidth_bytes_s,
            rates.flops_s,
            rates.disk_read_bytes_s,
            rates.layer_overhead_s,
            cached,
            self.max_memory or 0,
        )

    async def probe(self, msg: ProbeLink) -> LinkReport:
        """Ping another peer over a fresh authenticated connection.

        Raises:
            ProtocolError: probe sizes out of range.
        """
        if not 1 <= msg.pings <= 100 or not 1 <= msg.bulk_bytes <= 64 << 20:
            raise ProtocolError("probe sizes out of range")
        async with open_connection(
            msg.address,
            self._identity,
            self._cluster_key,
            verify_signature,
            expected_peer_id=msg.peer_id,
            name=self._name,
        ) as conn:

            async def rtt(payload: bytes) -> float:
                start = time.perf_counter()
                await conn.send(Ping(0), payload)
                with trio.fail_after(10):
                    while not isinstance((await conn.receive())[0], Pong):
                        pass
                return time.perf_counter() - start

            small = sorted([await rtt(b"") for _ in range(msg.pings)])
            latency = small[len(small) // 2] / 2
            bulk = await rtt(bytes(msg.bulk_bytes)) / 2
        return LinkReport(msg.peer_id, latency, msg.bulk_bytes / max(bulk - latency, 1e-9))
