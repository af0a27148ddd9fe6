"""``trio-spirecsi dev-agent``: the dev agent as a process, for demos and manual testing."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

import trio

from .. import log
from ..spiffe import (
    normalise_trust_domain,
)
from .agent import DevAgent, logger
from .ca import KEY_TYPES, CAError
from .entries import DEFAULT_TEMPLATE, EntriesError, load_entries_file

_STOP = (signal.SIGINT, signal.SIGTERM)


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the SPIRE agent's Delegated Identity API (admin socket) with an embedded CA: "
        "X.509-SVIDs rotated at half their lifetime, trust bundles, JWT-SVIDs. "
        "SIGINT/SIGTERM stop it and remove the socket; SIGUSR1 re-issues every SVID now; "
        "SIGUSR2 replaces the CA; SIGHUP re-reads --entries."
    )
    parser.add_argument(
        "--socket", required=True, metavar="PATH", help="unix socket to serve on (the admin socket)"
    )
    parser.add_argument(
        "--socket-mode",
        type=_octal,
        default=None,
        metavar="MODE",
        help="octal permissions for the socket file, e.g. 0770 (default: from the umask)",
    )
    parser.add_argument(
        "--trust-domain",
        default="example.org",
        help="the agent's trust domain (default %(default)s)",
    )
    parser.add_argument(
        "--svid-ttl",
        type=_positive,
        default=3600,
        metavar="S",
        help="X.509-SVID lifetime in seconds; SVIDs are re-issued at half of it "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--jwt-ttl",
        type=_positive,
        default=300,
        metavar="S",
        help="JWT-SVID lifetime in seconds (default %(default)s)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        metavar="T",
        help="SPIFFE ID template giving every k8s workload an entry; placeholders {td}, {ns}, "
        "{sa}, {pod_name}, {pod_uid}, {node_name} (default %(default)s)",
    )
    source.add_argument(
        "--entries",
        metavar="FILE",
        help='registration entries instead of the template: a JSON list of {"spiffe_id", '
        '"selectors": ["k8s:ns:default", "k8s:sa:web"], "hint", "federates_with", "ttl"}',
    )
    parser.add_argument(
        "--federated-trust-domain",
        action="append",
        default=[],
        metavar="TD",
        help="federate with TD (its own CA; its bundles are sent too); repeatable",
    )
    parser.add_argument(
        "--federate-template",
        action="store_true",
        help="template entries federate with every --federated-trust-domain",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep the CAs in DIR (keys 0600) so a restarted agent keeps its trust bundle",
    )
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ec-p256",
        help="X.509-SVID key type (default %(default)s)",
    )
    parser.add_argument(
        "--intermediate",
        action="store_true",
        help="sign SVIDs with an intermediate CA (SVID chains are then [leaf, intermediate])",
    )
    parser.add_argument(
        "--authorized-uid",
        type=int,
        action="append",
        metavar="UID",
        help="only callers with this uid are authorized delegates; repeatable "
        "(default: every caller)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severe events logged (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="one key=value line or one JSON object per event (default %(default)s)",
    )


def build_agent(args: argparse.Namespace) -> DevAgent:
    """The agent the flags describe; ValueError (EntriesError too) or CAError if wrong."""
    trust_domain = normalise_trust_domain(args.trust_domain)
    entries = None
    if args.entries:
        entries = load_entries_file(args.entries, trust_domain=trust_domain)
    return DevAgent(
        trust_domain,
        svid_ttl=args.svid_ttl,
        jwt_ttl=args.jwt_ttl,
        key_type=args.key_type,
        template=args.template,
        entries=entries,
        federated_trust_domains=args.federated_trust_domain,
        federate_template=args.federate_template,
        authorized_uids=args.authorized_uid,
        intermediate=args.intermediate,
        data_dir=args.data_dir,
    )


def run(args: argparse.Namespace) -> int:
    log.setup(args.log_level, args.log_format)
    try:
        agent = build_agent(args)
    except (ValueError, CAError) as exc:
        print(f"trio-spirecsi dev-agent: {exc}", file=sys.stderr)
        return 2
    try:
        Path(args.socket).parent.mkdir(parents=True, exist_ok=True)
        trio.run(_main, agent, args)
    except BaseException as exc:
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if not isinstance(leaf, OSError):
            raise
        reason = (leaf.strerror or str(leaf)).lower()
        print(
            f"trio-spirecsi dev-agent: --socket {args.socket!r}: cannot serve there ({reason}); "
            "give a path in a folder this user can write",
            file=sys.stderr,
        )
        return 2
    return 0


async def _main(agent: DevAgent, args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(*_STOP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP) as sigs:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(agent.serve, args.socket, mode=args.socket_mode))
            async for signum in sigs:
                if signum == signal.SIGUSR1:
                    agent.rotate()
                elif signum == signal.SIGUSR2:
                    agent.rotate_ca()
                elif signum == signal.SIGHUP:
                    _reload(agent, args)
                else:
                    log.event(logger, logging.INFO, "stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break


def _reload(agent: DevAgent, args: argparse.Namespace) -> None:
    if not args.entries:
        return
    try:
        agent.set_entries(load_entries_file(args.entries, trust_domain=agent.trust_domain))
    except EntriesError as exc:
        log.event(logger, logging.ERROR, "entries_reload_failed", error=str(exc))
