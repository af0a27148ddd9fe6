"""The driver as a state machine: kubelet calls, agent changes, crashes and damaged state.

Hypothesis drives the real daemon (in-process on its real unix socket, or as its own process
for ``kill -9``), the dev agent on another socket, and real read-only bind mounts, through
random sequences of:

- the kubelet: publish (one pod, or several at once; valid and refused attribute sets), the
  same publish again, a conflicting one, unpublish (known, unknown, twice), retries after a
  failed call;
- the agent: rotation, a new CA, an extra root in the bundle, an entry revoked and restored
  (a pod that matches no entry at publish time), an identity's SVIDs sent malformed (a key
  that is not a key) and then whole again, the agent stopped and started again (same CA; a
  new agent with a new CA; a new agent that does not list the driver as a delegate);
- the disk: a volume's data folder turned read-only under the driver, and repaired;
- the driver: a graceful stop, a crash (its root scope cancelled after a random number of
  checkpoints, while a publish, an unpublish or a rotation is in flight), ``kill -9`` of a
  driver process, a restart on the same state directory;
- the state directory while no driver runs: corrupt or truncated metadata, a half-written
  generation of files, orphan folders, a publish interrupted after its metadata.

After every step, once things have settled (bounded wait), the model and the machine agree.
What the driver guarantees, and therefore what is asserted:

- a publish that answered OK survives any crash; an unpublish that answered OK is final:
  that volume's folder, mount and target never come back, and nothing writes there again;
- a publish or unpublish interrupted by a crash is all or nothing after the restart: the
  volume is either held (folder, mount, agent stream) or entirely gone; the kubelet retries;
- the mounted targets are exactly the volumes held, plus volumes whose metadata was set
  aside as corrupt (they stay mounted until the kubelet unpublishes them);
- every kubelet call gets the answer a kubelet can act on: OK, INVALID_ARGUMENT naming the
  field, ALREADY_EXISTS, FAILED_PRECONDITION (no entry), UNAVAILABLE (agent or driver down)
  or PERMISSION_DENIED (not a delegate), and a failed publish leaves nothing behind;
- a published volume's files always parse and its key matches its certificate (also while
  no driver or no agent runs, while the agent sends malformed data and while its folder is
  read-only); with the agent up, the entry neither revoked nor malformed and the folder
  writable, the SVID is the one the agent currently issues for the pod and the bundle is the
  agent's current one;
- NodeGetVolumeStats reports such a volume as normal, and one whose registration entry was
  revoked as abnormal;
- the agent's open SVID streams are exactly one per held volume (no leaked stream), and no
  stream at all while no driver runs;
- the state directory holds a folder only for a held volume; no private key anywhere in it
  is readable by others; what was set aside in ``.corrupt`` never changes.

The ``ci`` hypothesis profile keeps this to about 20 seconds and leaves out the rules whose
ground the fast machine (``tests/test_state_machine_fast.py``: the same driver in virtual
time, thousands of steps) covers without real mounts, processes or sockets: refused
attributes, conflicting publishes, unpublishing twice or unknown volumes, CA and bundle
changes. What is left is what only this machine shows: real bind mounts, ``kill -9`` and
crashes at any checkpoint, the daemon on its real sockets, a real agent process stopped and
replaced, damaged state directories. ``HYPOTHESIS_PROFILE=long`` (``just soak``) runs every
rule for as long as you like. A failure prints the shrunk sequence as
Python calls on :class:`DriverMachine`; keep it as a test in ``tests/regressions/``.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import trio
from cryptography import x509
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.harness import Node, mounts_under, open_node, read_identity
from trio_spirecsi import daemon
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi.csi.client import Pod, publish_request, volume_context
from trio_spirecsi.daemon import Daemon
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.grpc import RpcError, StatusCode
from trio_spirecsi.spire.responses import split_der
from trio_spirecsi.storage.metadata import MetadataStore, VolumeMetadata, folder_name

T = TypeVar("T")

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
pytestmark = [pytest.mark.timeout(0 if LONG else 600), pytest.mark.usefixtures("private_mount_ns")]

TRUST_DOMAIN = "example.org"
NAMESPACES = ("default", "shop")
ACCOUNTS = ("web", "db")
POD_NAMES = ("a", "b")
PUBLISH_TIMEOUT = 1.0
"""The driver's publish timeout here: a publish that cannot succeed costs this long."""
SETTLE_TIMEOUT = 60.0
"""Longest wait for the system to settle; above the agent client's 30 s maximum backoff."""
RESTART = st.sampled_from(["stay-down", "in-process", "own-process"])
"""After stopping the driver: leave it down for the next steps, or start a new one."""
AGENT_KINDS = ("same", "new-ca", "refusing")
FS_GROUP = 4321
PRIVATE_KEY_MARK = b"PRIVATE KEY-----"


def note(value: str) -> None:
    """Count an outcome in hypothesis' statistics (when run by hypothesis, not replayed)."""
    if currently_in_test_context():
        event(value)


def identity_of(namespace: str, account: str) -> str:
    """The SPIFFE ID the dev agent's default template gives a pod."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


# Attribute sets ---------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeSet:
    """What a pod asks for, and the field INVALID_ARGUMENT must name if it is refused."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    fs_group: str = ""
    refused_field: str | None = None

    def name(self, attribute: str, default: str) -> str:
        return self.attributes.get(f"csi.spire.io/{attribute}", default)

    @property
    def files(self) -> tuple[str, str, str]:
        """(svid, key, bundle) file names."""
        return (
            self.name("svid-file", "svid.pem"),
            self.name("svid-key-file", "svid_key.pem"),
            self.name("bundle-file", "svid_bundle.pem"),
        )

    @property
    def gid(self) -> int | None:
        group = self.fs_group or self.attributes.get("csi.spire.io/fs-group", "")
        return int(group) if group else None

    @property
    def key_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640


ATTRIBUTE_SETS: dict[str, AttributeSet] = {
    "defaults": AttributeSet(),
    "renamed": AttributeSet(
        {
            "csi.spire.io/svid-file": "tls.crt",
            "csi.spire.io/svid-key-file": "tls.key",
            "csi.spire.io/bundle-file": "ca.crt",
        }
    ),
    "fs-group": AttributeSet(fs_group=str(FS_GROUP)),
    "fs-group-attribute": AttributeSet(
        {"csi.spire.io/fs-group": str(FS_GROUP), "csi.spire.io/cert-file-mode": "0640"}
    ),
    "escaping-name": AttributeSet(
        {"csi.spire.io/svid-file": "../escape.pem"}, refused_field="csi.spire.io/svid-file"
    ),
    "hidden-key": AttributeSet(
        {"csi.spire.io/svid-key-file": ".key"}, refused_field="csi.spire.io/svid-key-file"
    ),
    "shared-name": AttributeSet(
        {"csi.spire.io/bundle-file": "svid.pem"}, refused_field="csi.spire.io/bundle-file"
    ),
    "world-readable-key": AttributeSet(
        {"csi.spire.io/key-file-mode": "0644"}, refused_field="csi.spire.io/key-file-mode"
    ),
    "misspelt": AttributeSet(
        {"csi.spire.io/svid-flie": "x.pem"}, refused_field="csi.spire.io/svid-flie"
    ),
    "not-ephemeral": AttributeSet(
        {"csi.storage.k8s.io/ephemeral": "false"}, refused_field="csi.storage.k8s.io/ephemeral"
    ),
    "named-group": AttributeSet(fs_group="staff", refused_field="volume_mount_group"),
}
VALID_SETS = tuple(k for k, v in ATTRIBUTE_SETS.items() if v.refused_field is None)
REFUSED_SETS = tuple(k for k, v in ATTRIBUTE_SETS.items() if v.refused_field)


# The model --------------------------------------------------------------------------

Status = Literal["published", "publish-uncertain", "unpublish-uncertain", "lost", "failed"]
"""``published``: the kubelet got OK. ``publish-uncertain``: a crash interrupted the publish
(present or gone after the restart; the kubelet retries). ``unpublish-uncertain``: a crash
interrupted the unpublish (the kubelet retries it). ``lost``: its metadata was corrupted, the
driver set it aside; the mount stays until the kubelet unpublishes. ``failed``: the kubelet
knows the publish failed; nothing of it may exist until it retries."""


@dataclass
class Volume:
    volume_id: str
    pod: Pod
    target: Path
    attrs: str
    status: Status = "published"

    @property
    def spiffe_id(self) -> str:
        return identity_of(self.pod.namespace, self.pod.service_account)

    @property
    def attribute_set(self) -> AttributeSet:
        return ATTRIBUTE_SETS[self.attrs]

    def selectors(self, node_id: str) -> frozenset[tuple[str, str]]:
        return frozenset(
            {
                ("k8s", f"ns:{self.pod.namespace}"),
                ("k8s", f"sa:{self.pod.service_account}"),
                ("k8s", f"pod-uid:{self.pod.uid}"),
                ("k8s", f"pod-name:{self.pod.name}"),
                ("k8s", f"node-name:{node_id}"),
            }
        )


@dataclass
class Driver:
    """The running driver: in this process (``scope``) or its own process (``proc``)."""

    scope: trio.CancelScope | None = None
    done: trio.Event | None = None
    handles: Daemon | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


class Failure(AssertionError):
    pass


# Trio in a background thread ----------------------------------------------------------


class TrioThread:
    """One Trio run in a thread for the life of one example; rules call into it.

    Its nursery holds the node (agent, driver, CSI channel) across the steps.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=self._main, name="state-machine-trio", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise Failure(f"the Trio thread did not start: {self._error!r}")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._error is not None:
            raise Failure("the Trio thread died") from self._error
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        if self._error is not None:
            raise Failure("the Trio thread failed") from self._error


# The machine ------------------------------------------------------------------------


class DriverMachine(RuleBasedStateMachine):
    """A node: kubelet, SPIRE agent and the driver, with a model of what the kubelet knows."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="trio-spirecsi-sm-"))
        self.loop = TrioThread()
        self._close_node = trio.Event()
        self._node_closed = trio.Event()
        self.node: Node = self.loop.call(self._open_node)
        self.driver: Driver | None = None
        self.driver_errors: list[BaseException] = []
        self.agent_up = True
        self.agent_refuses = False
        self.revoked: set[str] = set()
        self.garbled: set[str] = set()
        self.readonly: set[str] = set()
        """Volumes whose data folder is a read-only mount (a disk fault), by volume ID."""
        self.volumes: dict[str, Volume] = {}
        self.gone: dict[str, Volume] = {}
        self.aside: dict[str, tuple[int, int, int]] = {}
        self.serial = 0

    # Plumbing ---------------------------------------------------------------------

    async def _open_node(self) -> Node:
        assert self.loop.nursery is not None
        node: Node = await self.loop.nursery.start(self._hold_node)
        return node

    async def _hold_node(self, task_status: trio.TaskStatus[Node]) -> None:
        try:
            async with open_node(self.root, DevAgent(TRUST_DOMAIN)) as node:
                task_status.started(node)
                await self._close_node.wait()
        finally:
            self._node_closed.set()

    def teardown(self) -> None:
        try:
            if self.loop.nursery is not None:
                self.loop.call(self._shutdown)
        finally:
            self.loop.close()
            shutil.rmtree(self.root)

    async def _shutdown(self) -> None:
        self._clear_faults()
        await self._stop_driver(graceful=True, check=False)
        self._close_node.set()
        with trio.fail_after(60):
            await self._node_closed.wait()

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    @property
    def driver_up(self) -> bool:
        return self.driver is not None

    def _new_volume(self, namespace: str, account: str, name: str, attrs: str, odd: bool) -> Volume:
        n = self._next()
        pod = Pod(name, namespace, f"00000000-0000-4000-8000-{n:012d}", account)
        # The kubelet's ids are csi-<sha256>; odd ones exercise the hashed folder names.
        volume_id = f"volume {n}/odd" if odd else f"csi-{n:064x}"
        return Volume(volume_id, pod, self.node.target(pod), attrs)

    def _request(
        self, volume: Volume, *, target: Path | None = None, attrs: str | None = None
    ) -> csi.NodePublishVolumeRequest:
        chosen = ATTRIBUTE_SETS[attrs or volume.attrs]
        return publish_request(
            volume.volume_id,
            str(target or volume.target),
            volume_context(volume.pod, chosen.attributes),
            fs_group=chosen.fs_group,
        )

    async def _call(self, call: Callable[[], Awaitable[None]]) -> RpcError | None:
        """A kubelet call: None for OK, else the error status."""
        try:
            await call()
        except RpcError as exc:
            return exc
        return None

    def publish(self, volume: Volume, **changes: Any) -> RpcError | None:
        request = self._request(volume, **changes)
        return self.loop.call(self._call, functools.partial(self.node.client.publish, request))

    def unpublish(self, volume: Volume) -> RpcError | None:
        client = self.node.client
        call = functools.partial(client.unpublish, volume.volume_id, str(volume.target))
        return self.loop.call(self._call, call)

    @property
    def entitled_agent(self) -> bool:
        """An agent that serves the driver is up."""
        return self.agent_up and not self.agent_refuses

    def entitled(self, volume: Volume) -> bool:
        """The agent issues this volume's identity, and sends it whole."""
        return (
            self.entitled_agent
            and volume.spiffe_id not in self.revoked
            and volume.spiffe_id not in self.garbled
        )

    def current(self, volume: Volume) -> bool:
        """The volume's files must hold what the agent issues now."""
        return self.driver_up and self.entitled(volume) and volume.volume_id not in self.readonly

    def _pick(self, pick: int, statuses: tuple[Status, ...]) -> Volume | None:
        """One of the volumes in ``statuses``, or None.

        Rules that need such a volume do nothing without one instead of having a precondition:
        which volumes exist can depend on where a crash interrupted a call, and hypothesis
        needs the enabled rules to depend only on what it drew.
        """
        chosen = sorted(
            (v for v in self.volumes.values() if v.status in statuses), key=lambda v: v.volume_id
        )
        return chosen[pick % len(chosen)] if chosen else None

    def _expect_unavailable_driver(self, error: RpcError | None, what: str) -> None:
        if error is None or error.code != StatusCode.UNAVAILABLE:
            raise Failure(f"{what} with no driver running answered {error!r}")

    # Driver lifecycle ---------------------------------------------------------------

    async def _start_in_process(self) -> None:
        scope = trio.CancelScope()
        done = trio.Event()
        node = self.node

        async def run(task_status: trio.TaskStatus[Daemon]) -> None:
            try:
                with scope:
                    settings_ = node.settings(publish_timeout=PUBLISH_TIMEOUT)
                    await daemon.run(settings_, task_status=task_status)
            except Exception as exc:
                self.driver_errors.append(exc)
            finally:
                done.set()

        handles: Daemon = await node.nursery.start(run)
        self.driver = Driver(scope=scope, done=done, handles=handles)

    async def _start_process(self) -> None:
        node = self.node
        log = self.root / f"driver-{self._next()}.log"
        argv = node.serve_argv(**{"publish-timeout": f"{PUBLISH_TIMEOUT:g}"})
        with open(log, "wb") as sink:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=sink)
        node.processes.append(proc)
        self.driver = Driver(proc=proc, log=log)
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                if proc.poll() is not None:
                    raise Failure(f"driver exited with {proc.returncode}: {self._log_tail()}")
                try:
                    if await node.client.probe():
                        return
                except RpcError:
                    pass
                await trio.sleep(0.02)

    async def _stop_driver(self, *, graceful: bool, check: bool = True) -> None:
        driver, self.driver = self.driver, None
        if driver is None:
            return
        if driver.scope is not None and driver.done is not None:
            driver.scope.cancel()
            with trio.fail_after(SETTLE_TIMEOUT):
                await driver.done.wait()
        elif driver.proc is not None:
            if graceful:
                driver.proc.send_signal(signal.SIGTERM)
            else:
                driver.proc.kill()
            code = await trio.to_thread.run_sync(driver.proc.wait, SETTLE_TIMEOUT)
            if graceful and check and code != 0:
                raise Failure(f"driver exited with {code} on SIGTERM: {self._log_tail(driver)}")

    def _log_tail(self, driver: Driver | None = None) -> str:
        driver = driver or self.driver
        if driver is None or driver.log is None:
            return ""
        return driver.log.read_bytes()[-4000:].decode(errors="replace")

    @initialize()
    def start(self) -> None:
        self.loop.call(self._start_in_process)

    @precondition(lambda self: not self.driver_up)
    @rule(own_process=st.booleans())
    def start_driver(self, own_process: bool) -> None:
        self.loop.call(self._start_process if own_process else self._start_in_process)

    def _then(self, restart: str) -> None:
        if restart != "stay-down":
            self.start_driver(own_process=restart == "own-process")

    @precondition(lambda self: self.driver_up)
    @rule(restart=RESTART)
    def stop_driver(self, restart: str) -> None:
        """SIGTERM: stop serving, leave every volume mounted; maybe start a new driver."""
        self.loop.call(lambda: self._stop_driver(graceful=True))
        self._then(restart)

    @precondition(lambda self: self.driver is not None and self.driver.scope is not None)
    @rule(
        inflight=st.sampled_from(["nothing", "publish", "unpublish", "rotation"]),
        checkpoints=st.sampled_from([0, 1, 3, 10, 30, 100]),
        sleep=st.sampled_from([0.0, 0.001, 0.01, 0.05]),
        pick=st.integers(0, 7),
        restart=RESTART,
    )
    def crash_driver(
        self, inflight: str, checkpoints: int, sleep: float, pick: int, restart: str
    ) -> None:
        """Cancel the in-process driver's root scope at some point of a call in flight."""

        async def crash() -> None:
            for _ in range(checkpoints):
                await trio.lowlevel.checkpoint()
            await trio.sleep(sleep)
            await self._stop_driver(graceful=False)

        self._interrupt(inflight, pick, crash)
        self._then(restart)

    @precondition(lambda self: self.driver is not None and self.driver.proc is not None)
    @rule(
        inflight=st.sampled_from(["nothing", "publish", "unpublish", "rotation"]),
        delay=st.sampled_from([0.0, 0.002, 0.01, 0.03, 0.1]),
        pick=st.integers(0, 7),
        restart=RESTART,
    )
    def kill_driver(self, inflight: str, delay: float, pick: int, restart: str) -> None:
        """kill -9 the driver process while a call is in flight."""

        async def kill() -> None:
            await trio.sleep(delay)
            await self._stop_driver(graceful=False)

        self._interrupt(inflight, pick, kill)
        self._then(restart)

    def _interrupt(self, inflight: str, pick: int, stop: Callable[[], Awaitable[None]]) -> None:
        volume: Volume | None = None
        call: Callable[[], Awaitable[None]] | None = None
        client = self.node.client
        if inflight == "publish":
            volume = self._new_volume(
                NAMESPACES[pick % 2], ACCOUNTS[pick // 2 % 2], "a", "defaults", False
            )
            request = self._request(volume)
            call = functools.partial(client.publish, request)
        elif inflight == "unpublish":
            volume = self._pick(pick, ("published",))
            if volume is not None:
                call = functools.partial(client.unpublish, volume.volume_id, str(volume.target))
        elif inflight == "rotation":
            call = self._rotate_now
        outcome: list[RpcError | None] = []

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                if call is not None:

                    async def kubelet() -> None:
                        assert call is not None
                        outcome.append(await self._call(call))

                    nursery.start_soon(kubelet)
                await stop()

        self.loop.call(run)
        if volume is None:
            return
        error = outcome[0]
        note(f"{inflight} interrupted: {'answered OK' if error is None else 'cut off'}")
        if inflight == "publish":
            volume.status = "published" if error is None else "publish-uncertain"
            self.volumes[volume.volume_id] = volume
        elif error is None:
            self._unpublished(volume)
        else:
            volume.status = "unpublish-uncertain"

    # Kubelet ------------------------------------------------------------------------

    @rule(
        attrs=st.sampled_from(VALID_SETS),
        namespace=st.sampled_from(NAMESPACES),
        account=st.sampled_from(ACCOUNTS),
        name=st.sampled_from(POD_NAMES),
        odd_id=st.booleans(),
    )
    def publish_new(
        self, attrs: str, namespace: str, account: str, name: str, odd_id: bool
    ) -> None:
        volume = self._new_volume(namespace, account, name, attrs, odd_id)
        self._published_new(volume, self.publish(volume))

    @rule(
        count=st.integers(2, 4),
        attrs=st.sampled_from(VALID_SETS),
        namespace=st.sampled_from(NAMESPACES),
        account=st.sampled_from(ACCOUNTS),
    )
    def publish_many(self, count: int, attrs: str, namespace: str, account: str) -> None:
        """Several pods of one workload at once: the kubelet publishes concurrently."""
        volumes = [
            self._new_volume(namespace, account, POD_NAMES[n % 2], attrs, False)
            for n in range(count)
        ]
        client = self.node.client
        errors: dict[str, RpcError | None] = {}

        async def one(volume: Volume) -> None:
            call = functools.partial(client.publish, self._request(volume))
            errors[volume.volume_id] = await self._call(call)

        async def publish_all() -> None:
            async with trio.open_nursery() as nursery:
                for volume in volumes:
                    nursery.start_soon(one, volume)

        self.loop.call(publish_all)
        for volume in volumes:
            self._published_new(volume, errors[volume.volume_id])

    def _published_new(self, volume: Volume, error: RpcError | None) -> None:
        note(f"publish: {error.code.name if error else 'OK'}")
        if not self.driver_up:
            self._expect_unavailable_driver(error, "publish")
        else:
            self._expect_publish_outcome(volume, error)
        if error is None:
            self.volumes[volume.volume_id] = volume

    @precondition(lambda self: LONG)
    @rule(
        attrs=st.sampled_from(REFUSED_SETS),
        namespace=st.sampled_from(NAMESPACES),
        account=st.sampled_from(ACCOUNTS),
    )
    def publish_refused(self, attrs: str, namespace: str, account: str) -> None:
        """Attributes the driver must refuse, naming the field, before anything else."""
        volume = self._new_volume(namespace, account, "a", attrs, False)
        error = self.publish(volume)
        refused = volume.attribute_set.refused_field
        if not self.driver_up:
            self._expect_unavailable_driver(error, "publish")
        elif error is None or error.code != StatusCode.INVALID_ARGUMENT:
            raise Failure(f"attributes {attrs!r} were not refused: {error!r}")
        elif refused is None or refused not in error.message:
            raise Failure(f"refusal does not name {refused}: {error.message}")

    def _expect_publish_outcome(self, volume: Volume, error: RpcError | None) -> None:
        if not self.agent_up:
            if error is None or error.code not in self._agent_down_codes():
                raise Failure(f"publish with the agent down answered {error!r}")
            if str(self.node.admin_socket) not in error.message:
                raise Failure(f"agent-down message does not name the socket: {error.message}")
        elif self.agent_refuses:
            if error is None or error.code != StatusCode.PERMISSION_DENIED:
                raise Failure(f"publish with an agent refusing the driver answered {error!r}")
            if "authorized_delegates" not in error.message:
                raise Failure(f"refusal message does not say what to fix: {error.message}")
        elif volume.spiffe_id in self.revoked:
            if error is None or error.code != StatusCode.FAILED_PRECONDITION:
                raise Failure(f"publish without a registration entry answered {error!r}")
            if "no registration entry matched" not in error.message:
                raise Failure(f"no-entry message does not say so: {error.message}")
        elif volume.spiffe_id in self.garbled:
            if error is None or error.code != StatusCode.FAILED_PRECONDITION:
                raise Failure(f"publish while the agent sends malformed SVIDs answered {error!r}")
            if "no usable SVID" not in error.message or "private key" not in error.message:
                raise Failure(f"bad-data message does not say what is wrong: {error.message}")
        elif error is not None:
            raise Failure(f"publish of {volume.volume_id} failed: {error!r}")

    def _agent_down_codes(self) -> set[StatusCode]:
        # The in-process driver is known to have noticed (the settle step waits for it); a
        # driver process may not have yet, and then reports a timeout instead.
        if self.driver is not None and self.driver.proc is not None:
            return {StatusCode.UNAVAILABLE, StatusCode.FAILED_PRECONDITION}
        return {StatusCode.UNAVAILABLE}

    @rule(pick=st.integers(0, 7))
    def publish_again(self, pick: int) -> None:
        """The same request again: OK, nothing duplicated (CSI idempotency)."""
        volume = self._pick(pick, ("published",))
        if volume is None:
            return
        error = self.publish(volume)
        if not self.driver_up:
            self._expect_unavailable_driver(error, "publish")
        elif error is not None:
            raise Failure(f"identical publish of {volume.volume_id} answered {error!r}")

    @precondition(lambda self: LONG and self.driver_up)
    @rule(pick=st.integers(0, 7), change=st.sampled_from(["attributes", "target"]))
    def publish_conflicting(self, pick: int, change: str) -> None:
        volume = self._pick(pick, ("published",))
        if volume is None:
            return
        if change == "target":
            error = self.publish(volume, target=self.node.target(volume.pod, "other"))
        else:
            other = "renamed" if volume.attrs != "renamed" else "defaults"
            error = self.publish(volume, attrs=other)
        if error is None or error.code != StatusCode.ALREADY_EXISTS:
            raise Failure(f"conflicting publish of {volume.volume_id} answered {error!r}")

    @rule(pick=st.integers(0, 7))
    def retry_publish(self, pick: int) -> None:
        """The kubelet retries a publish that failed or was cut off by a crash."""
        volume = self._pick(pick, ("publish-uncertain", "failed"))
        if volume is None:
            return
        error = self.publish(volume)
        if self.driver_up:
            note(f"retry_publish of {volume.status}: {error.code.name if error else 'OK'}")
        if not self.driver_up:
            self._expect_unavailable_driver(error, "publish")
            return
        if error is None:
            volume.status = "published"
            return
        if self.entitled(volume):
            raise Failure(f"retried publish of {volume.volume_id} failed: {error!r}")
        expected = (
            StatusCode.UNAVAILABLE,
            StatusCode.FAILED_PRECONDITION,
            StatusCode.PERMISSION_DENIED,
        )
        if error.code not in expected:
            raise Failure(f"retried publish of {volume.volume_id} answered {error!r}")

    @rule(pick=st.integers(0, 7))
    def unpublish_volume(self, pick: int) -> None:
        volume = self._pick(
            pick, ("published", "publish-uncertain", "unpublish-uncertain", "lost", "failed")
        )
        if volume is None:
            return
        error = self.unpublish(volume)
        if not self.driver_up:
            self._expect_unavailable_driver(error, "unpublish")
        elif volume.volume_id in self.readonly and self._held(volume):
            # Its folder cannot be deleted while the fault holds: INTERNAL with the reason
            # (the kubelet retries), never OK with the files left behind.
            if error is None or error.code != StatusCode.INTERNAL:
                raise Failure(f"unpublish of a volume with a read-only folder answered {error!r}")
        elif error is not None:
            raise Failure(f"unpublish of {volume.volume_id} answered {error!r}")
        else:
            self._unpublished(volume)

    def _unpublished(self, volume: Volume) -> None:
        del self.volumes[volume.volume_id]
        self.gone[volume.volume_id] = volume

    @precondition(lambda self: LONG and self.driver_up)
    @rule(pick=st.integers(0, 7))
    def unpublish_again(self, pick: int) -> None:
        if not self.gone:
            return
        volume = sorted(self.gone.values(), key=lambda v: v.volume_id)[pick % len(self.gone)]
        error = self.unpublish(volume)
        if error is not None:
            raise Failure(f"second unpublish of {volume.volume_id} answered {error!r}")

    @precondition(lambda self: LONG and self.driver_up)
    @rule()
    def unpublish_unknown(self) -> None:
        volume = self._new_volume("default", "web", "a", "defaults", False)
        error = self.unpublish(volume)
        if error is not None:
            raise Failure(f"unpublish of a volume never published answered {error!r}")
        self.gone[volume.volume_id] = volume

    # Agent --------------------------------------------------------------------------

    @rule()
    def rotate(self) -> None:
        self.loop.call(self._sync, self.node.agent.rotate)

    @precondition(lambda self: LONG)
    @rule(keep_old=st.booleans())
    def rotate_ca(self, keep_old: bool) -> None:
        self.loop.call(self._sync, lambda: self.node.agent.rotate_ca(keep_old=keep_old))

    @precondition(lambda self: LONG)
    @rule()
    def add_bundle_root(self) -> None:
        self.loop.call(self._sync, self.node.agent.add_bundle_ca)

    @rule(namespace=st.sampled_from(NAMESPACES), account=st.sampled_from(ACCOUNTS))
    def revoke(self, namespace: str, account: str) -> None:
        spiffe_id = identity_of(namespace, account)
        self.loop.call(self._sync, lambda: self.node.agent.revoke(spiffe_id))
        self.revoked.add(spiffe_id)

    @precondition(lambda self: bool(self.revoked))
    @rule(pick=st.integers(0, 7))
    def restore(self, pick: int) -> None:
        spiffe_id = sorted(self.revoked)[pick % len(self.revoked)]
        self.loop.call(self._sync, lambda: self.node.agent.restore(spiffe_id))
        self.revoked.discard(spiffe_id)

    @precondition(lambda self: self.agent_up)
    @rule(restart=st.sampled_from(["stay-down", *AGENT_KINDS]))
    def stop_agent(self, restart: str) -> None:
        self.loop.call(self.node.stop_agent)
        self.agent_up = False
        if restart != "stay-down":
            self.start_agent(restart)

    @precondition(lambda self: not self.agent_up)
    @rule(kind=st.sampled_from(AGENT_KINDS))
    def start_agent(self, kind: str) -> None:
        """The same agent again, a new one with a new CA, or a new one whose configuration
        does not list the driver as an authorized delegate."""
        if kind == "same":
            self.loop.call(self.node.start_agent)
        else:
            refused = {os.getuid() + 4242} if kind == "refusing" else None
            agent = DevAgent(TRUST_DOMAIN, authorized_uids=refused)
            self.loop.call(self.node.start_agent, agent)
            self.revoked.clear()
            self.garbled.clear()
            self.agent_refuses = kind == "refusing"
        self.agent_up = True

    @rule(namespace=st.sampled_from(NAMESPACES), account=st.sampled_from(ACCOUNTS))
    def garble(self, namespace: str, account: str) -> None:
        """The agent sends this identity's SVIDs with a key that is not a key."""
        spiffe_id = identity_of(namespace, account)
        self.loop.call(self._sync, lambda: self.node.agent.garble(spiffe_id))
        self.garbled.add(spiffe_id)

    @precondition(lambda self: bool(self.garbled))
    @rule(pick=st.integers(0, 7))
    def ungarble(self, pick: int) -> None:
        spiffe_id = sorted(self.garbled)[pick % len(self.garbled)]
        self.loop.call(self._sync, lambda: self.node.agent.ungarble(spiffe_id))
        self.garbled.discard(spiffe_id)

    async def _sync(self, fn: Callable[[], object]) -> None:
        fn()

    # The disk ---------------------------------------------------------------------------

    @rule(pick=st.integers(0, 7))
    def readonly_folder(self, pick: int) -> None:
        """The volume's data folder turns read-only (a remount, a failing disk): rotations
        cannot land; the last files must stay whole and readable."""
        volume = self._pick(pick, ("published",))
        if volume is None or volume.volume_id in self.readonly:
            return
        data = self.node.state_dir / folder_name(volume.volume_id) / "data"
        subprocess.run(["mount", "--bind", str(data), str(data)], check=True)
        self.readonly.add(volume.volume_id)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(data), str(data)], check=True)

    @precondition(lambda self: bool(self.readonly))
    @rule()
    def repair_folders(self) -> None:
        self._clear_faults()

    def _clear_faults(self) -> None:
        for volume_id in sorted(self.readonly):
            data = self.node.state_dir / folder_name(volume_id) / "data"
            subprocess.run(["umount", str(data)], check=True)
        self.readonly.clear()

    async def _rotate_now(self) -> None:
        self.node.agent.rotate()

    # The state directory while no driver runs -----------------------------------------

    @precondition(lambda self: not self.driver_up)
    @rule(pick=st.integers(0, 7), how=st.sampled_from(["truncate", "garbage", "empty", "other-id"]))
    def corrupt_metadata(self, pick: int, how: str) -> None:
        volume = self._pick(pick, ("published",))
        if volume is None or volume.volume_id in self.readonly:
            return
        path = self.node.state_dir / folder_name(volume.volume_id) / "metadata.json"
        text = path.read_bytes()
        if how == "truncate":
            path.write_bytes(text[: len(text.rstrip()) // 2])
        elif how == "garbage":
            path.write_bytes(b"\x00\xff{not json")
        elif how == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(text.replace(volume.volume_id.encode(), b"csi-somebody-else"))
        volume.status = "lost"

    @precondition(lambda self: not self.driver_up)
    @rule(pick=st.integers(0, 7))
    def half_written_generation(self, pick: int) -> None:
        """What a writer killed mid-write leaves: a partial generation and a temp link."""
        volume = self._pick(pick, ("published",))
        if volume is None or volume.volume_id in self.readonly:
            return
        data = self.node.state_dir / folder_name(volume.volume_id) / "data"
        partial = data / f"..2000_01_01_00_00_00.{self._next()}"
        partial.mkdir(mode=0o700)
        (partial / volume.attribute_set.files[0]).write_bytes(b"-----BEGIN CERT")
        (data / "..data_tmp").unlink(missing_ok=True)
        os.symlink(partial.name, data / "..data_tmp")

    @precondition(lambda self: not self.driver_up)
    @rule(kind=st.sampled_from(["empty", "data-only", "metadata-temp"]))
    def orphan_folder(self, kind: str) -> None:
        """A folder without metadata: a crash mid-publish before the record was renamed."""
        folder = self.node.state_dir / f"csi-{self._next():064x}"
        folder.mkdir(mode=0o700)
        if kind == "data-only":
            (folder / "data" / "..2000_01_01_00_00_00.1").mkdir(parents=True)
            (folder / "data" / "..2000_01_01_00_00_00.1" / "svid_key.pem").write_bytes(b"")
        elif kind == "metadata-temp":
            (folder / ".metadata.json.0123456789abcdef.tmp").write_bytes(b'{"volume_id": ')

    @precondition(lambda self: not self.driver_up)
    @rule(
        namespace=st.sampled_from(NAMESPACES),
        account=st.sampled_from(ACCOUNTS),
        stage=st.sampled_from(["metadata", "partial-data"]),
    )
    def interrupted_publish(self, namespace: str, account: str, stage: str) -> None:
        """A publish killed after its metadata was written, before its files were complete."""
        volume = self._new_volume(namespace, account, "a", "defaults", False)
        store = MetadataStore(self.node.state_dir)
        store.write(
            VolumeMetadata(
                volume_id=volume.volume_id,
                target_path=str(volume.target),
                spec={"volume_context": volume_context(volume.pod)},
                volume_mount_group="",
                node_id=self.node.node_id,
                created_at=1.0,
            )
        )
        if stage == "partial-data":
            generation = store.data_dir(volume.volume_id) / "..2000_01_01_00_00_00.2"
            generation.mkdir(parents=True)
            (generation / "svid.pem").write_bytes(b"")
        volume.status = "publish-uncertain"
        self.volumes[volume.volume_id] = volume

    # Invariants ---------------------------------------------------------------------

    @invariant()
    def settled(self) -> None:
        """Safety now, then everything else within a bounded wait."""
        self.loop.call(self._settle)
        self._resolve()

    async def _settle(self) -> None:
        self._check_safety()
        last: AssertionError | None = None
        with trio.move_on_after(SETTLE_TIMEOUT):
            while True:
                self._check_alive()
                try:
                    self._check_settled()
                    await self._check_conditions()
                except AssertionError as exc:
                    last = exc
                else:
                    last = None
                    break
                await trio.sleep(0.02)
        if last is not None:
            raise Failure(f"not settled within {SETTLE_TIMEOUT:g}s: {last}") from last
        self._check_safety()

    async def _check_conditions(self) -> None:
        """NodeGetVolumeStats' condition: normal while the agent serves the pod, abnormal once
        the pod's registration entry is gone (the files keep an SVID nobody renews)."""
        if not self.driver_up:
            return
        for volume in self.volumes.values():
            revoked = self.entitled_agent and volume.spiffe_id in self.revoked
            if volume.volume_id in self.readonly:
                continue  # abnormal once a write failed, normal until then: both are right
            if not self._held(volume) or not (self.entitled(volume) or revoked):
                continue
            try:
                stats = await self.node.client.stats(volume.volume_id, str(volume.target))
            except RpcError as exc:
                raise AssertionError(f"stats of {volume.volume_id}: {exc!r}") from exc
            condition = stats.volume_condition
            assert condition.abnormal == revoked, f"{volume.volume_id}: {condition.message}"
            if not revoked:
                assert volume.spiffe_id in condition.message, condition.message

    def _check_alive(self) -> None:
        if self.driver_errors:
            exc = self.driver_errors[0]
            raise Failure("the driver crashed:\n" + "".join(traceback.format_exception(exc)))
        proc = self.driver.proc if self.driver is not None else None
        if proc is not None and proc.poll() is not None:
            raise Failure(f"the driver process exited: {self._log_tail()}")

    def _check_safety(self) -> None:
        """What must hold at every instant, not only once settled."""
        self._check_alive()
        mounted = set(mounts_under(self.node.kubelet_dir))
        state = self.node.state_dir
        for volume in self.gone.values():
            folder = state / folder_name(volume.volume_id)
            if os.path.lexists(folder):
                raise Failure(f"unpublished volume {volume.volume_id} is back: {folder}")
            if volume.target in mounted or os.path.lexists(volume.target):
                raise Failure(f"unpublished volume {volume.volume_id}'s target is back")
        faults = {state / folder_name(v) / "data" for v in self.readonly}
        for point in mounts_under(state) if state.exists() else []:
            if point not in faults:
                raise Failure(f"something is mounted in the state directory: {point}")
        for path, st_ in _files(state):
            if stat.S_ISREG(st_.st_mode) and st_.st_mode & 0o007:
                try:
                    content = path.read_bytes()
                except FileNotFoundError:  # a generation the writer just replaced
                    continue
                if PRIVATE_KEY_MARK in content:
                    raise Failure(f"a private key is readable by others: {path}")
        for name, before in self.aside.items():
            try:
                st_ = os.lstat(name)
            except FileNotFoundError:
                raise Failure(f"something set aside was removed: {name}") from None
            if (st_.st_mode, st_.st_size, st_.st_mtime_ns) != before:
                raise Failure(f"something set aside was changed: {name}")

    def _held(self, volume: Volume) -> bool:
        """Whether the driver keeps this volume (folder and metadata) right now."""
        if volume.status == "published":
            return True
        if volume.status in ("lost", "failed"):
            return False
        return os.path.lexists(self.node.state_dir / folder_name(volume.volume_id))

    def _check_settled(self) -> None:
        node = self.node
        up = self.driver_up
        held = {v.volume_id: v for v in self.volumes.values() if self._held(v)}

        folders = {p.name for p in node.state_dir.iterdir()} if node.state_dir.exists() else set()
        expected = {folder_name(vid) for vid in held}
        if up:
            assert folders - {".corrupt"} == expected, (
                f"state folders {sorted(folders)} != held volumes {sorted(expected)}"
            )
            for folder in expected:
                leftovers = [p for p in os.listdir(node.state_dir / folder) if p.endswith(".tmp")]
                assert not leftovers, f"metadata temp files left in {folder}: {leftovers}"
        else:
            assert expected <= folders, f"held volume folders missing: {expected - folders}"

        mounts = Counter(mounts_under(node.kubelet_dir))
        want = {v.target for v in held.values()} | {
            v.target for v in self.volumes.values() if v.status == "lost"
        }
        if up:
            assert set(mounts) == want, (
                f"mounted {sorted(map(str, mounts))} != expected {sorted(map(str, want))}"
            )
        else:
            missing = {v.target for v in self.volumes.values() if v.status in ("published", "lost")}
            assert missing <= set(mounts), f"not mounted while the driver is down: {missing}"
        doubled = [str(t) for t, n in mounts.items() if n != 1]
        assert not doubled, f"mounted more than once: {doubled}"

        for volume in held.values():
            self._check_files(volume)

        agent = node.agent
        if self.agent_up and self.agent_refuses:
            assert not agent.open_svid_subscriptions, "a refused stream is open"
            assert agent.open_bundle_subscriptions == 0, "a refused bundle stream is open"
        if self.agent_up and not self.agent_refuses:
            subscriptions = Counter(frozenset(s) for s in agent.open_svid_subscriptions)
            if up:
                want_subs = Counter(v.selectors(node.node_id) for v in held.values())
                assert subscriptions == want_subs, (
                    f"agent SVID streams {len(list(subscriptions.elements()))} != held volumes "
                    f"{len(held)}: extra {subscriptions - want_subs}, missing "
                    f"{want_subs - subscriptions}"
                )
                assert agent.open_bundle_subscriptions == 1, "the driver's bundle stream"
            else:
                assert not subscriptions, f"streams left open with no driver: {subscriptions}"
                assert agent.open_bundle_subscriptions == 0, "bundle stream left open"
        if not self.entitled_agent and self.driver is not None and self.driver.handles:
            assert not self.driver.handles.agent.status.value.ready, (
                "the driver has not noticed that the agent is down or refuses it"
            )

    def _check_files(self, volume: Volume) -> None:
        current = self.current(volume)
        if volume.status == "unpublish-uncertain":
            return
        if volume.status == "publish-uncertain" and not current:
            return
        attrs = volume.attribute_set
        svid_file, key_file, bundle_file = attrs.files
        try:
            ident = read_identity(volume.target, svid_file, key_file, bundle_file)
        except (OSError, ValueError) as exc:
            raise AssertionError(f"{volume.volume_id}: files do not parse: {exc!r}") from exc
        assert ident.key_matches, f"{volume.volume_id}: key does not match the certificate"
        assert ident.spiffe_id == volume.spiffe_id, f"{volume.volume_id}: {ident.spiffe_id}"
        key = os.stat(volume.target / key_file)
        assert stat.S_IMODE(key.st_mode) == attrs.key_mode, f"key mode {key.st_mode:o}"
        if attrs.gid is not None:
            assert key.st_gid == attrs.gid, f"key group {key.st_gid}"
        if not current:
            return
        agent = self.node.agent
        assert agent.expected_spiffe_id(volume.selectors(self.node.node_id)) == volume.spiffe_id
        serials = {
            x509.load_der_x509_certificate(s.cert_chain[0]).serial_number
            for s in agent.cached_svids(volume.spiffe_id)
        }
        assert ident.serial in serials, f"{volume.volume_id}: not the agent's current SVID"
        assert ident.bundle == split_der(agent.current_bundle_der), (
            f"{volume.volume_id}: not the agent's current bundle"
        )
        data = self.node.state_dir / folder_name(volume.volume_id) / "data"
        hidden = sorted(p for p in os.listdir(data) if p.startswith(".."))
        assert len(hidden) == 2 and "..data" in hidden, f"{volume.volume_id}: leftovers {hidden}"

    def _resolve(self) -> None:
        """Once settled with a driver running, an interrupted publish is present or gone."""
        if not self.driver_up:
            return
        for volume in self.volumes.values():
            if volume.status == "publish-uncertain" and not self._held(volume):
                note("interrupted publish: gone after the restart")
                volume.status = "failed"
        corrupt = self.node.state_dir / ".corrupt"
        for path, st_ in _files(corrupt):
            self.aside.setdefault(str(path), (st_.st_mode, st_.st_size, st_.st_mtime_ns))


def _files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry below ``root`` (not following symlinks), with its lstat."""
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(top) / name
            try:
                yield path, os.lstat(path)
            except FileNotFoundError:
                continue


TestDriverStateMachine = DriverMachine.TestCase
# ci: what only real mounts, processes and the wire show, in about 20 s on 2 shared cores; the
# rest is the fast machine's (tests/test_state_machine_fast.py, thousands of steps). long: the
# profile's max_examples, longer sequences, every rule.
TestDriverStateMachine.settings = (
    settings(stateful_step_count=80) if LONG else settings(max_examples=15, stateful_step_count=30)
)
