"""Converting between MLX arrays and ``HostTensor`` bytes, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dnet.tensor import HostTensor

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int32": mx.int32,
}
NAMES: dict[mx.Dtype, str] = {v: k for k, v in DTYPES.items()}
# numpy has no bfloat16: its bits travel as uint16.
_NUMPY: dict[str, type] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int32": np.int32,
}


def dtype_name(dtype: mx.Dtype) -> str:
    return NAMES.get(dtype, str(dtype).removeprefix("mlx.core."))


def to_host(array: mx.array) -> HostTensor:
    """Evaluate ``array`` and copy its bytes out (little-endian, C order)."""
    name = dtype_name(array.dtype)
    raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    data = np.ascontiguousarray(np.array(raw, copy=False)).astype(
        np.dtype(_NUMPY[name]).newbyteorder("<"), copy=False
    )
    shape: tuple[int, ...] = tuple(array.shape)
    return HostTensor(name, shape, data.tobytes())


def from_host(tensor: HostTensor) -> mx.array:
    """Build an MLX array with exactly the bytes of ``tensor``."""
    np_dtype = np.dtype(_NUMPY[tensor.dtype]).newbyteorder("<")
    flat = np.frombuffer(tensor.data, dtype=np_dtype).reshape(tensor.shape)
    array = mx.array(flat)
    return array.view(mx.bfloat16) if tensor.dtype == "bfloat16" else array
