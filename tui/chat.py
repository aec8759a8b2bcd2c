"""The chat pane: a multi-turn conversation streamed token by token from the head."""

from __future__ import annotations

import time

import attrs
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Static
from textual.worker import Worker, WorkerState

from tui.client import HeadClient, HeadError


@attrs.define
class Answer:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    stopped: bool = False
    done: bool = False


class ChatPanel(Vertical):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.history: list[dict[str, str]] = []
        self.answers: list[Answer] = []
        self._worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="transcript")
        with Horizontal(id="chat-settings"):
            yield Label("temperature")
            yield Input("0.7", id="temperature", restrict=r"[0-9.]*", max_length=4)
            yield Label("max tokens")
            yield Input("256", id="max-tokens", restrict=r"[0-9]*", max_length=6)
            yield Label("", id="usage")
        yield Input(placeholder="Message the model — Enter sends, Esc stops", id="prompt")

    @property
    def generating(self) -> bool:
        return self._worker is not None and self._worker.state in (
            WorkerState.PENDING,
            WorkerState.RUNNING,
        )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt" or not event.value.strip() or self.generating:
            return
        try:
            temperature = float(self.query_one("#temperature", Input).value or "0")
            max_tokens = int(self.query_one("#max-tokens", Input).value or "256")
        except ValueError:
            self.app.notify("temperature and max tokens must be numbers", severity="error")
            return
        event.input.value = ""
        self.history.append({"role": "user", "content": event.value})
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(Text(event.value), classes="user"))
        bubble = Static("…", classes="assistant")
        transcript.mount(bubble)
        transcript.scroll_end(animate=False)
        answer = Answer()
        self.answers.append(answer)
        self._worker = self.run_worker(
            self._answer(bubble, answer, temperature, max_tokens), group="chat", exclusive=True
        )

    async def _answer(
        self, bubble: Static, answer: Answer, temperature: float, max_tokens: int
    ) -> None:
        client: HeadClient = self.app.client  # type: ignore[attr-defined]
        started = time.monotonic()
        try:
            stream = client.chat(self.history, temperature=temperature, max_tokens=max_tokens)
            async for delta in stream:
                if delta.usage is not None:
                    answer.usage = delta.usage
                    continue
                answer.text += delta.text
                answer.finish_reason = delta.finish_reason or answer.finish_reason
                bubble.update(Text(answer.text or "…"))
                self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
        except HeadError as exc:
            answer.error = str(exc)
            bubble.update(Text(f"{answer.text}\n[{exc}]", style="red"))
        finally:
            self.history.append({"role": "assistant", "content": answer.text})
            if answer.usage:
                took = time.monotonic() - started
                u = answer.usage
                self.query_one("#usage", Label).update(
                    f"{u['prompt_tokens']} prompt + {u['completion_tokens']} answer tokens, "
                    f"{u['completion_tokens'] / max(took, 1e-9):.1f} tok/s"
                )
            answer.done = True

    def stop(self) -> bool:
        """Stop the answer being generated; False if none is."""
        if not self.generating:
            return False
        assert self._worker is not None
        self.answers[-1].stopped = True
        self._worker.cancel()
        bubbles = self.query(".assistant").results(Static)
        for bubble in list(bubbles)[-1:]:
            bubble.update(Text(f"{self.answers[-1].text} [stopped]"))
        return True
