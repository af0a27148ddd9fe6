"""Our gRPC Server on a unix socket, called by grpcio (the C-core client)."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from tests.grpc_peer import eventually, grpcio_channel, short_dir, stream_call, unary_call
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import (
    Method,
    RpcError,
    Server,
    ServerContext,
    ServerLimits,
    StatusCode,
    StreamSender,
    methods,
)

SubResp = di.SubscribeToX509SVIDsResponse


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@asynccontextmanager
async def serving(server: Server, path: Path, mode: int | None = None) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.serve, str(path), mode=mode))
        yield
        nursery.cancel_scope.cancel()


def in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking grpcio code; abandoned (not awaited) if the test's deadline passes."""
    return trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


async def test_grpcio_client_calls_unary_and_streaming_methods_with_metadata(
    sock_dir: Path,
) -> None:
    seen: list[ServerContext] = []

    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        seen.append(ctx)
        return csi.GetPluginInfoResponse(name="example.org", vendor_version="1.2.3")

    async def subscribe(
        request: di.SubscribeToX509SVIDsRequest, ctx: ServerContext, send: StreamSender[SubResp]
    ) -> None:
        seen.append(ctx)
        for selector in request.selectors:
            await send(SubResp(federates_with=[f"{selector.type}:{selector.value}"]))

    server = Server()
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    server.add_stream(methods.SUBSCRIBE_TO_X509_SVIDS, subscribe)
    path = sock_dir / "csi.sock"
    request = di.SubscribeToX509SVIDsRequest()
    for value in ("a", "b", "c"):
        request.selectors.add(type="k8s", value=value)

    def client() -> tuple[Any, list[Any]]:
        with grpcio_channel(path) as channel:
            reply = unary_call(channel, methods.GET_PLUGIN_INFO)(
                csi.GetPluginInfoRequest(), metadata=[("x-volume", "vol-1")], timeout=10
            )
            stream = stream_call(channel, methods.SUBSCRIBE_TO_X509_SVIDS)(request, timeout=10)
            return reply, list(stream)

    async with serving(server, path):
        reply, streamed = await in_thread(client)

    assert reply.name == "example.org" and reply.vendor_version == "1.2.3"
    assert [list(m.federates_with) for m in streamed] == [["k8s:a"], ["k8s:b"], ["k8s:c"]]
    assert seen[0].metadata["x-volume"] == "vol-1"
    assert not any(
        k.startswith((":", "grpc-")) or k in ("te", "content-type") for k in seen[0].metadata
    )
    assert seen[0].method is methods.GET_PLUGIN_INFO
    assert seen[0].deadline is not None
    assert seen[1].method is methods.SUBSCRIBE_TO_X509_SVIDS
    assert seen[0].peer is not None
    assert (seen[0].peer.uid, seen[0].peer.gid, seen[0].peer.pid) == (
        os.getuid(),
        os.getgid(),
        os.getpid(),
    )


async def test_unknown_method_is_unimplemented_and_unparsable_request_is_internal(
    sock_dir: Path,
) -> None:
    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        return csi.GetPluginInfoResponse(name="still-here")

    async def publish(request: csi.NodePublishVolumeRequest, ctx: ServerContext) -> Any:
        return csi.NodePublishVolumeResponse()

    server = Server()
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    server.add_unary(methods.NODE_PUBLISH_VOLUME, publish)
    path = sock_dir / "csi.sock"
    unknown = Method("/x.y.Z/Nope", csi.ProbeRequest, csi.ProbeResponse)
    # field 1 (volume_id, a string) holding invalid UTF-8: not a NodePublishVolumeRequest
    garbage = b"\x0a\x02\xff\xfe"

    def client() -> tuple[grpc.RpcError, grpc.RpcError, Any]:
        with grpcio_channel(path) as channel:
            with pytest.raises(grpc.RpcError) as missing:
                unary_call(channel, unknown)(csi.ProbeRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as bad:
                unary_call(channel, methods.NODE_PUBLISH_VOLUME, serializer=lambda _: garbage)(
                    csi.NodePublishVolumeRequest(), timeout=10
                )
            after = unary_call(channel, methods.GET_PLUGIN_INFO)(csi.GetPluginInfoRequest())
            return missing.value, bad.value, after

    async with serving(server, path):
        missing, bad, after = await in_thread(client)

    assert missing.code() == grpc.StatusCode.UNIMPLEMENTED
    assert missing.details() == "method /x.y.Z/Nope is not implemented"
    assert bad.code() == grpc.StatusCode.INTERNAL
    assert bad.details() == "could not parse request"
    assert after.name == "still-here"


async def test_handler_bug_is_unknown_with_a_safe_message_and_logged_traceback(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        raise ValueError("token=s3cr3t-value")

    async def probe(request: csi.ProbeRequest, ctx: ServerContext) -> Any:
        raise RpcError(StatusCode.FAILED_PRECONDITION, "agent not ready: ünïcode")

    server = Server()
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    server.add_unary(methods.PROBE, probe)
    path = sock_dir / "csi.sock"

    def client() -> tuple[grpc.RpcError, grpc.RpcError]:
        with grpcio_channel(path) as channel:
            with pytest.raises(grpc.RpcError) as bug:
                unary_call(channel, methods.GET_PLUGIN_INFO)(csi.GetPluginInfoRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as chosen:
                unary_call(channel, methods.PROBE)(csi.ProbeRequest(), timeout=10)
            return bug.value, chosen.value

    with caplog.at_level(logging.ERROR, logger="trio_spirecsi.grpc"):
        async with serving(server, path):
            bug, chosen = await in_thread(client)

    assert bug.code() == grpc.StatusCode.UNKNOWN
    assert bug.details() == "internal error in /csi.v1.Identity/GetPluginInfo"
    assert "s3cr3t" not in bug.details() and "Traceback" not in bug.details()
    assert chosen.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert chosen.details() == "agent not ready: ünïcode"
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_after_response_work_runs_once_the_client_has_its_answer(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Work a handler leaves for after its response (a log line, metrics) runs once per
    call, after the answer has left: a grpcio client has it while that work still runs.
    Work that fails is logged; the connection and the next call go on."""
    done: list[tuple[str, float]] = []

    def slow() -> None:
        time.sleep(0.5)  # holds the event loop: the answer must have left before
        done.append(("slow", time.monotonic()))

    def broken() -> None:
        done.append(("broken", time.monotonic()))
        raise ValueError("after-response bug")

    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        ctx.after_response(slow)
        return csi.GetPluginInfoResponse(name="example.org")

    async def probe(request: csi.ProbeRequest, ctx: ServerContext) -> Any:
        ctx.after_response(broken)
        raise RpcError(StatusCode.FAILED_PRECONDITION, "not ready")

    server = Server()
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    server.add_unary(methods.PROBE, probe)
    path = sock_dir / "csi.sock"

    def client() -> tuple[float, str, str]:
        with grpcio_channel(path) as channel:
            reply = unary_call(channel, methods.GET_PLUGIN_INFO)(
                csi.GetPluginInfoRequest(), timeout=10
            )
            answered = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                unary_call(channel, methods.PROBE)(csi.ProbeRequest(), timeout=10)
            again = unary_call(channel, methods.GET_PLUGIN_INFO)(
                csi.GetPluginInfoRequest(), timeout=10
            )
            return answered, reply.name + again.name, failed.value.details()

    with caplog.at_level(logging.ERROR, logger="trio_spirecsi.grpc"):
        async with serving(server, path):
            answered, names, details = await in_thread(client)

    assert names == "example.orgexample.org" and details == "not ready"
    assert [name for name, _ in done] == ["slow", "broken", "slow"]
    assert answered < done[0][1], "the client had its answer only after the work"
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "/csi.v1.Identity/Probe" in record.getMessage()


async def test_grpcio_client_cancel_cancels_our_blocked_handlers(sock_dir: Path) -> None:
    streams = 50
    finished = 0

    async def subscribe(
        request: di.SubscribeToX509SVIDsRequest, ctx: ServerContext, send: StreamSender[SubResp]
    ) -> None:
        nonlocal finished
        try:
            await send(SubResp(federates_with=["first"]))
            await trio.sleep_forever()  # blocked elsewhere than in send()
        finally:
            finished += 1

    # 50 streams on one connection: more than the untrusted default allows at once.
    server = Server(ServerLimits.trusted())
    server.add_stream(methods.SUBSCRIBE_TO_X509_SVIDS, subscribe)
    path = sock_dir / "csi.sock"

    def client() -> list[str]:
        with grpcio_channel(path) as channel:
            calls = [
                stream_call(channel, methods.SUBSCRIBE_TO_X509_SVIDS)(
                    di.SubscribeToX509SVIDsRequest()
                )
                for _ in range(streams)
            ]
            firsts = [next(call).federates_with[0] for call in calls]
            for call in calls:
                call.cancel()
            return firsts

    async with serving(server, path):
        firsts = await in_thread(client)
        assert firsts == ["first"] * streams
        await eventually(lambda: finished == streams, "every handler's finally ran", 10)
        assert server.active_streams == 0


async def test_grpcio_deadline_cancels_our_handler_and_client_sees_deadline_exceeded(
    sock_dir: Path,
) -> None:
    deadlines: list[float | None] = []
    cancelled = trio.Event()

    async def info(request: csi.GetPluginInfoRequest, ctx: ServerContext) -> Any:
        deadlines.append(ctx.deadline)
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server = Server()
    server.add_unary(methods.GET_PLUGIN_INFO, info)
    path = sock_dir / "csi.sock"

    def client() -> grpc.RpcError:
        with grpcio_channel(path) as channel, pytest.raises(grpc.RpcError) as err:
            unary_call(channel, methods.GET_PLUGIN_INFO)(csi.GetPluginInfoRequest(), timeout=0.5)
        return err.value

    async with serving(server, path):
        err = await in_thread(client)
        with trio.fail_after(10):
            await cancelled.wait()
        await eventually(lambda: server.active_streams == 0, "no handler running", 10)

    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadlines[0] is not None


async def test_shutdown_ends_open_client_streams_and_removes_the_socket(sock_dir: Path) -> None:
    handler_done = trio.Event()

    async def subscribe(
        request: di.SubscribeToX509SVIDsRequest, ctx: ServerContext, send: StreamSender[SubResp]
    ) -> None:
        try:
            await send(SubResp(federates_with=["first"]))
            await trio.sleep_forever()
        finally:
            handler_done.set()

    server = Server()
    server.add_stream(methods.SUBSCRIBE_TO_X509_SVIDS, subscribe)
    path = sock_dir / "csi.sock"

    with grpcio_channel(path) as channel:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run_server() -> None:
                with scope:
                    await server.serve(str(path))

            nursery.start_soon(run_server)
            await eventually(path.exists, "socket file", 10)
            call = stream_call(channel, methods.SUBSCRIBE_TO_X509_SVIDS)(
                di.SubscribeToX509SVIDsRequest()
            )
            first = await in_thread(next, call)
            assert first.federates_with[0] == "first"
            scope.cancel()
        # serve() has returned: handler finished, file removed
        assert handler_done.is_set()
        assert not path.exists()
        with trio.fail_after(10), pytest.raises(grpc.RpcError) as err:
            await in_thread(next, call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # grpcio words it "GOAWAY received" or "Socket closed", depending on which of the
        # two it reads first; it may also say "Connection reset by peer" if the server closed
        # the socket before reading the last bytes grpcio sent. Either way the server ended
        # the stream instead of leaving it hanging. CI once saw neither of the first two: the
        # details are shown if a wording is missing here.
        details = err.value.details()
        ended = ("GOAWAY", "Socket closed", "Connection reset")
        assert any(w in details for w in ended), details


async def test_serve_replaces_a_stale_socket_applies_mode_and_refuses_other_files(
    sock_dir: Path,
) -> None:
    import socket

    stale = sock_dir / "stale.sock"
    left_behind = socket.socket(socket.AF_UNIX)
    left_behind.bind(str(stale))
    left_behind.close()  # a socket file with nobody listening: what a crash leaves
    regular = sock_dir / "file.sock"
    regular.write_text("not a socket")

    server = Server()
    async with serving(server, stale, mode=0o660):
        st = os.stat(stale)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        with pytest.raises(OSError, match="another server is listening"):
            await Server().serve(str(stale))
    assert not stale.exists()

    with pytest.raises(FileExistsError):
        await Server().serve(str(regular))
    assert regular.read_text() == "not a socket"
