"""Envoy's Secret Discovery Service (SDS v3) for one volume's pod, on its socket.

An Envoy (or Istio's proxy) that points its SDS cluster at the volume's socket gets the pod's
identity with no attestation and no shared agent socket: the socket is bound to this pod's
selectors. Names resolve as the SPIRE agent's SDS resolves them (:mod:`trio_spirecsi.sds`):
``default`` (the volume's chosen SVID), ``ROOTCA``, ``ALL``, ``spiffe://<trust domain>``, an
SVID's SPIFFE ID, or every resource for an empty list.

StreamSecrets keeps one stream's versions and nonces (:class:`~trio_spirecsi.sds.SdsStream`):
every change of the volume's identity or of the bundles it may serve is pushed on every open
stream; an ACK gets no answer; a NACK is logged and counted and never answered with a resend;
a request that arrives before the first SVID waits for it. Unlike the Workload API, SDS needs
no ``workload.spiffe.io`` header (as in SPIRE). Once the agent stops issuing an identity for
the pod, streams end PERMISSION_DENIED ("no identity issued"), as the Workload API answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .. import log
from .._proto.envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from .._proto.envoy.service.discovery.v3 import discovery_pb2 as discovery
from ..grpc import RpcError, Server, ServerContext, StatusCode, StreamSender, methods
from ..metrics import Metrics
from ..sds import (
    DELTA_SECRETS_MESSAGE,
    RequestKind,
    SdsError,
    SdsSettings,
    SdsSnapshot,
    SdsStream,
    fetch_response,
    snapshot_of,
)
from ..spire.responses import X509SVID
from .responses import current_svids
from .views import BUNDLE_WAIT, AgentView, VolumeView, changed, identity, sources

logger = logging.getLogger(__name__)

_DETAIL_SHOWN = 500


class SecretDiscovery:
    """The SDS handlers for one volume (see the module docstring)."""

    def __init__(
        self,
        volume: VolumeView,
        agent: AgentView,
        metrics: Metrics | None = None,
        settings: SdsSettings | None = None,
    ) -> None:
        self._volume = volume
        self._agent = agent
        self._metrics = metrics
        self._settings = settings or SdsSettings()

    def register(self, server: Server) -> None:
        server.add_bidi(methods.STREAM_SECRETS, self.stream_secrets)
        server.add_unary(methods.FETCH_SECRETS, self.fetch_secrets)
        server.add_bidi(methods.DELTA_SECRETS, self.delta_secrets)

    # Handlers ------------------------------------------------------------

    async def stream_secrets(
        self,
        requests: AsyncIterator[discovery.DiscoveryRequest],
        context: ServerContext,
        send: StreamSender[discovery.DiscoveryResponse],
    ) -> None:
        stream = SdsStream(self._settings)
        turn = trio.Lock()  # one response produced and sent at a time, in order
        failure: list[RpcError] = []

        async def guarded(run: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
            try:
                await run()
            except SdsError as exc:
                failure.append(RpcError(exc.code, exc.message))
            except RpcError as exc:
                failure.append(exc)
            scope.cancel()

        async def push() -> None:
            watched = sources(self._volume, self._agent.x509_bundles)
            while True:
                seen = [source.value for source in watched]
                now = self._volume.now()
                snapshot = self._snapshot(now)
                if snapshot is not None:
                    async with turn:
                        response = stream.on_update(snapshot)
                        if response is not None:
                            await self._send(send, response)
                await changed(self._volume, watched, seen, now)

        async def answer() -> None:
            async for request in requests:
                async with turn:
                    result = stream.on_request(request)
                    if result.kind is RequestKind.NACK:
                        self._nack(stream, result.error_detail)
                    if result.response is not None:
                        await self._send(send, result.response)

        self._gauge(+1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, push, nursery.cancel_scope)
                await guarded(answer, nursery.cancel_scope)  # the client ended its side: OK
        finally:
            self._gauge(-1)
        if failure:
            raise failure[0]

    async def fetch_secrets(
        self, request: discovery.DiscoveryRequest, context: ServerContext
    ) -> discovery.DiscoveryResponse:
        watched = sources(self._volume, self._agent.x509_bundles)
        with trio.move_on_after(BUNDLE_WAIT):
            while True:
                seen = [source.value for source in watched]
                now = self._volume.now()
                snapshot = self._snapshot(now)
                if snapshot is not None:
                    try:
                        response = fetch_response(request, snapshot, self._settings)
                    except SdsError as exc:
                        raise RpcError(exc.code, exc.message) from None
                    self._count(response)
                    return response
                await changed(self._volume, watched, seen, now)
        raise RpcError(
            StatusCode.UNAVAILABLE, "the pod's identity has not arrived from the SPIRE agent yet"
        )

    async def delta_secrets(
        self,
        requests: AsyncIterator[discovery.DeltaDiscoveryRequest],
        context: ServerContext,
        send: StreamSender[discovery.DeltaDiscoveryResponse],
    ) -> None:
        raise RpcError(StatusCode.UNIMPLEMENTED, DELTA_SECRETS_MESSAGE)

    # What the answers are built from -------------------------------------

    def _snapshot(self, now: float) -> SdsSnapshot | None:
        """The volume's current SDS content; None until its first SVID (and that SVID's
        bundle) has arrived; PERMISSION_DENIED once the agent stopped issuing one."""
        update = identity(self._volume)
        if update is None:
            return None
        preference = self._volume.plan.spec.preference
        svids = preference.chosen_first(current_svids(update, now=now), _hint_and_id)
        return snapshot_of(svids, update.federates_with, self._agent.x509_bundles.value.bundles)

    async def _send(
        self, send: StreamSender[discovery.DiscoveryResponse], response: discovery.DiscoveryResponse
    ) -> None:
        await send(response)
        self._count(response)

    # Reporting ------------------------------------------------------------

    def _count(self, response: discovery.DiscoveryResponse) -> None:
        if self._metrics is None:
            return
        for resource in response.resources:
            secret = secret_pb2.Secret()
            if resource.Unpack(secret):
                kind = secret.WhichOneof("type")
                if kind is not None:
                    self._metrics.sds_resources_sent_total.labels(resource=kind).inc()

    def _nack(self, stream: SdsStream, detail: str) -> None:
        if self._metrics is not None:
            self._metrics.sds_nacks_total.inc()
        plan = self._volume.plan
        log.event(
            logger,
            logging.WARNING,
            "sds_nack",
            volume_id=plan.volume_id,
            pod=plan.pod,
            version=stream.version_info,
            error=detail[:_DETAIL_SHOWN],
        )

    def _gauge(self, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.sds_streams_open.inc(delta)


def _hint_and_id(svid: X509SVID) -> tuple[str, str]:
    return svid.hint, svid.spiffe_id
