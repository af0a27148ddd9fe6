"""grpcio peers for the gRPC tests: servers in threads or a subprocess, blocking clients.

grpcio (C-core) stands in for the Go gRPC of the kubelet and the SPIRE agent. Run as a script
(`python tests/grpc_peer.py PATH`) it serves SUBSCRIBE_TO_X509_SVIDS and GET_PLUGIN_INFO on the
unix socket PATH until killed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2 as di,
)
from trio_spirecsi.grpc import Method, methods

Handler = Callable[[Any, grpc.ServicerContext], Any]


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="grpc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def eventually(check: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait until ``check()`` holds, polling; fail with ``what`` after ``limit`` seconds.

    Polling, because what is checked often changes in other threads or processes.
    """
    with trio.move_on_after(limit):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for: {what}")


def rpc_handler(method: Method[Any, Any], fn: Handler) -> grpc.RpcMethodHandler:
    """A grpcio handler for `method`: `fn` returns a message, or yields them if it streams."""
    make = (
        grpc.unary_stream_rpc_method_handler
        if method.server_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(
        fn,
        request_deserializer=method.request_type.FromString,
        response_serializer=lambda m: m.SerializeToString(),
    )


class _Handlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, table: dict[str, grpc.RpcMethodHandler]) -> None:
        self._table = table

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._table.get(details.method)


@contextmanager
def grpcio_server(
    path: Path,
    handlers: dict[Method[Any, Any], Handler],
    options: Sequence[tuple[str, Any]] = (),
    workers: int = 64,
) -> Iterator[grpc.Server]:
    """A grpcio server on the unix socket `path`, handlers run in a thread pool."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=list(options))
    table = {m.path: rpc_handler(m, fn) for m, fn in handlers.items()}
    server.add_generic_rpc_handlers((_Handlers(table),))
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=None).wait(10)


@contextmanager
def grpcio_channel(path: Path) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(f"unix://{path}")
    try:
        yield channel
    finally:
        channel.close()


def unary_call(
    channel: grpc.Channel,
    method: Method[Any, Any],
    *,
    serializer: Callable[[Any], bytes] | None = None,
) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        method.path,
        request_serializer=serializer or (lambda m: m.SerializeToString()),
        response_deserializer=method.response_type.FromString,
    )


def stream_call(channel: grpc.Channel, method: Method[Any, Any]) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(
        method.path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=method.response_type.FromString,
    )


@dataclass
class StreamRecord:
    """The grpcio server's own account of its streams: started, still active, cancelled."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> int:
        with self.lock:
            return self.started - self.finished

    def subscribe_until_cancelled(
        self, request: di.SubscribeToX509SVIDsRequest, context: grpc.ServicerContext
    ) -> Iterator[di.SubscribeToX509SVIDsResponse]:
        """Sends one message, then waits (up to 60 s) for the client to cancel.

        grpcio closes the generator at its `yield` if the cancel arrives first, hence the
        count in `finally`: the stream never ends on its own, so inactive means cancelled.
        """
        ended = threading.Event()
        context.add_callback(ended.set)
        with self.lock:
            self.started += 1
        try:
            yield di.SubscribeToX509SVIDsResponse(federates_with=["spiffe://example.org"])
            ended.wait(60)
        finally:
            with self.lock:
                self.finished += 1
                if not context.is_active():
                    self.cancelled += 1


def _ticker(
    request: di.SubscribeToX509SVIDsRequest, context: grpc.ServicerContext
) -> Iterator[di.SubscribeToX509SVIDsResponse]:
    n = 0
    while context.is_active():
        yield di.SubscribeToX509SVIDsResponse(federates_with=[f"spiffe://tick/{n}"])
        n += 1
        time.sleep(0.1)


def _info(request: csi.GetPluginInfoRequest, context: grpc.ServicerContext) -> Any:
    return csi.GetPluginInfoResponse(name="subprocess")


def main(path: str) -> None:
    handlers: dict[Method[Any, Any], Handler] = {
        methods.SUBSCRIBE_TO_X509_SVIDS: _ticker,
        methods.GET_PLUGIN_INFO: _info,
    }
    with grpcio_server(Path(path), handlers, workers=8):
        print("listening", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1])
