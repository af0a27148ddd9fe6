"""The only module that imports purerpc: what it still provides, behind plain functions.

purerpc (0.8.0, pinned) provides, and only through this module:

- request header parsing: ``RequestReceived.parse_from_stream_id_and_headers_destructive``
  checks :method, :scheme, :path, te and content-type, decodes grpc-timeout (every unit),
  grpc-encoding, and custom metadata, base64-decoding ``-bin`` values (``HeaderDict``);
- response header and trailer parsing: ``ResponseReceived`` / ``ResponseEnded`` (:status 200,
  content-type, grpc-status, grpc-message percent-decoding). A plain request or response head
  (every name once, no binary metadata, a grpc-timeout of at most 8 digits; what the kubelet
  and the agent send every time) is parsed here to the same result at a third of the cost;
  purerpc judges everything else;
- response header and trailer construction: ``GRPCConnection.start_response``,
  ``respond_status`` and ``end_response`` (grpc-status, grpc-message percent-encoding), run
  against a stand-in that captures the headers instead of sending them;
- message deframing: ``MessageReadBuffer`` (5-byte prefix, declared-length limit, per-message
  flow-controlled byte accounting), subclassed here so decompression is bounded by the
  message limit (zlib ``decompressobj`` with ``max_length``; purerpc's own inflates
  without bound).

The project owns everything else: HTTP/2 (its own ``H2Connection`` subclass and frame
pre-scanner in ``_protocol``), strict ASCII decoding of header bytes before anything here
sees them, request headers and grpc-timeout encoding on the client, message framing on send,
flow control, limits and all I/O. Replacing purerpc means rewriting this file only.

Importing purerpc patches h2 for the whole process (``purerpc.grpclib.connection`` calls
``_h2_monkeypatch.apply_patch()``: entries of ``h2.stream._transitions`` and
``H2Connection.data_to_send`` / ``clear_outbound_data_buffer``). This module snapshots that
state before the import and restores it right after, so h2 stays as shipped for everyone;
the h2 fixes the project does want live in its own subclass. This only works if purerpc is
first imported here, which holds as long as no other module imports it.
"""

from __future__ import annotations

import datetime
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import h2.connection
import h2.stream

_PATCHED_ATTRS = ("data_to_send", "clear_outbound_data_buffer")
_saved_transitions = dict(h2.stream._transitions)
_saved_attrs = {name: h2.connection.H2Connection.__dict__[name] for name in _PATCHED_ATTRS}
try:
    from purerpc.grpclib.buffers import MessageReadBuffer
    from purerpc.grpclib.config import GRPCConfiguration
    from purerpc.grpclib.connection import GRPCConnection
    from purerpc.grpclib.events import RequestReceived, ResponseEnded, ResponseReceived
    from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError
    from purerpc.grpclib.headers import HeaderDict
    from purerpc.grpclib.status import Status
finally:
    h2.stream._transitions.clear()
    h2.stream._transitions.update(_saved_transitions)
    for _name, _value in _saved_attrs.items():
        setattr(h2.connection.H2Connection, _name, _value)
    del _saved_transitions, _saved_attrs

Headers = list[tuple[str, str]]
Metadata = tuple[tuple[str, str | bytes], ...]

ENCODINGS = frozenset({"identity", "gzip", "deflate"})
"""Message encodings accepted (decompression bounded); only identity is ever sent."""
ACCEPT_ENCODING = "identity"


class HeaderError(Exception):
    """Headers that do not form a gRPC request or response; the message says why."""


class MessageTooLarge(Exception):
    """A message (declared, or once decompressed) is larger than the limit."""


class BadMessage(Exception):
    """A message that cannot be decoded (bad compression, compressed without an encoding)."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    path: str
    timeout: float | None
    """Seconds from grpc-timeout, or None."""
    encoding: str | None
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class ResponseHead:
    encoding: str | None
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class Trailers:
    code: int
    message: str
    metadata: Metadata


def _describe(exc: Exception, what: str) -> str:
    if isinstance(exc, ProtocolError) and str(exc):
        return f"malformed {what}: {exc}"
    if isinstance(exc, KeyError):
        return f"malformed {what}: missing or invalid {exc}"
    return f"malformed {what}"


# The headers purerpc takes out of a request or a response before the rest become metadata.
_REQUEST_FIELDS = frozenset(
    {
        *(":method", ":scheme", ":path", ":authority", "te", "content-type", "grpc-timeout"),
        *("grpc-encoding", "grpc-accept-encoding", "user-agent", "grpc-message-type"),
    }
)
_RESPONSE_FIELDS = frozenset((":status", "content-type", "grpc-encoding", "grpc-accept-encoding"))
_TIMEOUT_UNITS = {
    "H": "hours",
    "M": "minutes",
    "S": "seconds",
    "m": "milliseconds",
    "u": "microseconds",
}


def _metadata(headers: Headers, taken: frozenset[str]) -> Metadata | None:
    """The custom metadata as purerpc gives it, when no name repeats and none is binary
    (``-bin``); else None."""
    found = []
    for name, value in headers:
        if name in taken or name.startswith("grpc-"):
            continue
        if name.endswith("-bin"):
            return None
        found.append((name, value))
    return tuple(found)


def _plain_request(headers: Headers) -> RequestHead | None:
    """What purerpc makes of a well-formed request (every name once, a grpc-timeout of at
    most 8 digits in H, M, S, m or u, no binary metadata), at a third of its cost; None for
    anything else, which purerpc then judges."""
    values = dict(headers)
    path = values.get(":path")
    content_type = values.get("content-type")
    if (
        len(values) != len(headers)
        or values.get(":method") != "POST"
        or values.get(":scheme") not in ("http", "https")
        or path is None
        or not path.startswith("/")
        or path.count("/") != 2
        or values.get("te") != "trailers"
        or content_type is None
        or not content_type.startswith("application/grpc")
    ):
        return None
    timeout = None
    text = values.get("grpc-timeout")
    if text is not None:
        digits, unit = text[:-1], text[-1:]
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 8):
            return None
        if unit not in _TIMEOUT_UNITS:
            return None
        timeout = datetime.timedelta(**{_TIMEOUT_UNITS[unit]: int(digits)}).total_seconds()
    metadata = _metadata(headers, _REQUEST_FIELDS)
    if metadata is None:
        return None
    return RequestHead(path, timeout, values.get("grpc-encoding"), metadata)


def parse_request(headers: Headers) -> RequestHead:
    """The gRPC request in a server stream's headers; raises HeaderError."""
    plain = _plain_request(headers)
    if plain is not None:
        return plain
    return _purerpc_request(headers)


def _purerpc_request(headers: Headers) -> RequestHead:
    try:
        event = RequestReceived.parse_from_stream_id_and_headers_destructive(0, HeaderDict(headers))
        timeout = None if event.timeout is None else event.timeout.total_seconds()
        return RequestHead(
            f"/{event.service_name}/{event.method_name}",
            timeout,
            event.message_encoding,
            tuple(event.custom_metadata),
        )
    except Exception as exc:  # whatever purerpc raises for a malformed header set
        raise HeaderError(_describe(exc, "request headers")) from None


def _plain_response(headers: Headers) -> ResponseHead | None:
    """What purerpc makes of well-formed response headers that do not end the stream (every
    name once, :status 200, no binary metadata); None for anything else."""
    values = dict(headers)
    content_type = values.get("content-type")
    if (
        len(values) != len(headers)
        or values.get(":status") != "200"
        or content_type is None
        or not content_type.startswith("application/grpc")
        or "grpc-status" in values
    ):
        return None
    metadata = _metadata(headers, _RESPONSE_FIELDS)
    if metadata is None:
        return None
    return ResponseHead(values.get("grpc-encoding"), metadata)


def parse_response(headers: Headers) -> tuple[ResponseHead, Trailers | None]:
    """Response headers; the status too when they also end the stream (trailers-only)."""
    plain = _plain_response(headers)
    if plain is not None:
        return plain, None
    return _purerpc_response(headers)


def _purerpc_response(headers: Headers) -> tuple[ResponseHead, Trailers | None]:
    try:
        values = HeaderDict(headers)
        event = ResponseReceived.parse_from_stream_id_and_headers_destructive(0, values)
        head = ResponseHead(event.message_encoding, tuple(event.custom_metadata))
        if "grpc-status" not in values:
            return head, None
        ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(0, values)
        return head, Trailers(ended.status.int_value, ended.status.status_message, ())
    except Exception as exc:
        raise HeaderError(_describe(exc, "response headers")) from None


def parse_trailers(headers: Headers) -> Trailers:
    """The status in a response's trailers; raises HeaderError."""
    try:
        event = ResponseEnded.parse_from_stream_id_and_headers_destructive(0, HeaderDict(headers))
        status = event.status
        return Trailers(status.int_value, status.status_message, tuple(event.custom_metadata))
    except Exception as exc:
        raise HeaderError(_describe(exc, "trailers")) from None


class _Capture:
    """Takes the place of h2 inside purerpc's connection: keeps the headers it would send."""

    def __init__(self) -> None:
        self.headers: Headers = []

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False) -> None:
        self.headers = [(str(k), str(v)) for k, v in headers]


_SERVER_CONFIG = GRPCConfiguration(client_side=False, message_accept_encoding=[ACCEPT_ENCODING])


def _captured(build: Any, *args: Any) -> Headers:
    shim = GRPCConnection.__new__(GRPCConnection)
    shim.config = _SERVER_CONFIG
    shim.h2_connection = capture = _Capture()
    build(shim, 0, *args)
    return capture.headers


RESPONSE_HEADERS: Headers = _captured(GRPCConnection.start_response)
"""Headers that start a response (:status 200, content-type, grpc-accept-encoding)."""


def status_headers(code: int, message: str, *, trailers_only: bool) -> Headers:
    """Trailers carrying a status; with ``trailers_only`` also the response headers."""
    build = GRPCConnection.respond_status if trailers_only else GRPCConnection.end_response
    return _captured(build, Status(code, message))


class _BoundedReadBuffer(MessageReadBuffer):  # type: ignore[misc]
    def decompress(self, data: bytes) -> bytes:
        limit: int = self._max_message_length
        if self._message_encoding not in ("gzip", "deflate"):
            raise BadMessage("compressed message without a grpc-encoding that allows it")
        inflater = zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise BadMessage(f"undecodable {self._message_encoding} message: {exc}") from None
        if len(out) > limit:
            raise MessageTooLarge(f"message larger than {limit} bytes once decompressed")
        if not inflater.eof:
            raise BadMessage(f"truncated {self._message_encoding} message")
        return out


class MessageReader:
    """Reassembles one stream's messages; each comes out with its flow-controlled size."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, encoding: str | None, limit: int) -> None:
        self._buffer = _BoundedReadBuffer(encoding, limit)
        self._limit = limit

    def feed(self, data: bytes, flow_controlled: int) -> deque[tuple[bytes, int]]:
        """Add one DATA frame's payload; returns the messages it completed.

        Raises MessageTooLarge or BadMessage; the reader is unusable afterwards.
        """
        # The common case, a frame that holds exactly one whole uncompressed message with
        # nothing buffered before it, skips the general reassembly (a fifth of the cost of
        # receiving an agent's message).
        if len(data) >= 5 and data[0] == 0 and not self.partial:
            length = int.from_bytes(data[1:5])
            if length == len(data) - 5 and length <= self._limit:
                return deque(((data[5:], flow_controlled),))
        try:
            self._buffer.data_received(data, flow_controlled)
        except MessageTooLargeError as exc:
            raise MessageTooLarge(str(exc)) from None
        messages: deque[tuple[bytes, int]] = self._buffer.read_all_complete_messages_flowcontrol()
        return messages

    @property
    def partial(self) -> bool:
        """Part of a message is buffered (a stream ending now would cut it)."""
        return len(self._buffer._buffer) > 0 or self._buffer._message_length is not None
