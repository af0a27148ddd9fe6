"""Workload API latency through a volume's socket, for ``just bench``.

Publishes one pod with ``workload-api: "true"`` on a running driver, then times sequential
calls on its socket: FetchX509SVID (until the first response), FetchJWTSVID (a round trip
to the agent) and ValidateJWTSVID (answered by the driver alone). Measured, not asserted.

The driver limits FetchJWTSVID and ValidateJWTSVID per pod (``JwtRateLimit``: 10 a second,
bursts of 20), as the SPIRE agent does: those calls are paced to stay under it, and only the
calls themselves are timed.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.grpc import Channel, methods, open_channel
from trio_spirecsi.workloadapi.server import JwtRateLimit

HEADER = {"workload.spiffe.io": "true"}
JWT_PACE = 1.1 / JwtRateLimit().per_second
"""Seconds between two rate-limited calls: a little slower than the driver's limit."""


async def _timed(calls: int, call: Callable[[], Awaitable[object]], pace: float = 0.0) -> str:
    await call()  # warm up: connection, first response
    times = []
    for _ in range(calls):
        await trio.sleep(pace)
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    times.sort()
    p50 = statistics.median(times) * 1000
    p99 = times[max(int(len(times) * 0.99) - 1, 0)] * 1000
    return f"{p50:.2f} ms / {p99:.2f} ms"


async def workload_api_latency(
    client: CSIClient, kubelet_dir: Path, *, calls: int = 200, jwt_calls: int = 50
) -> list[tuple[str, str]]:
    """Rows ``(measure, "p50 / p99")`` for the bench table; leaves nothing published.

    ``client`` talks to a running driver whose agent issues an SVID to the pod
    ``bench/wl-bench`` (service account ``web``); targets are made under ``kubelet_dir``.
    """
    pod = Pod("wl-bench", "bench", str(uuid.uuid4()), "web")
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
            return await _measure(channel, calls, jwt_calls)
    finally:
        os.close(fd)
        await client.unpublish(volume_id, str(target))


async def _measure(channel: Channel, calls: int, jwt_calls: int) -> list[tuple[str, str]]:
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
            f"Workload API FetchJWTSVID, {jwt_calls} sequential (p50 / p99)",
            await _timed(jwt_calls, fetch_jwt, JWT_PACE),
        ),
        (
            f"Workload API ValidateJWTSVID, {jwt_calls} sequential (p50 / p99)",
            await _timed(jwt_calls, validate, JWT_PACE),
        ),
    ]
