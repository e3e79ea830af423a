"""Serving a metrics registry to Prometheus: a small HTTP/1.1 server, or an ASGI app to mount.

Both answer with the Prometheus text format (``generate_latest``). Rendering a runtime's registry
(about 280 lines) takes about 1 ms on the development machine, once per scrape (every 10-60 s), so
it runs inline on the event loop rather than paying a thread hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
"""The one path :func:`serve_metrics` answers on."""

ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]

# A scrape request is one short line and a handful of headers; anything near these limits is not
# a scraper. They bound the memory one connection can make the server hold.
_MAX_LINE_BYTES = 8192
_MAX_HEADERS = 100
# After answering, keep reading (and discarding) what the client still sends, for at most this long
# and this much, before closing: closing a socket with unread input makes the kernel send RST,
# which can destroy the response (an error answer to a request we did not read to the end) before
# the client has read it.
_LINGER_S = 2.0
_LINGER_MAX_BYTES = 1 << 20

_VERSION_RE = re.compile(r"HTTP/(\d)\.(\d)")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ALLOWED_METHODS = ("GET", "HEAD")
_TEXT = "text/plain; charset=utf-8"


class MetricsServer:
    """An HTTP/1.1 server answering ``GET /metrics`` with a registry in the Prometheus text format.

    Made by :func:`serve_metrics`, already serving. Close it with :meth:`aclose`, or use it as an
    async context manager: ``async with await serve_metrics(registry) as server: ...``.

    Each connection carries one request: every response says ``Connection: close``. A scraper
    asks once every few seconds, so a new TCP connection per scrape costs nothing measurable and
    saves idle-connection bookkeeping.
    """

    def __init__(self, server: asyncio.Server, handler: _Handler) -> None:
        """Not meant to be called directly: use :func:`serve_metrics`."""
        self._server = server
        self._handler = handler
        sockname = server.sockets[0].getsockname()
        self._host: str = sockname[0]
        self._port: int = sockname[1]
        self._closed = False

    @property
    def host(self) -> str:
        """The address the server is bound to (the first one, if the host named several)."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server is bound to: the real one when port 0 was asked for."""
        return self._port

    @property
    def url(self) -> str:
        """The metrics URL, for example ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}{METRICS_PATH}"

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """Stop listening and close every open connection; idempotent.

        Scrapes in progress are cut off: a scraper retries at its next interval.
        """
        if self._closed:
            return
        self._closed = True
        self._server.close()
        await self._handler.close_all()
        await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<{type(self).__name__} {self.url} {state}>"


async def serve_metrics(
    registry: Collector,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    request_timeout: float = 10.0,
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` on the running event loop.

    ``GET`` answers 200 with the text format; ``HEAD`` the same headers without the body. Other
    paths answer 404, other methods 405, malformed requests 400 (414 or 431 when a line or the
    header section is too long, 505 for an HTTP version other than 1.0 and 1.1), a request not
    complete within ``request_timeout`` 408.

    Args:
        registry: what to serve, usually ``RuntimeMetrics.registry``.
        host: the address to bind. The default, loopback, keeps the metrics off the network; pass
            ``"0.0.0.0"`` (or ``"::"``) for a Prometheus on another machine.
        port: the port to bind; 0 lets the system pick a free one (see :attr:`MetricsServer.port`).
        request_timeout: seconds a client has to send its complete request.

    Returns:
        The running server.

    Raises:
        TypeError: if ``registry`` is not a collector.
        ValueError: if ``port`` or ``request_timeout`` is out of range.
        OSError: if the address cannot be bound (for example, the port is taken).
    """
    _check_registry(registry)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"`port` must be an integer in 0..65535, got {port!r}")
    if not request_timeout > 0:
        raise ValueError(f"`request_timeout` must be > 0, got {request_timeout!r}")
    handler = _Handler(registry, request_timeout)
    server = await asyncio.start_server(handler.handle, host, port, limit=_MAX_LINE_BYTES)
    return MetricsServer(server, handler)


def metrics_asgi_app(registry: Collector) -> ASGIApp:
    """An ASGI app answering every HTTP request with ``registry`` in the Prometheus text format.

    Mount it in your web app, for example with Starlette or FastAPI::

        app.mount("/metrics", metrics_asgi_app(runtime.metrics.registry))

    or as a plain route: ``Route("/metrics", metrics_asgi_app(...))`` (the app is an object,
    not a function, so Starlette passes it the raw ASGI call). The app ignores the path, since
    where it is mounted decides that. ``GET`` answers 200, ``HEAD`` the same headers without the
    body, other methods 405. It also speaks the lifespan protocol, so it runs on its own under
    any ASGI server; it rejects websocket connections.

    Args:
        registry: what to serve, usually ``RuntimeMetrics.registry``.

    Returns:
        The ASGI 3 application.

    Raises:
        TypeError: if ``registry`` is not a collector.
    """
    _check_registry(registry)
    return _MetricsApp(registry)


def _check_registry(registry: object) -> None:
    if not callable(getattr(registry, "collect", None)):
        hint = " (pass `.registry`)" if hasattr(registry, "registry") else ""
        raise TypeError(f"`registry` must be a prometheus_client collector{hint}, got {registry!r}")


# -- the HTTP server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    path: str


class _HttpError(Exception):
    """Raised inside the server when a request must be answered with an error status."""

    def __init__(self, status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _Handler:
    """Answers the connections of one :class:`MetricsServer`, and closes them on demand."""

    def __init__(self, registry: Collector, request_timeout: float) -> None:
        self._registry = registry
        self._request_timeout = request_timeout
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def close_all(self) -> None:
        """Cancel every connection's task and wait until each has closed its connection."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # return_exceptions: the tasks' CancelledErrors are results here; a cancellation of the
        # caller itself still propagates out of gather.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._closing:  # accepted just before the server closed
                return
            response = await self._respond(reader)
            if response is None:  # the client left before sending a whole request
                return
            writer.write(response)
            await writer.drain()
            await _linger(reader, writer)
        except ConnectionError:
            pass  # the client went away; there is nobody to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> bytes | None:
        head = False
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), self._request_timeout)
            except TimeoutError:
                raise _HttpError(HTTPStatus.REQUEST_TIMEOUT, "request not received in time") from None
            if request is None:
                return None
            head = request.method == "HEAD"
            if request.path != METRICS_PATH:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"not found; metrics are at {METRICS_PATH}")
            if request.method not in _ALLOWED_METHODS:
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"method {request.method} not allowed",
                    [("Allow", ", ".join(_ALLOWED_METHODS))],
                )
            try:
                body = generate_latest(self._registry)
            except Exception:
                # A user's custom collector in the same registry can fail; the server stays up.
                _log.exception("collecting metrics for %s failed", METRICS_PATH)
                raise _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "collecting metrics failed") from None
            return _http_response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST, head=head)
        except _HttpError as error:
            body = (error.message + "\n").encode()
            return _http_response(error.status, body, _TEXT, head=head, headers=error.headers)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Read a request's line and header section; ``None`` if the client closed first.

    Raises:
        _HttpError: if the request is malformed or too large.
    """
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
    for _ in range(3):
        line = await _read_line(reader, HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        if line is None:
            return None
        if line:
            break
    else:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "no request line")

    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if match.group(1, 2) not in (("1", "0"), ("1", "1")):
        raise _HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.0 and HTTP/1.1 are served")

    hosts = 0
    for count in range(_MAX_HEADERS + 1):
        header = await _read_line(
            reader, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long"
        )
        if header is None:
            return None
        if not header:
            break
        if count == _MAX_HEADERS:
            raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields")
        name, colon, _value = header.partition(":")
        # RFC 9112 5.1: whitespace before the colon, and obsolete line folding, are rejected.
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header field")
        if name.lower() == "host":
            hosts += 1
    # RFC 9112 3.2: an HTTP/1.1 request without exactly one Host field gets 400.
    if version == "HTTP/1.1" and hosts != 1:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs exactly one Host header")

    return _Request(method=method, path=_target_path(target))


async def _read_line(reader: asyncio.StreamReader, too_long: HTTPStatus, message: str) -> str | None:
    """One line without its line ending; ``None`` at end of input before a line ending."""
    try:
        raw = await reader.readline()
    except ValueError:  # longer than the reader's limit
        raise _HttpError(too_long, message) from None
    if not raw.endswith(b"\n"):
        return None
    # Latin-1 decodes every byte: request lines and field names must be ASCII tokens (checked by
    # the caller), and field values may carry latin-1 (RFC 9110 5.5).
    return raw.rstrip(b"\r\n").decode("latin-1")


def _target_path(target: str) -> str:
    """The path of an origin-form (``/metrics?x``) or absolute-form (``http://h/metrics``) target."""
    if target.startswith("/"):
        return target.partition("?")[0]
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        _authority, slash, path = rest.partition("/")
        return slash + path.partition("?")[0] if slash else "/"
    raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")


def _http_response(
    status: HTTPStatus,
    body: bytes,
    content_type: str,
    *,
    head: bool,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    start = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return start if head else start + body


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drain the client's input until it closes (bounded), so no RST eats the reply."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_discard(reader, _LINGER_MAX_BYTES), _LINGER_S)


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    received = 0
    while received <= limit:
        chunk = await reader.read(65536)
        if not chunk:
            return
        received += len(chunk)


# -- the ASGI app ------------------------------------------------------------------------------------


class _MetricsApp:
    """The ASGI app :func:`metrics_asgi_app` returns (a class instance, not a function: see there)."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            # The ASGI spec: reject a protocol you do not speak by raising.
            raise ValueError(f"the metrics app serves HTTP only, got a {kind!r} connection")
        method = scope["method"]
        headers: list[tuple[bytes, bytes]]
        if method in _ALLOWED_METHODS:
            status = HTTPStatus.OK
            body = generate_latest(self._registry)
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        else:
            status = HTTPStatus.METHOD_NOT_ALLOWED
            body = f"method {method} not allowed\n".encode()
            headers = [(b"content-type", _TEXT.encode()), (b"allow", ", ".join(_ALLOWED_METHODS).encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status.value, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _lifespan(receive: ASGIReceive, send: ASGISend) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
