"""Frames: ``u32 header length | JSON header | raw payload``.

``encode`` turns a message (and a payload for tensors) into one binary WebSocket
message; ``decode`` validates everything it reads and raises ``ProtocolError`` for
anything else: no message ever reaches a handler half-checked.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, cast

import cattrs
from cattrs.strategies import configure_tagged_union

from dnet.errors import DnetError
from dnet.protocol.messages import MESSAGE_TYPES, Activation, Message, Ping, Pong, SpanData, Step
from dnet.tensor import ITEMSIZE

MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
MAX_STEP_ROWS = 4096
# Besides activations, only link probes and weights carry (opaque) payload bytes.
PAYLOAD_TYPES = (Ping, Pong, SpanData)
_LEN = struct.Struct("<I")


class ProtocolError(DnetError):
    """A frame or message that breaks the protocol; the connection is closed."""

    code = "protocol_error"


def _strict(kind: type, accept: tuple[type, ...]) -> Any:
    def structure(value: Any, _: Any) -> Any:
        if type(value) is kind and kind is not float:
            return value  # the common case, on the per-hop path
        # cattrs would coerce "5" → 5 and 5.7 → 5; the wire gets no such favours.
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accept):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        if kind is float and not math.isfinite(cast(float, value)):
            raise ValueError("expected a finite number")
        return kind(value)

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    configure_tagged_union(Message, conv, tag_name="type", tag_generator=lambda cls: cls.__name__)
    return conv


_CONVERTER = _make_converter()
# Per-type hooks and one encoder/decoder built once: the tagged union's dispatch
# and json.dumps' per-call encoder cost ~6 µs a frame, on the per-hop path.
_UNSTRUCTURE = {cls: _CONVERTER.get_unstructure_hook(cls) for cls in MESSAGE_TYPES}
_STRUCTURE = {cls.__name__: (cls, _CONVERTER.get_structure_hook(cls)) for cls in MESSAGE_TYPES}
_JSON_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_JSON_DECODE = json.JSONDecoder().decode


def encode(message: Message, payload: bytes = b"") -> bytes:
    """One frame for ``message``.

    Raises:
        ProtocolError: an activation whose payload does not match its shape.
    """
    if isinstance(message, Activation | Step):
        _check_tensor(message, len(payload))
    elif payload and not isinstance(message, PAYLOAD_TYPES):
        raise ProtocolError(f"{type(message).__name__} carries no payload")
    try:
        fields = {"type": type(message).__name__}
        fields.update(_UNSTRUCTURE[type(message)](message))
        header = _JSON_ENCODE(fields).encode()
    except ValueError as exc:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
    return _LEN.pack(len(header)) + header + payload


def decode(frame: bytes | bytearray | memoryview) -> tuple[Message, bytes]:
    """The message and payload in ``frame``.

    Raises:
        ProtocolError: truncated frame, bad JSON, unknown type, wrong fields or
            types, or a payload that does not match the header.
    """
    data = bytes(frame)
    if len(data) < 4:
        raise ProtocolError(f"frame of {len(data)} bytes has no header length")
    (size,) = _LEN.unpack_from(data)
    if size > MAX_HEADER_BYTES or size > len(data) - 4:
        raise ProtocolError(f"header length {size} does not fit a frame of {len(data)} bytes")
    try:
        raw: Any = _JSON_DECODE(data[4 : 4 + size].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError("header must be a JSON object with a string 'type'")
    name = raw.pop("type")
    known = _STRUCTURE.get(name)
    if known is None:
        raise ProtocolError(f"unknown message type {name!r}")
    cls, structure = known
    try:
        message: Message = structure(raw, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"invalid {cls.__name__} header: {_describe(exc)}") from None
    except DnetError as exc:  # a value's own validation (e.g. SamplingParams ranges)
        raise ProtocolError(f"invalid {cls.__name__} header: {exc.message}") from None
    payload = data[4 + size :]
    if isinstance(message, Activation | Step):
        _check_tensor(message, len(payload))
    elif payload and not isinstance(message, PAYLOAD_TYPES):
        raise ProtocolError(f"{cls.__name__} carries no payload, got {len(payload)} bytes")
    return message, payload


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(str(e) for e in cattrs.transform_error(exc))
    return str(exc)


def _check_tensor(message: Activation | Step, payload_len: int) -> None:
    if isinstance(message, Step):
        rows = len(message.request_ids)
        if rows > MAX_STEP_ROWS or len(message.positions) != rows:
            raise ProtocolError(
                f"step of {rows} request ids and {len(message.positions)} positions "
                f"(at most {MAX_STEP_ROWS}, one position each)"
            )
        if len(set(message.request_ids)) != rows or any(p < 0 for p in message.positions):
            raise ProtocolError("step has a repeated request id or a negative position")
        if not message.shape or message.shape[0] != rows:
            raise ProtocolError(f"step shape {message.shape!r} does not have {rows} rows")
    elif message.position < 0:
        raise ProtocolError("activation has a negative position")
    if message.dtype not in ITEMSIZE:
        raise ProtocolError(f"activation dtype {message.dtype!r} is not one of {sorted(ITEMSIZE)}")
    if not message.shape or any(not isinstance(d, int) or d < 0 for d in message.shape):
        raise ProtocolError(f"activation shape {message.shape!r} is not a list of sizes")
    if len(message.shape) > 4:
        raise ProtocolError("activation shape has too many dimensions")
    expected = math.prod(message.shape) * ITEMSIZE[message.dtype]
    if expected > MAX_PAYLOAD_BYTES or expected != payload_len:
        raise ProtocolError(
            f"activation {message.dtype}{list(message.shape)} needs {expected} payload bytes, "
            f"got {payload_len}"
        )
