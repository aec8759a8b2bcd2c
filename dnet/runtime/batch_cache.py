"""Per-request KV caches and the batches they join: a request that takes part in
batched decode steps keeps its caches as a row of one ``BatchKVCache`` per layer
(mlx_lm's); rows join at the end and leave from anywhere, and a request that runs
alone again takes its row back out."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from dnet.runtime.sampler import RequestSampler


class Batch:
    """Requests whose caches are rows of one ``BatchKVCache`` per layer."""

    def __init__(self, rids: list[str], cache: list[BatchKVCache]) -> None:
        self.rids = rids
        self.cache = cache

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


@attrs.define(eq=False)
class Request:
    rid: str
    cache: list[KVCache] | None  # None while the request is a row of ``batch``
    max_context: int
    sampler: RequestSampler | None
    last_used: float
    position: int = 0
    batch: Batch | None = None

    @property
    def kv_bytes(self) -> int:
        if self.batch is not None:
            return self.batch.kv_bytes // max(len(self.batch.rids), 1)
        assert self.cache is not None
        return sum(c.nbytes for c in self.cache)


def solo(req: Request) -> Request:
    """Give ``req`` its own caches again if it is a row of a batch."""
    batch = req.batch
    if batch is None:
        return req
    row = batch.rids.index(req.rid)
    req.cache = [c.extract(row) for c in batch.cache]
    req.batch = None
    keep_rows(batch, [r for r in batch.rids if r != req.rid])
    return req


def keep_rows(batch: Batch, rids: list[str]) -> None:
    """Keep only ``rids`` (a subsequence of the batch's rows) in ``batch``."""
    if rids == batch.rids:
        return
    rows = [batch.rids.index(r) for r in rids]
    batch.rids = rids
    if not rids:
        batch.cache.clear()
        return
    index = mx.array(rows)
    for c in batch.cache:
        c.filter(index)


def assemble(reqs: list[Request], requests: Mapping[str, Request], num_layers: int) -> Batch:
    """The batch whose rows are exactly ``reqs``, in order. The common cases (the
    same rows as last step; rows left; rows joined at the end) reuse the batch
    already there; anything else rebuilds it."""
    rids = [r.rid for r in reqs]
    base = reqs[0].batch
    if base is not None and base.rids == rids:
        return base
    wanted = set(rids)
    if base is not None:
        kept = [r for r in base.rids if r in wanted]
        if kept != rids[: len(kept)]:
            base = None
        else:
            for rid in base.rids:
                if rid not in wanted and rid in requests:
                    solo(requests[rid])  # still running, in another batch
            keep_rows(base, kept)
    joining = reqs[len(base.rids) :] if base is not None else reqs
    if base is not None and not joining:
        return base
    caches = [solo(r).cache for r in joining]
    merged = [
        BatchKVCache.merge([c[layer] for c in caches])  # type: ignore[index]
        for layer in range(num_layers)
    ]
    if base is None:
        base = Batch([], merged)
    else:
        for mine, theirs in zip(base.cache, merged, strict=True):
            mine.extend(theirs)
    base.rids.extend(r.rid for r in joining)
    for r in joining:
        r.cache, r.batch = None, base
    return base
