"""Our Channel against a hostile fake agent written with raw HTTP/2 frames.

Whatever the "agent" answers, the call fails with an RpcError that says what happened, the
failure is reported once through ``on_error``, the channel dials again when the connection
had to go, and nothing escapes ``open_channel``.
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from tests.grpc_peer import short_dir
from tests.h2_raw import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    RawPeer,
    deflate_bomb,
    frame_header,
    grpc_message,
    raw_frame,
)
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi.grpc import ClientLimits, RpcError, StatusCode, methods, open_channel

MiB = 1024 * 1024
OK_REPLY = csi.GetPluginInfoResponse(name="ok").SerializeToString()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


class FakeAgent:
    """Answers every request as ``mode`` says; records the GOAWAY codes clients send."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.connections = 0
        self.goaways: list[int] = []

    async def serve(self, path: Path, task_status: trio.TaskStatus[None]) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                nursery.start_soon(self._connection, await listener.accept())

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        peer = RawPeer(stream)
        async with stream:
            await peer.accept_client()
            async for frame in peer.incoming():
                if isinstance(frame, GoAwayFrame):
                    self.goaways.append(frame.error_code)
                ended = isinstance(frame, (HeadersFrame, DataFrame))
                if ended and "END_STREAM" in frame.flags:
                    try:
                        await self._respond(peer, frame.stream_id)
                    except (trio.BrokenResourceError, OSError):
                        return

    async def _respond(self, peer: RawPeer, sid: int) -> None:
        head: list[tuple[str, str | bytes]] = [
            (":status", "200"),
            ("content-type", "application/grpc"),
        ]
        ok = [("grpc-status", "0")]
        mode = self.mode
        if mode == "ok":
            await peer.send(
                peer.headers(sid, head),
                *peer.data_frames(sid, grpc_message(OK_REPLY)),
                peer.headers(sid, ok, end_stream=True),
            )
        elif mode == "non-ascii header":
            await peer.send(
                peer.headers(sid, [*head, ("x-agent", b"caf\xe9")]),
                *peer.data_frames(sid, grpc_message(OK_REPLY)),
                peer.headers(sid, ok, end_stream=True),
            )
        elif mode == "non-ascii trailers":
            bad: list[tuple[str, str | bytes]] = [("grpc-status", "5"), ("grpc-message", b"\xff")]
            await peer.send(peer.headers(sid, [*head, *bad], end_stream=True))
        elif mode == "bomb":
            bomb = deflate_bomb(64 * MiB, gzip=True)
            await peer.send(
                peer.headers(sid, [*head, ("grpc-encoding", "gzip")]),
                *peer.data_frames(sid, grpc_message(bomb, compressed=True)),
                peer.headers(sid, ok, end_stream=True),
            )
        elif mode == "oversized frame":
            await peer.send(peer.headers(sid, head), frame_header(16 * MiB - 1, 0x0, 0, sid))
        elif mode == "undecodable headers":
            await peer.send(raw_frame(0x1, 0x4, sid, b"\xff\xff\xff\xff\xff\xff"))
        elif mode == "ping flood":
            await peer.send(raw_frame(0x6, 0, 0, bytes(8)) * 1500)
        else:
            raise AssertionError(f"unknown mode {mode}")


@asynccontextmanager
async def agent_on(path: Path) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve, path)
        yield agent
        nursery.cancel_scope.cancel()


HOSTILE_AGENT_CASES = [
    ("non-ascii header", StatusCode.INTERNAL, "grpc_bad_stream", None),
    ("non-ascii trailers", StatusCode.INTERNAL, "grpc_bad_stream", None),
    ("bomb", StatusCode.RESOURCE_EXHAUSTED, "grpc_message_too_large", None),
    ("oversized frame", StatusCode.UNAVAILABLE, "grpc_protocol_error", FRAME_SIZE_ERROR),
    ("undecodable headers", StatusCode.UNAVAILABLE, "grpc_protocol_error", COMPRESSION_ERROR),
    ("ping flood", StatusCode.UNAVAILABLE, "grpc_flood", ENHANCE_YOUR_CALM),
]
# The agent's own limits (ClientLimits.trusted: 256 KiB reads into a kept buffer) allow the
# biggest frames and a larger control budget; the other attacks fail the same way there.
TRUSTED_CASES = [c for c in HOSTILE_AGENT_CASES if c[0] not in ("oversized frame", "ping flood")]


@pytest.mark.parametrize(
    ("limits", "mode", "code", "kind", "goaway"),
    [(ClientLimits(), *case) for case in HOSTILE_AGENT_CASES]
    + [(ClientLimits.trusted(), *case) for case in TRUSTED_CASES],
    ids=[f"default-{c[0]}" for c in HOSTILE_AGENT_CASES]
    + [f"trusted-{c[0]}" for c in TRUSTED_CASES],
)
async def test_hostile_agent_fails_the_call_and_the_channel_carries_on(
    sock_dir: Path,
    limits: ClientLimits,
    mode: str,
    code: StatusCode,
    kind: str,
    goaway: int | None,
) -> None:
    path = sock_dir / "agent.sock"
    errors: list[str] = []
    channel = open_channel(str(path), limits=limits, on_error=errors.append)
    async with agent_on(path) as agent, channel as ch:
        first = await ch.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=10)
        agent.mode = mode
        tracemalloc.start()
        try:
            with pytest.raises(RpcError) as err:
                await ch.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        agent.mode = "ok"
        again = await ch.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=10)
        opened = ch.connections_opened
    assert first.name == again.name == "ok"
    assert err.value.code == code
    assert errors == [kind]
    assert peak < 16 * MiB  # a 64 MiB bomb is never inflated
    if goaway is None:  # a stream error: the connection lives on
        assert opened == agent.connections == 1
    else:  # the connection ended with GOAWAY and the next call dialled again
        assert str(path) in err.value.message
        assert opened == agent.connections == 2
        assert goaway in agent.goaways
