"""A contiguous slice of a model's decoder layers, built from mlx_lm's own classes.

``load_slice(model, start, end)`` reads only the tensors of layers ``[start, end)``,
plus the final norm and output head on the last (the embeddings, when the head is
tied to them); a first slice looks its tokens' embedding rows up in the file
(``dnet.runtime.embedding``). Running the slices of a
model one after another computes exactly what the whole mlx_lm model computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.utils import infer_quant_config

from dnet.errors import (
    BackendUnsupported,
    InvalidActivation,
    InvalidModel,
    LayerRangeError,
    MissingTensor,
    TensorShapeMismatch,
)
from dnet.models.model_dir import ModelDir, open_model_dir
from dnet.runtime import qgemv
from dnet.runtime.architectures import model_classes
from dnet.runtime.arrays import dtype_name
from dnet.runtime.blas import skinny_products_tuned
from dnet.runtime.device_profile import release_memory
from dnet.runtime.embedding import FileEmbedding
from dnet.runtime.fused import FusedDecode, embed_on_host, output_head
from dnet.runtime.layout import columns_layouts

log = logging.getLogger(__name__)


class LayerSlice:
    """Layers ``[start, end)`` of a model, ready to run.

    Call it with token ids (first slice) or hidden states (any other) and a list of
    per-layer caches; it returns hidden states, or on the last slice the logits of
    the last position. Use ``load_slice`` to build one.
    """

    def __init__(
        self,
        model: ModelDir,
        start: int,
        end: int,
        embed: nn.Module | None,
        layers: list[nn.Module],
        norm: nn.Module | None,
        head: nn.Module | None,
    ) -> None:
        self.model = model
        self.start = start
        self.end = end
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.head = head
        self.hidden_size = int(model.config["hidden_size"])
        self.vocab_size = int(model.config["vocab_size"])
        self.activation_dtype = self._activation_dtype()
        self.batching = True  # decode steps of several requests as one batch; see load_slice
        self.fused: FusedDecode | None = None  # decode steps in one C call; see load_slice
        self.weight_bytes = sum(p.nbytes for _, p in tree_flatten(self.parameters()))

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.model.num_layers

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def parameters(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"layers": [layer.parameters() for layer in self.layers]}
        for name in ("embed", "norm", "head"):
            module = getattr(self, name)
            if module is not None:
                parts[name] = module.parameters()
        return parts

    def _activation_dtype(self) -> mx.Dtype:
        # The residual stream keeps the dtype of the norms' weights in every supported
        # architecture (quantized layers keep their scales in it too).
        return self.layers[0].input_layernorm.weight.dtype

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def check_input(self, x: mx.array) -> None:
        """Raises:
        InvalidActivation: ``x`` is not what this slice takes.
        """
        if self.is_first:
            # Token ids' range is checked on the host (SliceEngine), before MLX sees them.
            if x.ndim != 2 or x.dtype != mx.int32 or x.shape[1] == 0:
                raise InvalidActivation(
                    f"the first slice takes token ids of shape [batch, tokens] (int32), got "
                    f"{dtype_name(x.dtype)} {tuple(x.shape)}"
                )
        else:
            if (
                x.ndim != 3
                or x.shape[2] != self.hidden_size
                or x.shape[1] == 0
                or x.dtype != self.activation_dtype
            ):
                raise InvalidActivation(
                    f"layers {self.start}..{self.end} take activations of shape "
                    f"[batch, tokens, {self.hidden_size}] in "
                    f"{dtype_name(self.activation_dtype)}, got {dtype_name(x.dtype)} "
                    f"{tuple(x.shape)}"
                )

    def __call__(self, x: mx.array, cache: list[KVCache]) -> mx.array:
        """Run the slice lazily. Returns hidden states ``[B, T, H]``, or on the last
        slice the logits of the last position ``[B, vocab]``."""
        if self.fused_takes(x):
            h: mx.array | np.ndarray = x
            if self.embed is not None and self.is_first:
                rows = embed_on_host(self.embed, x)
                h = self.embed(x) if rows is None else rows
            out = self.run_fused(h, cache)
            if out is not None:
                return out
        h, mask = self.begin(x, cache)
        return self.finish(self.run_layers(h, mask, cache, 0, self.num_layers))

    def fused_takes(self, x: mx.array) -> bool:
        """Whether input ``x`` ``[batch, tokens, ...]`` may take the fused step: a
        decode step, or a prefill chunk of one request of at most ``FUSED_TOKENS``
        (longer ones read the weights fewer times through MLX's float32 tiles)."""
        return self.fused is not None and (
            x.shape[1] == 1 or (x.shape[0] == 1 and x.shape[1] <= FUSED_TOKENS)
        )

    def run_fused(self, h: mx.array | np.ndarray, cache: list[Any]) -> mx.array | None:
        """``finish(run_layers(...))`` of hidden states ``h`` by the fused step, or
        None when it does not take these caches."""
        assert self.fused is not None
        out = self.fused(h, cache)
        if out is None:
            return None
        return self._finish_fused(out.reshape(h.shape[0], h.shape[1], -1))

    # The same in parts, so that other work can run between layers (prefill chunks).

    def begin(self, x: mx.array, cache: list[KVCache]) -> tuple[mx.array, Any]:
        """The hidden states entering the first layer, and the attention mask every
        layer of this input uses (taken before any cache moves)."""
        h = self.embed(x) if self.embed is not None and self.is_first else x
        return h, create_attention_mask(h, cache[0])

    def run_layers(
        self, h: mx.array, mask: Any, cache: list[KVCache], first: int, last: int
    ) -> mx.array:
        """Layers ``first`` to ``last - 1`` of this slice (indices within it)."""
        for i in range(first, last):
            h = self.layers[i](h, mask, cache[i])
        return h

    def _finish_fused(self, x: np.ndarray) -> mx.array:
        """``finish`` for the fused step's hidden states ``[batch, tokens, hidden]``
        (host)."""
        if self.is_last:
            assert self.norm is not None
            head = self.head if self.head is not None else self.embed
            logits = output_head(np.ascontiguousarray(x[:, -1, :]), self.norm, head)
            if logits is not None:
                return logits
        return self.finish(mx.array(x))

    def finish(self, h: mx.array) -> mx.array:
        """What the slice returns for the last layer's hidden states ``h``."""
        if not self.is_last:
            return h
        assert self.norm is not None and (self.head is not None or self.embed is not None)
        h = self.norm(h[:, -1:, :])
        logits = self.head(h) if self.head is not None else self.embed.as_linear(h)  # type: ignore[union-attr]
        return logits[:, -1, :]


def _owned_prefixes(start: int, end: int, first: bool, last: bool, tied: bool) -> tuple[str, ...]:
    prefixes = [f"model.layers.{i}." for i in range(start, end)]
    if last and tied:  # the output head: read whole every token (a first slice looks up rows)
        prefixes.append("model.embed_tokens.")
    if last:
        prefixes.append("model.norm.")
        if not tied:
            prefixes.append("lm_head.")
    return tuple(prefixes)


def _read_tensors(model: ModelDir, names: list[str]) -> dict[str, mx.array]:
    if model.is_gguf:
        from dnet.runtime.gguf_tensors import read_tensors

        return read_tensors(model, names)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(model.tensors[name].file, []).append(name)
    weights: dict[str, mx.array] = {}
    for file, file_names in by_file.items():
        # mx.load maps the file lazily: tensors not taken here are never read.
        try:
            arrays: dict[str, mx.array] = mx.load(str(file))  # type: ignore[assignment]
        except (RuntimeError, ValueError, OSError) as exc:
            raise InvalidModel(f"cannot read the weights in {file.name}: {exc}") from None
        weights.update({n: arrays[n] for n in file_names})
    return weights


def _quantize(full: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    quantization = config.get("quantization")
    if quantization is None:
        return

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        full,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _validate(expected: dict[str, mx.array], weights: dict[str, mx.array], where: str) -> None:
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise MissingTensor(f"{where} lacks {len(missing)} tensor(s): {shown}")
    extra = sorted(weights.keys() - expected.keys())
    if extra:
        shown = ", ".join(extra[:5])
        raise InvalidModel(f"{where} has {len(extra)} tensor(s) the model does not use: {shown}")
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise TensorShapeMismatch(
                f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )


def _smoke_test(owned: LayerSlice) -> None:
    # One position through a throwaway cache: a slice this device cannot run fails
    # here, at load, and not on a user's first request.
    def zeros(rows: int) -> mx.array:
        if owned.is_first:
            return mx.zeros((rows, 1), dtype=mx.int32)
        return mx.zeros((rows, 1, owned.hidden_size), dtype=owned.activation_dtype)

    try:
        mx.eval(owned(zeros(1), owned.make_cache()))
    except (RuntimeError, ValueError) as exc:
        raise BackendUnsupported(
            f"{owned.model.name} layers [{owned.start}, {owned.end}) cannot run on "
            f"{mx.default_device()}: {exc}"
        ) from exc
    # Two rows of different lengths through mlx_lm's batch caches: an architecture
    # whose attention cannot take per-row offsets runs its steps row by row instead.
    try:
        cache = [BatchKVCache([1, 0]) for _ in owned.layers]
        mx.eval(owned(mx.concatenate([zeros(2)] * 2, axis=1), cache))
        mx.eval(owned(zeros(2), cache))
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        owned.batching = False
        log.info("%s runs decode steps one request at a time: %s", owned.model.name, exc)


FUSED_TOKENS = 32  # prefill chunks up to this many tokens take the fused step

COMPUTE_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def load_slice(
    model: ModelDir | str | Path,
    start: int,
    end: int,
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: str | None = None,
) -> LayerSlice:
    """Build layers ``[start, end)`` of ``model``, reading only the tensors they need.
    ``progress(done, total)`` is called as the weights are read, layer by layer.
    ``compute_dtype="float32"`` widens the floating-point weights (and quantization
    scales) at load: CPUs run float32 far faster than bfloat16 or float16.

    Raises:
        ModelNotFound, InvalidModel, MissingTensor, TensorShapeMismatch,
        UnsupportedArchitecture, LayerRangeError.
    """
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise InvalidModel(
            f"compute dtype {compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}"
        )
    if not isinstance(model, ModelDir):
        model = open_model_dir(model)
    n = model.num_layers
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
        raise LayerRangeError(f"layer range [{start}, {end}) is not inside [0, {n}) or is empty")
    pieces = _owned_modules(model, start, end, compute_dtype)
    layers = [pieces[f"model.layers.{i}."] for i in range(start, end)]
    embed, head = pieces.get("model.embed_tokens."), pieces.get("lm_head.")
    if start == 0 and embed is None:
        dtype = COMPUTE_DTYPES[compute_dtype] if compute_dtype is not None else None
        embed = FileEmbedding(model, dtype)
    if mx.default_device() == mx.cpu and not skinny_products_tuned():
        embed, head = columns_layouts(layers, embed, head, last=end == n)
    owned = LayerSlice(
        model, start, end, embed=embed, layers=layers, norm=pieces.get("model.norm."), head=head
    )
    del pieces
    _read(owned, progress)
    log.info(
        "loaded %s layers [%d, %d) of %d: %.1f MiB",
        model.name,
        start,
        end,
        n,
        owned.weight_bytes / 2**20,
    )
    return owned


def _owned_modules(
    model: ModelDir, start: int, end: int, compute_dtype: str | None
) -> dict[str, nn.Module]:
    """The modules of layers ``[start, end)`` (and the embeddings, norm and head
    the slice's place needs), by weight prefix, with their weights loaded."""
    config = model.config
    model_cls, args_cls = model_classes(config)
    try:
        full = model_cls(args_cls.from_dict(config))
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise InvalidModel(f"config.json of {model.path} does not build a model: {exc}") from exc
    # Parameters of the built model are lazy random arrays: never evaluated, never
    # allocated. Only the owned modules are kept.
    tied = "lm_head" not in full
    first, last = start == 0, end == model.num_layers
    prefixes = _owned_prefixes(start, end, first, last, tied)
    weights = _read_tensors(model, [k for k in model.tensors if k.startswith(prefixes)])
    weights = full.sanitize(weights)
    if tied:
        weights.pop("lm_head.weight", None)
    _quantize(full, config, weights)
    inner = full.model
    pieces: dict[str, nn.Module] = {
        f"model.layers.{i}.": inner.layers[i] for i in range(start, end)
    }
    if last and tied:
        pieces["model.embed_tokens."] = inner.embed_tokens
    if last:
        pieces["model.norm."] = inner.norm
        if not tied:
            pieces["lm_head."] = full.lm_head
    expected = {
        prefix + name: p
        for prefix, module in pieces.items()
        for name, p in tree_flatten(module.parameters())
    }
    _validate(expected, weights, f"{model.path.name} layers [{start}, {end})")
    for prefix, module in pieces.items():
        module.load_weights(
            [(k[len(prefix) :], v) for k, v in weights.items() if k.startswith(prefix)],
            strict=False,
        )
        module.eval()
        if compute_dtype is not None:
            # Only floating-point arrays change; packed quantized weights stay.
            module.set_dtype(COMPUTE_DTYPES[compute_dtype])
    return pieces


def _read(owned: LayerSlice, progress: Callable[[int, int], None] | None) -> None:
    """Read the weights layer by layer (the same arrays as one eval), reporting as
    it goes; then check the slice runs."""
    parts = [*owned.layers, *(m for m in (owned.embed, owned.norm, owned.head) if m is not None)]
    for done, part in enumerate(parts, 1):
        mx.eval(part.parameters())
        if progress is not None:
            progress(done, len(parts))
    if mx.default_device() == mx.cpu:  # before the smoke test, which then runs it
        routed = sum(qgemv.route(m) for m in parts)
        if routed:
            log.info("%d quantized products go to dnet's kernel", routed)
            owned.fused = FusedDecode.plan(owned.layers)
    _smoke_test(owned)
    release_memory()  # the reading's temporaries
