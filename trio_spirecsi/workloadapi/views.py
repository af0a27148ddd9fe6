"""What the per-pod socket's services read: the volume, the agent, and how they wait.

Both services on the socket (the SPIFFE Workload API and Envoy's SDS) answer from the same
two sources: the volume's own SVID subscription and state, and the agent's shared bundle
sets. A streaming answer is rebuilt whenever one of them changes, or when an SVID expires:
no polling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import trio
from trio_util import wait_any

from ..grpc import RpcError, StatusCode
from ..spire.responses import JwtBundles, JwtSvid, X509Bundles, X509Update
from ..spire.selectors import Selector
from ..volumes.plan import VolumePlan
from ..volumes.volume import VolumeState
from ..watched import Observable

NO_IDENTITY = "no identity issued"
BUNDLE_WAIT = 10.0
"""How long a unary call waits for an identity or bundles not sent yet (seconds)."""


class VolumeView(Protocol):
    """What the services read from their volume."""

    @property
    def plan(self) -> VolumePlan: ...

    @property
    def x509(self) -> Observable[X509Update | None]: ...

    @property
    def state(self) -> Observable[VolumeState]: ...

    def now(self) -> float:
        """The wall clock (unix seconds) the volume uses."""
        ...


class AgentView(Protocol):
    """What the services use of the agent client."""

    @property
    def x509_bundles(self) -> Observable[X509Bundles]: ...

    @property
    def jwt_bundles(self) -> Observable[JwtBundles]: ...

    async def jwt_svids(
        self, selectors: Sequence[Selector], audiences: Sequence[str], *, timeout: float = ...
    ) -> tuple[JwtSvid, ...]: ...

    def want_jwt_bundles(self) -> None: ...


def identity(volume: VolumeView) -> X509Update | None:
    """The pod's SVID set, None while none has arrived; PERMISSION_DENIED once the agent
    stopped issuing one for the pod (as the agent itself refuses such a workload)."""
    if not volume.state.value.entitled:
        raise RpcError(StatusCode.PERMISSION_DENIED, NO_IDENTITY)
    return volume.x509.value


def sources(volume: VolumeView, bundles: Observable[Any]) -> tuple[Observable[Any], ...]:
    """What an answer about ``volume`` depends on, besides the clock."""
    return (volume.x509, bundles, volume.state)


async def changed(
    volume: VolumeView, watched: Sequence[Observable[Any]], seen: Sequence[object], now: float
) -> None:
    """Return when a watched value no longer holds what was seen, or when one of the
    volume's SVIDs expires."""
    timeout = math.inf
    update = volume.x509.value
    if update is not None:
        expiries = [s.expires_at - now for s in update.svids if s.expires_at > now]
        timeout = min([timeout, *expiries])
    with trio.move_on_after(timeout):
        await wait_any(
            *(
                functools.partial(source.wait_value, functools.partial(_is_not, old))
                for source, old in zip(watched, seen, strict=True)
            )
        )


def _is_not(seen: object, value: object) -> bool:
    return value is not seen
