"""ASGI middleware of the server: API keys (tenants) before anything reads the body, and the body limit."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .openai_api import APIError

TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_api_keys(entries: Iterable[str]) -> dict[str, str | None]:
    """``{key: tenant}`` from ``name=key`` entries (split at the first ``=``; blank lines and ``#`` comments skipped).

    A single entry without ``=`` is a bare key: one tenant, ``None``, whose sessions are the
    server's own (no namespace). ``ValueError`` names a bad or repeated entry.
    """
    keys: dict[str, str | None] = {}
    names: set[str] = set()
    lines = [e.strip() for e in entries if e.strip() and not e.strip().startswith("#")]
    for line in lines:
        if "=" not in line:
            if len(lines) > 1:
                raise ValueError("a bare API key (no 'name=') is only allowed alone; give every key a name=")
            keys[line] = None
            continue
        name, _, key = (part.strip() for part in line.partition("="))
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (entry 'name=key')")
        if not key:
            raise ValueError(f"tenant {name!r} has an empty key")
        if name in names or key in keys:
            raise ValueError(f"tenant {name!r}: the name or the key is given twice")
        names.add(name)
        keys[key] = name
    return keys


class Authenticate:
    """401 for a ``/v1`` request without a known ``Authorization: Bearer <key>``, before its body is read.

    The tenant of the key (``None`` for a bare key, or when no keys are set) goes to
    ``request.state.tenant``.
    """

    def __init__(self, app: Any, keys: Mapping[str, str | None]) -> None:
        self.app = app
        self.keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys or not scope.get("path", "").startswith("/v1"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        found, tenant = False, None
        for key, name in self.keys:  # compare with every key: the time taken does not say which matched
            if hmac.compare_digest(token, key) and scheme.lower() == b"bearer":
                found, tenant = True, name
        if not found:
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for request bodies over ``max_bytes`` (declared or actually sent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                             code="body_too_large").response()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        first = {"type": "http.request", "body": b"".join(body), "more_body": False}
        await self.app(scope, _replay([first], receive), send)


def _replay(messages: list[dict], receive: Callable) -> Callable:
    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay
