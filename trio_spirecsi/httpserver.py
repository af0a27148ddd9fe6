"""A small HTTP/1.1 server for /metrics, /healthz and /readyz, and the client for healthchecks.

One request per connection (``Connection: close``), read-only endpoints (GET and HEAD).
A client gets at most :data:`READ_TIMEOUT` seconds and :data:`MAX_REQUEST_BYTES` bytes to send
its request head, and at most :data:`MAX_CONNECTIONS` connections are served at once (extra
ones are closed at once), so slow or hostile clients cannot exhaust the process. Nothing that
happens on one connection can stop the server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from . import log
from .config import parse_addr
from .metrics import Metrics

__all__ = ["check_health", "health_problem", "open_listeners", "parse_addr", "serve_http"]

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
LINGER_TIMEOUT = 2.0
MAX_DRAIN_BYTES = 1 << 20

ReadyFn = Callable[[], tuple[bool, str]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.[01]")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\x80-\xff\t]*?)[ \t]*")
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final blank line); BadRequest if invalid."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise BadRequest(400, "malformed header line")
        headers[header[1].decode("ascii").lower()] = header[2].decode("latin-1")
    target = match[2].decode("ascii")
    return Request(match[1].decode("ascii"), target.split("?", 1)[0], headers)


async def _read_head(stream: trio.SocketStream) -> bytes:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) >= MAX_REQUEST_BYTES:
            raise BadRequest(431, "request head too large")
        chunk = await stream.receive_some(MAX_REQUEST_BYTES - len(buffer) + 4)
        if not chunk:
            raise BadRequest(400, "connection closed before the request was complete")
        buffer += chunk


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain briefly: closing with unread input would send a TCP reset that
    can destroy the response before the client reads it (e.g. after a 431)."""
    with trio.move_on_after(LINGER_TIMEOUT):
        await stream.send_eof()
        drained = 0
        while drained < MAX_DRAIN_BYTES:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            drained += len(chunk)


class _Handler:
    def __init__(self, metrics: Metrics, ready: ReadyFn, read_timeout: float) -> None:
        self._metrics = metrics
        self._ready = ready
        self._read_timeout = read_timeout
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:  # one bad connection must never stop the server
            log.event(logger, logging.WARNING, "http_error", error=repr(exc))
        finally:
            self._limiter.release()
            await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        head_only = False
        try:
            with trio.fail_after(self._read_timeout):
                request = parse_request_head(await _read_head(stream))
            head_only = request.method == "HEAD"
            status, content_type, body, extra = self._respond(request)
        except trio.TooSlowError:
            status, content_type, body, extra = 408, _TEXT, b"request timeout\n", {}
        except BadRequest as exc:
            status, content_type, body, extra = exc.status, _TEXT, f"{exc.reason}\n".encode(), {}
        head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}"]
        head += [f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
        head += [f"{name}: {value}" for name, value in extra.items()]
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        if not head_only:
            payload += body
        with trio.move_on_after(WRITE_TIMEOUT):
            await stream.send_all(payload)
        await _linger(stream)

    def _respond(self, request: Request) -> tuple[int, str, bytes, dict[str, str]]:
        known = request.path in ("/metrics", "/healthz", "/readyz")
        if known and request.method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"}
        if request.path == "/healthz":
            return 200, _TEXT, b"ok\n", {}
        if request.path == "/readyz":
            try:
                is_ready, reason = self._ready()
            except Exception as exc:
                is_ready, reason = False, f"readiness check failed: {exc!r}"
            if is_ready:
                return 200, _TEXT, b"ok\n", {}
            return 503, _TEXT, f"{reason}\n".encode(), {}
        if request.path == "/metrics":
            try:
                body, content_type = self._metrics.render(request.headers.get("accept", ""))
            except Exception as exc:
                log.event(logger, logging.WARNING, "metrics_render_failed", error=repr(exc))
                return 500, _TEXT, b"metrics unavailable\n", {}
            return 200, content_type, body, {}
        return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n", {}


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind and listen on host:port (``""``: every interface); OSError when that fails.

    Separate from :func:`serve_http` so the daemon binds its port before it does anything
    else and a port in use is a startup error, not a failure found later.
    """
    return await trio.open_tcp_listeners(port, host=host or None)


async def serve_http(
    host: str,
    port: int,
    metrics: Metrics,
    ready: ReadyFn,
    *,
    read_timeout: float = READ_TIMEOUT,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz on host:port until cancelled.

    ``host`` ``""`` means every interface. ``listeners`` (from :func:`open_listeners`) are
    used instead of binding host:port when given, and closed when this returns.
    ``task_status.started`` receives the bound port (useful with port 0) once the socket
    listens. /healthz answers 200 whenever this task runs; /readyz answers 200 when
    ``ready()[0]`` is true, else 503 with ``ready()[1]``. A client that has not sent its
    whole request head within ``read_timeout`` seconds gets 408 and is disconnected.
    """
    if listeners is None:
        listeners = await open_listeners(host, port)
    try:
        actual_port: int = listeners[0].socket.getsockname()[1]
        log.event(logger, logging.INFO, "http_listening", host=host or "*", port=actual_port)
        task_status.started(actual_port)
        await trio.serve_listeners(_Handler(metrics, ready, read_timeout), listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def check_health(url: str, timeout: float) -> bool:
    """True when ``url`` (http://host:port/path) answers 200 within ``timeout`` seconds.

    Any connection failure, timeout or non-200 status is False. Raises ValueError when
    ``url`` is not an http:// URL with a host.
    """
    return await health_problem(url, timeout) is None


async def health_problem(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 200 within ``timeout`` seconds, else what went wrong
    (``connection refused``, ``no answer within 3s``, ``HTTP 503: agent unreachable``).

    Raises ValueError when ``url`` is not an http:// URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"healthcheck URL {url!r}: expected http://host:port/path")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"healthcheck URL {url!r}: expected http://host:port/path") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    request = f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(parts.hostname, port)
        except OSError as exc:
            return _os_problem(exc)
        async with stream:
            try:
                await stream.send_all(request.encode("ascii"))
                response = await _read_response_start(stream)
            except (trio.BrokenResourceError, OSError) as exc:
                return _os_problem(exc)
        status_line, _, rest = response.partition(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})( .*)?", status_line)
        if match is None:
            return "not an HTTP answer"
        if match[1] == b"200":
            return None
        body = rest.partition(b"\r\n\r\n")[2].decode("utf-8", "replace").strip()
        detail = body.splitlines()[0] if body else ""
        return f"HTTP {match[1].decode()}" + (f": {detail}" if detail else "")
    return f"no answer within {timeout:g}s"


def _os_problem(exc: BaseException) -> str:
    """``connection refused`` rather than trio's ``all attempts to connect ... failed``."""
    causes = [exc]
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if cause is not None:
        causes.insert(0, cause)
    for candidate in causes:
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror.lower()
    return str(exc) or type(exc).__name__


async def _read_response_start(stream: trio.SocketStream) -> bytes:
    """The status line, headers and at most the start of the body."""
    buffer = bytearray()
    while len(buffer) < MAX_REQUEST_BYTES:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer[:MAX_REQUEST_BYTES])
