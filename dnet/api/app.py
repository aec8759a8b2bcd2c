"""The Quart-trio app: the OpenAI endpoints (``dnet.api.openai``) and the cluster
endpoints (``dnet.api.cluster``) over a Coordinator, behind the API key and CORS
checks. Errors leave through ``dnet.api.errors``."""

from __future__ import annotations

import hmac

from quart import Response, request
from quart_trio import QuartTrio

from dnet.api.cluster import cluster
from dnet.api.context import Head
from dnet.api.errors import install_error_handlers, refusal
from dnet.api.logs import LogBuffer
from dnet.api.openai import openai
from dnet.head.coordinator import Coordinator

MAX_BODY_BYTES = 16 << 20


def create_app(
    coordinator: Coordinator,
    *,
    api_key: str | None = None,
    logs: LogBuffer | None = None,
    cors_origin: str | None = None,
) -> QuartTrio:
    """The app. ``cors_origin`` lets browser front-ends of that origin (or ``*``)
    call the API; off by default, so that web pages cannot reach a local head."""
    app = QuartTrio("dnet")
    app.config["RESPONSE_TIMEOUT"] = None  # a stream lasts as long as its generation
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["dnet"] = Head(coordinator, logs)

    @app.before_request
    async def check_api_key() -> Response | None:
        if request.method == "OPTIONS" and cors_origin is not None:
            return Response("", status=204)  # a CORS preflight carries no credentials
        if api_key is None or not request.path.startswith("/v1"):
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return refusal(
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                "invalid_api_key",
                401,
            )
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
