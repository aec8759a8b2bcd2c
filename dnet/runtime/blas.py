"""Load a fast BLAS into the process before MLX, on Linux.

The ``mlx-cpu`` wheel bundles a reference BLAS; float32 matmuls run ~30x faster
with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is imported
makes MLX's BLAS calls resolve to it. Call ``preload_openblas`` first thing in a
process's entry point; once mlx is imported it is too late.

Where the system has a C compiler, a small dispatch library
(``native/sgemm_dispatch.c``, built once into the cache directory) is loaded ahead
of OpenBLAS: skinny products (decode steps: at most 8 rows against weights as
stored) go to its kernel, which reads each weight once however many rows there
are; the rest (prefill) goes to OpenBLAS. Measured on the Qwen3-0.6B shape (2 cores,
one process, ``scripts/bench.py`` and the figures in the README): a decode step of
one request took about half the time it takes with OpenBLAS. ``DNET_SKINNY=0``
(``RuntimeSettings.use_skinny_kernel``) turns it off.
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
_DISPATCH_SOURCE = Path(__file__).parent / "native" / "sgemm_dispatch.c"

_loaded: str | None = None
_skinny: str | None = None  # the dispatch library, when skinny products go to it


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def build_dispatch(cache_dir: Path) -> Path | None:
    """The sgemm dispatch library, compiled into ``cache_dir`` on first use (keyed by
    its source and flags); ``None`` without a C compiler or when the build fails.
    Without OpenMP the kernel runs on one thread."""
    return build_native(_DISPATCH_SOURCE, cache_dir, ["-ldl"])


def build_native(
    source_path: Path,
    cache_dir: Path,
    libs: list[str] | None = None,
    also: tuple[Path, ...] = (),
) -> Path | None:
    """A C file of ``native/`` (and the files ``also`` names, linked with it)
    compiled into a shared library in ``cache_dir`` on first use (keyed by the
    sources, the headers beside them and the flags, so processes building at once
    are fine); ``None`` without a C compiler or when the build fails. Tries OpenMP
    first."""
    headers = sorted(source_path.parent.glob("*.h"))
    source = b"".join(p.read_bytes() for p in (source_path, *also, *headers))
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    for flags in (["-O3", "-fopenmp"], ["-O3"]):
        tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:12]
        target = cache_dir / f"{source_path.stem}-{tag}.so"
        if target.exists():
            return target
        if cc is None:
            continue
        tmp = None
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
            os.close(fd)
            subprocess.run(
                [
                    cc,
                    *flags,
                    "-shared",
                    "-fPIC",
                    "-o",
                    tmp,
                    str(source_path),
                    *map(str, also),
                    *(libs or []),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            os.replace(tmp, target)  # atomic
            return target
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("cannot build %s with %s (%s)", source_path.name, flags, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return None


def _load_dispatch(openblas: str, cache_dir: Path | None) -> str | None:
    """Load the dispatch ahead of OpenBLAS; its path, when skinny products now go to it."""
    if cache_dir is None:
        return None
    library = build_dispatch(cache_dir)
    if library is None:
        return None
    os.environ["DNET_BLAS_LARGE"] = openblas
    # OpenMP's idle threads spin before they sleep, and peers on one machine take
    # turns on its cores: with a long spin (3,000,000) two peers on 2 cores decoded
    # at half the speed, the idle peer's threads holding the active peer's cores.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    try:
        # Privately first: its cblas_sgemm must not shadow OpenBLAS's unless it works.
        dispatch = ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL)
        if not dispatch.dnet_sgemm_dispatch_ready():
            log.info("the sgemm dispatch is not used here (no AVX2 and FMA, or no %s)", openblas)
            return None
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # now ahead of OpenBLAS
    except OSError as exc:
        log.warning("could not load %s: %s", library, exc)
        return None
    return str(library)


def preload_openblas(
    thread_timeout: int | None = None, cache_dir: Path | None = None, *, skinny: bool = True
) -> str | None:
    """Load OpenBLAS globally if the system has it; returns its path or ``None``.

    ``thread_timeout`` sets ``OPENBLAS_THREAD_TIMEOUT`` (idle BLAS threads spin for
    2**n cycles before sleeping; OpenBLAS's default, 28, is ~0.1 s). Peers on one
    machine take turns on the cores, and a peer whose threads spin after its slice
    steals them from the next: 20 (~0.4 ms) still bridges the gaps between one
    token's matmuls.

    With ``cache_dir`` (where the dispatch library is built) and ``skinny``, skinny
    products go to the dispatch kernel where it builds and the CPU has AVX2 and FMA.

    A no-op off Linux, when none is installed, or when ``mlx.core`` is already
    imported (then MLX keeps the BLAS it bound to).
    """
    global _loaded, _skinny
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
        _skinny = _load_dispatch(path, cache_dir if skinny else None)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s: %s", path, exc)
        return None
    _loaded = path
    log.info("using OpenBLAS from %s%s", path, ", skinny products by dnet" if _skinny else "")
    return path


def loaded_blas() -> str | None:
    """The BLAS this process loaded, if any (OpenBLAS, plus the skinny kernel)."""
    if _loaded and _skinny:
        return f"{_loaded} + {Path(_skinny).name} (skinny products, rows <= 8)"
    return _loaded


def skinny_calls() -> int:
    """How many products the dispatch kernel has taken in this process (0 without it)."""
    if _skinny is None:
        return 0
    count = ctypes.CDLL(_skinny).dnet_sgemm_skinny_calls
    count.restype = ctypes.c_long
    return int(count())


def skinny_products_tuned() -> bool:
    """Whether skinny products go to the dispatch kernel (which wants weights as
    stored, not transposed)."""
    return _skinny is not None
