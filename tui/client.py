"""The console's only way to the head: its HTTP API, through httpx on asyncio."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx


class HeadError(Exception):
    """The head answered with an error (its message), or could not be reached."""


@attrs.frozen
class ChatDelta:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class HeadClient:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        try:
            response = await self._http.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise HeadError(f"cannot reach the head at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise HeadError(_message(response.content, response.status_code))
        return response.json()

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/status")
        return result

    async def status_stream(self) -> AsyncIterator[dict[str, Any]]:
        """``/v1/status`` as the head pushes it: at once, on changes, every second."""
        try:
            async with self._http.stream("GET", "/v1/status/stream", timeout=None) as response:
                if response.status_code >= 400:
                    raise HeadError(_message(await response.aread(), response.status_code))
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise HeadError(f"lost the head at {self.base_url}: {exc}") from exc

    async def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/devices"))["data"]
        return result

    async def logs(self, after: int) -> tuple[int, list[str]]:
        result = await self._call("GET", f"/v1/logs?after={after}")
        return result["next"], result["lines"]

    async def prepare(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/prepare_topology", {"model": model}, timeout=3600
        )
        return result

    async def load(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/load_model", {"model": model}, timeout=3600
        )
        return result

    async def unload(self) -> None:
        await self._call("POST", "/v1/unload_model", {})

    async def chat(
        self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int
    ) -> AsyncIterator[ChatDelta]:
        """Stream an answer from the loaded model; closing the iterator stops it
        (the head frees the request on every peer when the connection goes)."""
        body: dict[str, Any] = {
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        status = await self.status()
        if status["model"] is None:
            raise HeadError("no model is loaded: load one first (l)")
        body["model"] = status["model"]["id"]
        try:
            async with self._http.stream(
                "POST", "/v1/chat/completions", json=body, timeout=None
            ) as response:
                if response.status_code >= 400:
                    raise HeadError(_message(await response.aread(), response.status_code))
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise HeadError(event["error"]["message"])
                    if event.get("usage"):
                        yield ChatDelta(usage=event["usage"])
                    for choice in event.get("choices", []):
                        yield ChatDelta(
                            choice["delta"].get("content") or "", choice.get("finish_reason")
                        )
        except httpx.HTTPError as exc:
            raise HeadError(f"lost the head at {self.base_url}: {exc}") from exc


def _message(content: bytes, status: int) -> str:
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"
