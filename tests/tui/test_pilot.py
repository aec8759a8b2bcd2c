"""The console driven by Textual's pilot against real heads and real peers: the head
inside the app (Trio guest mode), and a headless head reached with --connect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

import httpx

from dnet.cli_console import serve_head
from dnet.config import ConsoleSettings
from dnet.identity import Identity
from tui.app import DnetConsole, ModelPrompt
from tui.chat import ChatPanel
from tui.client import HeadClient
from tui.source import HttpStatusSource
from tui.widgets import DevicesTable, PlacementPanel

from ..api.conftest import load_split, start_cluster, stop_cluster
from ..processes import CLUSTER_KEY, PeerProcess


async def until(check: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds}s")
        await asyncio.sleep(0.05)


def state(app: DnetConsole) -> str | None:
    return app.snapshot.status.get("head", {}).get("state") if app.snapshot else None


async def _drive(app: DnetConsole, model: str) -> None:
    shown, bars = [], [0]
    show = app.show

    def record(snapshot):
        shown.append(snapshot)
        show(snapshot)
        bars.append(len(app.query(".load-row")))

    app.show = record  # type: ignore[method-assign]
    async with app.run_test(size=(150, 45)) as pilot:
        await until(lambda: app.snapshot and len(app.snapshot.devices) == 2, 30, "both peers show")
        table = app.query_one(DevicesTable)
        assert table.row_count == 2
        names = sorted(str(table.get_row_at(i)[0]) for i in range(2))
        assert names == ["tp0", "tp1"]
        assert state(app) == "idle"

        # Load through the dialog: the model is prefilled, Enter loads it.
        await pilot.press("f6")
        await until(lambda: isinstance(app.screen, ModelPrompt), 5, "the model dialog opens")
        assert app.screen.query_one("#model-input").value == model
        await pilot.press("enter")
        await until(lambda: state(app) == "loaded", 120, "the model loads")
        loading = [s for s in shown if s.status["head"]["state"] == "loading"]
        assert loading, "the load was never seen in progress"
        progress = loading[-1].status["head"]["load_progress"]
        holders = {a["peer_id"] for a in app.snapshot.status["topology"]["assignments"]}
        assert progress and set(progress) == holders  # a bar for each peer that loads
        assert max(bars) == len(holders)
        placement = str(app.query_one(PlacementPanel).render())
        assert "placement over 8 layers" in placement

        # A greedy chat answer equals the API's for the same conversation.
        await pilot.press("f2")
        chat = app.query_one(ChatPanel)
        app.query_one("#temperature").value = "0"
        app.query_one("#max-tokens").value = "12"
        app.query_one("#prompt").value = "Hello, fox"
        await pilot.press("enter")
        await until(lambda: chat.answers and chat.answers[-1].done, 60, "the answer completes")
        async with httpx.AsyncClient(base_url=app.client.base_url, timeout=60) as http:
            reply = await http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Hello, fox"}],
                    "temperature": 0,
                    "max_tokens": 12,
                },
            )
        assert chat.answers[-1].text == reply.json()["choices"][0]["message"]["content"]
        assert (
            chat.answers[-1].usage["completion_tokens"]
            == reply.json()["usage"]["completion_tokens"]
        )

        # Esc stops a long answer; the peers free it. (The random model may say its
        # end-of-text before Esc lands: then ask again, a bounded number of times.)
        app.query_one("#temperature").value = "0.9"
        app.query_one("#max-tokens").value = "3000"
        for attempt in range(4):
            asked = len(chat.answers) + 1
            app.query_one("#prompt").value = f"Go on ({attempt})"
            await pilot.press("enter")
            await until(
                lambda: (
                    len(chat.answers) == asked  # noqa: B023
                    and (chat.answers[-1].text or chat.answers[-1].done)
                ),
                30,
                "text streams",
            )
            await pilot.press("escape")
            await until(lambda: chat.answers[-1].done, 10, "the answer stops")
            if chat.answers[-1].finish_reason is None:
                break
        last = chat.answers[-1]
        assert last.stopped and last.finish_reason is None and last.usage is None
        await until(
            lambda: (
                app.snapshot.status["head"]["active_requests"] == 0
                and all(d["status"]["active_requests"] == 0 for d in app.snapshot.devices)
            ),
            10,
            "every peer frees the stopped request",
        )
        assert len(chat.history) == 2 * len(chat.answers)  # each turn: question, answer

        # Unload from the keyboard.
        await pilot.press("f7")
        await until(
            lambda: state(app) == "idle" and app.snapshot.status["model"] is None,
            30,
            "the model unloads",
        )
        await pilot.press("ctrl+q")


def test_console_with_its_own_head_loads_chats_stops_and_unloads(tiny_model, tmp_path):
    model = tiny_model(arch="qwen3", layers=8, hidden=128)
    key_file = tmp_path / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())
    peers = [PeerProcess(tmp_path / f"peer{i}", key_file, f"tp{i}") for i in range(2)]
    try:
        settings = ConsoleSettings(
            http_port=0, mdns=False, state_dir=tmp_path / "head", cache_dir=tmp_path / "cache"
        )
        head = partial(
            serve_head, settings, Identity.generate(), CLUSTER_KEY, [p.address for p in peers]
        )
        app = DnetConsole(head=head, model=str(model), poll_s=0.05)
        asyncio.run(_drive(app, str(model)))
        assert app.return_code in (None, 0)
    finally:
        for p in peers:
            p.stop()


async def _attach(url: str) -> tuple[list[list[str]], str]:
    app = DnetConsole(HttpStatusSource(HeadClient(url)), poll_s=0.05)
    async with app.run_test(size=(150, 45)) as pilot:
        await until(lambda: app.snapshot and app.snapshot.devices, 20, "devices show")
        table = app.query_one(DevicesTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        placement = str(app.query_one(PlacementPanel).render())
        await pilot.press("ctrl+q")
    return rows, placement


def test_connect_shows_a_headless_heads_devices_and_placement(tiny_model, tmp_path):
    c = start_cluster(tmp_path, tiny_model(arch="qwen3"), 2)
    try:
        load_split(c)
        devices = c.get("/v1/devices").json()["data"]
        topology = c.get("/v1/topology").json()
        rows, placement = asyncio.run(_attach(c.url))
        assert sorted(r[0] for r in rows) == sorted(d["name"] for d in devices)
        for row in rows:
            d = next(d for d in devices if d["name"] == row[0])
            assert row[1] == d["peer_id"][:12]
            layers = d["status"]["layers"]
            assert row[-1] == f"{layers[0]}–{layers[1]}"
        for a in topology["assignments"]:
            assert f"{a['start']:>3}–{a['end']:<3}" in placement and a["name"] in placement
    finally:
        stop_cluster(c)
