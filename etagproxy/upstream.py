"""The upstream HTTP client: one pooled aiohttp ClientSession per process.

The session is configured not to rewrite what it relays: no automatic
decompression, no cookie jar, no added User-Agent/Accept/Accept-Encoding,
and URLs are built pre-encoded so the canonical target goes out unchanged.

Errors are translated here, at one boundary, most specific first::

    UpstreamError                 502 unless said otherwise
    ├── UpstreamUnreachable       connect failed: the request was never sent
    ├── UpstreamTimeout           504: no complete answer within the deadline
    └── UpstreamBroken            reset/garbled after the request was sent
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL


class UpstreamError(Exception):
    status = 502
    kind = "upstream-error"
    sent = True
    """Whether the request may have reached the upstream (unknown outcome)."""


class UpstreamUnreachable(UpstreamError):
    kind = "upstream-unreachable"
    sent = False


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream-timeout"


class UpstreamBroken(UpstreamError):
    kind = "upstream-broken"


class Upstream:
    """Sends requests to upstream origins through one connection pool."""

    def __init__(self, *, connect_timeout: float, limit: int = 0) -> None:
        self._connect_timeout = connect_timeout
        connector = aiohttp.TCPConnector(
            limit=limit,  # 0: unbounded; in-flight limits are enforced by the server side
            limit_per_host=0,
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False,
            # The proxy relays whatever framing/headers the upstream sends,
            # up to aiohttp's parser limits.
            read_bufsize=2**16,
        )
        self._bases: dict[str, URL] = {}

    def url(self, base: str, target: str) -> URL:
        """`base` (scheme://host:port[/prefix]) + the canonical target, not re-quoted."""
        root = self._bases.get(base)
        if root is None:
            root = self._bases[base] = URL(base.rstrip("/"))
        return URL(str(root) + target, encoded=True)

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        timeout: float,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request and yield its response (headers read, body not).

        `timeout` bounds the whole exchange, body included. The response is
        released when the context exits.
        """
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=self._connect_timeout, sock_connect=self._connect_timeout
        )
        try:
            resp = await self.session.request(
                method,
                url,
                headers=headers,
                data=body,
                timeout=client_timeout,
                allow_redirects=False,
                compress=None,
                auto_decompress=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ClientProxyConnectionError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(str(exc) or type(exc).__name__) from exc
        try:
            yield resp
        finally:
            resp.release()

    async def close(self) -> None:
        await self.session.close()


def body_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the upstream body broke mid-stream."""
    return (aiohttp.ClientError, asyncio.TimeoutError)


def map_body_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout("upstream body did not arrive in time")
    return UpstreamBroken(str(exc) or type(exc).__name__)


__all__ = [
    "Upstream",
    "UpstreamError",
    "UpstreamUnreachable",
    "UpstreamTimeout",
    "UpstreamBroken",
    "map_body_error",
    "body_errors",
]
