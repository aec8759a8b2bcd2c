"""The frame codec: every message round-trips; garbage only ever raises ProtocolError."""

from __future__ import annotations

import contextlib
import json
import math
import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnet.protocol.codec import ProtocolError, decode, encode
from dnet.protocol.messages import (
    MESSAGE_TYPES,
    Activation,
    Cancel,
    StartRequest,
    Status,
    Step,
    StepTokens,
    Token,
)
from dnet.sampling import SamplingParams

ints = st.integers(min_value=-(2**40), max_value=2**40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
texts = st.text(max_size=20)


def _messages():
    custom = {
        Activation: st.builds(
            Activation,
            request_id=texts,
            position=st.integers(0, 10_000),
            dtype=st.sampled_from(["float32", "float16", "bfloat16", "int32"]),
            shape=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
            sample=st.booleans(),
        ),
        Status: st.builds(
            Status,
            peer_id=texts,
            name=texts,
            memory_total=ints,
            memory_available=ints,
            model=st.none() | texts,
            layers=st.none() | st.tuples(st.integers(0, 99), st.integers(0, 99)),
            active_requests=ints,
            tokens_processed=ints,
            tokens_per_s=floats,
            kv_bytes=ints,
            weight_bytes=ints,
        ),
        Token: st.builds(
            Token,
            request_id=texts,
            token_id=ints,
            logprob=st.none() | floats,
            top_logprobs=st.lists(st.tuples(ints, floats), max_size=3).map(tuple),
            finish_reason=st.none() | st.sampled_from(["stop", "length"]),
            index=ints,
        ),
    }
    custom[Step] = st.integers(0, 4).flatmap(
        lambda rows: st.builds(
            Step,
            step=ints,
            request_ids=st.lists(texts, min_size=rows, max_size=rows, unique=True).map(tuple),
            positions=st.lists(st.integers(0, 2**40), min_size=rows, max_size=rows).map(tuple),
            dtype=st.sampled_from(["float32", "float16", "bfloat16", "int32"]),
            shape=st.lists(st.integers(0, 6), min_size=0, max_size=2).map(
                lambda rest: (rows, *rest)
            ),
        )
    )
    custom[StepTokens] = st.builds(
        StepTokens, step=ints, tokens=st.lists(custom[Token], max_size=3).map(tuple)
    )
    custom[StartRequest] = st.builds(
        StartRequest,
        request_id=texts,
        sampling=st.builds(
            SamplingParams,
            temperature=st.floats(0, 5),
            top_p=st.floats(0.01, 1),
            top_k=st.integers(0, 100),
            min_p=st.floats(0, 1),
            repetition_penalty=st.floats(0.1, 5),
            seed=st.none() | st.integers(0, 2**62),
            top_logprobs=st.integers(0, 20),
        ),
        max_tokens=st.integers(1, 10_000),
        prompt_tokens=st.lists(st.integers(0, 2**31), max_size=5).map(tuple),
    )
    generic = [st.from_type(c) for c in MESSAGE_TYPES if c not in custom]
    return st.one_of(*custom.values(), *generic)


def _payload(message):
    if isinstance(message, Activation | Step):
        size = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}[message.dtype]
        return bytes(math.prod(message.shape) * size)
    return b""


@settings(max_examples=300, deadline=None)
@given(_messages())
def test_every_message_round_trips(message):
    payload = _payload(message)
    if not all(math.isfinite(v) for v in _floats(attrs.asdict(message))):
        with pytest.raises(ProtocolError):  # JSON has no NaN or infinity
            encode(message, payload)
        return
    assert decode(encode(message, payload)) == (message, payload)


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _floats(v)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data):
    with contextlib.suppress(ProtocolError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(
    _messages().filter(lambda m: all(math.isfinite(v) for v in _floats(attrs.asdict(m)))), st.data()
)
def test_mutated_frames_raise_only_protocol_errors(message, data):
    frame = bytearray(encode(message, _payload(message)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[i:]
        else:
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(ProtocolError):
        decode(bytes(frame))


def _frame(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<I", len(raw)) + raw + payload


def _step(**fields):
    base = {"type": "Step", "step": 1, "request_ids": ["a", "b"], "positions": [3, 4]}
    return {**base, "dtype": "int32", "shape": [2, 1], **fields}


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        ({"type": "Nope"}, b"", "unknown message type"),
        ({"request_id": "r"}, b"", "type"),
        ({"type": "Cancel"}, b"", "request_id"),
        ({"type": "Cancel", "request_id": 5}, b"", "expected str"),
        ({"type": "Cancel", "request_id": "r", "extra": 1}, b"", "extra"),
        ({"type": "Token", "request_id": "r", "token_id": "5", "logprob": 0.0}, b"", "int"),
        ({"type": "Token", "request_id": "r", "token_id": 5.5, "logprob": 0.0}, b"", "int"),
        ({"type": "Token", "request_id": "r", "token_id": True, "logprob": 0.0}, b"", "int"),
        ({"type": "Cancel", "request_id": "r"}, b"xx", "no payload"),
        (
            {
                "type": "Activation",
                "request_id": "r",
                "position": 0,
                "dtype": "float32",
                "shape": [1, 2],
            },
            b"x" * 7,
            "payload",
        ),
        (
            {
                "type": "Activation",
                "request_id": "r",
                "position": 0,
                "dtype": "complex",
                "shape": [1],
            },
            b"",
            "dtype",
        ),
        (
            {
                "type": "Activation",
                "request_id": "r",
                "position": -1,
                "dtype": "int32",
                "shape": [1],
            },
            bytes(4),
            "negative",
        ),
        (
            {
                "type": "Activation",
                "request_id": "r",
                "position": 0,
                "dtype": "float32",
                "shape": [2**20, 2**20],
            },
            b"",
            "payload",
        ),
        (_step(positions=[3]), bytes(8), "one position each"),
        (_step(request_ids=["a", "a"]), bytes(8), "repeated"),
        (_step(positions=[3, -1]), bytes(8), "negative"),
        (_step(shape=[3, 1]), bytes(12), "rows"),
        (_step(), bytes(4), "payload"),
        ({"type": "StepTokens", "step": 1, "tokens": [{"request_id": "r"}]}, b"", "token_id"),
    ],
)
def test_bad_headers_are_named(header, payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(header, payload))


def test_truncated_and_oversized_headers():
    with pytest.raises(ProtocolError):
        decode(b"\x01\x00")
    with pytest.raises(ProtocolError, match="header length"):
        decode(struct.pack("<I", 1000) + b"{}")
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(struct.pack("<I", 3) + b"\xff\xfe\x00")
    with pytest.raises(ProtocolError):
        encode(Cancel("r"), b"payload")


def test_sampling_params_are_validated_on_the_wire():
    header = {"type": "StartRequest", "request_id": "r", "sampling": {"temperature": -1.0}}
    with pytest.raises(ProtocolError, match="temperature"):
        decode(_frame(header))
    ok = {"type": "StartRequest", "request_id": "r", "sampling": {"temperature": 0.5, "seed": 3}}
    message, _ = decode(_frame(ok))
    assert message.sampling.temperature == 0.5 and message.sampling.seed == 3
