"""CSI Node service: validates kubelet's requests and hands them to the registry."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

from .. import log
from .._proto.csi.v1 import csi_pb2 as csi
from ..attributes import parse_volume_context
from ..errors import InvalidArgument, PublishFailed, SpireCSIError
from ..grpc import Server, ServerContext, methods
from ..metrics import PUBLISH_PHASES, Metrics
from ..storage.metadata import MetadataError
from ..storage.paths import check_target_path
from ..volumes.registry import PublishRequest, Registry
from ..volumes.trace import PublishTrace
from .status import handler, internal_error

logger = logging.getLogger(__name__)

# PublishFailed.kind -> the publish_duration "outcome" label.
_OUTCOMES = {
    "timeout": "timeout",
    "unavailable": "agent_unavailable",
    "permission_denied": "permission_denied",
    "internal": "error",
}

_CAPABILITIES = (
    csi.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP,
    csi.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    csi.NodeServiceCapability.RPC.VOLUME_CONDITION,
)


class NodeService:
    def __init__(
        self, registry: Registry, *, node_id: str, kubelet_dir: Path, metrics: Metrics
    ) -> None:
        self._registry = registry
        self._node_id = node_id
        self._kubelet_dir = kubelet_dir
        self._metrics = metrics
        self._phase_seconds = {p: metrics.publish_phase.labels(phase=p) for p in PUBLISH_PHASES}

    def register(self, server: Server) -> None:
        count = self._count_internal
        server.add_unary(methods.NODE_PUBLISH_VOLUME, handler(self.publish, count))
        server.add_unary(methods.NODE_UNPUBLISH_VOLUME, handler(self.unpublish, count))
        server.add_unary(methods.NODE_GET_VOLUME_STATS, handler(self.get_volume_stats, count))
        server.add_unary(methods.NODE_GET_CAPABILITIES, handler(self.get_capabilities))
        server.add_unary(methods.NODE_GET_INFO, handler(self.get_info))
        # NodeStageVolume, NodeUnstageVolume and NodeExpandVolume are not
        # registered: the server answers UNIMPLEMENTED for them.

    def _count_internal(self, kind: str) -> None:
        self._metrics.errors_total.labels(kind=kind).inc()

    # Requests ------------------------------------------------------------

    def validate_publish(self, request: csi.NodePublishVolumeRequest) -> PublishRequest:
        volume_id = _required(request.volume_id, "volume_id")
        target = self._target(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability", "is required")
        capability = request.volume_capability
        if capability.HasField("block"):
            raise InvalidArgument(
                "volume_capability.block", "block volumes are not supported; use a mount volume"
            )
        if not capability.HasField("mount"):
            raise InvalidArgument("volume_capability.access_type", "must be mount")
        if not request.readonly:
            raise InvalidArgument(
                "readonly", "must be true: declare the pod's csi volume with readOnly: true"
            )
        group = capability.mount.volume_mount_group
        if group and not (group.isascii() and group.isdigit() and int(group) < 2**32):
            raise InvalidArgument(
                "volume_capability.mount.volume_mount_group", f"{group!r} is not a numeric gid"
            )
        context = dict(request.volume_context)
        spec = parse_volume_context(context, volume_mount_group=group)
        return PublishRequest(volume_id, target, context, group, spec)

    async def publish(
        self, request: csi.NodePublishVolumeRequest, context: ServerContext
    ) -> csi.NodePublishVolumeResponse:
        started = time.perf_counter()
        trace = PublishTrace(started)
        outcome = "error"
        fields: dict[str, str] = {"volume_id": request.volume_id}
        try:
            req = self.validate_publish(request)
            fields["pod"] = f"{req.spec.pod.namespace}/{req.spec.pod.name}"
            await self._registry.publish(req, trace)
            volume = self._registry.get(req.volume_id)
            written = volume.state.value.written if volume is not None else None
            if written is not None:
                fields["spiffe_id"] = written.spiffe_id
            outcome = "ok"
            return csi.NodePublishVolumeResponse()
        except InvalidArgument as exc:
            outcome = "invalid_argument"
            fields["error"] = f"{exc.field}: {exc.message}"
            raise
        except PublishFailed as exc:
            outcome = _OUTCOMES.get(exc.kind, "error")
            fields["error"] = exc.message
            raise
        except SpireCSIError as exc:
            fields["error"] = exc.message
            raise
        except (OSError, MetadataError) as exc:
            fields["error"] = internal_error(exc)[1].message
            raise
        finally:
            elapsed = time.perf_counter() - started
            # Counted and logged once the answer has left: the kubelet does not wait for it.
            context.after_response(partial(self._published, outcome, elapsed, trace, fields))

    def _published(
        self, outcome: str, elapsed: float, trace: PublishTrace, fields: dict[str, str]
    ) -> None:
        self._metrics.publish_duration.labels(outcome=outcome).observe(elapsed)
        if outcome == "ok" and trace.complete:
            self._phases(trace, fields)
        log.event(
            logger,
            logging.INFO if outcome == "ok" else logging.WARNING,
            "publish",
            outcome=outcome,
            duration_ms=round(elapsed * 1000, 2),
            **fields,
        )

    def _phases(self, trace: PublishTrace, fields: dict[str, str]) -> None:
        for name, seconds in trace.durations.items():
            self._phase_seconds[name].observe(seconds)
        if logger.isEnabledFor(logging.DEBUG):
            durations = {f"{k}_ms": round(v * 1000, 3) for k, v in trace.durations.items()}
            log.event(logger, logging.DEBUG, "publish_phases", **fields, **durations)

    async def unpublish(
        self, request: csi.NodeUnpublishVolumeRequest, context: ServerContext
    ) -> csi.NodeUnpublishVolumeResponse:
        started = time.perf_counter()
        volume_id = _required(request.volume_id, "volume_id")
        target = self._target(request.target_path, "target_path")
        await self._registry.unpublish(volume_id, target)
        log.event(
            logger,
            logging.INFO,
            "unpublish",
            volume_id=volume_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return csi.NodeUnpublishVolumeResponse()

    async def get_volume_stats(
        self, request: csi.NodeGetVolumeStatsRequest, context: ServerContext
    ) -> csi.NodeGetVolumeStatsResponse:
        volume_id = _required(request.volume_id, "volume_id")
        path = Path(os.path.normpath(_required(request.volume_path, "volume_path")))
        stats = self._registry.stats(volume_id, path)
        unit = csi.VolumeUsage
        return csi.NodeGetVolumeStatsResponse(
            usage=[
                unit(
                    available=stats.available_bytes,
                    total=stats.total_bytes,
                    used=stats.used_bytes,
                    unit=unit.BYTES,
                ),
                unit(
                    available=stats.available_inodes,
                    total=stats.total_inodes,
                    used=stats.used_inodes,
                    unit=unit.INODES,
                ),
            ],
            volume_condition=csi.VolumeCondition(abnormal=stats.abnormal, message=stats.message),
        )

    async def get_capabilities(
        self, request: csi.NodeGetCapabilitiesRequest, context: ServerContext
    ) -> csi.NodeGetCapabilitiesResponse:
        rpc = csi.NodeServiceCapability.RPC
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[csi.NodeServiceCapability(rpc=rpc(type=t)) for t in _CAPABILITIES]
        )

    async def get_info(
        self, request: csi.NodeGetInfoRequest, context: ServerContext
    ) -> csi.NodeGetInfoResponse:
        return csi.NodeGetInfoResponse(node_id=self._node_id)

    # Validation ----------------------------------------------------------

    def _target(self, value: str, field: str) -> Path:
        """An absolute path below --kubelet-dir, as written; the registry walks it without
        following symlinks before it mounts or unmounts anything."""
        return check_target_path(self._kubelet_dir, _required(value, field), field=field)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return value


__all__ = ["NodeService", "PublishFailed"]
