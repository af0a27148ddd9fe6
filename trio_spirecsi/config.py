"""Command-line flags and environment variables into one validated Settings value."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .grpc.limits import ServerLimits
from .heap import HeapPolicy
from .ratelimit import RateLimit

ENV_PREFIX = "TRIO_SPIRECSI_"
DEFAULT_DRIVER_NAME = "csi.spire.io"


class ConfigError(Exception):
    """A flag or environment variable has a value the driver cannot use.

    The message is one line that names the setting and its value and says what to do; the
    command line prints it as it is, without a traceback.
    """


_POD = ServerLimits()
_JWT = RateLimit(10.0, 20)


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
    pod_socket: ServerLimits = field(default_factory=ServerLimits)
    """Limits of every pod's socket (Workload API and SDS): its clients are untrusted."""
    pod_socket_jwt: RateLimit = field(default_factory=lambda: _JWT)
    """FetchJWTSVID and ValidateJWTSVID per pod and method."""
    keep_set_aside: int = 32
    heap: HeapPolicy = field(default_factory=HeapPolicy)
    """When the heap is frozen and fully collected (see :mod:`trio_spirecsi.heap`)."""


def _shown(value: float) -> str:
    """A default as the flag would be written: ``1048576``, ``5``, ``0.5``."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class _Limit:
    """A ``--pod-socket-*`` flag: the :class:`ServerLimits` field it sets and its type."""

    flag: str
    field: str
    kind: type[int] | type[float]
    help: str


_POD_LIMITS = (
    _Limit(
        "max-connections",
        "max_connections",
        int,
        "open connections per pod socket; more are closed at once",
    ),
    _Limit(
        "max-streams",
        "max_concurrent_streams",
        int,
        "concurrent streams per connection; more are refused (REFUSED_STREAM)",
    ),
    _Limit(
        "max-request-bytes",
        "max_request_bytes",
        int,
        "largest request message, after decompression; larger fail RESOURCE_EXHAUSTED",
    ),
    _Limit(
        "max-header-bytes",
        "max_header_list_bytes",
        int,
        "largest HTTP/2 header block; larger close the connection",
    ),
    _Limit(
        "max-continuation-frames",
        "max_continuation_frames",
        int,
        "CONTINUATION frames in one header block; more close the connection",
    ),
    _Limit(
        "max-frame-bytes",
        "max_frame_bytes",
        int,
        "largest HTTP/2 frame (16384-16777215); larger close the connection",
    ),
    _Limit("stream-window-bytes", "stream_window", int, "HTTP/2 receive window of one stream"),
    _Limit(
        "connection-window-bytes",
        "connection_window",
        int,
        "HTTP/2 receive window of one connection",
    ),
    _Limit(
        "handshake-timeout",
        "handshake_timeout",
        float,
        "seconds a new connection has to send the HTTP/2 preface and SETTINGS",
    ),
    _Limit(
        "idle-timeout",
        "idle_timeout",
        float,
        "seconds a connection may stay without a stream before it is closed (0: never)",
    ),
    _Limit(
        "max-queued-bytes",
        "max_send_queue_bytes",
        int,
        "bytes queued for a client that does not read; beyond, the connection is closed",
    ),
    _Limit(
        "control-frames-per-second",
        "control_frames_per_second",
        float,
        "PING, SETTINGS, RST_STREAM and other control frames per connection and second, on average",
    ),
    _Limit(
        "control-frame-burst",
        "control_frame_burst",
        int,
        "control frames per connection at once; beyond the budget: GOAWAY ENHANCE_YOUR_CALM",
    ),
    _Limit(
        "streams-per-second",
        "new_streams_per_second",
        float,
        "new streams per connection and second, on average (rapid reset)",
    ),
    _Limit(
        "stream-burst",
        "new_stream_burst",
        int,
        "new streams per connection at once; beyond the budget: GOAWAY ENHANCE_YOUR_CALM",
    ),
)


@dataclass(frozen=True)
class _Flag:
    """One ``serve`` setting: ``--name`` on the command line, ``TRIO_SPIRECSI_NAME`` in the
    environment. ``default`` None means required; ``--help`` shows the default or marks the
    flag required, so a new flag documents itself by being added to :data:`_FLAGS`."""

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def required(self) -> bool:
        return self.default is None


_FLAGS = (
    _Flag(
        "csi-endpoint",
        "CSI socket the kubelet dials, as unix:///path or a path (e.g. unix:///csi/csi.sock)",
    ),
    _Flag(
        "admin-socket",
        "SPIRE agent admin socket serving the Delegated Identity API "
        "(the agent's admin_socket_path; with SPIRE's Helm chart "
        "/run/spire/agent/sockets/csi.spiffe.io/admin/admin.sock)",
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
    *(
        _Flag(
            "pod-socket-" + limit.flag,
            limit.help + " (per-pod socket: Workload API and SDS)",
            _shown(getattr(_POD, limit.field)),
        )
        for limit in _POD_LIMITS
    ),
    _Flag(
        "pod-socket-jwt-per-second",
        "FetchJWTSVID and ValidateJWTSVID calls per pod, method and second, on average; "
        "beyond the burst they answer UNAVAILABLE",
        _shown(_JWT.per_second),
    ),
    _Flag(
        "pod-socket-jwt-burst",
        "FetchJWTSVID or ValidateJWTSVID calls per pod at once",
        str(_JWT.burst),
    ),
    _Flag(
        "keep-set-aside",
        "volume folders set aside (corrupt or unresumable; keys deleted) kept for inspection; "
        "older ones are deleted",
        "32",
    ),
    _Flag(
        "gc-freeze-interval",
        "seconds between two freezes of the heap, so that garbage collections examine only "
        "what changed since (0: the interpreter's own policy, with full collections of "
        "every volume's objects)",
        _shown(HeapPolicy.freeze_interval),
    ),
    _Flag(
        "gc-full-interval",
        "seconds between two full garbage collections of the frozen heap",
        _shown(HeapPolicy.full_interval),
    ),
    _Flag(
        "gc-freeze-rewrites",
        "also freeze the heap after this many volume rewrites (rotations) since the last "
        "freeze, so that young garbage collections during a rotation storm stay short "
        "(0: only on the timer)",
        _shown(HeapPolicy.freeze_after_rewrites),
    ),
)

SERVE_FLAGS: frozenset[str] = frozenset("--" + f.name for f in _FLAGS)
REQUIRED_SERVE_FLAGS: tuple[str, ...] = tuple("--" + f.name for f in _FLAGS if f.required)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``serve`` flag; its help ends with ``(required)`` or ``(default: ...)``."""
    for flag in _FLAGS:
        if flag.required:
            tail = "(required)"
        else:
            tail = f"(default: {flag.default})" if flag.default else "(default: empty)"
        parser.add_argument(
            "--" + flag.name,
            choices=flag.choices,
            metavar=flag.metavar or (None if flag.choices else flag.name.upper().replace("-", "_")),
            help=f"{flag.help}; env {flag.env} {tail}",
        )


class _Values:
    """The chosen value of each setting, and where it came from, for error messages."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.labels: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    def error(self, name: str, problem: str) -> ConfigError:
        """``--name 'value': problem`` (or ``TRIO_SPIRECSI_NAME='value': ...`` from the env)."""
        label = self.labels[name]
        sep = "=" if label.startswith(ENV_PREFIX) else " "
        return ConfigError(f"{label}{sep}{self.values[name]!r}: {problem}")


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over defaults.

    Raises ConfigError (one line naming the setting, its value and the fix) for a missing
    or unusable value; nothing is touched on disk or on the network before this passes.
    """
    env = os.environ if environ is None else environ
    v = _Values()
    missing = []
    for flag in _FLAGS:
        value = getattr(args, flag.name.replace("-", "_"), None)
        label = "--" + flag.name
        if value is None and flag.env in env:
            value, label = env[flag.env], flag.env
        if value is None:
            value = flag.default
        if value is None:
            missing.append(f"--{flag.name} (or {flag.env})")
            continue
        v.values[flag.name], v.labels[flag.name] = value, label
        if flag.choices and value not in flag.choices:
            raise v.error(flag.name, f"choose one of {', '.join(flag.choices)}")
    if missing:
        raise ConfigError(
            "missing required settings: " + ", ".join(missing) + "; see trio-spirecsi serve --help"
        )
    return _validate(v)


def parse_csi_endpoint(endpoint: str, flag: str = "--csi-endpoint") -> Path:
    """``unix:///csi/csi.sock``, ``unix:/csi/csi.sock`` or ``/csi/csi.sock`` -> the path.

    ``flag`` names the setting in the ConfigError raised for anything else.
    """
    try:
        return _csi_socket_path(endpoint)
    except ValueError as exc:
        raise ConfigError(f"{flag} {endpoint!r}: {exc}") from None


def _csi_socket_path(endpoint: str) -> Path:
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise ValueError("only unix sockets are supported; give unix:///path/to/csi.sock")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError("give an absolute path (unix:///...)")
    return Path(path)


ADDR_FORMS = "write host:port, :port (every interface) or [ipv6]:port, e.g. 0.0.0.0:9809"


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"`` (every interface) or ``"[::1]:port"`` -> (host, port).

    The host of ``":port"`` is ``""`` (every interface). Raises ValueError, saying what is
    wrong and the accepted forms, for anything else (a port alone included).
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        if addr.isascii() and addr.isdigit():
            raise ValueError(f"a port alone; write :{addr} (every interface) or 0.0.0.0:{addr}")
        raise ValueError(f"no port; {ADDR_FORMS}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"unbalanced brackets; {ADDR_FORMS}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 host in brackets; {ADDR_FORMS}")
    if any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"invalid host {host!r}; {ADDR_FORMS}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number; {ADDR_FORMS}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535; {ADDR_FORMS}")
    return host, port


def _validate(v: _Values) -> Settings:
    for name in ("admin-socket", "state-dir", "kubelet-dir"):
        if not v[name].startswith("/"):
            raise v.error(name, "give an absolute path")
    if not v["node-id"].strip():
        raise v.error("node-id", "empty; pass the node name (spec.nodeName)")
    try:
        timeout = float(v["publish-timeout"])
    except ValueError:
        raise v.error("publish-timeout", "give seconds, e.g. 30") from None
    if not 0 < timeout <= 600:
        raise v.error("publish-timeout", "must be more than 0 and at most 600 seconds")
    if v["metrics-addr"]:
        try:
            parse_addr(v["metrics-addr"])
        except ValueError as exc:
            raise v.error("metrics-addr", str(exc)) from None
    try:
        csi_socket = _csi_socket_path(v["csi-endpoint"])
    except ValueError as exc:
        raise v.error("csi-endpoint", str(exc)) from None
    limits: dict[str, int | float] = {}
    for limit in _POD_LIMITS:
        name = "pod-socket-" + limit.flag
        limits[limit.field] = _number(v, name, limit.kind, allow_zero=limit.field == "idle_timeout")
    if limits["idle_timeout"] == 0:
        del limits["idle_timeout"]
        limits_idle: float | None = None
    else:
        limits_idle = limits.pop("idle_timeout")
    try:
        pod_socket = ServerLimits(**limits, idle_timeout=limits_idle)  # type: ignore[arg-type]
    except ValueError as exc:  # "ServerLimits.<field> must be ..."
        where, _, problem = str(exc).partition(" ")
        field_name = where.rpartition(".")[2]
        flag = next(lim.flag for lim in _POD_LIMITS if lim.field == field_name)
        raise v.error("pod-socket-" + flag, problem) from None
    jwt = RateLimit(
        _number(v, "pod-socket-jwt-per-second", float), int(_number(v, "pod-socket-jwt-burst", int))
    )
    keep = int(_number(v, "keep-set-aside", int, allow_zero=True))
    heap = HeapPolicy(
        freeze_interval=_number(v, "gc-freeze-interval", float, allow_zero=True),
        full_interval=_number(v, "gc-full-interval", float),
        freeze_after_rewrites=int(_number(v, "gc-freeze-rewrites", int, allow_zero=True)),
    )
    return Settings(
        csi_socket=csi_socket,
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
        pod_socket=pod_socket,
        pod_socket_jwt=jwt,
        keep_set_aside=keep,
        heap=heap,
    )


def _number(
    v: _Values, name: str, kind: type[int] | type[float], *, allow_zero: bool = False
) -> float:
    """A positive finite number (zero too with ``allow_zero``) or a one-line ConfigError."""
    try:
        value = kind(v[name])
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise v.error(name, f"give {what}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise v.error(name, "must be 0 or more" if allow_zero else "must be more than 0")
    return value


def parse_serve(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="trio-spirecsi serve")
    add_serve_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)), environ)
