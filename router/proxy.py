"""One upstream attempt: send the client's body to a replica and pass the answer back unbuffered.

Everything that fails before the first byte reaches the client raises `UpstreamFailure` (the caller may
retry on another replica). After that the stream is the client's: if the replica dies mid-stream the client
gets a final SSE error event (openai's client raises APIError on it) instead of a hang. Cancelling the
handler (client disconnect) closes the upstream connection, so the engine aborts the request and frees its
KV blocks at once. TCP_NODELAY on both legs (router/http_server.py, router/upstream.py); chunks are written as
they arrive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kubellm.router.errors import sse_error_event
from kubellm.router.http_server import Exchange
from kubellm.router.upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("kubellm.router.proxy")

_PASS_RESPONSE_HEADERS = ("Content-Type", "X-Request-Id", "Retry-After", "Content-Encoding")
_PASS_LOWER = tuple((k.lower(), k) for k in _PASS_RESPONSE_HEADERS)  # (as the upstream's headers name them, as sent)


class UpstreamFailure(Exception):
    """The attempt failed before anything reached the client."""

    def __init__(
        self,
        message: str,
        connect_error: bool = False,
        status: int | None = None,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ):
        super().__init__(message)
        self.connect_error = connect_error
        self.status = status
        self.body = body
        self.headers = headers or []

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429


@dataclass
class Outcome:
    status: int
    died_mid_stream: bool = False


class Target:
    """A replica's address and a routed path, with the request line and Host header rendered once."""

    __slots__ = ("host", "key", "origin", "path", "port", "start", "tls")

    def __init__(self, host: str, port: int, path: str, tls: bool = False):
        self.host, self.port, self.path, self.tls = host, port, path, tls
        self.key = (host, port, tls)
        self.start = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode("latin-1")
        self.origin = f"{'https' if tls else 'http'}://{host}:{port}"

    def with_query(self, query: str) -> Target:
        """The same replica and path with the client's query string (as it arrived, latin-1 for its raw bytes)."""
        return Target(self.host, self.port, f"{self.path}{'&' if '?' in self.path else '?'}{query}", self.tls)


def _copy_headers(upstream: UpstreamResponse, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The replica's headers a client gets (those `extra` does not name), then `extra`. Once per request: no
    per-call lower-casing, no generator."""
    got = upstream.headers
    names = [k for k, _ in extra]
    out = [(k, got[low]) for low, k in _PASS_LOWER if low in got and k not in names]
    out += extra
    return out


async def forward(
    pool: UpstreamPool,
    target: Target,
    head: bytes,
    body: bytes,
    ex: Exchange,
    response_headers: list[tuple[str, str]],
    on_first_byte: Callable[[], None],
    on_sent: Callable[[], None] | None = None,
) -> Outcome:
    """head: the header lines to send after the request line, Host and Content-Length. on_sent: called once the
    request is written (or about to be, when a new connection must be opened first), before the first await.
    A plain answer (not a stream, not a retryable failure) that arrives whole is written to the client from the
    upstream read callback itself (`deliver`); the rest of this coroutine is bookkeeping after it."""

    def deliver(up: UpstreamResponse) -> bool:
        if up.status >= 500 or up.status == 429 or up.headers.get("content-type", "").startswith("text/event-stream"):
            return False
        ex.respond(up.status, up.take_body(), _copy_headers(up, response_headers))
        return True

    try:
        upstream = await pool.send(target.start, head, body, target.key, on_sent, deliver)
    except UpstreamError as e:
        raise UpstreamFailure(str(e), connect_error=e.connect) from e
    except TimeoutError as e:
        raise UpstreamFailure(f"upstream failed: {e!r}") from e
    try:
        if upstream.delivered:
            on_first_byte()
            return Outcome(upstream.status)
        if upstream.status >= 500 or upstream.status == 429:
            try:
                data = await upstream.read()
            except (UpstreamError, TimeoutError):
                data = b""
            raise UpstreamFailure(
                f"upstream answered {upstream.status}",
                status=upstream.status,
                body=data,
                headers=_copy_headers(upstream, []),
            )
        ctype = upstream.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            try:
                data = await upstream.read()
            except (UpstreamError, TimeoutError) as e:
                raise UpstreamFailure(f"upstream failed while answering: {e!r}") from e
            on_first_byte()
            ex.respond(upstream.status, data, _copy_headers(upstream, response_headers))
            return Outcome(upstream.status)
        return await _stream(upstream, target, ex, response_headers, on_first_byte)
    finally:
        upstream.close()  # back to the pool after a full read; else aborted (the replica aborts the request)


async def _stream(
    upstream: UpstreamResponse,
    target: Target,
    ex: Exchange,
    response_headers: list[tuple[str, str]],
    on_first_byte: Callable[[], None],
) -> Outcome:
    # Wait for the replica's first chunk before answering, so a replica that dies first is retried.
    try:
        first = await upstream.readany()
    except (UpstreamError, TimeoutError) as e:
        raise UpstreamFailure(f"upstream failed before streaming: {e!r}") from e
    if not first:
        raise UpstreamFailure("upstream closed the stream before the first chunk")
    headers = _copy_headers(upstream, response_headers)
    headers.append(("Cache-Control", "no-cache"))
    ex.start_stream(upstream.status, headers)
    await ex.write(first)
    on_first_byte()
    while True:
        try:
            chunk = await upstream.readany()
        except (UpstreamError, TimeoutError) as e:
            log.warning("replica %s died mid-stream: %r", target.origin, e)
            event = sse_error_event(502, "the model replica failed while streaming; retry the request", "upstream_died")
            await ex.write(event)  # a client that is gone too raises here: the handler treats it as a disconnect
            ex.end_stream()
            return Outcome(upstream.status, died_mid_stream=True)
        if not chunk:
            break
        await ex.write(chunk)
    ex.end_stream()
    return Outcome(upstream.status)
