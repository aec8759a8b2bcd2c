"""Measure this device the way decoding and prefill use it, and cache the result.

Bandwidth is measured as MLX's matrix-vector product over a matrix larger than the
caches (what a decode step does to every weight); compute as a square matmul (what
prefill does). Results are cached per hardware and software version, so a repeated
prepare does not measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import psutil

from dnet.runtime.arrays import DTYPES
from dnet.runtime.blas import loaded_blas, skinny_products_tuned

log = logging.getLogger(__name__)

CACHE_FILE = "device-profile.json"


@attrs.frozen
class DeviceRates:
    dtype: str
    bandwidth_bytes_s: float
    flops_s: float
    disk_read_bytes_s: float = 0.0
    layer_overhead_s: float = 0.0


def _best_time(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_disk(directory: Path, mib: int = 64) -> float:
    """Read rate of a file written in ``directory``, its pages dropped from the page
    cache first (``posix_fadvise``), so the figure is the disk's, not memory's.
    Returns 0.0 (unknown) when the directory cannot take the probe file."""
    block = os.urandom(1 << 20)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".dnet-disk-probe-", dir=directory)
    except OSError as exc:
        log.warning("cannot measure the disk in %s: %s", directory, exc)
        return 0.0
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(name, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while os.read(fd, 8 << 20):
                pass
            return mib * (1 << 20) / (time.perf_counter() - start)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot measure the disk in %s: %s", directory, exc)
        return 0.0
    finally:
        Path(name).unlink(missing_ok=True)


def measure(
    dtype: str = "float32",
    hidden: int = 4096,
    matvec_mib: int = 64,
    matmul_n: int = 1024,
    bits: int = 0,
) -> DeviceRates:
    """Measure on the calling thread (the compute thread, in a peer).

    Bandwidth: one position through a stack of ``[4 * hidden, hidden]`` weights,
    ``matvec_mib`` in all, in the layout slices use on this device (transposed on
    CPU, see ``dnet.runtime.layout``): the shapes and the working set of a decode step of
    a model that wide. With ``bits``, the weights are quantized (groups of 32) and
    the bandwidth counts their packed bytes, through the product a quantized slice
    uses here (dnet's kernel for float32 activations, else MLX's); the layer
    overhead is a quantized block's.
    """
    if bits:
        rates = _measure_quantized(dtype, hidden, matvec_mib, bits)
        release_memory()
        return rates
    rates = _measure(dtype, hidden, matvec_mib, matmul_n)
    release_memory()  # the test matrices
    return rates


def _measure(dtype: str, hidden: int, matvec_mib: int, matmul_n: int) -> DeviceRates:
    dt = DTYPES[dtype]
    # Matrices as a layer's ([4 * hidden, hidden]), but never more than
    # ``matvec_mib`` in all: a wide model must not make the peer allocate its width.
    rows = max(1, min(4 * hidden, matvec_mib * 2**20 // (hidden * dt.size)))
    per = rows * hidden * dt.size
    ws = [
        mx.random.normal((rows, hidden)).astype(dt)
        for _ in range(max(1, matvec_mib * 2**20 // per))
    ]
    columns = mx.default_device() == mx.cpu and not skinny_products_tuned()
    ws = [mx.contiguous(w.T) if columns else w.T for w in ws]
    x = mx.random.normal((1, hidden)).astype(dt)
    a = mx.random.normal((matmul_n, matmul_n)).astype(dt)
    mx.eval(ws, x, a)
    matvec = _best_time(lambda: mx.eval([x @ w for w in ws]), 5)
    matmul = _best_time(lambda: mx.eval(a @ a), 3)
    return DeviceRates(
        dtype,
        sum(w.nbytes for w in ws) / matvec,
        2 * matmul_n**3 / matmul,
        layer_overhead_s=measure_layer_overhead(),
    )


def _measure_quantized(dtype: str, hidden: int, matvec_mib: int, bits: int) -> DeviceRates:
    from dnet.runtime import qgemv

    dt = DTYPES[dtype]
    if not (qgemv.enabled() and dt == mx.float32):
        # MLX's own product: tens of MB/s with half-precision activations, so a
        # smaller sample (the rate, not the cache's reach, is what it shows).
        matvec_mib = min(matvec_mib, 4)
    rows = max(32, min(4 * hidden, matvec_mib * 2**20 * 8 // bits // hidden) // 32 * 32)
    count = max(1, matvec_mib * 2**20 * 8 // bits // (rows * hidden))
    layers = []
    for _ in range(count):
        layer = nn.QuantizedLinear(hidden, rows, bias=False, group_size=32, bits=bits)
        layer.set_dtype(dt)
        if dt == mx.float32:  # scales as GGUF files and MLX's own checkpoints store them
            layer.scales, layer.biases = (
                layer.scales.astype(mx.float16),
                layer.biases.astype(mx.float16),
            )
        qgemv.route(layer)
        layers.append(layer)
    x = mx.random.normal((1, hidden)).astype(dt)
    mx.eval(x, [m.parameters() for m in layers])
    packed = sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes for m in layers)
    if type(layers[0]) is qgemv.FastQuantizedLinear and dt == mx.float32:
        # As the fused decode step calls it: on host memory, no sync with MLX.
        matrices = [qgemv._packed_for(m) for m in layers]
        xs = np.array(x)
        matvec = _best_time(lambda: [p.on_host(xs) for p in matrices], 5)
    else:
        matvec = _best_time(lambda: mx.eval([m(x) for m in layers]), 5)
    flops = 2 * rows * hidden * count / matvec  # a decode step's rate, as good as any
    return DeviceRates(
        dtype, packed / matvec, flops, layer_overhead_s=measure_layer_overhead(bits=bits)
    )


def measure_layer_overhead(layers: int = 8, bits: int = 0) -> float:
    """Seconds a decoder layer costs beyond reading its weights: a stack of tiny
    mlx_lm blocks (negligible bytes), one position, evaluated once, per layer;
    quantized to ``bits`` (and routed as a quantized slice's) if given."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    args = llama.ModelArgs.from_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=32,
        )
    )
    block = llama.TransformerBlock(args)
    fused = None
    if bits:
        from dnet.runtime import qgemv
        from dnet.runtime.fused import FusedDecode

        nn.quantize(block, group_size=32, bits=bits)
        qgemv.route(block)
        fused = FusedDecode.plan([block] * layers)  # what a quantized slice's steps run
    mx.eval(block.parameters())
    x = mx.random.normal((1, 1, 64))
    caches = [KVCache() for _ in range(layers)]

    def step() -> None:
        if fused is not None:
            mx.eval(fused(x, caches))
            for c in caches:
                c.trim(1)
            return
        h = x
        for cache in [KVCache() for _ in range(layers)]:
            h = block(h, None, cache)
        mx.eval(h)

    return _best_time(step, 10) / layers


def _cache_key(dtype: str, hidden: int, bits: int = 0) -> str:
    uname = platform.uname()
    return "|".join(
        [
            uname.machine,
            uname.processor or "",
            str(os.cpu_count()),
            version("mlx"),
            str(mx.default_device()),
            loaded_blas() or "bundled",
            dtype,
            str(hidden),
            "columns",  # the weight layout measured (bumped when it changes)
            # the loop measured: re-measured when the kernel gains one (v2: int8 loop)
            *([f"q{bits}", _quant_loop()] if bits else []),
        ]
    )


def _quant_loop() -> str:
    from dnet.runtime import qgemv

    return f"fused-{qgemv.vectorized()}-v2" if qgemv.enabled() else "mlx"


def cached_rates(
    state_dir: Path, dtype: str, hidden: int = 4096, bits: int = 0
) -> tuple[DeviceRates, bool]:
    """The rates for ``dtype`` (weights quantized to ``bits``, if given), measured once
    per hardware/software combination; returns whether they came from the cache."""
    path = state_dir / CACHE_FILE
    key = _cache_key(dtype, hidden, bits)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        entry = cache[key]
        return DeviceRates(
            dtype,
            float(entry["bandwidth_bytes_s"]),
            float(entry["flops_s"]),
            float(entry.get("disk_read_bytes_s", 0.0)),
            float(entry.get("layer_overhead_s", 0.0)),
        ), True
    rates = attrs.evolve(
        measure(dtype, hidden, bits=bits), disk_read_bytes_s=measure_disk(state_dir)
    )
    cache[key] = attrs.asdict(rates)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2) + "\n")
    except OSError as exc:
        log.warning("cannot cache the device profile in %s: %s", path, exc)
    return rates, False


def release_memory() -> None:
    """Hand freed memory back to the system: MLX's cache of freed buffers, and the
    pages glibc keeps in its heaps (a load's temporaries would otherwise stay in the
    process's footprint). Call on the compute thread after a load or unload."""
    mx.clear_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def return_large_frees() -> None:
    """Have glibc hand every allocation of 128 KiB or more straight back to the
    system when freed. By default it raises that threshold to the largest block
    freed so far, so after a load's big temporaries (a 30 MB embedding) the
    compute thread's arena kept ~15 MB of scattered free pages that even
    ``malloc_trim`` did not return. MLX reuses its own buffers, so steps do not
    pay for this. Call once, early, in a peer."""
    global _RETURNING
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 128 << 10)
        _RETURNING = True


@contextmanager
def large_blocks_reused() -> Iterator[None]:
    """While weights stream in, let glibc reuse freed large blocks: each 4 MiB piece
    passes through several buffers, and mapping fresh zeroed pages for every one
    (``return_large_frees``) was a third of a fetch's CPU time in page faults.
    Afterwards, large frees go back to the system again and the heap is trimmed."""
    if _LIBC is None or not _RETURNING:
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
    try:
        yield
    finally:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 128 << 10)
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()
_RETURNING = False


def memory() -> tuple[int, int]:
    mem = psutil.virtual_memory()
    return mem.total, mem.available
