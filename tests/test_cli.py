"""The command line as a user meets it: every mistake is one line naming the flag, its value
and the fix, with exit status 2 (a setting the command cannot use) or 1 (it ran and failed),
never a traceback; ``--help`` shows every default and marks required flags."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_spirecsi.config import _FLAGS, REQUIRED_SERVE_FLAGS

CLI = [sys.executable, "-m", "trio_spirecsi.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_SPIRECSI_")}
    environ.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=environ, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command; nothing on stdout, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@contextlib.contextmanager
def listening_unix_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def no_connection_came(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def serve_args(tmp_path: Path, **overrides: str) -> list[str]:
    values = {
        "csi-endpoint": f"unix://{tmp_path}/plugin/csi.sock",
        "admin-socket": str(tmp_path / "admin.sock"),
        "node-id": "node-a",
        "state-dir": str(tmp_path / "state"),
        "kubelet-dir": str(tmp_path / "kubelet"),
    }
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return ["serve", *(f"--{k}={v}" for k, v in values.items())]


# --- serve: configuration mistakes, found before the agent is contacted -------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"metrics-addr": "9809"},
            "--metrics-addr '9809': a port alone; write :9809 (every interface) or 0.0.0.0:9809",
        ),
        (
            {"metrics-addr": "localhost"},
            "--metrics-addr 'localhost': no port; write host:port, :port (every interface) "
            "or [ipv6]:port, e.g. 0.0.0.0:9809",
        ),
        (
            {"csi-endpoint": "tcp://127.0.0.1:10000"},
            "--csi-endpoint 'tcp://127.0.0.1:10000': only unix sockets are supported; "
            "give unix:///path/to/csi.sock",
        ),
        ({"publish-timeout": "soon"}, "--publish-timeout 'soon': give seconds, e.g. 30"),
        (
            {"publish-timeout": "0"},
            "--publish-timeout '0': must be more than 0 and at most 600 seconds",
        ),
        ({"state-dir": "run/state"}, "--state-dir 'run/state': give an absolute path"),
        ({"node-id": " "}, "--node-id ' ': empty; pass the node name (spec.nodeName)"),
    ],
)
def test_a_bad_serve_flag_is_one_line_naming_it(
    tmp_path: Path, override: dict[str, str], message: str
) -> None:
    with listening_unix_socket(tmp_path / "admin.sock") as agent:
        result = run(*serve_args(tmp_path, **override))
        assert no_connection_came(agent)
    assert result.returncode == 2
    assert one_line_error(result) == f"trio-spirecsi serve: {message}"
    assert not (tmp_path / "state").exists()


def test_a_bad_environment_variable_is_named_as_such(tmp_path: Path) -> None:
    result = run(*serve_args(tmp_path), env={"TRIO_SPIRECSI_METRICS_ADDR": "9809"})
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi serve: TRIO_SPIRECSI_METRICS_ADDR='9809': a port alone; "
        "write :9809 (every interface) or 0.0.0.0:9809"
    )
    result = run(*serve_args(tmp_path), env={"TRIO_SPIRECSI_LOG_FORMAT": "yaml"})
    assert one_line_error(result) == (
        "trio-spirecsi serve: TRIO_SPIRECSI_LOG_FORMAT='yaml': choose one of text, json"
    )


def test_missing_settings_are_listed_in_one_line() -> None:
    result = run("serve", "--node-id", "n")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi serve: missing required settings: --csi-endpoint (or "
        "TRIO_SPIRECSI_CSI_ENDPOINT), --admin-socket (or TRIO_SPIRECSI_ADMIN_SOCKET), "
        "--state-dir (or TRIO_SPIRECSI_STATE_DIR); see trio-spirecsi serve --help"
    )


def test_an_unknown_choice_is_one_line() -> None:
    result = run("serve", "--log-level", "loud")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi serve: argument --log-level: invalid choice: 'loud' (choose from "
        "'debug', 'info', 'warning', 'error'); see trio-spirecsi serve --help"
    )


def test_a_metrics_port_in_use_fails_before_the_agent_is_contacted(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with listening_unix_socket(tmp_path / "admin.sock") as agent:
            result = run(*serve_args(tmp_path, metrics_addr=f"127.0.0.1:{port}"))
            assert no_connection_came(agent)
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"trio-spirecsi serve: --metrics-addr '127.0.0.1:{port}': cannot listen (address "
        "already in use); stop the other process or choose another port"
    )
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "plugin").exists()


def test_a_state_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    with listening_unix_socket(tmp_path / "admin.sock") as agent:
        result = run(*serve_args(tmp_path, state_dir=str(state), metrics_addr="127.0.0.1:0"))
        assert no_connection_came(agent)
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"trio-spirecsi serve: --state-dir '{state}': cannot create or use it "
        f"({tmp_path / 'file'}: file exists); give a writable folder on tmpfs, "
        "e.g. /run/trio-spirecsi"
    )


def test_a_csi_socket_path_taken_by_a_file_or_a_live_server_is_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "plugin").mkdir()
    csi = tmp_path / "plugin" / "csi.sock"
    csi.write_text("not a socket")
    result = run(*serve_args(tmp_path))
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"trio-spirecsi serve: --csi-endpoint 'unix://{csi}': {csi} exists and is not a "
        "socket; remove it or choose another path"
    )
    csi.unlink()
    with listening_unix_socket(csi), listening_unix_socket(tmp_path / "admin.sock") as agent:
        result = run(*serve_args(tmp_path))
        assert no_connection_came(agent)
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"trio-spirecsi serve: --csi-endpoint 'unix://{csi}': another process already "
        f"listens on {csi}; stop it (is another driver running on this node?) or choose "
        "another path"
    )


# --- the other commands -----------------------------------------------------------------


def test_csi_client_mistakes_name_its_own_flags(tmp_path: Path) -> None:
    result = run("csi", "--endpoint", "tcp://127.0.0.1:1", "probe")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi csi probe: --endpoint 'tcp://127.0.0.1:1': only unix sockets are "
        "supported; give unix:///path/to/csi.sock"
    )

    result = run("csi", "probe")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi csi probe: no driver socket; give --endpoint "
        "unix:///path/to/csi.sock (or TRIO_SPIRECSI_CSI_ENDPOINT)"
    )

    missing = tmp_path / "csi.sock"
    result = run("csi", "--endpoint", f"unix://{missing}", "info")
    assert result.returncode == 1
    assert one_line_error(result) == (
        f"trio-spirecsi csi info: --endpoint 'unix://{missing}': the driver does not answer "
        f"(connect to {missing}: No such file or directory); check that it runs and that "
        "this is its CSI socket"
    )

    result = run(
        "csi", "--endpoint", str(missing), "publish", "--volume-id", "v", "--target-path", "/t",
        "--attr", "csi.spire.io/svid-file",
    )  # fmt: skip
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi csi publish: --attr 'csi.spire.io/svid-file': write it as key=value"
    )

    result = run("csi", "--timeout", "soon", "probe")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi csi: argument --timeout: 'soon' is not a positive number of seconds; "
        "see trio-spirecsi csi --help"
    )


def test_healthcheck_says_why_it_fails() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = run("healthcheck", "--url", f"http://127.0.0.1:{port}/healthz")
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith(f"trio-spirecsi healthcheck: --url 'http://127.0.0.1:{port}/healthz'")
    assert "connection refused" in line
    assert line.endswith("; check that the driver runs with --metrics-addr on that port")

    result = run("healthcheck", "--url", "https://127.0.0.1:9809/healthz")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi healthcheck: --url 'https://127.0.0.1:9809/healthz': "
        "expected http://host:port/path"
    )


def test_dev_agent_and_demo_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    socket_path = tmp_path / "file" / "admin.sock"
    result = run("dev-agent", "--socket", str(socket_path))
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"trio-spirecsi dev-agent: --socket '{socket_path}': cannot serve there (file "
        "exists); give a path in a folder this user can write"
    )

    result = run("demo", "--svid-ttl", "0")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "trio-spirecsi demo: argument --svid-ttl: '0' is not a number of seconds from 2 to "
        "3600; see trio-spirecsi demo --help"
    )

    result = run("sevre")
    assert result.returncode == 2
    assert one_line_error(result).startswith(
        "trio-spirecsi: argument command: invalid choice: 'sevre'"
    )


# --- help --------------------------------------------------------------------------------


def _help(*command: str) -> str:
    result = run(*command, "--help", env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _option_help(text: str, option: str) -> str:
    """The option's entry in --help (its line and the indented lines after it), as one line."""
    match = re.search(rf"^  {re.escape(option)}\b.*\n(?:   +\S.*\n)*", text, re.MULTILINE)
    assert match, f"{option} missing from help"
    return " ".join(match[0].split())


def test_serve_help_marks_required_flags_and_shows_every_default() -> None:
    text = _help("serve")
    assert "Required: " + ", ".join(REQUIRED_SERVE_FLAGS) in " ".join(text.split())
    for flag in _FLAGS:
        line = _option_help(text, "--" + flag.name)
        assert flag.env in line
        if flag.required:
            assert line.endswith("(required)"), line
        elif flag.default:
            assert line.endswith(f"(default: {flag.default})"), line
        else:
            assert line.endswith("(default: empty)"), line


@pytest.mark.parametrize(
    ("command", "option", "shown"),
    [
        (("csi",), "--timeout", "(default: 120)"),
        (("csi",), "--endpoint", "(default: env TRIO_SPIRECSI_CSI_ENDPOINT"),
        (("csi", "publish"), "--pod-name", "(default: demo)"),
        (("csi", "publish"), "--namespace", "(default: default)"),
        (("csi", "publish"), "--service-account", "(default: default)"),
        (("csi", "publish"), "--pod-uid", "(default: a new random UUID)"),
        (("csi", "publish"), "--volume-id", "(required)"),
        (("healthcheck",), "--url", "(default: http://127.0.0.1:9809/healthz)"),
        (("healthcheck",), "--timeout", "(default: 3)"),
        (("demo",), "--svid-ttl", "(default: 20)"),
        (("dev-agent",), "--svid-ttl", "(default 3600)"),
    ],
)
def test_every_command_shows_its_defaults(
    command: tuple[str, ...], option: str, shown: str
) -> None:
    assert shown in _option_help(_help(*command), option)
