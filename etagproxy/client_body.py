"""A request body as it arrives from the client, with its deadlines.

`client_chunks` streams it with a bound on each gap; `arrived_body` takes it
whole when it came with the head. A client that goes quiet or breaks its
framing raises `ClientBodyError`, carrying the refusal it gets. No
knowledge of routes, the store or the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from etagproxy.framing import Refusal

__all__ = ["ClientBodyError", "arrived_body", "client_chunks"]

# What reading a request body raises when the client breaks its framing.
_PAYLOAD_ERRORS = (RequestPayloadError, HttpProcessingError)

class ClientBodyError(Exception):
    """A streamed request body stopped: the client went quiet or went away.

    Raised out of the body iterator, so the upstream exchange is torn down
    mid-body (the upstream never sees a truncated body as complete).
    """

    def __init__(self, kind: str, detail: str, status: int, title: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.refusal = Refusal(status, kind, detail, title=title)

    def response(self) -> web.Response:
        return self.refusal.response()


async def client_chunks(
    request: web.BaseRequest, size: int, idle: float
) -> AsyncIterator[bytes]:
    """The request body as it arrives, at most `idle` seconds between chunks.

    For bodies that are streamed rather than buffered, the whole-body
    deadline (`timeouts.body_read`) would cut off large uploads on a slow
    link; bounding each gap instead still frees the connection from a client
    that stops sending.
    """
    content = request.content
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.read(size)
        except TimeoutError:
            raise ClientBodyError(
                "body-timeout", "The request body stopped arriving.", 408, "Request Timeout"
            ) from None
        except (ConnectionError, *_PAYLOAD_ERRORS) as exc:
            raise ClientBodyError(
                "client-body", f"The request body could not be read: {type(exc).__name__}.",
                400, "Bad Request",
            ) from exc
        if not chunk:
            return
        yield chunk


def arrived_body(request: web.BaseRequest) -> bytes | None:
    """The whole request body if all of it has arrived already, else None.

    Small bodies usually come with their headers; reading them needs no
    deadline (and no timer).
    """
    content = request.content
    if not content.is_eof():
        return None
    try:
        return content.read_nowait()
    except (ConnectionError, *_PAYLOAD_ERRORS) as exc:
        raise ClientBodyError(
            "client-body", f"The request body could not be read: {type(exc).__name__}.",
            400, "Bad Request",
        ) from exc
