"""Load a fast BLAS into the process before MLX, on Linux.

The ``mlx-cpu`` wheel bundles a reference BLAS; float32 matmuls run ~30x faster
with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is imported
makes MLX's BLAS calls resolve to it. Call ``preload_openblas`` first thing in a
process's entry point; once mlx is imported it is too late.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
)
_FORTRAN = ("/usr/lib/*-linux-gnu/libgfortran.so.5", "/usr/lib64/libgfortran.so.5")

_loaded: str | None = None


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def preload_openblas(thread_timeout: int | None = None) -> str | None:
    """Load OpenBLAS globally if the system has it; returns its path or ``None``.

    ``thread_timeout`` sets ``OPENBLAS_THREAD_TIMEOUT`` (idle BLAS threads spin for
    2**n cycles before sleeping; OpenBLAS's default, 28, is ~0.1 s). Peers on one
    machine take turns on the cores, and a peer whose threads spin after its slice
    steals them from the next: 20 (~0.4 ms) still bridges the gaps between one
    token's matmuls.

    A no-op off Linux, when none is installed, or when ``mlx.core`` is already
    imported (then MLX keeps the BLAS it bound to).
    """
    global _loaded
    if _loaded or not sys.platform.startswith("linux"):
        return _loaded
    if "mlx.core" in sys.modules:
        log.warning("mlx is already imported; OpenBLAS would not take effect")
        return None
    path = find_openblas()
    if path is None:
        log.info("no OpenBLAS found; MLX uses its bundled reference BLAS (slow float32)")
        return None
    if thread_timeout is not None:
        # Read by OpenBLAS when it loads, just below.
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(thread_timeout)
    try:
        for pattern in _FORTRAN:
            for lib in sorted(glob.glob(pattern))[:1]:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s: %s", path, exc)
        return None
    _loaded = path
    log.info("using OpenBLAS from %s", path)
    return path


def loaded_blas() -> str | None:
    """The OpenBLAS this process loaded, if any."""
    return _loaded
