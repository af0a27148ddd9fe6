"""One StreamSecrets stream's state, as a pure state machine (no I/O, no clock).

The handler feeds it every request Envoy sends (:meth:`SdsStream.on_request`) and every new
snapshot of the volume (:meth:`SdsStream.on_update`), and sends whatever response comes back.
It follows the SPIRE agent's SDS handler step by step:

- **Versions.** ``version_info`` is a counter, ``"0"`` until the first snapshot, one more for
  every snapshot that differs from the previous one (the volume's identity or bundles
  changed). A response caused by a new list of names reuses the current version.
- **Nonces.** Every response carries a fresh nonce (8 lowercase hex digits from a random
  source by default), different from the stream's recent nonces.
- **Requests.** Once a response has been sent, a request whose ``response_nonce`` is not the
  last one sent is stale and ignored entirely. One that answers the last response is an ACK
  when its ``version_info`` is the current version and it carries no ``error_detail``, a NACK
  otherwise. Either way it is answered only when its names differ from the previous
  request's (the first request always counts as different): an ACK gets nothing back, and a
  NACK is reported for the log and the metrics but never answered by a resend; the next
  push comes with the next snapshot, so a client that keeps rejecting cannot make the server
  spin.
- **Node.** Envoy with ``set_node_on_first_message_only`` sends ``node`` once; the last node
  seen is kept for the stream and used for every later response.
- **Parking.** A request that arrives before the first snapshot is answered when the
  snapshot arrives.
- **Pushes.** Every new snapshot is pushed at once for the last request's names, on every
  stream that has received a request.

A :class:`~trio_spirecsi.sds.resources.SdsError` raised by either method means the stream must
end with that status; the object refuses further use after it.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.service.discovery.v3 import discovery_pb2
from .resources import SdsError, SdsSettings, SdsSnapshot, build_response

DELTA_SECRETS_MESSAGE = "Method is not implemented"
"""The message of the UNIMPLEMENTED status DeltaSecrets answers with, as the SPIRE agent's."""
NonceSource = Callable[[], str]
NONCE_WINDOW = 64
"""How many of a stream's latest nonces a new one must differ from."""
_NONCE_DRAWS = 100


def random_nonce() -> str:
    """4 random bytes as 8 lowercase hex digits, as the SPIRE agent makes them."""
    return secrets.token_hex(4)


class RequestKind(enum.Enum):
    """How a request relates to the last response sent on its stream."""

    INITIAL = "initial"
    """No response has been sent on this stream yet: there is nothing to acknowledge."""
    ACK = "ack"
    """It answers the last response and accepts it."""
    NACK = "nack"
    """It answers the last response and rejects it (``error_detail`` says why)."""
    STALE = "stale"
    """Its nonce is not the last one sent: ignored entirely."""


@dataclass(frozen=True)
class RequestResult:
    """What :meth:`SdsStream.on_request` decided.

    ``response`` is what to send now (None: send nothing). ``parked`` is True when the
    request would be answered but no snapshot has arrived yet (it will be, by
    :meth:`SdsStream.on_update`). ``error_detail`` is the message Envoy attached (a NACK's
    reason), empty when none; Envoy's own text, fit for a log line.
    """

    kind: RequestKind
    response: discovery_pb2.DiscoveryResponse | None = None
    parked: bool = False
    error_detail: str = ""


class SdsStream:
    """The state of one StreamSecrets stream; see the module docstring for the rules.

    ``nonce_source`` makes nonces (tests pass a deterministic one); a nonce it returns that
    is empty or among the stream's last ``nonce_window`` is drawn again.
    """

    def __init__(
        self,
        settings: SdsSettings | None = None,
        *,
        nonce_source: NonceSource = random_nonce,
        nonce_window: int = NONCE_WINDOW,
    ) -> None:
        if nonce_window < 1:
            raise ValueError(f"nonce_window must be at least 1, got {nonce_window}")
        self._settings = settings if settings is not None else SdsSettings()
        self._nonce_source = nonce_source
        self._recent_nonces: deque[str] = deque(maxlen=nonce_window)
        self._counter = 0
        self._last_nonce = ""
        self._node: base_pb2.Node | None = None
        self._request: discovery_pb2.DiscoveryRequest | None = None
        self._snapshot: SdsSnapshot | None = None
        self._failed: SdsError | None = None

    # What the handler may want to log -----------------------------------------------------

    @property
    def version_info(self) -> str:
        """The current version: the number of distinct snapshots seen, in decimal."""
        return str(self._counter)

    @property
    def last_nonce(self) -> str:
        """The nonce of the last response sent ("" before the first)."""
        return self._last_nonce

    @property
    def resource_names(self) -> tuple[str, ...]:
        """The names of the last request taken into account (stale ones are not)."""
        return tuple(self._request.resource_names) if self._request is not None else ()

    @property
    def node(self) -> base_pb2.Node | None:
        """The node the stream's responses are built for (the last one Envoy sent)."""
        return self._node

    @property
    def parked(self) -> bool:
        """True while a request waits for the first snapshot."""
        return self._request is not None and self._snapshot is None

    # Events -------------------------------------------------------------------------------

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> RequestResult:
        """Take one request from Envoy; raises :class:`SdsError` when its names cannot be
        served (the stream must end with that status)."""
        self._check_usable()
        detail = request.error_detail.message if request.HasField("error_detail") else ""
        if not self._last_nonce:
            kind = RequestKind.INITIAL
        elif request.response_nonce != self._last_nonce:
            return RequestResult(RequestKind.STALE, error_detail=detail)
        elif (
            request.version_info != self.version_info
            or not request.version_info
            or request.HasField("error_detail")
        ):
            kind = RequestKind.NACK
        else:
            kind = RequestKind.ACK

        if request.HasField("node"):
            self._node = base_pb2.Node()
            self._node.CopyFrom(request.node)
        changed = self._request is None or _names_changed(
            self._request.resource_names, request.resource_names
        )
        self._request = discovery_pb2.DiscoveryRequest()
        self._request.CopyFrom(request)
        if self._node is not None and not request.HasField("node"):
            self._request.node.CopyFrom(self._node)
        if not changed:
            return RequestResult(kind, error_detail=detail)
        if self._snapshot is None:
            return RequestResult(kind, parked=True, error_detail=detail)
        return RequestResult(kind, self._respond(), error_detail=detail)

    def on_update(self, snapshot: SdsSnapshot) -> discovery_pb2.DiscoveryResponse | None:
        """Take the volume's current snapshot; returns the push for the last request's names,
        or None when nothing changed or nothing has been requested yet. Raises
        :class:`SdsError` when those names can no longer be served."""
        self._check_usable()
        if snapshot == self._snapshot:
            return None
        self._snapshot = snapshot
        self._counter += 1
        if self._request is None:
            return None
        return self._respond()

    # Internals ----------------------------------------------------------------------------

    def _respond(self) -> discovery_pb2.DiscoveryResponse:
        assert self._request is not None and self._snapshot is not None
        nonce = self._fresh_nonce()
        try:
            response = build_response(
                self._request,
                self._snapshot,
                version_info=self.version_info,
                nonce=nonce,
                settings=self._settings,
            )
        except SdsError as exc:
            self._failed = exc
            raise
        self._recent_nonces.append(nonce)
        self._last_nonce = nonce
        return response

    def _fresh_nonce(self) -> str:
        for _ in range(_NONCE_DRAWS):
            nonce = self._nonce_source()
            if nonce and nonce not in self._recent_nonces:
                return nonce
        raise RuntimeError(
            f"the nonce source returned {_NONCE_DRAWS} empty or recently used nonces in a row"
        )

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"this SDS stream has failed ({self._failed}); end the stream")


def _names_changed(old: Sequence[str], new: Sequence[str]) -> bool:
    """SPIRE's ``subListChanged``: a different count, or a name that was not asked before."""
    if len(old) != len(new):
        return True
    before = set(old)
    return any(name not in before for name in new)


__all__ = [
    "DELTA_SECRETS_MESSAGE",
    "NONCE_WINDOW",
    "NonceSource",
    "RequestKind",
    "RequestResult",
    "SdsStream",
    "random_nonce",
]
