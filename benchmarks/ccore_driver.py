"""A minimal CSI node driver on grpcio's C-core with threads: the bench's yardstick.

    python -m benchmarks.ccore_driver --csi-socket S --admin-socket A --state-dir D \
        --kubelet-dir K --node-id N

What ``just bench`` compares trio-spirecsi's publish latency with, measured the same way in
the same run: a grpcio server (a thread pool) for the CSI Node service and a grpcio channel
to the same SPIRE agent. NodePublishVolume writes the volume's metadata, subscribes with the
pod's selectors (SubscribeToX509SVIDs), waits for the first SVID, writes the files, bind-mounts
them read-only and answers; a thread per volume keeps reading the stream and rewrites the
files on rotation. NodeUnpublishVolume cancels the stream, unmounts and deletes.

It is small on purpose and does the same syscalls as the driver: the metadata, the files and
the mount go through the project's own storage code (``MetadataStore.write``,
``write_atomically``, ``LinuxMounter`` on a target held by ``open_target``), so the difference
between the two is the driver's own work and its gRPC engine. It skips what a production
driver must do and this one need not: no validation of the agent's certificates, no resume,
no per-pod socket, no JWT, no error handling beyond failing the call. Benchmark code (grpcio
is a test dependency), never shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.grpc import methods
from trio_spirecsi.render import pem_block, pem_certificates
from trio_spirecsi.spire.responses import split_der
from trio_spirecsi.storage.metadata import MetadataStore, VolumeMetadata
from trio_spirecsi.storage.mount import LinuxMounter
from trio_spirecsi.storage.paths import open_target
from trio_spirecsi.storage.writer import FileContent, write_atomically

_POD = "csi.storage.k8s.io/pod."
CCORE_PHASES = ("metadata", "first_svid", "write", "mount")
"""What its handler times, each from the end of the previous: the request read, the target
held and the metadata written; the subscription sent and its first SVID received; the files
written; the bind mount."""


class _Volume:
    def __init__(self, call: Any, data_dir: Path, target: str) -> None:
        self.call = call
        self.data_dir = data_dir
        self.target = target
        self.thread: threading.Thread | None = None


class CCoreDriver:
    def __init__(self, admin: str, state_dir: Path, kubelet_dir: Path, node_id: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{admin}")
        self.store = MetadataStore(state_dir)
        self.kubelet_dir = kubelet_dir
        self.node_id = node_id
        self.mounter = LinuxMounter()
        self.volumes: dict[str, _Volume] = {}
        self.lock = threading.Lock()
        self.bundles: dict[str, tuple[bytes, ...]] = {}
        self.have_bundles = threading.Event()
        self.handler_seconds: list[float] = []
        self.phase_seconds: dict[str, list[float]] = {phase: [] for phase in CCORE_PHASES}
        self.subscribe = self.channel.unary_stream(
            methods.SUBSCRIBE_TO_X509_SVIDS.path,
            request_serializer=di.SubscribeToX509SVIDsRequest.SerializeToString,
            response_deserializer=di.SubscribeToX509SVIDsResponse.FromString,
        )
        bundles = self.channel.unary_stream(
            methods.SUBSCRIBE_TO_X509_BUNDLES.path,
            request_serializer=di.SubscribeToX509BundlesRequest.SerializeToString,
            response_deserializer=di.SubscribeToX509BundlesResponse.FromString,
        )
        self.bundle_call = bundles(di.SubscribeToX509BundlesRequest())
        threading.Thread(target=self._bundle_loop, daemon=True).start()

    def _bundle_loop(self) -> None:
        try:
            for response in self.bundle_call:
                self.bundles = {
                    td.removeprefix("spiffe://"): split_der(bytes(der))
                    for td, der in response.ca_certificates.items()
                }
                self.have_bundles.set()
        except grpc.RpcError:
            pass

    def _files(self, response: di.SubscribeToX509SVIDsResponse) -> dict[str, FileContent]:
        svid = response.x509_svids[0]
        td = svid.x509_svid.id.trust_domain
        return {
            "svid.pem": FileContent(pem_certificates(svid.x509_svid.cert_chain), 0o644),
            "svid_key.pem": FileContent(pem_block("PRIVATE KEY", svid.x509_svid_key), 0o600),
            "svid_bundle.pem": FileContent(pem_certificates(self.bundles.get(td, ())), 0o644),
        }

    def publish(
        self, request: csi.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodePublishVolumeResponse:
        started = time.perf_counter()
        volume_id = request.volume_id
        ctx = request.volume_context
        selectors = [
            types_pb2.Selector(type="k8s", value=value)
            for value in (
                f"ns:{ctx[_POD + 'namespace']}",
                f"sa:{ctx['csi.storage.k8s.io/serviceAccount.name']}",
                f"pod-uid:{ctx[_POD + 'uid']}",
                f"pod-name:{ctx[_POD + 'name']}",
                f"node-name:{self.node_id}",
            )
        ]
        md = VolumeMetadata(
            volume_id=volume_id,
            target_path=request.target_path,
            spec={"volume_context": dict(ctx)},
            volume_mount_group="",
            node_id=self.node_id,
            created_at=time.time(),
        )
        marks = [started]
        with open_target(self.kubelet_dir, request.target_path) as target:
            self.store.write(md)
            marks.append(time.perf_counter())
            call = self.subscribe(di.SubscribeToX509SVIDsRequest(selectors=selectors))
            responses: Iterator[di.SubscribeToX509SVIDsResponse] = iter(call)
            first = next(r for r in responses if r.x509_svids)
            self.have_bundles.wait(30)
            marks.append(time.perf_counter())
            data_dir = self.store.data_dir(volume_id)
            write_atomically(data_dir, self._files(first), gid=None)
            marks.append(time.perf_counter())
            self.mounter.bind_readonly(data_dir, target)
            marks.append(time.perf_counter())
        volume = _Volume(call, data_dir, request.target_path)
        volume.thread = threading.Thread(target=self._follow, args=(volume, responses))
        volume.thread.start()
        with self.lock:
            self.volumes[volume_id] = volume
            self.handler_seconds.append(time.perf_counter() - started)
            for phase, begin, end in zip(CCORE_PHASES, marks, marks[1:], strict=False):
                self.phase_seconds[phase].append(end - begin)
        return csi.NodePublishVolumeResponse()

    def _follow(
        self, volume: _Volume, responses: Iterator[di.SubscribeToX509SVIDsResponse]
    ) -> None:
        try:
            for response in responses:
                if response.x509_svids:
                    write_atomically(volume.data_dir, self._files(response), gid=None)
        except grpc.RpcError:
            pass

    def unpublish(
        self, request: csi.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeUnpublishVolumeResponse:
        with self.lock:
            volume = self.volumes.pop(request.volume_id, None)
        if volume is not None:
            volume.call.cancel()
            assert volume.thread is not None
            volume.thread.join()
            with open_target(self.kubelet_dir, volume.target) as held:
                self.mounter.unmount(held, volume.data_dir)
                held.remove()
        self.store.remove(request.volume_id)
        return csi.NodeUnpublishVolumeResponse()

    def probe(self, request: csi.ProbeRequest, context: grpc.ServicerContext) -> csi.ProbeResponse:
        return csi.ProbeResponse()


def _unary(method: methods.Method[Any, Any], behaviour: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=method.request_type.FromString,
        response_serializer=method.response_type.SerializeToString,
    )


def serve(args: argparse.Namespace) -> None:
    driver = CCoreDriver(args.admin_socket, args.state_dir, args.kubelet_dir, args.node_id)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads))
    node = {
        "NodePublishVolume": _unary(methods.NODE_PUBLISH_VOLUME, driver.publish),
        "NodeUnpublishVolume": _unary(methods.NODE_UNPUBLISH_VOLUME, driver.unpublish),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("csi.v1.Node", node),
            grpc.method_handlers_generic_handler(
                "csi.v1.Identity", {"Probe": _unary(methods.PROBE, driver.probe)}
            ),
        )
    )
    server.add_insecure_port(f"unix://{args.csi_socket}")
    server.start()
    stop = threading.Event()

    def dump(signum: int, frame: object) -> None:
        if args.stats is not None:
            with driver.lock:
                stats = {
                    "handler_seconds": list(driver.handler_seconds),
                    "phase_seconds": {k: list(v) for k, v in driver.phase_seconds.items()},
                }
            tmp = args.stats.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats))
            tmp.rename(args.stats)

    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGUSR1, dump)
    stop.wait()
    server.stop(grace=1).wait()
    driver.bundle_call.cancel()
    driver.channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csi-socket", required=True)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--kubelet-dir", type=Path, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--stats", type=Path, help="write the handler times here on SIGUSR1")
    serve(parser.parse_args())
    os._exit(0)  # volume threads blocked in grpcio must not delay the exit


if __name__ == "__main__":
    main()
