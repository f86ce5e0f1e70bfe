"""The middleware every route sits behind: :class:`BodyLimit` (413 before any handler) and
:class:`SecurityHeaders` (no framing, no referrer, no caching, same-origin content only)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr_ai.service.web.access import templates

MSG_TOO_LARGE = "The request was larger than this server accepts ({limit} bytes). Nothing was changed."


class BodyLimit:
    """Refuse requests whose body is larger than ``limit`` bytes (413, before any handler).

    ``paths`` give other limits for some paths (the uploads), with their own message. The
    limit is checked on the declared length first and then on every chunk as it is read, so
    a body over the limit is never buffered whole.
    """

    def __init__(self, app: ASGIApp, *, limit: int, paths: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = dict(paths or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message_text = self.paths.get(scope.get("path", ""), (self.limit, ""))
        message_text = message_text or MSG_TOO_LARGE.format(limit=limit)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await _drain(receive, cap=DRAIN_FACTOR * limit)
            await _too_large(scope, receive, send, message_text)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await _drain(receive, cap=DRAIN_FACTOR * limit)
                    raise HTTPException(413, message_text)
            return message

        await self.app(scope, limited, send)


#: A body over the limit is read and dropped (never kept) up to this many times the limit
#: before the 413 goes out: a server that closes a connection with unread data makes the
#: client's TCP stack reset it, and the client never sees the answer. Beyond it, the
#: connection is closed at once.
DRAIN_FACTOR = 4


async def _drain(receive: Receive, *, cap: int) -> None:
    dropped = 0
    while dropped <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _too_large(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    path = str(scope.get("path", ""))
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    if path.startswith("/api/") or ("application/json" in accept and "text/html" not in accept):
        body, media = json.dumps({"error": message, "reason": "too_large"}).encode(), b"application/json"
    else:
        body = templates().get_template("error.html").render(
            title="Request too large", message=message, user=None, csrf="").encode()
        media = b"text/html; charset=utf-8"
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """No framing, no referrer, no caching of pages, scripts and styles only from this server."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"content-security-policy",
                          b"default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
                          b"base-uri 'none'; form-action 'self'")]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if self.https:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + [h for h in extra if h[0] not in names]
            await send(message)

        await self.app(scope, receive, add)
