"""Load a fast BLAS into the process before MLX, on Linux.

The ``mlx-cpu`` wheel bundles a reference BLAS; float32 matmuls run ~30x faster
with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is imported
makes MLX's BLAS calls resolve to it. Call ``preload_openblas`` first thing in a
process's entry point; once mlx is imported it is too late.

With ``DNET_BLIS=1``, where the system also has BLIS and a C compiler, a small
dispatch library (``native/sgemm_dispatch.c``, built once into the cache directory)
is loaded ahead of OpenBLAS and routes skinny products (decode steps: at most 16
rows) to BLIS and the rest (prefill) to OpenBLAS. Measured on the Qwen3-0.6B shape
(2 cores, one process): a decode step of 1 request took 262-268 ms against 306 ms
with OpenBLAS and transposed weights, one of 4 requests 418-429 against 546 ms;
prefill was unchanged. It is off by default: in rings of several processes on one
machine its gain shrank and a running batch waited longer behind a prefill chunk
(see the README).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
)
_FORTRAN = ("/usr/lib/*-linux-gnu/libgfortran.so.5", "/usr/lib64/libgfortran.so.5")
_BLIS = (
    "/usr/lib/*-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/*-linux-gnu/libblis.so.4",
    "/usr/lib64/libblis.so.4",
)
_DISPATCH_SOURCE = Path(__file__).parent / "native" / "sgemm_dispatch.c"

_loaded: str | None = None
_small: str | None = None  # BLIS, when skinny products go to it


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _first(patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def build_dispatch(cache_dir: Path) -> Path | None:
    """The sgemm dispatch library, compiled into ``cache_dir`` on first use (keyed by
    its source); ``None`` without a C compiler or when the build fails."""
    source = _DISPATCH_SOURCE.read_bytes()
    target = cache_dir / f"sgemm_dispatch-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_DISPATCH_SOURCE), "-ldl"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.replace(tmp, target)  # atomic: processes building at once are fine
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("cannot build the sgemm dispatch (%s); OpenBLAS alone", exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    return target


def _load_dispatch(openblas: str, cache_dir: Path | None) -> str | None:
    """Load the dispatch ahead of OpenBLAS; returns the BLIS path it routes to."""
    blis = _first(_BLIS)
    if blis is None or cache_dir is None or os.environ.get("DNET_BLIS", "0") != "1":
        return None
    library = build_dispatch(cache_dir)
    if library is None:
        return None
    os.environ["DNET_BLAS_SMALL"] = blis
    os.environ["DNET_BLAS_LARGE"] = openblas
    os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        dispatch = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s: %s", library, exc)
        return None
    if not dispatch.dnet_sgemm_dispatch_ready():
        log.warning("the sgemm dispatch could not open %s and %s", blis, openblas)
        return None
    return blis


def preload_openblas(
    thread_timeout: int | None = None, cache_dir: Path | None = None
) -> str | None:
    """Load OpenBLAS globally if the system has it; returns its path or ``None``.

    ``thread_timeout`` sets ``OPENBLAS_THREAD_TIMEOUT`` (idle BLAS threads spin for
    2**n cycles before sleeping; OpenBLAS's default, 28, is ~0.1 s). Peers on one
    machine take turns on the cores, and a peer whose threads spin after its slice
    steals them from the next: 20 (~0.4 ms) still bridges the gaps between one
    token's matmuls.

    With ``cache_dir`` (where the dispatch library is built) and ``DNET_BLIS=1``,
    skinny products go to BLIS when the system has it.

    A no-op off Linux, when none is installed, or when ``mlx.core`` is already
    imported (then MLX keeps the BLAS it bound to).
    """
    global _loaded, _small
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
        # Ahead of OpenBLAS in the global scope, so MLX's cblas_sgemm lands in it.
        _small = _load_dispatch(path, cache_dir)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s: %s", path, exc)
        return None
    _loaded = path
    log.info("using OpenBLAS from %s%s", path, f", BLIS for decode from {_small}" if _small else "")
    return path


def loaded_blas() -> str | None:
    """The BLAS this process loaded, if any (OpenBLAS, plus BLIS for skinny products)."""
    if _loaded and _small:
        return f"{_loaded} + {_small} (rows <= 16)"
    return _loaded


def skinny_products_tuned() -> bool:
    """Whether skinny products go to BLIS (whose kernels want weights as stored)."""
    return _small is not None
