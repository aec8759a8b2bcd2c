"""Float32 weights laid out as MLX's CPU matmul with OpenBLAS reads them fastest:
transposed (``[in, out]``, contiguous). Used when dnet's own decode kernel is not
taking the skinny products."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class ColumnsLinear(nn.Module):
    """``nn.Linear`` with its weight kept transposed (``[in, out]``, contiguous).

    With OpenBLAS alone a float32 product with a weight in this layout runs faster:
    on the Qwen3-0.6B shape, decode steps took 330-336 instead of 390-422 ms, the
    tied output head 55-61 instead of 98-103 ms. Same values, another summation
    order. (BLIS, when it takes the skinny products, is faster as stored.)
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    @property
    def weight(self) -> mx.array:
        return self.weight_t.T

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t


class ColumnsEmbedding(nn.Module):
    """A tied embedding kept transposed (``[dims, vocab]``) for its use as the output
    head; looking tokens up takes columns."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)

    @property
    def weight(self) -> mx.array:
        return self.weight_t.T

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def _columns_layout(module: nn.Module) -> None:
    """Swap the float32 ``nn.Linear``s inside ``module`` for ``ColumnsLinear``."""
    swaps = [
        (path, ColumnsLinear(m))
        for path, m in module.named_modules()
        if type(m) is nn.Linear and m.weight.dtype == mx.float32
    ]
    if swaps:
        module.update_modules(tree_unflatten(swaps))


def columns_layouts(
    layers: list[nn.Module], embed: Any, head: Any, *, last: bool
) -> tuple[Any, Any]:
    """Float32 weights in the layout MLX's CPU matmul reads fastest; the output
    head too (it reads all of its table per token)."""
    for layer in layers:
        _columns_layout(layer)
    if isinstance(head, nn.Linear) and type(head) is nn.Linear:
        head = ColumnsLinear(head) if head.weight.dtype == mx.float32 else head
    elif (
        head is None
        and last
        and isinstance(embed, nn.Embedding)
        and type(embed) is nn.Embedding
        and embed.weight.dtype == mx.float32
    ):
        embed = ColumnsEmbedding(embed)
    return embed, head
