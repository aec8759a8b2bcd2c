"""Message types: frozen attrs classes, one cattrs tagged union keyed by ``type``.

A message with a tensor (``Activation``) names its ``dtype`` and ``shape`` here; the
bytes ride in the frame's payload.
"""

from __future__ import annotations

from typing import Any

import attrs

from dnet.sampling import SamplingParams


@attrs.frozen
class Hello:
    """Handshake, first message of the connecting side."""

    protocol: str
    peer_id: str
    public_key: str  # hex, raw Ed25519
    nonce: str  # hex
    name: str = ""
    kex: str = ""  # hex, an ephemeral X25519 public key (forward secrecy)


@attrs.frozen
class HelloReply:
    """Handshake, the accepting side's answer: its identity and proofs."""

    protocol: str
    peer_id: str
    public_key: str
    nonce: str
    mac: str  # HMAC(cluster key, server label | transcript)
    signature: str  # Ed25519 over the transcript
    name: str = ""
    kex: str = ""  # hex, the accepting side's ephemeral X25519 key


@attrs.frozen
class HelloFinish:
    """Handshake, the connecting side's proofs."""

    mac: str
    signature: str


@attrs.frozen
class StatusRequest:
    pass


@attrs.frozen
class Status:
    peer_id: str
    name: str
    memory_total: int
    memory_available: int
    model: str | None
    layers: tuple[int, int] | None
    active_requests: int
    tokens_processed: int
    tokens_per_s: float
    kv_bytes: int = 0
    weight_bytes: int = 0
    decode_step_s: float = 0.0  # moving average of one decode step's compute
    step_rows: float = 0.0  # moving average of the requests batched in a decode step
    memory_budget: int = 0  # --max-memory in bytes; 0: none set


@attrs.frozen
class ProfileRequest:
    """Measure (or recall) this device's rates for a model of this activation dtype
    and width, its weights quantized to ``bits`` (0: not quantized)."""

    dtype: str = "float32"
    hidden: int = 4096
    bits: int = 0


@attrs.frozen
class Profile:
    """A device as measured: memory, and decode-relevant rates at ``dtype``:
    matvec bytes/s (decode reads every weight once per token) and matmul FLOP/s.
    ``memory_available`` is what it offers a model: its free memory, or less under
    its ``memory_budget`` (``--max-memory``)."""

    peer_id: str
    name: str = ""
    dtype: str = "float32"
    memory_total: int = 0
    memory_available: int = 0
    bandwidth_bytes_s: float = 0.0
    flops_s: float = 0.0
    disk_read_bytes_s: float = 0.0
    layer_overhead_s: float = 0.0
    cached: bool = False
    memory_budget: int = 0  # --max-memory in bytes; 0: none set


@attrs.frozen
class ProbeLink:
    """Measure the link from this peer to another: small pings for latency, one
    ``bulk_bytes`` ping for throughput."""

    address: str
    peer_id: str
    pings: int = 5
    bulk_bytes: int = 1 << 20


@attrs.frozen
class LinkReport:
    peer_id: str
    latency_s: float
    bandwidth_bytes_s: float


@attrs.frozen
class Span:
    """Bytes ``[begin, end)`` of a model file and their SHA-256 (hex): a tensor's
    data (``name``), or a file's header or a small file whole (``name`` empty). The
    hash is empty for a tensor of a hub model whose head read only the headers: the
    file's hash (``FileSpans.sha256``) names its bytes, and a peer keeps the hash of
    what it fetched to check its store against later."""

    begin: int
    end: int
    sha256: str
    name: str = ""


@attrs.frozen
class FileSpans:
    """A model file (by its name in the model), its size, and spans of it."""

    name: str
    size: int
    spans: tuple[Span, ...]
    sha256: str = ""  # of the whole file, where known (the hub's LFS hash)


@attrs.frozen
class HubSource:
    """Where the hub has a model: a repo at a commit. Peers use their own endpoint
    (``HF_ENDPOINT``) and token."""

    repo_id: str
    revision: str


@attrs.frozen
class Holder:
    """Another peer whose store holds spans of the model being loaded."""

    address: str
    peer_id: str
    name: str = ""


@attrs.frozen
class LoadSlice:
    """Load layers ``[start, end)`` of ``model``.

    Every slice but the first dials its predecessor at ``prev_address`` (which must
    prove ``prev_peer_id``) and sends ``Follow``; the predecessor streams its outputs
    back down that connection, server to client, so activations travel unmasked
    (WebSocket masks only client-to-server frames, in pure Python here). A slice
    that is not last waits for ``next_peer_id`` to follow it. The last slice's
    tokens go to the head."""

    model: str
    start: int
    end: int
    is_first: bool
    is_last: bool
    prev_address: str | None = None
    prev_peer_id: str | None = None
    next_peer_id: str | None = None
    dtype: str | None = None  # as stored, for checking; None: whatever the files hold
    compute_dtype: str | None = None  # widen floats at load (e.g. float32 on CPUs)
    max_context: int | None = None
    # What to load, by content: the model's id and the spans of its files this
    # slice reads. ``model`` only names it in logs: a peer never opens it.
    model_id: str = ""
    files: tuple[FileSpans, ...] = ()
    hub: HubSource | None = None  # the hub has these files too (by range)
    holders: tuple[Holder, ...] = ()  # peers that hold some of them


@attrs.frozen
class HaveRequest:
    """Which spans of ``model_id`` does the peer's store hold (for planning)?"""

    model_id: str


@attrs.frozen
class Have:
    """The spans (file, begin, end) of ``model_id`` the store held when last
    verified (not checked again for this answer)."""

    model_id: str
    spans: tuple[tuple[str, int, int], ...] = ()


@attrs.frozen
class FetchSpan:
    """A peer asks the head that is loading it, or another peer that holds them,
    for bytes ``[begin, end)`` of a model file: from a span's beginning to a span's
    end, every span between held (a run of whole spans)."""

    model_id: str
    file: str
    begin: int
    end: int


@attrs.frozen
class SpanData:
    """A piece of a span, its bytes in the payload, at ``offset`` into the span;
    ``last`` on its final piece."""

    model_id: str
    file: str
    begin: int
    offset: int
    last: bool
    error: str = ""  # the head cannot send it (then ``last``)


@attrs.frozen
class Follow:
    """From a peer to its predecessor: send me your outputs on this connection."""


@attrs.frozen
class LoadProgress:
    """Sent to the controller while a slice loads: ``done`` of ``total`` parts read."""

    model: str
    done: int
    total: int


@attrs.frozen
class FetchProgress:
    """Sent to the controller while a slice's weights arrive: ``done`` of ``total``
    bytes this load lacked, now coming from ``source`` (``local copy``, ``hub``,
    ``head``) at ``rate`` bytes/s."""

    model_id: str
    source: str
    done: int
    total: int
    rate: float = 0.0


@attrs.frozen
class Loaded:
    model: str
    start: int
    end: int
    weight_bytes: int
    load_seconds: float
    fetched_bytes: int = 0  # what this load had to fetch (0: all in the peer's store)
    fetch_seconds: float = 0.0  # how long making sure of the weights took (verify + fetch)


@attrs.frozen
class Unload:
    pass


@attrs.frozen
class Unloaded:
    pass


@attrs.frozen
class StartRequest:
    """Create a request's state. Travels the ring ahead of its activations."""

    request_id: str
    sampling: SamplingParams = attrs.Factory(SamplingParams)
    max_tokens: int = 256
    max_context: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    prompt_tokens: tuple[int, ...] = ()


@attrs.frozen
class Activation:
    """Positions ``[position, position + shape[1])`` of a request: token ids (int32)
    into the first slice, hidden states between slices. ``sample`` asks the last
    slice for a token (false for prefill chunks before the last)."""

    request_id: str
    position: int
    dtype: str
    shape: tuple[int, ...]
    sample: bool = True


@attrs.frozen
class Step:
    """One decode position for each of several requests, run as one batch.

    Row ``i`` continues ``request_ids[i]`` at ``positions[i]``: token ids
    (int32, ``[rows, 1]``) into the first slice, hidden states ``[rows, 1, hidden]``
    between slices. A peer drops rows it cannot run (an ended request, with an
    ``Error`` to its controller when it is not simply gone) and passes the rest on;
    the last slice answers ``StepTokens`` even when no row is left, so the head
    always learns that the step is over."""

    step: int
    request_ids: tuple[str, ...]
    positions: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]


@attrs.frozen
class Token:
    request_id: str
    token_id: int
    logprob: float | None  # None unless the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" (a stop token) | "length" | None
    index: int = 0  # 0 for the first generated token


@attrs.frozen
class StepTokens:
    """The last slice's answer to ``Step``: one token per surviving row."""

    step: int
    tokens: tuple[Token, ...]


@attrs.frozen
class EndRequest:
    request_id: str


@attrs.frozen
class Cancel:
    request_id: str


@attrs.frozen
class Ping:
    """Echo request for measuring a link; the payload comes back in ``Pong``.
    ``sent_ns``/``received_ns`` are CLOCK_MONOTONIC stamps: on one host they give
    the one-way time of the ping."""

    seq: int
    sent_ns: int = 0


@attrs.frozen
class Pong:
    seq: int
    received_ns: int = 0


@attrs.frozen
class Error:
    code: str
    message: str
    request_id: str | None = None
    peer_id: str | None = None


Message = (
    Hello
    | HelloReply
    | HelloFinish
    | StatusRequest
    | Status
    | ProfileRequest
    | Profile
    | ProbeLink
    | LinkReport
    | LoadSlice
    | HaveRequest
    | Have
    | FetchSpan
    | SpanData
    | Follow
    | LoadProgress
    | FetchProgress
    | Loaded
    | Unload
    | Unloaded
    | StartRequest
    | Activation
    | Step
    | Token
    | StepTokens
    | EndRequest
    | Cancel
    | Ping
    | Pong
    | Error
)

MESSAGE_TYPES: tuple[type[Any], ...] = Message.__args__
