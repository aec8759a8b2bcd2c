"""Settings: sizes, and the peer's memory budget from flags or the environment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dnet.config import (
    CONSOLE,
    GENERATE,
    OPTIONS,
    PEER,
    ConsoleSettings,
    PeerSettings,
    RuntimeSettings,
    SettingsError,
    build_parser,
    parse_size,
)


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


def peer_args(*argv: str) -> argparse.Namespace:
    return build_parser(PEER, "").parse_args(list(argv))


def test_the_peer_budget_comes_from_the_flag_then_the_environment():
    flag = peer_args("--max-memory", "256MiB")
    assert PeerSettings.from_args(flag, {"DNET_MAX_MEMORY": "1G"}).max_memory == 256 << 20
    assert PeerSettings.from_args(peer_args(), {"DNET_MAX_MEMORY": "1G"}).max_memory == 1 << 30
    assert PeerSettings.from_args(peer_args(), {}).max_memory is None


def test_a_given_zero_beats_the_environment_and_bad_values_are_named():
    env = {"DNET_PORT": "9000", "DNET_MDNS": "0"}
    assert PeerSettings.from_args(peer_args("--port", "0"), env).port == 0
    assert PeerSettings.from_args(peer_args(), env).port == 9000
    assert PeerSettings.from_args(peer_args(), env).mdns is False
    assert PeerSettings.from_args(peer_args(), {}).mdns is True
    assert PeerSettings.from_args(peer_args("--no-mdns"), {"DNET_MDNS": "1"}).mdns is False
    console = build_parser(CONSOLE, "")
    with pytest.raises(SystemExit):  # argparse refuses it: never "0 means the default"
        console.parse_args(["--max-concurrent", "0"])
    with pytest.raises(SettingsError, match="DNET_MAX_CONCURRENT"):
        ConsoleSettings.from_args(console.parse_args([]), {"DNET_MAX_CONCURRENT": "0"})
    with pytest.raises(SettingsError, match="DNET_MAX_MEMORY"):
        PeerSettings.from_args(peer_args(), {"DNET_MAX_MEMORY": "lots"})


def test_every_option_is_in_its_commands_help_with_its_variable():
    for command in (PEER, CONSOLE, GENERATE):
        text = " ".join(build_parser(command, "").format_help().split())
        for option in OPTIONS:
            if command in option.commands and option.flag:
                assert option.flag in text, (command, option.name)
                if option.env:
                    assert option.env in text, (command, option.name)


def test_defaults_follow_the_environment_paths():
    env = {"XDG_STATE_HOME": "/s", "XDG_CACHE_HOME": "/c"}
    settings = PeerSettings.from_args(peer_args(), env)
    assert settings.state_dir == Path("/s/dnet") and settings.cache_dir == Path("/c/dnet")
    assert RuntimeSettings.from_env({"DNET_SKINNY": "0"}).use_skinny_kernel is False
    assert RuntimeSettings.from_env({}).use_skinny_kernel is True


def test_the_readme_lists_every_variable():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Environment", 1)[1].split("\n## ", 1)[0]
    missing = [o.env for o in OPTIONS if o.env and f"`{o.env}" not in section]
    assert missing == []


def test_a_secret_file_others_can_read_is_used_with_a_warning(tmp_path, caplog):
    from dnet.identity import load_cluster_key, read_secret_file

    key = tmp_path / "cluster.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    with caplog.at_level("WARNING", "dnet.identity"):
        assert load_cluster_key(tmp_path, key)[0] == bytes.fromhex("ab" * 32)
    assert "chmod 600" in caplog.text
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level("WARNING", "dnet.identity"):
        assert read_secret_file(key, "the cluster key file") == "ab" * 32
    assert caplog.text == ""
