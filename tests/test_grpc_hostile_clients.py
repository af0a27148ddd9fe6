"""Our Server against hostile clients written with raw HTTP/2 frames, on a real unix socket.

Each attack must cost the attacker its own stream or connection (the RST_STREAM or GOAWAY
code says which), be reported once through ``on_error``, and leave the server answering a
well-behaved grpcio client on another connection.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from tests.grpc_peer import eventually, grpcio_channel, short_dir, unary_call
from tests.h2_raw import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    SETTINGS_TIMEOUT,
    RawPeer,
    deflate_bomb,
    frame_header,
    grpc_message,
    messages,
    raw_frame,
    request_headers,
)
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import ServerLimits, methods
from trio_spirecsi.grpc.server import Server, ServerContext, StreamSender

INFO = methods.GET_PLUGIN_INFO.path
HOLD = methods.SUBSCRIBE_TO_X509_SVIDS.path
PUBLISH = methods.NODE_PUBLISH_VOLUME.path
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


class Target:
    """A Server with three methods, the failures it reported, and what its handlers saw."""

    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.errors: list[str] = []
        self.server = Server(limits, on_error=self.errors.append)
        self.published: list[int] = []
        self.held = 0
        self.released = 0
        self.server.add_unary(methods.GET_PLUGIN_INFO, self._info)
        self.server.add_unary(methods.NODE_PUBLISH_VOLUME, self._publish)
        self.server.add_stream(methods.SUBSCRIBE_TO_X509_SVIDS, self._hold)

    async def _info(self, request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        return csi.GetPluginInfoResponse(name="still-serving")

    async def _publish(self, request: csi.NodePublishVolumeRequest, ctx: ServerContext) -> Any:
        self.published.append(len(request.volume_id))
        return csi.NodePublishVolumeResponse()

    async def _hold(
        self,
        request: di.SubscribeToX509SVIDsRequest,
        ctx: ServerContext,
        send: StreamSender[di.SubscribeToX509SVIDsResponse],
    ) -> None:
        """Sends a short message, then ``selectors[0].value`` of 16 KiB, then holds."""
        self.held += 1
        try:
            await send(di.SubscribeToX509SVIDsResponse(federates_with=["held"]))
            count = int(request.selectors[0].value) if request.selectors else 0
            for _ in range(count):
                await send(di.SubscribeToX509SVIDsResponse(federates_with=["x" * 16 * KiB]))
            await trio.sleep_forever()
        finally:
            self.released += 1


@asynccontextmanager
async def serving(target: Target, path: Path) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(target.server.serve, str(path)))
        yield
        nursery.cancel_scope.cancel()


async def grpcio_is_served(path: Path) -> None:
    """A well-behaved client on its own connection still gets answers."""

    def call() -> str:
        with grpcio_channel(path) as channel:
            reply = unary_call(channel, methods.GET_PLUGIN_INFO)(
                csi.GetPluginInfoRequest(), timeout=10
            )
            return str(reply.name)

    name = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    assert name == "still-serving"


async def client(path: Path, settings: dict[int, int] | None = None) -> RawPeer:
    peer = await RawPeer.connect(str(path))
    await peer.start_client(settings)
    return peer


def hold_request(count: int = 0) -> bytes:
    request = di.SubscribeToX509SVIDsRequest()
    request.selectors.add(type="n", value=str(count))
    return request.SerializeToString()


async def test_non_ascii_header_fails_that_stream_and_the_connection_lives(
    sock_dir: Path,
) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        await peer.call(1, INFO, b"", ("x-volume", b"\xff\xfe not utf-8"))
        await peer.call(3, INFO, b"", ("content-type", b"application/grpc\xc3\xa9"))
        await peer.call(5, INFO, b"")
        first, second, third = [await peer.status(sid) for sid in (1, 3, 5)]
        await grpcio_is_served(path)
        await peer.aclose()
    assert first["grpc-status"] == second["grpc-status"] == "13"  # INTERNAL
    assert "not printable ASCII" in first["grpc-message"].replace("%20", " ")
    assert third["grpc-status"] == "0"
    assert messages(peer.on_stream(5, DataFrame)) == [
        csi.GetPluginInfoResponse(name="still-serving").SerializeToString()
    ]
    assert not [f for f in peer.frames if isinstance(f, GoAwayFrame)]
    assert target.errors == ["grpc_bad_stream", "grpc_bad_stream"]


@pytest.mark.parametrize(
    "block",
    [
        b"\xff\xff\xff\xff\xff\xff",  # an index no table has
        b"\xff" + b"\xff" * 4000 + b"\x01",  # an integer of 4,000 bytes
    ],
    ids=["unknown-index", "endless-integer"],
)
async def test_undecodable_header_block_ends_that_connection_with_compression_error(
    sock_dir: Path, block: bytes
) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        bad = HeadersFrame(1)
        bad.data = block
        bad.flags.add("END_HEADERS")
        bad.flags.add("END_STREAM")
        await peer.send(bad)
        goaway = await peer.goaway()
        await peer.wait_closed()
        await grpcio_is_served(path)
        await eventually(lambda: target.server.open_connections == 0, "connection closed")
    assert goaway.error_code == COMPRESSION_ERROR
    assert target.errors == ["grpc_protocol_error"]


async def test_bytes_that_are_not_http2_end_that_connection(sock_dir: Path) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        junk = await RawPeer.connect(str(path))
        await junk.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        no_settings = await RawPeer.connect(str(path))
        await no_settings.send(PREFACE, RawPeer.ping())  # SETTINGS must come first
        codes = [(await peer.goaway()).error_code for peer in (junk, no_settings)]
        await grpcio_is_served(path)
    assert codes == [PROTOCOL_ERROR, PROTOCOL_ERROR]
    assert target.errors == ["grpc_protocol_error", "grpc_protocol_error"]


@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
@pytest.mark.parametrize(
    ("limits", "inflated"),
    [(ServerLimits(), 32 * MiB), (ServerLimits.trusted(), 400 * MiB)],
    ids=["untrusted", "trusted"],
)
async def test_compression_bomb_is_resource_exhausted_without_inflating_it(
    sock_dir: Path, encoding: str, limits: ServerLimits, inflated: int
) -> None:
    bomb = deflate_bomb(inflated, gzip=encoding == "gzip")
    assert len(bomb) < limits.max_request_bytes  # the compressed message is within the limit
    target = Target(limits)
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        tracemalloc.start()
        try:
            await peer.send(
                peer.headers(1, request_headers(PUBLISH, ("grpc-encoding", encoding))),
                *peer.data_frames(1, grpc_message(bomb, compressed=True), end_stream=True),
            )
            status = await peer.status(1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await peer.call(3, INFO, b"")
        after = await peer.status(3)
    assert status["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
    assert after["grpc-status"] == "0"
    assert target.published == []
    # Never more than the limit (plus one chunk) inflated: far below the bomb's size.
    assert peak < 2 * limits.max_request_bytes + 8 * MiB
    assert target.errors == ["grpc_message_too_large"]


async def test_compressed_messages_within_the_limit_and_unknown_encodings(
    sock_dir: Path,
) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    request = csi.NodePublishVolumeRequest(volume_id="v" * 60_000).SerializeToString()
    async with serving(target, path):
        peer = await client(path)
        for sid, encoding, body in ((1, "deflate", zlib.compress(request)), (3, "snappy", b"x")):
            await peer.send(
                peer.headers(sid, request_headers(PUBLISH, ("grpc-encoding", encoding))),
                *peer.data_frames(sid, grpc_message(body, compressed=True), end_stream=True),
            )
        ok, unknown = await peer.status(1), await peer.status(3)
    assert ok["grpc-status"] == "0"
    assert target.published == [60_000]
    assert unknown["grpc-status"] == "12"  # UNIMPLEMENTED
    assert target.errors == ["grpc_bad_stream"]


async def test_request_size_limit_applies_to_the_message_as_declared(sock_dir: Path) -> None:
    target = Target()
    path = sock_dir / "s.sock"

    def publish(size: int) -> grpc.StatusCode:
        # field 1 (volume_id): tag, 3-byte length, then the bytes
        request = csi.NodePublishVolumeRequest(volume_id="v" * (size - 4))
        assert request.ByteSize() == size
        with grpcio_channel(path) as channel:
            try:
                unary_call(channel, methods.NODE_PUBLISH_VOLUME)(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    async with serving(target, path):
        at_limit = await trio.to_thread.run_sync(publish, 64 * KiB)
        above = await trio.to_thread.run_sync(publish, 64 * KiB + 1)
        # A prefix declaring 1 GiB is refused at once: nothing is buffered waiting for it.
        peer = await client(path)
        await peer.send(
            peer.headers(1, request_headers(PUBLISH)),
            peer.data(1, struct.pack(">?I", False, 1 << 30) + b"partial"),
        )
        declared = await peer.status(1)
    assert at_limit == grpc.StatusCode.OK
    assert above == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert declared["grpc-status"] == "8"
    assert target.published == [64 * KiB - 4]
    assert target.errors == ["grpc_message_too_large", "grpc_message_too_large"]


async def test_settings_advertise_the_limits(sock_dir: Path) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        window = await peer.wait_for(
            lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 0, "window update"
        )
        settings = peer.settings()
    assert settings[MAX_CONCURRENT_STREAMS] == 16
    assert settings[MAX_FRAME_SIZE] == 16_384
    assert settings[MAX_HEADER_LIST_SIZE] == 16 * KiB
    assert settings[INITIAL_WINDOW_SIZE] == 64 * KiB + 5  # one whole 64 KiB message fits
    assert window.window_increment == 256 * KiB - 65_535


async def test_a_ping_on_an_idle_connection_is_acknowledged(sock_dir: Path) -> None:
    """grpc-go pings with its requests and responses (BDP estimation): the acknowledgement
    leaves at once, although nothing else is sent on the connection."""
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        for payload in (b"bdp-ping", b"keepaliv"):
            ping = PingFrame(0)
            ping.opaque_data = payload

            def acked(frame: Any, payload: bytes = payload) -> bool:
                return (
                    isinstance(frame, PingFrame)
                    and "ACK" in frame.flags
                    and (frame.opaque_data == payload)
                )

            await peer.send(ping)
            await peer.wait_for(acked, f"PING ACK {payload!r}", limit=5.0)
        await grpcio_is_served(path)
    assert target.errors == []


async def test_streams_beyond_the_limit_are_refused_and_the_connection_lives(
    sock_dir: Path,
) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        for n in range(17):
            await peer.call(1 + 2 * n, HOLD, hold_request())
        refused = await peer.wait_for(lambda f: isinstance(f, RstStreamFrame), "a refusal")
        await eventually(lambda: target.held == 16, "16 handlers running")
        await peer.send(peer.reset(1))  # one ends: room for another
        await eventually(lambda: target.released == 1, "the reset reached its handler")
        await peer.call(35, INFO, b"")
        after = await peer.status(35)
        await grpcio_is_served(path)
    assert (refused.stream_id, refused.error_code) == (33, REFUSED_STREAM)
    assert after["grpc-status"] == "0"
    assert target.held == 16
    assert target.errors == ["grpc_stream_refused"]


async def test_frame_larger_than_allowed_ends_the_connection_at_its_header(
    sock_dir: Path,
) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        await peer.send(frame_header(16_385, 0x0, 0, 1))  # no payload follows, none needed
        unknown = await client(path)
        await unknown.send(frame_header(16 * MiB - 1, 0xFA, 0, 0))
        codes = [(await p.goaway()).error_code for p in (peer, unknown)]
        await grpcio_is_served(path)
    assert codes == [FRAME_SIZE_ERROR, FRAME_SIZE_ERROR]
    assert target.errors == ["grpc_protocol_error"] * 2


async def test_trusted_server_skips_a_16_mib_unknown_frame_without_keeping_it(
    sock_dir: Path,
) -> None:
    target = Target(ServerLimits.trusted())
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        tracemalloc.start()
        try:
            await peer.send(frame_header(16 * MiB - 1, 0xFA, 0, 0))
            chunk = bytes(MiB)
            for _ in range(15):
                await peer.send(chunk)
            await peer.send(chunk[:-1], RawPeer.ping(7))
            pong = await peer.wait_for(lambda f: isinstance(f, PingFrame), "PING ACK")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert "ACK" in pong.flags
    assert peak < 4 * MiB
    assert target.errors == []


async def test_header_blocks_beyond_the_limits_end_the_connection(sock_dir: Path) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        # 1. More CONTINUATION frames than allowed, each tiny.
        many = await client(path)
        first = many.headers(1, request_headers(INFO), end_headers=False)
        await many.send(first, *[many.continuation(1, b"") for _ in range(50)])
        # 2. A block larger than 16 KiB, spread over CONTINUATION frames.
        big = await client(path)
        block = big.encoder.encode([*request_headers(INFO), ("x-big", "y" * 20_000)])
        frames = [big.continuation(1, block[i : i + 4096]) for i in range(4096, len(block), 4096)]
        head = HeadersFrame(1)
        head.data = block[:4096]
        await big.send(head, *frames)
        # 3. A small block that decodes to more than 16 KiB (HPACK references).
        bomb = await client(path)
        entry = bomb.encoder.encode([("x-a", "z" * 4000)])  # added to the dynamic table
        refs = b"\xbe" * 10  # indexed field 62 (that entry), ten times
        head = HeadersFrame(1)
        head.data = bomb.encoder.encode(request_headers(INFO)) + entry + refs
        head.flags.add("END_HEADERS")
        await bomb.send(head)
        codes = [(await p.goaway()).error_code for p in (many, big, bomb)]
        await grpcio_is_served(path)
    assert codes == [ENHANCE_YOUR_CALM] * 3
    assert target.errors == ["grpc_limit_exceeded"] * 3


async def test_data_beyond_the_stream_window_is_a_flow_control_error(sock_dir: Path) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        # A 64 KiB message fills the stream window exactly (64 KiB + 5): one byte more.
        payload = struct.pack(">?I", False, 64 * KiB) + bytes(64 * KiB + 1)
        await peer.send(peer.headers(1, request_headers(PUBLISH)), *peer.data_frames(1, payload))
        goaway = await peer.goaway()
        await grpcio_is_served(path)
    assert goaway.error_code == FLOW_CONTROL_ERROR
    assert target.errors == ["grpc_protocol_error"]


async def test_silent_connections_time_out_and_quick_dial_checks_are_no_error(
    sock_dir: Path,
) -> None:
    target = Target(ServerLimits(handshake_timeout=0.5, idle_timeout=0.5))
    path = sock_dir / "s.sock"
    async with serving(target, path):
        for _ in range(20):  # connect and close at once, as Istio's dial check does
            probe = await RawPeer.connect(str(path))
            await probe.aclose()
        silent = await RawPeer.connect(str(path))
        half = await RawPeer.connect(str(path))
        silent.ack_settings = half.ack_settings = False  # not a byte more than this
        await half.send(PREFACE[:10])
        idle = await client(path)
        busy = await client(path)
        await busy.call(1, HOLD, hold_request())
        silent_code = (await silent.goaway()).error_code
        half_code = (await half.goaway()).error_code
        idle_code = (await idle.goaway()).error_code
        for peer in (silent, half, idle):
            await peer.wait_closed()
        await busy.send(RawPeer.ping(9))  # the connection with a stream is still served
        pong = await busy.wait_for(lambda f: isinstance(f, PingFrame), "PING ACK")
        await grpcio_is_served(path)
        await busy.aclose()
        await eventually(lambda: target.server.open_connections == 0, "every connection closed")
    assert (silent_code, half_code) == (SETTINGS_TIMEOUT, SETTINGS_TIMEOUT)
    assert idle_code == NO_ERROR
    assert "ACK" in pong.flags
    assert target.errors == ["grpc_handshake_timeout", "grpc_handshake_timeout"]


async def test_connections_beyond_the_limit_are_closed_at_once(sock_dir: Path) -> None:
    target = Target(ServerLimits(max_connections=2))
    path = sock_dir / "s.sock"
    async with serving(target, path):
        kept = [await client(path) for _ in range(2)]
        for peer in kept:
            await peer.wait_for(lambda f: isinstance(f, WindowUpdateFrame), "served")
        extra = await RawPeer.connect(str(path))  # refused whatever it would send
        refusal = await extra.goaway()
        await extra.wait_closed()
        assert target.server.open_connections == 2
        await kept[0].aclose()
        await eventually(lambda: target.server.open_connections == 1, "one slot free")
        await grpcio_is_served(path)
    assert refusal.error_code == ENHANCE_YOUR_CALM
    assert target.errors == ["grpc_too_many_connections"]


@pytest.mark.parametrize(
    "flood",
    ["PING", "SETTINGS", "WINDOW_UPDATE", "PRIORITY", "RST_STREAM", "unknown", "empty DATA"],
)
async def test_control_frame_floods_are_enhance_your_calm(sock_dir: Path, flood: str) -> None:
    target = Target()
    path = sock_dir / "s.sock"
    frames = {
        "PING": raw_frame(0x6, 0, 0, bytes(8)),
        "SETTINGS": raw_frame(0x4, 0, 0, b""),
        "WINDOW_UPDATE": raw_frame(0x8, 0, 0, struct.pack(">I", 1)),
        "PRIORITY": raw_frame(0x2, 0, 1, struct.pack(">IB", 0, 15)),
        "RST_STREAM": raw_frame(0x3, 0, 1, struct.pack(">I", 8)),
        "unknown": raw_frame(0xFA, 0, 0, b""),
        "empty DATA": raw_frame(0x0, 0, 1, b""),
    }
    async with serving(target, path):
        peer = await client(path)
        await peer.send(peer.headers(1, request_headers(HOLD)))  # stream 1 open for DATA
        await peer.send(frames[flood] * 1500)  # the default budget holds 1000
        goaway = await peer.goaway()
        await grpcio_is_served(path)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert target.errors == ["grpc_flood"]


async def test_rapid_reset_spends_the_new_stream_budget(sock_dir: Path) -> None:
    limits = ServerLimits(
        new_stream_burst=50, new_streams_per_second=1.0, control_frame_burst=100_000
    )
    target = Target(limits)
    path = sock_dir / "s.sock"
    async with serving(target, path):
        peer = await client(path)
        with contextlib.suppress(trio.BrokenResourceError):  # cut off midway: expected
            for n in range(200):
                sid = 1 + 2 * n
                await peer.send(peer.headers(sid, request_headers(HOLD)), peer.reset(sid))
        goaway = await peer.goaway()
        await grpcio_is_served(path)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.last_stream_id < 1 + 2 * 200
    assert target.errors == ["grpc_flood"]


async def test_a_client_that_never_reads_is_cut_off_at_the_send_queue_limit(
    sock_dir: Path,
) -> None:
    limits = ServerLimits(
        max_send_queue_bytes=256 * KiB, control_frame_burst=1_000_000, new_stream_burst=1000
    )
    target = Target(limits)
    path = sock_dir / "s.sock"
    async with serving(target, path):
        # Opens every window, asks for endless responses and never reads them.
        peer = await client(path, {INITIAL_WINDOW_SIZE: 2**31 - 1})
        await peer.send(peer.window_update(0, 2**31 - 1 - 65_535))
        await peer.call(1, HOLD, hold_request(10_000))
        await eventually(lambda: target.held == 1, "the handler started")
        pings = raw_frame(0x6, 0, 0, bytes(8)) * 1000
        with trio.move_on_after(30):
            while target.released == 0:  # PING ACKs pile up: the server must give up
                try:
                    await peer.send(pings)
                except (trio.BrokenResourceError, OSError):
                    break
        await eventually(lambda: target.released == 1, "the handler was cancelled")
        await grpcio_is_served(path)
        await eventually(lambda: target.server.open_connections == 0, "connection closed")
    assert target.errors == ["grpc_slow_reader"]
