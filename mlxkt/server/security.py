"""ASGI guards that run before routing: Host/Origin checks, API key, body size.

Order (outermost first): HostOriginGuard -> CORS (only with --allowed-origins) -> AuthGuard
-> app, so that CORS preflights need no key and refused requests never reach a route.
"""

import hmac
from typing import Iterable

from .errors import APIError, send_error
from .settings import ServerSettings

# The chat page and the health probe carry no model output and need no key.
PUBLIC_PATHS = ("/", "/static/chat.js", "/static/chat.css", "/health", "/favicon.ico")


def _header(scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return ""


class HostOriginGuard:
    """Refuses foreign Host headers (DNS rebinding) and cross-site browser requests."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if not self.settings.host_allowed(host):
            return await send_error(scope, send, APIError(403, f"Host header not allowed: {host!r}", code="host_not_allowed"))
        origin = _header(scope, b"origin")
        if origin and not self._origin_allowed(origin, scope, host):
            return await send_error(scope, send, APIError(403, f"Origin not allowed: {origin!r}", code="origin_not_allowed"))
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str, scope, host: str) -> bool:
        allowed = self.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # Same origin: the chat page served by this server.
        return origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes", code="body_too_large")


class AuthGuard:
    """Checks `Authorization: Bearer <key>` and caps the request body size."""

    def __init__(self, app, settings: ServerSettings, public_paths: Iterable[str] = PUBLIC_PATHS):
        self.app = app
        self.settings = settings
        self.public = frozenset(public_paths)
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] not in self.public and scope["method"] != "OPTIONS":
            auth = _header(scope, b"authorization")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                err = APIError(401, "missing or invalid API key (use Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await send_error(scope, send, err)
        limit = self.settings.max_body_bytes
        length = _header(scope, b"content-length")
        if length:
            if not length.isdigit():
                return await send_error(scope, send, APIError(400, "invalid Content-Length"))
            if int(length) > limit:
                return await send_error(scope, send, BodyTooLarge(limit))
        await self.app(scope, _limited(receive, limit), send)


def _limited(receive, limit: int):
    """Wraps `receive` so that a chunked body larger than `limit` raises BodyTooLarge."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped
