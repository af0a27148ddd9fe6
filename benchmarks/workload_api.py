"""Latency through a volume's socket (Workload API and SDS), for ``just bench``.

Publishes one pod with ``workload-api: "true"`` on a running driver, then times sequential
calls on its socket: FetchX509SVID (until the first response), FetchJWTSVID (a round trip
to the agent) and ValidateJWTSVID (answered by the driver alone); then, with grpcio as Envoy
would hold it, the first StreamSecrets response of a new stream and the push that follows a
rotation by the agent. Measured, not asserted.
"""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import trio

from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2 as discovery
from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.grpc import Channel, methods, open_channel
from trio_spirecsi.sds import SECRET_TYPE_URL

HEADER = {"workload.spiffe.io": "true"}


async def _timed(calls: int, call: Callable[[], Awaitable[object]]) -> str:
    await call()  # warm up: connection, first response
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    times.sort()
    p50 = statistics.median(times) * 1000
    p99 = times[max(int(len(times) * 0.99) - 1, 0)] * 1000
    return f"{p50:.2f} ms / {p99:.2f} ms"


async def workload_api_latency(
    client: CSIClient,
    kubelet_dir: Path,
    *,
    calls: int = 200,
    rotate: Callable[[], Awaitable[None]] | None = None,
    rotations: int = 50,
) -> list[tuple[str, str]]:
    """Rows ``(measure, "p50 / p99")`` for the bench table; leaves nothing published.

    ``client`` talks to a running driver whose agent issues an SVID to the pod
    ``bench/wl-bench`` (service account ``socket``, an identity of its own); targets are made
    under ``kubelet_dir``.
    """
    pod = Pod("wl-bench", "bench", str(uuid.uuid4()), "socket")
    parent = kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "spiffe"
    parent.mkdir(parents=True)
    target = parent / "mount"
    volume_id = f"csi-{uuid.uuid4().hex}"
    context = volume_context(pod, {"csi.spire.io/workload-api": "true"})
    await client.publish(publish_request(volume_id, str(target), context))
    # The kubelet's target path is longer than a unix socket path may be: go through a
    # descriptor of it, as a pod goes through its shorter mountPath.
    fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        socket = f"/proc/self/fd/{fd}/agent.sock"
        with trio.fail_after(30):
            while not os.path.exists(socket):
                await trio.sleep(0.01)
        async with open_channel(socket) as channel:
            rows = await _measure(channel, calls)
        rows += await trio.to_thread.run_sync(_measure_sds, socket, calls // 2)
        if rotate is not None:
            rows.append(await _push_latency(socket, rotate, rotations))
        return rows
    finally:
        os.close(fd)
        await client.unpublish(volume_id, str(target))


async def _measure(channel: Channel, calls: int) -> list[tuple[str, str]]:
    async def fetch_x509() -> None:
        async with channel.stream(
            methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER, timeout=30
        ) as stream:
            await stream.__anext__()

    async def fetch_jwt() -> wl.JWTSVIDResponse:
        return await channel.unary(
            methods.FETCH_JWT_SVID,
            wl.JWTSVIDRequest(audience=["bench"]),
            metadata=HEADER,
            timeout=30,
        )

    token = (await fetch_jwt()).svids[0].svid

    async def validate() -> None:
        await channel.unary(
            methods.VALIDATE_JWT_SVID,
            wl.ValidateJWTSVIDRequest(audience="bench", svid=token),
            metadata=HEADER,
            timeout=30,
        )

    return [
        (
            f"Workload API FetchX509SVID, {calls} sequential (p50 / p99)",
            await _timed(calls, fetch_x509),
        ),
        (
            f"Workload API FetchJWTSVID, {calls} sequential (p50 / p99)",
            await _timed(calls, fetch_jwt),
        ),
        (
            f"Workload API ValidateJWTSVID, {calls} sequential (p50 / p99)",
            await _timed(calls, validate),
        ),
    ]


def _percentiles(times: list[float]) -> str:
    times.sort()
    p50 = statistics.median(times) * 1000
    p99 = times[max(int(len(times) * 0.99) - 1, 0)] * 1000
    return f"{p50:.2f} ms / {p99:.2f} ms"


def _sds_request(*names: str) -> discovery.DiscoveryRequest:
    request = discovery.DiscoveryRequest(resource_names=list(names), type_url=SECRET_TYPE_URL)
    request.node.id, request.node.cluster = "bench", "bench"
    return request


def _sds_call(channel: grpc.Channel) -> Any:
    return channel.stream_stream(
        methods.STREAM_SECRETS.path,
        request_serializer=discovery.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery.DiscoveryResponse.FromString,
    )


def _measure_sds(socket: str, streams: int) -> list[tuple[str, str]]:
    """Open a StreamSecrets stream, ask for ``default``, time until its first response."""
    times = []
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = _sds_call(channel)
        for index in range(streams + 1):
            requests: queue.Queue[discovery.DiscoveryRequest | None] = queue.Queue()
            started = time.perf_counter()
            responses = call(iter(requests.get, None))
            requests.put(_sds_request("default"))
            next(responses)
            if index:  # the first one also dials
                times.append(time.perf_counter() - started)
            requests.put(None)
            responses.cancel()
    return [
        (f"SDS first StreamSecrets response, {streams} streams (p50 / p99)", _percentiles(times))
    ]


async def _push_latency(
    socket: str, rotate: Callable[[], Awaitable[None]], rotations: int
) -> tuple[str, str]:
    """One open ``default`` stream; the agent rotates; time from the agent's new SVID being
    ready to send until Envoy's stream has the push (agent -> driver -> SDS)."""
    pushed: queue.Queue[float] = queue.Queue()
    requests: queue.Queue[discovery.DiscoveryRequest | None] = queue.Queue()
    channel = grpc.insecure_channel(f"unix://{socket}")
    responses = _sds_call(channel)(iter(requests.get, None))

    def read() -> None:
        try:
            for response in responses:
                ack = _sds_request("default")
                ack.version_info, ack.response_nonce = response.version_info, response.nonce
                requests.put(ack)
                pushed.put(time.perf_counter())
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    requests.put(_sds_request("default"))
    reader.start()
    try:
        await trio.to_thread.run_sync(lambda: pushed.get(timeout=30))
        times = []
        for _ in range(rotations):
            await rotate()  # the agent re-issues the SVIDs: not the driver's time
            started = time.perf_counter()
            arrived = await trio.to_thread.run_sync(lambda: pushed.get(timeout=30))
            times.append(arrived - started)
    finally:
        requests.put(None)
        responses.cancel()
        channel.close()
    return (f"SDS push after a rotation, {rotations} rotations (p50 / p99)", _percentiles(times))
