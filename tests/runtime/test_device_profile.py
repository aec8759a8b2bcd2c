"""Device rates are measured once per hardware and software, then cached."""

from __future__ import annotations

import json
import time

from dnet.runtime.device_profile import CACHE_FILE, cached_rates


def test_rates_are_measured_once_then_cached(tmp_path):
    first, was_cached = cached_rates(tmp_path, "float32", 256)
    assert not was_cached
    assert first.bandwidth_bytes_s > 1e7 and first.flops_s > 1e7
    assert first.disk_read_bytes_s > 1e6
    assert 0 < first.layer_overhead_s < 0.1
    assert not list(tmp_path.glob(".dnet-disk-probe-*"))  # the probe file is gone
    start = time.perf_counter()
    again, was_cached = cached_rates(tmp_path, "float32", 256)
    assert was_cached and again == first
    assert time.perf_counter() - start < 0.5
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    assert len(stored) == 1 and next(iter(stored)).endswith("|float32|256|columns")
