"""Hostile pods against the real driver process: each attack is contained to the attacker.

The driver serves every pod of its node, and a pod that asks for the Workload API socket
(``csi.spire.io/workload-api: "true"``) is a client of the driver process itself. Each test
runs one hostile client from tests/hostile/ on the attacker pod's ``agent.sock`` (through
its read-only mount) against the real driver process (``python -m trio_spirecsi.cli
serve``, state dir on tmpfs) with a dev agent process, and checks what an operator or
another pod would notice:

- the attacker's connection or stream ends the way the limit says (GOAWAY, RST_STREAM,
  a gRPC status), or is closed;
- the driver process is still running, CSI Probe answers, and the victim pod's files
  rotate after the agent rotates, while the attacker still holds its connections;
- the driver's peak RSS stays below :data:`RSS_BOUND` (generous on purpose: the real figure
  is measured against the 160 MiB target by ``just hostile``);
- once the attacker leaves, the driver's descriptors return to what they were before and
  the attacker pod's own socket serves a well-behaved client again.

One driver serves the whole module; it is restarted only when an attack killed it or left
it holding more memory than a fresh one, so that each test measures its own attack.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from tests.harness import eventually
from tests.hostile import attacks, wire
from tests.hostile.node import (
    MIB,
    WORKLOAD_API,
    Node,
    Volume,
    in_private_mount_namespace,
    wait_for,
)
from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.grpc import RpcError, StatusCode, methods, open_channel

# The driver's default limits on each per-pod Workload API socket (each has a flag).
CONNECTIONS_PER_SOCKET = 16
STREAMS_PER_CONNECTION = 16
MAX_MESSAGE = 64 * 1024
MAX_FRAME = 16 * 1024
HANDSHAKE_TIMEOUT = 5.0

RSS_BOUND = 300 * MIB
"""Peak RSS the driver must stay under whatever one pod does (a bound, not the target)."""
FRESH_RSS = 150 * MIB
"""A driver holding more than this before a test is restarted (an earlier attack's mark)."""
WAIT = 20.0
"""Generous bound for anything the driver must do (noisy shared machines)."""


@dataclass(frozen=True)
class Pods:
    attacker: Volume
    victim: Volume


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if not in_private_mount_namespace():
        pytest.fail("hostile tests mount a tmpfs: run them as root (tests/conftest.py unshares)")
    node = Node()
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def pods(node: Node) -> Pods:
    attacker = trio.run(node.publish, "attacker", "attacker", WORKLOAD_API)
    victim = trio.run(node.publish, "victim", "victim")
    if not wait_for(lambda: _serving(attacker), WAIT):
        pytest.fail("the attacker pod's Workload API socket never accepted")
    return Pods(attacker, victim)


def _serving(volume: Volume) -> bool:
    try:
        wire.connect_unix(volume.socket, timeout=1.0).close()
    except OSError:
        return False
    return True


@pytest.fixture
def baseline(node: Node, pods: Pods) -> int:
    """A healthy driver before the attack: its steady descriptor count; peak RSS reset."""
    if not node.driver_alive() or node.rss() > FRESH_RSS:
        node.restart_driver()
    if not wait_for(lambda: _serving(pods.attacker), WAIT):
        pytest.fail("the attacker pod's socket did not come back after the driver restarted")
    count = node.steady_fd_count()
    node.reset_peak_rss()
    return count


_started: list[attacks.Attack] = []


@pytest.fixture(autouse=True)
def attackers_leave() -> Iterator[None]:
    """Whatever a test asserted, its attacker's connections are closed afterwards."""
    yield
    while _started:
        _started.pop().close()


async def run(attack: attacks.Attack) -> attacks.Outcome:
    """Run the (blocking) attack in a worker thread; the attacker stays connected."""
    _started.append(attack)
    await trio.to_thread.run_sync(attack.run)
    return attack.outcome()


async def assert_contained(node: Node, pods: Pods, attack: attacks.Attack) -> None:
    """While the attacker still holds its connections: the driver runs, answers Probe,
    rotates the victim's files, and stays under the RSS bound."""
    node.check_alive(f"after attack '{attack}'")
    try:
        await node.probe(timeout=WAIT)
    except trio.TooSlowError:
        node.check_alive(f"after attack '{attack}'", grace=5)
        raise AssertionError(
            f"CSI Probe did not answer within {WAIT:g} s during '{attack}'"
        ) from None
    except (RpcError, OSError) as exc:
        node.check_alive(f"after attack '{attack}'", grace=5)
        raise AssertionError(f"CSI Probe failed during '{attack}': {exc}") from None
    took = await node.rotation_seconds(pods.victim, timeout=WAIT)
    node.check_alive(f"after attack '{attack}'", grace=0 if took is not None else 5)
    assert took is not None, (
        f"victim did not rotate within {WAIT:g} s after the agent rotated, during '{attack}'"
    )
    peak = node.peak_rss()
    assert peak < RSS_BOUND, (
        f"driver peak RSS {peak / MIB:.0f} MiB during '{attack}' exceeds the "
        f"{RSS_BOUND / MIB:.0f} MiB bound"
    )


async def assert_recovered(node: Node, pods: Pods, attack: attacks.Attack, fds: int) -> None:
    """Once the attacker has left: descriptors back to before, its pod's socket serves."""
    attack.close()
    node.check_alive(f"after attack '{attack}'")
    try:
        with trio.fail_after(WAIT):
            response = await _fetch_x509(pods.attacker)
    except (RpcError, OSError, trio.TooSlowError) as exc:
        node.check_alive(f"after attack '{attack}'", grace=5)
        raise AssertionError(
            f"after '{attack}' the attacker pod's socket no longer serves a well-behaved "
            f"client: {exc!r}"
        ) from None
    assert response.svids, f"after '{attack}' FetchX509SVID returned no SVID"
    try:
        await eventually(lambda: node.fd_count() <= fds, "descriptors back", WAIT)
    except AssertionError:
        node.check_alive(f"after attack '{attack}'", grace=5)
        raise AssertionError(
            f"driver holds {node.fd_count()} descriptors {WAIT:g} s after the attacker of "
            f"'{attack}' left; it held {fds} before the attack"
        ) from None
    node.check_alive(f"after attack '{attack}'")


async def _fetch_x509(volume: Volume) -> wl.X509SVIDResponse:
    folder = os.open(volume.target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with (
            open_channel(f"/proc/self/fd/{folder}/agent.sock") as channel,
            channel.stream(
                methods.FETCH_X509_SVID,
                wl.X509SVIDRequest(),
                metadata={"workload.spiffe.io": "true"},
                timeout=WAIT,
            ) as stream,
        ):
            return await stream.__anext__()
    finally:
        os.close(folder)


# Finding 1: one HEADERS frame with bytes that are not UTF-8 -------------------------------


@pytest.mark.parametrize("where", ["value", "name", "path"])
async def test_non_utf8_header_bytes_end_only_that_stream(
    node: Node, pods: Pods, baseline: int, where: str
) -> None:
    attack = attacks.NonUtf8Header(pods.attacker.socket, where)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    seen = attack.connections[0].seen
    assert outcome.served == 0 and outcome.statuses.get(wire.GRPC_OK) is None, (
        f"the driver served a request with a non-UTF-8 header {where}: {outcome.describe()}"
    )
    assert 1 in seen.ended or seen.goaway is not None or seen.closed, (
        f"the request with a non-UTF-8 header {where} was neither refused nor ended within "
        f"{attack.wait:g} s: {outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


# Finding 2: a small compressed message that inflates to hundreds of MiB -------------------


@pytest.mark.parametrize(
    ("encoding", "inflated"),
    [("deflate", 400 * MIB), ("deflate", 60 * MIB), ("gzip", 60 * MIB)],
    ids=["deflate-400MiB", "deflate-60MiB", "gzip-60MiB"],
)
async def test_compressed_message_is_refused_after_at_most_the_limit(
    node: Node, pods: Pods, baseline: int, encoding: str, inflated: int
) -> None:
    """60 MiB inflate from under 64 KiB: only a bound on decompression stops those."""
    attack = attacks.CompressionBomb(pods.attacker.socket, encoding, inflated)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    assert outcome.statuses.get(wire.GRPC_RESOURCE_EXHAUSTED) == 1, (
        f"a message inflating to {inflated / MIB:.0f} MiB was not refused RESOURCE_EXHAUSTED "
        f"(limit {MAX_MESSAGE // 1024} KiB after decompression): {outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


# Finding 3: limits on the per-pod socket -------------------------------------------------


async def test_streams_beyond_the_limit_are_refused(node: Node, pods: Pods, baseline: int) -> None:
    attack = attacks.ManyStreams(pods.attacker.socket, count=2000)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    seen = attack.connections[0].seen
    advertised = seen.settings.get(wire.SETTINGS_MAX_CONCURRENT_STREAMS)
    assert advertised is not None and advertised <= STREAMS_PER_CONNECTION, (
        f"the driver advertises SETTINGS_MAX_CONCURRENT_STREAMS={advertised} "
        f"(limit {STREAMS_PER_CONNECTION}): well-behaved clients cannot know its limit"
    )
    concurrent = attack.concurrent()
    assert concurrent <= STREAMS_PER_CONNECTION, (
        f"the driver served {concurrent} streams at once on one connection "
        f"(limit {STREAMS_PER_CONNECTION}): {outcome.describe()}"
    )
    left = attack.unanswered()
    assert left == 0, (
        f"{left} of {attack.opened} streams beyond the limit were neither refused "
        f"(RST_STREAM REFUSED_STREAM) nor ended by a GOAWAY: {outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


async def test_large_requests_are_refused_not_held(node: Node, pods: Pods, baseline: int) -> None:
    attack = attacks.LargeRequests(pods.attacker.socket, connections=4, streams=16)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)  # while the attacker holds its streams
    assert outcome.served == 0, (
        f"the driver served {outcome.served} streams whose request was "
        f"{attack.size / MIB:.0f} MiB (limit {MAX_MESSAGE // 1024} KiB): {outcome.describe()}"
    )
    assert outcome.statuses.get(wire.GRPC_RESOURCE_EXHAUSTED, 0) > 0, (
        f"no {attack.size / MIB:.0f} MiB request was refused RESOURCE_EXHAUSTED: "
        f"{outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


async def test_silent_connections_are_closed(node: Node, pods: Pods, baseline: int) -> None:
    attack = attacks.SilentConnections(pods.attacker.socket, count=2000)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    bound = baseline + CONNECTIONS_PER_SOCKET
    try:
        await eventually(lambda: node.fd_count() <= bound, "connections capped", WAIT)
    except AssertionError:
        raise AssertionError(
            f"driver holds {node.fd_count()} descriptors with {outcome.connections} silent "
            f"connections on one pod's socket (limit {CONNECTIONS_PER_SOCKET} connections, "
            f"{baseline} descriptors before)"
        ) from None
    try:
        await eventually(
            lambda: attack.poll_closed() == len(attack.socks), "silent ones closed", WAIT
        )
    except AssertionError:
        raise AssertionError(
            f"driver still holds {len(attack.socks) - attack.poll_closed()} of "
            f"{len(attack.socks)} connections that never sent a byte, {WAIT:g} s after they "
            f"connected (handshake timeout {HANDSHAKE_TIMEOUT:g} s)"
        ) from None
    await assert_recovered(node, pods, attack, baseline)


async def test_connections_beyond_the_limit_are_closed(
    node: Node, pods: Pods, baseline: int
) -> None:
    attack = attacks.ManyConnections(pods.attacker.socket, count=64)
    await run(attack)
    await assert_contained(node, pods, attack)
    try:
        await eventually(
            lambda: attack.open_count() <= CONNECTIONS_PER_SOCKET, "extra connections closed", WAIT
        )
    except AssertionError:
        raise AssertionError(
            f"the driver keeps {attack.open_count()} of {len(attack.connections)} connections "
            f"open on one pod's socket (limit {CONNECTIONS_PER_SOCKET})"
        ) from None
    await assert_recovered(node, pods, attack, baseline)


def _flood(kind: str, path: str) -> attacks.Flood:
    if kind == "ping":
        return attacks.PingFlood(path, max_seconds=8.0)
    if kind == "settings":
        return attacks.SettingsFlood(path, max_seconds=8.0)
    if kind == "unknown-frames":
        return attacks.UnknownFrameFlood(path, max_seconds=8.0)
    return attacks.RapidReset(path, count=20000, max_seconds=8.0)


@pytest.mark.parametrize("kind", ["ping", "settings", "unknown-frames", "rapid-reset"])
async def test_flood_ends_the_flooding_connection(
    node: Node, pods: Pods, baseline: int, kind: str
) -> None:
    """PING and SETTINGS floods that never read the ACKs, small unknown frames, and rapid
    reset: the driver ends the connection (GOAWAY ENHANCE_YOUR_CALM, or closes it once
    it has queued too much for a client that does not read)."""
    attack = _flood(kind, pods.attacker.socket)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    assert outcome.ended_by_driver, (
        f"the driver kept the connection open through {outcome.sent / MIB:.1f} MiB "
        f"({outcome.elapsed:.1f} s) of '{attack}': {outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


async def test_oversized_frames_end_the_connection(node: Node, pods: Pods, baseline: int) -> None:
    attack = attacks.HugeUnknownFrames(pods.attacker.socket, count=4)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    seen = attack.connections[0].seen
    advertised = seen.settings.get(wire.SETTINGS_MAX_FRAME_SIZE, wire.DEFAULT_MAX_FRAME)
    assert advertised <= MAX_FRAME, (
        f"the driver advertises SETTINGS_MAX_FRAME_SIZE={advertised} (limit {MAX_FRAME})"
    )
    assert outcome.ended_by_driver, (
        f"the driver read {outcome.sent / MIB:.0f} MiB of {attack.size / MIB:.0f} MiB frames "
        f"and kept the connection: {outcome.describe()}"
    )
    assert not outcome.goaways or wire.FRAME_SIZE_ERROR in outcome.goaways, (
        f"a {attack.size / MIB:.0f} MiB frame ended the connection without "
        f"FRAME_SIZE_ERROR: {outcome.describe()}"
    )
    await assert_recovered(node, pods, attack, baseline)


@pytest.mark.parametrize("end_at", [0, MIB], ids=["endless", "1MiB-block"])
async def test_header_block_is_bounded(node: Node, pods: Pods, baseline: int, end_at: int) -> None:
    """An endless CONTINUATION chain, and one header block of 1 MiB (limit 16 KiB)."""
    attack = attacks.ContinuationFlood(pods.attacker.socket, max_bytes=16 * MIB, end_at=end_at)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    seen = attack.connections[0].seen
    if end_at:
        assert outcome.served == 0 and outcome.statuses.get(wire.GRPC_OK) is None, (
            f"the driver served a call whose header block was {end_at / MIB:g} MiB: "
            f"{outcome.describe()}"
        )
        assert 1 in seen.ended or seen.goaway is not None or seen.closed, (
            f"a {end_at / MIB:g} MiB header block was neither refused nor ended: "
            f"{outcome.describe()}"
        )
    else:
        assert outcome.ended_by_driver and outcome.sent < attack.max_bytes, (
            f"the driver accepted {outcome.sent / MIB:.1f} MiB of CONTINUATION frames on one "
            f"HEADERS and kept the connection: {outcome.describe()}"
        )
    await assert_recovered(node, pods, attack, baseline)


async def test_jwt_fetches_are_rate_limited_per_pod(node: Node, pods: Pods, baseline: int) -> None:
    """Each FetchJWTSVID is a call to the SPIRE agent, which signs a token: one pod must
    not make the driver hammer the agent."""
    before = _jwts_issued(node, "hostile")
    attack = attacks.JwtFlood(pods.attacker.socket, calls=400)
    outcome = await run(attack)
    await assert_contained(node, pods, attack)
    issued = _jwts_issued(node, "hostile") - before
    limited = attack.messages.get(wire.GRPC_UNAVAILABLE, "")
    assert "rate limit exceeded for" in limited, (
        f"{attack.calls} FetchJWTSVID calls from one pod were not rate-limited (UNAVAILABLE "
        f"'rate limit exceeded for ...'); the agent signed {issued} tokens: "
        f"{outcome.describe()}"
    )
    assert issued < attack.calls, f"the agent signed {issued} tokens for {attack.calls} calls"
    await assert_recovered(node, pods, attack, baseline)


def _jwts_issued(node: Node, audience_prefix: str) -> int:
    """FetchJWTSVIDs calls the agent answered whose first audience has this prefix."""
    count = 0
    for line in node.agent_log_lines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "jwt_svids_issued" and str(event.get("audience", "")).startswith(
            audience_prefix
        ):
            count += 1
    return count


# Finding 5: thousands of JWT audiences in one attribute ---------------------------------


@pytest.mark.parametrize("shape", ["sets", "audiences"])
async def test_thousands_of_jwt_audiences_are_refused(
    node: Node, pods: Pods, baseline: int, shape: str
) -> None:
    """2,000 audience sets (one refresher task and one agent call each) or one set of
    2,000 audiences: both refused before anything starts, naming the attribute and limit."""
    names = [f"hostile-aud-{i}" for i in range(2000)]
    value = ";".join(names) if shape == "sets" else ",".join(names)
    before = _jwts_issued(node, "hostile-aud-")
    volume_id = f"csi-{uuid.uuid4().hex}"
    error: RpcError | None = None
    try:
        volume = await node.publish(
            "audiences", "audiences", {"csi.spire.io/jwt-audiences": value}, volume_id=volume_id
        )
    except RpcError as exc:
        error = exc
    else:
        await node.unpublish(volume)
    node.check_alive(f"after publishing {len(value)} bytes of jwt-audiences")
    issued = _jwts_issued(node, "hostile-aud-") - before
    assert error is not None, (
        f"a volume with {len(names)} JWT audiences ({len(value)} bytes of "
        f"csi.spire.io/jwt-audiences) was published; the agent signed {issued} tokens for it"
    )
    assert error.code == StatusCode.INVALID_ARGUMENT, f"refused {error.code.name}: {error}"
    assert "csi.spire.io/jwt-audiences" in error.message, error.message
    numbers = {int(n) for n in re.findall(r"\d+", error.message.split("jwt-audiences", 1)[1])}
    ours = {len(names), len(value), 1}
    assert any(0 < n < len(value) for n in numbers - ours), (
        f"the refusal does not state the limit: {error.message!r}"
    )
    assert issued == 0, f"the agent signed {issued} tokens for a refused volume"
    assert not (node.state_dir / volume_id).exists()
    await node.probe()

    # An ordinary attribute still works.
    volume = await node.publish("audiences", "audiences", {"csi.spire.io/jwt-audiences": "a,b;c"})
    try:
        assert sorted(p.name for p in volume.target.glob("jwt_svid-*.token")) == [
            "jwt_svid-0.token",
            "jwt_svid-1.token",
        ]
    finally:
        await node.unpublish(volume)
    node.check_alive("after publishing a volume with two audience sets")
