"""This install's identity key and the cluster key, kept in the state directory.

The identity is an Ed25519 key; the peer id is derived from its public half, so it
stays the same across restarts. The cluster key is a shared secret: every member of
a cluster has the same one.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dnet.errors import DnetError
from dnet.protocol.handshake import peer_id_for

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
CLUSTER_KEY_FILE = "cluster.key"


class KeyFileError(DnetError):
    """An identity or cluster key file that cannot be read or is malformed."""

    code = "key_file"


class Identity:
    """An Ed25519 identity (implements ``dnet.protocol.handshake.Signer``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_for(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 verification for the handshake (``dnet.protocol.handshake.Verify``)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def load_identity(state_dir: Path) -> Identity:
    """The identity in ``state_dir``, created on first use.

    Raises:
        KeyFileError: the file exists but is not a 32-byte hex key.
    """
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        identity = Identity.generate()
        _write_secret(path, identity.private_bytes().hex())
        log.info("created identity %s in %s", identity.peer_id, path)
        return identity
    try:
        raw = bytes.fromhex(path.read_text().strip())
        return Identity(Ed25519PrivateKey.from_private_bytes(raw))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the identity key {path}: {exc}") from exc


def parse_cluster_key(text: str, where: str) -> bytes:
    """Raises:
    KeyFileError: not hex, or shorter than 16 bytes.
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(f"the cluster key in {where} is not hex") from None
    if len(key) < 16:
        raise KeyFileError(f"the cluster key in {where} is shorter than 16 bytes")
    return key


def read_secret_file(path: Path, what: str) -> str:
    """A secret's text; a file other users may read is used, with a warning.

    Raises:
        KeyFileError: it cannot be read.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc}") from exc
    if mode & 0o077:
        log.warning(
            "%s %s can be read by other users (mode %o): chmod 600 it", what, path, mode & 0o777
        )
    return text


def load_cluster_key(
    state_dir: Path, key_file: Path | None = None, key_text: str | None = None
) -> tuple[bytes, Path | None, bool]:
    """The cluster key: from ``key_text`` (``DNET_CLUSTER_KEY``), else ``key_file``,
    else ``state_dir/cluster.key`` (generated there on first use).

    Returns the key, the file it came from (``None`` for text) and whether it was
    just generated.

    Raises:
        KeyFileError
    """
    if key_text:
        return parse_cluster_key(key_text, "DNET_CLUSTER_KEY"), None, False
    if key_file is not None:
        text = read_secret_file(key_file, "the cluster key file")
        return parse_cluster_key(text, str(key_file)), key_file, False
    path = state_dir / CLUSTER_KEY_FILE
    if path.exists():
        return (
            parse_cluster_key(read_secret_file(path, "the cluster key file"), str(path)),
            path,
            False,
        )
    _write_secret(path, secrets.token_hex(32))
    return parse_cluster_key(path.read_text(), str(path)), path, True
