"""The BLAS preload: OpenBLAS, and the dispatch library's kernel for skinny
products, checked in fresh processes (a process binds its BLAS once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dnet.runtime.blas import find_openblas

PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dnet.runtime.blas import (loaded_blas, preload_openblas, skinny_calls,
                                   skinny_products_tuned)
    from dnet.config import RuntimeSettings
    skinny = RuntimeSettings.from_env().use_skinny_kernel
    preload_openblas(cache_dir=Path(sys.argv[1]), skinny=skinny)
    import mlx.core as mx
    import numpy as np
    rng = np.random.default_rng(0)
    errors = []
    # Odd sizes too: tails of the kernel's 8-wide loads and of its row groups.
    for m, n, k in ((1, 3072, 1024), (4, 1024, 3072), (8, 517, 203), (3, 50, 7),
                    (5, 1000, 300), (6, 61, 1024), (7, 3001, 17), (2, 5, 9),
                    (9, 512, 256), (16, 512, 256), (200, 700, 300)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)
        bias = rng.standard_normal((n,), dtype=np.float32)
        ref = a.astype(np.float64) @ b.T.astype(np.float64)
        for got, want in (
            (mx.array(a) @ mx.array(b).T, ref),
            (mx.array(a) @ mx.contiguous(mx.array(b).T), ref),
            (mx.addmm(mx.array(bias), mx.array(a), mx.array(b).T), ref + bias),
        ):
            got = np.array(got)
            errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    # A row's product is the same bits alone as among up to 8 rows.
    w = mx.array(rng.standard_normal((3000, 1024), dtype=np.float32))
    rows = mx.array(rng.standard_normal((8, 1024), dtype=np.float32))
    alone = [np.array(rows[i : i + 1] @ w.T) for i in range(8)]
    invariant = all(
        np.array_equal(np.array(rows[:m] @ w.T)[i], alone[i][0])
        for m in range(1, 9) for i in range(m)
    )
    # The same against a matrix as stored (attention's values): 200 columns take
    # both kernels' widths and the scalar tail.
    v = mx.array(rng.standard_normal((1024, 200), dtype=np.float32))
    alone = [np.array(rows[i : i + 1] @ v) for i in range(8)]
    invariant = invariant and all(
        np.array_equal(np.array(rows[:m] @ v)[i], alone[i][0])
        for m in range(1, 9) for i in range(m)
    )
    print(json.dumps({"blas": loaded_blas(), "tuned": skinny_products_tuned(),
                      "error": max(errors), "batch_invariant": invariant,
                      "skinny_calls": skinny_calls()}))
    """
)


def _probe(tmp_path, **env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "native")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(find_openblas() is None, reason="no OpenBLAS on this system")
def test_openblas_alone_computes_right(tmp_path):
    result = _probe(tmp_path, DNET_SKINNY="0")
    assert result["blas"] == find_openblas() and not result["tuned"]
    assert result["error"] < 1e-5 and result["skinny_calls"] == 0


@pytest.mark.skipif(find_openblas() is None, reason="no OpenBLAS on this system")
def test_skinny_products_take_the_kernel_and_stay_right(tmp_path):
    result = _probe(tmp_path)
    if not result["tuned"]:
        pytest.skip("no C compiler, or no AVX2 and FMA, for the dispatch library")
    assert "sgemm_dispatch" in result["blas"]
    assert result["error"] < 1e-5
    assert result["batch_invariant"]
    # Exactly the products of at most 8 rows went to the kernels: 8 shapes x 3
    # (plain, with a bias, against a stored transpose), then for each of the two
    # invariance checks 8 rows alone and 1+2+...+8.
    assert result["skinny_calls"] == 8 * 3 + 2 * (8 + 36)
    assert list((tmp_path / "native").glob("sgemm_dispatch-*.so"))
