"""Screenshots of the main screens, fed by a fixed status source, so that layout
regressions show up (update with ``pytest tests/tui --snapshot-update``)."""

from __future__ import annotations

import copy

from textual.widgets import Input

from tui.app import DnetConsole
from tui.source import FixedStatusSource, Snapshot

GIB = 1 << 30
IDS = ["dnalpha" + "a" * 49, "dnbravo" + "b" * 49, "dncharlie" + "c" * 47]


def _device(i: int, name: str, layers, used_gib: float, total_gib: float, rtt: float):
    return {
        "peer_id": IDS[i],
        "name": name,
        "address": f"ws://192.0.2.{10 + i}:9001/dnet/2",
        "healthy": True,
        "error": None,
        "status": {
            "memory_total": int(total_gib * GIB),
            "memory_available": int((total_gib - used_gib) * GIB),
            "layers": layers,
            "active_requests": 2 if layers else 0,
            "decode_step_s": 0.0213 if layers else 0.0,
        },
        "profile": {"flops_s": 2.1e12 / (i + 1), "bandwidth_bytes_s": 1.0e11 / (i + 1)},
        "rtt_ms": rtt,
        "in_ring": bool(layers),
    }


def _assignment(i: int, name: str, start: int, end: int, stage: float):
    return {
        "peer_id": IDS[i],
        "name": name,
        "address": f"ws://192.0.2.{10 + i}:9001/dnet/2",
        "start": start,
        "end": end,
        "next_peer_id": None,
        "predicted_stage_s": stage,
        "predicted_memory_bytes": 0,
        "predicted_load_s": None,
    }


LOADED = Snapshot(
    url="http://127.0.0.1:8080",
    status={
        "head": {
            "state": "loaded",
            "model": "mlx-community/Qwen3-8B-4bit",
            "active_requests": 2,
            "max_concurrent": 64,
            "requests_served": 41,
            "tokens_generated": 5120,
            "tokens_per_s": 23.5,
            "last_ttft_s": 0.412,
            "load_progress": {},
        },
        "model": {
            "id": "mlx-community/Qwen3-8B-4bit",
            "path": "/models/Qwen3-8B-4bit",
            "architecture": "qwen3",
            "dtype": "bfloat16",
            "quantization": {"group_size": 64, "bits": 4},
            "num_layers": 36,
            "context": 8192,
            "created": 0,
        },
        "topology": {
            "model": "/models/Qwen3-8B-4bit",
            "num_layers": 36,
            "objective": "latency",
            "predicted_tokens_per_s": 24.8,
            "predicted_ttft_s": 0.38,
            "assignments": [
                _assignment(0, "studio", 0, 24, 0.0201),
                _assignment(1, "macbook-air", 24, 36, 0.0188),
            ],
            "excluded": [[IDS[2], "the plan predicts faster without it (latency)"]],
        },
    },
    devices=(
        _device(0, "studio", [0, 24], 21.5, 64, 0.31),
        _device(1, "macbook-air", [24, 36], 9.8, 16, 1.42),
        _device(2, "old-laptop", None, 3.1, 8, 2.95),
    ),
    rates=tuple(float(x) for x in [0, 3, 9, 14, 18, 21, 22, 24, 23, 25, 22, 24, 23.5]),
)

LOADING = copy.deepcopy(LOADED)
LOADING.status["head"].update(
    state="loading", tokens_per_s=0.0, active_requests=0, pending_model="/models/Qwen3-8B-4bit"
)
LOADING.status["head"]["load_progress"] = {
    IDS[0]: {"phase": "reading", "done": 14, "total": 24, "source": "", "rate": 0.0},
    IDS[1]: {
        "phase": "fetching",
        "done": 1_200_000_000,
        "total": 4_800_000_000,
        "source": "hub",
        "rate": 41_500_000.0,
    },
}
LOADING.status["model"] = None

LOG_LINES = [
    "2026-11-28 09:00:00,000 INFO dnet.head.ring: peer studio (dnalphaaaaaa) joined",
    "2026-11-28 09:00:01,000 INFO dnet.head.ring: peer macbook-air (dnbravobbbbb) joined",
    "2026-11-28 09:00:09,000 INFO dnet.head.coordinator: loaded Qwen3-8B-4bit across 2 peers",
]


async def _shown(pilot) -> None:
    while pilot.app.snapshot is None:
        await pilot.pause(0.05)
    await pilot.pause()


def test_cluster_screen(snap_compare):
    app = DnetConsole(FixedStatusSource(LOADED, LOG_LINES))
    assert snap_compare(app, terminal_size=(150, 42), run_before=_shown)


def test_cluster_screen_while_loading(snap_compare):
    app = DnetConsole(FixedStatusSource(LOADING, LOG_LINES))
    assert snap_compare(app, terminal_size=(150, 42), run_before=_shown)


def test_chat_screen(snap_compare):
    app = DnetConsole(FixedStatusSource(LOADED, LOG_LINES))

    async def chat(pilot) -> None:
        await _shown(pilot)
        for box in pilot.app.query(Input):
            box.cursor_blink = False  # a blinking cursor would make two pictures
        await pilot.press("f2")
        await pilot.wait_for_scheduled_animations()  # the tab underline slides
        await pilot.pause()

    assert snap_compare(app, terminal_size=(150, 42), run_before=chat)


def test_logs_screen(snap_compare):
    app = DnetConsole(FixedStatusSource(LOADED, LOG_LINES))

    async def logs(pilot) -> None:
        await _shown(pilot)
        await pilot.press("f3")
        while pilot.app._log_next < len(LOG_LINES):
            await pilot.pause(0.05)
        await pilot.wait_for_scheduled_animations()  # the tab underline slides
        await pilot.pause()

    assert snap_compare(app, terminal_size=(150, 42), run_before=logs)


def test_a_replan_shows_with_its_reason():
    import asyncio

    replanning = copy.deepcopy(LOADING)
    replanning.status["head"]["replanning"] = "lost macbook-air (dnbravobbbbb)"
    app = DnetConsole(FixedStatusSource(replanning, LOG_LINES))

    async def shown() -> str:
        async with app.run_test(size=(150, 42)) as pilot:
            await _shown(pilot)
            return str(app.query_one("#model-summary").render())

    assert "re-planning: lost macbook-air" in asyncio.run(shown())
