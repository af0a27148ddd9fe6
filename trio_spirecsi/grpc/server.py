"""gRPC server on a unix socket.

Each accepted connection runs in its own task with a nursery; each request runs in its own task
inside that nursery, under a cancel scope that the peer's RST_STREAM and the request's
grpc-timeout both cancel, wherever the handler is waiting.
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

import h2.exceptions
import trio
from google.protobuf.message import DecodeError, Message
from purerpc.grpclib.events import MessageReceived, RequestReceived, WindowUpdated
from purerpc.grpclib.status import Status

from ._connection import (
    Event,
    RequestRejected,
    SettingsChanged,
    StreamEnded,
    StreamFailed,
    StreamGone,
    StreamReset,
    Transport,
    unwrap_group,
)
from .methods import Method, Req, Resp
from .status import RpcError, StatusCode

logger = logging.getLogger(__name__)

_BACKLOG = 128
_PROBE_TIMEOUT = 1.0

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


@dataclass(frozen=True)
class _Route:
    method: Method[Any, Any]
    unary: Callable[[Any, ServerContext], Awaitable[Any]] | None
    stream: Callable[[Any, ServerContext, StreamSender[Any]], Awaitable[None]] | None


class _Call:
    __slots__ = ("event", "failed", "headers_sent", "request", "request_ended", "reset", "scope")

    def __init__(self, deadline: float) -> None:
        self.scope = trio.CancelScope(deadline=deadline)
        self.event = trio.Event()
        self.request: tuple[bytes, int] | None = None
        self.request_ended = False
        self.failed: RpcError | None = None
        self.reset = False  # the client cancelled: nothing more is sent
        self.headers_sent = False

    def wake(self) -> None:
        self.event.set()


class Server:
    """Routes gRPC calls on a unix socket to handlers; register them, then :meth:`serve`."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._active = 0

    @property
    def active_streams(self) -> int:
        """How many handlers are running right now."""
        return self._active

    def add_unary(
        self, method: Method[Req, Resp], handler: Callable[[Req, ServerContext], Awaitable[Resp]]
    ) -> None:
        if method.server_streaming:
            raise ValueError(f"{method.path} streams responses: use add_stream")
        self._routes[method.path] = _Route(method, handler, None)

    def add_stream(
        self,
        method: Method[Req, Resp],
        handler: Callable[[Req, ServerContext, StreamSender[Resp]], Awaitable[None]],
    ) -> None:
        """A handler that calls `await send(msg)` per message; returning ends the stream OK."""
        if not method.server_streaming:
            raise ValueError(f"{method.path} is unary: use add_unary")
        self._routes[method.path] = _Route(method, None, handler)

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
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                logger.warning("accept on %s failed: %s", path, exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_Connection(self, stream).run)


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self._server = server
        self._routes = server._routes
        self._peer = _peer_credentials(stream.socket)
        self.transport = Transport(stream, client_side=False)
        self._calls: dict[int, _Call] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.transport.run(self._on_events, lambda cause: nursery.cancel_scope.cancel())

    def _on_events(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                self._start(event)
            elif isinstance(event, RequestRejected):
                if event.path in self._routes:
                    self._answer(event.stream_id, StatusCode.INTERNAL, event.reason)
                else:
                    self._answer(event.stream_id, *_unimplemented(event.path))
            elif isinstance(event, (WindowUpdated, SettingsChanged)):
                self.transport.notify()
            elif (call := self._calls.get(getattr(event, "stream_id", 0))) is not None:
                if isinstance(event, MessageReceived):
                    if call.request is None:
                        call.request = (event.data, event.flow_controlled_length)
                    else:  # unary request: further messages are ignored
                        self.transport.protocol.ack(event.stream_id, event.flow_controlled_length)
                elif isinstance(event, StreamEnded):
                    call.request_ended = True
                elif isinstance(event, StreamFailed):
                    call.failed = RpcError(event.code, event.reason)
                elif isinstance(event, StreamReset):
                    call.reset = True
                    call.scope.cancel()
                    self.transport.notify()
                call.wake()

    def _start(self, event: RequestReceived) -> None:
        path = f"/{event.service_name}/{event.method_name}"
        route = self._routes.get(path)
        if route is None:
            self._answer(event.stream_id, *_unimplemented(path))
            return
        deadline = None
        if event.timeout is not None:
            deadline = trio.current_time() + event.timeout.total_seconds()
        metadata = {k: v for k, v in event.custom_metadata if isinstance(v, str)}
        context = ServerContext(route.method, MappingProxyType(metadata), deadline, self._peer)
        call = self._calls[event.stream_id] = _Call(math.inf if deadline is None else deadline)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, event.stream_id, call, route, context)

    def _answer(self, stream_id: int, code: StatusCode, message: str) -> None:
        """End a stream with a status before any response was sent."""
        self._send_status(stream_id, code, message, trailers_only=True)
        self.transport.protocol.forget(stream_id)

    def _send_status(
        self, sid: int, code: StatusCode, message: str, *, trailers_only: bool
    ) -> None:
        status = Status(int(code), message)
        with contextlib.suppress(h2.exceptions.ProtocolError):  # stream already closed
            if trailers_only:
                self.transport.protocol.respond_status(sid, status)
            else:
                self.transport.protocol.end_response(sid, status)

    async def _run_call(self, sid: int, call: _Call, route: _Route, context: ServerContext) -> None:
        self._server._active += 1
        try:
            status = await self._handle(sid, call, route, context)
            if status is not None and not call.reset:
                self._send_status(sid, *status, trailers_only=not call.headers_sent)
        finally:
            self._server._active -= 1
            del self._calls[sid]
            self.transport.protocol.forget(sid)
            self.transport.flush()

    async def _handle(
        self, sid: int, call: _Call, route: _Route, context: ServerContext
    ) -> tuple[StatusCode, str] | None:
        path = route.method.path
        status: tuple[StatusCode, str] | None = None

        async def send(message: Message) -> None:
            await self._send(sid, call, message)

        with call.scope:
            try:
                data = await self._request(sid, call)
                try:
                    request = route.method.request_type.FromString(data)
                except DecodeError:
                    raise RpcError(StatusCode.INTERNAL, "could not parse request") from None
                if route.unary is not None:
                    await send(await route.unary(request, context))
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

    async def _request(self, sid: int, call: _Call) -> bytes:
        while call.request is None:
            if call.failed is not None:
                raise call.failed
            if call.request_ended:
                raise RpcError(StatusCode.INTERNAL, "request ended without a message")
            call.event = trio.Event()
            await call.event.wait()
        data, size = call.request
        self.transport.protocol.ack(sid, size)
        self.transport.flush()
        return data

    async def _send(self, sid: int, call: _Call, message: Message) -> None:
        try:
            if not call.headers_sent:
                self.transport.protocol.start_response(sid)
                call.headers_sent = True
            await self.transport.send_message(sid, message.SerializeToString())
        except (StreamGone, h2.exceptions.ProtocolError):
            raise RpcError(StatusCode.CANCELLED, "the call is no longer active") from None


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
