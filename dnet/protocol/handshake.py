"""The mutual handshake, sans-IO.

Both sides prove (a) knowledge of the cluster key, with an HMAC over a transcript
of both nonces and both public keys, and (b) possession of the identity key behind
the peer id they claim, with an Ed25519 signature over the same transcript. The peer
id is a hash of the public key, so it cannot be claimed without the key.

    client                                   server
    Hello(peer_id, public_key, nonce)  ─────►
                                       ◄───── HelloReply(peer_id, public_key, nonce, mac, sig)
    HelloFinish(mac, sig)              ─────►

Each side may add an ephemeral X25519 key (``kex``, injected like the signing);
then every frame is sealed under keys for each direction that both derive from the
cluster key, the exchange's secret and the transcript (``frame_keys``; the AEAD and
X25519 are in ``dnet.transport.sealed``).

The signing itself is injected (``Signer`` and ``Verify``) so this module stays free
of crypto libraries and I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Protocol

from dnet.protocol import PROTOCOL_ID
from dnet.protocol.codec import ProtocolError, decode, encode
from dnet.protocol.messages import Error, Hello, HelloFinish, HelloReply, Message

NONCE_BYTES = 32
PEER_ID_PREFIX = "dn"


class HandshakeFailed(ProtocolError):
    """The other side failed to prove the cluster key or its identity."""

    code = "handshake_failed"


class Signer(Protocol):
    """An identity: a raw Ed25519 public key and a way to sign with its private key."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


Verify = Callable[[bytes, bytes, bytes], bool]  # (public_key, signature, data) -> ok


def peer_id_for(public_key: bytes) -> str:
    """The stable peer id of a public key: ``dn`` + base32 of its SHA-256."""
    digest = hashlib.sha256(b"dnet-peer-id\x00" + public_key).digest()
    return PEER_ID_PREFIX + base64.b32encode(digest).decode().rstrip("=").lower()


def _unhex(value: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise HandshakeFailed(f"{what} is not hex") from None
    if len(raw) != size:
        raise HandshakeFailed(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _transcript(
    client_pub: bytes,
    client_nonce: bytes,
    server_pub: bytes,
    server_nonce: bytes,
    client_kex: bytes = b"",
    server_kex: bytes = b"",
) -> bytes:
    return hashlib.sha256(
        b"dnet-handshake\x00"
        + PROTOCOL_ID.encode()
        + b"\x00"
        + client_pub
        + client_nonce
        + server_pub
        + server_nonce
        + len(client_kex).to_bytes(1, "big")
        + client_kex
        + len(server_kex).to_bytes(1, "big")
        + server_kex
    ).digest()


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


def _hkdf(key: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), one block: ``length`` <= 32."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def session_keys(cluster_key: bytes, transcript: bytes, shared: bytes = b"") -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) keys for the frames after the
    handshake: fresh per connection (the transcript holds both nonces), known only
    to holders of the cluster key, and, with an ephemeral key exchange's ``shared``
    secret, not recoverable from a recording even by one who learns it later."""
    secret = cluster_key + shared
    return (
        _hkdf(secret, transcript, b"dnet frames client to server"),
        _hkdf(secret, transcript, b"dnet frames server to client"),
    )


class KeyExchange(Protocol):
    """One ephemeral Diffie-Hellman key (X25519 in the transport)."""

    @property
    def public(self) -> bytes: ...

    def exchange(self, peer_public: bytes) -> bytes: ...


class _Side:
    def __init__(
        self,
        identity: Signer,
        cluster_key: bytes,
        verify: Verify,
        name: str,
        new_kex: Callable[[], KeyExchange] | None = None,
    ) -> None:
        if len(cluster_key) < 16:
            raise ValueError("the cluster key must be at least 16 bytes")
        self._identity = identity
        self._key = cluster_key
        self._verify = verify
        self._name = name
        self._nonce = os.urandom(NONCE_BYTES)
        self.peer_id = peer_id_for(identity.public_key)
        self.remote_peer_id: str | None = None
        self.remote_name = ""
        self.done = False
        self._agreed: bytes | None = None  # the transcript, once both proved it
        self._kex = new_kex() if new_kex is not None else None
        self._shared = b""  # the key exchange's secret, when both sides made one

    def frame_keys(self) -> tuple[bytes, bytes]:
        """(sending, receiving) keys for the frames after a finished handshake."""
        if self._agreed is None:
            raise HandshakeFailed("the handshake is not finished")
        to_server, to_client = session_keys(self._key, self._agreed, self._shared)
        return (
            (to_server, to_client) if isinstance(self, ClientHandshake) else (to_client, to_server)
        )

    def _check_identity(self, peer_id: str, public_key: bytes) -> None:
        if peer_id_for(public_key) != peer_id:
            raise HandshakeFailed(f"peer id {peer_id[:16]}… does not belong to the key presented")

    def _check_proofs(
        self, label: bytes, transcript: bytes, pub: bytes, mac: str, sig: str
    ) -> None:
        if not hmac.compare_digest(_mac(self._key, label, transcript), _unhex(mac, 32, "mac")):
            raise HandshakeFailed("wrong cluster key")
        if not self._verify(pub, _unhex(sig, 64, "signature"), label + transcript):
            raise HandshakeFailed("identity signature does not verify")


class ClientHandshake(_Side):
    """The connecting side. ``expected_peer_id`` pins whom we mean to reach."""

    def __init__(
        self,
        identity: Signer,
        cluster_key: bytes,
        verify: Verify,
        *,
        expected_peer_id: str | None = None,
        name: str = "",
        new_kex: Callable[[], KeyExchange] | None = None,
    ) -> None:
        super().__init__(identity, cluster_key, verify, name, new_kex)
        self._expected = expected_peer_id
        self._sent_hello = False

    def hello(self) -> bytes:
        """The first frame to send."""
        if self._sent_hello:
            raise HandshakeFailed("hello already sent")
        self._sent_hello = True
        return encode(
            Hello(
                PROTOCOL_ID,
                self.peer_id,
                self._identity.public_key.hex(),
                self._nonce.hex(),
                self._name,
                self._kex.public.hex() if self._kex else "",
            )
        )

    def receive(self, frame: bytes) -> bytes:
        """Take the server's reply; return the frame that finishes the handshake.

        Raises:
            HandshakeFailed
        """
        if not self._sent_hello or self.done:
            raise HandshakeFailed("unexpected handshake frame")
        try:
            reply, _ = decode(frame)
        except ProtocolError as exc:
            raise HandshakeFailed(f"bad handshake frame: {exc.message}") from None
        if isinstance(reply, Error):
            raise HandshakeFailed(f"the other side refused: {reply.message}")
        if not isinstance(reply, HelloReply):
            raise HandshakeFailed(f"expected HelloReply, got {type(reply).__name__}")
        if reply.protocol != PROTOCOL_ID:
            raise HandshakeFailed(f"protocol {reply.protocol!r}, expected {PROTOCOL_ID!r}")
        server_pub = _unhex(reply.public_key, 32, "public key")
        self._check_identity(reply.peer_id, server_pub)
        if self._expected is not None and reply.peer_id != self._expected:
            raise HandshakeFailed(
                f"reached peer {reply.peer_id[:16]}…, expected {self._expected[:16]}…"
            )
        mine = self._kex.public if self._kex else b""
        theirs = _unhex(reply.kex, 32, "key exchange") if reply.kex and self._kex else b""
        transcript = _transcript(
            self._identity.public_key,
            self._nonce,
            server_pub,
            _unhex(reply.nonce, NONCE_BYTES, "nonce"),
            mine,
            theirs,
        )
        self._check_proofs(b"server", transcript, server_pub, reply.mac, reply.signature)
        if self._kex is not None and theirs:
            self._shared = self._kex.exchange(theirs)
        self.remote_peer_id, self.remote_name, self.done = reply.peer_id, reply.name, True
        self._agreed = transcript
        return encode(
            HelloFinish(
                _mac(self._key, b"client", transcript).hex(),
                self._identity.sign(b"client" + transcript).hex(),
            )
        )


class ServerHandshake(_Side):
    """The accepting side."""

    def __init__(
        self,
        identity: Signer,
        cluster_key: bytes,
        verify: Verify,
        *,
        name: str = "",
        new_kex: Callable[[], KeyExchange] | None = None,
    ) -> None:
        super().__init__(identity, cluster_key, verify, name, new_kex)
        self._transcript: bytes | None = None
        self._client_pub = b""
        self._client: Hello | None = None

    def _hello(self, message: Message) -> bytes:
        """Check the client's ``Hello``; the ``HelloReply`` with this side's proofs.

        Raises:
            HandshakeFailed
        """
        if not isinstance(message, Hello):
            raise HandshakeFailed(f"expected Hello, got {type(message).__name__}")
        if message.protocol != PROTOCOL_ID:
            raise HandshakeFailed(f"protocol {message.protocol!r}, expected {PROTOCOL_ID!r}")
        self._client_pub = _unhex(message.public_key, 32, "public key")
        self._check_identity(message.peer_id, self._client_pub)
        self._client = message
        theirs = _unhex(message.kex, 32, "key exchange") if message.kex else b""
        if not theirs:
            self._kex = None  # a side without one: keys from the cluster key alone
        mine = self._kex.public if self._kex else b""
        self._transcript = _transcript(
            self._client_pub,
            _unhex(message.nonce, NONCE_BYTES, "nonce"),
            self._identity.public_key,
            self._nonce,
            theirs,
            mine,
        )
        if self._kex is not None:
            self._shared = self._kex.exchange(theirs)
        return encode(
            HelloReply(
                PROTOCOL_ID,
                self.peer_id,
                self._identity.public_key.hex(),
                self._nonce.hex(),
                _mac(self._key, b"server", self._transcript).hex(),
                self._identity.sign(b"server" + self._transcript).hex(),
                self._name,
                mine.hex(),
            )
        )

    def receive(self, frame: bytes) -> bytes | None:
        """Take the client's next frame. Returns the reply to send after ``Hello``;
        ``None`` once ``HelloFinish`` completes the handshake.

        Raises:
            HandshakeFailed
        """
        if self.done:
            raise HandshakeFailed("handshake already complete")
        try:
            message, _ = decode(frame)
        except ProtocolError as exc:
            raise HandshakeFailed(f"bad handshake frame: {exc.message}") from None
        if self._client is None:
            return self._hello(message)
        if isinstance(message, Error):
            raise HandshakeFailed(f"the other side refused: {message.message}")
        if not isinstance(message, HelloFinish):
            raise HandshakeFailed(f"expected HelloFinish, got {type(message).__name__}")
        assert self._transcript is not None
        self._check_proofs(
            b"client", self._transcript, self._client_pub, message.mac, message.signature
        )
        self.remote_peer_id, self.remote_name, self.done = (
            self._client.peer_id,
            self._client.name,
            True,
        )
        self._agreed = self._transcript
        return None
