"""Our Channel against our Server: scale, deadlines, shutdown and closing, flow control."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from tests.grpc_peer import eventually, short_dir
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import (
    RpcError,
    Server,
    ServerContext,
    ServerLimits,
    StatusCode,
    StreamSender,
    methods,
    open_channel,
)

SUBSCRIBE = methods.SUBSCRIBE_TO_X509_SVIDS
SubReq = di.SubscribeToX509SVIDsRequest
SubResp = di.SubscribeToX509SVIDsResponse


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


def subscription_server(finished: list[int]) -> Server:
    """Sends each subscriber one message, then holds the stream open until cancelled.

    Trusted limits: the tests below open hundreds of streams and send megabytes.
    """

    async def subscribe(request: SubReq, ctx: ServerContext, send: StreamSender[SubResp]) -> None:
        try:
            await send(SubResp(federates_with=[request.selectors[0].value]))
            await trio.sleep_forever()
        finally:
            finished.append(1)

    server = Server(ServerLimits.trusted())
    server.add_stream(SUBSCRIBE, subscribe)
    return server


def request_for(value: str) -> SubReq:
    request = SubReq()
    request.selectors.add(type="n", value=value)
    return request


async def test_500_concurrent_streams_share_one_connection_and_cancel_on_exit(
    sock_dir: Path,
) -> None:
    streams = 500
    finished: list[int] = []
    server = subscription_server(finished)
    path = sock_dir / "s.sock"
    async with serving(server, path), open_channel(str(path)) as channel:
        received: list[str] = []
        all_open = trio.Event()
        peak_active = 0

        async def subscriber(n: int) -> None:
            nonlocal peak_active
            async with channel.stream(SUBSCRIBE, request_for(str(n))) as responses:
                first = await responses.__anext__()
                received.append(first.federates_with[0])
                if len(received) == streams:
                    peak_active = server.active_streams
                    all_open.set()
                await all_open.wait()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(streams):
                    nursery.start_soon(subscriber, n)
        assert sorted(received) == sorted(str(n) for n in range(streams))
        assert peak_active == streams
        assert channel.connections_opened == 1
        await eventually(lambda: len(finished) == streams, "every handler cancelled", 20)
        assert server.active_streams == 0


async def test_stream_timeout_bounds_the_whole_stream_and_cancels_the_handler(
    sock_dir: Path,
) -> None:
    finished: list[int] = []
    deadlines: list[float | None] = []
    server = subscription_server(finished)

    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        deadlines.append(ctx.deadline)
        await trio.sleep_forever()

    server.add_unary(methods.GET_PLUGIN_INFO, info)
    path = sock_dir / "s.sock"
    async with serving(server, path), open_channel(str(path)) as channel:
        with trio.fail_after(10):
            async with channel.stream(SUBSCRIBE, request_for("a"), timeout=0.5) as responses:
                first = await responses.__anext__()
                with pytest.raises(RpcError) as err:
                    await responses.__anext__()
                with pytest.raises(RpcError) as again:
                    await responses.__anext__()
            before = trio.current_time()
            with pytest.raises(RpcError) as unary_err:
                await channel.unary(
                    methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=0.3
                )
        await eventually(lambda: server.active_streams == 0, "handlers cancelled", 10)
    assert first.federates_with[0] == "a"
    assert err.value.code == again.value.code == StatusCode.DEADLINE_EXCEEDED
    assert unary_err.value.code == StatusCode.DEADLINE_EXCEEDED
    assert finished == [1]
    assert deadlines[0] is not None and deadlines[0] > before


async def test_closing_the_channel_fails_calls_in_flight_with_unavailable(sock_dir: Path) -> None:
    finished: list[int] = []
    path = sock_dir / "s.sock"
    async with serving(subscription_server(finished), path):
        errors: list[RpcError] = []
        got_first = trio.Event()

        async def consumer(channel: Any) -> None:
            async with channel.stream(SUBSCRIBE, request_for("a")) as responses:
                await responses.__anext__()
                got_first.set()
                try:
                    await responses.__anext__()
                except RpcError as exc:
                    errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery, open_channel(str(path)) as channel:
                nursery.start_soon(consumer, channel)
                await got_first.wait()
        assert [e.code for e in errors] == [StatusCode.UNAVAILABLE]
        assert "closed" in errors[0].message
        await eventually(lambda: finished == [1], "server saw the stream end", 10)


async def test_server_restart_fails_open_streams_and_the_next_call_redials(
    sock_dir: Path,
) -> None:
    finished: list[int] = []
    path = sock_dir / "s.sock"
    server = subscription_server(finished)
    server_scope = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[None]) -> None:
        with server_scope:
            await server.serve(str(path), task_status=task_status)

    async with open_channel(str(path)) as channel, trio.open_nursery() as nursery:
        await nursery.start(run_server)
        async with channel.stream(SUBSCRIBE, request_for("a")) as responses:
            await responses.__anext__()
            server_scope.cancel()
            with trio.fail_after(10), pytest.raises(RpcError) as err:
                await responses.__anext__()
        assert err.value.code == StatusCode.UNAVAILABLE
        assert str(path) in err.value.message
        assert finished == [1]
        async with (
            serving(subscription_server(finished), path),
            channel.stream(SUBSCRIBE, request_for("b")) as responses,
        ):
            again = await responses.__anext__()
        assert again.federates_with[0] == "b"
        assert channel.connections_opened == 2


async def test_messages_larger_than_every_window_flow_both_ways(sock_dir: Path) -> None:
    mib = 1024 * 1024

    async def echo(request: SubReq, ctx: ServerContext, send: StreamSender[SubResp]) -> None:
        value = request.selectors[0].value
        for _ in range(12):
            await send(SubResp(federates_with=[value]))

    server = Server(ServerLimits.trusted())
    server.add_stream(SUBSCRIBE, echo)
    path = sock_dir / "s.sock"
    big = "z" * (3 * mib)
    async with serving(server, path), open_channel(str(path)) as channel:
        with trio.fail_after(60):
            async with channel.stream(SUBSCRIBE, request_for(big)) as responses:
                sizes = [len(m.federates_with[0]) async for m in responses]
    assert sizes == [len(big)] * 12


async def test_invalid_metadata_is_refused_before_sending(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    async with open_channel(str(path)) as channel:
        for metadata in ({"grpc-timeout": "1S"}, {"x-bad": "a\r\nb"}):
            with pytest.raises(RpcError) as err:
                await channel.unary(methods.PROBE, csi.ProbeRequest(), metadata=metadata)
            assert err.value.code == StatusCode.INTERNAL
        assert channel.connections_opened == 0


def test_no_resource_warnings_under_dev_mode(sock_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import gc, trio
        from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
        from trio_spirecsi.grpc import RpcError, Server, methods, open_channel

        async def info(request, ctx):
            return csi.GetPluginInfoResponse(name="n")

        async def main():
            server = Server()
            server.add_unary(methods.GET_PLUGIN_INFO, info)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, {str(sock_dir / "s.sock")!r})
                async with open_channel({str(sock_dir / "s.sock")!r}) as channel:
                    for _ in range(20):
                        await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
                    try:
                        await channel.unary(methods.PROBE, csi.ProbeRequest())
                    except RpcError:
                        pass
                nursery.cancel_scope.cancel()
            gc.collect()

        trio.run(main)
        gc.collect()
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "ResourceWarning" not in result.stderr, result.stderr


async def test_the_socket_file_appears_only_once_the_server_accepts(sock_dir: Path) -> None:
    import socket as stdsocket

    path = sock_dir / "s.sock"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(Server().serve, str(path)))
        with trio.fail_after(20):
            while not path.exists():  # look at every scheduler turn, not every few ms
                await trio.lowlevel.checkpoint()
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(str(path))  # no ECONNREFUSED window between bind and listen
        finally:
            probe.close()
        nursery.cancel_scope.cancel()


async def test_closed_connections_leave_no_garbage_cycle(sock_dir: Path) -> None:
    """Both ends of a closed connection, and a connection a hostile client broke, are freed
    by reference counting, none by the cycle collector: the driver freezes its heap
    (trio_spirecsi.heap), and a connection frozen while open (a pod's, the kubelet's) would
    otherwise stay until a full collection."""

    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        return csi.GetPluginInfoResponse(name="csi.spire.io")

    server = Server(ServerLimits())
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    path = sock_dir / "s.sock"
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with serving(server, path):
            for _ in range(5):
                async with open_channel(str(path)) as channel:
                    await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
            # A hostile client too: its connection fails, the next one is served.
            async with await trio.open_unix_socket(str(path)) as junk:
                await junk.send_all(b"GET / HTTP/1.1\r\n\r\n" * 10)
                with trio.fail_after(10):
                    while await junk.receive_some():
                        pass  # until the server closes it
            async with open_channel(str(path)) as channel:
                answer = await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
            await eventually(lambda: server.open_connections == 0, "server side closed", 10)
            gc.collect()  # while the server still serves: its connections' garbage only
            engine = ("h2.", "hpack.", "hyperframe.", "trio_spirecsi.grpc.")
            left = {
                type(o).__qualname__
                for o in gc.garbage
                if f"{type(o).__module__}.".startswith(engine)
            }
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert answer.name == "csi.spire.io"
    assert left == set()
