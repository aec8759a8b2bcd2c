"""RFC 6455 data framing, sans-IO: the part of WebSocket that runs once per message.

The upgrade handshake is wsproto's (``websocket.py``); once it is done, frames are
read and written here. wsproto's frame layer cost ~40 µs per 4 KiB message each
way on this project's machines, a quarter of the per-hop budget; this costs a few.
Only what the handshake negotiates is accepted: no extensions (so no RSV bits),
masked frames from clients and unmasked ones from servers, control frames of at
most 125 bytes and never fragmented, continuation frames only inside a message.
"""

from __future__ import annotations

import os
import struct

import numpy as np

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(Exception):
    """The other side broke the framing rules; close with ``close_code``."""

    def __init__(self, close_code: int, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.message = message


def _xor(payload: bytes | bytearray | memoryview, key: bytes) -> bytes | bytearray:
    n = len(payload)
    if n == 0:
        return b""
    if n < 1 << 16:
        # One big-integer XOR: C speed for small frames.
        mask = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
            n, "little"
        )
    # Big frames (weights, prefill activations): a word at a time, about ten times
    # faster than the big integer (4 MiB: 2 ms, not 20).
    words = n // 4
    out = bytearray(payload)
    view = np.frombuffer(out, dtype=np.uint32, count=words)
    np.bitwise_xor(view, np.frombuffer(key, dtype=np.uint32)[0], out=view)
    for i in range(words * 4, n):
        out[i] ^= key[i % 4]
    return out  # one copy of a big frame, not two


def encode_frame(opcode: int, payload: bytes = b"", *, mask: bool) -> bytes:
    """One final frame; clients must ``mask``, servers must not."""
    header, body = frame_parts(opcode, payload, mask=mask)
    return header + body


def frame_parts(
    opcode: int, payload: bytes = b"", *, mask: bool
) -> tuple[bytes, bytes | bytearray]:
    """``encode_frame`` as its header (with the mask key) and its body, for sending
    a big body without copying it once more onto its header."""
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes((0x80 | opcode, mask_bit | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, mask_bit | 126)) + _U16.pack(n)
    else:
        header = bytes((0x80 | opcode, mask_bit | 127)) + _U64.pack(n)
    if mask:
        key = os.urandom(4)
        return header + key, _xor(payload, key)
    return header, payload


def close_payload(code: int, reason: str = "") -> bytes:
    return _U16.pack(code) + reason.encode()[:123]


class FrameReader:
    """Bytes in, whole messages out: ``(OP_BINARY | OP_TEXT, data)`` once the last
    fragment arrives, control frames ``(OP_PING | OP_PONG | OP_CLOSE, payload)``
    as they come (they may arrive between the fragments of a message).

    ``masked``: whether frames must be masked (a server reading a client).
    """

    def __init__(self, *, masked: bool, max_message: int) -> None:
        self._buffer = bytearray()
        self._masked = masked
        self._max_message = max_message
        self._parts: list[bytes] = []
        self._size = 0
        self._message_op: int | None = None

    def limit(self, max_message: int) -> None:
        """From now on, refuse messages over ``max_message`` bytes (as soon as a
        frame header says so: nothing of it is buffered)."""
        self._max_message = max_message

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_message(self) -> tuple[int, bytes] | None:
        """The next complete message or control frame, or None until more bytes come.

        Raises:
            FrameError
        """
        while True:
            frame = self._next_frame()
            if frame is None:
                return None
            fin, opcode, payload = frame
            if opcode in _CONTROL_OPS:
                return opcode, payload
            if opcode == OP_CONTINUATION:
                if self._message_op is None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
            elif self._message_op is not None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
            else:
                self._message_op = opcode
            if fin and not self._parts:
                message_op, self._message_op = self._message_op, None
                self._size = 0  # the limit is per message, not per connection
                return message_op, self._check(message_op, payload)
            self._parts.append(payload)
            if fin:
                message_op, self._message_op = self._message_op, None
                data = b"".join(self._parts)
                self._parts, self._size = [], 0
                return message_op, self._check(message_op, data)

    def _check(self, opcode: int, data: bytes) -> bytes:
        if opcode == OP_TEXT:
            try:
                data.decode()
            except UnicodeDecodeError:
                raise FrameError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
        return data

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS and opcode != OP_CONTINUATION:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if bool(b1 & 0x80) != self._masked:
            raise FrameError(
                CLOSE_PROTOCOL_ERROR,
                "client frames must be masked"
                if self._masked
                else "server frames must not be masked",
            )
        n, offset = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            (n,) = _U16.unpack_from(buf, 2)
            offset = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,) = _U64.unpack_from(buf, 2)
            offset = 10
        if opcode in _CONTROL_OPS:
            if not fin or n > 125:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must be whole and short")
        elif self._size + n > self._max_message:
            raise FrameError(CLOSE_TOO_BIG, f"message over {self._max_message} bytes")
        key_at = offset
        if self._masked:
            offset += 4
        end = offset + n
        if len(buf) < end:
            return None
        with memoryview(buf) as view, view[offset:end] as body:
            # One copy out of the buffer (a slice of a bytearray is a copy too).
            payload = _xor(body, bytes(buf[key_at:offset])) if self._masked else bytes(body)
        del buf[:end]
        if opcode not in _CONTROL_OPS:
            self._size += n
        return fin, opcode, payload


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame.

    Raises:
        FrameError
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte body")
    (code,) = _U16.unpack_from(payload)
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason
