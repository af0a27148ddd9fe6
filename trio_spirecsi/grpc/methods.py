"""Every RPC this project speaks, as typed Method values.

gRPC paths are written out here, once; the rest of the code refers to these
constants and never spells a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from .._proto.csi.v1 import csi_pb2 as csi
from .._proto.envoy.service.discovery.v3 import discovery_pb2 as discovery
from .._proto.spiffe.workload import workload_pb2 as wl
from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True)
class Method(Generic[Req, Resp]):
    """One RPC: its HTTP/2 path, message types and which sides stream.

    Both streaming flags set is a bidirectional stream (``Server.add_bidi``).
    """

    path: str
    request_type: type[Req]
    response_type: type[Resp]
    server_streaming: bool = False
    client_streaming: bool = False


def _unary(path: str, req: type[Req], resp: type[Resp]) -> Method[Req, Resp]:
    return Method(path, req, resp, server_streaming=False)


def _stream(path: str, req: type[Req], resp: type[Resp]) -> Method[Req, Resp]:
    return Method(path, req, resp, server_streaming=True)


def bidi(path: str, req: type[Req], resp: type[Resp]) -> Method[Req, Resp]:
    """A bidirectional streaming method (e.g. Envoy SDS ``StreamSecrets``)."""
    return Method(path, req, resp, server_streaming=True, client_streaming=True)


_I = "/csi.v1.Identity/"
GET_PLUGIN_INFO = _unary(_I + "GetPluginInfo", csi.GetPluginInfoRequest, csi.GetPluginInfoResponse)
GET_PLUGIN_CAPABILITIES = _unary(
    _I + "GetPluginCapabilities",
    csi.GetPluginCapabilitiesRequest,
    csi.GetPluginCapabilitiesResponse,
)
PROBE = _unary(_I + "Probe", csi.ProbeRequest, csi.ProbeResponse)

_N = "/csi.v1.Node/"
NODE_STAGE_VOLUME = _unary(
    _N + "NodeStageVolume", csi.NodeStageVolumeRequest, csi.NodeStageVolumeResponse
)
NODE_UNSTAGE_VOLUME = _unary(
    _N + "NodeUnstageVolume", csi.NodeUnstageVolumeRequest, csi.NodeUnstageVolumeResponse
)
NODE_PUBLISH_VOLUME = _unary(
    _N + "NodePublishVolume", csi.NodePublishVolumeRequest, csi.NodePublishVolumeResponse
)
NODE_UNPUBLISH_VOLUME = _unary(
    _N + "NodeUnpublishVolume", csi.NodeUnpublishVolumeRequest, csi.NodeUnpublishVolumeResponse
)
NODE_GET_VOLUME_STATS = _unary(
    _N + "NodeGetVolumeStats", csi.NodeGetVolumeStatsRequest, csi.NodeGetVolumeStatsResponse
)
NODE_EXPAND_VOLUME = _unary(
    _N + "NodeExpandVolume", csi.NodeExpandVolumeRequest, csi.NodeExpandVolumeResponse
)
NODE_GET_CAPABILITIES = _unary(
    _N + "NodeGetCapabilities", csi.NodeGetCapabilitiesRequest, csi.NodeGetCapabilitiesResponse
)
NODE_GET_INFO = _unary(_N + "NodeGetInfo", csi.NodeGetInfoRequest, csi.NodeGetInfoResponse)

_D = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/"
SUBSCRIBE_TO_X509_SVIDS = _stream(
    _D + "SubscribeToX509SVIDs", di.SubscribeToX509SVIDsRequest, di.SubscribeToX509SVIDsResponse
)
SUBSCRIBE_TO_X509_BUNDLES = _stream(
    _D + "SubscribeToX509Bundles",
    di.SubscribeToX509BundlesRequest,
    di.SubscribeToX509BundlesResponse,
)
FETCH_JWT_SVIDS = _unary(_D + "FetchJWTSVIDs", di.FetchJWTSVIDsRequest, di.FetchJWTSVIDsResponse)
SUBSCRIBE_TO_JWT_BUNDLES = _stream(
    _D + "SubscribeToJWTBundles", di.SubscribeToJWTBundlesRequest, di.SubscribeToJWTBundlesResponse
)

_W = "/SpiffeWorkloadAPI/"
FETCH_X509_SVID = _stream(_W + "FetchX509SVID", wl.X509SVIDRequest, wl.X509SVIDResponse)
FETCH_X509_BUNDLES = _stream(_W + "FetchX509Bundles", wl.X509BundlesRequest, wl.X509BundlesResponse)
FETCH_JWT_SVID = _unary(_W + "FetchJWTSVID", wl.JWTSVIDRequest, wl.JWTSVIDResponse)
FETCH_JWT_BUNDLES = _stream(_W + "FetchJWTBundles", wl.JWTBundlesRequest, wl.JWTBundlesResponse)
VALIDATE_JWT_SVID = _unary(
    _W + "ValidateJWTSVID", wl.ValidateJWTSVIDRequest, wl.ValidateJWTSVIDResponse
)

_S = "/envoy.service.secret.v3.SecretDiscoveryService/"
STREAM_SECRETS = bidi(_S + "StreamSecrets", discovery.DiscoveryRequest, discovery.DiscoveryResponse)
FETCH_SECRETS = _unary(_S + "FetchSecrets", discovery.DiscoveryRequest, discovery.DiscoveryResponse)
DELTA_SECRETS = bidi(
    _S + "DeltaSecrets", discovery.DeltaDiscoveryRequest, discovery.DeltaDiscoveryResponse
)
