"""A small kubelet-like CSI client: what the kubelet sends, for debugging, the
demo, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._proto.csi.v1 import csi_pb2 as csi
from ..grpc import Channel, methods


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str
    service_account: str


def volume_context(pod: Pod, attributes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The volume_context the kubelet builds for an inline ephemeral volume of a pod
    (CSIDriver podInfoOnMount: true), plus the pod's volumeAttributes."""
    context = {
        "csi.storage.k8s.io/pod.name": pod.name,
        "csi.storage.k8s.io/pod.namespace": pod.namespace,
        "csi.storage.k8s.io/pod.uid": pod.uid,
        "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
        "csi.storage.k8s.io/ephemeral": "true",
    }
    context.update(attributes or {})
    return context


def publish_request(
    volume_id: str,
    target_path: str,
    context: Mapping[str, str],
    *,
    fs_group: str = "",
    readonly: bool = True,
) -> csi.NodePublishVolumeRequest:
    return csi.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=target_path,
        volume_capability=csi.VolumeCapability(
            mount=csi.VolumeCapability.MountVolume(volume_mount_group=fs_group),
            access_mode=csi.VolumeCapability.AccessMode(
                mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        ),
        readonly=readonly,
        volume_context=dict(context),
    )


class CSIClient:
    def __init__(self, channel: Channel, timeout: float = 120.0) -> None:
        self._channel = channel
        self._timeout = timeout

    async def publish(self, request: csi.NodePublishVolumeRequest) -> None:
        await self._channel.unary(methods.NODE_PUBLISH_VOLUME, request, timeout=self._timeout)

    async def unpublish(self, volume_id: str, target_path: str) -> None:
        request = csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path)
        await self._channel.unary(methods.NODE_UNPUBLISH_VOLUME, request, timeout=self._timeout)

    async def stats(self, volume_id: str, volume_path: str) -> csi.NodeGetVolumeStatsResponse:
        request = csi.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=volume_path)
        return await self._channel.unary(
            methods.NODE_GET_VOLUME_STATS, request, timeout=self._timeout
        )

    async def plugin_info(self) -> csi.GetPluginInfoResponse:
        return await self._channel.unary(
            methods.GET_PLUGIN_INFO, csi.GetPluginInfoRequest(), timeout=self._timeout
        )

    async def node_info(self) -> csi.NodeGetInfoResponse:
        return await self._channel.unary(
            methods.NODE_GET_INFO, csi.NodeGetInfoRequest(), timeout=self._timeout
        )

    async def probe(self) -> bool:
        response = await self._channel.unary(
            methods.PROBE, csi.ProbeRequest(), timeout=self._timeout
        )
        return response.ready.value
