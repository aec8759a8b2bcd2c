"""A tensor on the host, as raw little-endian bytes: what crosses a slice boundary.

The runtime turns MLX arrays into ``HostTensor`` and back; the protocol puts the bytes
in a frame's payload and ``dtype``/``shape`` in its header. No mlx here.
"""

from __future__ import annotations

import math

import attrs

from dnet.errors import InvalidActivation

ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
}


def _to_shape(value: object) -> tuple[int, ...]:
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidActivation(f"shape must be a sequence of integers, got {value!r}") from None


def _check_shape(instance: HostTensor, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    if not all(isinstance(d, int) and d >= 0 for d in value):
        raise InvalidActivation(f"shape must be non-negative integers, got {value!r}")


@attrs.frozen
class HostTensor:
    """Raw little-endian bytes with a dtype name and a shape.

    Raises:
        InvalidActivation: unknown dtype, bad shape, or a byte count that does not
            match ``shape`` and ``dtype``.
    """

    dtype: str
    shape: tuple[int, ...] = attrs.field(converter=_to_shape, validator=_check_shape)
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")

    def __attrs_post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise InvalidActivation(
                f"unsupported dtype {self.dtype!r}; expected one of {sorted(ITEMSIZE)}"
            )
        expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise InvalidActivation(
                f"{len(self.data)} bytes for a {self.dtype} tensor of shape {self.shape}; "
                f"expected {expected}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)
