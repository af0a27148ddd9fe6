"""Raw HTTP/2 over a unix socket: build any frame, read back what the server answers.

Outgoing frames are built with ``struct`` so that nothing stands between a test and the
bytes on the wire (a header value that is not UTF-8, a frame larger than any setting
allows). Incoming frames are parsed with ``hyperframe`` and header blocks decoded with
``hpack``. The socket is blocking: attacks run in worker threads (or in a benchmark's own
loop) and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack
from hyperframe.frame import Frame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
RST_STREAM = 0x3
SETTINGS = 0x4
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
UNKNOWN_TYPE = 0xFA
"""A frame type no specification defines: a receiver must ignore it (RFC 9113 5.5)."""

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4

# Settings.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
LARGEST_FRAME = 2**24 - 1
LARGEST_WINDOW = 2**31 - 1

ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

# gRPC status codes (the ones the attacks look for).
GRPC_OK = 0
GRPC_INVALID_ARGUMENT = 3
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14

WORKLOAD_SERVICE = "/SpiffeWorkloadAPI"
FETCH_X509_SVID = f"{WORKLOAD_SERVICE}/FetchX509SVID"
FETCH_JWT_SVID = f"{WORKLOAD_SERVICE}/FetchJWTSVID"
VALIDATE_JWT_SVID = f"{WORKLOAD_SERVICE}/ValidateJWTSVID"


def error_name(code: int | None) -> str:
    if code is None:
        return "none"
    return ERROR_NAMES.get(code, f"0x{code:x}")


# Building frames --------------------------------------------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame, exactly as given: no check on its size, type or stream."""
    size = len(payload)
    if size > LARGEST_FRAME:
        raise ValueError(f"a frame payload has at most {LARGEST_FRAME} bytes, not {size}")
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def settings(values: dict[int, int] | None = None) -> bytes:
    payload = b"".join(struct.pack(">HL", k, v) for k, v in (values or {}).items())
    return frame(SETTINGS, 0, 0, payload)


def settings_ack() -> bytes:
    return frame(SETTINGS, ACK, 0)


def ping(opaque: bytes = b"hostile!", *, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque[:8].ljust(8, b"\0"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment))


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">L", code))


def headers(
    stream_id: int, block: bytes, *, end_stream: bool = False, end_headers: bool = True
) -> bytes:
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(HEADERS, flags, stream_id, block)


def continuation(stream_id: int, block: bytes, *, end_headers: bool = False) -> bytes:
    return frame(CONTINUATION, END_HEADERS if end_headers else 0, stream_id, block)


def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, stream_id, payload)


def unknown(payload: bytes = b"", *, stream_id: int = 0, kind: int = UNKNOWN_TYPE) -> bytes:
    return frame(kind, 0, stream_id, payload)


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One HPACK "literal header field without indexing, new name", no Huffman: any bytes
    go on the wire as they are, and the server's decoder table is never touched."""
    return _hpack_int(0, 4) + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(literal(name, value) for name, value in fields)


def grpc_request_fields(
    path: str | bytes,
    *,
    workload_header: bool = True,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The header fields of a gRPC call as a real client sends them."""
    raw_path = path.encode() if isinstance(path, str) else path
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", raw_path),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if workload_header:
        fields.append((b"workload.spiffe.io", b"true"))
    return fields + list(extra)


def grpc_request(path: str | bytes, **kwargs: Any) -> bytes:
    """The header block of a gRPC call (see :func:`grpc_request_fields`)."""
    return header_block(grpc_request_fields(path, **kwargs))


def grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    """gRPC length-prefixed message: compressed flag, 4-byte length, payload."""
    return struct.pack(">?L", compressed, len(payload)) + payload


def _field_head(number: int, size: int) -> bytes:
    head = bytearray([(number << 3) | 2])
    while size >= 128:
        head.append((size & 0x7F) | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head)


def unknown_field(size: int, number: int = 15) -> bytes:
    """A protobuf length-delimited field no Workload API message defines: every request
    type parses it (and keeps it), so a request of any size is a valid request."""
    return _field_head(number, size) + b"\0" * size


def deflate_bomb(inflated: int, *, gzip: bool = False) -> bytes:
    """A protobuf request (one unknown field of zeros) that inflates to about ``inflated``
    bytes, compressed as gRPC's ``deflate`` (zlib, RFC 1950) or ``gzip`` (RFC 1952): about
    1,000 times smaller.

    Built in a fraction of a second: the deflate state is reset after every MiB (full
    flush), so every MiB of zeros compresses to the same bytes, repeated; the checksum is
    computed over the real inflated content.
    """
    head = _field_head(15, inflated)
    chunk = bytes(1 << 20)
    whole, rest = divmod(inflated, len(chunk))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)]
    if whole:
        piece = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
        body.append(piece * whole)
    body.append(compressor.compress(bytes(rest)) + compressor.flush())
    check = zlib.crc32 if gzip else zlib.adler32
    total = check(head)
    for _ in range(whole):
        total = check(chunk, total)
    total = check(bytes(rest), total)
    if gzip:
        size = (len(head) + inflated) & 0xFFFFFFFF
        return (
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
            + b"".join(body)
            + struct.pack("<LL", total, size)
        )
    return b"\x78\xda" + b"".join(body) + struct.pack(">L", total)


# Connecting -------------------------------------------------------------------------------


def connect_unix(path: str | Path, timeout: float = 10.0) -> socket.socket:
    """A blocking unix stream socket connected to ``path``.

    A path longer than the 107 bytes a unix socket address holds (the kubelet's target
    paths are) is reached through a descriptor of its folder, as a pod reaches the socket
    through its shorter mountPath.
    """
    path = str(path)
    folder = -1
    address = path
    if len(path.encode()) >= 100:
        folder = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        address = f"/proc/self/fd/{folder}/{os.path.basename(path)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.connect(address)
                break
            except BlockingIOError:
                # The listen backlog is full: wait for the server to accept some.
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, "not accepting", path) from None
                time.sleep(0.005)
    except BaseException:
        sock.close()
        raise
    finally:
        if folder >= 0:
            os.close(folder)
    sock.settimeout(timeout)
    return sock


def readable(sock: socket.socket, timeout: float) -> bool:
    """Something to read (or EOF, or an error) on ``sock`` within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED})


class Closed(Exception):
    """The server closed the connection."""


# Reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes

    def __str__(self) -> str:
        text = self.debug.decode("utf-8", "replace")[:200]
        return f"GOAWAY {error_name(self.error_code)}" + (f" ({text!r})" if text else "")


@dataclass
class Seen:
    """Everything the server sent on one connection so far."""

    settings: dict[int, int] = field(default_factory=dict)
    settings_acks: int = 0
    ping_acks: int = 0
    goaway: GoAway | None = None
    resets: dict[int, int] = field(default_factory=dict)
    """stream -> RST_STREAM error code"""
    header_blocks: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    """stream -> every header block (response headers, trailers), names lower-case"""
    data_bytes: dict[int, int] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    """streams the server ended (END_STREAM or RST_STREAM)"""
    window_updates: dict[int, int] = field(default_factory=dict)
    closed: bool = False
    """the server closed the connection (EOF or reset)"""
    bad_input: str = ""
    """set when the server sent something this client could not parse"""

    def grpc_status(self, stream_id: int) -> tuple[int, str] | None:
        for block in self.header_blocks.get(stream_id, []):
            if "grpc-status" in block:
                try:
                    code = int(block["grpc-status"])
                except ValueError:
                    code = -1
                # grpc-message is percent-encoded on the wire (gRPC's HTTP/2 spec).
                return code, urllib.parse.unquote(block.get("grpc-message", ""))
        return None

    def statuses(self) -> dict[int, int]:
        """gRPC status code -> how many streams ended with it."""
        counts: dict[int, int] = {}
        for sid in self.header_blocks:
            status = self.grpc_status(sid)
            if status is not None:
                counts[status[0]] = counts.get(status[0], 0) + 1
        return counts

    def served(self, stream_id: int) -> bool:
        """The server sent a response message (DATA) on the stream: it served the call."""
        return self.data_bytes.get(stream_id, 0) > 0

    def describe(self) -> str:
        parts = []
        if self.goaway is not None:
            parts.append(str(self.goaway))
        if self.resets:
            counts: dict[int, int] = {}
            for code in self.resets.values():
                counts[code] = counts.get(code, 0) + 1
            parts.append(
                "RST_STREAM " + ", ".join(f"{error_name(c)} x{n}" for c, n in counts.items())
            )
        statuses = self.statuses()
        if statuses:
            parts.append("grpc-status " + ", ".join(f"{c} x{n}" for c, n in statuses.items()))
        served = sum(1 for sid in self.data_bytes if self.served(sid))
        if served:
            parts.append(f"{served} streams served")
        parts.append("connection closed by the server" if self.closed else "connection open")
        return "; ".join(parts)


class Connection:
    """A raw HTTP/2 client connection; :attr:`seen` accumulates the server's frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen = Seen()
        self.sent = 0
        self.received = 0
        self._buffer = bytearray()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = 1 << 30
        self._block: tuple[int, int, bytearray] | None = None
        """(stream, flags of the HEADERS frame, header block so far) while a block is open"""
        self.send_window = DEFAULT_WINDOW
        """connection send window, as the server's WINDOW_UPDATEs opened it"""
        self.stream_windows: dict[int, int] = {}

    @classmethod
    def open(cls, path: str | Path, timeout: float = 10.0) -> Connection:
        return cls(connect_unix(path, timeout))

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # Sending --------------------------------------------------------------

    def send(self, payload: bytes | bytearray | memoryview, timeout: float | None = 10.0) -> None:
        """Send everything or raise :class:`Closed` (the server closed the connection) or
        TimeoutError (the server stopped reading for ``timeout`` seconds)."""
        self.sock.settimeout(timeout)
        view = memoryview(payload)
        while view:
            try:
                n = self.sock.send(view)
            except TimeoutError:
                raise
            except OSError as exc:
                if exc.errno in CLOSED_ERRNOS or isinstance(exc, ConnectionError):
                    self.seen.closed = True
                    raise Closed(str(exc)) from None
                raise
            self.sent += n
            view = view[n:]

    def handshake(self, values: dict[int, int] | None = None, *, window: int = 0) -> None:
        """Preface and SETTINGS (and a connection WINDOW_UPDATE of ``window``)."""
        self.send(PREFACE + settings(values) + (window_update(0, window) if window else b""))

    def stream_window(self, stream_id: int) -> int:
        initial = self.seen.settings.get(SETTINGS_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        return initial + self.stream_windows.get(stream_id, 0)

    def max_frame(self) -> int:
        return self.seen.settings.get(SETTINGS_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)

    def send_flow_controlled(
        self, stream_id: int, payload: bytes, *, end_stream: bool = False, timeout: float = 10.0
    ) -> int:
        """Send ``payload`` as DATA within the server's flow-control windows, as a correct
        client does; wait (reading) for WINDOW_UPDATE when a window is used up. Returns how
        many bytes went out: fewer than ``len(payload)`` when the server ended the stream or
        the connection, or gave no window for ``timeout`` seconds."""
        view = memoryview(payload)
        sent = 0
        deadline = time.monotonic() + timeout
        while sent < len(view):
            if self.seen.closed or stream_id in self.seen.ended:
                break
            room = min(self.send_window, self.stream_window(stream_id), self.max_frame())
            if room <= 0:
                if time.monotonic() >= deadline:
                    break
                self.receive(min(0.2, max(deadline - time.monotonic(), 0.0)))
                continue
            chunk = view[sent : sent + room]
            last = sent + len(chunk) == len(view)
            try:
                self.send(data(stream_id, bytes(chunk), end_stream=end_stream and last))
            except Closed:
                break
            sent += len(chunk)
            self.send_window -= len(chunk)
            self.stream_windows[stream_id] = self.stream_windows.get(stream_id, 0) - len(chunk)
            deadline = time.monotonic() + timeout
        return sent

    # Receiving ------------------------------------------------------------

    def receive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the server to send something, then read all it
        has sent so far; False once the connection is closed."""
        if self.seen.closed:
            return False
        wait = timeout
        while True:
            try:
                ready = readable(self.sock, wait)
            except (OSError, ValueError):
                self.seen.closed = True
                return False
            if not ready:
                return True
            try:
                self.sock.settimeout(0)
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                self.seen.closed = True
                return False
            if not chunk:
                self.seen.closed = True
                return False
            self.received += len(chunk)
            self._buffer += chunk
            self._parse()
            wait = 0.0

    def receive_until(self, done: Callable[[Seen], bool], timeout: float) -> bool:
        """Read until ``done(seen)`` or the connection closes or ``timeout``; ``done``'s
        final value."""
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            left = deadline - time.monotonic()
            if left <= 0 or not self.receive(min(left, 0.2)):
                break
        return done(self.seen)

    def drain(self, quiet: float = 2.0) -> None:
        """Read until the server closes the connection or sends nothing for ``quiet`` s."""
        while True:
            before = self.received
            if not self.receive(quiet) or self.received == before:
                return

    def _parse(self) -> None:
        while len(self._buffer) >= 9:
            try:
                parsed, length = Frame.parse_frame_header(memoryview(self._buffer)[:9])
            except Exception as exc:
                self.seen.bad_input = f"frame header: {exc}"
                self._buffer.clear()
                return
            if len(self._buffer) < 9 + length:
                return
            body = bytes(self._buffer[9 : 9 + length])
            kind, flags = self._buffer[3], self._buffer[4]
            del self._buffer[: 9 + length]
            try:
                parsed.parse_body(memoryview(body))
            except Exception as exc:
                self.seen.bad_input = f"frame type {kind}: {exc}"
                continue
            self._on_frame(kind, flags, parsed, body)

    def _on_frame(self, kind: int, flags: int, parsed: Any, body: bytes) -> None:
        seen = self.seen
        sid = int(parsed.stream_id)
        if kind == SETTINGS:
            if flags & ACK:
                seen.settings_acks += 1
            else:
                # Stream windows are kept as offsets from the initial window, so they
                # follow a new SETTINGS_INITIAL_WINDOW_SIZE as RFC 9113 6.9.2 requires.
                for key, value in parsed.settings.items():
                    seen.settings[int(key)] = int(value)
                with contextlib.suppress(Closed, OSError):
                    self.send(settings_ack(), timeout=1.0)
        elif kind == PING:
            if flags & ACK:
                seen.ping_acks += 1
        elif kind == GOAWAY:
            seen.goaway = GoAway(
                int(parsed.last_stream_id), int(parsed.error_code), bytes(parsed.additional_data)
            )
        elif kind == RST_STREAM:
            seen.resets[sid] = int(parsed.error_code)
            seen.ended.add(sid)
        elif kind == WINDOW_UPDATE:
            increment = int(parsed.window_increment)
            seen.window_updates[sid] = seen.window_updates.get(sid, 0) + increment
            if sid == 0:
                self.send_window += increment
            else:
                self.stream_windows[sid] = self.stream_windows.get(sid, 0) + increment
        elif kind == DATA:
            seen.data_bytes[sid] = seen.data_bytes.get(sid, 0) + len(body)
            if flags & END_STREAM:
                seen.ended.add(sid)
        elif kind == HEADERS:
            self._block = (sid, flags, bytearray(parsed.data))
            if flags & END_HEADERS:
                self._end_block()
        elif kind == CONTINUATION and self._block is not None:
            self._block[2].extend(parsed.data)
            if flags & END_HEADERS:
                self._end_block()

    def _end_block(self) -> None:
        assert self._block is not None
        sid, flags, block = self._block
        self._block = None
        try:
            fields = self._decoder.decode(bytes(block), raw=True)
        except Exception as exc:
            self.seen.bad_input = f"header block: {exc}"
            return
        decoded = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("utf-8", "replace")
            for k, v in fields
        }
        self.seen.header_blocks.setdefault(sid, []).append(decoded)
        if flags & END_STREAM:
            self.seen.ended.add(sid)


def open_connections(path: str | Path, count: int, timeout: float = 10.0) -> list[socket.socket]:
    """``count`` connected sockets (fewer if the server stops accepting for ``timeout``)."""
    socks: list[socket.socket] = []
    for _ in range(count):
        try:
            socks.append(connect_unix(path, timeout))
        except OSError:
            break
    return socks


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset), without blocking;
    whatever the server sent before closing is read and dropped."""
    try:
        while True:
            if not readable(sock, 0):
                return False
            sock.settimeout(0)
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
