"""Flags and environment variables become one validated Settings value."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_spirecsi.config import ConfigError, parse_csi_endpoint, parse_serve
from trio_spirecsi.grpc import ServerLimits
from trio_spirecsi.heap import HeapPolicy
from trio_spirecsi.ratelimit import RateLimit

REQUIRED = [
    "--csi-endpoint",
    "unix:///csi/csi.sock",
    "--admin-socket",
    "/run/spire/admin/admin.sock",
    "--node-id",
    "node-a",
    "--state-dir",
    "/run/trio-spirecsi",
]


def test_flags_give_settings_with_documented_defaults() -> None:
    settings = parse_serve(REQUIRED, environ={})
    assert settings.csi_socket == Path("/csi/csi.sock")
    assert settings.admin_socket == Path("/run/spire/admin/admin.sock")
    assert settings.node_id == "node-a"
    assert settings.kubelet_dir == Path("/var/lib/kubelet")
    assert settings.driver_name == "csi.spire.io"
    assert settings.publish_timeout == 30.0
    assert (settings.log_level, settings.log_format, settings.metrics_addr) == ("info", "text", "")


def test_every_setting_comes_from_the_environment_and_flags_win() -> None:
    environ = {
        "TRIO_SPIRECSI_CSI_ENDPOINT": "/plugins/csi.sock",
        "TRIO_SPIRECSI_ADMIN_SOCKET": "/admin.sock",
        "TRIO_SPIRECSI_NODE_ID": "from-env",
        "TRIO_SPIRECSI_STATE_DIR": "/state",
        "TRIO_SPIRECSI_KUBELET_DIR": "/var/snap/microk8s/common/var/lib/kubelet",
        "TRIO_SPIRECSI_PUBLISH_TIMEOUT": "5",
        "TRIO_SPIRECSI_LOG_FORMAT": "json",
    }
    settings = parse_serve(["--node-id", "from-flag"], environ=environ)
    assert settings.node_id == "from-flag"
    assert settings.csi_socket == Path("/plugins/csi.sock")
    assert settings.kubelet_dir == Path("/var/snap/microk8s/common/var/lib/kubelet")
    assert settings.publish_timeout == 5.0
    assert settings.log_format == "json"


def test_missing_settings_are_named_with_their_environment_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_serve(["--node-id", "n"], environ={})
    message = str(info.value)
    for name in ("--csi-endpoint", "TRIO_SPIRECSI_ADMIN_SOCKET", "--state-dir"):
        assert name in message
    assert "--node-id" not in message


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--publish-timeout", "soon", "give seconds"),
        ("--publish-timeout", "0", "more than 0 and at most 600"),
        ("--state-dir", "relative/dir", "absolute path"),
        ("--node-id", " ", "node name"),
        ("--csi-endpoint", "tcp://127.0.0.1:10000", "only unix sockets"),
    ],
)
def test_bad_values_say_what_to_fix(flag: str, value: str, says: str) -> None:
    argv = [*REQUIRED, flag, value]
    with pytest.raises(ConfigError) as info:
        parse_serve(argv, environ={})
    assert says in str(info.value)


def test_bad_choice_from_the_environment_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        parse_serve(REQUIRED, environ={"TRIO_SPIRECSI_LOG_FORMAT": "yaml"})
    assert "text, json" in str(info.value)


@pytest.mark.parametrize(
    "endpoint", ["unix:///csi/csi.sock", "unix:/csi/csi.sock", "/csi/csi.sock"]
)
def test_csi_endpoint_forms(endpoint: str) -> None:
    assert parse_csi_endpoint(endpoint) == Path("/csi/csi.sock")


# Limits of the per-pod socket ---------------------------------------------------------


def test_pod_socket_limits_default_to_the_untrusted_server_limits() -> None:
    settings = parse_serve(REQUIRED, environ={})
    assert settings.pod_socket == ServerLimits()
    assert settings.pod_socket.max_connections == 16
    assert settings.pod_socket.max_request_bytes == 64 * 1024
    assert settings.pod_socket_jwt == RateLimit(10.0, 20)
    assert settings.keep_set_aside == 32


def test_the_heap_policy_defaults_and_flags() -> None:
    assert parse_serve(REQUIRED, environ={}).heap == HeapPolicy(10.0, 3600.0)
    assert parse_serve(REQUIRED, environ={}).heap.freeze_after_rewrites == 64
    settings = parse_serve(
        [*REQUIRED, "--gc-freeze-interval", "0", "--gc-freeze-rewrites", "0"],
        environ={"TRIO_SPIRECSI_GC_FULL_INTERVAL": "60"},
    )
    assert settings.heap == HeapPolicy(
        freeze_interval=0.0, full_interval=60.0, freeze_after_rewrites=0
    )


def test_every_pod_socket_limit_has_a_flag_and_an_environment_variable() -> None:
    settings = parse_serve(
        [
            *REQUIRED,
            "--pod-socket-max-connections",
            "4",
            "--pod-socket-max-frame-bytes",
            "32768",
            "--pod-socket-idle-timeout",
            "0",
            "--pod-socket-jwt-per-second",
            "0.5",
        ],
        environ={"TRIO_SPIRECSI_POD_SOCKET_MAX_STREAMS": "3", "TRIO_SPIRECSI_KEEP_SET_ASIDE": "0"},
    )
    assert settings.pod_socket.max_connections == 4
    assert settings.pod_socket.max_concurrent_streams == 3
    assert settings.pod_socket.max_frame_bytes == 32768
    assert settings.pod_socket.idle_timeout is None
    assert settings.pod_socket_jwt.per_second == 0.5
    assert settings.keep_set_aside == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pod-socket-max-streams", "0"], "--pod-socket-max-streams '0': must be more than 0"),
        (["--pod-socket-max-streams", "many"], "--pod-socket-max-streams 'many': give a whole"),
        (
            ["--pod-socket-max-frame-bytes", "100"],
            "--pod-socket-max-frame-bytes '100': must be between 16384 and 16777215",
        ),
        (["--pod-socket-handshake-timeout", "nan"], "--pod-socket-handshake-timeout 'nan'"),
        (["--keep-set-aside", "-1"], "--keep-set-aside '-1': must be 0 or more"),
        (["--gc-freeze-interval", "-5"], "--gc-freeze-interval '-5': must be 0 or more"),
        (["--gc-full-interval", "0"], "--gc-full-interval '0': must be more than 0"),
        (["--gc-freeze-rewrites", "1.5"], "--gc-freeze-rewrites '1.5': give a whole number"),
        (["--gc-full-interval", "inf"], "--gc-full-interval 'inf': must be more than 0"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_serve([*REQUIRED, *args], environ={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
