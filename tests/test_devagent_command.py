"""``dev-agent`` as its own process: flags, signals, logs, a CA kept across restarts."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic

import grpc
import pytest
import trio

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.devagent import command
from trio_spirecsi.grpc import methods
from trio_spirecsi.grpc.methods import Method, Req, Resp

WAIT = 20.0

RUN = (
    "import argparse, sys\n"
    "from trio_spirecsi.devagent import command\n"
    "parser = argparse.ArgumentParser()\n"
    "command.add_arguments(parser)\n"
    "sys.exit(command.run(parser.parse_args(sys.argv[1:])))\n"
)


def pod() -> list[types_pb2.Selector]:
    values = ("ns:shop", "sa:web", "pod-name:web-0", "pod-uid:uid-0", "node-name:n1")
    return [types_pb2.Selector(type="k8s", value=v) for v in values]


class Stream(Generic[Resp]):
    def __init__(self, call: Any) -> None:
        self.call = call

    async def next(self) -> Resp:
        with trio.fail_after(WAIT):
            response: Resp = await trio.to_thread.run_sync(next, self.call, abandon_on_cancel=True)
            return response


class Peer:
    """A grpcio client of the agent's admin socket."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def stream(self, method: Method[Req, Resp], request: Req) -> Stream[Resp]:
        call = self.channel.unary_stream(
            method.path,
            request_serializer=method.request_type.SerializeToString,
            response_deserializer=method.response_type.FromString,
        )
        return Stream(call(request))

    def svids(self, selectors: list[types_pb2.Selector]) -> Stream[di.SubscribeToX509SVIDsResponse]:
        request = di.SubscribeToX509SVIDsRequest(selectors=selectors)
        return self.stream(methods.SUBSCRIBE_TO_X509_SVIDS, request)

    def x509_bundles(self) -> Stream[di.SubscribeToX509BundlesResponse]:
        return self.stream(methods.SUBSCRIBE_TO_X509_BUNDLES, di.SubscribeToX509BundlesRequest())


async def eventually(check: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for: {what}")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="devagent-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Process:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN, *args], stderr=subprocess.PIPE, text=True
        )
        self.stderr = ""

    async def wait_for(self, socket: Path) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dev agent exited: {self.proc.communicate()[1]}")
            return socket.exists()

        await eventually(up, f"the dev agent's socket {socket}")

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        with trio.fail_after(WAIT):
            _, self.stderr = await trio.to_thread.run_sync(self.proc.communicate)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _log_events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


async def test_process_serves_rotates_on_signals_and_stops_cleanly(
    sock_dir: Path, tmp_path: Path
) -> None:
    socket = sock_dir / "admin.sock"
    data = tmp_path / "data"
    args = ["--socket", str(socket), "--trust-domain", "example.org", "--svid-ttl", "600",
            "--federated-trust-domain", "partner.example", "--data-dir", str(data),
            "--socket-mode", "0660", "--log-format", "json"]  # fmt: skip
    agent = Process(*args)
    peer: Peer | None = None
    try:
        await agent.wait_for(socket)
        assert stat.S_IMODE(socket.stat().st_mode) == 0o660
        peer = Peer(socket)
        bundles = peer.x509_bundles()
        svids = peer.svids(pod())
        first_bundles = dict((await bundles.next()).ca_certificates)
        assert set(first_bundles) == {"spiffe://example.org", "spiffe://partner.example"}
        [first] = (await svids.next()).x509_svids
        assert first.x509_svid.id.path == "/ns/shop/sa/web"

        agent.proc.send_signal(signal.SIGUSR1)
        [rotated] = (await svids.next()).x509_svids
        assert rotated.x509_svid.cert_chain[0] != first.x509_svid.cert_chain[0]

        agent.proc.send_signal(signal.SIGUSR2)
        new_bundles = dict((await bundles.next()).ca_certificates)
        assert new_bundles["spiffe://example.org"] != first_bundles["spiffe://example.org"]
        await svids.next()  # re-issued by the new CA
        peer.channel.close()
        peer = None

        assert await agent.stop() == 0
        assert not socket.exists()
    finally:
        if peer is not None:
            peer.channel.close()
        agent.kill()

    events = _log_events(agent.stderr)
    names = [e["event"] for e in events]
    for expected in ("serving", "svid_subscription_opened", "svid_issued", "svid_rotated",
                     "ca_rotated", "svid_subscription_closed", "stopping"):  # fmt: skip
        assert expected in names, (expected, names)
    assert "PRIVATE KEY" not in agent.stderr
    assert base64.b64encode(first.x509_svid_key[-24:]).decode()[:16] not in agent.stderr
    for key_file in data.rglob("*.key.pem"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # A restarted agent with the same data dir serves the rotated CA's bundle.
    again = Process(*args)
    try:
        await again.wait_for(socket)
        peer = Peer(socket)
        restarted = dict((await peer.x509_bundles().next()).ca_certificates)
        assert restarted == new_bundles
        peer.channel.close()
        assert await again.stop(signal.SIGINT) == 0
    finally:
        again.kill()


async def test_sighup_rereads_the_entries_file(sock_dir: Path, tmp_path: Path) -> None:
    entries = tmp_path / "entries.json"
    entry = {"spiffe_id": "spiffe://example.org/web", "selectors": ["k8s:sa:web"], "hint": "one"}
    entries.write_text(json.dumps([entry]))
    socket = sock_dir / "admin.sock"
    agent = Process("--socket", str(socket), "--entries", str(entries))
    peer: Peer | None = None
    try:
        await agent.wait_for(socket)
        peer = Peer(socket)
        stream = peer.svids(pod())
        [svid] = (await stream.next()).x509_svids
        assert (svid.x509_svid.id.path, svid.x509_svid.hint) == ("/web", "one")
        entries.write_text("[not json")
        agent.proc.send_signal(signal.SIGHUP)  # logged and ignored: the old entries stay
        entries.write_text(json.dumps([{**entry, "hint": "two"}]))
        agent.proc.send_signal(signal.SIGHUP)
        [svid] = (await stream.next()).x509_svids
        assert svid.x509_svid.hint == "two"
        peer.channel.close()
        peer = None
        assert await agent.stop() == 0
    finally:
        if peer is not None:
            peer.channel.close()
        agent.kill()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--trust-domain", "Not A Domain"], "is not a trust domain name"),
        (["--template", "spiffe://{td}/{namespace}"], "unknown placeholder"),
        (["--entries", "/nonexistent/entries.json"], "cannot read entries file"),
    ],
)
def test_bad_configuration_exits_2_saying_why(
    sock_dir: Path, args: list[str], fragment: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUN, "--socket", str(sock_dir / "a.sock"), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 2
    assert fragment in result.stderr
    assert not (sock_dir / "a.sock").exists()


def test_every_flag_is_documented() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {f.dest for f in flags} >= {
        "socket", "trust_domain", "svid_ttl", "template", "entries",
        "federated_trust_domain", "data_dir", "key_type",
    }  # fmt: skip
    for action in flags:
        assert action.help, action.dest
    assert parser.parse_args(["--socket", "/s"]).key_type == "ec-p256"
    with pytest.raises(SystemExit):
        parser.parse_args(["--socket", "/s", "--svid-ttl", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--socket", "/s", "--entries", "e.json", "--template", "t"])
