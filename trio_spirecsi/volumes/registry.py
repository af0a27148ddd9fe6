"""The volume registry: publish, unpublish and resume, and the volumes' nursery.

Each volume runs in its own cancel scope inside the registry's nursery, so a volume outlives
the NodePublishVolume call that created it but never the registry. Calls for one volume ID
are serialised by a per-ID lock; calls for different volumes run concurrently. What the
kubelet is told is a function of the volume's :class:`~.volume.VolumeState` (see
:func:`publish_failure`).

Nothing one volume does can stop the registry: a volume's tasks contain their own failures
(see :mod:`.volume`), and resuming a damaged volume sets it aside instead of failing start-up.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import log
from ..attributes import VolumeSpec, parse_volume_context
from ..errors import AlreadyExists, InvalidArgument, NotFound, PublishFailed, SpireCSIError
from ..metrics import Metrics
from ..spire.backoff import AGENT_RETRY, BackoffPolicy
from ..spire.selectors import Selector, selectors_for
from ..storage.errors import StorageError
from ..storage.metadata import MetadataError, MetadataStore, VolumeMetadata
from ..storage.mount import Mounter
from ..storage.paths import TargetDir, TargetParentMissing, open_target
from ..storage.writer import DATA_LINK
from ..watched import Observable
from .plan import VolumePlan
from .trace import PublishTrace
from .volume import (
    Agent,
    FirstStream,
    ProblemKind,
    RewriteLane,
    SocketServer,
    Volume,
    VolumeState,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishRequest:
    """A validated NodePublishVolume request."""

    volume_id: str
    target_path: Path
    volume_context: Mapping[str, str]
    volume_mount_group: str
    spec: VolumeSpec

    def same_as(self, md: VolumeMetadata) -> bool:
        return (
            Path(md.target_path) == self.target_path
            and md.spec.get("volume_context") == dict(self.volume_context)
            and md.volume_mount_group == self.volume_mount_group
        )


@dataclass(frozen=True)
class VolumeStats:
    used_bytes: int
    total_bytes: int
    available_bytes: int
    used_inodes: int
    total_inodes: int
    available_inodes: int
    abnormal: bool
    message: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A volume the registry holds: its record on disk and its running tasks."""

    metadata: VolumeMetadata
    volume: Volume

    @property
    def target(self) -> Path:
        return Path(self.metadata.target_path)


def publish_failure(state: VolumeState, waited: str, *, agent_ready: bool) -> PublishFailed:
    """What NodePublishVolume answers for a volume that has no files after the wait.

    ``waited`` says how long (e.g. "within 30s"); ``agent_ready`` whether the agent's
    bundle stream is open (an agent that answers nothing is "unavailable" even before the
    volume's own stream has failed).
    """
    problem = state.problem
    kind = problem.kind if problem is not None else None
    if state.written is not None and not state.ready:
        reason = problem.message if problem is not None else "it does not accept connections yet"
        return PublishFailed("internal", f"the pod's socket is not ready {waited}: {reason}")
    if kind is ProblemKind.DENIED:
        assert problem is not None
        return PublishFailed("permission_denied", problem.message)
    if kind is ProblemKind.UNAVAILABLE or (not agent_ready and kind is not ProblemKind.NO_ENTRY):
        reason = problem.message if problem is not None else "the SPIRE agent does not answer"
        return PublishFailed("unavailable", f"no SVID {waited}: {reason}")
    if kind in (ProblemKind.WRITE, ProblemKind.INTERNAL, ProblemKind.SOCKET):
        assert problem is not None
        return PublishFailed(
            "internal", f"the volume could not be prepared {waited}: {problem.message}"
        )
    if problem is not None and kind is not ProblemKind.NO_ENTRY:
        return PublishFailed("timeout", f"no usable SVID {waited}: {problem.message}")
    reason = problem.message if problem is not None else "the SPIRE agent sent no SVID"
    return PublishFailed("timeout", f"no SVID {waited}: {reason}")


class Registry:
    def __init__(
        self,
        *,
        store: MetadataStore,
        mounter: Mounter,
        agent: Agent,
        metrics: Metrics,
        node_id: str,
        kubelet_dir: Path,
        publish_timeout: float,
        selinux_context: str | None = None,
        socket_server: SocketServer | None = None,
        now: Callable[[], float] = time.time,
        retry: BackoffPolicy = AGENT_RETRY,
        after_rewrite: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._mounter = mounter
        self._agent = agent
        self._metrics = metrics
        self._node_id = node_id
        self._kubelet_dir = kubelet_dir
        self._publish_timeout = publish_timeout
        self._selinux_context = selinux_context
        self._socket_server = socket_server
        self._now = now
        self._retry = retry
        self._entries: dict[str, Entry] = {}
        self._locks: dict[str, tuple[trio.Lock, int]] = {}
        self._rewrites = RewriteLane(after_write=after_rewrite)
        self._nursery: trio.Nursery | None = None
        metrics.set_expiry_source(self._expiries)

    # Running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume every volume found on disk, then hold the volumes until cancelled.

        Cancelling leaves mounts and files in place: pods keep their files while the driver
        restarts.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._fan_out, self._agent.x509_bundles)
                nursery.start_soon(self._fan_out, self._agent.jwt_bundles)
                self._resume_all()
                task_status.started()
        finally:
            # A publish that arrives now (the CSI server stops in the same cancellation, and
            # a handler may still take a step) is refused: a volume that cannot run would
            # never stop, and its teardown would wait for it for ever.
            self._nursery = None

    async def _fan_out(self, bundles: Observable[object]) -> None:
        """Wake every volume when a shared bundle set changes (one task for all volumes)."""
        seen = bundles.value
        while True:
            seen = await _changed(bundles, seen)
            for entry in list(self._entries.values()):
                entry.volume.wake()

    def _resume_all(self) -> None:
        started = time.perf_counter()
        result = self._store.load_all()
        for path in result.corrupt:
            self._metrics.errors_total.labels(kind="corrupt_metadata").inc()
            self._set_aside(path, "metadata_corrupt", reason="metadata.json is corrupt")
        for path in result.orphans:
            try:
                self._store.remove_folder(path)
                log.event(logger, logging.WARNING, "orphan_removed", folder=str(path))
            except OSError as exc:
                log.event(logger, logging.ERROR, "orphan_kept", folder=str(path), error=str(exc))
        for md in result.valid:
            try:
                self._resume(md)
            except Exception as exc:  # one damaged volume never stops the others
                self._metrics.errors_total.labels(kind="resume_failed").inc()
                expected = isinstance(exc, SpireCSIError | OSError | MetadataError)
                self._set_aside(
                    self._store.volume_dir(md.volume_id),
                    "resume_failed",
                    reason=_describe(exc),
                    bug=None if expected else exc,
                    volume_id=md.volume_id,
                )
        log.event(
            logger,
            logging.INFO,
            "resumed",
            volumes=len(self._entries),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _set_aside(
        self,
        folder: Path,
        event: str,
        *,
        reason: str,
        bug: BaseException | None = None,
        **fields: str,
    ) -> None:
        """Move a volume folder out of the way (without its keys), logged and never raising."""
        fields["error"] = reason
        try:
            fields["moved_to"] = str(self._store.set_aside(folder, reason))
        except OSError as exc:
            fields["set_aside_error"] = _describe(exc)
        if bug is not None:
            log.bug(logger, event, bug, folder=str(folder), **fields)
        else:
            log.event(logger, logging.ERROR, event, folder=str(folder), **fields)

    def _resume(self, md: VolumeMetadata) -> None:
        """Re-validate the record's target exactly as publish does, mount it again if the
        mount is gone, then start the volume; raises when the record cannot be resumed."""
        try:
            target = open_target(self._kubelet_dir, md.target_path, field="metadata target_path")
        except TargetParentMissing:
            # The pod's folder is gone: the kubelet tore the pod down while we were away.
            self._store.remove(md.volume_id)
            log.event(logger, logging.INFO, "resume_pod_gone", volume_id=md.volume_id)
            return
        with target:
            context = md.spec.get("volume_context")
            if not isinstance(context, dict):
                raise MetadataError("metadata has no volume_context")
            spec = parse_volume_context(context, volume_mount_group=md.volume_mount_group)
            # Mount before starting the volume: if the mount fails, nothing of it runs that
            # could write into the folder once it is set aside.
            data = self._store.data_dir(md.volume_id)
            if not self._mounter.is_mounted(target, data):
                self._mounter.bind_readonly(data, target)
        entry = self._start(md, spec)
        log.event(
            logger,
            logging.INFO,
            "resumed_volume",
            volume_id=md.volume_id,
            pod=entry.volume.plan.pod,
        )

    def _start(
        self,
        md: VolumeMetadata,
        spec: VolumeSpec,
        *,
        selectors: tuple[Selector, ...] | None = None,
        first: FirstStream | None = None,
    ) -> Entry:
        nursery = self._serving()
        plan = VolumePlan(
            volume_id=md.volume_id,
            target_path=Path(md.target_path),
            data_dir=self._store.data_dir(md.volume_id),
            spec=spec,
            selectors=selectors or selectors_for(spec.pod, self._node_id),
            selinux_context=self._selinux_context,
            fsync=self._store.fsync,
        )
        volume = Volume(
            plan,
            self._agent,
            self._metrics,
            now=self._now,
            retry=self._retry,
            socket_server=self._socket_server,
            rewrites=self._rewrites,
            first=first,
        )
        entry = self._entries[md.volume_id] = Entry(md, volume)
        self._metrics.volumes_published.set(len(self._entries))
        nursery.start_soon(volume.run)
        return entry

    def _serving(self) -> trio.Nursery:
        if self._nursery is None:
            raise PublishFailed(
                "unavailable",
                "the driver is not serving volumes (it is starting or shutting down); the "
                "kubelet retries",
            )
        return self._nursery

    # Publish / unpublish --------------------------------------------------

    @asynccontextmanager
    async def _locked(self, volume_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(volume_id, (trio.Lock(), 0))
        self._locks[volume_id] = (lock, users + 1)
        try:
            try:
                lock.acquire_nowait()  # free (the usual case): no turn lost waiting for it
            except trio.WouldBlock:
                await lock.acquire()
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[volume_id]
            if users == 1:
                del self._locks[volume_id]
            else:
                self._locks[volume_id] = (lock, users - 1)

    async def publish(self, req: PublishRequest, trace: PublishTrace | None = None) -> None:
        """Return once the volume's files are complete and mounted at the target.

        On any failure (including cancellation of the call) everything this call created is
        removed again: the agent stream, the files, the mount. ``trace`` gets the phases of a
        publish that creates the volume (see :mod:`.trace`).
        """
        trace = trace or PublishTrace()
        self._rewrites.publish_started()
        try:
            await self._publish(req, trace)
        finally:
            self._rewrites.publish_ended()

    async def _publish(self, req: PublishRequest, trace: PublishTrace) -> None:
        async with self._locked(req.volume_id):
            known = self._entries.get(req.volume_id)
            if known is not None:
                self._republish(req, known)
                return
            trace.mark("validate")
            # The request leaves first: the agent answers while the target is checked, the
            # metadata written and the volume made (nothing is on disk before the metadata).
            self._serving()
            selectors = selectors_for(req.spec.pod, self._node_id)
            first = await FirstStream.open(self._agent, selectors)
            trace.mark("subscribe")
            try:
                # Checked and held from here on: the wait below cannot redirect the mount.
                with open_target(self._kubelet_dir, req.target_path) as target:
                    await self._create(req, target, selectors, first, trace)
            except BaseException:
                await first.aclose()  # unless a volume took it (a failed one is stopped)
                raise
            finally:
                trace.close()

    async def _create(
        self,
        req: PublishRequest,
        target: TargetDir,
        selectors: tuple[Selector, ...],
        first: FirstStream,
        trace: PublishTrace,
    ) -> None:
        """The new volume of a publish, from its metadata to its mount; on any failure
        (cancellation included) everything of it is removed again."""
        md = VolumeMetadata(
            volume_id=req.volume_id,
            target_path=str(req.target_path),
            spec={"volume_context": dict(req.volume_context)},
            volume_mount_group=req.volume_mount_group,
            node_id=self._node_id,
            created_at=self._now(),
        )
        mounted = False
        entry: Entry | None = None
        try:
            self._store.remove(req.volume_id)
            self._store.write(md)
            trace.mark("metadata")
            entry = self._start(md, req.spec, selectors=selectors, first=first)
            entry.volume.trace = trace
            with trio.move_on_after(self._publish_timeout):
                # The first answer and the first files in this task.
                await entry.volume.first_svid()
                if not _settled(entry.volume.state.value):
                    # After a failure only: once settled, wait_value would still give up a
                    # turn (trio.sleep(0)) between the files and the mount.
                    await entry.volume.state.wait_value(_settled)
            state = entry.volume.state.value
            if not state.ready:
                raise publish_failure(
                    state,
                    f"within {self._publish_timeout:g}s",
                    agent_ready=self._agent.status.value.ready,
                )
            self._mounter.bind_readonly(entry.volume.plan.data_dir, target)
            mounted = True
            trace.mark("mount")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(req.volume_id, req.target_path if mounted else None)
            raise
        finally:
            if entry is not None:
                entry.volume.trace = None

    def _republish(self, req: PublishRequest, entry: Entry) -> None:
        if not req.same_as(entry.metadata):
            raise AlreadyExists(
                f"volume {req.volume_id} is already published at {entry.target} with other "
                "parameters; unpublish it first"
            )
        # Resumed files from a previous driver are complete (the writer only ever points
        # ..data at a whole generation): the volume is published, whatever the agent does now.
        volume = entry.volume
        resumed = (volume.plan.data_dir / DATA_LINK).is_dir()
        state = volume.state.value
        if state.written is None and not resumed:
            raise publish_failure(state, "yet", agent_ready=self._agent.status.value.ready)
        with open_target(self._kubelet_dir, req.target_path) as target:
            if not self._mounter.is_mounted(target, volume.plan.data_dir):
                self._mounter.bind_readonly(volume.plan.data_dir, target)

    async def unpublish(self, volume_id: str, target_path: Path) -> None:
        """Idempotent: succeeds for unknown volumes, unmounted targets and missing metadata.

        All or nothing: when the volume's folder could not be removed afterwards (its data
        mounted somewhere else, a mount inside it), StorageError is raised before anything
        is stopped or unmounted, and the kubelet's retry finds the volume as it was.
        """
        async with self._locked(volume_id):
            known = self._entries.get(volume_id)
            published_at = known.target if known is not None else target_path
            blocker = self._store.removal_blocker(volume_id, target=published_at)
            if blocker is not None:
                raise StorageError(errno.EBUSY, blocker)
            if known is not None and known.target != target_path:
                log.event(
                    logger,
                    logging.WARNING,
                    "unpublish_other_target",
                    volume_id=volume_id,
                    published_at=str(known.target),
                    requested=str(target_path),
                )
                await self._teardown(volume_id, known.target)
            await self._teardown(volume_id, target_path)
            self._metrics.unpublish_total.inc()

    async def _teardown(self, volume_id: str, target: Path | None) -> None:
        """Stop the volume's tasks, then unmount, then delete its folder (in that order).

        The folder is deleted only once every task of the volume has exited; if this call
        is cancelled while they stop, the volume stays registered and the next call for the
        same ID waits for them again.
        """
        entry = self._entries.get(volume_id)
        if entry is not None:
            await entry.volume.stop()
            if self._entries.get(volume_id) is entry:
                del self._entries[volume_id]
            self._metrics.volumes_published.set(len(self._entries))
        if target is not None:
            self._unmount(volume_id, target)
        self._store.remove(volume_id)

    def _unmount(self, volume_id: str, target: Path) -> None:
        """Remove the volume's own mount at ``target`` (never another one) and the folder."""
        try:
            held = open_target(self._kubelet_dir, target)
        except TargetParentMissing:
            return  # the pod's folder is gone: nothing can be mounted there
        except InvalidArgument as exc:
            # Not safe to follow (a symlink now, or outside the kubelet folder): leave it. If
            # the volume's data is still mounted there, removing the folder refuses below.
            log.event(
                logger, logging.WARNING, "unmount_refused", volume_id=volume_id, error=str(exc)
            )
            return
        with held:
            result = self._mounter.unmount(held, self._store.data_dir(volume_id))
            if result.foreign or result.ours_left:
                log.event(
                    logger,
                    logging.WARNING,
                    "unmount_left_foreign_mount",
                    volume_id=volume_id,
                    target=str(target),
                    ours_left=result.ours_left,
                )
            if result.clean:
                held.remove()

    # Queries -------------------------------------------------------------

    def get(self, volume_id: str) -> Volume | None:
        entry = self._entries.get(volume_id)
        return entry.volume if entry is not None else None

    def stats(self, volume_id: str, volume_path: Path) -> VolumeStats:
        entry = self._entries.get(volume_id)
        if entry is None:
            raise NotFound(f"volume {volume_id} is not published on this node")
        if entry.target != volume_path:
            raise NotFound(f"volume {volume_id} is published at {entry.target}, not {volume_path}")
        data_dir = entry.volume.plan.data_dir
        used = 0
        inodes = 0
        for item in os.scandir(data_dir):
            inodes += 1
            if item.is_dir(follow_symlinks=False):
                for inner in os.scandir(item.path):
                    inodes += 1
                    used += inner.stat(follow_symlinks=False).st_size
        fs = os.statvfs(data_dir)
        abnormal, message = entry.volume.condition()
        return VolumeStats(
            used_bytes=used,
            total_bytes=fs.f_blocks * fs.f_frsize,
            available_bytes=fs.f_bavail * fs.f_frsize,
            used_inodes=inodes,
            total_inodes=fs.f_files,
            available_inodes=fs.f_favail,
            abnormal=abnormal,
            message=message,
        )

    def __len__(self) -> int:
        return len(self._entries)

    def _expiries(self) -> list[float]:
        return [e.volume.expires_at for e in self._entries.values() if e.volume.expires_at]


async def _changed(value: Observable[object], seen: object) -> object:
    return await value.wait_value(lambda current: current is not seen)


def _settled(state: VolumeState) -> bool:
    return state.settled


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SpireCSIError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


__all__ = ["Agent", "Entry", "PublishRequest", "Registry", "VolumeStats", "publish_failure"]
