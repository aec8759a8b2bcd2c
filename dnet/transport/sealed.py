"""Sealed links: after the handshake every frame is encrypted and authenticated
with AES-256-GCM under a key for its direction (from the cluster key and an
ephemeral X25519 exchange, ``X25519Exchange``), its counter as the nonce. A frame
that was altered, injected, replayed, dropped or reordered does not open: the
connection is closed and the frame never acted on."""

from __future__ import annotations

import struct

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dnet.protocol.codec import ProtocolError
from dnet.protocol.handshake import HandshakeFailed
from dnet.transport.links import Link, LinkClosed

_NONCE = struct.Struct("<4xQ")  # 12 bytes: four zero, then the frame counter
# A frame the other side has not taken in this long: the link is dead (a frame of
# a 2048-token prefill chunk of a 5120-wide model is 20 MB: 2 s at 10 MB/s).
SEND_TIMEOUT_S = 30.0


class X25519Exchange:
    """The ephemeral key each side adds to the handshake: the frames' keys then
    need its secret too, which is gone when the connection is (forward secrecy)."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def exchange(self, peer_public: bytes) -> bytes:
        """Raises:
        HandshakeFailed: not a usable X25519 key.
        """
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise HandshakeFailed(f"bad key exchange: {exc}") from None


class FrameNotAuthentic(ProtocolError):
    code = "frame_not_authentic"


class SealedLink:
    """A ``Link`` whose messages are sealed on the way out and opened on the way
    in. Sends are serialised here, so counters go out in the order they were
    taken."""

    def __init__(self, link: Link, send_key: bytes, receive_key: bytes) -> None:
        self._link = link
        self._seal = AESGCM(send_key)
        self._open = AESGCM(receive_key)
        self._sent = 0
        self._received = 0
        self._lock = trio.Lock()
        self.description = getattr(link, "description", "?")

    def limit(self, max_message: int) -> None:
        self._link.limit(max_message + 16)

    async def send(self, data: bytes) -> None:
        # Take the lock without a trip around the scheduler when it is free.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            sealed = self._seal.encrypt(_NONCE.pack(self._sent), data, None)
            self._sent += 1
            # Once its counter is taken a frame goes out whole, even if the sender is
            # cancelled meanwhile: a frame cancelled before its first byte (waiting
            # for the socket) or half-way would make every later one fail to open
            # on the other side. A send stuck past SEND_TIMEOUT_S tears the link.
            deadline = trio.current_time() + SEND_TIMEOUT_S
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                await self._link.send(sealed)
            if scope.cancelled_caught:  # the link is closed: later sends fail
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                    await self._link.aclose()
                raise LinkClosed(f"connection to {self.description} timed out sending")
        finally:
            self._lock.release()

    async def receive(self) -> bytes:
        """Raises:
        LinkClosed, FrameNotAuthentic
        """
        sealed = await self._link.receive()
        try:
            data = self._open.decrypt(_NONCE.pack(self._received), sealed, None)
        except InvalidTag:
            raise FrameNotAuthentic(
                f"frame {self._received} from {self.description} is not authentic "
                "(altered, injected, replayed or out of order)"
            ) from None
        self._received += 1
        return data

    async def aclose(self) -> None:
        await self._link.aclose()
