"""NodePublishVolume request bytes through the CSI Node service's handler.

Input: a serialized ``NodePublishVolumeRequest``. It goes through the registered handler
(``csi.status.handler`` around ``NodeService.publish``: validation, then the registry) with
a registry that accepts everything without waiting, so the coroutine finishes in one step and
no event loop is needed.

Promise: the kubelet always gets a gRPC status: OK for a valid request (and the registry got
a target inside the kubelet folder), else INVALID_ARGUMENT; never an internal error.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from functools import cache
from pathlib import Path
from typing import Any, cast

from google.protobuf.message import DecodeError

from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi.csi.node import NodeService
from trio_spirecsi.csi.status import handler
from trio_spirecsi.grpc import RpcError, ServerContext, StatusCode, methods
from trio_spirecsi.metrics import Metrics
from trio_spirecsi.volumes.registry import PublishRequest, Registry
from trio_spirecsi.volumes.trace import PublishTrace
from trio_spirecsi.volumes.volume import Volume

KUBELET_DIR = Path("/var/lib/kubelet")


class AcceptingRegistry:
    """Stands in for the registry: records the validated request, never waits."""

    def __init__(self) -> None:
        self.last: PublishRequest | None = None

    async def publish(self, req: PublishRequest, trace: PublishTrace | None = None) -> None:
        self.last = req

    def get(self, volume_id: str) -> Volume | None:
        return None


@cache
def _service() -> tuple[AcceptingRegistry, NodeService]:
    registry = AcceptingRegistry()
    node = NodeService(
        cast(Registry, registry), node_id="node-a", kubelet_dir=KUBELET_DIR, metrics=Metrics()
    )
    return registry, node


def test_one_input(data: bytes) -> str:
    try:
        request = csi.NodePublishVolumeRequest.FromString(data)
    except DecodeError:
        return "undecodable"
    registry, node = _service()
    registry.last = None
    context = ServerContext(
        method=methods.NODE_PUBLISH_VOLUME, metadata={}, deadline=None, peer=None
    )
    call = cast(Coroutine[Any, Any, object], handler(node.publish)(request, context))
    try:
        call.send(None)
    except StopIteration:
        pass
    except RpcError as exc:
        if exc.code != StatusCode.INVALID_ARGUMENT:
            raise AssertionError(f"publish answered {exc.code.name}: {exc.message}") from exc
        return "rejected"
    else:
        call.close()
        raise AssertionError("the handler waited although the registry never does")
    finally:
        context.responded()  # as the server does: the call's log line and metrics
    req = registry.last
    if req is None:
        raise AssertionError("OK without a publish reaching the registry")
    real = os.path.realpath(req.target_path)
    if os.path.commonpath([str(KUBELET_DIR), real]) != str(KUBELET_DIR):
        raise AssertionError(f"accepted a target outside the kubelet folder: {real!r}")
    return "accepted"
