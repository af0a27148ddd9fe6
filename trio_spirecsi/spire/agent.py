"""One connection to the SPIRE agent's admin socket, shared by every volume.

The agent client owns the per-agent bundle subscriptions (X.509 always, JWT
once any volume asks for JWT bundles) and hands each volume a way to open its
own SVID subscription and fetch JWT-SVIDs over the same HTTP/2 connection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_util import AsyncValue

from .. import log
from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from .._proto.spire.api.types import types_pb2
from ..errors import RenderError
from ..grpc import Channel, ResponseStream, RpcError, StatusCode, methods
from ..metrics import Metrics
from ..render import bundles_from_response, jwt_bundles_from_response
from .backoff import Backoff

logger = logging.getLogger(__name__)

Selector = tuple[str, str]


@dataclass(frozen=True)
class BundleSet:
    """The agent's latest full set of bundles; ``version`` grows with every update."""

    version: int = 0
    bundles: Mapping[str, object] = field(default_factory=dict)


def selectors_to_proto(selectors: Sequence[Selector]) -> list[types_pb2.Selector]:
    return [types_pb2.Selector(type=t, value=v) for t, v in selectors]


class AgentClient:
    """The Delegated Identity API over one channel, plus the shared bundle streams.

    ``x509_bundles`` and ``jwt_bundles`` hold the latest :class:`BundleSet`;
    ``connected`` is True while the X.509 bundle stream is open, and
    ``last_error`` explains the most recent failure in operator terms.
    """

    def __init__(self, channel: Channel, socket_path: Path, metrics: Metrics) -> None:
        self._channel = channel
        self.socket_path = socket_path
        self._metrics = metrics
        self.x509_bundles: AsyncValue[BundleSet] = AsyncValue(BundleSet())
        self.jwt_bundles: AsyncValue[BundleSet] = AsyncValue(BundleSet())
        self.connected: AsyncValue[bool] = AsyncValue(False)
        self.last_error = "not connected yet"
        self._nursery: trio.Nursery | None = None
        self._jwt_started = False

    @property
    def connections_opened(self) -> int:
        """HTTP/2 connections dialled to the agent so far (one, unless it restarted)."""
        return self._channel.connections_opened

    # Volume-facing calls -------------------------------------------------

    def subscribe_x509_svids(
        self, selectors: Sequence[Selector]
    ) -> AbstractAsyncContextManager[ResponseStream[di.SubscribeToX509SVIDsResponse]]:
        request = di.SubscribeToX509SVIDsRequest(selectors=selectors_to_proto(selectors))
        return self._channel.stream(methods.SUBSCRIBE_TO_X509_SVIDS, request)

    async def fetch_jwt_svid(
        self, selectors: Sequence[Selector], audiences: Sequence[str], timeout: float = 30.0
    ) -> di.FetchJWTSVIDsResponse:
        request = di.FetchJWTSVIDsRequest(
            audience=list(audiences), selectors=selectors_to_proto(selectors)
        )
        return await self._channel.unary(methods.FETCH_JWT_SVIDS, request, timeout=timeout)

    def want_jwt_bundles(self) -> None:
        """Start the shared JWT bundle stream, once, the first time a volume needs it."""
        if not self._jwt_started and self._nursery is not None:
            self._jwt_started = True
            self._nursery.start_soon(self._jwt_bundle_loop)

    def explain(self, error: RpcError) -> str:
        """An operator-facing sentence for a failed call: what happened and what to fix."""
        if error.code == StatusCode.PERMISSION_DENIED:
            return (
                f"the SPIRE agent at {self.socket_path} refused the driver ({error.message}): "
                "add the driver's SPIFFE ID to authorized_delegates in the agent configuration "
                "and make sure a registration entry gives the driver that ID"
            )
        if error.code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
            return (
                f"the SPIRE agent admin socket {self.socket_path} is unreachable "
                f"({error.message}): check that the agent runs with admin_socket_path set to it "
                "and that its folder is mounted into the driver"
            )
        return f"the SPIRE agent answered {error.code.name}: {error.message}"

    # Shared streams ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the shared bundle streams open until cancelled (reconnecting with backoff)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._x509_bundle_loop)
            task_status.started()

    async def _x509_bundle_loop(self) -> None:
        await self._bundle_loop(
            "x509",
            methods.SUBSCRIBE_TO_X509_BUNDLES,
            di.SubscribeToX509BundlesRequest(),
            self.x509_bundles,
            track_connection=True,
        )

    async def _jwt_bundle_loop(self) -> None:
        await self._bundle_loop(
            "jwt",
            methods.SUBSCRIBE_TO_JWT_BUNDLES,
            di.SubscribeToJWTBundlesRequest(),
            self.jwt_bundles,
            track_connection=False,
        )

    async def _bundle_loop(
        self,
        kind: str,
        method: methods.Method[methods.Req, methods.Resp],
        request: methods.Req,
        target: AsyncValue[BundleSet],
        *,
        track_connection: bool,
    ) -> None:
        backoff = Backoff()
        reconnecting = False
        while True:
            try:
                async with self._channel.stream(method, request) as stream:
                    async for response in stream:
                        try:
                            bundles: Mapping[str, object] = (
                                bundles_from_response(response)  # type: ignore[arg-type]
                                if kind == "x509"
                                else jwt_bundles_from_response(response)  # type: ignore[arg-type]
                            )
                        except RenderError as exc:
                            self._metrics.errors_total.labels(kind="bad_bundle").inc()
                            log.event(
                                logger,
                                logging.ERROR,
                                "bundle_rejected",
                                kind=kind,
                                error=exc.message,
                            )
                            continue
                        backoff.reset()
                        if track_connection and not self.connected.value:
                            self._set_connected(True, reconnecting)
                        target.value = BundleSet(target.value.version + 1, bundles)
                        self._metrics.bundle_updates_total.inc()
                        log.event(
                            logger,
                            logging.INFO,
                            "bundles_updated",
                            kind=kind,
                            trust_domains=",".join(sorted(bundles)),
                        )
                reason = "the agent ended the bundle stream"
            except RpcError as exc:
                reason = self.explain(exc)
                self._metrics.errors_total.labels(kind=f"agent_{exc.code.name.lower()}").inc()
            if track_connection:
                self.last_error = reason
                if self.connected.value:
                    self._set_connected(False, reconnecting)
            reconnecting = True
            delay = backoff.next()
            log.event(
                logger,
                logging.WARNING,
                "agent_stream_failed",
                stream=f"{kind}_bundles",
                error=reason,
                retry_in_s=round(delay, 2),
            )
            await trio.sleep(delay)

    def _set_connected(self, up: bool, reconnecting: bool) -> None:
        self.connected.value = up
        self._metrics.agent_connected.set(1 if up else 0)
        if up:
            self.last_error = ""
            if reconnecting:
                self._metrics.agent_reconnects_total.inc()
            log.event(logger, logging.INFO, "agent_connected", socket=str(self.socket_path))
