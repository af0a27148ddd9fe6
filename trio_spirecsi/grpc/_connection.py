"""One gRPC-over-HTTP/2 connection on a Trio socket, shared by the client and the server.

purerpc 0.8.0 supplies the sans-IO protocol core (``GRPCConnection``: HTTP/2 through h2, gRPC
headers, message framing). Its socket, client and server layers are not used: that is where its
defects live (TCP only, no RST_STREAM on cancel, no deadlines, hangs on connection loss,
handler errors sent to clients with their traceback). :class:`Protocol` surfaces what the core
hides (stream resets, GOAWAY, requests and responses it cannot parse, per-stream flow-control
accounting) and never raises from ``receive_data`` for a problem confined to one stream.
:class:`Transport` is the Trio layer: a reader loop that hands events to its owner, a writer
task, and flow-controlled message sending.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.connection import ConnectionState
from h2.settings import SettingCodes
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived
from purerpc.grpclib.exceptions import MessageTooLargeError

from .status import StatusCode

logger = logging.getLogger(__name__)

MAX_MESSAGE = 4 * 1024 * 1024
"""Largest message accepted (gRPC's default); larger ones fail the call RESOURCE_EXHAUSTED."""
STREAM_WINDOW = MAX_MESSAGE + 5
"""Per-stream receive window: one whole message, acknowledged only once it is consumed."""
CONNECTION_WINDOW = 64 * 1024 * 1024
"""Receive window of the whole connection: bounds unconsumed data across all streams."""
_READ_SIZE = 65536
_MAX_FRAME = 2**24 - 1
_MAX_HEADER_LIST = 65536
_CLOSE_GRACE = 1.0

IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
Event = Any  # purerpc events (untyped) and the ones below


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RST_STREAM."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended its side of the stream (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """Something the peer sent on this stream could not be accepted; the stream is unusable."""

    stream_id: int
    code: StatusCode
    reason: str


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Request headers that do not form a gRPC call (the server answers with an error)."""

    stream_id: int
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    pass


class _H2(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 with two changes that matter at thousands of streams and on graceful shutdown."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._next_scan = 64

    def _open_streams(self, remainder: int) -> int:
        # h2 scans every stream each time one is opened; with thousands of long-lived streams
        # that is quadratic. Below every limit the size of the table is a safe upper bound.
        # A full scan (which also drops closed streams) runs once the table has doubled.
        size = len(self.streams)
        limit = min(
            self.local_settings.max_concurrent_streams, self.remote_settings.max_concurrent_streams
        )
        if size < self._next_scan and size + 1 < limit:
            return size
        count: int = super()._open_streams(remainder)
        self._next_scan = 2 * len(self.streams) + 64
        return count

    def _receive_goaway_frame(self, frame: Any) -> Any:
        # h2 closes the whole connection on GOAWAY, which would fail the streams the peer
        # promised to finish; keep it open and let the owner stop opening new streams.
        if self.state_machine.state not in (
            ConnectionState.CLIENT_OPEN,
            ConnectionState.SERVER_OPEN,
        ):
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class Protocol(GRPCConnection):  # type: ignore[misc]
    """purerpc's protocol core, with resets, GOAWAY and per-stream failures as events.

    Every received DATA byte is counted per stream until :meth:`ack` (the message was consumed)
    or :meth:`forget` (the stream is finished with) hands it back to the peer's window.
    """

    def __init__(self, client_side: bool) -> None:
        super().__init__(GRPCConfiguration(client_side=client_side, max_message_length=MAX_MESSAGE))
        self.h2_connection = _H2(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()
        self._unacked: dict[int, int] = {}

    def _set_h2_connection_local_settings(self) -> None:
        self.h2_connection.local_settings = h2.settings.Settings(
            client=self.config.client_side,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.MAX_CONCURRENT_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
            },
        )
        self.h2_connection.max_inbound_frame_size = _MAX_FRAME

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        self.h2_connection.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def ack(self, stream_id: int, size: int) -> None:
        """Hand `size` consumed bytes of `stream_id` back to the peer's send window."""
        pending = self._unacked.get(stream_id)
        if pending is None:
            return
        self._unacked[stream_id] = pending - size
        self.h2_connection.acknowledge_received_data(size, stream_id)

    def forget(self, stream_id: int) -> None:
        """Drop the stream's buffers and release every byte it still holds to the peer."""
        self.message_read_buffers.pop(stream_id, None)
        pending = self._unacked.pop(stream_id, 0)
        if pending > 0:
            self.h2_connection.acknowledge_received_data(pending, stream_id)

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Send RST_STREAM unless the stream is already closed."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2_connection.reset_stream(stream_id, error_code)

    def _request_received(self, event: h2.events.RequestReceived) -> list[Event]:
        path = next((v for k, v in event.headers if k == ":path"), "")
        try:
            return list(super()._request_received(event))
        except Exception as exc:  # any malformed header set, whatever purerpc raised for it
            return [RequestRejected(event.stream_id, path, str(exc) or type(exc).__name__)]

    def _response_received(self, event: h2.events.ResponseReceived) -> list[Event]:
        try:
            return list(super()._response_received(event))
        except Exception as exc:
            return [StreamFailed(event.stream_id, StatusCode.INTERNAL, f"bad response: {exc}")]

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Event]:
        try:
            return list(super()._trailers_received(event))
        except Exception as exc:
            return [StreamFailed(event.stream_id, StatusCode.INTERNAL, f"bad trailers: {exc}")]

    def _data_received(self, event: h2.events.DataReceived) -> list[Event]:
        sid, size = event.stream_id, event.flow_controlled_length
        buffer = self.message_read_buffers.get(sid)
        if buffer is None:
            self.h2_connection.acknowledge_received_data(size, sid)
            return []
        self._unacked[sid] = self._unacked.get(sid, 0) + size
        try:
            buffer.data_received(event.data, size)
        except MessageTooLargeError as exc:
            self.message_read_buffers.pop(sid, None)
            return [StreamFailed(sid, StatusCode.RESOURCE_EXHAUSTED, str(exc))]
        except Exception as exc:  # undecodable compressed message
            self.message_read_buffers.pop(sid, None)
            return [StreamFailed(sid, StatusCode.INTERNAL, f"bad message: {exc}")]
        return [
            MessageReceived(sid, data, n)
            for data, n in buffer.read_all_complete_messages_flowcontrol()
        ]

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[Event]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamEnded(event.stream_id)]

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Event]:
        self.forget(event.stream_id)
        return [StreamReset(event.stream_id, int(event.error_code))]

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[Event]:
        return [SettingsChanged()]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Event]:
        return [GoAway(event.last_stream_id, int(event.error_code))]


class StreamGone(Exception):
    """The stream was reset or the connection ended while sending on it."""


class Transport:
    """One HTTP/2 connection on a socket stream.

    The owner calls :meth:`run`, which reads, hands each batch of protocol events to the
    owner's (synchronous) callback and writes whatever the protocol has to send. Any task may
    change the protocol state and then call :meth:`flush`. Once :meth:`run` returns the socket
    is closed and :attr:`error` says why the connection ended.
    """

    def __init__(self, stream: trio.SocketStream, client_side: bool) -> None:
        self.protocol = Protocol(client_side)
        self.h2 = self.protocol.h2_connection
        self.error: str | None = None
        self._stream = stream
        self._dirty = trio.Event()
        self._changed = trio.Event()
        self._writing = False

    def flush(self) -> None:
        self._dirty.set()

    def notify(self) -> None:
        """Wake every task waiting in :meth:`wait_changed` (window, stream or connection news)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def run(
        self,
        on_events: Callable[[Sequence[Event]], None],
        on_close: Callable[[str], None],
    ) -> None:
        """Serve the connection until it fails or the caller is cancelled.

        `on_close(cause)` runs once, before the socket is closed, however the run ends.
        """
        self.protocol.initiate_connection()
        self.flush()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, nursery.cancel_scope)
                await self._read_loop(on_events)
                nursery.cancel_scope.cancel()
        finally:
            if self.error is None:
                self.error = "connection closed"
            try:
                on_close(self.error)
            finally:
                self.notify()
                with trio.CancelScope(shield=True):
                    await self._close()

    async def _read_loop(self, on_events: Callable[[Sequence[Event]], None]) -> None:
        while self.error is None:
            try:
                data = await self._stream.receive_some(_READ_SIZE)
            except IO_ERRORS as exc:
                self.error = _describe(exc)
                return
            if not data:
                self.error = "connection closed by peer"
                return
            try:
                events = self.protocol.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self.error = f"HTTP/2 protocol error: {exc}"
                self.flush()
                return
            try:
                on_events(events)
            except Exception:
                logger.exception("gRPC connection event handling failed")
                self.error = "internal error"
                return
            self.flush()

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                data = self.h2.data_to_send()
                if data:
                    self._writing = True
                    await self._stream.send_all(data)
                    self._writing = False
        except IO_ERRORS as exc:
            self._writing = False
            if self.error is None:
                self.error = _describe(exc)
            scope.cancel()

    async def _close(self) -> None:
        """Best effort: send what is pending plus GOAWAY, then close the socket."""
        if not self._writing:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            with trio.move_on_after(_CLOSE_GRACE):
                with contextlib.suppress(*IO_ERRORS):
                    await self._stream.send_all(self.h2.data_to_send())
        await self._stream.aclose()

    async def send_message(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Send one gRPC message as the peer's flow-control windows allow.

        Raises StreamGone if the stream is reset or the connection ends first.
        """
        await trio.lowlevel.checkpoint()
        payload = struct.pack(">?I", False, len(data)) + data
        while True:
            if self.error is not None:
                raise StreamGone
            try:
                window = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if window > 0:
                    chunk, payload = payload[:window], payload[window:]
                    self.h2.send_data(stream_id, chunk, end_stream=end_stream and not payload)
                    self.flush()
                    if not payload:
                        return
                    continue
            except h2.exceptions.ProtocolError as exc:
                raise StreamGone from exc
            await self.wait_changed()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def encode_timeout(seconds: float) -> str:
    """grpc-timeout value: at most 8 digits, rounded up so the peer never sees less."""
    for unit, scale in (("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = math.ceil(seconds * scale)
        if value < 10**8:
            return f"{max(value, 1)}{unit}"
    return "99999999H"


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a nursery body raised, so that callers never see ExceptionGroup.

    Background tasks here never raise (except Cancelled), so a group holds the body's exception
    plus, at most, Cancelled from those tasks.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    others = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(others) == 1:
        return others[0]
    return group if others else leaves[0]
