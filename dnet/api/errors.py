"""Errors leave the API in one place: every ``DnetError`` becomes OpenAI's error
shape with an honest status code, and so does every HTTP-level refusal."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from dnet.api.responses import error_body
from dnet.errors import (
    ContextOverflow,
    DnetError,
    InvalidModel,
    InvalidRequest,
    InvalidSamplingParams,
    LayerRangeError,
    ModelNotFound,
    ModelNotLoaded,
    OverCapacity,
    PeerError,
    PeerUnavailable,
    UnsupportedArchitecture,
)
from dnet.solver.profiles import NoFeasiblePlan

log = logging.getLogger(__name__)

# (error class, HTTP status, OpenAI error type); the first match wins.
_STATUS: tuple[tuple[type[DnetError], int, str], ...] = (
    (InvalidRequest, 400, "invalid_request_error"),
    (ContextOverflow, 400, "invalid_request_error"),
    (InvalidSamplingParams, 400, "invalid_request_error"),
    (LayerRangeError, 400, "invalid_request_error"),
    (ModelNotFound, 404, "invalid_request_error"),
    (InvalidModel, 400, "invalid_request_error"),
    (UnsupportedArchitecture, 400, "invalid_request_error"),
    (NoFeasiblePlan, 409, "invalid_request_error"),
    (OverCapacity, 429, "rate_limit_error"),
    (ModelNotLoaded, 503, "server_error"),
    (PeerError, 502, "server_error"),
    (PeerUnavailable, 503, "server_error"),
)
_CODES = {ContextOverflow: "context_length_exceeded", OverCapacity: "rate_limit_exceeded"}


def error_status(exc: DnetError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body for ``exc``."""
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            code = _CODES.get(cls, exc.code)
            return status, error_body(exc.message, kind, code, getattr(exc, "param", None))
    return 500, error_body(exc.message, "server_error", exc.code)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def error_response(exc: DnetError) -> Response:
    status, body = error_status(exc)
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return json_response(body, status)


def refusal(message: str, code: str, status: int) -> Response:
    """An HTTP-level refusal (no API key, no topology yet) in OpenAI's shape."""
    return json_response(error_body(message, "invalid_request_error", code), status)


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return refusal(exc.description or exc.name, exc.name, exc.code or 500)

    @app.errorhandler(DnetError)
    async def dnet_error(exc: DnetError) -> Response:
        return error_response(exc)
