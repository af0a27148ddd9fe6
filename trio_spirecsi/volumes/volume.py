"""One published volume: its agent subscription, JWT refreshers, file writer and socket.

A volume's lifecycle is one explicit value, :class:`VolumeState`, held in
:attr:`Volume.state` (a :class:`~trio_spirecsi.watched.Watched`, so publish and the per-pod
socket wait on it):

============  =================================================================
phase         meaning
============  =================================================================
STARTING      no complete set of files yet; ``problem`` says why, when known
CURRENT       the files hold what the agent last sent (``written`` describes them)
DEGRADED      the files hold an earlier, complete set; ``problem`` says why they are
              not current (agent unreachable, entry removed, write failed, ...)
STOPPED       :meth:`Volume.stop` has returned: no task runs, nothing writes again
============  =================================================================

``problem`` is the most important of the problems the volume's tasks report (each task
clears its own once it succeeds again); ``written`` is set by the first complete write and
never cleared. A volume resumed after a driver restart starts CURRENT, ``written`` describing
the files a previous driver left (the writer only ever points ``..data`` at a whole
generation), so its condition follows the SVID the pod has, not the restart. What the kubelet
hears follows from the state alone: NodePublishVolume succeeds once ``written`` is set (see
``Registry``) and VOLUME_CONDITION is :meth:`VolumeState.condition`.

Containment: every task of the volume (SVID subscription, JWT refreshers, writer, per-pod
socket) runs under :meth:`Volume._supervise`. An exception other than cancellation is logged
with the volume and pod, counted in ``errors_total``, shown as the volume's problem and the
task restarted with backoff; the last complete files stay. Nothing a volume does can end
another volume or the process. A publish takes its volume's first SVID in its own task
(:meth:`Volume.first_svid`, on the stream :class:`FirstStream` opened) under the same rules,
then hands the stream to the SVID task.

Everything runs inside :attr:`Volume.cancel_scope`. After :meth:`Volume.stop` returns, no
task of this volume is running and nothing will write into its data folder again.
"""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import trio
from cryptography import x509

from .. import log
from ..attributes import CREDENTIAL_BUNDLE_FILE
from ..errors import RenderError, leaves
from ..metrics import Metrics
from ..render import render_files, select_svids
from ..spire.agent import AgentError, AgentProblem, AgentStatus, Outcome
from ..spire.backoff import AGENT_RETRY, Backoff, BackoffPolicy
from ..spire.responses import (
    CRYPTO_ERRORS,
    X509SVID,
    JwtBundles,
    JwtSvid,
    X509Bundles,
    X509Update,
)
from ..spire.selectors import Selector
from ..storage.writer import DATA_LINK, FileContent, Layout, write_atomically
from ..watched import Observable, Watched
from .plan import VolumePlan
from .trace import PublishTrace

logger = logging.getLogger(__name__)


class Agent(Protocol):
    """What volumes and the registry use of the agent client (a fake one in fast tests)."""

    @property
    def x509_bundles(self) -> Watched[X509Bundles]: ...

    @property
    def jwt_bundles(self) -> Watched[JwtBundles]: ...

    @property
    def status(self) -> Observable[AgentStatus]: ...

    def x509_svids(self, selectors: Sequence[Selector]) -> SvidStream:
        """The pod's SVID updates while the block runs (see
        :meth:`~trio_spirecsi.spire.agent.AgentClient.x509_svids`)."""
        ...

    async def jwt_svids(
        self, selectors: Sequence[Selector], audiences: Sequence[str], *, timeout: float = ...
    ) -> tuple[JwtSvid, ...]: ...

    def want_jwt_bundles(self) -> None: ...


SvidStream = AbstractAsyncContextManager[AsyncIterator[X509Update | AgentProblem]]
"""What :meth:`Agent.x509_svids` returns: the pod's SVID stream while the block runs."""


class FirstStream:
    """A publish's SVID stream, opened (its request sent) before the volume exists, so that
    the agent answers while the publish writes the volume's metadata and starts it.

    :meth:`open` never raises the agent's refusal: ``failure`` holds it (or an unexpected
    error), for :meth:`Volume.first_svid` to report as the SVID task would. Whoever holds an
    open one closes it (:meth:`aclose`, idempotent): the publish until its volume exists,
    then :meth:`Volume.first_svid` until the hand-over, then the volume's SVID task, which
    iterates it to its end in ``async with``. Nothing of the stream is tied to the task that
    opened it (no cancel scope spans its ``yield``), so any of them may leave it.
    """

    __slots__ = ("_stream", "failure", "updates")

    def __init__(
        self,
        stream: SvidStream | None,
        updates: AsyncIterator[X509Update | AgentProblem] | None,
        failure: Exception | None,
    ) -> None:
        self._stream = stream
        self.updates = updates
        self.failure = failure

    @classmethod
    async def open(cls, agent: Agent, selectors: Sequence[Selector]) -> FirstStream:
        stream = agent.x509_svids(selectors)
        try:
            updates = await stream.__aenter__()
        except Exception as exc:
            return cls(None, None, exc)
        return cls(stream, updates, None)

    async def aclose(self) -> None:
        stream, self._stream, self.updates = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.__aexit__(None, None, None)

    async def __aenter__(self) -> AsyncIterator[X509Update | AgentProblem]:
        if self.updates is None:
            raise RuntimeError("the stream is closed or failed to open")
        return self.updates

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stream, self._stream, self.updates = self._stream, None, None
        return None if stream is None else await stream.__aexit__(exc_type, exc, tb)


class _Handover:
    """A publish's SVID stream on its way to the volume's SVID task (see
    :meth:`Volume.first_svid`): held by the publish until ``done``, then by the SVID task
    (or the volume's end, if the task never took it)."""

    __slots__ = ("done", "failed", "scope", "stream", "taker_gone")

    def __init__(self, stream: FirstStream) -> None:
        self.done = trio.Event()
        self.stream: FirstStream | None = stream
        self.scope = trio.CancelScope()
        """Around the publish's round trip: the volume's end cancels it (the publish's task
        is not inside the volume's cancel scope)."""
        self.failed = False
        """The publish's attempt failed: the SVID task waits a backoff before its own."""
        self.taker_gone = False
        """The volume ended before the hand-over: the publish closes the stream itself."""


SocketServer = Callable[["Volume", Callable[[], None]], Awaitable[None]]
"""Serves the volume's per-pod socket until cancelled; calls its second argument each time
the socket accepts connections (again). Injected by the daemon, so volumes do not depend on
the servers that read them."""


class RewriteLane:
    """Where writes that no publish waits for (rotations, bundle changes, resumed volumes)
    take turns, shared by a registry's volumes.

    At most ``per_turn`` writes (3) per scheduler turn, in arrival order, so a rotation of
    every volume never holds the event loop for long; and while a publish is in progress
    (between :meth:`publish_started` and :meth:`publish_ended`) the next writes wait for it
    to end, for at most ``max_wait`` seconds (0.1), so that a publish meets as little of
    other volumes' work as possible while no rotation is held up for long. A publish's own
    first write never goes through the lane. ``after_write`` is called as each write leaves
    the lane (the daemon's :meth:`~trio_spirecsi.heap.HeapKeeper.rewritten`).
    """

    __slots__ = ("_after_write", "_idle", "_turns", "max_wait", "per_turn", "publishing")

    def __init__(
        self,
        *,
        per_turn: int = 3,
        max_wait: float = 0.1,
        after_write: Callable[[], None] = lambda: None,
    ) -> None:
        if per_turn < 1:
            raise ValueError(f"per_turn must be 1 or more, not {per_turn}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be 0 or more seconds, not {max_wait}")
        self.per_turn = per_turn
        self.max_wait = max_wait
        self.publishing = 0
        self._after_write = after_write
        self._turns = trio.Semaphore(per_turn)
        self._idle = trio.Event()
        self._idle.set()

    def publish_started(self) -> None:
        self.publishing += 1
        if self.publishing == 1:
            self._idle = trio.Event()

    def publish_ended(self) -> None:
        self.publishing -= 1
        if self.publishing == 0:
            self._idle.set()

    async def __aenter__(self) -> None:
        await self._turns.acquire()
        try:
            if self.publishing:
                with trio.move_on_after(self.max_wait):
                    await self._idle.wait()
        except BaseException:
            self._turns.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._turns.release()
        self._after_write()


class Phase(enum.Enum):
    STARTING = "starting"
    CURRENT = "current"
    DEGRADED = "degraded"
    STOPPED = "stopped"


class ProblemKind(enum.Enum):
    """Why a volume's files are not (or no longer) current. The first five come from the
    agent (:class:`~trio_spirecsi.spire.agent.Outcome`); the rest are the volume's own."""

    NO_ENTRY = "no_entry"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"
    BAD_DATA = "bad_data"
    AGENT_FAILED = "agent_failed"
    ENTITLEMENT_LOST = "entitlement_lost"
    """The agent stopped issuing an SVID for the pod after it had one."""
    LAYOUT = "layout"
    """The agent's data cannot be laid out as the volume asks (no SVID matching its choice,
    a bundle not yet sent, two files with one name)."""
    WRITE = "write"
    """The files could not be written (read-only folder, full disk, no descriptors)."""
    SOCKET = "socket"
    """The per-pod socket could not be served."""
    INTERNAL = "internal"
    """An unexpected error in one of the volume's tasks (a bug); the task restarts."""

    @property
    def local(self) -> bool:
        """A failure on this node, shown as abnormal at once (agent trouble is shown only
        once the SVID is close to expiry: the files are still valid meanwhile)."""
        return self in _LOCAL


_LOCAL = frozenset(
    {
        ProblemKind.ENTITLEMENT_LOST,
        ProblemKind.LAYOUT,
        ProblemKind.WRITE,
        ProblemKind.SOCKET,
        ProblemKind.INTERNAL,
    }
)
_PRIORITY = (
    ProblemKind.ENTITLEMENT_LOST,
    ProblemKind.DENIED,
    ProblemKind.INTERNAL,
    ProblemKind.WRITE,
    ProblemKind.BAD_DATA,
    ProblemKind.LAYOUT,
    ProblemKind.AGENT_FAILED,
    ProblemKind.UNAVAILABLE,
    ProblemKind.NO_ENTRY,
    ProblemKind.SOCKET,
)
_FROM_OUTCOME = {
    Outcome.NO_ENTRY: ProblemKind.NO_ENTRY,
    Outcome.DENIED: ProblemKind.DENIED,
    Outcome.UNAVAILABLE: ProblemKind.UNAVAILABLE,
    Outcome.BAD_DATA: ProblemKind.BAD_DATA,
    Outcome.FAILED: ProblemKind.AGENT_FAILED,
}


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    message: str
    """For the operator: what happened and what to fix; never key material or tokens."""

    @classmethod
    def of(cls, agent_problem: AgentProblem) -> Problem:
        return cls(_FROM_OUTCOME[agent_problem.outcome], agent_problem.message)


@dataclass(frozen=True, slots=True)
class Written:
    """The identity the volume's files hold."""

    spiffe_id: str
    not_before: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class VolumeState:
    phase: Phase
    problem: Problem | None = None
    written: Written | None = None
    serving: bool | None = None
    """The per-pod socket accepts connections (True) or not yet (False); None when the
    volume has none."""
    local: Problem | None = None
    """The most important problem of this node (``ProblemKind.local``), if any: it can rank
    below ``problem`` (an agent refusing the driver is told first) and still makes the
    volume abnormal."""

    @property
    def entitled(self) -> bool:
        """False once the agent stopped issuing an SVID for the pod (after it had one)."""
        return self.problem is None or self.problem.kind is not ProblemKind.ENTITLEMENT_LOST

    @property
    def ready(self) -> bool:
        """What the pod needs is there: its files and, when it asked for one, its socket
        (which must accept before the pod's containers start: Istio's proxy checks it)."""
        return self.written is not None and self.serving is not False

    @property
    def settled(self) -> bool:
        """Publish can stop waiting: the volume is ready, or the agent refuses the driver."""
        return self.ready or (self.problem is not None and self.problem.kind is ProblemKind.DENIED)

    def condition(self, now: float) -> tuple[bool, str]:
        """(abnormal, message) for NodeGetVolumeStats' VOLUME_CONDITION at ``now``."""
        problem, written = self.problem, self.written
        if written is None:
            return True, problem.message if problem else "waiting for the first SVID"
        if now >= written.expires_at:
            return True, f"the SVID for {written.spiffe_id} expired at {_utc(written.expires_at)}"
        if self.local is not None:
            return True, self.local.message
        # Agents renew at about half-life: past 75% with a failing agent, or past 90% at
        # all, the SVID is no longer being renewed.
        lifetime = written.expires_at - written.not_before
        elapsed = (now - written.not_before) / lifetime if lifetime > 0 else 0.0
        if (problem is not None and elapsed > 0.75) or elapsed > 0.9:
            reason = problem.message if problem else "the agent has not sent a new one"
            return True, (
                f"the SVID for {written.spiffe_id} expires at {_utc(written.expires_at)} and "
                f"has not been renewed: {reason}"
            )
        return False, f"SVID {written.spiffe_id} valid until {_utc(written.expires_at)}"


class Volume:
    """One published volume's tasks and state; see the module docstring."""

    __slots__ = (
        "_agent",
        "_dirty",
        "_handover",
        "_jwt",
        "_layout",
        "_metrics",
        "_now",
        "_problems",
        "_retry",
        "_rewrites",
        "_serving",
        "_socket_server",
        "_written_digest",
        "cancel_scope",
        "finished",
        "plan",
        "state",
        "trace",
        "x509",
    )

    def __init__(
        self,
        plan: VolumePlan,
        agent: Agent,
        metrics: Metrics,
        *,
        now: Callable[[], float] = time.time,
        retry: BackoffPolicy = AGENT_RETRY,
        socket_server: SocketServer | None = None,
        rewrites: RewriteLane | None = None,
        first: FirstStream | None = None,
    ) -> None:
        self.plan = plan
        self._rewrites = rewrites
        self._agent = agent
        self._metrics = metrics
        self._now = now
        self._retry = retry
        self._socket_server = socket_server
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self._serving: bool | None = (
            False if plan.spec.workload_api and socket_server is not None else None
        )
        # A publish's volume (``first``) has a folder made just now: nothing to read there.
        self.state: Watched[VolumeState] = Watched(
            VolumeState(Phase.STARTING, serving=self._serving)
            if first is not None
            else _on_disk(plan, self._serving)
        )
        self.x509: Watched[X509Update | None] = Watched(None)
        """The agent's latest SVID set for this pod (all SVIDs, before selection)."""
        self._jwt: dict[tuple[str, ...], JwtSvid] = {}
        self._problems: dict[str, Problem] = {}
        """Each task's current problem, by task name: the state shows the worst."""
        self._written_digest: bytes | None = None
        """Digest of the files last written: a bundle update that changes nothing for this
        volume writes nothing (and holds no copy of the files in memory)."""
        self._layout: Layout | None = None
        """What this process's last successful write left in the data folder: the next
        write (a rotation) skips checking the folder. None at first (a resumed volume's
        folder is checked and repaired by its first write) and after a failed write."""
        self._dirty = trio.Event()
        self.trace: PublishTrace | None = None
        """The publish waiting for this volume's first files, if any: its phases are marked."""
        self._handover = None if first is None else _Handover(first)
        """With ``first``: the SVID task waits for :meth:`first_svid` to hand it over."""

    # Lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop` (or an enclosing cancellation); never raises otherwise."""
        spec = self.plan.spec
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._supervise, "writer", self._write_loop)
                    for audiences in spec.jwt_audiences:
                        loop = functools.partial(self._jwt_loop, audiences)
                        nursery.start_soon(self._supervise, _jwt_task(audiences), loop)
                    if spec.jwt_bundle_file:
                        self._agent.want_jwt_bundles()
                    if spec.workload_api and self._socket_server is not None:
                        server = functools.partial(self._socket_server, self, self._served)
                        nursery.start_soon(self._supervise, "socket", server)
                    # In this task: the subscription starts now, not at the next turn.
                    await self._supervise("svid", self._svid_loop)
        finally:
            self.state.value = VolumeState(Phase.STOPPED, None, self.state.value.written, None)
            await self._drop_handover()
            self.finished.set()

    async def first_svid(self) -> None:
        """A publish's wait for the agent, in the caller's task: take the answers of the
        stream the publish opened (``first`` when the volume was made) until the first SVID,
        write the files from it, then hand the open stream to the volume's SVID task (which
        waits for it instead of subscribing).

        One task from the request to the files: the publish waits for the agent and for
        nothing else (no turn of the volume's task before the request leaves, none between
        the answer and the files). A refusal or a failure is reported as the SVID task would
        report it and the task then starts over after its backoff; the caller goes on to
        wait for :attr:`state` as usual. Cancelled before the hand-over, or the volume
        stopped meanwhile (which ends this call), it closes the stream itself: no agent
        subscription outlives the publish or the volume.
        """
        handover = self._handover
        if handover is None or handover.done.is_set() or handover.stream is None:
            raise RuntimeError("first_svid is for a volume made with a first stream, once")
        first = handover.stream
        with handover.scope:
            try:
                if first.failure is not None:
                    raise first.failure
                assert first.updates is not None
                while self.x509.value is None:
                    self._on_svids(await first.updates.__anext__())
            except AgentError as exc:
                self._report("svid", Problem.of(exc.problem))
                handover.failed = True
            except Exception as exc:
                self._task_failed("svid", ExceptionGroup("svid", [exc]))
                handover.failed = True
            finally:
                if handover.failed or handover.taker_gone or self.x509.value is None:
                    handover.stream = None
                    await first.aclose()
                handover.done.set()

    async def _take_handover(self) -> tuple[FirstStream | None, bool]:
        """For the SVID task: the stream a publish opened (if any) and whether the
        publish's attempt failed. Without a publish, (None, False) at once."""
        handover = self._handover
        if handover is None:
            return None, False
        if not handover.done.is_set():
            await handover.done.wait()
        stream, handover.stream = handover.stream, None
        self._handover = None
        return stream, handover.failed

    async def _drop_handover(self) -> None:
        """At the volume's end: a stream handed over but never taken is closed here; one
        the publish still holds is left for it to close (its wait is cancelled)."""
        handover, self._handover = self._handover, None
        if handover is None:
            return
        handover.taker_gone = True
        handover.scope.cancel()
        stream = handover.stream
        if stream is not None and handover.done.is_set():
            handover.stream = None
            await stream.aclose()

    async def stop(self) -> None:
        """Cancel every task of the volume and wait until they have all exited.

        Idempotent; if the caller is cancelled while waiting, the volume still stops (a
        second call waits for it again).
        """
        self.cancel_scope.cancel()
        await self.finished.wait()

    def wake(self) -> None:
        """Something the files depend on changed (bundles): re-render."""
        self._dirty.set()

    async def _supervise(self, task: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run one of the volume's tasks for ever: an exception other than cancellation is
        logged, counted and shown, and the task starts again after a backoff."""
        backoff = self._retry.new()
        while True:
            try:
                await run()
                return
            except* Exception as group:
                self._task_failed(task, group)
            await trio.sleep(backoff.next())

    def _task_failed(self, task: str, group: BaseExceptionGroup[Exception]) -> None:
        found = leaves(group)
        first = found[0]
        expected = all(isinstance(e, OSError) for e in found)
        kind = ProblemKind.SOCKET if task == "socket" and expected else ProblemKind.INTERNAL
        detail = _os_error(first) if isinstance(first, OSError) else type(first).__name__
        self._metrics.errors_total.labels(
            kind="socket_failed" if kind is ProblemKind.SOCKET else "volume_task_failed"
        ).inc()
        fields = {"volume_id": self.plan.volume_id, "pod": self.plan.pod, "task": task}
        if expected:
            log.event(logger, logging.ERROR, "volume_task_failed", error=detail, **fields)
        else:
            log.bug(logger, "volume_task_failed", first, error=detail, **fields)
        if task == "socket":
            self._serving = False
        what = "serve the per-pod socket" if kind is ProblemKind.SOCKET else f"run its {task} task"
        self._report(task, Problem(kind, f"the driver could not {what}: {detail}; retrying"))

    def _served(self) -> None:
        self._serving = True
        self._report("socket", None)
        log.event(
            logger,
            logging.INFO,
            "workload_api_serving",
            volume_id=self.plan.volume_id,
            pod=self.plan.pod,
            socket=str(self.plan.data_dir / self.plan.spec.workload_api_socket),
        )

    # Agent inputs --------------------------------------------------------

    async def _svid_loop(self) -> None:
        backoff = self._retry.new()
        adopted, failed = await self._take_handover()
        if failed:
            await self._retry_after(backoff)
        while True:
            try:
                stream, adopted = adopted or self._agent.x509_svids(self.plan.selectors), None
                async with stream as updates:
                    self._mark("subscribe")
                    async for update in updates:
                        backoff.reset()
                        self._on_svids(update)
            except AgentError as exc:
                self._report("svid", Problem.of(exc.problem))
            await self._retry_after(backoff)

    async def _retry_after(self, backoff: Backoff) -> None:
        """Wait before calling the agent again: the next backoff delay, cut short when the
        agent starts serving the driver again after it did not, so that every volume comes
        back with the agent instead of one backoff later. A failure of this volume alone
        (the agent serving all along) waits the whole delay."""
        seen = self._agent.status.value
        with trio.move_on_after(backoff.next()):
            await self._agent.status.wait_value(lambda status: status.ready and status is not seen)

    def _on_svids(self, update: X509Update | AgentProblem) -> None:
        if isinstance(update, AgentProblem):
            # Files that hold an SVID (written now, or resumed) mean the pod had an identity.
            had = self.x509.value is not None or self.state.value.written is not None
            if update.outcome is Outcome.NO_ENTRY and had:
                self._report(
                    "entitlement",
                    Problem(
                        ProblemKind.ENTITLEMENT_LOST,
                        "the SPIRE agent no longer issues an SVID for this pod (its "
                        "registration entry was removed or no longer matches); the files keep "
                        "the last SVID until it expires",
                    ),
                )
            else:
                self._report("svid", Problem.of(update))
            return
        self._mark("first_svid")
        self._problems.pop("entitlement", None)
        self._report("svid", None)
        self.x509.value = update
        # A publish waits for these files: write them now rather than at the writer's turn.
        if self.trace is None or not self._write_if_complete():
            self._dirty.set()

    async def _jwt_loop(self, audiences: tuple[str, ...]) -> None:
        task = _jwt_task(audiences)
        backoff = self._retry.new()
        spec = self.plan.spec
        while True:
            try:
                svids = await self._agent.jwt_svids(self.plan.selectors, audiences)
            except AgentError as exc:
                self._report(task, Problem.of(exc.problem))
                await self._retry_after(backoff)
                continue
            svid = spec.preference.first(svids, _hint_and_id)
            if svid is None:
                issued = ", ".join(f"{s.spiffe_id} (hint {s.hint!r})" for s in svids)
                self._report(
                    task,
                    Problem(
                        ProblemKind.LAYOUT,
                        f"no JWT-SVID with {spec.preference.describe()}; the SPIRE agent "
                        f"issued: {issued}",
                    ),
                )
                await trio.sleep(backoff.next())
                continue
            self._jwt[audiences] = svid
            self._report(task, None)
            self._dirty.set()
            backoff.reset()
            # Refresh at half-life: an agent returns its cached token until then.
            lifetime = max(svid.expires_at - svid.issued_at, 2.0)
            delay = max(svid.issued_at + lifetime / 2 - self._now(), 1.0)
            await self._until_identity_moves(delay, svid.spiffe_id)

    async def _until_identity_moves(self, seconds: float, issued: str) -> None:
        """Sleep ``seconds``, or less if the X.509 identity the volume chooses changes to
        one that is neither ``issued`` nor the one it chooses now (an entry was removed):
        the JWT-SVID then follows, and the volume's files keep agreeing on one identity."""
        before = self._chosen_id(self.x509.value)

        def moved(update: X509Update | None) -> bool:
            return self._chosen_id(update) not in (before, issued)

        with trio.move_on_after(seconds):
            await self.x509.wait_value(moved)

    def _chosen_id(self, update: X509Update | None) -> str | None:
        """The SPIFFE ID of the X.509-SVID the volume chooses from ``update``, if any."""
        if update is None:
            return None
        chosen = self.plan.spec.preference.first(update.svids, _hint_and_id)
        return chosen.spiffe_id if chosen is not None else None

    # Files ---------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = self._retry.new()
        while True:
            await self._dirty.wait()
            if self._rewrites is not None and self.trace is None:
                async with self._rewrites:
                    self._dirty = trio.Event()
                    written = self._write_if_complete()
            else:
                self._dirty = trio.Event()
                written = self._write_if_complete()
            if written:
                backoff.reset()
            else:
                await trio.sleep(backoff.next())
                self._dirty.set()

    def _write_if_complete(self) -> bool:
        """Write the files if everything they need has arrived. False when writing failed
        (the caller retries); the previous files stay complete either way."""
        spec = self.plan.spec
        update = self.x509.value
        if update is None or any(a not in self._jwt for a in spec.jwt_audiences):
            return True
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
            self._report("files", Problem(ProblemKind.LAYOUT, exc.message))
            return True
        self._mark("render")
        digest = _digest(files)
        if digest == self._written_digest:
            self._report("files", None)
            return True
        started = time.perf_counter()
        try:
            plan = self.plan
            self._layout = write_atomically(
                plan.data_dir,
                files,
                gid=spec.gid,
                selinux_context=plan.selinux_context,
                fsync=plan.fsync,
                after=self._layout,
            )
        except OSError as exc:
            self._layout = None  # the next write checks and repairs the whole folder
            self._metrics.errors_total.labels(kind="write_failed").inc()
            self._report(
                "files",
                Problem(
                    ProblemKind.WRITE,
                    f"the driver could not write the volume's files: {_os_error(exc)}; the "
                    "previous files stay until a retry succeeds",
                ),
            )
            return False
        self._mark("write")
        previous = self.state.value.written
        if previous is not None and leaf.expires_at != previous.expires_at:
            self._metrics.svid_rotations_total.inc()
        self._written_digest = digest
        not_before = leaf.not_before
        if not_before is None:  # an SVID that did not come through validation (tests)
            cert = x509.load_der_x509_certificate(leaf.cert_chain[0])
            not_before = int(cert.not_valid_before_utc.timestamp())
        written = Written(leaf.spiffe_id, float(not_before), float(leaf.expires_at))
        self._report("files", None, written=written)
        log.event(
            logger,
            logging.INFO,
            "files_written",
            volume_id=self.plan.volume_id,
            pod=self.plan.pod,
            spiffe_id=written.spiffe_id,
            expires_at=int(written.expires_at),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return True

    # State -----------------------------------------------------------------

    def _mark(self, phase: str) -> None:
        if self.trace is not None:
            self.trace.mark(phase)

    def _report(
        self, task: str, problem: Problem | None, *, written: Written | None = None
    ) -> None:
        """Record ``task``'s problem (None: it works) and recompute the state."""
        before = self._problems.get(task)
        if problem is None:
            self._problems.pop(task, None)
        else:
            self._problems[task] = problem
        state = self.state.value
        if state.phase is Phase.STOPPED:
            return
        worst = min(self._problems.values(), key=_rank, default=None)
        local = min((p for p in self._problems.values() if p.kind.local), key=_rank, default=None)
        written = written or state.written
        if written is None:
            phase = Phase.STARTING
        else:
            phase = Phase.CURRENT if worst is None else Phase.DEGRADED
        self.state.value = VolumeState(phase, worst, written, self._serving, local)
        if problem is not None and problem != before:
            log.event(
                logger,
                logging.WARNING,
                "volume_degraded",
                volume_id=self.plan.volume_id,
                pod=self.plan.pod,
                problem=problem.kind.value,
                reason=problem.message,
            )

    def now(self) -> float:
        """The wall clock the volume uses (unix seconds; injected in tests)."""
        return self._now()

    def condition(self, now: float | None = None) -> tuple[bool, str]:
        """(abnormal, message) for VOLUME_CONDITION, now."""
        return self.state.value.condition(self._now() if now is None else now)

    @property
    def expires_at(self) -> float:
        """When the SVID the files hold expires (0 before the first write)."""
        written = self.state.value.written
        return written.expires_at if written is not None else 0.0


def _on_disk(plan: VolumePlan, serving: bool | None) -> VolumeState:
    """The state of a volume whose folder may already hold a complete set of files."""
    spec = plan.spec
    name = CREDENTIAL_BUNDLE_FILE if spec.layout == "spiffe-fs" else spec.svid_file
    try:
        pem = (plan.data_dir / DATA_LINK / name).read_bytes()
        leaf = x509.load_pem_x509_certificates(pem)[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        written = Written(
            spiffe_id,
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
        )
    except (OSError, IndexError, x509.ExtensionNotFound, *CRYPTO_ERRORS):
        return VolumeState(Phase.STARTING, serving=serving)
    return VolumeState(Phase.CURRENT, None, written, serving)


def _rank(problem: Problem) -> int:
    return _PRIORITY.index(problem.kind)


def _jwt_task(audiences: tuple[str, ...]) -> str:
    return "jwt " + ",".join(audiences)


def _hint_and_id(svid: JwtSvid | X509SVID) -> tuple[str, str]:
    return svid.hint, svid.spiffe_id


def _os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _digest(files: Mapping[str, FileContent]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        content = files[name]
        h.update(b"%d:%s:%d:%d:" % (len(name), name.encode(), content.mode, len(content.data)))
        h.update(content.data)
    return h.digest()


__all__ = [
    "Agent",
    "FirstStream",
    "Phase",
    "Problem",
    "ProblemKind",
    "RewriteLane",
    "SocketServer",
    "Volume",
    "VolumeState",
    "Written",
]
