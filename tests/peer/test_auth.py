"""A live peer refuses strangers and garbage, and keeps serving everyone else."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from dnet.identity import Identity, verify_signature
from dnet.peer.process import PeerProcess
from dnet.protocol.codec import decode, encode
from dnet.protocol.handshake import ClientHandshake, HandshakeFailed
from dnet.protocol.messages import (
    Activation,
    Error,
    Hello,
    Status,
    StatusRequest,
    Token,
)
from dnet.transport.connection import open_connection

from ..processes import CLUSTER_KEY, open_peers

RECV_TIMEOUT = 5


async def status_over_fresh_connection(address: str) -> Status:
    async with open_connection(address, Identity.generate(), CLUSTER_KEY, verify_signature) as conn:
        await conn.send(StatusRequest())
        with trio.fail_after(RECV_TIMEOUT):
            reply, _ = await conn.receive()
    assert isinstance(reply, Status)
    return reply


@asynccontextmanager
async def raw_websocket(address: str):
    """A bare WebSocket to a peer, with no handshake of ours."""
    async with open_websocket_url(address) as ws:
        try:
            yield ws
        finally:
            # trio-websocket 0.12 leaks the socket when the server closes first.
            await ws.aclose()
            await ws._stream.aclose()


async def read_until_closed(ws) -> list:
    """Every message the peer sends before it closes the connection."""
    got = []
    with trio.fail_after(RECV_TIMEOUT):
        try:
            while True:
                got.append(decode(await ws.get_message())[0])
        except ConnectionClosed:
            pass
    return got


async def test_wrong_cluster_key_is_refused_both_ways():
    async with open_peers(1) as [(address, daemon)]:
        with pytest.raises(HandshakeFailed, match="cluster key"):
            async with open_connection(address, Identity.generate(), b"w" * 32, verify_signature):
                pass
        # A client with the wrong key that forges on: the peer closes before reading more.
        async with raw_websocket(address) as ws:
            hs = ClientHandshake(Identity.generate(), b"w" * 32, verify_signature)
            await ws.send_message(hs.hello())
            await ws.get_message()  # the peer's reply; we cannot verify it
            from dnet.protocol.messages import HelloFinish

            await ws.send_message(encode(HelloFinish("00" * 32, "00" * 64)))
            await ws.send_message(encode(StatusRequest()))
            got = await read_until_closed(ws)
            assert [type(m) for m in got] == [Error] and got[0].code == "handshake_failed"
        assert (await status_over_fresh_connection(address)).peer_id == daemon.peer_id


async def test_spoofed_peer_id_and_unauthenticated_frames_are_refused():
    victim = Identity.generate()
    async with open_peers(1) as [(address, daemon)]:
        attacker = Identity.generate()
        async with raw_websocket(address) as ws:
            await ws.send_message(
                encode(Hello("dnet/2", victim.peer_id, attacker.public_key.hex(), "11" * 32))
            )
            await ws.send_message(encode(StatusRequest()))
            got = await read_until_closed(ws)
            assert [type(m) for m in got] == [Error] and "does not belong" in got[0].message
        # No handshake at all: the first frame is refused, nothing is answered.
        async with raw_websocket(address) as ws:
            await ws.send_message(encode(StatusRequest()))
            got = await read_until_closed(ws)
            assert [type(m) for m in got] == [Error] and got[0].code == "handshake_failed"
        # Pinning the wrong peer id on our side fails too.
        with pytest.raises(HandshakeFailed, match="expected"):
            async with open_connection(
                address,
                Identity.generate(),
                CLUSTER_KEY,
                verify_signature,
                expected_peer_id=victim.peer_id,
            ):
                pass
        assert (await status_over_fresh_connection(address)).peer_id == daemon.peer_id


async def test_out_of_order_messages_close_only_that_connection():
    async with (
        open_peers(1) as [(address, _)],
        open_connection(address, Identity.generate(), CLUSTER_KEY, verify_signature) as bad,
        open_connection(address, Identity.generate(), CLUSTER_KEY, verify_signature) as good,
    ):
        await bad.send(Token("r", 1, 0.0))  # a peer never accepts tokens
        with trio.fail_after(RECV_TIMEOUT):
            reply, _ = await bad.receive()
        assert isinstance(reply, Error) and reply.code == "protocol_error"
        await good.send(StatusRequest())
        with trio.fail_after(RECV_TIMEOUT):
            reply, _ = await good.receive()
        assert isinstance(reply, Status)


def _mutate(frame: bytes, data) -> bytes:
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and buf:
            buf[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[i:]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=6))
    return bytes(buf)


SEEDS = [
    encode(StatusRequest()),
    encode(Token("r", 1, -0.5)),
    encode(Activation("r", 0, "float32", (1, 1, 4)), bytes(16)),
]


def test_a_live_peer_survives_random_and_mutated_frames(tmp_path):
    """Frames from an authenticated client: the peer answers or sends an error and
    closes that connection; it never crashes and keeps serving new connections."""
    from ..processes import PeerProcess

    key_file = tmp_path / "k"
    key_file.write_text(CLUSTER_KEY.hex())
    peer = PeerProcess(tmp_path / "state", key_file, "fuzz")
    try:

        async def probe(frames: list[bytes]) -> None:
            async with open_connection(
                peer.address, Identity.generate(), CLUSTER_KEY, verify_signature
            ) as conn:
                for frame in frames:
                    try:
                        await conn.link.send(frame)
                    except Exception:
                        break
                with trio.move_on_after(2):
                    try:
                        while True:
                            message, _ = await conn.receive()
                            assert isinstance(message, Status | Error), message
                    except Exception as exc:
                        assert "closed" in str(exc) or type(exc).__name__ in (
                            "LinkClosed",
                            "ProtocolError",
                        )
            status = await status_over_fresh_connection(peer.address)
            assert status.peer_id == peer.peer_id

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.data())
        def fuzz(data):
            frames = []
            for _ in range(data.draw(st.integers(1, 3))):
                if data.draw(st.booleans()):
                    frames.append(data.draw(st.binary(max_size=64)))
                else:
                    frames.append(_mutate(data.draw(st.sampled_from(SEEDS)), data))
            trio.run(probe, frames)

        fuzz()
        assert peer.proc.poll() is None, "the peer died"
    finally:
        peer.stop()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def _send_huge_frame(address: str, size: int) -> int:
    """Upgrade a raw socket to a WebSocket and send one binary frame of ``size``
    bytes before any handshake; returns how many bytes the peer took before it
    closed the connection."""
    import base64
    import socket
    import struct
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b"101" in sock.recv(4096).split(b"\r\n")[0]
    sent = 0
    try:
        sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", size) + b"\0\0\0\0")
        chunk = bytes(1 << 20)
        while sent < size:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # closed by the peer: what it should do
    finally:
        sock.close()
    return sent


def test_a_huge_frame_before_the_handshake_costs_the_peer_nothing(tmp_path):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())
    peer = PeerProcess(tmp_path / "p", "big", key_file=key_file)
    try:
        time.sleep(0.5)
        before = _peak_rss(peer.proc.pid)
        taken = _send_huge_frame(peer.address, 100 << 20)
        grown = _peak_rss(peer.proc.pid) - before
        print(
            f"a 100 MB frame before the handshake: took {taken >> 20} MiB, peak RSS +{grown / 2**20:.1f} MiB"
        )
        assert grown < 10 << 20, f"peak RSS grew {grown >> 20} MiB"
        assert taken < 100 << 20  # it hung up long before the end
        # And it still serves the cluster.
        assert trio.run(status_over_fresh_connection, peer.address).layers is None
    finally:
        peer.stop()


async def test_a_bad_request_gets_an_error_and_the_connection_keeps_serving():
    from dnet.protocol.messages import Error, ProfileRequest

    async with open_peers(1) as peers:
        address = peers[0][0]
        async with open_connection(
            address, Identity.generate(), CLUSTER_KEY, verify_signature
        ) as conn:
            await conn.send(ProfileRequest("float99", 1 << 40))
            with trio.fail_after(RECV_TIMEOUT):
                reply, _ = await conn.receive()
            assert isinstance(reply, Error) and "cannot profile" in reply.message
            await conn.send(StatusRequest())
            with trio.fail_after(RECV_TIMEOUT):
                status, _ = await conn.receive()
            assert isinstance(status, Status)
