"""Settings: sizes, and the peer's memory budget from flags or the environment."""

from __future__ import annotations

import argparse

import pytest

from dnet.config import PeerSettings, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("512MiB", 512 << 20),
        ("512M", 512 << 20),
        ("2GiB", 2 << 30),
        ("1.5G", 3 << 29),
        ("800MB", 800_000_000),
        ("64 kib", 64 << 10),
        ("3KB", 3000),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5M", "0", "1.5.2G", "12 parsecs"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_the_peer_budget_comes_from_the_flag_then_the_environment():
    flag = argparse.Namespace(max_memory="256MiB")
    assert PeerSettings.from_args(flag, {"DNET_MAX_MEMORY": "1G"}).max_memory == 256 << 20
    assert (
        PeerSettings.from_args(argparse.Namespace(), {"DNET_MAX_MEMORY": "1G"}).max_memory
        == 1 << 30
    )
    assert PeerSettings.from_args(argparse.Namespace(), {}).max_memory is None
