"""One upstream attempt: send the client's body to a replica and pass the answer back unbuffered.

Everything that fails before the first byte reaches the client raises `UpstreamFailure` (the caller may
retry on another replica). After that the stream is the client's: if the replica dies mid-stream the client
gets a final SSE error event (openai's client raises APIError on it) instead of a hang. Cancelling the
handler (client disconnect) closes the upstream connection, so the engine aborts the request and frees its
KV blocks at once. TCP_NODELAY on both legs (aiohttp's server; router/upstream.py); chunks are written as they arrive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from kubellm.router.errors import sse_error_event
from kubellm.router.upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("kubellm.router.proxy")

_PASS_RESPONSE_HEADERS = ("Content-Type", "X-Request-Id", "Retry-After", "Content-Encoding")


class UpstreamFailure(Exception):
    """The attempt failed before anything reached the client."""

    def __init__(
        self,
        message: str,
        connect_error: bool = False,
        status: int | None = None,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.connect_error = connect_error
        self.status = status
        self.body = body
        self.headers = headers or {}

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429


@dataclass
class Outcome:
    status: int
    died_mid_stream: bool = False


def _copy_headers(upstream: UpstreamResponse, extra: dict[str, str]) -> dict[str, str]:
    h = {k: upstream.headers[k.lower()] for k in _PASS_RESPONSE_HEADERS if k.lower() in upstream.headers}
    h.update(extra)
    return h


async def forward(
    pool: UpstreamPool,
    url: URL,
    body: bytes,
    headers: dict[str, str],
    request: web.Request,
    response_headers: dict[str, str],
    on_first_byte: Callable[[], None],
) -> tuple[web.StreamResponse, Outcome]:
    try:
        tls = url.scheme == "https"
        upstream = await pool.post(
            url.host or "", url.port or (443 if tls else 80), url.raw_path_qs, headers, body, tls
        )
    except UpstreamError as e:
        raise UpstreamFailure(str(e), connect_error=e.connect) from e
    except TimeoutError as e:
        raise UpstreamFailure(f"upstream failed: {e!r}") from e
    try:
        if upstream.status >= 500 or upstream.status == 429:
            try:
                data = await upstream.read()
            except (UpstreamError, TimeoutError):
                data = b""
            raise UpstreamFailure(
                f"upstream answered {upstream.status}",
                status=upstream.status,
                body=data,
                headers=_copy_headers(upstream, {}),
            )
        ctype = upstream.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            try:
                data = await upstream.read()
            except (UpstreamError, TimeoutError) as e:
                raise UpstreamFailure(f"upstream failed while answering: {e!r}") from e
            on_first_byte()
            resp = web.Response(status=upstream.status, body=data, headers=_copy_headers(upstream, response_headers))
            return resp, Outcome(upstream.status)
        return await _stream(upstream, url, request, response_headers, on_first_byte)
    finally:
        upstream.close()  # back to the pool after a full read; else aborted (the replica aborts the request)


async def _stream(
    upstream: UpstreamResponse,
    url: URL,
    request: web.Request,
    response_headers: dict[str, str],
    on_first_byte: Callable[[], None],
) -> tuple[web.StreamResponse, Outcome]:
    # Wait for the replica's first chunk before answering, so a replica that dies first is retried.
    try:
        first = await upstream.readany()
    except (UpstreamError, TimeoutError) as e:
        raise UpstreamFailure(f"upstream failed before streaming: {e!r}") from e
    if not first:
        raise UpstreamFailure("upstream closed the stream before the first chunk")
    headers = _copy_headers(upstream, response_headers)
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(status=upstream.status, headers=headers)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(first)
    on_first_byte()
    while True:
        try:
            chunk = await upstream.readany()
        except (UpstreamError, TimeoutError) as e:
            log.warning("replica %s died mid-stream: %r", url.origin(), e)
            event = sse_error_event(502, "the model replica failed while streaming; retry the request", "upstream_died")
            await resp.write(event)  # a client that is gone too raises here: the handler treats it as a disconnect
            await resp.write_eof()
            return resp, Outcome(upstream.status, died_mid_stream=True)
        if not chunk:
            break
        await resp.write(chunk)
    await resp.write_eof()
    return resp, Outcome(upstream.status)
