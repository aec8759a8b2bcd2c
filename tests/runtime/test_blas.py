"""The BLAS preload: OpenBLAS, and BLIS for skinny products through the dispatch
library, checked in fresh processes (a process binds its BLAS once)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dnet.runtime.blas import _BLIS, _first, find_openblas

PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dnet.runtime.blas import loaded_blas, preload_openblas, skinny_products_tuned
    preload_openblas(cache_dir=Path(sys.argv[1]))
    import mlx.core as mx
    import numpy as np
    rng = np.random.default_rng(0)
    errors = []
    for m, n, k in ((1, 3072, 1024), (4, 1024, 3072), (16, 512, 256), (17, 512, 256),
                    (200, 700, 300)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)
        for got in (np.array(mx.array(a) @ mx.array(b).T),
                    np.array(mx.array(a) @ mx.contiguous(mx.array(b).T))):
            ref = a.astype(np.float64) @ b.T.astype(np.float64)
            errors.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
    print(json.dumps({"blas": loaded_blas(), "tuned": skinny_products_tuned(),
                      "error": max(errors)}))
    """
)


def _probe(tmp_path, **env):
    import os

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
    result = _probe(tmp_path)
    assert result["blas"] == find_openblas() and not result["tuned"]
    assert result["error"] < 1e-5


@pytest.mark.skipif(
    find_openblas() is None or _first(_BLIS) is None, reason="needs OpenBLAS and BLIS"
)
def test_skinny_products_go_to_blis_and_stay_right(tmp_path):
    result = _probe(tmp_path, DNET_BLIS="1")
    if not result["tuned"]:
        pytest.skip("no C compiler to build the dispatch library")
    assert "blis" in result["blas"]
    assert result["error"] < 1e-5
    assert list((tmp_path / "native").glob("sgemm_dispatch-*.so"))
