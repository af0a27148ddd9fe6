"""gRPC client over a unix socket: one lazily dialled HTTP/2 connection shared by every call.

A call costs no task: the connection's reader task files each message and status into the
call's small state object and wakes whoever waits on it. A caller about to wait for its
call's first message, while no other call waits for one, reads what the socket holds itself
first (``Transport.pull``): an answer that arrived while it was busy is its own at once,
without the reader's turn and then its own. Unconsumed messages stay inside the HTTP/2
flow-control windows, so a slow consumer holds at most one window per stream.

A call's first message, its status and its errors wake the caller at once; later messages
(a stream's updates) are handed over by the connection's one pacing task, at most
``ClientLimits.messages_per_turn`` per turn of the event loop (fewer while the owner says it
is busy), in arrival order. When the
server pushes an update on thousands of streams at once (the SPIRE agent rotating every
SVID), the callers then take turns instead of all running in one long turn, and a new call's
first response, read behind the burst, reaches its caller within a turn or two.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Generic

import trio
from google.protobuf.message import DecodeError

from ._protocol import (
    ConnectionFailed,
    ErrorCodes,
    Event,
    GoAwayReceived,
    MessageReceived,
    NoStreamAvailable,
    ProtocolCore,
    ResponseEnded,
    ResponseStarted,
    SettingsChanged,
    StreamEnded,
    StreamFailed,
    StreamGone,
    StreamReset,
    WindowUpdated,
)
from ._purerpc import ACCEPT_ENCODING
from ._transport import ErrorHook, Transport, encode_timeout, unwrap_group
from .limits import ClientLimits, WireLimits
from .methods import Method, Req, Resp
from .status import RpcError, StatusCode

logger = logging.getLogger(__name__)

USER_AGENT = "trio-spirecsi-grpc"
_START_ATTEMPTS = 3
_REFUSED_RETRIES = 10
_REFUSED_BACKOFF = 0.01

_METADATA_NAME = re.compile(r"[0-9a-z_.-]+")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
_RESET_CODES = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def _status_code(value: int) -> StatusCode:
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


def _reset_error(error_code: int) -> RpcError:
    try:
        name = ErrorCodes(error_code).name
    except ValueError:
        name = str(error_code)
    code = _RESET_CODES.get(error_code, StatusCode.INTERNAL)
    return RpcError(code, f"stream reset by server ({name})")


class ClientCall:
    """What one call has received so far; filled by the reader, drained by the caller."""

    __slots__ = (
        "done",
        "error",
        "heard",
        "live",
        "messages",
        "paced",
        "refused",
        "responded",
        "stream_id",
        "waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.messages: deque[tuple[bytes, int]] = deque()
        self.heard = False  # a message arrived: later ones are paced
        self.paced = False  # waiting in the connection's pacing queue
        self.done = False
        self.error: RpcError | None = None
        self.live = True  # counts against the server's concurrent stream limit
        self.responded = False
        self.refused = False  # the server did not process it: safe to send again
        self.waiter: trio.Event | None = None

    def finish(self, error: RpcError | None) -> None:
        if not self.done:
            self.done, self.error = True, error
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None


class ClientConnection:
    """One HTTP/2 connection of a channel and the calls on it."""

    def __init__(
        self,
        stream: trio.SocketStream,
        path: str,
        limits: ClientLimits,
        on_error: ErrorHook | None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.core = ProtocolCore(client_side=True, limits=WireLimits.for_client(limits))
        self.transport = Transport(
            stream,
            self.core,
            handshake_timeout=limits.handshake_timeout,
            idle_timeout=None,
            max_send_queue_bytes=limits.max_send_queue_bytes,
            log_fields={"side": "client", "socket": path},
            on_error=on_error,
            read_bytes=limits.read_bytes,
        )
        self.path = path
        self.calls: dict[int, ClientCall] = {}
        self.settled = trio.Event()  # the server's SETTINGS arrived, or the connection failed
        self.accepting = True  # new calls may start here
        self.failure: str | None = None
        self._live = 0
        self._per_turn = limits.messages_per_turn
        self._per_busy_turn = limits.messages_per_busy_turn
        self._busy = busy
        self._paced: deque[ClientCall] = deque()
        self._paced_ready = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pace)
            try:
                await self.transport.run(self._on_events, self._lost)
            finally:
                nursery.cancel_scope.cancel()

    async def _pace(self) -> None:
        """Wake the callers of later messages, ``messages_per_turn`` per turn (or
        ``messages_per_busy_turn`` while the channel's owner is busy), in order."""
        queue = self._paced
        busy = self._busy
        while True:
            await self._paced_ready.wait()
            self._paced_ready = trio.Event()
            while queue:
                count = self._per_busy_turn if busy is not None and busy() else self._per_turn
                for _ in range(min(count, len(queue))):
                    call = queue.popleft()
                    call.paced = False
                    call.wake()
                await trio.lowlevel.checkpoint()

    def abort(self, message: str) -> None:
        """Fail every call with UNAVAILABLE(message) and close the connection."""
        self._fail(message)
        self.transport.close(ErrorCodes.NO_ERROR, None, message)

    def _lost(self, end: ConnectionFailed) -> None:
        self._fail(f"connection to {self.path} lost: {end.reason}")

    def _fail(self, message: str) -> None:
        self.accepting = False
        if self.failure is None:
            self.failure = message
        self.settled.set()
        for call in self.calls.values():
            self._end(call, RpcError(StatusCode.UNAVAILABLE, message))

    def _end(self, call: ClientCall, error: RpcError | None) -> None:
        call.finish(error)
        if call.live:
            call.live = False
            self._live -= 1
            self.core.reset(call.stream_id)
            self.transport.flush()
            self.transport.notify()

    def _on_events(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, (WindowUpdated, SettingsChanged)):
                if isinstance(event, SettingsChanged):
                    self.settled.set()
                self.transport.notify()
                continue
            if isinstance(event, GoAwayReceived):
                self._go_away(event)
                continue
            if isinstance(event, ConnectionFailed):
                continue
            call = self.calls.get(event.stream_id)
            if isinstance(event, StreamFailed):
                self.transport.report(event.kind)
            if call is None:
                continue
            if isinstance(event, ResponseStarted):
                call.responded = True
            elif isinstance(event, MessageReceived):
                call.messages.append((event.data, event.size))
                if not call.heard:
                    call.heard = True
                    call.wake()
                elif not call.paced:
                    call.paced = True
                    self._paced.append(call)
                    self._paced_ready.set()
            elif isinstance(event, ResponseEnded):
                error = None
                if event.code != 0:
                    error = RpcError(_status_code(event.code), event.message)
                self._end(call, error)
            elif isinstance(event, StreamEnded):
                self._end(call, RpcError(StatusCode.INTERNAL, "stream ended without a status"))
            elif isinstance(event, StreamReset):
                refused = event.error_code == ErrorCodes.REFUSED_STREAM
                call.refused = refused and not call.responded and not call.done
                self._end(call, _reset_error(event.error_code))
            elif isinstance(event, StreamFailed):
                self._end(call, RpcError(event.code, event.reason))

    def _go_away(self, event: GoAwayReceived) -> None:
        self.accepting = False
        message = f"{self.path} is going away (GOAWAY)"
        for sid, call in self.calls.items():
            if sid > event.last_stream_id:
                self._end(call, RpcError(StatusCode.UNAVAILABLE, message))
        if not self.calls:
            self.transport.close(ErrorCodes.NO_ERROR, None, message)

    async def start_call(
        self, path: str, payload: bytes, deadline: float, metadata: list[tuple[str, str]]
    ) -> ClientCall | None:
        """Open a stream and send the request; None if this connection stopped taking calls.

        Waits for a free stream when the server's MAX_CONCURRENT_STREAMS is reached.
        """
        while True:
            if not self.accepting or self.transport.ended:
                return None
            if self._live < self.core.peer_max_streams:
                headers = _request_headers(path, deadline, metadata)
                try:
                    sid = self.core.open_stream(headers)
                    break
                except NoStreamAvailable:
                    pass
                except StreamGone:
                    return None
            await self.transport.wait_changed()
        call = self.calls[sid] = ClientCall(sid)
        self._live += 1
        try:
            # The headers and the message leave together through send_now below.
            await self.transport.send_message(sid, payload, end_stream=True, flush=False)
        except StreamGone:
            pass  # reset or connection loss: the call's outcome is recorded
        except BaseException:
            self.end_call(call)
            raise
        self.transport.send_now()
        return call

    async def next_message(self, call: ClientCall) -> bytes | None:
        """The next response message, None once the call ended OK; raises its error.

        Before waiting for a call's first message, when no other call waits for its own,
        the caller reads what the socket holds itself (:meth:`Transport.pull`): a response
        that arrived while the caller was busy (a publish writing its metadata) is taken
        without a turn of the reader's. While several calls wait for their first messages
        (publishes in bulk), the reader reads their answers together, in fewer and larger
        reads.
        """
        pulled = call.heard
        while True:
            if call.messages:
                data, size = call.messages.popleft()
                self.core.ack(call.stream_id, size)
                self.transport.flush()
                return data
            if call.done:
                if call.error is not None:
                    raise RpcError(call.error.code, call.error.message)
                return None
            if not pulled:
                pulled = True
                if self.core.awaiting_first <= 1:
                    self.transport.pull()
                    continue
            if call.waiter is None:
                call.waiter = trio.Event()
            await call.waiter.wait()

    def fail_call(self, call: ClientCall, error: RpcError) -> None:
        """End a call locally (deadline, unparsable response): the server learns by RST_STREAM."""
        call.messages.clear()
        call.done, call.error = True, error
        self._end(call, error)

    def end_call(self, call: ClientCall) -> None:
        """The caller is done: cancel the stream if still open and free everything it holds."""
        if self.calls.pop(call.stream_id, None) is None:
            return
        self._end(call, RpcError(StatusCode.CANCELLED, "call cancelled"))
        call.messages.clear()
        self.core.forget(call.stream_id)
        self.transport.flush()
        if not self.accepting and not self.calls:
            self.transport.close(ErrorCodes.NO_ERROR, None, "no calls left")


def _request_headers(
    path: str, deadline: float, metadata: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("grpc-accept-encoding", ACCEPT_ENCODING),
        ("user-agent", USER_AGENT),
    ]
    if deadline != math.inf:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        headers.append(("grpc-timeout", encode_timeout(remaining)))
    return headers + metadata


def _check_metadata(metadata: Mapping[str, str] | None) -> list[tuple[str, str]]:
    items = []
    for key, value in (metadata or {}).items():
        name = key.lower()
        bad_name = not _METADATA_NAME.fullmatch(name) or name.startswith("grpc-")
        if bad_name or name.endswith("-bin") or not _METADATA_VALUE.fullmatch(value):
            raise RpcError(StatusCode.INTERNAL, f"invalid metadata {key!r}")
        items.append((name, value))
    return items


class ResponseStream(Generic[Resp]):
    """The responses of one call, as an async iterator.

    Iteration stops when the call ends OK and raises RpcError otherwise (including
    DEADLINE_EXCEEDED once the call's timeout has passed). A call the server refused without
    processing it (RST_STREAM REFUSED_STREAM before any response) is sent again, as gRPC
    allows; C-core servers do this for a moment after a stream ends at their concurrency limit.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[tuple[ClientConnection, ClientCall]]],
        response_type: type[Resp],
        deadline: float,
    ) -> None:
        self._start = start
        self._conn: ClientConnection | None = None
        self._call: ClientCall | None = None
        self._type = response_type
        self._deadline = deadline

    def __aiter__(self) -> ResponseStream[Resp]:
        return self

    async def _begin(self) -> tuple[ClientConnection, ClientCall]:
        self._conn, self._call = await self._start()
        return self._conn, self._call

    async def _next(self) -> bytes | None:
        """The next message; a call the server refused unprocessed is sent again."""
        assert self._conn is not None and self._call is not None
        for attempt in range(_REFUSED_RETRIES):
            try:
                return await self._conn.next_message(self._call)
            except RpcError:
                if not self._call.refused or attempt == _REFUSED_RETRIES - 1:
                    raise
            self._end()
            await trio.sleep(min(_REFUSED_BACKOFF * attempt, 0.1))
            await self._begin()
        raise AssertionError("unreachable")

    def _end(self) -> None:
        if self._conn is not None and self._call is not None:
            self._conn.end_call(self._call)

    async def __anext__(self) -> Resp:
        if self._deadline == math.inf:  # a subscription: no cancel scope for each message
            return self._decode(await self._next())
        with trio.move_on_at(self._deadline):
            return self._decode(await self._next())
        error = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        self._fail(error)
        raise error

    def _decode(self, data: bytes | None) -> Resp:
        if data is None:
            raise StopAsyncIteration
        try:
            return self._type.FromString(data)
        except DecodeError:
            error = RpcError(StatusCode.INTERNAL, "could not parse response")
            self._fail(error)
            raise error from None

    def _fail(self, error: RpcError) -> None:
        if self._conn is not None and self._call is not None:
            self._conn.fail_call(self._call, error)


class Channel:
    """Calls to one gRPC server on a unix socket; create with :func:`open_channel`.

    One HTTP/2 connection carries every call. It is dialled on first use and again after it
    is lost or the server sends GOAWAY; calls in flight on a lost connection fail UNAVAILABLE.
    Every failure a caller sees is an RpcError; Trio cancellation propagates as usual.
    """

    def __init__(
        self,
        path: str,
        nursery: trio.Nursery,
        limits: ClientLimits,
        on_error: ErrorHook | None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self._path = path
        self._nursery = nursery
        self._limits = limits
        self._on_error = on_error
        self._busy = busy
        self._connect_timeout = limits.handshake_timeout
        self._current: ClientConnection | None = None
        self._running: set[ClientConnection] = set()
        self._dial_lock = trio.Lock()
        self._connections_opened = 0
        self._closed = False

    @property
    def connections_opened(self) -> int:
        """How many HTTP/2 connections this channel has dialled."""
        return self._connections_opened

    async def unary(
        self,
        method: Method[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Resp:
        async with self._open(method, request, timeout, metadata) as responses:
            response = None
            async for message in responses:
                if response is not None:
                    raise RpcError(StatusCode.INTERNAL, "more than one response to a unary call")
                response = message
            if response is None:
                raise RpcError(StatusCode.INTERNAL, "no response to a unary call")
            return response

    def stream(
        self,
        method: Method[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AbstractAsyncContextManager[ResponseStream[Resp]]:
        """A server-streaming call; leaving the block before the stream ended cancels it."""
        return self._open(method, request, timeout, metadata)

    @asynccontextmanager
    async def _open(
        self,
        method: Method[Req, Resp],
        request: Req,
        seconds: float | None,
        metadata: Mapping[str, str] | None,
    ) -> AsyncIterator[ResponseStream[Resp]]:
        deadline = math.inf if seconds is None else trio.current_time() + seconds
        headers = _check_metadata(metadata)
        payload = request.SerializeToString()
        responses = ResponseStream(
            partial(self._start, method.path, payload, deadline, headers),
            method.response_type,
            deadline,
        )
        await responses._begin()
        try:
            yield responses
        finally:
            responses._end()

    async def _start(
        self, path: str, payload: bytes, deadline: float, headers: list[tuple[str, str]]
    ) -> tuple[ClientConnection, ClientCall]:
        with trio.move_on_at(deadline):
            for _ in range(_START_ATTEMPTS):
                conn = await self._connection()
                call = await conn.start_call(path, payload, deadline, headers)
                if call is not None:
                    return conn, call
            raise RpcError(StatusCode.UNAVAILABLE, f"{self._path} keeps closing connections")
        raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")

    async def _connection(self) -> ClientConnection:
        conn = self._current
        if conn is not None and conn.accepting:
            return conn
        async with self._dial_lock:
            conn = self._current
            if conn is None or not conn.accepting:
                conn = self._current = await self._dial()
            return conn

    async def _dial(self) -> ClientConnection:
        where = f"connect to {self._path}"
        if self._closed:
            raise RpcError(StatusCode.UNAVAILABLE, f"{where}: channel is closed")
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await trio.open_unix_socket(self._path)
        except OSError as exc:
            raise RpcError(StatusCode.UNAVAILABLE, f"{where}: {exc.strerror or exc}") from None
        except trio.TooSlowError:
            raise RpcError(StatusCode.UNAVAILABLE, f"{where}: timed out") from None
        conn = ClientConnection(stream, self._path, self._limits, self._on_error, self._busy)
        self._connections_opened += 1
        self._nursery.start_soon(self._run, conn)
        try:
            with trio.move_on_after(self._connect_timeout):
                await conn.settled.wait()
            if not conn.settled.is_set():
                conn.abort(f"{where}: no HTTP/2 settings from the server")
            if conn.failure is not None:
                raise RpcError(StatusCode.UNAVAILABLE, conn.failure)
        except BaseException:
            conn.abort(f"{where}: abandoned")
            raise
        return conn

    async def _run(self, conn: ClientConnection) -> None:
        self._running.add(conn)
        try:
            await conn.run()
        except Exception:  # never reaches open_channel: only this connection is lost
            logger.exception("gRPC client connection to %s failed", self._path)
            conn.abort(f"connection to {self._path} lost: internal error")
        finally:
            self._running.discard(conn)

    def _close(self) -> None:
        """Fail every call in flight with UNAVAILABLE and close the connections."""
        self._closed = True
        for conn in list(self._running):
            conn.abort(f"channel to {self._path} closed")


@asynccontextmanager
async def open_channel(
    path: str,
    *,
    limits: ClientLimits | None = None,
    on_error: ErrorHook | None = None,
    busy: Callable[[], bool] | None = None,
) -> AsyncIterator[Channel]:
    """A channel to the gRPC server listening on the unix socket `path`.

    Nothing is dialled until the first call. Leaving the block closes the connection; calls
    still in flight fail UNAVAILABLE. Whatever the server sends, calls fail with RpcError
    and the next call dials again: nothing from a connection escapes this block.
    ``on_error(kind)`` is told about each connection or stream the server broke (kinds in
    the package docstring); ``limits`` defaults to ``ClientLimits()``. ``busy()`` is True
    while the owner has work in progress that later messages should not hold up (the driver:
    a publish); they are then handed over ``limits.messages_per_busy_turn`` per turn.
    """
    try:
        async with trio.open_nursery() as nursery:
            channel = Channel(path, nursery, limits or ClientLimits(), on_error, busy)
            try:
                yield channel
            finally:
                channel._close()
    except BaseExceptionGroup as group:
        exc = unwrap_group(group)
        raise exc from exc.__cause__
