"""CSI Identity service: name, version, capabilities, Probe."""

from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from .. import __version__
from .._proto.csi.v1 import csi_pb2 as csi
from ..grpc import Server, ServerContext, methods


class IdentityService:
    def __init__(self, driver_name: str) -> None:
        self._name = driver_name

    def register(self, server: Server) -> None:
        server.add_unary(methods.GET_PLUGIN_INFO, self.get_plugin_info)
        server.add_unary(methods.GET_PLUGIN_CAPABILITIES, self.get_plugin_capabilities)
        server.add_unary(methods.PROBE, self.probe)

    async def get_plugin_info(
        self, request: csi.GetPluginInfoRequest, context: ServerContext
    ) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=self._name, vendor_version=__version__)

    async def get_plugin_capabilities(
        self, request: csi.GetPluginCapabilitiesRequest, context: ServerContext
    ) -> csi.GetPluginCapabilitiesResponse:
        # A node-only plugin: no CONTROLLER_SERVICE, no topology constraints.
        return csi.GetPluginCapabilitiesResponse()

    async def probe(self, request: csi.ProbeRequest, context: ServerContext) -> csi.ProbeResponse:
        # Ready whenever this process serves. Agent reachability is reported by
        # logs, metrics and /readyz: failing Probe would make the livenessprobe
        # sidecar restart the driver in a loop while the agent is down.
        return csi.ProbeResponse(ready=BoolValue(value=True))
