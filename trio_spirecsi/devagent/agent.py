"""A SPIRE agent stand-in serving the Delegated Identity API on a unix socket.

It behaves on the wire as a current SPIRE agent does (see the shared wire
facts): every call is authorised first; SVID and bundle streams send the full
current state at once and again after every change that concerns them; X.509
SVIDs are cached per registration entry, so every subscriber matching an entry
shares one SVID and its rotations; one timer task re-issues each cached SVID at
half its lifetime. Subscribers sleep on trio events and are woken only by
changes that concern them: no polling.

Control methods (:meth:`DevAgent.rotate`, :meth:`DevAgent.revoke`, ...) are
plain methods for tests and demos, called from the Trio thread that serves.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509

from .. import log
from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from .._proto.spire.api.types import types_pb2
from ..grpc import (
    RpcError,
    Server,
    ServerContext,
    ServerLimits,
    StatusCode,
    StreamSender,
    methods,
)
from ..spiffe import (
    normalise_trust_domain,
    trust_domain_id,
    workload_id_parts,
)
from .ca import KEY_TYPES, CertificateAuthority, X509Svid
from .entries import (
    DEFAULT_TEMPLATE,
    Entry,
    EntrySource,
    TemplateEntries,
    as_source,
    format_selector,
)

logger = logging.getLogger(__name__)

NOT_AUTHORIZED = "caller not configured as an authorized delegate"
NO_IDENTITY = "no identity issued"
SELECTORS_OR_PID = "must provide either selectors or non-zero pid, but not both"
NO_PID_ATTESTATION = (
    "this agent does not attest processes: send the workload's selectors instead of a pid"
)

_SvidKey = tuple[str, frozenset[tuple[str, str]], int | None]
_BundleGetter = Callable[[], dict[str, bytes]]
_BundleSender = Callable[[dict[str, bytes]], Awaitable[None]]


class _Watcher:
    """One open stream: the agent sets ``event`` when something it shows has changed."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


@dataclass(frozen=True)
class _Cached:
    entry: Entry
    svid: X509Svid
    generation: int
    due: float


class DevAgent:
    """The state of one agent (CAs, entries, cached SVIDs) and its gRPC handlers.

    ``template`` gives every k8s workload an entry (``{td}``, ``{ns}``, ``{sa}``,
    ``{pod_name}``, ``{pod_uid}``, ``{node_name}``) unless ``entries`` is given.
    ``authorized_uids=None`` authorises every caller. With ``data_dir`` each trust
    domain's CA is loaded from (or created in) ``data_dir/<trust domain>``.
    SVIDs are issued on the serving thread: an ``rsa-2048`` key costs tens of
    milliseconds there, an ``ec-p256`` key well under one.
    """

    def __init__(
        self,
        trust_domain: str = "example.org",
        *,
        svid_ttl: int = 3600,
        jwt_ttl: int = 300,
        key_type: str = "ec-p256",
        template: str = DEFAULT_TEMPLATE,
        entries: EntrySource | Sequence[Entry] | None = None,
        federated_trust_domains: Iterable[str] = (),
        federate_template: bool = False,
        authorized_uids: Collection[int] | None = None,
        intermediate: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if svid_ttl <= 0 or jwt_ttl <= 0:
            raise ValueError("svid_ttl and jwt_ttl must be positive")
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
        self.trust_domain = normalise_trust_domain(trust_domain)
        self.svid_ttl = svid_ttl
        self.jwt_ttl = jwt_ttl
        self.key_type = key_type
        self.authorized_uids = None if authorized_uids is None else frozenset(authorized_uids)
        self._intermediate = intermediate
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.ca = self._open_ca(self.trust_domain)
        self._federated: dict[str, CertificateAuthority] = {}
        for name in federated_trust_domains:
            td = normalise_trust_domain(name)
            if td != self.trust_domain:
                self._federated.setdefault(td, self._open_ca(td))
        self._bundle_extra: tuple[bytes, ...] = ()
        self._template: str | None = None
        self._federate_template = federate_template
        self._source: EntrySource
        if entries is None:
            self._template = template
            self._source = self._template_source()
        else:
            self._source = as_source(entries)
        self._revoked: set[str] = set()
        self._garbled: set[str] = set()
        self._cache: dict[_SvidKey, _Cached] = {}
        self._due: list[tuple[float, int, _SvidKey]] = []
        self._generation = 0
        self._timer_wake = trio.Event()
        self._svid_subs: dict[_Watcher, frozenset[tuple[str, str]]] = {}
        self._svid_watchers: dict[_SvidKey, set[_Watcher]] = {}
        self._x509_bundle_subs: set[_Watcher] = set()
        self._jwt_bundle_subs: set[_Watcher] = set()
        self._serving = False
        self.subscribe_count = 0
        """SubscribeToX509SVIDs streams opened since this agent was created."""

    # Observability ---------------------------------------------------------

    @property
    def open_svid_subscriptions(self) -> list[frozenset[tuple[str, str]]]:
        """The selector sets of the SubscribeToX509SVIDs streams open right now."""
        return list(self._svid_subs.values())

    @property
    def open_bundle_subscriptions(self) -> int:
        """SubscribeToX509Bundles streams open right now."""
        return len(self._x509_bundle_subs)

    @property
    def open_jwt_bundle_subscriptions(self) -> int:
        return len(self._jwt_bundle_subs)

    @property
    def current_bundle_der(self) -> bytes:
        """The local trust domain's X.509 bundle (concatenated DER) as streams send it."""
        return self.ca.bundle_der + b"".join(self._bundle_extra)

    @property
    def federated_trust_domains(self) -> tuple[str, ...]:
        return tuple(self._federated)

    def federated_ca(self, trust_domain: str) -> CertificateAuthority:
        return self._federated[normalise_trust_domain(trust_domain)]

    def entries_for(self, selectors: Iterable[tuple[str, str]]) -> list[Entry]:
        """The entries (not revoked) a subscriber with ``selectors`` gets SVIDs for."""
        found = self._source.entries_for(frozenset(selectors))
        return [e for e in found if e.spiffe_id not in self._revoked]

    def expected_spiffe_id(self, selectors: Iterable[tuple[str, str]]) -> str | None:
        """The SPIFFE ID a subscriber with ``selectors`` gets first, or None if none."""
        entries = self.entries_for(selectors)
        return entries[0].spiffe_id if entries else None

    def cached_svids(self, spiffe_id: str) -> list[X509Svid]:
        """The SVIDs currently cached (and streamed) for ``spiffe_id``."""
        return [c.svid for c in self._cache.values() if c.svid.spiffe_id == spiffe_id]

    def x509_bundles(self) -> dict[str, bytes]:
        """What SubscribeToX509Bundles sends: trust domain SPIFFE ID -> DER certificates."""
        bundles = {self.ca.id: self.current_bundle_der}
        bundles.update((ca.id, ca.bundle_der) for ca in self._federated.values())
        return bundles

    def jwt_bundles(self) -> dict[str, bytes]:
        """What SubscribeToJWTBundles sends: trust domain SPIFFE ID -> JWKS JSON."""
        bundles = {self.ca.id: self.ca.jwks()}
        bundles.update((ca.id, ca.jwks()) for ca in self._federated.values())
        return bundles

    # Controls ----------------------------------------------------------------

    def rotate(self, spiffe_id: str | None = None) -> None:
        """Re-issue every cached SVID now (only those of ``spiffe_id`` if given); their
        subscribers get the new ones."""
        self._wake(self._reissue(spiffe_id))

    async def rotate_gradually(self, per_turn: int = 32) -> None:
        """:meth:`rotate` every cached SVID, then wake the subscribers ``per_turn`` at a time
        with a scheduler turn between, as an agent that answers its streams on many cores
        while it keeps serving. :meth:`rotate` wakes them all at once: their answers (1,000
        streams: tens of milliseconds of this agent's loop) then hold up every other call,
        such as a new subscription's first answer."""
        if per_turn < 1:
            raise ValueError(f"per_turn must be 1 or more, not {per_turn}")
        watchers = self._reissue(None)
        for start in range(0, len(watchers), per_turn):
            self._wake(watchers[start : start + per_turn])
            await trio.lowlevel.checkpoint()

    def _reissue(self, spiffe_id: str | None) -> list[_Watcher]:
        """Issue new SVIDs for the cache (those of ``spiffe_id``); every SVID subscriber, to
        be woken (a stream whose SVIDs did not change sends nothing)."""
        cached = [c for c in self._cache.values() if spiffe_id in (None, c.entry.spiffe_id)]
        for item in cached:
            self._store(item.entry)
        self._log_rotation(spiffe_id or "all", len(cached))
        return [w for ws in self._svid_watchers.values() for w in ws]

    def rotate_ca(self, *, keep_old: bool = False) -> None:
        """Replace the local CA: the bundle changes and every cached SVID is re-issued.

        With ``keep_old`` the previous root stays in the bundle (as during a SPIRE
        CA rotation), so SVIDs of either CA verify.
        """
        old = self.ca
        self.ca = CertificateAuthority(self.trust_domain, intermediate=self._intermediate)
        if self._data_dir is not None:
            self.ca.save(self._data_dir / self.trust_domain)
        if keep_old:
            self._bundle_extra = (old.root_der, *self._bundle_extra)
        log.event(logger, logging.INFO, "ca_rotated", trust_domain=self.trust_domain)
        self.rotate()
        self._wake_bundles()

    def add_bundle_ca(self) -> bytes:
        """Append a new, unrelated root to the local bundle (SVIDs unchanged); its DER."""
        extra = CertificateAuthority(self.trust_domain).root_der
        self.set_bundle_extra((*self._bundle_extra, extra))
        return extra

    def set_bundle_extra(self, certificates: Sequence[bytes]) -> None:
        """Set the DER certificates sent after the CA's root in the local bundle."""
        for der in certificates:
            x509.load_der_x509_certificate(der)
        self._bundle_extra = tuple(certificates)
        log.event(logger, logging.INFO, "bundle_changed", extra_roots=len(self._bundle_extra))
        self._wake_bundles()

    def revoke(self, spiffe_id: str) -> None:
        """Withdraw ``spiffe_id``: its entries stop matching and its SVIDs leave the cache."""
        self._revoked.add(spiffe_id)
        for key in [k for k in self._cache if k[0] == spiffe_id]:
            del self._cache[key]
        log.event(logger, logging.INFO, "revoked", spiffe_id=spiffe_id)
        self._wake(self._svid_subs)

    def restore(self, spiffe_id: str) -> None:
        """Undo :meth:`revoke`: subscribers get a freshly issued SVID."""
        self._revoked.discard(spiffe_id)
        log.event(logger, logging.INFO, "restored", spiffe_id=spiffe_id)
        self._wake(self._svid_subs)

    def garble(self, spiffe_id: str) -> None:
        """Send ``spiffe_id``'s SVIDs with a key that is not a key (an agent bug, a corrupted
        cache): the driver must refuse them and keep what it has."""
        self._garbled.add(spiffe_id)
        log.event(logger, logging.INFO, "garbled", spiffe_id=spiffe_id)
        self._wake(self._svid_subs)

    def ungarble(self, spiffe_id: str) -> None:
        """Undo :meth:`garble`: subscribers get the SVID with its real key again."""
        self._garbled.discard(spiffe_id)
        log.event(logger, logging.INFO, "ungarbled", spiffe_id=spiffe_id)
        self._wake(self._svid_subs)

    def add_federation(self, trust_domain: str) -> None:
        """Federate with ``trust_domain`` (a new CA for it); bundle streams include it."""
        td = normalise_trust_domain(trust_domain)
        if td == self.trust_domain or td in self._federated:
            return
        self._federated[td] = self._open_ca(td)
        self._federation_changed(td, "federation_added")

    def remove_federation(self, trust_domain: str) -> None:
        td = normalise_trust_domain(trust_domain)
        if self._federated.pop(td, None) is not None:
            self._federation_changed(td, "federation_removed")

    def set_entries(self, entries: EntrySource | Sequence[Entry]) -> None:
        """Replace the registration entries; every SVID stream is re-evaluated."""
        self._template = None
        self._source = as_source(entries)
        log.event(logger, logging.INFO, "entries_changed")
        self._wake(self._svid_subs)

    def set_template(self, template: str) -> None:
        """Use template entries (see the class docstring) from now on."""
        self._template = template
        self._source = self._template_source()
        log.event(logger, logging.INFO, "entries_changed", template=template)
        self._wake(self._svid_subs)

    # Serving -------------------------------------------------------------------

    async def serve(
        self,
        socket_path: str,
        *,
        mode: int | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the Delegated Identity API at ``socket_path`` until cancelled.

        ``task_status.started()`` is called once the socket accepts connections.
        The agent's state survives: serving again later keeps CAs and cached SVIDs.
        """
        if self._serving:
            raise RuntimeError("this DevAgent is already serving")
        server = Server(ServerLimits.trusted())
        server.add_stream(methods.SUBSCRIBE_TO_X509_SVIDS, self._subscribe_x509_svids)
        server.add_stream(methods.SUBSCRIBE_TO_X509_BUNDLES, self._subscribe_x509_bundles)
        server.add_unary(methods.FETCH_JWT_SVIDS, self._fetch_jwt_svids)
        server.add_stream(methods.SUBSCRIBE_TO_JWT_BUNDLES, self._subscribe_jwt_bundles)
        self._serving = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rotation_loop)
                await nursery.start(functools.partial(server.serve, socket_path, mode=mode))
                log.event(
                    logger,
                    logging.INFO,
                    "serving",
                    socket=socket_path,
                    trust_domain=self.trust_domain,
                )
                task_status.started()
        finally:
            self._serving = False

    async def _subscribe_x509_svids(
        self,
        request: di.SubscribeToX509SVIDsRequest,
        context: ServerContext,
        send: StreamSender[di.SubscribeToX509SVIDsResponse],
    ) -> None:
        self._authorize(context)
        selectors = _request_selectors(request.selectors, request.pid)
        watcher = _Watcher()
        self._svid_subs[watcher] = selectors
        self.subscribe_count += 1
        held: set[_SvidKey] = set()
        described = ",".join(sorted(format_selector(s) for s in selectors))
        log.event(logger, logging.INFO, "svid_subscription_opened", selectors=described)
        try:
            last: object = None
            while True:
                watcher.event = trio.Event()
                entries = self.entries_for(selectors)
                issued = [self._cached_svid(e) for e in entries]
                keys = {c.entry.svid_key for c in issued}
                self._watch(watcher, held, keys)
                held = keys
                federates = self._federates_with(entries)
                fingerprint = (
                    tuple(
                        (e.hint, c.generation, e.spiffe_id in self._garbled)
                        for e, c in zip(entries, issued, strict=True)
                    ),
                    federates,
                )
                if fingerprint != last:
                    svids = [cached.svid for cached in issued]
                    await send(svids_response(entries, svids, federates, self._garbled))
                    last = fingerprint
                await watcher.event.wait()
        finally:
            self._watch(watcher, held, set())
            del self._svid_subs[watcher]
            log.event(logger, logging.INFO, "svid_subscription_closed", selectors=described)

    async def _subscribe_x509_bundles(
        self,
        request: di.SubscribeToX509BundlesRequest,
        context: ServerContext,
        send: StreamSender[di.SubscribeToX509BundlesResponse],
    ) -> None:
        self._authorize(context)
        await self._bundle_stream(
            self._x509_bundle_subs,
            "x509",
            self.x509_bundles,
            lambda b: send(di.SubscribeToX509BundlesResponse(ca_certificates=b)),
        )

    async def _subscribe_jwt_bundles(
        self,
        request: di.SubscribeToJWTBundlesRequest,
        context: ServerContext,
        send: StreamSender[di.SubscribeToJWTBundlesResponse],
    ) -> None:
        self._authorize(context)
        await self._bundle_stream(
            self._jwt_bundle_subs,
            "jwt",
            self.jwt_bundles,
            lambda b: send(di.SubscribeToJWTBundlesResponse(bundles=b)),
        )

    async def _bundle_stream(
        self,
        registry: set[_Watcher],
        kind: str,
        current: _BundleGetter,
        send: _BundleSender,
    ) -> None:
        watcher = _Watcher()
        registry.add(watcher)
        log.event(logger, logging.INFO, "bundle_subscription_opened", kind=kind)
        try:
            last: dict[str, bytes] | None = None
            while True:
                watcher.event = trio.Event()
                bundles = current()
                if bundles != last:
                    await send(bundles)
                    last = bundles
                await watcher.event.wait()
        finally:
            registry.discard(watcher)
            log.event(logger, logging.INFO, "bundle_subscription_closed", kind=kind)

    async def _fetch_jwt_svids(
        self, request: di.FetchJWTSVIDsRequest, context: ServerContext
    ) -> di.FetchJWTSVIDsResponse:
        self._authorize(context)
        if not request.audience:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "audience must be specified")
        selectors = _request_selectors(request.selectors, request.pid)
        entries = self.entries_for(selectors)
        if not entries:
            raise RpcError(StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        response = jwt_svids_response(self.ca, entries, request.audience, self.jwt_ttl)
        log.event(
            logger,
            logging.INFO,
            "jwt_svids_issued",
            spiffe_ids=",".join(e.spiffe_id for e in entries),
            audience=",".join(request.audience),
        )
        return response

    # Internals -------------------------------------------------------------

    def _authorize(self, context: ServerContext) -> None:
        if self.authorized_uids is None:
            return
        peer = context.peer
        if peer is None or peer.uid not in self.authorized_uids:
            log.event(
                logger,
                logging.WARNING,
                "caller_refused",
                uid=peer.uid if peer else "unknown",
                method=context.method.path,
            )
            raise RpcError(StatusCode.PERMISSION_DENIED, NOT_AUTHORIZED)

    def _open_ca(self, trust_domain: str) -> CertificateAuthority:
        if self._data_dir is None:
            return CertificateAuthority(trust_domain, intermediate=self._intermediate)
        folder = self._data_dir / trust_domain
        if (folder / "trust_domain").exists():
            ca = CertificateAuthority.load(folder)
            log.event(logger, logging.INFO, "ca_loaded", trust_domain=trust_domain, dir=str(folder))
            return ca
        ca = CertificateAuthority(trust_domain, intermediate=self._intermediate)
        ca.save(folder)
        log.event(logger, logging.INFO, "ca_created", trust_domain=trust_domain, dir=str(folder))
        return ca

    def _template_source(self) -> TemplateEntries:
        assert self._template is not None
        federates = tuple(self._federated) if self._federate_template else ()
        return TemplateEntries(self.trust_domain, self._template, federates_with=federates)

    def _federation_changed(self, trust_domain: str, event: str) -> None:
        if self._template is not None:
            self._source = self._template_source()
        log.event(logger, logging.INFO, event, trust_domain=trust_domain)
        self._wake(self._svid_subs)
        self._wake_bundles()

    def _federates_with(self, entries: Iterable[Entry]) -> tuple[str, ...]:
        names = {td for e in entries for td in e.federates_with if td in self._federated}
        return tuple(trust_domain_id(td) for td in sorted(names))

    def _cached_svid(self, entry: Entry) -> _Cached:
        cached = self._cache.get(entry.svid_key)
        if cached is None:
            cached = self._store(entry)
            log.event(
                logger,
                logging.INFO,
                "svid_issued",
                spiffe_id=entry.spiffe_id,
                expires_at=cached.svid.expires_at,
            )
        return cached

    def _store(self, entry: Entry) -> _Cached:
        svid = self.ca.issue_x509_svid(entry.spiffe_id, entry.ttl or self.svid_ttl, self.key_type)
        now = time.time()
        self._generation += 1
        cached = _Cached(entry, svid, self._generation, now + max(svid.expires_at - now, 0) / 2)
        self._cache[entry.svid_key] = cached
        if len(self._due) > 2 * len(self._cache) + 64:  # drop superseded due times
            self._due = [(c.due, c.generation, k) for k, c in self._cache.items()]
            heapq.heapify(self._due)
        else:
            heapq.heappush(self._due, (cached.due, cached.generation, entry.svid_key))
        if self._due[0][1] == cached.generation:
            self._timer_wake.set()
        return cached

    def _watch(self, watcher: _Watcher, old: set[_SvidKey], new: set[_SvidKey]) -> None:
        for key in old - new:
            watchers = self._svid_watchers.get(key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._svid_watchers[key]
        for key in new - old:
            self._svid_watchers.setdefault(key, set()).add(watcher)

    async def _rotation_loop(self) -> None:
        """The one timer for every cached SVID: sleeps until the earliest half-life."""
        while True:
            self._timer_wake = trio.Event()
            self._rotate_due(time.time())
            delay = self._due[0][0] - time.time() if self._due else math.inf
            with trio.move_on_after(max(delay, 0.0)):
                await self._timer_wake.wait()

    def _rotate_due(self, now: float) -> None:
        woken: set[_Watcher] = set()
        while self._due and self._due[0][0] <= now:
            _, generation, key = heapq.heappop(self._due)
            cached = self._cache.get(key)
            if cached is None or cached.generation != generation:
                continue
            watchers = self._svid_watchers.get(key)
            if not watchers:
                del self._cache[key]
                continue
            fresh = self._store(cached.entry)
            self._log_rotation(cached.entry.spiffe_id, 1, fresh.svid.expires_at)
            woken.update(watchers)
        self._wake(woken)

    def _log_rotation(self, spiffe_id: str, count: int, expires_at: int | None = None) -> None:
        fields: dict[str, object] = {"spiffe_id": spiffe_id, "count": count}
        if expires_at is not None:
            fields["expires_at"] = expires_at
        log.event(logger, logging.INFO, "svid_rotated", **fields)

    def _wake(self, watchers: Iterable[_Watcher]) -> None:
        for watcher in watchers:
            watcher.event.set()

    def _wake_bundles(self) -> None:
        self._wake(self._x509_bundle_subs)
        self._wake(self._jwt_bundle_subs)


# Wire helpers -----------------------------------------------------------------


def _request_selectors(
    selectors: Iterable[types_pb2.Selector], pid: int
) -> frozenset[tuple[str, str]]:
    found = frozenset((s.type, s.value) for s in selectors)
    if bool(found) == bool(pid):
        raise RpcError(StatusCode.INVALID_ARGUMENT, SELECTORS_OR_PID)
    if pid:
        raise RpcError(StatusCode.INVALID_ARGUMENT, NO_PID_ATTESTATION)
    for kind, value in found:
        if not kind or not value:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"could not parse provided selectors: selector {kind!r}:{value!r} "
                "needs a type and a value",
            )
    return found


GARBLED_KEY = b"\x30\x03\x02\x01\x00"
"""What :meth:`DevAgent.garble` sends as a private key: DER, but not a key."""


def _spiffe_id_proto(spiffe_id: str) -> types_pb2.SPIFFEID:
    trust_domain, path = workload_id_parts(spiffe_id)
    return types_pb2.SPIFFEID(trust_domain=trust_domain, path=path)


def jwt_svids_response(
    ca: CertificateAuthority, entries: Sequence[Entry], audiences: Sequence[str], ttl: int
) -> di.FetchJWTSVIDsResponse:
    """A FetchJWTSVIDs answer: one JWT-SVID per entry, signed by ``ca`` for ``audiences``."""
    response = di.FetchJWTSVIDsResponse()
    for entry in entries:
        token, issued_at, expires_at = ca.sign_jwt(entry.spiffe_id, list(audiences), ttl)
        response.svids.append(
            types_pb2.JWTSVID(
                token=token,
                id=_spiffe_id_proto(entry.spiffe_id),
                expires_at=expires_at,
                issued_at=issued_at,
                hint=entry.hint,
            )
        )
    return response


def svids_response(
    entries: Sequence[Entry],
    svids: Sequence[X509Svid],
    federates_with: Sequence[str],
    garbled: Collection[str] = (),
) -> di.SubscribeToX509SVIDsResponse:
    """A SubscribeToX509SVIDs message: each entry's SVID with its key (a garbled key for
    the SPIFFE IDs in ``garbled``), and the trust domains they federate with."""
    response = di.SubscribeToX509SVIDsResponse(federates_with=list(federates_with))
    for entry, svid in zip(entries, svids, strict=True):
        response.x509_svids.append(
            di.X509SVIDWithKey(
                x509_svid=types_pb2.X509SVID(
                    cert_chain=list(svid.cert_chain),
                    id=_spiffe_id_proto(svid.spiffe_id),
                    expires_at=svid.expires_at,
                    hint=entry.hint,
                ),
                x509_svid_key=GARBLED_KEY if svid.spiffe_id in garbled else svid.key_pkcs8_der,
            )
        )
    return response
