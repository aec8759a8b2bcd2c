"""Serving requests on the loaded ring: which model a request names, admission
(at most ``max_concurrent`` at once), the prompt's tokens and the context they
leave, and the counters dashboards show.

``Serving.open_generation`` is all the API needs: it yields a ``Generation`` whose
events are text already (``dnet.head.text``); the API only shapes JSON.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from dnet.errors import ContextOverflow, ModelNotFound, ModelNotLoaded, OverCapacity
from dnet.head.loading import PeerLoading
from dnet.head.text import GenerationEvent, Prompt, prompt_ids
from dnet.sampling import SamplingParams

if TYPE_CHECKING:
    from dnet.head.coordinator import Coordinator
    from dnet.head.loaded_ring import LoadedRing
    from dnet.head.results import LoadedModel

RATE_WINDOW_S = 10.0


@attrs.frozen
class GenerationOptions:
    params: SamplingParams = attrs.Factory(SamplingParams)
    max_tokens: int | None = None  # None: as many as the context leaves
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    echo: bool = False  # the prompt's text leads the answer (completions)


@attrs.frozen
class Generation:
    """An admitted generation: the model's id, the prompt's size and (when echoed)
    text, and its events."""

    model: str
    prompt_tokens: int
    echo: str
    events: AsyncGenerator[GenerationEvent, None]


@attrs.frozen
class HeadStatistics:
    """A snapshot for dashboards: requests in flight, tokens over the last
    ``RATE_WINDOW_S``, and time to first token of the latest request."""

    state: str
    model: str | None
    active_requests: int
    max_concurrent: int
    requests_served: int
    tokens_generated: int
    tokens_per_s: float
    last_ttft_s: float | None
    load_progress: dict[str, PeerLoading]
    pending_model: str | None = None  # being prepared or loaded
    decode_lanes: tuple[int, ...] = ()  # running requests in each decode lane
    replanning: str | None = None  # why the head is re-planning the model now


def token_limit(context: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """How many tokens a request may generate within ``context``.

    Raises:
        ContextOverflow
    """
    room = context - prompt_tokens
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = f" + {max_tokens} new tokens" if max_tokens is not None else ""
        raise ContextOverflow(
            f"this model's context is {context} tokens; the request needs "
            f"{prompt_tokens} prompt tokens{asked}"
        )
    return room if max_tokens is None else max_tokens


class Serving:
    def __init__(self, coordinator: Coordinator, max_concurrent: int) -> None:
        self._coordinator = coordinator
        self.max_concurrent = max_concurrent
        self._active = 0
        self._served = 0
        self._tokens = 0
        self._recent: deque[float] = deque()
        self._last_ttft: float | None = None

    @property
    def active(self) -> int:
        """Requests running now."""
        return self._active

    def resolve(self, name: str | None) -> tuple[LoadedModel, LoadedRing]:
        """The loaded model and its ring, if ``name`` names it (its id, path or
        file name).

        Raises:
            ModelNotLoaded, ModelNotFound
        """
        c = self._coordinator
        model, ring = c.model, c.ring
        if model is None or ring is None:
            if c.replanning is not None:
                raise ModelNotLoaded(
                    f"the head is re-planning {c.pending_model} ({c.replanning}): "
                    "retry in a few seconds"
                )
            raise ModelNotLoaded("no model is loaded: POST /v1/load_model first")
        if name is not None and name not in model.names():
            raise ModelNotFound(f"The model `{name}` does not exist; loaded is `{model.id}`")
        return model, ring

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        if self._active >= self.max_concurrent:
            raise OverCapacity(
                f"{self._active} requests are running, the most this head admits "
                f"(--max-concurrent {self.max_concurrent}); try again shortly"
            )
        self._active += 1
        self._coordinator.touch()
        try:
            yield
        finally:
            self._active -= 1
            self._served += 1
            self._coordinator.touch()

    @asynccontextmanager
    async def open_generation(
        self, name: str | None, prompt: Prompt, options: GenerationOptions
    ) -> AsyncIterator[Generation]:
        """Admit a request and start it on the ring; on exit it ends on every peer
        and frees its slot.

        Raises:
            ModelNotLoaded, ModelNotFound, InvalidRequest, ContextOverflow,
            OverCapacity
        """
        model, ring = self.resolve(name)
        tokenizer = ring.tokenizer
        ids = await trio.to_thread.run_sync(prompt_ids, tokenizer, prompt, model.context)
        max_tokens = token_limit(model.context, len(ids), options.max_tokens)
        echo = tokenizer.decode(ids) if options.echo else ""
        async with self._admitted():
            events = ring.generate(
                ids,
                options.params,
                max_tokens=max_tokens,
                stop=options.stop,
                logprobs=options.logprobs,
            )
            async with aclosing(self._counted(events)) as counted:
                yield Generation(model.id, len(ids), echo, counted)

    async def _counted(
        self, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncGenerator[GenerationEvent, None]:
        started = time.monotonic()
        first = True
        async with aclosing(events):
            async for event in events:
                now = time.monotonic()
                if first:
                    self._last_ttft, first = now - started, False
                self._tokens += 1
                self._recent.append(now)
                yield event

    def statistics(self) -> HeadStatistics:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        c = self._coordinator
        return HeadStatistics(
            state=c.state_name(),
            model=c.model.id if c.model else None,
            active_requests=self._active,
            max_concurrent=self.max_concurrent,
            requests_served=self._served,
            tokens_generated=self._tokens,
            tokens_per_s=len(self._recent) / RATE_WINDOW_S,
            last_ttft_s=self._last_ttft,
            load_progress=dict(c.load_progress),
            pending_model=c.preparing or c.pending_model,
            decode_lanes=tuple(c.ring.lanes.sizes()) if c.ring else (),
            replanning=c.replanning,
        )
