"""``Guard``: the pure ASGI middleware in front of ``ddpm-serve``'s app — the API key, the request body, and the status
and latency of every ``POST /v1/images`` for the metrics — and the one-line error answer they share.

Pure ASGI (not ``BaseHTTPMiddleware``) keeps ``request.is_disconnected()`` working in the routes.
"""

import hashlib
import hmac
import json
import time
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse

from runtime.errors import reason
from serve.metrics import Metrics

MAX_BODY_BYTES = 16 * 1024  # a request is a few settings; this is generous
OPEN_PATHS = ("/healthz", "/")  # the rest needs the API key when one is set (the page asks for it itself)
IMAGES_PATH = "/v1/images"
KEY_HEADERS = "Authorization: Bearer KEY or X-API-Key: KEY; X-API-Key wins when both are sent"
QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "x-api-key"})
BODY_EXAMPLE = '{"n": 4, "class": 1}'
CLIENT_CLOSED = 499  # nginx's "client closed request": no response reached the client


def error(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    """The one shape of every error answer: ``{"detail": "<one line>"}``."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def body_problem(body: bytes) -> str | None:
    """Why ``body`` is not a JSON object of settings (one line), or None. An empty body is ``{}``. Every way JSON
    decoding can fail is caught here (not UTF-8, nesting too deep, integers past Python's digit limit), so each is a
    422 with its reason rather than a bare 400."""
    if not body.strip():
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else reason(e)
        return f"the body is not valid JSON ({why}); send a JSON object of settings, such as {BODY_EXAMPLE}"
    if not isinstance(value, dict):
        return f"the body must be a JSON object of settings, such as {BODY_EXAMPLE}; got a JSON {type(value).__name__}"
    return None


def _key_digest(key: bytes) -> bytes:
    """SHA-256 of a key: what is compared, so the comparison takes the same time for keys of any length."""
    return hashlib.sha256(key).digest()


class Guard:
    """Pure ASGI middleware (keeps ``request.is_disconnected()`` working): the API key, the request body (its
    size, and for ``POST /v1/images`` a JSON object whatever the Content-Type, an empty body being ``{}``), and the
    status and latency of ``POST /v1/images`` for the metrics."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.key_digest = None if api_key is None else _key_digest(api_key.encode())
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        # digests of a fixed size: neither the key's length nor a prefix shows in the time taken
        return given is not None and hmac.compare_digest(_key_digest(given), self.key_digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), None
        timed = scope["path"] == IMAGES_PATH and scope["method"] == "POST"

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status)
        except Exception:
            status = status or 500  # uvicorn answers 500 for what escapes the app
            raise
        finally:
            if timed:  # no response started: the client left first (say, in the middle of its body)
                self.metrics.observe_request(status or CLIENT_CLOSED, time.monotonic() - start)

    async def _handle(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        if self.key_digest is not None and scope["path"] not in OPEN_PATHS:
            in_query = {k.lower() for k, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"))}
            if in_query & QUERY_KEY_NAMES:
                detail = f"send the API key in a header ({KEY_HEADERS}), never in the URL"
            elif not self._authorized(headers):
                detail = f"a valid API key is needed ({KEY_HEADERS})"
            else:
                detail = None
            if detail is not None:
                response = error(401, detail)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_large = error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await too_large(scope, receive, send)
            return
        # Read the body here (at most max_body_bytes + one chunk), then replay it: also limits chunked bodies.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"] == IMAGES_PATH:
            problem = body_problem(body)
            if problem is not None:
                await error(422, problem)(scope, receive, send)
                return
            body = body if body.strip() else b"{}"
            # the settings are JSON whatever the client called them (curl -d sends a form type)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k not in (b"content-type", b"content-length")]
                     + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)
