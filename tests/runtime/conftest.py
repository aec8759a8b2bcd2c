"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest

from dnet.runtime import qgemv


@pytest.fixture(scope="module")
def quant_kernel(tmp_path_factory):
    """dnet's quantized kernel built and switched on for a module's tests, off
    after them; the directory it was built in (to switch it on again)."""
    where = tmp_path_factory.mktemp("native")
    if not qgemv.configure(where):
        pytest.skip("no C compiler")
    yield where
    qgemv.configure(None)
