"""gRPC server on a unix socket.

Each accepted connection runs in its own task with a nursery; each request runs in its own task
inside that nursery, under a cancel scope that the peer's RST_STREAM and the request's
grpc-timeout both cancel, wherever the handler is waiting. Whatever a peer sends, the worst
outcome is that its own connection ends (GOAWAY with an HTTP/2 error code): nothing from a
connection reaches :meth:`Server.serve` as an exception. Limits (:class:`ServerLimits`) bound
what each connection may cost; the defaults suit an untrusted peer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeAlias

import trio
from google.protobuf.message import DecodeError, Message

from ._protocol import (
    STREAM_REFUSED,
    TOO_MANY_CONNECTIONS,
    ConnectionFailed,
    ErrorCodes,
    Event,
    GoAwayReceived,
    MessageReceived,
    ProtocolCore,
    RequestRejected,
    RequestStarted,
    SettingsChanged,
    StreamEnded,
    StreamFailed,
    StreamGone,
    StreamRefused,
    StreamReset,
    WindowUpdated,
    refusal_bytes,
)
from ._transport import IO_ERRORS, ErrorHook, Transport, unwrap_group
from .limits import ServerLimits, WireLimits
from .methods import Method, Req, Resp
from .status import RpcError, StatusCode

logger = logging.getLogger(__name__)

_BACKLOG = 128
_PROBE_TIMEOUT = 1.0
_REFUSAL_GRACE = 0.1

StreamSender: TypeAlias = Callable[[Resp], Awaitable[None]]
"""What a streaming handler calls to send one response message."""


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process, as the kernel reports it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ServerContext:
    """What a handler knows about its call besides the request."""

    method: Method[Any, Any]
    metadata: Mapping[str, str]
    """Custom request metadata, lower-case keys (no pseudo, grpc-*, te, content-type, ...)."""
    deadline: float | None
    """trio.current_time() at which the client gives up, from grpc-timeout."""
    peer: PeerCredentials | None
    _after: list[Callable[[], None]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def after_response(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the call's response (or its status) has been handed to the
        connection: work the client need not wait for, such as a log line or metrics. It
        runs in the call's task and must not block; an exception from it is logged."""
        self._after.append(fn)

    def responded(self) -> None:
        """The response has left: run what :meth:`after_response` was given (the server
        calls this; so does anything that calls a handler the way the server does)."""
        after, self._after[:] = list(self._after), []
        for fn in after:
            try:
                fn()
            except Exception:
                logger.exception("gRPC after-response work for %s failed", self.method.path)


UnaryHandler: TypeAlias = Callable[[Any, ServerContext], Awaitable[Any]]
StreamHandler: TypeAlias = Callable[[Any, ServerContext, StreamSender[Any]], Awaitable[None]]
BidiHandler: TypeAlias = Callable[
    [AsyncIterator[Any], ServerContext, StreamSender[Any]], Awaitable[None]
]


@dataclass(frozen=True)
class _Route:
    method: Method[Any, Any]
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None
    bidi: BidiHandler | None = None


class ServerCall:
    """One call's state: filled by the connection's reader, drained by the handler's task."""

    __slots__ = (
        "failed",
        "headers_sent",
        "messages",
        "one_request",
        "request_ended",
        "reset",
        "scope",
        "stream_id",
        "waiter",
    )

    def __init__(self, stream_id: int, deadline: float) -> None:
        self.stream_id = stream_id
        self.scope = trio.CancelScope(deadline=deadline)
        self.messages: deque[tuple[bytes, int]] = deque()
        self.request_ended = False
        self.one_request = False  # unary request taken: later messages are dropped
        self.failed: RpcError | None = None
        self.reset = False  # the client cancelled: nothing more is sent
        self.headers_sent = False
        self.waiter: trio.Event | None = None

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    async def wait(self) -> None:
        if self.waiter is None:
            self.waiter = trio.Event()
        await self.waiter.wait()


class Server:
    """Routes gRPC calls on a unix socket to handlers; register them, then :meth:`serve`.

    ``on_error(kind)`` is called once per connection that ended because of its peer (or a
    bug), and once per stream failed by a limit or malformed input; the kinds are listed in
    the package docstring. It must not block.
    """

    def __init__(
        self, limits: ServerLimits | None = None, *, on_error: ErrorHook | None = None
    ) -> None:
        self.limits = limits if limits is not None else ServerLimits()
        self._on_error = on_error
        self._routes: dict[str, _Route] = {}
        self._active = 0
        self._connections = 0

    @property
    def active_streams(self) -> int:
        """How many calls are in progress right now: from their request's headers to their
        status."""
        return self._active

    @property
    def open_connections(self) -> int:
        """How many connections are being served right now (every socket of this server)."""
        return self._connections

    def add_unary(
        self, method: Method[Req, Resp], handler: Callable[[Req, ServerContext], Awaitable[Resp]]
    ) -> None:
        if method.server_streaming or method.client_streaming:
            raise ValueError(f"{method.path} streams: use add_stream or add_bidi")
        self._routes[method.path] = _Route(method, unary=handler)

    def add_stream(
        self,
        method: Method[Req, Resp],
        handler: Callable[[Req, ServerContext, StreamSender[Resp]], Awaitable[None]],
    ) -> None:
        """A handler that calls `await send(msg)` per message; returning ends the stream OK."""
        if not method.server_streaming or method.client_streaming:
            raise ValueError(f"{method.path} is not server-streaming only")
        self._routes[method.path] = _Route(method, stream=handler)

    def add_bidi(
        self,
        method: Method[Req, Resp],
        handler: Callable[[AsyncIterator[Req], ServerContext, StreamSender[Resp]], Awaitable[None]],
    ) -> None:
        """A bidirectional stream: ``handler(requests, context, send)``.

        ``requests`` yields each request as the client sends it and stops when the client
        ends its side; it raises RpcError if a request breaks a limit or cannot be parsed. A
        request's bytes are handed back to the client's flow-control window only once the
        handler has taken it, so a handler that stops reading stops the client. Returning
        ends the stream OK; the client's reset cancels the handler.
        """
        if not (method.server_streaming and method.client_streaming):
            raise ValueError(f"{method.path} is not bidirectional")
        self._routes[method.path] = _Route(method, bidi=handler)

    async def serve(
        self,
        path: str,
        *,
        mode: int | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `path` and serve until cancelled.

        A stale socket file (no server behind it) is replaced; any other file is not. Once
        this returns (or raises Cancelled) the listener is closed, every connection got
        GOAWAY and was closed, every handler has finished, and the socket file is gone.
        """
        listener, identity = await _listen(path, mode)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    task_status.started()
                    await self._accept(listener, nursery, path)
                finally:
                    listener.socket.close()
                    _remove_socket(path, identity)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            exc = unwrap_group(group)
            raise exc from exc.__cause__

    async def _accept(
        self, listener: trio.SocketListener, nursery: trio.Nursery, path: str
    ) -> None:
        here = _Count()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                logger.warning("accept on %s failed: %s", path, exc)
                await trio.sleep(0.1)
                continue
            if here.value >= self.limits.max_connections:
                await self._refuse(stream, path)
                continue
            # Counted now, not when its task first runs: the next accept may come first.
            here.value += 1
            self._connections += 1
            nursery.start_soon(self._serve_connection, stream, path, here)

    async def _refuse(self, stream: trio.SocketStream, path: str) -> None:
        reason = f"more than {self.limits.max_connections} connections"
        with trio.move_on_after(_REFUSAL_GRACE), contextlib.suppress(*IO_ERRORS):
            await stream.send_all(refusal_bytes(reason))
        with contextlib.suppress(*IO_ERRORS):
            await stream.aclose()
        logger.warning(
            "grpc_connection_closed",
            extra={"fields": {"side": "server", "socket": path, "reason": reason}},
        )
        if self._on_error is not None:
            try:
                self._on_error(TOO_MANY_CONNECTIONS)
            except Exception:
                logger.exception("gRPC on_error hook failed")

    async def _serve_connection(self, stream: trio.SocketStream, path: str, here: _Count) -> None:
        try:
            await ServerConnection(self, stream, path).run()
        except Exception:  # never reaches serve(): only this connection is lost
            logger.exception("gRPC server connection on %s failed", path)
        finally:
            here.value -= 1
            self._connections -= 1


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class ServerConnection:
    """One accepted connection: routes its streams to handler tasks."""

    def __init__(self, server: Server, stream: trio.SocketStream, path: str) -> None:
        self._server = server
        self._routes = server._routes
        self._peer = _peer_credentials(stream.socket)
        limits = server.limits
        self.core = ProtocolCore(client_side=False, limits=WireLimits.for_server(limits))
        fields: dict[str, Any] = {"side": "server", "socket": path}
        if self._peer is not None:
            fields["peer_pid"] = self._peer.pid
        self.transport = Transport(
            stream,
            self.core,
            handshake_timeout=limits.handshake_timeout,
            idle_timeout=limits.idle_timeout,
            max_send_queue_bytes=limits.max_send_queue_bytes,
            log_fields=fields,
            on_error=server._on_error,
        )
        self._calls: dict[int, ServerCall] = {}
        self._draining = False
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            def closed(end: ConnectionFailed) -> None:
                nursery.cancel_scope.cancel()

            await self.transport.run(self._on_events, closed)

    def _on_events(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, MessageReceived):
                call = self._calls.get(event.stream_id)
                if call is None or call.one_request:
                    self.core.ack(event.stream_id, event.size)
                else:
                    call.messages.append((event.data, event.size))
                    call.wake()
            elif isinstance(event, RequestStarted):
                self._start(event)
            elif isinstance(event, RequestRejected):
                if event.path in self._routes:
                    self._answer(event.stream_id, event.code, event.reason)
                else:
                    self._answer(event.stream_id, *_unimplemented(event.path))
                self.transport.report(event.kind)
            elif isinstance(event, (WindowUpdated, SettingsChanged)):
                self.transport.notify()
            elif isinstance(event, StreamRefused):
                self.transport.report(STREAM_REFUSED)
            elif isinstance(event, GoAwayReceived):
                self._draining = True
                if not self._calls:
                    self.transport.close(ErrorCodes.NO_ERROR, None, "client sent GOAWAY")
            elif isinstance(event, (StreamEnded, StreamFailed, StreamReset)):
                self._stream_event(event)

    def _stream_event(self, event: StreamEnded | StreamFailed | StreamReset) -> None:
        call = self._calls.get(event.stream_id)
        if isinstance(event, StreamFailed):
            self.transport.report(event.kind)
            if call is None:
                self._answer(event.stream_id, event.code, event.reason)
                return
            call.failed = RpcError(event.code, event.reason)
        if call is None:
            return
        if isinstance(event, StreamEnded):
            call.request_ended = True
        elif isinstance(event, StreamReset):
            call.reset = True
            call.scope.cancel()
            self.transport.notify()
        call.wake()

    def _start(self, event: RequestStarted) -> None:
        route = self._routes.get(event.path)
        if route is None or self._nursery is None:
            self._answer(event.stream_id, *_unimplemented(event.path))
            return
        deadline = None
        if event.timeout is not None:
            deadline = trio.current_time() + event.timeout
        metadata = {k: v for k, v in event.metadata if isinstance(v, str)}
        context = ServerContext(route.method, MappingProxyType(metadata), deadline, self._peer)
        call = ServerCall(event.stream_id, math.inf if deadline is None else deadline)
        self._calls[event.stream_id] = call
        self.transport.set_busy(True)
        # Counted from now, not from the handler's first step a turn later.
        self._server._active += 1
        try:
            self._nursery.start_soon(self._run_call, call, route, context)
        except BaseException:
            self._server._active -= 1
            raise

    def _answer(self, stream_id: int, code: StatusCode, message: str) -> None:
        """End a stream with a status before any response was sent."""
        self.core.respond_status(stream_id, int(code), message, trailers_only=True)
        self._finish_stream(stream_id)

    def _finish_stream(self, stream_id: int, *, flush: bool = True) -> None:
        # A client still sending after the status is told to stop (as grpc-go does).
        if self.core.peer_still_sending(stream_id):
            self.core.reset(stream_id, ErrorCodes.NO_ERROR)
        self.core.forget(stream_id)
        if flush:
            self.transport.flush()

    async def _run_call(self, call: ServerCall, route: _Route, context: ServerContext) -> None:
        try:
            status = await self._handle(call, route, context)
            if status is not None and not call.reset:
                code, message = status
                self.core.respond_status(
                    call.stream_id, int(code), message, trailers_only=not call.headers_sent
                )
        finally:
            self._server._active -= 1
            del self._calls[call.stream_id]
            self._finish_stream(call.stream_id, flush=False)
            self.transport.send_now()  # what the call queued, in one write from this task
            if not self._calls:
                self.transport.set_busy(False)
                if self._draining:
                    self.transport.close(ErrorCodes.NO_ERROR, None, "client sent GOAWAY")
            context.responded()

    async def _handle(
        self, call: ServerCall, route: _Route, context: ServerContext
    ) -> tuple[StatusCode, str] | None:
        path = route.method.path
        status: tuple[StatusCode, str] | None = None

        async def send(message: Message) -> None:
            await self._send(call, message)

        with call.scope:
            try:
                if route.bidi is not None:
                    requests = _Requests(self, call, route.method.request_type)
                    await route.bidi(requests, context, send)
                else:
                    # Not kept in a local: a long stream holds the parsed request only.
                    request = _parse(route.method, await self._one_request(call))
                    if route.unary is not None:
                        # The response leaves with its trailers, through send_now in _run_call.
                        await self._send(call, await route.unary(request, context), flush=False)
                    else:
                        assert route.stream is not None
                        await route.stream(request, context, send)
                status = (StatusCode.OK, "")
            except RpcError as exc:
                status = (exc.code, exc.message)
            except Exception:
                logger.exception("gRPC handler for %s failed", path)
                status = (StatusCode.UNKNOWN, f"internal error in {path}")
        if call.scope.cancelled_caught and not call.reset:
            status = (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return status

    async def _one_request(self, call: ServerCall) -> bytes:
        while not call.messages:
            if call.failed is not None:
                raise RpcError(call.failed.code, call.failed.message)
            if call.request_ended:
                raise RpcError(StatusCode.INTERNAL, "request ended without a message")
            await call.wait()
        data, size = call.messages.popleft()
        call.one_request = True
        for _, extra in call.messages:
            self.core.ack(call.stream_id, extra)
        call.messages.clear()
        self.core.ack(call.stream_id, size)
        self.transport.flush()
        return data

    async def next_request(self, call: ServerCall) -> bytes | None:
        """The next request message of a streaming call, None once the client ended it."""
        while not call.messages:
            if call.failed is not None:
                raise RpcError(call.failed.code, call.failed.message)
            if call.request_ended:
                return None
            await call.wait()
        data, size = call.messages.popleft()
        self.core.ack(call.stream_id, size)
        self.transport.flush()
        return data

    async def _send(self, call: ServerCall, message: Message, *, flush: bool = True) -> None:
        try:
            if not call.headers_sent:
                self.core.respond(call.stream_id)
                call.headers_sent = True
            data = message.SerializeToString()
            await self.transport.send_message(call.stream_id, data, flush=flush)
        except StreamGone:
            raise RpcError(StatusCode.CANCELLED, "the call is no longer active") from None


class _Requests(Generic[Req]):
    """The requests of a bidirectional call, as the handler consumes them."""

    def __init__(self, connection: ServerConnection, call: ServerCall, kind: type[Req]) -> None:
        self._connection = connection
        self._call = call
        self._kind = kind

    def __aiter__(self) -> _Requests[Req]:
        return self

    async def __anext__(self) -> Req:
        data = await self._connection.next_request(self._call)
        if data is None:
            raise StopAsyncIteration
        return _parse_as(self._kind, data)


def _parse(method: Method[Req, Any], data: bytes) -> Req:
    return _parse_as(method.request_type, data)


def _parse_as(kind: type[Req], data: bytes) -> Req:
    try:
        return kind.FromString(data)
    except DecodeError:
        raise RpcError(StatusCode.INTERNAL, "could not parse request") from None


def _unimplemented(path: str) -> tuple[StatusCode, str]:
    return StatusCode.UNIMPLEMENTED, f"method {path} is not implemented"


def _peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


async def _listen(path: str, mode: int | None) -> tuple[trio.SocketListener, tuple[int, int]]:
    await _check_stale_socket(path)
    # Bind under a temporary name and rename once listening, over a stale socket if there
    # is one: whoever sees the socket file can connect (no ECONNREFUSED window between bind
    # and listen, no moment without a file).
    staging = path + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(staging)
        if mode is not None:
            os.chmod(staging, mode)
        sock.listen(_BACKLOG)
        os.rename(staging, path)
        st = os.stat(path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    return trio.SocketListener(sock), (st.st_dev, st.st_ino)


async def _check_stale_socket(path: str) -> None:
    """Refuse to replace anything but a socket nobody listens on (left behind by a crash)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket, not replacing it", path)
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(_PROBE_TIMEOUT):
            await probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: left behind by a crash
    except (OSError, trio.TooSlowError):
        raise OSError(errno.EADDRINUSE, "another server may be listening", path) from None
    else:
        raise OSError(errno.EADDRINUSE, "another server is listening", path)
    finally:
        probe.close()


def _remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file, unless another server has replaced it meanwhile."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
