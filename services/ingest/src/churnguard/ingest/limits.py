"""Request body limits and gzip, for every endpoint, before any parsing.

A pure ASGI middleware: it reads the body in chunks and answers 413 as soon as it passes
the limit for the path (the Content-Length is not trusted), gunzips
``Content-Encoding: gzip`` bodies within the same limit (no decompression bombs, no
truncated streams), refuses bodies that are not strict UTF-8, and hands
the application a plain body, so typed FastAPI endpoints get the limits and gzip too.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestBodyLimits:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        encoding = next((v for k, v in headers if k == b"content-encoding"), b"identity").lower()
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _error(send, 413, f"request body is larger than {limit:,} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if encoding == b"gzip":
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, limit + 1)
            except zlib.error as exc:
                await _error(send, 400, f"body is not valid gzip: {exc}")
                return
            if len(body) > limit or inflater.unconsumed_tail:
                await _error(send, 413, f"decompressed request body is larger than {limit:,} bytes")
                return
            if not inflater.eof:
                await _error(send, 400, "gzip body is truncated (no end of stream)")
                return
        elif encoding not in (b"identity", b""):
            await _error(send, 415, f"Content-Encoding {encoding.decode()!r} is not supported")
            return
        try:
            body.decode("utf-8")  # strict: no surrogates, no stray bytes
        except UnicodeDecodeError as exc:
            await _error(send, 400, f"body is not valid UTF-8 (byte {exc.start})")
            return
        plain = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
        plain.append((b"content-length", str(len(body)).encode()))
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(dict(scope, headers=plain), replay, send)


async def _error(send: Send, status: int, detail: str) -> None:
    payload = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
