"""One published volume: its agent subscription, JWT refreshers and file writer.

Everything a volume does runs inside :attr:`Volume.cancel_scope`. After
:meth:`Volume.stop` returns, no task of this volume is running and nothing will
write into its data folder again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509

from .. import log
from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from .._proto.spire.api.types import types_pb2
from ..errors import RenderError
from ..grpc import RpcError, StatusCode
from ..metrics import Metrics
from ..render import X509Update, render_files, select_svids, x509_from_response
from ..spire.agent import AgentClient, Selector
from ..spire.backoff import Backoff
from ..storage.writer import FileContent, write_atomically
from ..watched import Watched
from .attributes import VolumeSpec
from .selectors import format_selectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumePlan:
    """What a volume needs to run, all derived from its metadata."""

    volume_id: str
    target_path: Path
    data_dir: Path
    spec: VolumeSpec
    selectors: tuple[Selector, ...]
    selinux_context: str | None = None

    @property
    def pod(self) -> str:
        return f"{self.spec.pod.namespace}/{self.spec.pod.name}"


@dataclass(frozen=True)
class Jwt:
    token: str
    issued_at: float
    expires_at: float


class Volume:
    def __init__(self, plan: VolumePlan, agent: AgentClient, metrics: Metrics) -> None:
        self.plan = plan
        self._agent = agent
        self._metrics = metrics
        self.cancel_scope = trio.CancelScope()
        self.written = trio.Event()
        """Set once the first complete set of files is on disk."""
        self.settled = trio.Event()
        """Set when publish can stop waiting: files written, or the agent refused us."""
        self.finished = trio.Event()
        self.denied = False
        self.unmatched = False
        """The agent answered, with no SVID: no registration entry matches (yet)."""
        self.problem = ""
        """Why the files are not (or no longer) current, in operator terms; empty when fine."""
        self.entitled: Watched[bool] = Watched(True)
        """False once the agent stopped issuing an SVID for the pod (after it had one)."""
        self.spiffe_id = ""
        self.not_before = 0.0
        self.expires_at = 0.0
        self.x509: Watched[X509Update | None] = Watched(None)
        """The agent's latest non-empty SVID set for this pod (all SVIDs, before selection)."""
        self._jwt: dict[tuple[str, ...], Jwt] = {}
        self._written_digest: bytes | None = None
        """Digest of the files last written: a bundle update that changes nothing for this
        volume writes nothing (and holds no copy of the files in memory)."""
        self._dirty = trio.Event()

    # Lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop` (or an enclosing cancellation)."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._svid_loop)
                    for audiences in self.plan.spec.jwt_audiences:
                        nursery.start_soon(self._jwt_loop, audiences)
                    if self.plan.spec.jwt_bundle_file:
                        self._agent.want_jwt_bundles()
                    if self.plan.spec.workload_api:
                        from ..workloadapi import serve_volume_socket

                        nursery.start_soon(serve_volume_socket, self, self._agent)
                    await self._write_loop()
        finally:
            self.finished.set()

    async def stop(self) -> None:
        """Cancel every task of the volume and wait until they have all exited."""
        self.cancel_scope.cancel()
        await self.finished.wait()

    def wake(self) -> None:
        """Something the files depend on changed (bundles): re-render."""
        self._dirty.set()

    # Agent inputs --------------------------------------------------------

    async def _svid_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with self._agent.subscribe_x509_svids(self.plan.selectors) as stream:
                    async for response in stream:
                        backoff.reset()
                        self._on_svids(response)
                self._set_problem("the SPIRE agent ended the SVID stream")
            except RpcError as exc:
                self._set_problem(self._agent.explain(exc))
                self._metrics.errors_total.labels(kind=f"agent_{exc.code.name.lower()}").inc()
                if exc.code == StatusCode.PERMISSION_DENIED:
                    self.denied = True
                    self.settled.set()
            await trio.sleep(backoff.next())

    def _on_svids(self, response: di.SubscribeToX509SVIDsResponse) -> None:
        self.denied = False
        self.unmatched = False
        try:
            update = x509_from_response(response)
        except RenderError as exc:
            self._metrics.errors_total.labels(kind="bad_svid").inc()
            self._set_problem(f"the SPIRE agent sent an SVID the driver cannot use: {exc.message}")
            return
        if not update.svids:
            if self.x509.value is None:
                self.unmatched = True
                self._set_problem(self.no_entry_message())
            else:
                self.entitled.value = False
                self._set_problem(
                    "the SPIRE agent no longer issues an SVID for this pod (its registration "
                    "entry was removed or no longer matches); the files keep the last SVID "
                    "until it expires"
                )
            return
        self.entitled.value = True
        self.x509.value = update
        self._dirty.set()

    async def _jwt_loop(self, audiences: tuple[str, ...]) -> None:
        backoff = Backoff()
        while True:
            try:
                response = await self._agent.fetch_jwt_svid(self.plan.selectors, audiences)
                if not response.svids:
                    raise RpcError(StatusCode.PERMISSION_DENIED, "no identity issued")
                svid = select_jwt_svid(self.plan.spec, response.svids)
                if svid is None:
                    self._set_problem(
                        "no JWT-SVID matches the volume's svid-hint / spiffe-id; the SPIRE "
                        "agent issued: "
                        + ", ".join(f"{_jwt_id(s)} (hint {s.hint!r})" for s in response.svids)
                    )
                    await trio.sleep(backoff.next())
                    continue
                jwt = Jwt(svid.token, float(svid.issued_at), float(svid.expires_at))
                self._jwt[audiences] = jwt
                self._dirty.set()
                backoff.reset()
                lifetime = max(jwt.expires_at - jwt.issued_at, 2.0)
                await trio.sleep(max(jwt.issued_at + lifetime / 2 - time.time(), 1.0))
            except RpcError as exc:
                if exc.code == StatusCode.PERMISSION_DENIED and "no identity" in exc.message:
                    self._set_problem(
                        "no registration entry gives a JWT-SVID to the selectors "
                        f"{format_selectors(self.plan.selectors)}"
                    )
                else:
                    self._set_problem(self._agent.explain(exc))
                await trio.sleep(backoff.next())

    # Files ---------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            self._write_if_complete()

    def _write_if_complete(self) -> None:
        spec = self.plan.spec
        update = self.x509.value
        if update is None or any(a not in self._jwt for a in spec.jwt_audiences):
            return
        try:
            leaf = select_svids(spec, update)[0]
            files = render_files(
                spec,
                update,
                self._agent.x509_bundles.value.bundles,
                jwt_tokens={a: j.token for a, j in self._jwt.items()},
                jwt_bundles=self._agent.jwt_bundles.value.bundles,
            )
        except RenderError as exc:
            self._set_problem(exc.message)
            return
        digest = _digest(files)
        if digest == self._written_digest:
            return
        started = time.perf_counter()
        write_atomically(
            self.plan.data_dir, files, gid=spec.gid, selinux_context=self.plan.selinux_context
        )
        if self._written_digest is not None and leaf.expires_at != self.expires_at:
            self._metrics.svid_rotations_total.inc()
        self._written_digest = digest
        self.spiffe_id = leaf.spiffe_id
        self.expires_at = float(leaf.expires_at)
        self.not_before = x509.load_der_x509_certificate(
            leaf.cert_chain[0]
        ).not_valid_before_utc.timestamp()
        if not self.entitlement_lost:
            self.problem = ""
        log.event(
            logger,
            logging.INFO,
            "files_written",
            volume_id=self.plan.volume_id,
            pod=self.plan.pod,
            spiffe_id=self.spiffe_id,
            expires_at=int(self.expires_at),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        self.written.set()
        self.settled.set()

    # Reporting -----------------------------------------------------------

    def _set_problem(self, problem: str) -> None:
        if problem != self.problem:
            self.problem = problem
            log.event(
                logger,
                logging.WARNING,
                "volume_degraded",
                volume_id=self.plan.volume_id,
                pod=self.plan.pod,
                reason=problem,
            )

    @property
    def entitlement_lost(self) -> bool:
        return not self.entitled.value

    def no_entry_message(self) -> str:
        return (
            "no registration entry matched the selectors "
            f"{format_selectors(self.plan.selectors)}: create a SPIRE registration entry (or "
            "ClusterSPIFFEID) whose selectors are a subset of these, parented to this node's "
            "agent"
        )

    def condition(self, now: float) -> tuple[bool, str]:
        """(abnormal, message) for NodeGetVolumeStats' VOLUME_CONDITION."""
        if not self.written.is_set():
            return True, self.problem or "waiting for the first SVID"
        if now >= self.expires_at:
            return True, f"the SVID for {self.spiffe_id} expired at {_utc(self.expires_at)}"
        if self.entitlement_lost:
            return True, self.problem
        # Agents renew at about half-life: past 75% with a failing agent, or past 90%
        # at all, the SVID is no longer being renewed.
        lifetime = self.expires_at - self.not_before
        elapsed = (now - self.not_before) / lifetime if lifetime > 0 else 0.0
        if (self.problem and elapsed > 0.75) or elapsed > 0.9:
            return True, (
                f"the SVID for {self.spiffe_id} expires at {_utc(self.expires_at)} and has not "
                f"been renewed: {self.problem or 'the agent has not sent a new one'}"
            )
        return False, f"SVID {self.spiffe_id} valid until {_utc(self.expires_at)}"


def select_jwt_svid(
    spec: VolumeSpec, svids: Sequence[types_pb2.JWTSVID]
) -> types_pb2.JWTSVID | None:
    """The JWT-SVID for the identity the volume's X.509 files hold: the first that matches
    ``svid-hint`` and ``spiffe-id`` (the rule of :func:`select_svids`), or None."""
    for svid in svids:
        if (not spec.svid_hint or svid.hint == spec.svid_hint) and (
            not spec.spiffe_id or _jwt_id(svid) == spec.spiffe_id
        ):
            return svid
    return None


def _jwt_id(svid: types_pb2.JWTSVID) -> str:
    trust_domain = svid.id.trust_domain.removeprefix("spiffe://")
    return f"spiffe://{trust_domain}{svid.id.path}"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _digest(files: Mapping[str, FileContent]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        content = files[name]
        h.update(b"%d:%s:%d:%d:" % (len(name), name.encode(), content.mode, len(content.data)))
        h.update(content.data)
    return h.digest()
