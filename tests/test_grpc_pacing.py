"""A burst of updates on many streams is handed to its callers a few per turn of the event
loop, and a new call's first response overtakes it.

This is what a rotation looks like from the driver: the SPIRE agent pushes a new SVID on
every volume's stream at once, and a publish in progress waits for the first response of
its own new stream, which the agent wrote behind the burst. The fake agent here is raw
HTTP/2 frames, so the whole burst and the new response arrive in the order and the
bytes chosen by the test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hyperframe.frame import DataFrame, HeadersFrame

from tests.grpc_peer import short_dir
from tests.h2_raw import RawPeer, grpc_message
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import ClientLimits, RpcError, StatusCode, methods, open_channel

STREAMS = 600
SUBSCRIBE_PATH = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs"
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def update(seq: int) -> bytes:
    """A stream's ``seq``-th message: the sequence number rides in ``federates_with``."""
    message = di.SubscribeToX509SVIDsResponse(federates_with=[str(seq)])
    return grpc_message(message.SerializeToString())


class BurstAgent:
    """Answers each subscription with message 1; when a unary call arrives, sends messages
    2 and 3 on every subscription, then the unary call's whole answer, in one write."""

    def __init__(self, *, answer: bool = True) -> None:
        self.subscriptions: list[int] = []
        self.answer = answer
        """False: after the burst the agent closes the connection instead of answering."""

    async def serve(self, path: Path, task_status: trio.TaskStatus[None]) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(1)
        async with trio.SocketListener(sock) as listener:
            task_status.started()
            stream = await listener.accept()
            async with stream:
                await self._serve(RawPeer(stream))

    async def _serve(self, peer: RawPeer) -> None:
        await peer.accept_client()
        async for frame in peer.incoming():
            if isinstance(frame, HeadersFrame):
                path = frame.decoded[":path"]
                if path == SUBSCRIBE_PATH:
                    self.subscriptions.append(frame.stream_id)
                    await peer.send(
                        peer.headers(frame.stream_id, RESPONSE_HEADERS),
                        peer.data(frame.stream_id, update(1)),
                    )
                else:
                    await peer.send(*self._burst_then_answer(peer, frame.stream_id))
                    if not self.answer:
                        return

    def _burst_then_answer(self, peer: RawPeer, sid: int) -> list[DataFrame | HeadersFrame]:
        frames: list[DataFrame | HeadersFrame] = []
        for seq in (2, 3):
            frames += [peer.data(stream, update(seq)) for stream in self.subscriptions]
        if not self.answer:
            return frames
        answer = csi.GetPluginInfoResponse(name="after the burst").SerializeToString()
        frames += [
            peer.headers(sid, RESPONSE_HEADERS),
            peer.data(sid, grpc_message(answer)),
            peer.headers(sid, [("grpc-status", "0")], end_stream=True),
        ]
        return frames


class Turns(trio.abc.Instrument):
    """Counts the event loop's turns: each batch of runnable tasks follows an I/O check."""

    def __init__(self) -> None:
        self.count = 0

    def after_io_wait(self, timeout: float) -> None:
        self.count += 1


@pytest.mark.parametrize("busy", [False, True])
async def test_burst_is_handed_over_a_few_callers_per_turn_behind_a_new_first_response(
    sock_dir: Path, busy: bool
) -> None:
    """``busy``: the channel's owner says it is busy (a publish in progress) all along, and
    the burst is handed over ``messages_per_busy_turn`` callers per turn instead."""
    limits = ClientLimits.trusted()
    most = limits.messages_per_busy_turn if busy else limits.messages_per_turn
    path = sock_dir / "agent.sock"
    turns = Turns()
    received: list[list[tuple[int, int]]] = [[] for _ in range(STREAMS)]  # (seq, turn)
    everyone_has_one = trio.Event()
    everyone_has_three = trio.Event()
    counts = {1: 0, 3: 0}

    async with trio.open_nursery() as nursery:
        await nursery.start(BurstAgent().serve, path)
        async with open_channel(str(path), limits=limits, busy=lambda: busy) as channel:

            async def subscriber(index: int) -> None:
                request = di.SubscribeToX509SVIDsRequest()
                async with channel.stream(methods.SUBSCRIBE_TO_X509_SVIDS, request) as updates:
                    async for message in updates:
                        seq = int(message.federates_with[0])
                        received[index].append((seq, turns.count))
                        if seq in counts:
                            counts[seq] += 1
                            if counts[1] == STREAMS:
                                everyone_has_one.set()
                            if counts[3] == STREAMS:
                                everyone_has_three.set()

            async with trio.open_nursery() as subscribers:
                for index in range(STREAMS):
                    subscribers.start_soon(subscriber, index)
                with trio.fail_after(30):
                    await everyone_has_one.wait()
                trio.lowlevel.add_instrument(turns)
                try:
                    reply = await channel.unary(
                        methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=30
                    )
                    answered = turns.count
                    with trio.fail_after(30):
                        await everyone_has_three.wait()
                finally:
                    trio.lowlevel.remove_instrument(turns)
                subscribers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()

    assert reply.name == "after the burst"
    # Every stream got all three messages, in order, none twice.
    assert all([seq for seq, _ in got] == [1, 2, 3] for got in received)
    # At most messages_per_turn (busy: messages_per_busy_turn) callers were handed burst
    # messages in any one turn.
    burst_turns = [got[1][1] for got in received]
    per_turn: dict[int, int] = {}
    for turn in {(index, turn) for index, got in enumerate(received) for _, turn in got[1:]}:
        per_turn[turn[1]] = per_turn.get(turn[1], 0) + 1
    assert max(per_turn.values()) <= most
    # The new call's answer, written after the whole burst, reached its caller while most
    # of the burst was still waiting for its turn.
    handed_before = sum(1 for turn in burst_turns if turn <= answered)
    assert handed_before < STREAMS // 2, (handed_before, answered, sorted(per_turn.items())[:5])


async def test_connection_lost_behind_a_burst_hands_over_what_arrived_then_fails_every_call(
    sock_dir: Path,
) -> None:
    """The agent dies right after pushing the burst: every stream still gets the messages
    that arrived, in order, and then UNAVAILABLE; the call that was waiting fails too, and
    nothing escapes the channel."""
    path = sock_dir / "agent.sock"
    received: list[list[int]] = [[] for _ in range(STREAMS)]
    ended: list[StatusCode] = []
    everyone_has_one = trio.Event()

    async with trio.open_nursery() as nursery:
        await nursery.start(BurstAgent(answer=False).serve, path)
        async with open_channel(str(path), limits=ClientLimits.trusted()) as channel:

            async def subscriber(index: int) -> None:
                request = di.SubscribeToX509SVIDsRequest()
                try:
                    async with channel.stream(methods.SUBSCRIBE_TO_X509_SVIDS, request) as updates:
                        async for message in updates:
                            received[index].append(int(message.federates_with[0]))
                            if sum(1 for got in received if got) == STREAMS:
                                everyone_has_one.set()
                except RpcError as exc:
                    ended.append(exc.code)

            async with trio.open_nursery() as subscribers:
                for index in range(STREAMS):
                    subscribers.start_soon(subscriber, index)
                with trio.fail_after(30):
                    await everyone_has_one.wait()
                with pytest.raises(RpcError) as info:
                    await channel.unary(
                        methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=30
                    )
        nursery.cancel_scope.cancel()

    assert info.value.code == StatusCode.UNAVAILABLE
    assert all(got == [1, 2, 3] for got in received)
    assert ended == [StatusCode.UNAVAILABLE] * STREAMS
