"""``trio-spirecsi``: serve | dev-agent | demo | csi | healthcheck.

A user's mistake (a bad flag, a port in use, a socket nobody listens on) ends with one line
on stderr that names the flag and its value and says what to do, never a traceback: exit
status 2 for a setting the command cannot use, 1 when the command ran and failed.

Each command imports what it needs when it runs (the gRPC engine, the dev agent and its
certificates): ``csi probe`` and ``healthcheck`` are liveness probes and start in a fraction
of the time the whole package takes to import.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from . import log
from .config import (
    REQUIRED_SERVE_FLAGS,
    ConfigError,
    add_serve_arguments,
    parse_csi_endpoint,
    settings_from_args,
)
from .errors import leaves

USAGE_ERROR = 2
"""Exit status for a flag or setting the command cannot use (argparse's own)."""
FAILED = 1
"""Exit status for a command that ran and failed."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: problem; see prog --help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message}; see {self.prog} --help\n")


def _fail(command: str, message: str, code: int = FAILED) -> int:
    print(f"trio-spirecsi {command}: {message}", file=sys.stderr)
    return code


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _serve(args: argparse.Namespace) -> int:
    from . import daemon

    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        return _fail("serve", str(exc), USAGE_ERROR)
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

    # What exists now (modules, classes, protobuf descriptors) lives as long as the process:
    # the collector need not walk it again in every full collection while volumes are served.
    gc.freeze()
    try:
        trio.run(main)
    except BaseException as exc:
        found = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        startup = [e for e in found if isinstance(e, daemon.StartupError)]
        if not startup:
            raise
        return _fail("serve", str(startup[0]), USAGE_ERROR)
    return 0


def _csi(args: argparse.Namespace) -> int:
    from .csi.client import CSIClient, Pod, publish_request, volume_context
    from .grpc import RpcError, StatusCode, open_channel

    command = f"csi {args.action}"
    endpoint = args.endpoint or os.environ.get("TRIO_SPIRECSI_CSI_ENDPOINT", "")
    flag = "--endpoint" if args.endpoint else "TRIO_SPIRECSI_CSI_ENDPOINT"
    if not endpoint:
        return _fail(
            command,
            "no driver socket; give --endpoint unix:///path/to/csi.sock "
            "(or TRIO_SPIRECSI_CSI_ENDPOINT)",
            USAGE_ERROR,
        )
    try:
        path = str(parse_csi_endpoint(endpoint, flag))
        attributes = dict(_pair(a) for a in getattr(args, "attr", []))
    except ConfigError as exc:
        return _fail(command, str(exc), USAGE_ERROR)

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
                pod = Pod(args.pod_name, args.namespace, args.pod_uid, args.service_account)
                request = publish_request(
                    args.volume_id,
                    args.target_path,
                    volume_context(pod, attributes),
                    fs_group=args.fs_group,
                    readonly=not args.read_write,
                )
                await client.publish(request)
                print(
                    f"published {args.volume_id} at {args.target_path} for pod "
                    f"{pod.namespace}/{pod.name} (service account {pod.service_account}, "
                    f"uid {pod.uid})"
                )
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
    except BaseException as exc:
        leaf = first_leaf(exc)
        if not isinstance(leaf, RpcError):
            raise
        if leaf.code == StatusCode.UNAVAILABLE:
            return _fail(
                command,
                f"{flag} {endpoint!r}: the driver does not answer ({leaf.message}); check "
                "that it runs and that this is its CSI socket",
            )
        return _fail(command, f"{leaf.code.name}: {leaf.message}")


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--attr {text!r}: write it as key=value")
    return key, value


def _healthcheck(args: argparse.Namespace) -> int:
    from .httpserver import health_problem

    try:
        problem = trio.run(health_problem, args.url, args.timeout)
    except ValueError:
        return _fail(
            "healthcheck", f"--url {args.url!r}: expected http://host:port/path", USAGE_ERROR
        )
    if problem is None:
        return 0
    return _fail(
        "healthcheck",
        f"--url {args.url!r}: {problem}; check that the driver runs with --metrics-addr "
        "on that port",
    )


class _Version(argparse.Action):
    """``--version``, reading the version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        from . import __version__

        print(__version__)
        parser.exit()


def _later(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """``module.name(args)``, the module imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        code: int = getattr(importlib.import_module(module, __package__), name)(args)
        return code

    return run


def _arguments_later(
    sub: argparse.ArgumentParser, command: str | None, name: str, module: str
) -> None:
    """``module.add_arguments(sub)``, only when ``name`` is the command being parsed (or
    ``command`` is None: every command); another command's arguments are never needed."""
    if command is None or command == name:
        importlib.import_module(module, __package__).add_arguments(sub)


def _command(argv: Sequence[str]) -> str:
    """The command word in ``argv`` (the first argument that is not an option), or ``""``."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, the arguments of the other commands that need
    heavy imports to describe them (dev-agent, demo) are left out."""
    parser = Parser(
        prog="trio-spirecsi",
        description="CSI driver that delivers SPIFFE identities from a SPIRE agent into pods.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve = commands.add_parser(
        "serve",
        help="run the CSI node driver (the DaemonSet's command)",
        description="Serve CSI Identity and Node on --csi-endpoint and keep every published "
        "volume's SVID files current from the SPIRE agent at --admin-socket. SIGTERM stops "
        "serving and leaves volumes mounted; a restarted driver resumes them. Required: "
        f"{', '.join(REQUIRED_SERVE_FLAGS)} (each as a flag or its environment variable).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    dev = commands.add_parser(
        "dev-agent",
        help="run an embedded SPIRE agent stand-in (Delegated Identity API) for demos and tests",
    )
    _arguments_later(dev, command, "dev-agent", ".devagent.command")
    dev.set_defaults(run=_later(".devagent.command", "run"))

    demo_parser = commands.add_parser(
        "demo", help="dev agent + driver in a temporary folder: publish, rotate, unpublish"
    )
    _arguments_later(demo_parser, command, "demo", ".demo")
    demo_parser.set_defaults(run=_later(".demo", "run"))

    client = commands.add_parser(
        "csi",
        help="a small kubelet-like client for a running driver",
        description="Call a running driver the way the kubelet does.",
    )
    client.add_argument(
        "--endpoint",
        metavar="URL",
        help="the driver's CSI socket, unix:///path or /path "
        "(default: env TRIO_SPIRECSI_CSI_ENDPOINT; one of the two is required)",
    )
    client.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=120.0,
        metavar="S",
        help="seconds per call (default: %(default)g)",
    )
    actions = client.add_subparsers(dest="action", required=True, parser_class=Parser)
    actions.add_parser("probe", help="CSI Probe")
    actions.add_parser("info", help="GetPluginInfo and NodeGetInfo")
    pub = actions.add_parser(
        "publish",
        help="NodePublishVolume for a pod's inline volume",
        description="NodePublishVolume as the kubelet sends it for an inline volume. The pod "
        "identity flags become the SPIRE selectors: without them the volume is published "
        "for pod default/demo with service account default.",
    )
    pub.add_argument("--volume-id", required=True, help="(required)")
    pub.add_argument("--target-path", required=True, help="(required) under the kubelet dir")
    pub.add_argument("--pod-name", default="demo", help="(default: %(default)s)")
    pub.add_argument("--namespace", default="default", help="(default: %(default)s)")
    pub.add_argument("--pod-uid", default=str(uuid.uuid4()), help="(default: a new random UUID)")
    pub.add_argument("--service-account", default="default", help="(default: %(default)s)")
    pub.add_argument(
        "--fs-group", default="", help="volume_mount_group, the pod's fsGroup (default: none)"
    )
    pub.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="volume attribute, e.g. csi.spire.io/svid-file=tls.crt (repeatable; default: none)",
    )
    pub.add_argument(
        "--read-write", action="store_true", help="send readonly=false (default: readonly=true)"
    )
    for name in ("unpublish", "stats"):
        sub = actions.add_parser(name, help=f"Node{name.capitalize()}Volume")
        sub.add_argument("--volume-id", required=True, help="(required)")
        sub.add_argument("--target-path", required=True, help="(required)")
    client.set_defaults(run=_csi)

    health = commands.add_parser(
        "healthcheck",
        help="exit 0 when the driver's /healthz answers",
        description="Exit 0 when URL answers 200; otherwise print why and exit 1.",
    )
    health.add_argument(
        "--url", default="http://127.0.0.1:9809/healthz", help="(default: %(default)s)"
    )
    health.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=3.0,
        metavar="S",
        help="seconds (default: %(default)g)",
    )
    health.set_defaults(run=_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
