"""Per-source connection caps and a refusal log that cannot be flooded."""

from __future__ import annotations

import logging

import pytest

from dnet.transport.refusals import RateLimitedLog, SourceCaps, TooManyConnections


def test_a_source_holds_at_most_its_cap_and_gets_them_back():
    caps = SourceCaps(limit=2)
    with caps.hold("10.0.0.1"), caps.hold("10.0.0.1"):
        with pytest.raises(TooManyConnections), caps.hold("10.0.0.1"):
            pass
        with caps.hold("10.0.0.2"):  # another source is not affected
            pass
    with caps.hold("10.0.0.1"), caps.hold("10.0.0.1"):  # released on exit
        pass


def test_a_flood_of_refusals_logs_a_burst_then_a_count(caplog):
    now = [0.0]
    log = RateLimitedLog(
        logging.getLogger("test.refusals"), burst=3, window_s=60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, "test.refusals"):
        for i in range(2600):
            now[0] = i * 0.01
            log(logging.WARNING, "refused %d", i)
        assert len(caplog.records) == 3
        now[0] = 100.0
        log(logging.WARNING, "refused %d", 9999)
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == "refused 9999 (2597 more like these were not logged)"
