"""Our gRPC Channel against grpcio servers (the C-core, standing in for the SPIRE agent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from tests.grpc_peer import Handler, StreamRecord, eventually, grpcio_server, short_dir
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import Method, RpcError, StatusCode, methods, open_channel

SUBSCRIBE = methods.SUBSCRIBE_TO_X509_SVIDS
SubReq = di.SubscribeToX509SVIDsRequest
SubResp = di.SubscribeToX509SVIDsResponse
PEER_SCRIPT = Path(__file__).with_name("grpc_peer.py")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


async def test_unary_and_streaming_calls_to_grpcio_server(sock_dir: Path) -> None:
    seen: dict[str, Any] = {}

    def info(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        seen["metadata"] = dict(context.invocation_metadata())
        return csi.GetPluginInfoResponse(name="grpcio", vendor_version="9")

    def subscribe(request: SubReq, context: grpc.ServicerContext) -> Iterator[SubResp]:
        for selector in request.selectors:
            yield SubResp(federates_with=[selector.value])

    def probe(request: csi.ProbeRequest, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, "nöthing here")

    path = sock_dir / "agent.sock"
    request = SubReq()
    for value in ("x", "y"):
        request.selectors.add(type="unix", value=value)
    handlers: dict[Method[Any, Any], Handler] = {
        methods.GET_PLUGIN_INFO: info,
        SUBSCRIBE: subscribe,
        methods.PROBE: probe,
    }
    with grpcio_server(path, handlers):
        async with open_channel(str(path)) as channel:
            reply = await channel.unary(
                methods.GET_PLUGIN_INFO,
                csi.GetPluginInfoRequest(),
                timeout=10,
                metadata={"X-Pod": "default/web"},
            )
            async with channel.stream(SUBSCRIBE, request, timeout=10) as responses:
                got = [list(m.federates_with) async for m in responses]
            with pytest.raises(RpcError) as err:
                await channel.unary(methods.PROBE, csi.ProbeRequest())
            unknown = Method("/x.y.Z/Nope", csi.ProbeRequest, csi.ProbeResponse)
            with pytest.raises(RpcError) as missing:
                await channel.unary(unknown, csi.ProbeRequest())
            assert channel.connections_opened == 1

    assert (reply.name, reply.vendor_version) == ("grpcio", "9")
    assert seen["metadata"]["x-pod"] == "default/web"
    assert got == [["x"], ["y"]]
    assert (err.value.code, err.value.message) == (StatusCode.NOT_FOUND, "nöthing here")
    assert missing.value.code == StatusCode.UNIMPLEMENTED


async def test_leaving_streams_early_cancels_them_on_the_grpcio_server(sock_dir: Path) -> None:
    streams = 50
    record = StreamRecord()
    path = sock_dir / "agent.sock"
    with grpcio_server(path, {SUBSCRIBE: record.subscribe_until_cancelled}, workers=streams + 8):
        async with open_channel(str(path)) as channel:
            all_open = trio.Event()
            received = 0

            async def subscriber() -> None:
                nonlocal received
                async with channel.stream(SUBSCRIBE, SubReq()) as responses:
                    async for _ in responses:
                        received += 1
                        if received == streams:
                            all_open.set()
                        await all_open.wait()
                        break

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(streams):
                        nursery.start_soon(subscriber)
            await eventually(
                lambda: record.cancelled == streams and record.active == 0,
                "the grpcio server counts every stream cancelled",
                10,
            )
            assert record.started == streams
            assert channel.connections_opened == 1


async def test_deadline_expires_against_a_grpcio_server_that_never_answers(
    sock_dir: Path,
) -> None:
    remaining: list[float | None] = []
    released = threading.Event()

    def stall(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        remaining.append(context.time_remaining())
        released.wait(30)
        return csi.GetPluginInfoResponse()

    def stall_stream(request: SubReq, context: grpc.ServicerContext) -> Iterator[SubResp]:
        yield SubResp(federates_with=["first"])
        released.wait(30)

    path = sock_dir / "agent.sock"
    with grpcio_server(path, {methods.GET_PLUGIN_INFO: stall, SUBSCRIBE: stall_stream}):
        try:
            async with open_channel(str(path)) as channel:
                with trio.fail_after(10), pytest.raises(RpcError) as err:
                    await channel.unary(
                        methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=0.5
                    )
                with trio.fail_after(10):
                    async with channel.stream(SUBSCRIBE, SubReq(), timeout=1.0) as responses:
                        first = await responses.__anext__()
                        with pytest.raises(RpcError) as stream_err:
                            await responses.__anext__()
        finally:
            released.set()

    assert err.value.code == StatusCode.DEADLINE_EXCEEDED
    assert remaining[0] is not None and 0 < remaining[0] <= 0.5
    assert first.federates_with[0] == "first"
    assert stream_err.value.code == StatusCode.DEADLINE_EXCEEDED


async def test_calls_wait_for_a_free_stream_under_max_concurrent_streams(sock_dir: Path) -> None:
    lock = threading.Lock()
    running = peak = 0

    def slow(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return csi.GetPluginInfoResponse(name="ok")

    path = sock_dir / "agent.sock"
    options = [("grpc.max_concurrent_streams", 2)]
    with grpcio_server(path, {methods.GET_PLUGIN_INFO: slow}, options=options):
        async with open_channel(str(path)) as channel:
            names: list[str] = []

            async def call() -> None:
                reply = await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
                names.append(reply.name)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(call)

    assert names == ["ok"] * 5
    assert peak <= 2


async def test_dial_to_a_missing_socket_is_unavailable_naming_the_path(sock_dir: Path) -> None:
    path = sock_dir / "nothing.sock"
    async with open_channel(str(path)) as channel:
        with pytest.raises(RpcError) as err:
            await channel.unary(methods.PROBE, csi.ProbeRequest(), timeout=5)
    assert err.value.code == StatusCode.UNAVAILABLE
    assert err.value.message == f"connect to {path}: No such file or directory"


async def start_peer(path: Path) -> trio.Process:
    """The grpcio server of grpc_peer.py in its own process, once it says it is listening."""
    env = dict(os.environ, PYTHONPATH=str(PEER_SCRIPT.parent.parent))
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(PEER_SCRIPT), str(path)], env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"\n" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, "grpcio peer exited before listening"
                output += chunk
        assert output == b"listening\n"
    except BaseException:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        raise
    return proc


async def test_peer_killed_mid_stream_gives_unavailable_then_the_channel_reconnects(
    sock_dir: Path,
) -> None:
    path = sock_dir / "agent.sock"
    peers = [await start_peer(path)]
    try:
        async with open_channel(str(path)) as channel:
            async with channel.stream(SUBSCRIBE, SubReq()) as responses:
                tick = await responses.__anext__()
                assert tick.federates_with[0].startswith("spiffe://tick/")
                peers[0].send_signal(signal.SIGKILL)
                await peers[0].wait()
                with trio.fail_after(10), pytest.raises(RpcError) as err:
                    async for _ in responses:
                        pass
            assert err.value.code == StatusCode.UNAVAILABLE
            assert str(path) in err.value.message

            peers.append(await start_peer(path))  # on the stale socket file left behind
            reply = await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
            assert reply.name == "subprocess"
            assert channel.connections_opened == 2
    finally:
        with trio.CancelScope(shield=True):
            for proc in peers:
                if proc.poll() is None:
                    proc.kill()
                await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()


async def test_graceful_goaway_lets_calls_in_flight_finish(sock_dir: Path) -> None:
    started = threading.Event()

    def slow(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        started.set()
        time.sleep(0.5)
        return csi.GetPluginInfoResponse(name="finished")

    path = sock_dir / "agent.sock"
    async with open_channel(str(path)) as channel:
        with grpcio_server(path, {methods.GET_PLUGIN_INFO: slow}) as server:
            async with trio.open_nursery() as nursery:
                names: list[str] = []

                async def call() -> None:
                    reply = await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
                    names.append(reply.name)

                nursery.start_soon(call)
                await trio.to_thread.run_sync(started.wait, 10)
                await trio.to_thread.run_sync(lambda: server.stop(grace=10).wait(20))
            assert names == ["finished"]
        with pytest.raises(RpcError) as err:
            await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=5)
        assert err.value.code == StatusCode.UNAVAILABLE


async def test_flow_control_carries_more_than_a_window_and_rejects_oversized_messages(
    sock_dir: Path,
) -> None:
    chunk = "x" * (1024 * 1024)

    def big(request: SubReq, context: grpc.ServicerContext) -> Iterator[SubResp]:
        for _ in range(request.selectors[0].value.count("+") + 1):
            yield SubResp(federates_with=[chunk])

    def huge(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
        return csi.GetPluginInfoResponse(name="y" * (5 * 1024 * 1024))

    path = sock_dir / "agent.sock"
    with grpcio_server(path, {SUBSCRIBE: big, methods.GET_PLUGIN_INFO: huge}):
        async with open_channel(str(path)) as channel:
            request = SubReq()
            request.selectors.add(type="n", value="+" * 19)  # 20 messages of 1 MiB
            with trio.fail_after(60):
                async with channel.stream(SUBSCRIBE, request) as responses:
                    sizes = [len(m.federates_with[0]) async for m in responses]
            with pytest.raises(RpcError) as err:
                await channel.unary(methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest())
            request.selectors[0].value = ""
            async with channel.stream(SUBSCRIBE, request) as responses:
                after = [len(m.federates_with[0]) async for m in responses]
            assert channel.connections_opened == 1
    assert sizes == [len(chunk)] * 20
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED
    assert after == [len(chunk)]
