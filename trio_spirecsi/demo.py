"""``trio-spirecsi demo``: the driver's whole job on one screen.

Starts the dev agent and the driver (with the DaemonSet's command line) in a
temporary folder, publishes a volume for a sample pod the way the kubelet
does, shows the files and the SPIFFE ID, waits for a rotation, unpublishes,
and checks that nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .csi.client import CSIClient, Pod, publish_request, volume_context
from .grpc import open_channel
from .storage.mount import mount_table

NEXT_STEPS = """
== next: run it in a cluster whose SPIRE came from its Helm chart
   docs/operations.md   step by step: SPIRE chart values, the driver, a first workload
   k8s/                 kubectl apply -k k8s/  (k8s/spire/helm-values.yaml for the SPIRE release)
   charts/trio-spirecsi helm install trio-spirecsi charts/trio-spirecsi -n spire-system"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--svid-ttl",
        type=_seconds,
        default=20,
        metavar="S",
        help="SVID lifetime in seconds; the agent rotates at half of it (default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (default: removed at the end)",
    )


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 2 to 3600")
    return value


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("demo: the driver bind-mounts volumes, so the demo needs root", file=sys.stderr)
        return 2
    if _in_host_mount_namespace() and shutil.which("unshare"):
        # Run in a private mount namespace: even a crash cannot leave a mount behind.
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-m"]
        argv += ["trio_spirecsi.cli", "demo", "--svid-ttl", str(args.svid_ttl)]
        argv += ["--keep"] if args.keep else []
        os.execvp("unshare", argv)
    return trio.run(_demo, args.svid_ttl, args.keep)


def _in_host_mount_namespace() -> bool:
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def _wait_for(path: Path, what: str, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(30):
        while not path.exists():
            if proc.poll() is not None:
                raise SystemExit(f"demo: {what} exited with {proc.returncode}")
            await trio.sleep(0.05)


def _describe(target: Path) -> tuple[str, int]:
    cert = x509.load_pem_x509_certificate((target / "svid.pem").read_bytes())
    key = serialization.load_pem_private_key((target / "svid_key.pem").read_bytes(), None)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    spiffe_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    matches = key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    print(f"   SPIFFE ID   {spiffe_id}")
    print(f"   serial      {cert.serial_number:x}")
    print(f"   valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    print(f"   key matches certificate: {'yes' if matches else 'NO'}")
    return spiffe_id, cert.serial_number


async def _demo(ttl: int, keep: bool) -> int:
    root = Path(tempfile.mkdtemp(prefix="trio-spirecsi-demo-"))
    admin = root / "spire-agent" / "admin.sock"
    csi_sock = root / "plugins" / "csi.spire.io" / "csi.sock"
    state = root / "state"
    kubelet = root / "kubelet"
    pod = Pod("web-0", "default", str(uuid.uuid4()), "web")
    target = kubelet / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "spiffe" / "mount"
    target.parent.mkdir(parents=True)
    exe = [sys.executable, "-m", "trio_spirecsi.cli"]
    agent_cmd = [*exe, "dev-agent", "--socket", str(admin), "--trust-domain", "example.org"]
    agent_cmd += ["--svid-ttl", str(ttl)]
    driver_cmd = [*exe, "serve", "--csi-endpoint", f"unix://{csi_sock}"]
    driver_cmd += ["--admin-socket", str(admin), "--node-id", "demo-node"]
    driver_cmd += ["--state-dir", str(state), "--kubelet-dir", str(kubelet)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _say(f"dev agent (trust domain example.org, SVIDs live {ttl}s, rotated at half-life)")
        print("   " + " ".join(agent_cmd[2:]))
        procs.append(subprocess.Popen(agent_cmd, stderr=subprocess.DEVNULL))
        await _wait_for(admin, "the dev agent", procs[-1])
        _say("driver, with the DaemonSet's command line")
        print("   " + " ".join(driver_cmd[2:]))
        procs.append(subprocess.Popen(driver_cmd, stderr=subprocess.DEVNULL))
        await _wait_for(csi_sock, "the driver", procs[-1])
        async with open_channel(str(csi_sock)) as channel:
            client = CSIClient(channel, timeout=60)
            info = await client.plugin_info()
            print(f"   GetPluginInfo: {info.name} {info.vendor_version}")

            _say(f"NodePublishVolume for pod {pod.namespace}/{pod.name} (sa {pod.service_account})")
            started = time.perf_counter()
            await client.publish(publish_request("csi-demo", str(target), volume_context(pod)))
            print(f"   published in {(time.perf_counter() - started) * 1000:.1f} ms at {target}")
            _say("what the pod sees (read-only bind mount)")
            for entry in sorted(target.iterdir()):
                if entry.name.startswith("."):
                    continue
                mode = entry.stat().st_mode & 0o777
                print(f"   {entry.name:<18} {oct(mode)} {entry.stat().st_size:>6} bytes")
            print("   (each name links through ..data, swapped with one rename on rotation)")
            _, serial = _describe(target)

            _say("waiting for the agent to rotate the SVID")
            with trio.fail_after(ttl * 2):
                while True:
                    await trio.sleep(0.5)
                    cert = x509.load_pem_x509_certificate((target / "svid.pem").read_bytes())
                    if cert.serial_number != serial:
                        break
            print("   rotated; the files were swapped atomically:")
            _describe(target)
            stats = await client.stats("csi-demo", str(target))
            print(f"   volume condition: {stats.volume_condition.message}")

            _say("NodeUnpublishVolume")
            await client.unpublish("csi-demo", str(target))
            mounted = any(m.mount_point == target for m in mount_table())
            leftovers = [p.name for p in state.iterdir()] if state.exists() else []
            print(f"   target still mounted: {'yes' if mounted else 'no'}")
            print(f"   volume folders left in the state dir: {leftovers or 'none'}")
            if mounted or leftovers:
                return 1
        _say("done: the agent stream is closed, the mount is gone, the files are gone")
        print(NEXT_STEPS, flush=True)
        return 0
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
