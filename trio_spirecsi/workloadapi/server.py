"""The SPIFFE Workload API on a unix socket inside one volume, for that pod only.

The socket lives in the volume's ``data/`` folder, next to the files, so it appears in the
pod's read-only bind mount and nowhere else: whoever can reach it is that pod, and it
answers only with that pod's identity. X.509 answers come from the volume's own
SubscribeToX509SVIDs stream; JWT-SVIDs from FetchJWTSVIDs with the volume's selectors;
bundles from the agent's shared bundle streams, limited to the SVIDs' own trust domains
and the ones they federate with.

The server runs inside the volume's cancel scope: unpublishing the volume ends every stream
and removes the socket, and a driver restart serves it again when the volume resumes.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from trio_util import wait_any

from .. import log
from .._proto.spiffe.workload import workload_pb2 as wl
from ..grpc import (
    RpcError,
    Server,
    ServerContext,
    ServerLimits,
    StatusCode,
    StreamSender,
    methods,
)
from ..ratelimit import RateLimit, TokenBucket
from ..spiffe import spiffe_id_problem
from ..spire.agent import AgentError, Outcome
from ..spire.responses import BundleSet, JwtBundles, JwtSvid, X509Bundles, X509Update
from ..spire.selectors import Selector
from ..storage.writer import SELINUX_XATTR
from ..volumes.plan import VolumePlan
from ..volumes.volume import VolumeState
from ..watched import Observable
from .jwt import JwtSvidError, validate_jwt_svid
from .responses import (
    current_svids,
    jwt_bundles_for,
    jwt_bundles_response,
    x509_bundles_response,
    x509_svid_response,
)

logger = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"
NO_IDENTITY = "no identity issued"
SOCKET_MODE_WITH_GROUP = 0o660
"""root:<fsGroup>, read-write for the pod's group only."""
SOCKET_MODE_WITHOUT_GROUP = 0o666
"""Without an fsGroup the pod's user is unknown; only this pod's mount reaches the socket."""
BUNDLE_WAIT = 10.0
"""How long a unary call waits for bundles the agent has not sent yet (seconds)."""
JWT_FETCH_TIMEOUT = 30.0

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")


class VolumeView(Protocol):
    """What the server reads from its volume."""

    @property
    def plan(self) -> VolumePlan: ...

    @property
    def x509(self) -> Observable[X509Update | None]: ...

    @property
    def state(self) -> Observable[VolumeState]: ...


class AgentView(Protocol):
    """What the server uses of the agent client."""

    @property
    def x509_bundles(self) -> Observable[X509Bundles]: ...

    @property
    def jwt_bundles(self) -> Observable[JwtBundles]: ...

    async def jwt_svids(
        self, selectors: Sequence[Selector], audiences: Sequence[str], *, timeout: float = ...
    ) -> tuple[JwtSvid, ...]: ...

    def want_jwt_bundles(self) -> None: ...


def _check_header(context: ServerContext) -> None:
    if context.metadata.get(HEADER) != "true":
        raise RpcError(StatusCode.INVALID_ARGUMENT, "security header missing from request")


def _check_rate(bucket: TokenBucket, context: ServerContext) -> None:
    """Refuse as the SPIRE agent does when a workload calls too often."""
    if not bucket.take():
        raise RpcError(StatusCode.UNAVAILABLE, f"rate limit exceeded for {context.method.path}")


def _is_not(seen: object, value: object) -> bool:
    return value is not seen


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
            valid = validate_jwt_svid(request.svid, request.audience, bundles, now=time.time())
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
        """The pod's SVID set, None while none has arrived; refused once the agent
        stopped issuing one for the pod (as the agent itself refuses such a workload)."""
        if not self._volume.state.value.entitled:
            raise RpcError(StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        update: X509Update | None = self._volume.x509.value
        return update

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
        sources: tuple[Observable[Any], ...] = (self._volume.x509, bundles, self._volume.state)
        last: _M | None = None
        while True:
            seen = [source.value for source in sources]
            now = time.time()
            response = build(now)
            if response is not None and response != last:
                await send(response)
                last = response
            await self._changed(sources, seen, now)

    async def _wait_for(
        self, build: Callable[[float], _T | None], bundles: Observable[BundleSet[Any]]
    ) -> _T | None:
        """``build``'s answer once there is one, or None after BUNDLE_WAIT."""
        sources: tuple[Observable[Any], ...] = (self._volume.x509, bundles, self._volume.state)
        with trio.move_on_after(BUNDLE_WAIT):
            while True:
                seen = [source.value for source in sources]
                now = time.time()
                result = build(now)
                if result is not None:
                    return result
                await self._changed(sources, seen, now)
        return None

    async def _changed(
        self, sources: Sequence[Observable[Any]], seen: Sequence[object], now: float
    ) -> None:
        """Return when a source no longer holds what was seen, or when an SVID expires."""
        timeout = math.inf
        update = self._volume.x509.value
        if update is not None:
            expiries = [s.expires_at - now for s in update.svids if s.expires_at > now]
            timeout = min([timeout, *expiries])
        with trio.move_on_after(timeout):
            await wait_any(
                *(
                    functools.partial(source.wait_value, functools.partial(_is_not, old))
                    for source, old in zip(sources, seen, strict=True)
                )
            )

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


def socket_mode(gid: int | None) -> int:
    return SOCKET_MODE_WITHOUT_GROUP if gid is None else SOCKET_MODE_WITH_GROUP


async def serve_volume_socket(
    volume: VolumeView,
    serving: Callable[[], None],
    *,
    agent: AgentView,
    jwt_limit: RateLimit = JWT_RATE,
    limits: ServerLimits | None = None,
    on_error: Callable[[str], None] | None = None,
) -> None:
    """Serve the Workload API at ``data_dir/<workload-api-socket>`` until cancelled.

    The pod is an untrusted peer: the server runs with ``limits`` (default: the untrusted
    ``ServerLimits()``), and ``on_error(kind)`` hears of every connection or stream it ended
    (``grpc_*`` kinds).

    ``serving()`` is called once the socket accepts connections. A stale socket file (left
    by a driver that was killed) is replaced. A failure to create the socket (e.g. another
    file has its name) is raised: the volume's supervisor shows it, retries with backoff, and
    keeps serving the files meanwhile. Once this has exited every stream has ended and the
    socket file is gone.
    """
    plan = volume.plan
    server = Server(limits, on_error=on_error)
    WorkloadApi(volume, agent, jwt_limit).register(server)
    agent.want_jwt_bundles()
    await _serve(
        server,
        plan.data_dir,
        plan.spec.workload_api_socket,
        plan.spec.gid,
        plan.selinux_context,
        serving,
    )


async def _serve(
    server: Server,
    folder: Path,
    name: str,
    gid: int | None,
    selinux_context: str | None,
    listening: Callable[[], None],
) -> None:
    folder.mkdir(mode=0o700, exist_ok=True)
    # Bound through a descriptor of the folder: a unix socket path is limited to 107 bytes,
    # and <state dir>/<volume id>/data/<name> may be longer.
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        bind_path = f"/proc/self/fd/{fd}/{name}"
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(server.serve, bind_path, mode=socket_mode(gid)))
            if gid is not None:
                os.chown(bind_path, -1, gid)
            if selinux_context is not None:  # as the files: containers may connect
                os.setxattr(
                    bind_path, SELINUX_XATTR, selinux_context.encode(), follow_symlinks=False
                )
            listening()
    finally:
        os.close(fd)
