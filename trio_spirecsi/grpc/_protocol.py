"""Sans-IO gRPC over HTTP/2: received bytes in, the project's own events out, bytes to send.

Received bytes meet three layers, in this order:

1. :class:`FrameScanner` reads the 9-byte frame headers of the byte stream and enforces, before
   h2 allocates anything: the client preface and a first SETTINGS frame, the frame size limit,
   the size and CONTINUATION count of a header block, and the control-frame and new-stream
   budgets. It hands h2 whole frames one at a time (h2's own buffer is quadratic in the
   number of frames per call) and drops unknown frame types without buffering them.
2. :class:`_H2Connection` is h2 3.2 with ``header_encoding=None`` (header bytes are decoded
   by the project, strictly) and the fixes the project needs: WINDOW_UPDATE on a stream
   already closed and forgotten is not a connection error; a stream beyond
   MAX_CONCURRENT_STREAMS is refused with RST_STREAM REFUSED_STREAM instead of ending the
   connection; GOAWAY keeps the connection open for the streams it lets finish; HPACK errors
   are COMPRESSION_ERROR; counting open streams is not quadratic. A DATA frame on a stream
   open for receiving (END_STREAM or not) skips h2's per-frame machinery
   (:meth:`ProtocolCore._receive_data`), with the same outcome. The header lists the
   engine sends (requests, responses, trailers) go out as blocks of HPACK's static table
   (:mod:`._hpack`), encoded once per list, through :meth:`_H2Connection.send_header_list`,
   and DATA through :meth:`_H2Connection.send_data_frame`: h2's checks and state changes,
   not its encoder or frame objects. Received header blocks are decoded by
   :class:`._hpack.Decoder` (hpack's decoder with a faster loop) and checked by
   :func:`._received.check_received` (h2's inbound pipeline in one pass), with h2's
   results.
3. :class:`ProtocolCore` decodes header bytes as printable ASCII (anything else fails that
   stream), parses gRPC headers and reassembles messages (through ``_purerpc``), counts every
   received byte per stream until the owner acknowledges the message it belongs to, and
   emits the frozen events below.

:meth:`ProtocolCore.receive` never raises: whatever the peer sends, or whatever goes wrong
while handling it, ends at worst in a :class:`ConnectionFailed` event with GOAWAY queued.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.utilities
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes as ErrorCodes
from h2.settings import SettingCodes
from h2.stream import StreamInputs, StreamState
from hyperframe.frame import HeadersFrame

from ..ratelimit import TokenBucket
from ._hpack import Decoder, static_block
from ._purerpc import (
    ENCODINGS,
    RESPONSE_HEADERS,
    BadMessage,
    HeaderError,
    Headers,
    MessageReader,
    MessageTooLarge,
    Metadata,
    parse_request,
    parse_response,
    parse_trailers,
    status_headers,
)
from ._received import check_received
from .limits import WireLimits
from .status import StatusCode

# The ``kind`` of every failure a peer can cause (``on_error`` hooks receive these).
PROTOCOL_ERROR = "grpc_protocol_error"
LIMIT_EXCEEDED = "grpc_limit_exceeded"
FLOOD = "grpc_flood"
SLOW_READER = "grpc_slow_reader"
HANDSHAKE_TIMEOUT = "grpc_handshake_timeout"
TOO_MANY_CONNECTIONS = "grpc_too_many_connections"
INTERNAL_ERROR = "grpc_internal_error"
STREAM_REFUSED = "grpc_stream_refused"
MESSAGE_TOO_LARGE = "grpc_message_too_large"
BAD_STREAM = "grpc_bad_stream"
ERROR_KINDS = (
    PROTOCOL_ERROR,
    LIMIT_EXCEEDED,
    FLOOD,
    SLOW_READER,
    HANDSHAKE_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    INTERNAL_ERROR,
    STREAM_REFUSED,
    MESSAGE_TOO_LARGE,
    BAD_STREAM,
)
"""Every ``kind`` an ``on_error`` hook may receive."""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0, 1, 2, 3, 4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 5, 6, 7, 8, 9
# Frames in a client's backlog that a waiting stream's frames may overtake: each concerns
# one other stream, or what we send (PING, WINDOW_UPDATE). HEADERS and CONTINUATION (one
# HPACK table for all streams), SETTINGS, PRIORITY and GOAWAY keep every later frame behind.
_OVERTAKEN = frozenset((_DATA, _RST_STREAM, _PING, _WINDOW_UPDATE))
_FRAME_NAMES = (
    "DATA",
    "HEADERS",
    "PRIORITY",
    "RST_STREAM",
    "SETTINGS",
    "PUSH_PROMISE",
    "PING",
    "GOAWAY",
    "WINDOW_UPDATE",
    "CONTINUATION",
)
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20
_PLAIN_HEADERS = _END_HEADERS | _PADDED | _PRIORITY_FLAG
_CONNECTION = b"\x00\x00\x00\x00"  # stream 0
_PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"  # a PING ACK frame's header
_MAX_WINDOW = 2**31 - 1
_HEADERS_ONLY = ("END_HEADERS",)
_HEADERS_END_STREAM = ("END_HEADERS", "END_STREAM")
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_REASON_LENGTH = 200
_CLIENT_STREAMS = 100
_BLOCKS_KEPT = 256  # header blocks remembered by _H2Connection.send_header_list ...
_BLOCK_KEPT_BYTES = 512  # ... if no larger: a status message may quote what a peer sent

HeaderList: TypeAlias = tuple[tuple[bytes, bytes], ...]


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """Server: a client opened a stream with valid gRPC request headers."""

    stream_id: int
    path: str
    timeout: float | None
    """Seconds from grpc-timeout, None without one."""
    metadata: Metadata
    """Custom metadata in arrival order; ``-bin`` values are bytes."""


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server: request headers that do not form a gRPC call; answer with ``code``."""

    stream_id: int
    path: str
    """The :path if it was readable, else empty."""
    code: StatusCode
    reason: str
    kind: str


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """Client: the server's response headers (not trailers-only)."""

    stream_id: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One whole message; ``size`` flow-controlled bytes to acknowledge once consumed."""

    stream_id: int
    data: bytes
    size: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended its side of the stream (end of request, or of response data)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ResponseEnded:
    """Client: trailers (or a trailers-only response) carrying the call's status."""

    stream_id: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RST_STREAM."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Server: a stream beyond MAX_CONCURRENT_STREAMS, refused with RST_STREAM."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """Something the peer sent on this stream cannot be accepted; the stream is unusable."""

    stream_id: int
    code: StatusCode
    reason: str
    kind: str


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer sent GOAWAY: streams above ``last_stream_id`` were not processed."""

    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer opened a send window (``stream_id`` 0: the connection's)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The peer's SETTINGS arrived (first one: the handshake is complete on a client)."""


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The connection is over: GOAWAY with ``error_code`` is queued, nothing more is read.

    ``kind`` is None for an orderly close (idle, shutdown), else one of the kinds above.
    ``error`` is our own exception when the cause was a bug here, for the log.
    """

    error_code: int
    reason: str
    kind: str | None
    error: Exception | None = None


Event: TypeAlias = (
    RequestStarted
    | RequestRejected
    | ResponseStarted
    | MessageReceived
    | StreamEnded
    | ResponseEnded
    | StreamReset
    | StreamRefused
    | StreamFailed
    | GoAwayReceived
    | WindowUpdated
    | SettingsChanged
    | ConnectionFailed
)


# ---------------------------------------------------------------------------------------------
# Frame pre-scanner


class StreamGone(Exception):
    """The stream was reset or closed, or the connection ended: nothing more can be sent."""


class NoStreamAvailable(Exception):
    """The peer's MAX_CONCURRENT_STREAMS is reached: wait for a stream to end."""


class Violation(Exception):
    """The peer broke HTTP/2 or one of our limits: a connection error."""

    def __init__(self, error_code: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.kind = kind
        self.reason = reason


def _frame_name(frame_type: int) -> str:
    if frame_type < len(_FRAME_NAMES):
        return _FRAME_NAMES[frame_type]
    return f"unknown (type {frame_type})"


class _Now:
    """A monotonic time that its owner moves forward and budgets read."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


class FrameScanner:
    """Splits received bytes into whole frames and enforces limits frame header by header.

    Each frame header is checked (and budgets charged) exactly once, as soon as its 9 bytes
    are in; a frame's payload is buffered only up to the frame size limit, and an unknown
    frame's payload not at all.
    """

    def __init__(self, *, server: bool, limits: WireLimits) -> None:
        self._limits = limits
        self._server = server
        self._preface = PREFACE if server else b""
        self._buffer = bytearray()
        self._current: int | None = None  # payload length of the checked frame being read
        self._skip = 0  # payload bytes of an unknown frame still to drop
        self._block: tuple[int, int, int] | None = None  # stream, frames, bytes of a block
        self._settings_seen = False
        self._highest_stream = 0
        # The budgets read the time through their own holder, not through a method of the
        # scanner: no reference cycle, so a closed connection is freed by reference counting.
        self._now = _Now()
        self._control = TokenBucket(
            limits.control_frames_per_second, limits.control_frame_burst, clock=self._now
        )
        self._streams = TokenBucket(
            limits.new_streams_per_second, limits.new_stream_burst, clock=self._now
        )

    @property
    def handshake_done(self) -> bool:
        """The client preface (on a server) and the peer's first SETTINGS frame arrived."""
        return self._settings_seen

    def feed(self, data: bytes, now: float) -> list[bytes]:
        """Whole frames to hand to h2, in order (on a server the preface comes first).

        Raises Violation at the first frame header that breaks a rule.
        """
        self._now.value = max(self._now.value, now)
        frames: list[bytes] = []
        if self._preface:
            size = min(len(self._preface), len(data))
            if data[:size] != self._preface[:size]:
                raise Violation(ErrorCodes.PROTOCOL_ERROR, PROTOCOL_ERROR, "no HTTP/2 preface")
            self._preface = self._preface[size:]
            data = data[size:]
            if not self._preface:
                frames.append(PREFACE)
        if self._skip:
            size = min(self._skip, len(data))
            self._skip -= size
            data = data[size:]
        buffer = self._buffer
        buffer += data
        pos = 0
        end = len(buffer)
        while True:
            if self._current is None:
                if end - pos < 9:
                    break
                length = int.from_bytes(buffer[pos : pos + 3], "big")
                frame_type, flags = buffer[pos + 3], buffer[pos + 4]
                stream_id = int.from_bytes(buffer[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                self._check(length, frame_type, flags, stream_id)
                if frame_type > _CONTINUATION:
                    pos += 9
                    size = min(length, end - pos)
                    pos += size
                    self._skip = length - size
                    if self._skip:
                        break
                    continue
                self._current = length
            if end - pos < 9 + self._current:
                break
            frames.append(bytes(buffer[pos : pos + 9 + self._current]))
            pos += 9 + self._current
            self._current = None
        del buffer[:pos]
        return frames

    def _spend(self, what: str) -> None:
        if not self._control.take():
            raise Violation(
                ErrorCodes.ENHANCE_YOUR_CALM, FLOOD, f"too many control frames ({what})"
            )

    def _check(self, length: int, frame_type: int, flags: int, stream_id: int) -> None:
        limits = self._limits
        name = _frame_name(frame_type)
        if length > limits.max_frame_bytes:
            raise Violation(
                ErrorCodes.FRAME_SIZE_ERROR,
                PROTOCOL_ERROR,
                f"{name} frame of {length} bytes, larger than {limits.max_frame_bytes}",
            )
        if not self._settings_seen:
            if frame_type != _SETTINGS or flags & _ACK:
                raise Violation(
                    ErrorCodes.PROTOCOL_ERROR,
                    PROTOCOL_ERROR,
                    f"first frame is {name}, not SETTINGS",
                )
            self._settings_seen = True
        if self._block is not None:
            block_stream, count, size = self._block
            if frame_type != _CONTINUATION or stream_id != block_stream:
                raise Violation(
                    ErrorCodes.PROTOCOL_ERROR, PROTOCOL_ERROR, f"{name} frame inside a header block"
                )
            self._block = (block_stream, count + 1, size + length)
            self._check_block()
            if flags & _END_HEADERS:
                self._block = None
            if length == 0:
                self._spend("empty CONTINUATION")
            return
        if frame_type in (_HEADERS, _PUSH_PROMISE):
            self._block = (stream_id, 0, length)
            self._check_block()
            if flags & _END_HEADERS:
                self._block = None
            if frame_type == _HEADERS and self._server and stream_id > self._highest_stream:
                self._highest_stream = stream_id
                if not self._streams.take():
                    raise Violation(
                        ErrorCodes.ENHANCE_YOUR_CALM, FLOOD, "new streams opened too fast"
                    )
            if length == 0 and not flags & _END_STREAM:
                self._spend(f"empty {name}")
        elif frame_type == _DATA:
            if length == 0 and not flags & _END_STREAM:
                self._spend("empty DATA")
        elif frame_type == _CONTINUATION:
            raise Violation(
                ErrorCodes.PROTOCOL_ERROR, PROTOCOL_ERROR, "CONTINUATION outside a header block"
            )
        else:
            self._spend(name)

    def _check_block(self) -> None:
        assert self._block is not None
        _, count, size = self._block
        limits = self._limits
        if count > limits.max_continuation_frames:
            raise Violation(
                ErrorCodes.ENHANCE_YOUR_CALM,
                LIMIT_EXCEEDED,
                f"header block in more than {limits.max_continuation_frames} CONTINUATION frames",
            )
        if size > limits.max_header_list_bytes:
            raise Violation(
                ErrorCodes.ENHANCE_YOUR_CALM,
                LIMIT_EXCEEDED,
                f"header block larger than {limits.max_header_list_bytes} bytes",
            )


# ---------------------------------------------------------------------------------------------
# h2


class _Refused(h2.events.Event):  # type: ignore[misc]
    """Stands in for the RequestReceived of a stream refused at the concurrency limit."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _H2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 with the project's fixes; see the module docstring."""

    def __init__(self, client_side: bool, limits: WireLimits) -> None:
        # Received header lists are normalised and validated by check_received, as h2 would.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        super().__init__(config)
        # A client accepts no stream (push is disabled), but h2 checks this limit before it
        # finds out that response HEADERS belong to a stream it already forgot: keep h2's.
        streams = _CLIENT_STREAMS if client_side else limits.max_concurrent_streams
        values = {
            SettingCodes.MAX_CONCURRENT_STREAMS: streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_bytes,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }
        if client_side:
            values[SettingCodes.ENABLE_PUSH] = 0
        self.local_settings = h2.settings.Settings(client=client_side, initial_values=values)
        self.max_inbound_frame_size = limits.max_frame_bytes
        self.decoder = Decoder()
        self.decoder.max_header_list_size = limits.max_header_list_bytes
        self._stream_limit = limits.max_concurrent_streams
        self._admit_all = False
        self._next_scan = 64

    @property
    def outbound_pending(self) -> int:
        """Bytes produced and not yet taken by :meth:`data_to_send`."""
        return len(self._data_to_send)

    def queue_raw(self, data: bytes) -> None:
        """Append bytes built without h2 (a GOAWAY when h2's state no longer allows one)."""
        self._data_to_send += data

    def send_header_list(
        self, stream_id: int, headers: HeaderList, *, end_stream: bool = False
    ) -> None:
        """``send_headers`` (without priority) for a header list of the engine's own, with
        the same checks, state changes and exceptions, at a fraction of its cost: the block
        comes from :func:`.static_block`, remembered per header list and kind (request,
        response, trailers), and the frames are built by hand. h2 normalises and validates a
        list the first time it is seen, exactly as ``send_headers`` would. A pending HPACK
        table size update goes through ``send_headers``, which sends it.
        """
        if self.encoder.header_table.resized:
            self.send_headers(stream_id, headers, end_stream=end_stream)
            return
        if stream_id not in self.streams:
            limit = self.remote_settings.max_concurrent_streams
            if self.open_outbound_streams + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(
                    f"Max outbound streams is {limit}, {self.open_outbound_streams} open"
                )
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        stream = self._get_or_create_stream(stream_id, AllowedStreamIDs(self.config.client_side))
        machine = stream.state_machine
        informational = not machine.client and h2.utilities.is_informational_response(headers)
        if informational and end_stream:
            raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses.")
        events = machine.process_input(
            StreamInputs.SEND_INFORMATIONAL_HEADERS if informational else StreamInputs.SEND_HEADERS
        )
        block = self._header_block(headers, stream._build_hdr_validation_flags(events))
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        if machine.trailers_sent and not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        if machine.client and stream._authority is None:
            stream._authority = h2.utilities.authority_from_headers(headers)
        stream.request_method = h2.utilities.extract_method_header(headers)
        size = int(self.max_outbound_frame_size)
        sid = stream_id.to_bytes(4, "big")
        kind, flags = _HEADERS, _END_STREAM if end_stream else 0
        for start in range(0, max(len(block), 1), size):
            chunk = block[start : start + size]
            if start + size >= len(block):
                flags |= _END_HEADERS
            self._data_to_send += len(chunk).to_bytes(3, "big") + bytes((kind, flags)) + sid
            self._data_to_send += chunk
            kind, flags = _CONTINUATION, 0

    def send_data_frame(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """``send_data`` (without padding): the same checks, state changes, windows and
        exceptions, with the frame built by hand. A stream h2 no longer holds goes through
        ``send_data``, which raises what it raises for it."""
        stream = self.streams.get(stream_id)
        if stream is None:
            self.send_data(stream_id, data, end_stream=end_stream)
            return
        size = len(data)
        window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        if size > window:
            raise h2.exceptions.FlowControlError(
                f"Cannot send {size} bytes, flow control window is {window}."
            )
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"Cannot send frame size {size}, max frame size is {self.max_outbound_frame_size}"
            )
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        head = size.to_bytes(3, "big") + bytes((_DATA, _END_STREAM if end_stream else 0))
        self._data_to_send += head + stream_id.to_bytes(4, "big") + data
        self.outbound_flow_control_window -= size

    def receive_headers(self, frame: bytes) -> Any:
        """``receive_data`` for one whole HEADERS frame with END_HEADERS and neither PADDED
        nor PRIORITY (every request and response of a gRPC peer): its frame object is built
        directly instead of through h2's frame buffer and hyperframe's parser, then handled
        exactly as ``receive_data`` handles it. Anything else goes through ``receive_data``."""
        sid = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        if not sid:
            return self.receive_data(frame)
        # FrameScanner already hands over whole frames within the size limit, never inside
        # a header block and never before the preface: checked again, as receive_data would.
        buffered = self.incoming_buffer
        if buffered.data or buffered._headers_buffer or buffered._preamble_len:
            return self.receive_data(frame)
        if len(frame) - 9 > self.max_inbound_frame_size:
            return self.receive_data(frame)
        flags = _HEADERS_END_STREAM if frame[4] & _END_STREAM else _HEADERS_ONLY
        parsed = HeadersFrame(sid, frame[9:], flags=flags)
        parsed.body_len = len(frame) - 9
        try:
            return self._receive_frame(parsed)
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)
            raise

    def _header_block(self, headers: HeaderList, flags: Any) -> bytes:
        key = (flags, headers)
        block = _BLOCKS.get(key)
        if block is None:
            fields: Iterable[Any] = headers
            if self.config.normalize_outbound_headers:
                fields = h2.utilities.normalize_outbound_headers(fields, flags)
            if self.config.validate_outbound_headers:
                fields = h2.utilities.validate_outbound_headers(fields, flags)
            block = static_block(fields)
            if len(block) <= _BLOCK_KEPT_BYTES:
                if len(_BLOCKS) >= _BLOCKS_KEPT:
                    _BLOCKS.clear()
                _BLOCKS[key] = block
        return block

    def _open_streams(self, remainder: int) -> int:
        # h2 scans every stream each time one is opened; with thousands of long-lived streams
        # that is quadratic. Below the limit that applies (the peer's for streams we open, ours
        # for the peer's) the size of the table is a safe upper bound. A full scan (which also
        # drops closed streams) runs once the table has doubled.
        size = len(self.streams)
        outbound = remainder == int(self.config.client_side)
        settings = self.remote_settings if outbound else self.local_settings
        if size < self._next_scan and size + 1 < settings.max_concurrent_streams:
            return size
        count: int = super()._open_streams(remainder)
        self._next_scan = 2 * len(self.streams) + 64
        return count

    @property
    def open_inbound_streams(self) -> int:
        if self._admit_all:
            return 0
        count: int = h2.connection.H2Connection.open_inbound_streams.fget(self)
        return count

    def _receive_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_frame(frame)
        except h2.exceptions.DenialOfServiceError:
            raise
        except h2.exceptions.ProtocolError as exc:
            if isinstance(exc.__context__, h2.connection.HPACKError):
                exc.error_code = ErrorCodes.COMPRESSION_ERROR
            raise

    def _receive_headers_frame(self, frame: Any) -> Any:
        sid = frame.stream_id
        refuse = (
            not self.config.client_side
            and sid not in self.streams
            and self.open_inbound_streams >= self._stream_limit
        )
        # A stream beyond the limit is decoded all the same (HPACK state is per connection),
        # then refused.
        self._admit_all = refuse
        # h2's own pipeline is off (see __init__): check_received does its work. With
        # PRIORITY, h2 checks the header list before the priority: let it, in its order.
        config = self.config
        switched = not config.validate_inbound_headers and "PRIORITY" in frame.flags
        if switched:
            config.validate_inbound_headers = config.normalize_inbound_headers = True
        by_h2 = config.validate_inbound_headers
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._admit_all = False
            if switched:
                config.validate_inbound_headers = config.normalize_inbound_headers = False
        if not by_h2:
            for event in events:
                if isinstance(event, _HEADER_EVENTS):
                    flags = self.streams[sid]._build_hdr_validation_flags([event])
                    event.headers = check_received(event.headers, flags)
                    break
        if not refuse:
            return frames, events
        self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        kept = [e for e in events if getattr(e, "stream_id", None) != sid]
        return frames, [*kept, _Refused(sid)]

    def _receive_window_update_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:
            # RFC 9113 5.1: WINDOW_UPDATE may arrive for a while after END_STREAM was sent.
            if frame.stream_id and frame.stream_id not in self.streams:
                return [], []
            raise

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


_HEADER_EVENTS = (
    h2.events.RequestReceived,
    h2.events.ResponseReceived,
    h2.events.TrailersReceived,
    h2.events.InformationalResponseReceived,
)

# Header blocks by (validation flags, header list); shared by every connection: a block built
# from the static table alone means the same on any of them.
_BLOCKS: dict[tuple[Any, HeaderList], bytes] = {}


def goaway_bytes(error_code: int, reason: str, last_stream_id: int = 0) -> bytes:
    """A GOAWAY frame built by hand, for when no h2 connection can (or need) build it."""
    debug = reason.encode("ascii", "replace")[:_REASON_LENGTH]
    payload = struct.pack(">II", last_stream_id & 0x7FFFFFFF, error_code) + debug
    return struct.pack(">I", len(payload))[1:] + bytes([_GOAWAY, 0]) + b"\0\0\0\0" + payload


def refusal_bytes(reason: str) -> bytes:
    """What a server sends a connection it will not serve: SETTINGS, then GOAWAY."""
    settings = b"\0\0\0" + bytes([_SETTINGS, 0]) + b"\0\0\0\0"
    return settings + goaway_bytes(ErrorCodes.ENHANCE_YOUR_CALM, reason)


def safe_text(text: str) -> str:
    """Printable ASCII, at most 200 characters: fit for a log line or GOAWAY debug data."""
    cleaned = text.encode("ascii", "backslashreplace").decode("ascii")
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in cleaned)
    return cleaned[:_REASON_LENGTH]


def _decode_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers | None:
    """Header bytes as str, or None unless every name and value is printable ASCII."""
    decoded = []
    for name, value in headers:
        if _NOT_PRINTABLE.search(name) or _NOT_PRINTABLE.search(value):
            return None
        decoded.append((name.decode("ascii"), value.decode("ascii")))
    return decoded


def _raw_path(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b":path":
            if _NOT_PRINTABLE.search(value):
                return ""
            return value.decode("ascii")
    return ""


def _encode(headers: Headers) -> HeaderList:
    return tuple((name.encode("ascii"), value.encode("ascii")) for name, value in headers)


_RESPONSE = _encode(RESPONSE_HEADERS)
_OK_TRAILERS = _encode(status_headers(StatusCode.OK, "", trailers_only=False))


# ---------------------------------------------------------------------------------------------
# The core


class ProtocolCore:
    """One gRPC-over-HTTP/2 connection, without I/O: the client's or the server's side.

    Every DATA byte received on a stream with a reader is counted until :meth:`ack` (its
    message was consumed) or :meth:`forget` (the stream is finished with) hands it back to
    the peer's window, so unconsumed data stays within the advertised windows.
    """

    def __init__(self, *, client_side: bool, limits: WireLimits) -> None:
        self.client_side = client_side
        self.limits = limits
        self.h2 = _H2Connection(client_side, limits)
        self._scanner = FrameScanner(server=not client_side, limits=limits)
        self._readers: dict[int, MessageReader] = {}
        self._unacked: dict[int, int] = {}
        self.failure: ConnectionFailed | None = None
        self._backlog: deque[bytes] = deque()  # frames read, not processed yet (a client's)
        self._backlog_bytes = 0
        self._barrier = False  # the backlog holds a frame nothing may overtake
        self._awaiting: set[int] = set()  # our streams still waiting for their first message

    @property
    def handshake_done(self) -> bool:
        return self._scanner.handshake_done

    @property
    def outbound_pending(self) -> int:
        return self.h2.outbound_pending

    def initiate(self) -> None:
        """Queue our preface: SETTINGS, then the connection window beyond the default."""
        self.h2.initiate_connection()
        extra = self.limits.connection_window - DEFAULT_WINDOW
        if extra > 0:
            self.h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        data: bytes = self.h2.data_to_send()
        return data

    def release(self) -> None:
        """The connection is over: break h2's one reference cycle (its table of frame
        handlers holds bound methods of the connection), so that reference counting frees
        the whole connection at once and the cycle collector never has to find it. Nothing
        may be received afterwards."""
        self.h2._frame_dispatch_table = {}

    # -- receiving

    @property
    def backlogged(self) -> bool:
        """Frames were read and not processed yet: :meth:`receive` takes the next ones (pass
        ``b""`` when nothing more was read), or :meth:`drain` all of them."""
        return bool(self._backlog)

    @property
    def backlog_bytes(self) -> int:
        return self._backlog_bytes

    @property
    def awaiting_first(self) -> int:
        """How many of our streams wait for their first message."""
        return len(self._awaiting)

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Events for these received bytes (``now``: a monotonic clock, for the budgets).

        On a client, once frames are read faster than ``frames_per_step`` at a time, the
        rest wait in a backlog for the next calls. The frames of a stream still waiting for
        its first message (and its later frames in the same read: a unary call's status)
        are processed at once, ahead of the backlog, for as long as the backlog holds
        nothing but DATA, RST_STREAM, PING and WINDOW_UPDATE frames, which they may
        overtake: those concern other streams or what we send, and the connection window
        counts every DATA frame in the end. Everything else keeps its order.
        """
        if self.failure is not None:
            return []
        events: list[Event] = []
        try:
            frames = self._scanner.feed(data, now)
        except Violation as exc:
            events = self.drain()  # what was read before the violation counts
            events.append(self.fail(exc.error_code, exc.kind, exc.reason))
            return events
        budget = self.limits.frames_per_step
        backlog = self._backlog
        if not budget or (not backlog and len(frames) <= budget):
            for frame in frames:
                if self._process(frame, events):
                    return events
            return events
        awaiting = self._awaiting
        ahead: set[int] = set()  # streams that were waiting as their frames came in
        for frame in frames:
            if (awaiting or ahead) and not self._barrier:
                sid = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                if sid in awaiting or sid in ahead:
                    ahead.add(sid)
                    if self._process(frame, events):
                        return events
                    continue
            backlog.append(frame)
            self._backlog_bytes += len(frame)
            if frame[3] not in _OVERTAKEN:
                self._barrier = True  # nothing overtakes it
        for _ in range(min(budget, len(backlog))):
            frame = backlog.popleft()
            self._backlog_bytes -= len(frame)
            if self._process(frame, events):
                return events
        if not backlog:
            self._barrier = False
        return events

    def drain(self) -> list[Event]:
        """Events of every frame still in the backlog (before the connection ends)."""
        events: list[Event] = []
        backlog = self._backlog
        while backlog and self.failure is None:
            frame = backlog.popleft()
            self._backlog_bytes -= len(frame)
            if self._process(frame, events):
                break
        self._drop_backlog()
        return events

    def _drop_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0
        self._barrier = False

    def _process(self, frame: bytes, events: list[Event]) -> bool:
        """Handle one whole frame; True once the connection has failed (stop there)."""
        frame_type = frame[3]
        plain_data = frame_type == _DATA and not frame[4] & _PADDED
        if plain_data or frame_type in (_PING, _WINDOW_UPDATE):
            try:
                if frame_type == _DATA:
                    if self._receive_data(frame, events):
                        return False
                elif self._receive_control(frame, events):
                    return False
            except Exception as exc:  # a bug of ours: this connection only
                events.append(self.fail_internal(exc))
                return True
        try:
            if frame[3] == _HEADERS and frame[4] & _PLAIN_HEADERS == _END_HEADERS:
                h2_events = self.h2.receive_headers(frame)
            else:
                h2_events = self.h2.receive_data(frame)
        except h2.exceptions.ProtocolError as exc:  # h2 has queued GOAWAY
            code = int(exc.error_code)
            kind = LIMIT_EXCEEDED if code == ErrorCodes.ENHANCE_YOUR_CALM else PROTOCOL_ERROR
            self.failure = ConnectionFailed(code, safe_text(f"HTTP/2: {exc}"), kind)
            self._drop_backlog()
            events.append(self.failure)
            return True
        except Exception as exc:  # anything else h2, hpack or hyperframe raise on input
            name = type(exc).__name__
            events.append(
                self.fail(ErrorCodes.PROTOCOL_ERROR, PROTOCOL_ERROR, f"bad HTTP/2 ({name})")
            )
            return True
        try:
            for event in h2_events:
                self._translate(event, events)
        except Exception as exc:  # a bug of ours: this connection only
            events.append(self.fail_internal(exc))
            return True
        return False

    def _receive_data(self, frame: bytes, out: list[Event]) -> bool:
        """A DATA frame without padding, on a stream open for receiving, without a
        content-length to check and within both flow-control windows: what h2 does with it
        (both windows consumed; with END_STREAM, the stream's state machine told) at a
        quarter of the cost. Every SVID update on the agent connection and every request
        message is such a frame. False leaves the frame to h2 (an unknown, closed or reset
        stream, a window exceeded), which answers as the protocol says. The connection
        itself is open: once it fails, :meth:`receive` takes nothing more."""
        conn = self.h2
        stream = conn.streams.get(int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF)
        if stream is None or stream.state_machine.state not in _RECEIVING:
            return False
        if stream._expected_content_length is not None:
            return False
        size = len(frame) - 9
        conn_window = conn._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if size > conn_window.current_window_size or size > stream_window.current_window_size:
            return False
        conn_window.current_window_size -= size
        stream_window.current_window_size -= size
        sid = stream.stream_id
        if frame[4] & _END_STREAM:
            stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)
            self._on_data(sid, frame[9:], size, out)
            self._on_end(sid, out)
        else:
            self._on_data(sid, frame[9:], size, out)
        return True

    def _receive_control(self, frame: bytes, out: list[Event]) -> bool:
        """A PING, or a WINDOW_UPDATE of the connection, well formed, on an open connection:
        what h2 does with it (PING answered with an ACK carrying the same data; the send
        window grown, WindowUpdated) without its frame buffer, parser and dispatch. A gRPC
        server sends both with nearly every response (grpc-go's bandwidth probe). False
        leaves the frame to h2: a stream's WINDOW_UPDATE, a wrong length, an increment out
        of range or a window overflow, a closed connection."""
        conn = self.h2
        if frame[5:9] != _CONNECTION or conn.state_machine.state is ConnectionState.CLOSED:
            return False
        if frame[3] == _PING:
            if len(frame) != 17:
                return False
            conn.state_machine.process_input(ConnectionInputs.RECV_PING)
            if not frame[4] & _ACK:
                conn._data_to_send += _PING_ACK + frame[9:]
            return True
        if len(frame) != 13:
            return False
        increment = int.from_bytes(frame[9:13], "big")
        window = conn.outbound_flow_control_window + increment
        if not 1 <= increment <= _MAX_WINDOW or window > _MAX_WINDOW:
            return False
        conn.state_machine.process_input(ConnectionInputs.RECV_WINDOW_UPDATE)
        conn.outbound_flow_control_window = window
        out.append(WindowUpdated(0))
        return True

    def _translate(self, event: Any, out: list[Event]) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._on_data(event.stream_id, event.data, event.flow_controlled_length, out)
        elif kind is h2.events.RequestReceived:
            self._on_request(event, out)
        elif kind is h2.events.ResponseReceived:
            self._on_response(event, out)
        elif kind is h2.events.TrailersReceived:
            if self.client_side:
                self._on_trailers(event, out)
        elif kind is h2.events.StreamEnded:
            self._on_end(event.stream_id, out)
        elif kind is h2.events.StreamReset:
            self.forget(event.stream_id)
            out.append(StreamReset(event.stream_id, int(event.error_code)))
        elif kind is h2.events.WindowUpdated:
            out.append(WindowUpdated(event.stream_id))
        elif kind is h2.events.RemoteSettingsChanged:
            out.append(SettingsChanged())
        elif kind is h2.events.ConnectionTerminated:
            out.append(GoAwayReceived(event.last_stream_id or 0, int(event.error_code or 0)))
        elif kind is _Refused:
            out.append(StreamRefused(event.stream_id))

    def _on_request(self, event: Any, out: list[Event]) -> None:
        sid = event.stream_id
        headers = _decode_headers(event.headers)
        if headers is None:
            reason = "request headers are not printable ASCII"
            out.append(
                RequestRejected(
                    sid, _raw_path(event.headers), StatusCode.INTERNAL, reason, BAD_STREAM
                )
            )
            return
        try:
            head = parse_request(headers)
        except HeaderError as exc:
            path = next((v for k, v in headers if k == ":path"), "")
            out.append(RequestRejected(sid, path, StatusCode.INTERNAL, str(exc), BAD_STREAM))
            return
        if head.encoding is not None and head.encoding not in ENCODINGS:
            reason = f"grpc-encoding {safe_text(head.encoding)[:40]!r} is not supported"
            out.append(
                RequestRejected(sid, head.path, StatusCode.UNIMPLEMENTED, reason, BAD_STREAM)
            )
            return
        self._readers[sid] = MessageReader(head.encoding, self.limits.max_message_bytes)
        out.append(RequestStarted(sid, head.path, head.timeout, head.metadata))

    def _on_response(self, event: Any, out: list[Event]) -> None:
        sid = event.stream_id
        headers = _decode_headers(event.headers)
        if headers is None:
            reason = "response headers are not printable ASCII"
            out.append(StreamFailed(sid, StatusCode.INTERNAL, reason, BAD_STREAM))
            return
        try:
            head, trailers = parse_response(headers)
        except HeaderError as exc:
            out.append(StreamFailed(sid, StatusCode.INTERNAL, str(exc), BAD_STREAM))
            return
        if trailers is not None:
            out.append(ResponseEnded(sid, trailers.code, trailers.message))
            return
        if head.encoding is not None and head.encoding not in ENCODINGS:
            reason = f"response uses grpc-encoding {safe_text(head.encoding)[:40]!r}"
            out.append(StreamFailed(sid, StatusCode.INTERNAL, reason, BAD_STREAM))
            return
        self._readers[sid] = MessageReader(head.encoding, self.limits.max_message_bytes)
        out.append(ResponseStarted(sid, head.metadata))

    def _on_trailers(self, event: Any, out: list[Event]) -> None:
        sid = event.stream_id
        headers = _decode_headers(event.headers)
        if headers is None:
            reason = "trailers are not printable ASCII"
            out.append(StreamFailed(sid, StatusCode.INTERNAL, reason, BAD_STREAM))
            return
        try:
            trailers = parse_trailers(headers)
        except HeaderError as exc:
            out.append(StreamFailed(sid, StatusCode.INTERNAL, str(exc), BAD_STREAM))
            return
        out.append(ResponseEnded(sid, trailers.code, trailers.message))

    def _on_data(self, sid: int, data: bytes, size: int, out: list[Event]) -> None:
        reader = self._readers.get(sid)
        if reader is None:
            if size:
                self.h2.acknowledge_received_data(size, sid)
            return
        self._unacked[sid] = self._unacked.get(sid, 0) + size
        try:
            messages = reader.feed(data, size)
        except MessageTooLarge as exc:
            self.forget(sid)
            out.append(
                StreamFailed(sid, StatusCode.RESOURCE_EXHAUSTED, str(exc), MESSAGE_TOO_LARGE)
            )
            return
        except BadMessage as exc:
            self.forget(sid)
            out.append(StreamFailed(sid, StatusCode.INTERNAL, str(exc), BAD_STREAM))
            return
        if messages:
            self._awaiting.discard(sid)
        for data, length in messages:
            out.append(MessageReceived(sid, data, length))

    def _on_end(self, sid: int, out: list[Event]) -> None:
        reader = self._readers.pop(sid, None)
        self._awaiting.discard(sid)
        if reader is not None and reader.partial:
            reason = "stream ended in the middle of a message"
            out.append(StreamFailed(sid, StatusCode.INTERNAL, reason, BAD_STREAM))
            return
        out.append(StreamEnded(sid))

    # -- flow control and stream state

    def ack(self, stream_id: int, size: int) -> None:
        """Hand ``size`` consumed bytes of ``stream_id`` back to the peer's send window."""
        pending = self._unacked.get(stream_id)
        if pending is None or size <= 0:
            return
        self._unacked[stream_id] = pending - size
        self.h2.acknowledge_received_data(size, stream_id)

    def forget(self, stream_id: int) -> None:
        """Drop the stream's reader and release every byte it still holds to the peer."""
        self._readers.pop(stream_id, None)
        self._awaiting.discard(stream_id)
        pending = self._unacked.pop(stream_id, 0)
        if pending > 0:
            self.h2.acknowledge_received_data(pending, stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Send RST_STREAM unless the stream is already closed."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, error_code)

    def peer_still_sending(self, stream_id: int) -> bool:
        """The peer has not ended its side of this stream (nor reset it)."""
        stream = self.h2.streams.get(stream_id)
        if stream is None:
            return False
        return stream.state_machine.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)

    def send_window(self, stream_id: int) -> int:
        """Bytes of DATA that may be sent on the stream now; raises StreamGone."""
        try:
            window: int = self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            raise StreamGone from None
        return min(window, int(self.h2.max_outbound_frame_size))

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue DATA within :meth:`send_window`; raises StreamGone."""
        try:
            self.h2.send_data_frame(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            raise StreamGone from None

    # -- client

    @property
    def peer_max_streams(self) -> int:
        """The peer's MAX_CONCURRENT_STREAMS."""
        value: int = self.h2.remote_settings.max_concurrent_streams
        return value

    def open_stream(self, headers: Headers) -> int:
        """Send request headers on a new stream and return its id.

        Raises NoStreamAvailable at the server's stream limit, StreamGone once the
        connection can no longer open streams.
        """
        try:
            sid: int = self.h2.get_next_available_stream_id()
            self.h2.send_header_list(sid, _encode(headers))
            self._awaiting.add(sid)
        except h2.exceptions.TooManyStreamsError:
            raise NoStreamAvailable from None
        except h2.exceptions.ProtocolError:
            raise StreamGone from None
        return sid

    # -- server

    def respond(self, stream_id: int) -> None:
        """Send response headers; raises StreamGone."""
        try:
            self.h2.send_header_list(stream_id, _RESPONSE)
        except h2.exceptions.ProtocolError:
            raise StreamGone from None

    def respond_status(
        self, stream_id: int, code: int, message: str, *, trailers_only: bool
    ) -> None:
        """End the response with a status (trailers, or headers and trailers in one).

        Does nothing if the stream is gone already.
        """
        if code == StatusCode.OK and not message and not trailers_only:
            headers = _OK_TRAILERS  # the end of nearly every call
        else:
            headers = _encode(status_headers(code, message, trailers_only=trailers_only))
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.send_header_list(stream_id, headers, end_stream=True)

    # -- the connection

    def fail(
        self, error_code: int, kind: str | None, reason: str, error: Exception | None = None
    ) -> ConnectionFailed:
        """End the connection: queue GOAWAY with ``error_code``; nothing more is received."""
        if self.failure is not None:
            return self.failure
        reason = safe_text(reason)
        self.failure = ConnectionFailed(int(error_code), reason, kind, error)
        self._readers.clear()
        self._unacked.clear()
        self._awaiting.clear()
        self._drop_backlog()
        try:
            self.h2.close_connection(error_code, additional_data=reason.encode("ascii"))
        except Exception:  # h2's state no longer allows GOAWAY: build it ourselves
            self.h2.queue_raw(goaway_bytes(error_code, reason, self.h2.highest_inbound_stream_id))
        return self.failure

    def fail_internal(self, exc: Exception) -> ConnectionFailed:
        """End the connection for a bug of ours (INTERNAL_ERROR); ``exc`` goes to the log."""
        return self.fail(ErrorCodes.INTERNAL_ERROR, INTERNAL_ERROR, "internal error", exc)
