"""Command-line flags and environment variables into one validated Settings value."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "TRIO_SPIRECSI_"
DEFAULT_DRIVER_NAME = "csi.spire.io"


class ConfigError(Exception):
    """A flag or environment variable has a value the driver cannot use."""


@dataclass(frozen=True)
class Settings:
    csi_socket: Path
    admin_socket: Path
    node_id: str
    state_dir: Path
    kubelet_dir: Path
    driver_name: str = DEFAULT_DRIVER_NAME
    publish_timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "text"
    metrics_addr: str = ""
    selinux_context: str = ""


@dataclass(frozen=True)
class _Flag:
    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")


_FLAGS = (
    _Flag(
        "csi-endpoint",
        "CSI socket the kubelet dials, as unix:///path or a path (e.g. unix:///csi/csi.sock)",
    ),
    _Flag(
        "admin-socket",
        "SPIRE agent admin socket serving the Delegated Identity API "
        "(the agent's admin_socket_path, e.g. /run/spire/admin/admin.sock)",
    ),
    _Flag("node-id", "this node's name (NodeGetInfo and the k8s:node-name selector)"),
    _Flag(
        "state-dir",
        "folder for per-volume metadata and files; put it on tmpfs (e.g. /run/trio-spirecsi) "
        "so private keys never reach a disk",
    ),
    _Flag(
        "kubelet-dir",
        "kubelet root folder; target paths outside it are refused",
        default="/var/lib/kubelet",
    ),
    _Flag("driver-name", "CSI driver name (must match the CSIDriver object)", DEFAULT_DRIVER_NAME),
    _Flag(
        "publish-timeout",
        "seconds NodePublishVolume waits for the agent's first SVID before failing",
        "30",
    ),
    _Flag("log-level", "log level", "info", ("debug", "info", "warning", "error")),
    _Flag("log-format", "log line format", "text", ("text", "json")),
    _Flag(
        "metrics-addr",
        "host:port for /metrics, /healthz and /readyz (empty disables), e.g. 0.0.0.0:9809",
        "",
    ),
    _Flag(
        "selinux-context",
        "SELinux context for the volume mounts so containers can read them on enforcing "
        "nodes (e.g. system_u:object_r:container_file_t:s0); empty leaves it unset",
        "",
    ),
)

SERVE_FLAGS: frozenset[str] = frozenset("--" + f.name for f in _FLAGS)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in _FLAGS:
        default = f" (default: {flag.default!r})" if flag.default else ""
        parser.add_argument(
            "--" + flag.name,
            choices=flag.choices,
            help=f"{flag.help}{default}; env {flag.env}",
        )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    missing = []
    for flag in _FLAGS:
        value = getattr(args, flag.name.replace("-", "_"), None)
        if value is None:
            value = env.get(flag.env, flag.default)
        if value is None:
            missing.append(f"--{flag.name} (or {flag.env})")
            continue
        if flag.choices and value not in flag.choices:
            raise ConfigError(f"{flag.env}={value!r}: choose one of {', '.join(flag.choices)}")
        values[flag.name] = value
    if missing:
        raise ConfigError("missing required settings: " + ", ".join(missing))
    return _validate(values)


def parse_csi_endpoint(endpoint: str) -> Path:
    """``unix:///csi/csi.sock``, ``unix:/csi/csi.sock`` or ``/csi/csi.sock`` -> the path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise ConfigError(f"--csi-endpoint {endpoint!r}: only unix sockets are supported")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ConfigError(f"--csi-endpoint {endpoint!r}: give an absolute path (unix:///...)")
    return Path(path)


def _validate(v: Mapping[str, str]) -> Settings:
    for name in ("admin-socket", "state-dir", "kubelet-dir"):
        if not v[name].startswith("/"):
            raise ConfigError(f"--{name} {v[name]!r}: give an absolute path")
    if not v["node-id"].strip():
        raise ConfigError("--node-id is empty: pass the node name (spec.nodeName)")
    try:
        timeout = float(v["publish-timeout"])
    except ValueError:
        raise ConfigError(f"--publish-timeout {v['publish-timeout']!r}: give seconds") from None
    if not 0 < timeout <= 600:
        raise ConfigError(f"--publish-timeout {timeout}: must be between 0 and 600 seconds")
    return Settings(
        csi_socket=parse_csi_endpoint(v["csi-endpoint"]),
        admin_socket=Path(v["admin-socket"]),
        node_id=v["node-id"],
        state_dir=Path(v["state-dir"]),
        kubelet_dir=Path(v["kubelet-dir"]),
        driver_name=v["driver-name"],
        publish_timeout=timeout,
        log_level=v["log-level"],
        log_format=v["log-format"],
        metrics_addr=v["metrics-addr"],
        selinux_context=v["selinux-context"],
    )


def parse_serve(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="trio-spirecsi serve")
    add_serve_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)), environ)
