"""``DnetConsole``: devices, placement, model, throughput, chat and logs of one head.

Everything it shows comes from the head's HTTP API (``StatusSource``), whether the
head runs inside this process (Trio guest mode, ``head=``) or elsewhere
(``dnet-console --connect URL``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, Input, Label, RichLog, TabbedContent, TabPane

from tui.chat import ChatPanel
from tui.client import HeadClient, HeadError
from tui.guest import TrioGuest
from tui.source import HttpStatusSource, Snapshot, StatusSource
from tui.widgets import DevicesTable, ModelPanel, PlacementPanel, ThroughputPanel


class ModelPrompt(ModalScreen[str | None]):
    """Ask which model to prepare or load (a short name, a directory, a GGUF file or a
    Hugging Face repo id)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str) -> None:
        super().__init__()
        self._title, self._value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(id="model-prompt"):
            yield Label(self._title)
            yield Input(
                self._value,
                placeholder="smollm2-135m, a model directory, a .gguf file or an HF repo id",
                id="model-input",
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class DnetConsole(App[None]):
    CSS_PATH = "console.tcss"
    TITLE = "dnet console"
    BINDINGS = [
        Binding("f1", "show_tab('cluster')", "Cluster"),
        Binding("f2", "show_tab('chat')", "Chat"),
        Binding("f3", "show_tab('logs')", "Logs"),
        Binding("f5", "prepare", "Prepare"),
        Binding("f6", "load", "Load"),
        Binding("f7", "unload", "Unload"),
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        source: StatusSource | None = None,
        *,
        head: Callable[..., Any] | None = None,
        api_key: str | None = None,
        model: str = "",
        poll_s: float = 1.0,
    ) -> None:
        """Give ``source`` (a head elsewhere, or a fixed one in tests) or ``head``
        (``head(stop, task_status=...)``, run here in guest mode; it reports its URL)."""
        super().__init__()
        assert (source is None) != (head is None), "give a source or a head"
        self.source = source
        self.client: HeadClient | None = (
            source.client if isinstance(source, HttpStatusSource) else None
        )
        self._guest = TrioGuest(head) if head is not None else None
        self._api_key = api_key
        self.model_ref = model
        self._poll_s = poll_s
        self._log_next = 0
        self.snapshot: Snapshot | None = None
        self._poller: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="cluster"):
            with TabPane("Cluster", id="cluster"):
                with Horizontal(id="top-row"):
                    yield ModelPanel(id="model")
                    yield ThroughputPanel(id="throughput")
                yield DevicesTable(id="devices")
                yield PlacementPanel(id="placement")
            with TabPane("Chat", id="chat"):
                yield ChatPanel(id="chat-panel")
            with TabPane("Logs", id="logs"):
                yield RichLog(id="log", max_lines=5000, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        if self._guest is not None:
            self.sub_title = "starting the head…"
            self._start_head()
        else:
            self._start_polling()

    @work(group="head")
    async def _start_head(self) -> None:
        assert self._guest is not None
        try:
            url = await self._guest.start()
        except RuntimeError as exc:
            self.exit(return_code=1, message=str(exc))
            return
        self.client = HeadClient(url, self._api_key)
        self.source = HttpStatusSource(self.client)
        self._start_polling()

    def _start_polling(self) -> None:
        assert self.source is not None
        self.sub_title = self.source.url
        self._watch()
        self._poller = self.set_interval(self._poll_s, self.poll_logs)
        self.poll_logs()

    async def on_unmount(self) -> None:
        await self._stop_head()

    async def _stop_head(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        self.workers.cancel_group(self, "poll")
        self.workers.cancel_group(self, "watch")
        self.workers.cancel_group(self, "control")
        self.source = None
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()
        if self._guest is not None:
            await self._guest.stop()

    async def action_quit(self) -> None:
        self.query_one(ChatPanel).stop()
        await self._stop_head()
        self.exit()

    # -- refreshing ------------------------------------------------------------------

    @work(group="watch")
    async def _watch(self) -> None:
        assert self.source is not None
        async for snapshot in self.source.watch():
            self.show(snapshot)

    @work(exclusive=True, group="poll")
    async def poll_logs(self) -> None:
        if self.source is None:
            return
        next_seq, lines = await self.source.logs(self._log_next)
        self._log_next = next_seq
        log = self.query_one(RichLog)
        for line in lines:
            log.write(line)

    def show(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        if snapshot.error:
            self.sub_title = f"{snapshot.url} — {snapshot.error}"
        else:
            self.sub_title = snapshot.url
            model = snapshot.status.get("model")
            if model and not self.model_ref:
                self.model_ref = model["id"]
        self.query_one(DevicesTable).show(snapshot)
        self.query_one(PlacementPanel).show(snapshot)
        self.query_one(ModelPanel).show(snapshot)
        self.query_one(ThroughputPanel).show(snapshot)

    # -- actions ---------------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        if tab == "chat":
            self.query_one("#prompt", Input).focus()

    def action_stop(self) -> None:
        if self.query_one(ChatPanel).stop():
            self.notify("stopped the answer")

    def action_prepare(self) -> None:
        self.push_screen(
            ModelPrompt("Prepare a topology for which model?", self.model_ref),
            partial(self._run, "prepare"),
        )

    def action_load(self) -> None:
        self.push_screen(
            ModelPrompt("Load which model?", self.model_ref), partial(self._run, "load")
        )

    def action_unload(self) -> None:
        self._run("unload", None)

    def _run(self, what: str, model: str | None) -> None:
        if what != "unload" and not model:
            return
        if model:
            self.model_ref = model
        self._call_head(what, model)

    @work(exclusive=True, group="control")
    async def _call_head(self, what: str, model: str | None) -> None:
        if self.client is None:
            self.notify("not connected to a head yet", severity="error")
            return
        self.notify(f"{what} {model or ''}…")
        try:
            if what == "prepare":
                assert model is not None
                topology = await self.client.prepare(model)
                self.notify(
                    f"placement over {len(topology['assignments'])} peers: "
                    f"{topology['predicted_tokens_per_s']:.1f} tok/s predicted"
                )
            elif what == "load":
                assert model is not None
                result = await self.client.load(model)
                self.notify(f"loaded {model} in {result['load_seconds']:.1f}s")
            else:
                await self.client.unload()
                self.notify("unloaded")
        except HeadError as exc:
            self.notify(str(exc), title=f"{what} failed", severity="error", timeout=10)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Prepare topology", "Plan where each layer goes", self.action_prepare)
        yield SystemCommand("Load model", "Prepare and load a model", self.action_load)
        yield SystemCommand("Unload model", "Free the peers", self.action_unload)
        yield SystemCommand("Stop answer", "Stop the chat answer", self.action_stop)
        yield SystemCommand("Chat", "Talk to the model", partial(self.action_show_tab, "chat"))
        yield SystemCommand("Logs", "The head's log", partial(self.action_show_tab, "logs"))
