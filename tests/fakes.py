"""In-memory stand-ins for the SPIRE agent client and the mounter, for fast, root-free tests.

:class:`FakeAgent` implements the ``Agent`` protocol of :mod:`trio_spirecsi.volumes.volume`
(what volumes and the registry use of :class:`~trio_spirecsi.spire.agent.AgentClient`) with
no socket: registration entries matched by selector subset as SPIRE does, REAL certificates
and ES256 tokens from the dev agent's :class:`~trio_spirecsi.devagent.ca.CertificateAuthority`,
dated by a clock that tests drive (``now = lambda: epoch + trio.current_time()`` under
``trio.testing.MockClock``). Everything it hands out goes through the same parsing and
validation as the agent's wire responses (:mod:`trio_spirecsi.spire.responses`).

It behaves as the real client presents the agent to volumes:

- an SVID stream sends the pod's SVIDs at once and again after every change that concerns
  them (rotation, revocation, federation); an update without SVIDs is a ``NO_ENTRY``
  :class:`AgentProblem` that does not end the stream;
- SVIDs are cached per registration entry (every pod of an entry shares one) and re-issued
  at half their lifetime while the agent is up and renewing;
- going down ends every open stream with ``AgentError(UNAVAILABLE)`` and refuses new calls
  the same way until it is up again; refusing the driver does the same with ``DENIED``;
- ``x509_bundles`` and ``jwt_bundles`` hold the last bundle sets received (kept while the
  agent is down, sent again when it comes back), the JWT ones only once a volume asked;
- counters: calls per selector set, open SVID streams, and a ``hot_loop`` event set when
  one selector set is asked more than :data:`HOT_LOOP_CALLS` times within one (virtual)
  second: a retry loop without backoff.

:class:`MemoryMounter` implements the storage ``Mounter`` protocol in memory (target ->
the sources mounted there); the files themselves are real, in the volume's data folder.
"""

from __future__ import annotations

import errno
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi.devagent.agent import jwt_svids_response, svids_response
from trio_spirecsi.devagent.ca import CertificateAuthority, X509Svid
from trio_spirecsi.devagent.entries import DEFAULT_TEMPLATE, Entry, StaticEntries, TemplateEntries
from trio_spirecsi.spiffe import normalise_trust_domain, trust_domain_id
from trio_spirecsi.spire.agent import (
    Access,
    AgentError,
    AgentProblem,
    AgentStatus,
    Outcome,
    _no_entry,
)
from trio_spirecsi.spire.responses import (
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
from trio_spirecsi.spire.selectors import Selector
from trio_spirecsi.storage.errors import MountError
from trio_spirecsi.storage.mount import UnmountResult
from trio_spirecsi.storage.paths import TargetDir
from trio_spirecsi.watched import Watched

Clock = Callable[[], float]
SelectorSet = frozenset[tuple[str, str]]

ADMIN_SOCKET = "/run/spire/admin/admin.sock"
"""The socket the fake agent's messages name, as the real client's do."""
HOT_LOOP_CALLS = 50
"""More calls than this for one selector set within one second is a retry loop that does
not back off (a volume retries at most a few times a second, then less and less)."""


def unavailable(socket: str = ADMIN_SOCKET) -> AgentProblem:
    return AgentProblem(
        Outcome.UNAVAILABLE,
        f"the SPIRE agent admin socket {socket} is unreachable (connection refused): check "
        "that the agent runs with admin_socket_path set to it and that its folder is mounted "
        "into the driver",
    )


def broken() -> AgentProblem:
    return AgentProblem(Outcome.FAILED, "the SPIRE agent answered INTERNAL: stream failed")


def denied(socket: str = ADMIN_SOCKET) -> AgentProblem:
    return AgentProblem(
        Outcome.DENIED,
        f"the SPIRE agent at {socket} refused the driver (caller not configured as an "
        "authorized delegate): add the driver's SPIFFE ID to authorized_delegates in the agent "
        "configuration and make sure a registration entry gives the driver that ID",
    )


@dataclass(frozen=True)
class Issued:
    """One cached X.509-SVID of an entry and when the agent renews it."""

    entry: Entry
    svid: X509Svid
    generation: int
    renew_at: float


class _Subscriber:
    __slots__ = ("ended", "selectors", "wake")

    def __init__(self, selectors: tuple[Selector, ...]) -> None:
        self.selectors = selectors
        self.wake = trio.Event()
        self.ended: AgentProblem | None = None


class _Updates:
    """One open SVID stream, as :class:`~trio_spirecsi.spire.agent.SvidUpdates` yields it."""

    def __init__(self, agent: FakeAgent, subscriber: _Subscriber) -> None:
        self._agent = agent
        self._sub = subscriber
        self._last: object = None

    def __aiter__(self) -> _Updates:
        return self

    async def __anext__(self) -> X509Update | AgentProblem:
        sub = self._sub
        while True:
            if sub.ended is not None:
                raise AgentError(sub.ended)
            sub.wake = trio.Event()
            fingerprint = self._agent.fingerprint(sub.selectors)
            if fingerprint != self._last:
                self._last = fingerprint
                await trio.lowlevel.checkpoint()
                if sub.ended is not None:
                    raise AgentError(sub.ended)
                return self._agent.update_for(sub.selectors)
            await sub.wake.wait()


class FakeAgent:
    """A SPIRE agent as the driver's agent client presents it; see the module docstring.

    ``entries`` (matched by selector subset) or, without them, one entry per namespace and
    service account from ``template`` (as the dev agent). ``federated`` trust domains get
    their own CA; their bundles are always sent, and an SVID update lists those its
    entries federate with. Call :meth:`run` in a nursery (it sends the first bundles and
    renews SVIDs at half-life).
    """

    def __init__(
        self,
        trust_domain: str = "example.org",
        *,
        now: Clock,
        svid_ttl: int = 3600,
        jwt_ttl: int = 300,
        entries: Sequence[Entry] | None = None,
        template: str = DEFAULT_TEMPLATE,
        federated: Iterable[str] = (),
    ) -> None:
        self.trust_domain = normalise_trust_domain(trust_domain)
        self._now = now
        self.svid_ttl = svid_ttl
        self.jwt_ttl = jwt_ttl
        self.ca = CertificateAuthority(self.trust_domain, now=now)
        self._federated = {
            td: CertificateAuthority(td, now=now)
            for td in map(normalise_trust_domain, federated)
            if td != self.trust_domain
        }
        self._bundle_extra: tuple[bytes, ...] = ()
        self._source: StaticEntries | TemplateEntries = (
            StaticEntries(tuple(entries))
            if entries is not None
            else TemplateEntries(self.trust_domain, template)
        )
        self._revoked: set[str] = set()
        self._cache: dict[tuple[str, SelectorSet, int | None], Issued] = {}
        self._generation = 0
        self._subscribers: set[_Subscriber] = set()
        self._timer = trio.Event()
        self._jwt_wanted = False
        self.up = True
        self.refusing = False
        self.streams_broken = False
        self.renewing = True
        """False: the agent keeps its SVIDs but does not renew them (cut off from its
        server); a forced :meth:`rotate` still re-issues."""
        self.x509_bundles: Watched[X509Bundles] = Watched(BundleSet())
        self.jwt_bundles: Watched[JwtBundles] = Watched(BundleSet())
        self.status: Watched[AgentStatus] = Watched(
            AgentStatus(Access.CONNECTING, "not connected yet")
        )
        self.calls: Watched[int] = Watched(0)
        """Every x509_svids and jwt_svids call so far (a Watched, so tests can wait on it)."""
        self._recent: dict[SelectorSet, deque[float]] = {}
        self.hot_loop = trio.Event()
        self.hot_loop_detail = ""

    # What tests look at -------------------------------------------------------------

    @property
    def open_svid_streams(self) -> list[SelectorSet]:
        """The selector sets of the SVID streams open right now (one per running volume)."""
        return [frozenset(s.selectors) for s in self._subscribers]

    @property
    def serving(self) -> bool:
        """The agent answers the driver's SVID streams."""
        return self.up and not self.refusing and not self.streams_broken

    def entries_for(self, selectors: Iterable[tuple[str, str]]) -> list[Entry]:
        """The entries (not revoked) whose selectors are a subset of ``selectors``."""
        found = self._source.entries_for(frozenset(selectors))
        return [e for e in found if e.spiffe_id not in self._revoked]

    def current(self, entry: Entry) -> X509Svid | None:
        """The SVID the agent holds for ``entry`` now (None before anyone asked)."""
        issued = self._cache.get(entry.svid_key)
        return issued.svid if issued is not None else None

    def bundle_der(self, trust_domain: str | None = None) -> tuple[bytes, ...]:
        """The CA certificates the agent sends for ``trust_domain`` (default: its own)."""
        td = trust_domain or self.trust_domain
        if td == self.trust_domain:
            return (self.ca.bundle_der, *self._bundle_extra)
        return (self._federated[td].bundle_der,)

    def federated_ca(self, trust_domain: str) -> CertificateAuthority:
        return self._federated[trust_domain]

    # The Agent protocol ---------------------------------------------------------------

    @asynccontextmanager
    async def x509_svids(
        self, selectors: Sequence[Selector]
    ) -> AsyncIterator[AsyncIterator[X509Update | AgentProblem]]:
        self._count(selectors)
        await trio.lowlevel.checkpoint()
        refusal = self._refusal() or (broken() if self.streams_broken else None)
        if refusal is not None:
            raise AgentError(refusal)
        subscriber = _Subscriber(tuple(selectors))
        self._subscribers.add(subscriber)
        try:
            yield _Updates(self, subscriber)
        finally:
            self._subscribers.discard(subscriber)

    async def jwt_svids(
        self, selectors: Sequence[Selector], audiences: Sequence[str], *, timeout: float = 30.0
    ) -> tuple[JwtSvid, ...]:
        self._count(selectors)
        await trio.lowlevel.checkpoint()
        refusal = self._refusal()
        if refusal is not None:
            raise AgentError(refusal)
        entries = self.entries_for(selectors)
        if not entries:
            raise AgentError(_no_entry(selectors, "a JWT-SVID"))
        return jwt_svids_from_response(
            jwt_svids_response(self.ca, entries, audiences, self.jwt_ttl)
        )

    def want_jwt_bundles(self) -> None:
        if not self._jwt_wanted:
            self._jwt_wanted = True
            if self.serving:
                self._send_bundles()

    # Running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (status, first bundles), then renew SVIDs at half-life until cancelled."""
        self._connected()
        task_status.started()
        while True:
            self._timer = trio.Event()
            if self.up and self.renewing:
                self._renew_due()
                due = min((i.renew_at for i in self._cache.values()), default=math.inf)
            else:
                due = math.inf
            with trio.move_on_after(max(due - self._now(), 0.0)):
                await self._timer.wait()

    # Controls -------------------------------------------------------------------------

    def rotate(self) -> None:
        """Re-issue every cached SVID now; streams send the new ones."""
        for issued in list(self._cache.values()):
            self._issue(issued.entry)
        self._wake_all()

    def rotate_ca(self, *, keep_old: bool = False) -> None:
        """A new CA for the trust domain: new bundle, every SVID re-issued (with
        ``keep_old`` the old root stays in the bundle, as during a SPIRE CA rotation)."""
        old = self.ca
        self.ca = CertificateAuthority(self.trust_domain, now=self._now)
        if keep_old:
            self._bundle_extra = (old.root_der, *self._bundle_extra)
        self.rotate()
        if self.serving:
            self._send_bundles()

    def set_bundle_extra_root(self) -> None:
        """Add a new, unrelated root to the own trust domain's bundle (SVIDs unchanged)."""
        extra = CertificateAuthority(self.trust_domain, now=self._now).root_der
        self._bundle_extra = (*self._bundle_extra, extra)
        if self.serving:
            self._send_bundles()

    def revoke(self, spiffe_id: str) -> None:
        """Withdraw ``spiffe_id``: its entries stop matching (streams send what is left)."""
        self._revoked.add(spiffe_id)
        for key in [k for k in self._cache if k[0] == spiffe_id]:
            del self._cache[key]
        self._wake_all()

    def restore(self, spiffe_id: str) -> None:
        self._revoked.discard(spiffe_id)
        self._wake_all()

    def go_down(self) -> None:
        """The admin socket stops answering: every open stream fails UNAVAILABLE."""
        self.up = False
        self._end_streams(unavailable())
        self.status.value = AgentStatus(Access.UNREACHABLE, unavailable().message)

    def come_up(self) -> None:
        """The agent answers again (same CA, same cache); bundles are sent again."""
        self.up = True
        self._connected()
        self._timer.set()

    def break_streams(self) -> None:
        """SVID streams fail (INTERNAL) while the agent otherwise serves the driver: a
        failure of the volumes alone, which they must retry on their own backoff."""
        self.streams_broken = True
        self._end_streams(broken())

    def mend_streams(self) -> None:
        self.streams_broken = False

    def refuse(self) -> None:
        """The agent no longer lists the driver as a delegate: streams fail DENIED."""
        self.refusing = True
        self._end_streams(denied())
        if self.up:
            self.status.value = AgentStatus(Access.REFUSED, denied().message)

    def accept(self) -> None:
        self.refusing = False
        if self.up:
            self._connected()

    def set_renewing(self, renewing: bool) -> None:
        self.renewing = renewing
        self._timer.set()

    # Internals ------------------------------------------------------------------------

    def _count(self, selectors: Sequence[Selector]) -> None:
        self.calls.value += 1
        now = trio.current_time()
        recent = self._recent.setdefault(frozenset(selectors), deque(maxlen=HOT_LOOP_CALLS + 1))
        recent.append(now)
        if len(recent) > HOT_LOOP_CALLS and now - recent[0] < 1.0 and not self.hot_loop.is_set():
            self.hot_loop_detail = (
                f"{len(recent)} calls with the selectors {sorted(selectors)} within "
                f"{now - recent[0]:.3f}s: a retry loop without backoff"
            )
            self.hot_loop.set()

    def _refusal(self) -> AgentProblem | None:
        if not self.up:
            return unavailable()
        if self.refusing:
            return denied()
        return None

    def _connected(self) -> None:
        if not self.up:
            return
        if self.refusing:
            self.status.value = AgentStatus(Access.REFUSED, denied().message)
            return
        self._send_bundles()
        self.status.value = AgentStatus(Access.ACCEPTED)

    def _send_bundles(self) -> None:
        """What a bundle stream delivers (a new version every time, as the client counts)."""
        cas = {
            self.trust_domain: self.bundle_der(),
            **{td: self.bundle_der(td) for td in self._federated},
        }
        x509 = bundles_from_response(
            di.SubscribeToX509BundlesResponse(
                ca_certificates={trust_domain_id(td): b"".join(c) for td, c in cas.items()}
            )
        )
        self.x509_bundles.value = BundleSet(self.x509_bundles.value.version + 1, x509)
        if self._jwt_wanted:
            jwks = {self.trust_domain: self.ca.jwks()}
            jwks.update((td, ca.jwks()) for td, ca in self._federated.items())
            jwt = jwt_bundles_from_response(
                di.SubscribeToJWTBundlesResponse(
                    bundles={trust_domain_id(td): doc for td, doc in jwks.items()}
                )
            )
            self.jwt_bundles.value = BundleSet(self.jwt_bundles.value.version + 1, jwt)

    def _end_streams(self, problem: AgentProblem) -> None:
        for subscriber in self._subscribers:
            subscriber.ended = problem
            subscriber.wake.set()

    def _wake_all(self) -> None:
        for subscriber in self._subscribers:
            subscriber.wake.set()
        self._timer.set()

    def _issue(self, entry: Entry) -> Issued:
        svid = self.ca.issue_x509_svid(entry.spiffe_id, entry.ttl or self.svid_ttl)
        self._generation += 1
        now = self._now()
        issued = Issued(entry, svid, self._generation, now + max(svid.expires_at - now, 0) / 2)
        self._cache[entry.svid_key] = issued
        self._timer.set()
        return issued

    def _renew_due(self) -> None:
        now = self._now()
        due = [i for i in self._cache.values() if i.renew_at <= now]
        for issued in due:
            self._issue(issued.entry)
        if due:
            self._wake_all()

    def _issued(self, entries: Sequence[Entry]) -> list[Issued]:
        return [self._cache.get(e.svid_key) or self._issue(e) for e in entries]

    def _federates(self, entries: Sequence[Entry]) -> list[str]:
        return sorted({td for e in entries for td in e.federates_with if td in self._federated})

    def fingerprint(self, selectors: Sequence[Selector]) -> object:
        """What an SVID stream with ``selectors`` would send, in short: a stream sends
        again only when this changes."""
        entries = self.entries_for(selectors)
        issued = self._issued(entries)
        hints = tuple((e.hint, i.generation) for e, i in zip(entries, issued, strict=True))
        return hints, tuple(self._federates(entries))

    def update_for(self, selectors: Sequence[Selector]) -> X509Update | AgentProblem:
        """What an SVID stream with ``selectors`` sends now, parsed as the client parses
        the agent's response."""
        entries = self.entries_for(selectors)
        if not entries:
            return _no_entry(selectors, "an SVID")
        svids = [item.svid for item in self._issued(entries)]
        federates = [trust_domain_id(td) for td in self._federates(entries)]
        return x509_from_response(svids_response(entries, svids, federates))


class MemoryMounter:
    """The storage ``Mounter`` protocol in memory: ``mounts`` maps a target path to the
    sources mounted there, bottom first, so a mount stacked twice shows. The target folder
    is real: made (0750) through the held parent and checked as the real mounter does.

    Put an errno in ``fail[op]`` (``"bind_readonly"``, ``"unmount"``) to make the next call
    of that operation raise :class:`MountError`; :meth:`lose` is an unmount by someone else.
    """

    def __init__(self) -> None:
        self.mounts: dict[Path, list[Path]] = {}
        self.fail: dict[str, int] = {}

    def _failure(self, op: str, what: str) -> None:
        err = self.fail.pop(op, 0)
        if err:
            raise MountError(err, what)

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        what = f"bind mount {source} -> {target.path}"
        self._failure("bind_readonly", what)
        if not source.is_dir():
            raise MountError(errno.ENOENT, f"{what}: {source} is not a folder")
        fd = target.open(create=True)
        if fd is not None:
            os.close(fd)
        target.verify()
        self.mounts.setdefault(_real(target.path), []).append(_real(source))

    def unmount(self, target: TargetDir, source: Path) -> UnmountResult:
        self._failure("unmount", f"unmount {target.path}")
        layers = self.mounts.get(_real(target.path), [])
        removed = 0
        while layers and layers[-1] == _real(source):
            layers.pop()
            removed += 1
        if not layers:
            self.mounts.pop(_real(target.path), None)
        return UnmountResult(removed=removed, ours_left=len(layers))

    def is_mounted(self, target: TargetDir, source: Path) -> bool:
        layers = self.mounts.get(_real(target.path))
        if not layers:
            return False
        return layers[-1] == _real(source)

    def lose(self, target: Path) -> None:
        """Someone else unmounts ``target`` (every layer), behind the driver's back."""
        self.mounts.pop(_real(target), None)

    def source(self, target: Path) -> Path | None:
        """What a pod sees at ``target``: the topmost mount's source, or None."""
        layers = self.mounts.get(_real(target))
        return layers[-1] if layers else None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))
