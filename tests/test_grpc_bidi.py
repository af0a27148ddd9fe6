"""Bidirectional streams on our Server, driven by grpcio (the C-core) as the client.

The next feature (Envoy SDS StreamSecrets) keeps one stream open while the client sends
requests and the server pushes responses; these tests pin what it relies on.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from tests.grpc_peer import eventually, grpcio_channel, short_dir
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import RpcError, Server, ServerContext, StreamSender, methods
from trio_spirecsi.grpc.methods import bidi

Req = di.SubscribeToX509SVIDsRequest
Resp = di.SubscribeToX509SVIDsResponse
CHAT = bidi("/test.Echo/Chat", Req, Resp)
KiB = 1024


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@asynccontextmanager
async def serving(server: Server, path: Path) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.serve, str(path)))
        yield
        nursery.cancel_scope.cancel()


def request(value: str) -> Req:
    message = Req()
    message.selectors.add(type="n", value=value)
    return message


def text(message: Resp) -> str:
    return str(message.federates_with[0])


def chat(channel: grpc.Channel, requests: Iterator[Req], **kwargs: Any) -> Any:
    stub = channel.stream_stream(
        CHAT.path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=Resp.FromString,
    )
    return stub(requests, **kwargs)


def from_queue(items: queue.Queue[Req | None]) -> Iterator[Req]:
    while (item := items.get()) is not None:
        yield item


async def test_requests_and_pushed_responses_interleave_on_one_stream(sock_dir: Path) -> None:
    seen: list[ServerContext] = []

    async def handler(
        requests: AsyncIterator[Req], ctx: ServerContext, send: StreamSender[Resp]
    ) -> None:
        seen.append(ctx)
        await send(Resp(federates_with=["hello"]))  # before any request
        async for message in requests:
            value = message.selectors[0].value
            await send(Resp(federates_with=[f"echo-{value}"]))
            await send(Resp(federates_with=[f"pushed-{value}"]))

    server = Server()
    server.add_bidi(CHAT, handler)
    path = sock_dir / "s.sock"

    def client() -> tuple[list[str], list[str], grpc.StatusCode]:
        items: queue.Queue[Req | None] = queue.Queue()
        with grpcio_channel(path) as channel:
            call = chat(channel, from_queue(items), timeout=20, metadata=[("x-pod", "p1")])
            got = [text(next(call))]
            for n in range(3):  # each request only once the previous answers arrived
                items.put(request(str(n)))
                got += [text(next(call)), text(next(call))]
            items.put(None)
            rest = [text(m) for m in call]
            return got, rest, call.code()

    async with serving(server, path):
        got, rest, code = await trio.to_thread.run_sync(client)
        await eventually(lambda: server.active_streams == 0, "the handler finished")
    assert got == [
        "hello",
        *[f"{kind}-{n}" for n in range(3) for kind in ("echo", "pushed")],
    ]
    assert rest == []
    assert code == grpc.StatusCode.OK
    assert seen[0].method is CHAT and seen[0].metadata["x-pod"] == "p1"


async def test_client_cancel_reaches_the_handler_waiting_for_requests(sock_dir: Path) -> None:
    finished = trio.Event()
    received: list[str] = []

    async def handler(
        requests: AsyncIterator[Req], ctx: ServerContext, send: StreamSender[Resp]
    ) -> None:
        try:
            async for message in requests:
                received.append(message.selectors[0].value)
                await send(Resp(federates_with=["got it"]))
        finally:
            finished.set()

    server = Server()
    server.add_bidi(CHAT, handler)
    path = sock_dir / "s.sock"

    def client() -> grpc.StatusCode:
        items: queue.Queue[Req | None] = queue.Queue()
        with grpcio_channel(path) as channel:
            call = chat(channel, from_queue(items))
            items.put(request("one"))
            assert text(next(call)) == "got it"
            call.cancel()
            code: grpc.StatusCode = call.code()
            items.put(None)
            return code

    async with serving(server, path):
        code = await trio.to_thread.run_sync(client)
        with trio.fail_after(10):
            await finished.wait()
        await eventually(lambda: server.active_streams == 0, "no handler running")
    assert code == grpc.StatusCode.CANCELLED
    assert received == ["one"]


async def test_a_handler_that_does_not_read_holds_the_client_back(sock_dir: Path) -> None:
    reading = trio.Event()
    got: list[str] = []
    wanted = 200

    async def handler(
        requests: AsyncIterator[Req], ctx: ServerContext, send: StreamSender[Resp]
    ) -> None:
        await reading.wait()
        async for message in requests:
            got.append(message.selectors[0].value)
            if len(got) == wanted:
                return

    server = Server()
    server.add_bidi(CHAT, handler)
    path = sock_dir / "s.sock"
    produced = 0

    def endless() -> Iterator[Req]:
        nonlocal produced
        while True:
            message = request(f"{produced:05d}" + "x" * 4000)  # 4 KiB each
            produced += 1
            yield message

    def client() -> grpc.StatusCode:
        with grpcio_channel(path) as channel:
            call = chat(channel, endless(), timeout=30)
            assert list(call) == []
            code: grpc.StatusCode = call.code()
            return code

    async with serving(server, path), trio.open_nursery() as nursery:
        codes: list[grpc.StatusCode] = []

        async def run_client() -> None:
            codes.append(await trio.to_thread.run_sync(client))

        nursery.start_soon(run_client)
        # The 64 KiB stream window holds 16 of these; grpcio keeps a few more in hand.
        await eventually(lambda: produced >= 16, "the client filled the window")
        await trio.sleep(1.0)
        held_back = produced
        reading.set()
    assert held_back <= 20
    assert got == [f"{n:05d}" + "x" * 4000 for n in range(wanted)]
    assert codes == [grpc.StatusCode.OK]


async def test_a_request_beyond_the_limit_fails_the_stream(sock_dir: Path) -> None:
    received: list[int] = []
    failures: list[RpcError] = []

    async def handler(
        requests: AsyncIterator[Req], ctx: ServerContext, send: StreamSender[Resp]
    ) -> None:
        try:
            async for message in requests:
                received.append(len(message.selectors[0].value))
        except RpcError as exc:
            failures.append(exc)
            raise

    server = Server()
    server.add_bidi(CHAT, handler)
    path = sock_dir / "s.sock"

    def client() -> grpc.RpcError:
        with grpcio_channel(path) as channel:
            messages = iter([request("small"), request("y" * (64 * KiB))])
            with pytest.raises(grpc.RpcError) as err:
                list(chat(channel, messages, timeout=20))
            return err.value

    async with serving(server, path):
        err = await trio.to_thread.run_sync(client)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert received == [5]
    assert [f.code.name for f in failures] == ["RESOURCE_EXHAUSTED"]


def test_add_bidi_and_the_other_kinds_check_the_method() -> None:
    async def any_handler(*args: Any) -> Any:
        raise AssertionError("never called")

    server = Server()
    with pytest.raises(ValueError, match="not bidirectional"):
        server.add_bidi(methods.SUBSCRIBE_TO_X509_SVIDS, any_handler)
    with pytest.raises(ValueError, match="not bidirectional"):
        server.add_bidi(methods.GET_PLUGIN_INFO, any_handler)
    with pytest.raises(ValueError, match="streams"):
        server.add_unary(CHAT, any_handler)
    with pytest.raises(ValueError, match="server-streaming only"):
        server.add_stream(CHAT, any_handler)
