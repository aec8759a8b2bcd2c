"""The sans-IO handshake: a pair of state machines, no sockets."""

from __future__ import annotations

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dnet.identity import Identity, verify_signature
from dnet.protocol.codec import decode, encode
from dnet.protocol.handshake import ClientHandshake, HandshakeFailed, ServerHandshake, peer_id_for
from dnet.protocol.messages import Hello, HelloFinish, HelloReply, StatusRequest

KEY = b"k" * 32


def pair(client_key=KEY, server_key=KEY, client_id=None, server_id=None, expected=None):
    c = ClientHandshake(
        client_id or Identity.generate(),
        client_key,
        verify_signature,
        expected_peer_id=expected,
        name="c",
    )
    s = ServerHandshake(server_id or Identity.generate(), server_key, verify_signature, name="s")
    return c, s


def run(c, s):
    reply = s.receive(c.hello())
    finish = c.receive(reply)
    assert s.receive(finish) is None
    return c, s


def test_both_sides_learn_the_proven_peer_ids():
    ci, si = Identity.generate(), Identity.generate()
    c, s = run(*pair(client_id=ci, server_id=si, expected=si.peer_id))
    assert c.done and s.done
    assert c.remote_peer_id == si.peer_id and s.remote_peer_id == ci.peer_id
    assert (c.remote_name, s.remote_name) == ("s", "c")


def test_peer_id_is_a_stable_function_of_the_key():
    ident = Identity.generate()
    again = Identity(Ed25519PrivateKey.from_private_bytes(ident.private_bytes()))
    assert again.peer_id == ident.peer_id == peer_id_for(ident.public_key)
    assert Identity.generate().peer_id != ident.peer_id


def test_wrong_cluster_key_fails_on_both_sides():
    # The client notices the server's wrong key...
    c, s = pair(client_key=KEY, server_key=b"x" * 32)
    with pytest.raises(HandshakeFailed, match="cluster key"):
        c.receive(s.receive(c.hello()))
    # ...and the server notices the client's, before anything else is read.
    c, s = pair(client_key=b"x" * 32, server_key=KEY)
    reply = s.receive(c.hello())
    with pytest.raises(HandshakeFailed, match="cluster key"):
        s.receive(_forge_finish(c, reply))
    assert not s.done


def _forge_finish(c, reply):
    # A client with the wrong key cannot verify the server either; compute its
    # finish anyway (as an attacker would) by skipping its own checks.
    import hashlib
    import hmac

    from dnet.protocol import handshake as hs

    r, _ = decode(reply)
    t = hs._transcript(
        c._identity.public_key, c._nonce, bytes.fromhex(r.public_key), bytes.fromhex(r.nonce)
    )
    mac = hmac.new(c._key, b"client" + t, hashlib.sha256).hexdigest()
    return encode(HelloFinish(mac, c._identity.sign(b"client" + t).hex()))


def test_spoofed_peer_id_is_refused():
    victim, attacker = Identity.generate(), Identity.generate()
    c, s = pair(client_id=attacker)
    hello, _ = decode(c.hello())
    # Claim the victim's id with the attacker's key: the id is not the key's hash.
    spoofed = Hello(hello.protocol, victim.peer_id, hello.public_key, hello.nonce)
    with pytest.raises(HandshakeFailed, match="does not belong"):
        s.receive(encode(spoofed))
    # Present the victim's public key too: the signature cannot be made.
    c, s = pair(client_id=attacker)
    hello, _ = decode(c.hello())
    s.receive(encode(Hello(hello.protocol, victim.peer_id, victim.public_key.hex(), hello.nonce)))
    with pytest.raises(HandshakeFailed):
        s.receive(encode(HelloFinish("00" * 32, "00" * 64)))


def test_server_impersonation_is_refused():
    victim, attacker = Identity.generate(), Identity.generate()
    c, s = pair(server_id=attacker, expected=victim.peer_id)
    with pytest.raises(HandshakeFailed, match="expected"):
        c.receive(s.receive(c.hello()))
    # Replaying the victim's public key with the attacker's signature fails too.
    c, s = pair(server_id=attacker)
    reply, _ = decode(s.receive(c.hello()))
    forged = HelloReply(
        reply.protocol,
        victim.peer_id,
        victim.public_key.hex(),
        reply.nonce,
        reply.mac,
        reply.signature,
    )
    with pytest.raises(HandshakeFailed):
        c.receive(encode(forged))


def test_out_of_order_and_garbage_frames():
    c, s = pair()
    with pytest.raises(HandshakeFailed, match="expected Hello"):
        s.receive(encode(StatusRequest()))
    c, s = pair()
    with pytest.raises(HandshakeFailed):
        s.receive(b"\x00\x01garbage")
    c, s = pair()
    with pytest.raises(HandshakeFailed, match="unexpected"):
        c.receive(b"anything")  # before hello
    c, s = pair()
    hello = c.hello()
    s.receive(hello)
    with pytest.raises(HandshakeFailed, match="expected HelloFinish"):
        s.receive(hello)
    c, s = run(*pair())
    with pytest.raises(HandshakeFailed):
        s.receive(encode(StatusRequest()))


def test_protocol_mismatch():
    c, s = pair()
    hello, _ = decode(c.hello())
    with pytest.raises(HandshakeFailed, match="protocol"):
        s.receive(encode(Hello("dnet/0", hello.peer_id, hello.public_key, hello.nonce)))


def _kex_pair(client_kex=True, server_kex=True):
    from dnet.transport.sealed import X25519Exchange

    c = ClientHandshake(
        Identity.generate(), KEY, verify_signature, new_kex=X25519Exchange if client_kex else None
    )
    s = ServerHandshake(
        Identity.generate(), KEY, verify_signature, new_kex=X25519Exchange if server_kex else None
    )
    return c, s


def test_an_ephemeral_key_exchange_goes_into_the_frame_keys():
    from dnet.protocol.handshake import session_keys

    c, s = _kex_pair()
    run(c, s)
    send, receive = c.frame_keys()
    assert (receive, send) == s.frame_keys() and send != receive
    # Not the keys the cluster key and the transcript alone would give: a recording
    # cannot be opened later by one who learns the cluster key.
    assert send not in session_keys(KEY, c._agreed)
    # Another connection of the same two sides: other keys.
    c2, s2 = _kex_pair()
    run(c2, s2)
    assert c2.frame_keys() != c.frame_keys()


@pytest.mark.parametrize(("client_kex", "server_kex"), [(True, False), (False, True)])
def test_a_side_without_a_key_exchange_still_agrees(client_kex, server_kex):
    c, s = _kex_pair(client_kex, server_kex)
    run(c, s)
    assert c.frame_keys() == s.frame_keys()[::-1]


def test_a_swapped_key_exchange_fails_the_handshake():
    from dnet.transport.sealed import X25519Exchange

    c, s = _kex_pair()
    reply, _ = decode(s.receive(c.hello()))
    forged = attrs.evolve(reply, kex=X25519Exchange().public.hex())
    with pytest.raises(HandshakeFailed, match="wrong cluster key"):
        c.receive(encode(forged))
