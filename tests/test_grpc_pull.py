"""A caller about to wait for a call's first response reads the socket itself first.

The driver's publish sends its subscription, writes the volume's metadata while the agent
answers, then waits for the answer: by then it is usually in the socket. The caller then
takes it in its own turn (``Transport.pull``) instead of waiting for the connection's
reader to run and then for its own next turn. Bytes taken that way are handled exactly as
the reader handles them: in order, with the same backlog and the same end of connection.

The server here is raw HTTP/2 on one end of a socket pair, and the test writes its bytes
with a plain ``os.write``: they are in the client's socket before the test's next line,
with no turn of the event loop in between.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hyperframe.frame import DataFrame, Frame, PingFrame
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import RawPeer, grpc_message, raw_frame
from trio_spirecsi.grpc import ClientLimits, RpcError, StatusCode
from trio_spirecsi.grpc.client import ClientCall, ClientConnection

PATH = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs"
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
OK = [("grpc-status", "0")]


def write(peer: RawPeer, *frames: Frame | bytes) -> None:
    """Put these frames in the client's socket now, without giving up the turn."""
    data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
    assert write_some(peer, data) == len(data)


def write_some(peer: RawPeer, data: bytes) -> int:
    """Put as much of ``data`` in the client's socket as it takes now (the socket's buffer
    may be full of small writes); every byte once the client has stopped reading."""
    fd = peer.stream.socket.fileno()
    sent = 0
    try:
        while sent < len(data):
            sent += os.write(fd, data[sent:])
    except BlockingIOError:
        return sent
    except OSError:  # the client closed the connection: what it would have read is lost
        return len(data)
    return sent


@asynccontextmanager
async def connected(
    limits: ClientLimits,
) -> AsyncIterator[tuple[ClientConnection, RawPeer, trio.Event]]:
    """A client connection past its handshake with a raw server; the event is set once
    the connection's run has returned."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = ClientConnection(trio.SocketStream(ours), "pair", limits, None)
    peer = RawPeer(trio.SocketStream(theirs))
    ended = trio.Event()

    async def run() -> None:
        try:
            await conn.run()
        finally:
            ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await peer.accept_client()
        with trio.fail_after(10):
            await conn.settled.wait()
        try:
            yield conn, peer, ended
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await peer.aclose()


async def started(conn: ClientConnection, peer: RawPeer) -> ClientCall:
    """A call whose request the server has received whole (so the reader is idle again)."""
    call = await conn.start_call(PATH, b"", math.inf, [])
    assert call is not None
    sid = call.stream_id

    def request_done(frame: Frame) -> bool:
        return isinstance(frame, DataFrame) and frame.stream_id == sid

    await peer.wait_for(request_done, f"the request on stream {sid}")
    return call


async def test_a_first_response_already_in_the_socket_is_taken_without_giving_up_the_turn() -> None:
    async with connected(ClientLimits.trusted()) as (conn, peer, _):
        call = await started(conn, peer)
        sid = call.stream_id
        # grpc-go sends a PING (its bandwidth probe) with the answer.
        write(
            peer,
            peer.headers(sid, RESPONSE),
            peer.data(sid, grpc_message(b"first")),
            peer.ping(0xB0B),
        )
        with trio.testing.assert_no_checkpoints():
            first = await conn.next_message(call)
        # The PING's ACK leaves once the caller gives up its turn.
        ack = await peer.wait_for(
            lambda f: isinstance(f, PingFrame) and "ACK" in f.flags, "the PING's ACK"
        )
        assert ack.opaque_data == struct.pack(">Q", 0xB0B)
        # Later messages and the status come through the reader as usual.
        await peer.send(peer.data(sid, grpc_message(b"second")))
        await peer.send(peer.headers(sid, OK, end_stream=True))
        with trio.fail_after(10):
            rest = [await conn.next_message(call), await conn.next_message(call)]
    assert first == b"first"
    assert rest == [b"second", None]


async def test_a_call_whose_answer_has_not_arrived_waits_for_it_as_before() -> None:
    async with connected(ClientLimits.trusted()) as (conn, peer, _):
        call = await started(conn, peer)
        sid = call.stream_id
        async with trio.open_nursery() as nursery:
            got: list[bytes | None] = []

            async def wait() -> None:
                got.append(await conn.next_message(call))

            write(peer, peer.ping(7))  # all a read finds now: a PING, answered
            conn.transport.pull()
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # no answer in the socket: the caller waits
            await peer.wait_for(
                lambda f: isinstance(f, PingFrame) and "ACK" in f.flags, "the PING's ACK", 5
            )
            await peer.send(peer.headers(sid, RESPONSE), peer.data(sid, grpc_message(b"late")))
        assert got == [b"late"]


async def test_calls_waiting_together_for_their_first_answers_get_them_from_the_reader() -> None:
    """Several calls wait for their first answers (publishes in bulk): a caller does not read
    for itself then, and the reader reads every answer in one step instead of one read per
    caller."""
    async with connected(ClientLimits.trusted()) as (conn, peer, _):
        calls = [await started(conn, peer) for _ in range(3)]
        answers = [
            frame
            for call in calls
            for frame in (
                peer.headers(call.stream_id, RESPONSE),
                peer.data(call.stream_id, grpc_message(b"%d" % call.stream_id)),
            )
        ]
        write(peer, *answers)
        got: list[bytes | None] = []
        with trio.testing.assert_checkpoints():
            got.append(await conn.next_message(calls[0]))  # the reader's turn
        assert all(call.messages for call in calls[1:])  # read with the first
        with trio.testing.assert_no_checkpoints():
            got += [await conn.next_message(call) for call in calls[1:]]
    assert got == [b"%d" % call.stream_id for call in calls]


async def test_broken_bytes_taken_by_the_caller_end_the_connection_like_the_readers_would() -> None:
    """The caller's read finds a frame the client must refuse: its call fails UNAVAILABLE
    with the reason, the server gets GOAWAY, and the connection's run ends although no
    further byte ever arrives to wake the reader."""
    async with connected(ClientLimits.trusted()) as (conn, peer, ended):
        call = await started(conn, peer)
        write(peer, raw_frame(0, 0, 0, b"DATA on the connection itself"))
        with pytest.raises(RpcError) as err:
            await conn.next_message(call)
        with trio.fail_after(10):
            await ended.wait()
        goaway = await peer.goaway()
    assert err.value.code == StatusCode.UNAVAILABLE
    assert "lost" in err.value.message and "HTTP/2" in err.value.message
    assert goaway.error_code != 0


async def test_the_end_of_the_connection_taken_by_the_caller_fails_the_call() -> None:
    async with connected(ClientLimits.trusted()) as (conn, peer, ended):
        call = await started(conn, peer)
        peer.stream.socket.shutdown(socket.SHUT_WR)
        with pytest.raises(RpcError) as err:
            await conn.next_message(call)
        with trio.fail_after(10):
            await ended.wait()
    assert err.value.code == StatusCode.UNAVAILABLE
    assert "connection closed by peer" in err.value.message


async def test_a_backlog_left_by_the_callers_read_is_handed_over_without_further_bytes() -> None:
    """The caller's read holds more frames than a step processes (a rotation on every other
    stream, then its own answer): the answer is the caller's at once, and the reader takes
    up the rest in the next turns although the server sends nothing more."""
    limits = dataclasses.replace(ClientLimits.trusted(), frames_per_step=4)
    async with connected(limits) as (conn, peer, _):
        others = [await started(conn, peer) for _ in range(10)]
        for call in others:
            write(peer, peer.headers(call.stream_id, RESPONSE))
            write(peer, peer.data(call.stream_id, grpc_message(b"1")))
        with trio.fail_after(10):
            assert [await conn.next_message(call) for call in others] == [b"1"] * 10
        mine = await started(conn, peer)
        burst = [peer.data(call.stream_id, grpc_message(b"2")) for call in others]
        sid = mine.stream_id
        write(peer, *burst, peer.headers(sid, RESPONSE), peer.data(sid, grpc_message(b"mine")))
        with trio.testing.assert_no_checkpoints():
            answer = await conn.next_message(mine)
        assert sum(len(call.messages) for call in others) < len(others)  # a backlog is left
        with trio.fail_after(10):
            later = [await conn.next_message(call) for call in others]
    assert answer == b"mine"
    assert later == [b"2"] * 10


# Bytes of three calls' answers, cut anywhere and written one piece at a time; after each
# piece the test reads for the reader ("pull"), gives up a few turns (the reader then reads
# some, and may be caught holding a read it has not handled yet), lets every task run until
# all wait ("all"), or goes on writing (0 turns).
_MESSAGES = st.lists(st.binary(max_size=300), min_size=1, max_size=5)
_ACTIONS = st.one_of(st.sampled_from(["pull", "all"]), st.integers(min_value=0, max_value=3))


def _reader_caught_holding_a_read(turns: int) -> example:
    """An example where the reader reads 256 of 1,000 waiting bytes, handles them, reads
    the next 256 at once, and may be caught holding those ``turns`` turns later, when the
    test reads for it."""
    return example(
        answers=[[b"x" * 200] * 5] * 3,
        order=random.Random(0),
        cuts=[1000],
        actions=[turns, "pull"],
        read_bytes=256,
        frames_per_step=64,
        scheduling=None,
    )


@settings(max_examples=60)
@_reader_caught_holding_a_read(1)
@_reader_caught_holding_a_read(2)
@_reader_caught_holding_a_read(3)
@given(
    answers=st.lists(_MESSAGES, min_size=3, max_size=3),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40),
    actions=st.lists(_ACTIONS, min_size=1, max_size=40),
    read_bytes=st.sampled_from([256, 16 * 1024, 256 * 1024]),
    frames_per_step=st.sampled_from([1, 3, 64, 100_000]),
    scheduling=st.random_module(),  # the order in which Trio runs the tasks of a turn
)
def test_bytes_read_by_callers_and_by_the_reader_reach_every_call_in_order(
    answers: list[list[bytes]],
    order: Any,
    cuts: list[int],
    actions: list[str | int],
    read_bytes: int,
    frames_per_step: int,
    scheduling: Any,
) -> None:
    limits = dataclasses.replace(
        ClientLimits.trusted(), read_bytes=read_bytes, frames_per_step=frames_per_step
    )
    received = trio.run(_interleaved, limits, answers, order, cuts, actions)
    assert received == [[*messages, None] for messages in answers]


async def _interleaved(
    limits: ClientLimits,
    answers: list[list[bytes]],
    order: Any,
    cuts: list[int],
    actions: list[str | int],
) -> list[list[bytes | str | None]]:
    async with connected(limits) as (conn, peer, _):
        calls = [await started(conn, peer) for _ in answers]
        # Each call's frames in its own order; the calls' frames mixed at random.
        queues = []
        for call, messages in zip(calls, answers, strict=True):
            sid = call.stream_id
            frames = [peer.data(sid, grpc_message(m)) for m in messages]
            queues.append([RESPONSE, *frames, OK])
        mixed: list[bytes] = []
        while any(queues):
            index = order.choice([i for i, q in enumerate(queues) if q])
            item = queues[index].pop(0)
            sid = calls[index].stream_id
            if item is RESPONSE:
                mixed.append(peer.headers(sid, RESPONSE).serialize())
            elif item is OK:
                mixed.append(peer.headers(sid, OK, end_stream=True).serialize())
            else:
                mixed.append(item.serialize())
        data = b"".join(mixed)
        received: list[list[bytes | str | None]] = [[] for _ in calls]

        async def consume(index: int) -> None:
            while True:
                try:
                    message = await conn.next_message(calls[index])
                except RpcError as exc:
                    received[index].append(f"{exc.code.name}: {exc.message}")
                    return
                received[index].append(message)
                if message is None:
                    return

        async with trio.open_nursery() as nursery:
            for index in range(len(calls)):
                nursery.start_soon(consume, index)
            await trio.testing.wait_all_tasks_blocked()
            step = 0
            while data:
                size = cuts[step % len(cuts)]
                sent = write_some(peer, data[:size])
                data = data[sent:]
                action = actions[step % len(actions)]
                if sent < size:
                    action = "all"  # the socket is full: the reader's turn
                if action == "pull":
                    conn.transport.pull()
                elif action == "all":
                    await trio.testing.wait_all_tasks_blocked()
                else:
                    for _ in range(int(action)):
                        await trio.lowlevel.checkpoint()
                step += 1
            with trio.fail_after(10):
                while any(not got or isinstance(got[-1], bytes) for got in received):
                    await trio.sleep(0.001)
        return received
