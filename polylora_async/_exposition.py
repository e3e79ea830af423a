"""Serving a metrics registry to Prometheus, through prometheus_client's own server and ASGI app.

Both negotiate the format from the request's ``Accept`` header (the Prometheus text format, or
OpenMetrics for ``application/openmetrics-text``), compress with gzip when asked, and filter
families with ``?name[]=...``. :class:`MetricsServer` only adds an async face to the threaded
server: its address, and a clean :meth:`~MetricsServer.aclose`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import make_asgi_app, start_http_server
from prometheus_client.registry import Collector

METRICS_PATH = "/metrics"
"""The path scrapers use (the server answers on every path, as prometheus_client's does)."""

ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]


class MetricsServer:
    """prometheus_client's HTTP server for one registry, serving in its own daemon thread.

    Made by :func:`serve_metrics`, already serving. Close it with :meth:`aclose`, or use it as an
    async context manager: ``async with await serve_metrics(registry) as server: ...``.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        """Not meant to be called directly: use :func:`serve_metrics`."""
        self._server = server
        self._thread = thread
        address = server.server_address
        self._host: str = str(address[0])
        self._port: int = int(address[1])
        self._closed = False

    @property
    def host(self) -> str:
        """The address the server is bound to."""
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
        """Stop serving, close the listening socket and join the server thread; idempotent.

        The shutdown waits for the server's poll loop (up to half a second), so it runs in a
        worker thread rather than on the event loop.
        """
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

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


async def serve_metrics(registry: Collector, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` with prometheus_client's HTTP server.

    The server runs in a daemon thread of its own (scrapes never touch the event loop) and
    answers every path; the format follows the ``Accept`` header (Prometheus text by default,
    OpenMetrics on request), ``?name[]=`` selects families.

    Args:
        registry: what to serve, usually ``RuntimeMetrics.registry``.
        host: the address to bind. The default, loopback, keeps the metrics off the network; pass
            ``"0.0.0.0"`` (or ``"::"``) for a Prometheus on another machine.
        port: the port to bind; 0 lets the system pick a free one (see :attr:`MetricsServer.port`).

    Returns:
        The running server.

    Raises:
        TypeError: if ``registry`` is not a collector.
        ValueError: if ``port`` is out of range.
        OSError: if the address cannot be bound (for example, the port is taken).
    """
    _check_registry(registry)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"`port` must be an integer in 0..65535, got {port!r}")
    server, thread = await asyncio.to_thread(start_http_server, port, host, registry)
    return MetricsServer(server, thread)


def metrics_asgi_app(registry: Collector) -> ASGIApp:
    """prometheus_client's ASGI app for ``registry``, to mount in your web app.

    For example with Starlette or FastAPI: ``app.mount("/metrics", metrics_asgi_app(registry))``
    or ``Route("/metrics", metrics_asgi_app(registry))`` (the app is an object, not a function, so
    Starlette passes it the raw ASGI call). It answers HTTP requests only (the
    framework around it handles lifespan events), with the format the ``Accept`` header asks for.

    Args:
        registry: what to serve, usually ``RuntimeMetrics.registry``.

    Returns:
        The ASGI 3 application.

    Raises:
        TypeError: if ``registry`` is not a collector.
    """
    _check_registry(registry)
    return _AsgiApp(make_asgi_app(registry))


class _AsgiApp:
    """An ASGI app as an object rather than a function: frameworks such as Starlette take a plain
    function given to a route for a request handler, and an object for a raw ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await self._app(scope, receive, send)


def _check_registry(registry: object) -> None:
    if not callable(getattr(registry, "collect", None)):
        hint = " (pass `.registry`)" if hasattr(registry, "registry") else ""
        raise TypeError(f"`registry` must be a prometheus_client collector{hint}, got {registry!r}")
