"""One connection to the SPIRE agent's admin socket, shared by every volume.

The agent client owns the per-agent bundle subscriptions (X.509 always, JWT once any volume
asks for JWT bundles) and gives each volume its own SVID subscription and JWT-SVID fetches
over the same HTTP/2 connection. Every answer leaves here typed: parsed and validated data
(:mod:`.responses`), or an :class:`AgentProblem` whose :class:`Outcome` is decided in ONE
place, :meth:`AgentClient.problem`, from status codes and the facts of the Delegated Identity
API, never from the wording of the agent's messages:

- PERMISSION_DENIED on FetchJWTSVIDs while the agent accepts the driver (its bundle stream is
  open): no registration entry gives these selectors a JWT-SVID (``NO_ENTRY``). Anywhere
  else: the agent refuses the driver, an operator misconfiguration (``DENIED``).
- A SubscribeToX509SVIDs response with no SVID: no entry matches these selectors (yet).
- UNAVAILABLE, DEADLINE_EXCEEDED, a lost connection, a stream the agent ended: the agent does
  not answer (``UNAVAILABLE``).
- A response that does not parse or validate: ``BAD_DATA``. Any other status: ``FAILED``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .. import log
from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from ..errors import RenderError
from ..grpc import Channel, ResponseStream, RpcError, StatusCode, methods
from ..metrics import Metrics
from ..watched import Watched
from .backoff import AGENT_RECONNECT, REFUSED_RETRY, BackoffPolicy
from .responses import (
    BundleSet,
    JwtBundles,
    JwtSvid,
    X509Bundles,
    X509Update,
    bundles_from_response,
    jwt_bundles_from_response,
    jwt_svids_from_response,
    x509_from_response,
)
from .selectors import Selector, format_selectors, to_proto

logger = logging.getLogger(__name__)

JWT_FETCH_TIMEOUT = 30.0


class Outcome(enum.Enum):
    """Why an agent call gave no usable answer."""

    NO_ENTRY = "no_entry"
    """No registration entry gives these selectors an identity (yet)."""
    DENIED = "denied"
    """The agent refuses the driver: it is not an authorized delegate (or not attested)."""
    UNAVAILABLE = "unavailable"
    """The agent does not answer: socket missing, connection lost, stream ended, timeout."""
    BAD_DATA = "bad_data"
    """The agent answered with something the driver cannot use."""
    FAILED = "failed"
    """Any other error status."""


@dataclass(frozen=True, slots=True)
class AgentProblem:
    """An agent call's failure: its outcome and a sentence for the operator (what happened,
    what to fix). Never contains key material or tokens."""

    outcome: Outcome
    message: str


class AgentError(Exception):
    """Raised by the volume-facing calls; ``problem`` says what went wrong."""

    def __init__(self, problem: AgentProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class Access(enum.Enum):
    CONNECTING = "connecting"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """Whether the agent serves the driver (its X.509 bundle stream is open) and, when
    not, why, in operator terms."""

    access: Access
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.access is Access.ACCEPTED


class AgentClient:
    """The Delegated Identity API over one channel, plus the shared bundle streams.

    ``x509_bundles`` and ``jwt_bundles`` hold the latest :class:`BundleSet`; ``status``
    says whether the agent accepts the driver, refuses it, or does not answer.
    """

    def __init__(
        self,
        channel: Channel,
        socket_path: Path,
        metrics: Metrics,
        *,
        retry: BackoffPolicy = AGENT_RECONNECT,
        refused_retry: BackoffPolicy = REFUSED_RETRY,
    ) -> None:
        self._channel = channel
        self.socket_path = socket_path
        self._metrics = metrics
        self._retry = retry
        self._refused_retry = refused_retry
        self.x509_bundles: Watched[X509Bundles] = Watched(BundleSet())
        self.jwt_bundles: Watched[JwtBundles] = Watched(BundleSet())
        self.status: Watched[AgentStatus] = Watched(
            AgentStatus(Access.CONNECTING, "not connected yet")
        )
        self._nursery: trio.Nursery | None = None
        self._jwt_started = False
        self._retry_now = trio.Event()

    @property
    def connections_opened(self) -> int:
        """HTTP/2 connections dialled to the agent so far (one, unless it restarted)."""
        return self._channel.connections_opened

    # The one place outcomes are decided ------------------------------------

    def problem(self, error: RpcError, method: methods.Method[Any, Any]) -> AgentProblem:
        """What a failed call means, for the operator; also counted in ``errors_total``."""
        self._metrics.errors_total.labels(kind=f"agent_{error.code.name.lower()}").inc()
        code = error.code
        if code == StatusCode.PERMISSION_DENIED:
            if method is methods.FETCH_JWT_SVIDS and self.status.value.ready:
                return AgentProblem(Outcome.NO_ENTRY, "no registration entry issues a JWT-SVID")
            return AgentProblem(
                Outcome.DENIED,
                f"the SPIRE agent at {self.socket_path} refused the driver ({error.message}): "
                "add the driver's SPIFFE ID to authorized_delegates in the agent configuration "
                "and make sure a registration entry gives the driver that ID",
            )
        if code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
            return AgentProblem(
                Outcome.UNAVAILABLE,
                f"the SPIRE agent admin socket {self.socket_path} is unreachable "
                f"({error.message}): check that the agent runs with admin_socket_path set to it "
                "and that its folder is mounted into the driver",
            )
        return AgentProblem(
            Outcome.FAILED, f"the SPIRE agent answered {code.name}: {error.message}"
        )

    def _bad_data(self, what: str, exc: RenderError) -> AgentProblem:
        self._metrics.errors_total.labels(kind="agent_bad_data").inc()
        return AgentProblem(
            Outcome.BAD_DATA, f"the SPIRE agent sent {what} the driver cannot use: {exc.message}"
        )

    def _answered(self) -> None:
        """A call succeeded: the agent serves the driver, so retry the bundle stream now."""
        if not self.status.value.ready:
            self._retry_now.set()

    # Volume-facing calls -------------------------------------------------

    @asynccontextmanager
    async def x509_svids(self, selectors: Sequence[Selector]) -> AsyncIterator[SvidUpdates]:
        """The pod's SVID updates while the block runs; leaving it cancels the stream.

        Iterating yields an :class:`X509Update` with at least one SVID, or an
        :class:`AgentProblem` (``NO_ENTRY`` for an answer without SVID, ``BAD_DATA``) that
        does not end the stream; it raises AgentError when the stream ends.
        """
        request = di.SubscribeToX509SVIDsRequest(selectors=to_proto(selectors))
        try:
            async with self._channel.stream(methods.SUBSCRIBE_TO_X509_SVIDS, request) as stream:
                yield SvidUpdates(self, stream, selectors)
        except RpcError as exc:
            raise AgentError(self.problem(exc, methods.SUBSCRIBE_TO_X509_SVIDS)) from None

    async def jwt_svids(
        self,
        selectors: Sequence[Selector],
        audiences: Sequence[str],
        *,
        timeout: float = JWT_FETCH_TIMEOUT,
    ) -> tuple[JwtSvid, ...]:
        """The JWT-SVIDs the agent issues for the selectors and audiences (at least one);
        AgentError otherwise."""
        request = di.FetchJWTSVIDsRequest(audience=list(audiences), selectors=to_proto(selectors))
        # PERMISSION_DENIED means "no entry" only once the agent is known to accept the
        # driver: wait (briefly) for the bundle stream's first verdict at start-up.
        with trio.move_on_after(timeout):
            await self.status.wait_value(lambda s: s.access is not Access.CONNECTING)
        try:
            response = await self._channel.unary(methods.FETCH_JWT_SVIDS, request, timeout=timeout)
        except RpcError as exc:
            problem = self.problem(exc, methods.FETCH_JWT_SVIDS)
            if problem.outcome is Outcome.NO_ENTRY:
                problem = _no_entry(selectors, "a JWT-SVID")
            raise AgentError(problem) from None
        self._answered()
        try:
            svids = jwt_svids_from_response(response)
        except RenderError as exc:
            raise AgentError(self._bad_data("a JWT-SVID", exc)) from None
        if not svids:
            raise AgentError(_no_entry(selectors, "a JWT-SVID"))
        return svids

    def want_jwt_bundles(self) -> None:
        """Start the shared JWT bundle stream, once, the first time a volume needs it."""
        if not self._jwt_started and self._nursery is not None:
            self._jwt_started = True
            self._nursery.start_soon(self._jwt_bundle_loop)

    # Shared streams ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the shared bundle streams open until cancelled (reconnecting with backoff)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._x509_bundle_loop)
            task_status.started()

    async def _x509_bundle_loop(self) -> None:
        await self._bundle_loop("x509", methods.SUBSCRIBE_TO_X509_BUNDLES)

    async def _jwt_bundle_loop(self) -> None:
        await self._bundle_loop("jwt", methods.SUBSCRIBE_TO_JWT_BUNDLES)

    async def _bundle_loop(
        self,
        kind: str,
        method: methods.Method[Any, Any],
    ) -> None:
        """One shared bundle stream, for ever. The X.509 one also decides ``status``."""
        tracks_status = kind == "x509"
        backoff = self._retry.new()
        refused = self._refused_retry.new()
        reconnecting = False
        while True:
            problem = AgentProblem(Outcome.UNAVAILABLE, "the agent ended the bundle stream")
            try:
                async with self._channel.stream(method, method.request_type()) as stream:
                    async for response in stream:
                        self._answered()
                        if not self._on_bundles(kind, response):
                            continue
                        backoff.reset()
                        refused.reset()
                        if tracks_status and not self.status.value.ready:
                            self._set_status(AgentStatus(Access.ACCEPTED), reconnecting)
            except RpcError as exc:
                problem = self.problem(exc, method)
            denied = problem.outcome is Outcome.DENIED
            if tracks_status:
                access = Access.REFUSED if denied else Access.UNREACHABLE
                self._set_status(AgentStatus(access, problem.message), reconnecting)
            reconnecting = True
            delay = (refused if denied else backoff).next()
            log.event(
                logger,
                logging.WARNING,
                "agent_stream_failed",
                stream=f"{kind}_bundles",
                error=problem.message,
                retry_in_s=round(delay, 2),
            )
            self._retry_now = trio.Event()
            with trio.move_on_after(delay):
                await self._retry_now.wait()

    def _on_bundles(
        self,
        kind: str,
        response: di.SubscribeToX509BundlesResponse | di.SubscribeToJWTBundlesResponse,
    ) -> bool:
        """Publish a new bundle set; False (logged, counted) when the response is unusable."""
        try:
            if isinstance(response, di.SubscribeToX509BundlesResponse):
                x509 = bundles_from_response(response)
                self.x509_bundles.value = BundleSet(self.x509_bundles.value.version + 1, x509)
                domains = sorted(x509)
            else:
                jwt = jwt_bundles_from_response(response)
                self.jwt_bundles.value = BundleSet(self.jwt_bundles.value.version + 1, jwt)
                domains = sorted(jwt)
        except RenderError as exc:
            problem = self._bad_data(f"a {kind} bundle", exc)
            log.event(logger, logging.ERROR, "bundle_rejected", kind=kind, error=problem.message)
            return False
        self._metrics.bundle_updates_total.inc()
        log.event(
            logger, logging.INFO, "bundles_updated", kind=kind, trust_domains=",".join(domains)
        )
        return True

    def _set_status(self, status: AgentStatus, reconnecting: bool) -> None:
        was_ready = self.status.value.ready
        self.status.value = status
        self._metrics.agent_connected.set(1 if status.ready else 0)
        if status.ready and not was_ready:
            if reconnecting:
                self._metrics.agent_reconnects_total.inc()
            log.event(logger, logging.INFO, "agent_connected", socket=str(self.socket_path))


class SvidUpdates:
    """The updates of one SubscribeToX509SVIDs stream, typed (see
    :meth:`AgentClient.x509_svids`)."""

    __slots__ = ("_agent", "_selectors", "_stream")

    def __init__(
        self,
        agent: AgentClient,
        stream: ResponseStream[di.SubscribeToX509SVIDsResponse],
        selectors: Sequence[Selector],
    ) -> None:
        self._agent = agent
        self._stream = stream
        self._selectors = selectors

    def __aiter__(self) -> SvidUpdates:
        return self

    async def __anext__(self) -> X509Update | AgentProblem:
        try:
            response = await self._stream.__anext__()
        except StopAsyncIteration:
            raise AgentError(
                AgentProblem(Outcome.UNAVAILABLE, "the SPIRE agent ended the SVID stream")
            ) from None
        except RpcError as exc:
            raise AgentError(self._agent.problem(exc, methods.SUBSCRIBE_TO_X509_SVIDS)) from None
        agent = self._agent
        agent._answered()
        try:
            update = x509_from_response(response)
        except RenderError as exc:
            return agent._bad_data("an SVID", exc)
        if not update.svids:
            return _no_entry(self._selectors, "an SVID")
        return update


def _no_entry(selectors: Sequence[Selector], what: str) -> AgentProblem:
    matched = "matched" if what == "an SVID" else f"gives {what} to"
    return AgentProblem(
        Outcome.NO_ENTRY,
        f"no registration entry {matched} the selectors {format_selectors(selectors)}: "
        "create a SPIRE registration entry (or ClusterSPIFFEID) whose selectors are a subset "
        "of these, parented to this node's agent",
    )
