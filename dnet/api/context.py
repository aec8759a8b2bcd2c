"""What the endpoints share: the head they serve (in ``app.extensions``) and the
request body as a JSON object."""

from __future__ import annotations

from typing import Any

import attrs
from quart import current_app, request

from dnet.api.logs import LogBuffer
from dnet.api.requests import parse_json
from dnet.head.coordinator import Coordinator


@attrs.frozen
class Head:
    coordinator: Coordinator
    logs: LogBuffer | None = None


def head() -> Head:
    found: Head = current_app.extensions["dnet"]
    return found


async def request_json() -> dict[str, Any]:
    """Raises:
    InvalidRequest: not a JSON object.
    """
    data = await request.get_data(as_text=False)
    return parse_json(data if isinstance(data, bytes) else data.encode())
