"""Who may call the head, checked before any endpoint runs.

- ``Host`` must name the head (an IP address, a loopback or this machine's name,
  or an ``--allowed-host``), so a web page cannot rebind its own name to the
  head's address and read the answers.
- A request that carries an ``Origin`` (browsers add it) must come from the head's
  own origin or the ``--cors-origin``; other pages get 403 before anything runs.
- POST bodies must be ``application/json``: the content types a page may send
  cross-site without asking (text/plain, forms) are refused.
- ``/v1`` needs the API key, when there is one (``Bearer``, any case: RFC 7235).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit

import attrs

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class Headers(Protocol):
    """Case-insensitive header lookup (werkzeug's ``Headers``)."""

    def get(self, key: str, default: str) -> str: ...


@attrs.frozen
class Refusal:
    status: int
    code: str
    message: str


def _host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` → the name or address, lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def machine_names() -> set[str]:
    name = socket.gethostname().lower()
    return {name, f"{name}.local", name.split(".")[0]}


@attrs.frozen
class Guard:
    api_key: str | None = None
    cors_origin: str | None = None
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def for_head(
        cls, api_key: str | None, cors_origin: str | None, hosts: Iterable[str] = ()
    ) -> Guard:
        allowed = {*LOOPBACK_NAMES, *machine_names(), *(_host_name(h) for h in hosts)}
        return cls(api_key, cors_origin, frozenset(allowed))

    def check(self, method: str, path: str, headers: Headers) -> Refusal | None:
        """Why this request may not run, or None."""
        host = headers.get("Host", "") or None
        name = _host_name(host) if host else ""
        if host and not _is_address(name) and name not in self.allowed_hosts:
            return Refusal(
                403,
                "host_not_allowed",
                f"this head does not answer to the name {name!r} (Host header); "
                "start it with --allowed-host NAME to allow one",
            )
        origin = headers.get("Origin", "") or None
        if origin is not None and not self._origin_allowed(origin, host):
            return Refusal(
                403,
                "origin_not_allowed",
                f"requests from web pages of {origin!r} are not allowed; "
                "start the head with --cors-origin ORIGIN to allow one",
            )
        if method == "OPTIONS":
            return None  # a CORS preflight carries no credentials
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if method == "POST" and content_type != "application/json":
            return Refusal(
                415,
                "unsupported_media_type",
                "send the request body as JSON, with 'Content-Type: application/json'",
            )
        if self.api_key is not None and path.startswith("/v1") and not self._key_ok(headers):
            return Refusal(
                401,
                "invalid_api_key",
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
            )
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        if self.cors_origin is not None and self.cors_origin in ("*", origin):
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.strip().lower()

    def _key_ok(self, headers: Headers) -> bool:
        assert self.api_key is not None
        scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )
