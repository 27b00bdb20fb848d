"""Structured errors: OpenAI's shape for /v1 and the rest, Ollama's shape for /api."""

import json
from typing import Dict, Optional

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(path: str, err: APIError) -> dict:
    if path.startswith("/api/"):
        return {"error": err.message}
    return {
        "error": {
            "message": err.message,
            "type": _TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error"),
            "param": err.param,
            "code": err.code,
        }
    }


def error_bytes(path: str, err: APIError) -> bytes:
    return json.dumps(error_body(path, err)).encode()


async def send_error(scope, send, err: APIError) -> None:
    """Answers an ASGI request with an error, for middlewares that run before routing."""
    body = error_bytes(scope.get("path", ""), err)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
