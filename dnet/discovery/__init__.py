"""Finding peers: mDNS (zeroconf), a static list, or memory; one event stream."""

from __future__ import annotations

import attrs


@attrs.frozen
class PeerFound:
    """A peer to connect to. ``peer_id`` is what it claims (mDNS TXT); ``None`` for
    a static address, whose id is learnt in the handshake."""

    address: str
    peer_id: str | None = None
    name: str = ""
    source: str = "static"


@attrs.frozen
class PeerLost:
    peer_id: str
    source: str = "mdns"


DiscoveryEvent = PeerFound | PeerLost
