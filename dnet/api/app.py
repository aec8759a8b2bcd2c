"""The Quart-trio app: the OpenAI endpoints (``dnet.api.openai``) and the cluster
endpoints (``dnet.api.cluster``) over a Coordinator, behind ``dnet.api.guard``'s
checks of the caller. Errors leave through ``dnet.api.errors``."""

from __future__ import annotations

from collections.abc import Sequence

from quart import Response, request
from quart_trio import QuartTrio

from dnet.api.cluster import cluster
from dnet.api.context import Head
from dnet.api.errors import install_error_handlers, refusal
from dnet.api.guard import Guard
from dnet.api.logs import LogBuffer
from dnet.api.openai import openai
from dnet.head.coordinator import Coordinator

MAX_BODY_BYTES = 4 << 20


def create_app(
    coordinator: Coordinator,
    *,
    api_key: str | None = None,
    logs: LogBuffer | None = None,
    cors_origin: str | None = None,
    allowed_hosts: Sequence[str] = (),
    max_body: int = MAX_BODY_BYTES,
) -> QuartTrio:
    """The app. ``cors_origin`` lets browser front-ends of that origin (or ``*``)
    call the API; off by default, so that web pages cannot reach a local head.
    ``allowed_hosts``: names besides this machine's that the head answers to."""
    app = QuartTrio("dnet")
    app.config["RESPONSE_TIMEOUT"] = None  # a stream lasts as long as its generation
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.extensions["dnet"] = Head(coordinator, logs)

    guard = Guard.for_head(api_key, cors_origin, allowed_hosts)

    @app.before_request
    async def check_caller() -> Response | None:
        refused = guard.check(request.method, request.path, request.headers)
        if refused is not None:
            return refusal(refused.message, refused.code, refused.status)
        if request.method == "OPTIONS" and cors_origin is not None:
            return Response("", status=204)  # a CORS preflight carries no credentials
        return None

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        if cors_origin is not None:
            response.headers["Access-Control-Allow-Origin"] = cors_origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    install_error_handlers(app)
    app.register_blueprint(cluster)
    app.register_blueprint(openai)
    return app
