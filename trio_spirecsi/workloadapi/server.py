"""The SPIFFE Workload API for one volume's pod, on the socket inside its volume.

The socket lives in the volume's ``data/`` folder, next to the files, so it appears in the
pod's read-only bind mount and nowhere else: whoever can reach it is that pod, and it
answers only with that pod's identity. X.509 answers come from the volume's own
SubscribeToX509SVIDs stream; JWT-SVIDs from FetchJWTSVIDs with the volume's selectors;
bundles from the agent's shared bundle streams, limited to the SVIDs' own trust domains
and the ones they federate with.

The handlers run inside the volume's cancel scope (see :mod:`.socket`): unpublishing the
volume ends every stream, and a driver restart serves it again when the volume resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from .. import log
from .._proto.spiffe.workload import workload_pb2 as wl
from ..grpc import (
    RpcError,
    Server,
    ServerContext,
    StatusCode,
    StreamSender,
    methods,
)
from ..ratelimit import RateLimit, TokenBucket
from ..spiffe import spiffe_id_problem
from ..spire.agent import AgentError, Outcome
from ..spire.responses import BundleSet, X509Update
from ..watched import Observable
from .jwt import JwtSvidError, validate_jwt_svid
from .responses import (
    current_svids,
    jwt_bundles_for,
    jwt_bundles_response,
    x509_bundles_response,
    x509_svid_response,
)
from .views import BUNDLE_WAIT, NO_IDENTITY, AgentView, VolumeView, changed, identity, sources

logger = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"
JWT_FETCH_TIMEOUT = 30.0

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")


def _check_header(context: ServerContext) -> None:
    if context.metadata.get(HEADER) != "true":
        raise RpcError(StatusCode.INVALID_ARGUMENT, "security header missing from request")


def _check_rate(bucket: TokenBucket, context: ServerContext) -> None:
    """Refuse as the SPIRE agent does when a workload calls too often."""
    if not bucket.take():
        raise RpcError(StatusCode.UNAVAILABLE, f"rate limit exceeded for {context.method.path}")


JWT_RATE = RateLimit(10.0, 20)
"""Per pod and per method, how often FetchJWTSVID and ValidateJWTSVID may be called by
default (each FetchJWTSVID is an agent call; each ValidateJWTSVID verifies a signature)."""


class WorkloadApi:
    """The five Workload API handlers for one volume."""

    def __init__(
        self, volume: VolumeView, agent: AgentView, jwt_limit: RateLimit = JWT_RATE
    ) -> None:
        self._volume = volume
        self._agent = agent
        self._fetch_limit = jwt_limit.bucket()
        self._validate_limit = jwt_limit.bucket()

    def register(self, server: Server) -> None:
        server.add_stream(methods.FETCH_X509_SVID, self.fetch_x509_svid)
        server.add_stream(methods.FETCH_X509_BUNDLES, self.fetch_x509_bundles)
        server.add_unary(methods.FETCH_JWT_SVID, self.fetch_jwt_svid)
        server.add_stream(methods.FETCH_JWT_BUNDLES, self.fetch_jwt_bundles)
        server.add_unary(methods.VALIDATE_JWT_SVID, self.validate_jwt_svid)

    # Handlers ------------------------------------------------------------

    async def fetch_x509_svid(
        self,
        request: wl.X509SVIDRequest,
        context: ServerContext,
        send: StreamSender[wl.X509SVIDResponse],
    ) -> None:
        _check_header(context)
        await self._stream(self._x509_svid, self._agent.x509_bundles, send)

    async def fetch_x509_bundles(
        self,
        request: wl.X509BundlesRequest,
        context: ServerContext,
        send: StreamSender[wl.X509BundlesResponse],
    ) -> None:
        _check_header(context)
        await self._stream(self._x509_bundles, self._agent.x509_bundles, send)

    async def fetch_jwt_bundles(
        self,
        request: wl.JWTBundlesRequest,
        context: ServerContext,
        send: StreamSender[wl.JWTBundlesResponse],
    ) -> None:
        _check_header(context)

        def build(now: float) -> wl.JWTBundlesResponse | None:
            bundles = self._jwt_bundles()
            return None if bundles is None else jwt_bundles_response(bundles)

        await self._stream(build, self._agent.jwt_bundles, send)

    async def fetch_jwt_svid(
        self, request: wl.JWTSVIDRequest, context: ServerContext
    ) -> wl.JWTSVIDResponse:
        _check_header(context)
        _check_rate(self._fetch_limit, context)
        if not request.audience:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id:
            problem = spiffe_id_problem(request.spiffe_id)
            if problem is not None:
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT, f"invalid requested SPIFFE ID: {problem}"
                )
        self._identity()
        timeout = JWT_FETCH_TIMEOUT
        if context.deadline is not None:
            timeout = max(min(timeout, context.deadline - trio.current_time()), 0.001)
        try:
            fetched = await self._agent.jwt_svids(
                self._volume.plan.selectors, list(request.audience), timeout=timeout
            )
        except AgentError as exc:
            raise self._for_workload(exc) from None
        svids = [
            wl.JWTSVID(spiffe_id=svid.spiffe_id, svid=svid.token, hint=svid.hint)
            for svid in fetched
            if not request.spiffe_id or svid.spiffe_id == request.spiffe_id
        ]
        if not svids:
            raise RpcError(StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        preference = self._volume.plan.spec.preference
        return wl.JWTSVIDResponse(svids=preference.chosen_first(svids, _hint_and_id))

    async def validate_jwt_svid(
        self, request: wl.ValidateJWTSVIDRequest, context: ServerContext
    ) -> wl.ValidateJWTSVIDResponse:
        _check_header(context)
        _check_rate(self._validate_limit, context)
        if not request.audience:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "svid must be specified")
        bundles = await self._wait_for(self._jwt_bundles, self._agent.jwt_bundles)
        if bundles is None:
            raise RpcError(
                StatusCode.UNAVAILABLE, "the SPIRE agent has not sent the JWT bundles yet"
            )
        try:
            valid = validate_jwt_svid(
                request.svid, request.audience, bundles, now=self._volume.now()
            )
        except JwtSvidError as exc:
            raise RpcError(StatusCode.INVALID_ARGUMENT, exc.message) from None
        claims = struct_pb2.Struct()
        try:
            claims.update(dict(valid.claims))
        except (ValueError, TypeError, OverflowError):
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "the token's claims cannot be represented"
            ) from None
        return wl.ValidateJWTSVIDResponse(spiffe_id=valid.spiffe_id, claims=claims)

    # What the answers are built from -------------------------------------

    def _identity(self) -> X509Update | None:
        return identity(self._volume)

    def _x509_svid(self, now: float) -> wl.X509SVIDResponse | None:
        update = self._identity()
        if update is None:
            return None
        preference = self._volume.plan.spec.preference
        svids = preference.chosen_first(current_svids(update, now=now), _hint_and_id)
        return x509_svid_response(svids, update.federates_with, self._x509_bundle_map())

    def _x509_bundles(self, now: float) -> wl.X509BundlesResponse | None:
        update = self._identity()
        if update is None:
            return None
        return x509_bundles_response(update.svids, update.federates_with, self._x509_bundle_map())

    def _jwt_bundles(self, now: float = 0.0) -> dict[str, bytes] | None:
        update = self._identity()
        if update is None:
            return None
        bundles = self._agent.jwt_bundles.value.bundles
        return jwt_bundles_for(update.svids, update.federates_with, bundles)

    def _x509_bundle_map(self) -> Mapping[str, Sequence[bytes]]:
        return self._agent.x509_bundles.value.bundles

    # Waiting for changes --------------------------------------------------

    async def _stream(
        self,
        build: Callable[[float], _M | None],
        bundles: Observable[BundleSet[Any]],
        send: StreamSender[_M],
    ) -> None:
        """Send a full response now (once there is one) and again on every change."""
        watched = sources(self._volume, bundles)
        last: _M | None = None
        while True:
            seen = [source.value for source in watched]
            now = self._volume.now()
            response = build(now)
            if response is not None and response != last:
                await send(response)
                last = response
            await changed(self._volume, watched, seen, now)

    async def _wait_for(
        self, build: Callable[[float], _T | None], bundles: Observable[BundleSet[Any]]
    ) -> _T | None:
        """``build``'s answer once there is one, or None after BUNDLE_WAIT."""
        watched = sources(self._volume, bundles)
        with trio.move_on_after(BUNDLE_WAIT):
            while True:
                seen = [source.value for source in watched]
                now = self._volume.now()
                result = build(now)
                if result is not None:
                    return result
                await changed(self._volume, watched, seen, now)
        return None

    def _for_workload(self, error: AgentError) -> RpcError:
        """An agent failure as the workload should see it (the operator gets the log)."""
        plan = self._volume.plan
        if error.problem.outcome is Outcome.NO_ENTRY:
            return RpcError(StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        log.event(
            logger,
            logging.WARNING,
            "workload_api_jwt_failed",
            volume_id=plan.volume_id,
            pod=plan.pod,
            reason=error.problem.message,
        )
        return RpcError(
            StatusCode.UNAVAILABLE,
            f"the SPIRE agent did not issue a JWT-SVID ({error.problem.outcome.value}); "
            "try again later",
        )


def _hint_and_id(svid: wl.X509SVID | wl.JWTSVID | Any) -> tuple[str, str]:
    return svid.hint, svid.spiffe_id
