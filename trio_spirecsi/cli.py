"""``trio-spirecsi``: serve | dev-agent | demo | csi | healthcheck."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid
from collections.abc import Sequence

import trio

from . import __version__, log
from .config import ConfigError, add_serve_arguments, parse_csi_endpoint, settings_from_args
from .grpc import RpcError, open_channel


def _serve(args: argparse.Namespace) -> int:
    from . import daemon

    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"trio-spirecsi serve: {exc}", file=sys.stderr)
        return 2
    log.setup(settings.log_level, settings.log_format)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run, settings)
                async for signum in signals:
                    log.event(
                        daemon.logger,
                        20,
                        "stopping",
                        signal=signal.Signals(signum).name,
                        note="volumes stay mounted; a new driver resumes them",
                    )
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def _csi(args: argparse.Namespace) -> int:
    from .csi.client import CSIClient, Pod, publish_request, volume_context

    endpoint = args.endpoint or os.environ.get("TRIO_SPIRECSI_CSI_ENDPOINT", "")
    if not endpoint:
        print("trio-spirecsi csi: give --endpoint (or TRIO_SPIRECSI_CSI_ENDPOINT)", file=sys.stderr)
        return 2
    path = str(parse_csi_endpoint(endpoint))

    async def main() -> int:
        async with open_channel(path) as channel:
            client = CSIClient(channel, timeout=args.timeout)
            if args.action == "probe":
                print("ready" if await client.probe() else "not ready")
            elif args.action == "info":
                info = await client.plugin_info()
                node = await client.node_info()
                print(f"driver={info.name} version={info.vendor_version} node_id={node.node_id}")
            elif args.action == "publish":
                attributes = dict(_pair(a) for a in args.attr)
                pod = Pod(args.pod_name, args.namespace, args.pod_uid, args.service_account)
                request = publish_request(
                    args.volume_id,
                    args.target_path,
                    volume_context(pod, attributes),
                    fs_group=args.fs_group,
                    readonly=not args.read_write,
                )
                await client.publish(request)
                print(f"published {args.volume_id} at {args.target_path}")
            elif args.action == "unpublish":
                await client.unpublish(args.volume_id, args.target_path)
                print(f"unpublished {args.volume_id}")
            elif args.action == "stats":
                stats = await client.stats(args.volume_id, args.target_path)
                for usage in stats.usage:
                    unit = "bytes" if usage.unit == usage.BYTES else "inodes"
                    print(f"{unit}: used={usage.used} total={usage.total}")
                condition = stats.volume_condition
                state = "abnormal" if condition.abnormal else "normal"
                print(f"condition: {state}: {condition.message}")
        return 0

    try:
        return trio.run(main)
    except RpcError as exc:
        print(f"{exc.code.name}: {exc.message}", file=sys.stderr)
        return 1


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--attr {text!r}: write it as key=value")
    return key, value


def _healthcheck(args: argparse.Namespace) -> int:
    from .httpserver import check_health

    try:
        healthy = trio.run(check_health, args.url, args.timeout)
    except ValueError as exc:
        print(f"trio-spirecsi healthcheck: {exc}", file=sys.stderr)
        return 2
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-spirecsi",
        description="CSI driver that delivers SPIFFE identities from a SPIRE agent into pods.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the CSI node driver (the DaemonSet's command)",
        description="Serve CSI Identity and Node on --csi-endpoint and keep every published "
        "volume's SVID files current from the SPIRE agent at --admin-socket. SIGTERM stops "
        "serving and leaves volumes mounted; a restarted driver resumes them.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    from .devagent import command as devagent_command

    dev = commands.add_parser(
        "dev-agent",
        help="run an embedded SPIRE agent stand-in (Delegated Identity API) for demos and tests",
    )
    devagent_command.add_arguments(dev)
    dev.set_defaults(run=devagent_command.run)

    from . import demo

    demo_parser = commands.add_parser(
        "demo", help="dev agent + driver in a temporary folder: publish, rotate, unpublish"
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)

    client = commands.add_parser("csi", help="a small kubelet-like client for a running driver")
    client.add_argument("--endpoint", help="driver socket (env TRIO_SPIRECSI_CSI_ENDPOINT)")
    client.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    actions = client.add_subparsers(dest="action", required=True)
    actions.add_parser("probe", help="CSI Probe")
    actions.add_parser("info", help="GetPluginInfo and NodeGetInfo")
    pub = actions.add_parser("publish", help="NodePublishVolume for a pod's inline volume")
    pub.add_argument("--volume-id", required=True)
    pub.add_argument("--target-path", required=True)
    pub.add_argument("--pod-name", default="demo")
    pub.add_argument("--namespace", default="default")
    pub.add_argument("--pod-uid", default=str(uuid.uuid4()))
    pub.add_argument("--service-account", default="default")
    pub.add_argument("--fs-group", default="", help="volume_mount_group (the pod's fsGroup)")
    pub.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="volume attribute, e.g. csi.spire.io/svid-file=tls.crt (repeatable)",
    )
    pub.add_argument("--read-write", action="store_true", help="send readonly=false")
    for name in ("unpublish", "stats"):
        sub = actions.add_parser(name, help=f"Node{name.capitalize()}Volume")
        sub.add_argument("--volume-id", required=True)
        sub.add_argument("--target-path", required=True)
    client.set_defaults(run=_csi)

    health = commands.add_parser("healthcheck", help="exit 0 when the driver's /healthz answers")
    health.add_argument("--url", default="http://127.0.0.1:9809/healthz")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(run=_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
