"""Raw HTTP/2 peers for the hostile-peer tests: every frame built and read by hand.

h2 4.x cannot be installed beside purerpc's h2<4 pin, and the engine under test must not
judge itself, so these peers use hyperframe (frames) and hpack (header blocks) directly:
they can send what no well-behaved library would, and stop reading whenever they like.
"""

from __future__ import annotations

import contextlib
import errno
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import trio
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RawHeaders = Sequence[tuple[bytes | str, bytes | str]]

# HTTP/2 error codes (RFC 9113 section 7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# SETTINGS identifiers
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6


def request_headers(path: str, *extra: tuple[bytes | str, bytes | str]) -> list[Any]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        *extra,
    ]


def grpc_message(data: bytes, *, compressed: bool = False) -> bytes:
    """One length-prefixed gRPC message."""
    return struct.pack(">?I", compressed, len(data)) + data


def deflate_bomb(inflated: int, *, gzip: bool = False) -> bytes:
    """zlib (or gzip) data that inflates to ``inflated`` zero bytes, built chunk by chunk."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if gzip else 15)
    chunk = bytes(1024 * 1024)
    parts = []
    for _ in range(inflated // len(chunk)):
        parts.append(packer.compress(chunk))
    parts.append(packer.compress(bytes(inflated % len(chunk))))
    parts.append(packer.flush())
    return b"".join(parts)


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """Any frame at all, unknown types and invalid payloads included."""
    return frame_header(len(payload), frame_type, flags, stream_id) + payload


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """A 9-byte frame header alone: it may announce more payload than will ever follow."""
    return struct.pack(">I", length)[1:] + bytes([frame_type, flags]) + struct.pack(">I", stream_id)


class RawPeer:
    """One raw HTTP/2 connection, client or server side, on a Trio socket stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.encoder = Encoder()
        self.decoder = Decoder(max_header_list_size=1 << 30)
        self.frames: list[Frame] = []
        self.eof = False
        self.ack_settings = True
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        return cls(await trio.open_unix_socket(path))

    async def aclose(self) -> None:
        await self.stream.aclose()

    # -- sending

    async def send(self, *chunks: Frame | bytes) -> None:
        data = b"".join(c if isinstance(c, bytes) else c.serialize() for c in chunks)
        await self.stream.send_all(data)

    async def start_client(self, settings: dict[int, int] | None = None) -> None:
        """Preface and SETTINGS, as a client begins."""
        frame = SettingsFrame(0)
        frame.settings = dict(settings or {})
        await self.send(PREFACE, frame)

    def headers(
        self,
        stream_id: int,
        headers: RawHeaders,
        *,
        end_stream: bool = False,
        end_headers: bool = True,
    ) -> HeadersFrame:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(list(headers))
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    @staticmethod
    def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> DataFrame:
        frame = DataFrame(stream_id)
        frame.data = payload
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    @classmethod
    def data_frames(
        cls, stream_id: int, payload: bytes, *, end_stream: bool = False, size: int = 16_384
    ) -> list[DataFrame]:
        """``payload`` in DATA frames of at most ``size`` bytes."""
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        frames = [cls.data(stream_id, chunk) for chunk in chunks]
        if end_stream:
            frames[-1].flags.add("END_STREAM")
        return frames

    @staticmethod
    def continuation(stream_id: int, block: bytes, *, end_headers: bool = False) -> Any:
        frame = ContinuationFrame(stream_id)
        frame.data = block
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    @staticmethod
    def ping(opaque: int = 0) -> PingFrame:
        frame = PingFrame(0)
        frame.opaque_data = struct.pack(">Q", opaque)
        return frame

    @staticmethod
    def reset(stream_id: int, code: int = CANCEL) -> RstStreamFrame:
        return RstStreamFrame(stream_id, error_code=code)

    @staticmethod
    def window_update(stream_id: int, increment: int) -> WindowUpdateFrame:
        return WindowUpdateFrame(stream_id, window_increment=increment)

    async def call(self, stream_id: int, path: str, message: bytes, *extra: Any) -> None:
        """A whole unary request: HEADERS, then DATA ending the stream."""
        await self.send(
            self.headers(stream_id, request_headers(path, *extra)),
            *self.data_frames(stream_id, grpc_message(message), end_stream=True),
        )

    # -- receiving

    async def accept_client(self, settings: dict[int, int] | None = None) -> None:
        """Read the client preface, then send SETTINGS, as a server begins."""
        while len(self._buffer) < len(PREFACE):
            data = await self.stream.receive_some(65536)
            assert data, "closed before the preface"
            self._buffer += data
        assert bytes(self._buffer[: len(PREFACE)]) == PREFACE
        del self._buffer[: len(PREFACE)]
        frame = SettingsFrame(0)
        frame.settings = dict(settings or {})
        await self.send(frame)

    async def receive(self) -> bool:
        """Parse what is buffered, else read once; False once the peer has closed."""
        if await self._parse():
            return True
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                raise
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        await self._parse()
        return True

    async def incoming(self) -> AsyncIterator[Any]:
        """Every frame the peer sends from now on, as it arrives, until it closes."""
        handled = len(self.frames)
        while await self.receive():
            while handled < len(self.frames):
                handled += 1
                yield self.frames[handled - 1]

    async def _parse(self) -> bool:
        """Turn buffered bytes into frames; True if there was at least one."""
        found = False
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(bytes(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
            del self._buffer[: 9 + length]
            if isinstance(frame, HeadersFrame):  # every block in order: HPACK state
                frame.decoded = dict(self.decoder.decode(frame.data))
            self.frames.append(frame)
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags and self.ack_settings:
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await self.send(ack)
            found = True
        return found

    async def wait_for(
        self, check: Callable[[Frame], bool], what: str, limit: float = 20.0
    ) -> Frame:
        """The first frame received (so far or next) for which ``check`` holds."""
        with trio.move_on_after(limit):
            while True:
                for frame in self.frames:
                    if check(frame):
                        return frame
                if not await self.receive():
                    raise AssertionError(f"connection closed before {what}")
        raise AssertionError(f"timed out waiting for {what}")

    async def wait_closed(self, limit: float = 20.0) -> None:
        """Read until the peer closes the connection."""
        with trio.move_on_after(limit):
            while await self.receive():
                pass
            return
        raise AssertionError("timed out waiting for the connection to close")

    async def goaway(self, limit: float = 20.0) -> GoAwayFrame:
        frame = await self.wait_for(lambda f: isinstance(f, GoAwayFrame), "GOAWAY", limit)
        assert isinstance(frame, GoAwayFrame)
        return frame

    def settings(self) -> dict[int, int]:
        """The peer's first SETTINGS."""
        for frame in self.frames:
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                return dict(frame.settings)
        raise AssertionError("no SETTINGS received")

    @staticmethod
    def decode(frame: HeadersFrame) -> dict[str, str]:
        decoded: dict[str, str] = frame.decoded
        return decoded

    async def status(self, stream_id: int, limit: float = 20.0) -> dict[str, str]:
        """The headers that carry grpc-status on ``stream_id`` (trailers or trailers-only)."""
        with trio.move_on_after(limit):
            seen = 0
            while True:
                for frame in self.frames[seen:]:
                    seen += 1
                    if isinstance(frame, HeadersFrame) and frame.stream_id == stream_id:
                        headers = self.decode(frame)
                        if "grpc-status" in headers:
                            return headers
                if not await self.receive():
                    raise AssertionError(f"connection closed before a status on {stream_id}")
        raise AssertionError(f"timed out waiting for a status on stream {stream_id}")

    def on_stream(self, stream_id: int, kind: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind) and f.stream_id == stream_id]


def messages(frames: Iterable[Any]) -> list[bytes]:
    """The gRPC messages carried by these DATA frames, in order."""
    data = b"".join(f.data for f in frames if isinstance(f, DataFrame))
    found = []
    while len(data) >= 5:
        _, length = struct.unpack(">?I", data[:5])
        found.append(data[5 : 5 + length])
        data = data[5 + length :]
    return found
