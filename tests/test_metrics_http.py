"""The metrics / health HTTP endpoint, over real TCP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.harness import open_node
from trio_spirecsi.csi.client import publish_request, volume_context
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.httpserver import check_health, parse_addr, serve_http
from trio_spirecsi.metrics import PUBLISH_OUTCOMES, PUBLISH_PHASES, Metrics

WAIT = 30.0


@dataclass
class Readiness:
    ok: bool = True
    reason: str = "ok"
    calls: int = 0

    def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        return self.ok, self.reason


@dataclass
class Server:
    port: int
    metrics: Metrics
    readiness: Readiness
    expiries: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def _start(
    nursery: trio.Nursery, read_timeout: float = 10.0, readiness: Readiness | None = None
) -> Server:
    metrics = Metrics()
    ready = readiness or Readiness()
    server = Server(0, metrics, ready)
    metrics.set_expiry_source(lambda: server.expiries)

    async def run(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_http(
            "127.0.0.1", 0, metrics, ready, read_timeout=read_timeout, task_status=task_status
        )

    server.port = await nursery.start(run)
    return server


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    yield await _start(nursery)


async def raw(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data``, then read until the server closes the connection."""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            return bytes(received)


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers, body)


async def request(
    port: int, path: str, method: str = "GET", headers: Iterable[str] = ()
) -> Response:
    head = "".join(f"{h}\r\n" for h in (f"Host: 127.0.0.1:{port}", *headers))
    return parse_response(await raw(port, f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode()))


def samples(body: bytes) -> list[Sample]:
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(body: bytes, name: str, **labels: str) -> float | None:
    for sample in samples(body):
        if sample.name == name and sample.labels == labels:
            return sample.value
    return None


METRIC_NAMES = [
    "trio_spirecsi_volumes_published",
    "trio_spirecsi_publish_duration_seconds",
    "trio_spirecsi_publish_phase_seconds",
    "trio_spirecsi_unpublish_total",
    "trio_spirecsi_svid_rotations_total",
    "trio_spirecsi_bundle_updates_total",
    "trio_spirecsi_agent_connected",
    "trio_spirecsi_agent_reconnects_total",
    "trio_spirecsi_errors_total",
    "trio_spirecsi_svid_expiry_min_seconds",
    "trio_spirecsi_svids_expiring",
    "trio_spirecsi_build_info",
    "trio_spirecsi_sds_streams_open",
    "trio_spirecsi_sds_resources_sent_total",
    "trio_spirecsi_sds_nacks_total",
]
PROCESS_METRIC_NAMES = [
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "python_gc_objects_collected_total",
    "python_gc_objects_uncollectable_total",
    "python_gc_collections_total",
]


async def test_metrics_endpoint_exposes_every_metric_with_current_values(server: Server) -> None:
    m = server.metrics
    m.volumes_published.set(3)
    m.publish_duration.labels(outcome="ok").observe(0.2)
    m.publish_duration.labels(outcome="timeout").observe(30.0)
    m.unpublish_total.inc()
    m.svid_rotations_total.inc(4)
    m.bundle_updates_total.inc(2)
    m.agent_connected.set(1)
    m.agent_reconnects_total.inc()
    m.errors_total.labels(kind="bad_svid").inc()

    response = await request(server.port, "/metrics")

    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["connection"] == "close"
    assert int(response.headers["content-length"]) == len(response.body)
    text = response.body.decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name}" in text, name
    body = response.body
    assert value(body, "trio_spirecsi_volumes_published") == 3
    assert value(body, "trio_spirecsi_publish_duration_seconds_count", outcome="ok") == 1
    assert value(body, "trio_spirecsi_publish_duration_seconds_count", outcome="timeout") == 1
    assert value(body, "trio_spirecsi_unpublish_total") == 1
    assert value(body, "trio_spirecsi_svid_rotations_total") == 4
    assert value(body, "trio_spirecsi_bundle_updates_total") == 2
    assert value(body, "trio_spirecsi_agent_connected") == 1
    assert value(body, "trio_spirecsi_agent_reconnects_total") == 1
    assert value(body, "trio_spirecsi_errors_total", kind="bad_svid") == 1


async def test_every_publish_outcome_has_a_series_before_any_publish(server: Server) -> None:
    body = (await request(server.port, "/metrics")).body
    for outcome in PUBLISH_OUTCOMES:
        assert value(body, "trio_spirecsi_publish_duration_seconds_count", outcome=outcome) == 0


async def test_no_metric_carries_a_per_pod_label(server: Server) -> None:
    server.expiries[:] = [time.time() + 600, time.time() + 7200]
    server.metrics.errors_total.labels(kind="corrupt_metadata").inc()
    server.metrics.publish_duration.labels(outcome="ok").observe(1.0)

    body = (await request(server.port, "/metrics")).body

    label_names = {name for sample in samples(body) for name in sample.labels}
    assert label_names == {
        "outcome",
        "phase",
        "kind",
        "le",
        "version",
        "within_seconds",
        "resource",
        "generation",
    }


async def test_expiry_min_gauge_follows_the_source_at_scrape_time(server: Server) -> None:
    body = (await request(server.port, "/metrics")).body
    assert value(body, "trio_spirecsi_svid_expiry_min_seconds") is None
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="+Inf") == 0

    now = time.time()
    server.expiries[:] = [now + 5000, now + 100, now + 90_000]
    body = (await request(server.port, "/metrics")).body
    minimum = value(body, "trio_spirecsi_svid_expiry_min_seconds")
    assert minimum is not None
    assert 0 < minimum <= 100
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="0") == 0
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="300") == 1
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="7200") == 2
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="86400") == 2
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="+Inf") == 3

    server.expiries[:] = [now - 60, now + 5000]
    body = (await request(server.port, "/metrics")).body
    minimum = value(body, "trio_spirecsi_svid_expiry_min_seconds")
    assert minimum is not None
    assert minimum <= -60
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="0") == 1
    assert value(body, "trio_spirecsi_svids_expiring", within_seconds="+Inf") == 2


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(server: Server) -> None:
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    response = await request(server.port, "/metrics", headers=[accept])

    assert response.status == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")
    assert b"# TYPE trio_spirecsi_svids_expiring gauge\n" in response.body
    assert b"_created" not in response.body


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text;version=1.0.0"])
async def test_exposition_follows_prometheus_conventions(server: Server, accept: str) -> None:
    """No _created series, every gauge typed gauge (no gauge histogram and its _gcount and
    _gsum), and the standard process metrics with plausible values."""
    server.expiries[:] = [time.time() + 600]
    server.metrics.unpublish_total.inc()
    server.metrics.errors_total.labels(kind="bad_svid").inc()
    server.metrics.publish_duration.labels(outcome="ok").observe(0.2)
    response = await request(server.port, "/metrics", headers=[f"Accept: {accept}"])
    body = response.body.decode()
    assert "_created" not in body
    assert "_gcount" not in body and "_gsum" not in body
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE))
    assert "gaugehistogram" not in types.values()
    assert types["trio_spirecsi_svids_expiring"] == "gauge"
    assert types["trio_spirecsi_svid_expiry_min_seconds"] == "gauge"
    assert types["trio_spirecsi_volumes_published"] == "gauge"
    found = {s.name: s.value for s in samples(response.body)}
    for name in PROCESS_METRIC_NAMES:
        assert name in found, name
    assert found["process_resident_memory_bytes"] > 1 << 20
    assert found["process_open_fds"] >= 3
    assert abs(found["process_start_time_seconds"] - time.time()) < 86400


async def test_healthz_answers_ok_even_when_not_ready(server: Server) -> None:
    server.readiness.ok, server.readiness.reason = False, "agent unreachable: connection refused"

    response = await request(server.port, "/healthz")

    assert response.status == 200
    assert response.body == b"ok\n"


async def test_readyz_flips_with_the_callback_and_explains_why(server: Server) -> None:
    assert (await request(server.port, "/readyz")).status == 200

    server.readiness.ok = False
    server.readiness.reason = "agent unreachable: [Errno 2] No such file or directory"
    response = await request(server.port, "/readyz")
    assert response.status == 503
    assert response.body == b"agent unreachable: [Errno 2] No such file or directory\n"

    server.readiness.ok, server.readiness.reason = True, "ok"
    response = await request(server.port, "/readyz?verbose=1")
    assert response.status == 200
    assert response.body == b"ok\n"


@dataclass
class _Raising(Readiness):
    def __call__(self) -> tuple[bool, str]:
        raise RuntimeError("registry is gone")


async def test_a_failing_readiness_callback_is_a_503_not_a_crash(nursery: trio.Nursery) -> None:
    server = await _start(nursery, readiness=_Raising())

    response = await request(server.port, "/readyz")
    assert response.status == 503
    assert b"readiness check failed" in response.body
    assert (await request(server.port, "/healthz")).status == 200


async def test_unknown_path_is_404(server: Server) -> None:
    response = await request(server.port, "/secrets")
    assert response.status == 404
    assert b"/metrics" in response.body


async def test_writes_are_refused_with_405_and_allow(server: Server) -> None:
    data = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    response = parse_response(await raw(server.port, data))
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert (await request(server.port, "/readyz", method="DELETE")).status == 405


async def test_head_returns_headers_without_a_body(server: Server) -> None:
    response = await request(server.port, "/healthz", method="HEAD")
    assert response.status == 200
    assert response.headers["content-length"] == "3"
    assert response.body == b""


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"\r\n\r\n",
    ],
)
async def test_garbage_requests_get_400(server: Server, garbage: bytes) -> None:
    response = parse_response(await raw(server.port, garbage))
    assert response.status == 400
    assert response.headers["connection"] == "close"


async def test_a_client_closing_mid_request_does_not_stop_the_server(server: Server) -> None:
    for _ in range(3):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET /metr")
        await stream.aclose()
    half_closed = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with half_closed:
        await half_closed.send_all(b"GET /metr")
        await half_closed.send_eof()
        with trio.fail_after(WAIT):
            answer = await half_closed.receive_some(65536)
    assert parse_response(answer).status == 400
    assert (await request(server.port, "/healthz")).status == 200


async def test_an_oversized_request_head_is_refused(server: Server) -> None:
    huge = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            # The server may close before reading everything.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(huge)
            received = bytearray()
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    received += chunk
    assert parse_response(bytes(received)).status == 431
    assert (await request(server.port, "/healthz")).status == 200


async def test_a_slow_client_is_cut_off_while_others_are_served(nursery: trio.Nursery) -> None:
    server = await _start(nursery, read_timeout=0.5)
    with trio.fail_after(WAIT):
        slow = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with slow:
            await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            assert (await request(server.port, "/healthz")).status == 200
            received = bytearray()
            while chunk := await slow.receive_some(65536):
                received += chunk
    assert parse_response(bytes(received)).status == 408


async def test_check_health_reports_what_the_endpoint_answers(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    assert await check_health(f"{base}/healthz", timeout=WAIT)
    server.readiness.ok, server.readiness.reason = False, "agent unreachable: x"
    assert not await check_health(f"{base}/readyz", timeout=WAIT)
    assert not await check_health(f"{base}/nope", timeout=WAIT)


async def test_check_health_is_false_when_nothing_listens() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    assert not await check_health(f"http://127.0.0.1:{port}/healthz", timeout=WAIT)


async def test_check_health_gives_up_after_its_timeout() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(WAIT):
            assert not await check_health(f"http://127.0.0.1:{port}/healthz", timeout=0.3)


@pytest.mark.parametrize("url", ["https://127.0.0.1:9809/healthz", "127.0.0.1:9809", "http:///x"])
async def test_check_health_refuses_urls_it_cannot_use(url: str) -> None:
    with pytest.raises(ValueError, match="http://host:port/path"):
        await check_health(url, timeout=1.0)


def test_each_metrics_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.unpublish_total.inc()
    first_body, _ = first.render()
    second_body, _ = second.render()
    assert value(first_body, "trio_spirecsi_unpublish_total") == 1
    assert value(second_body, "trio_spirecsi_unpublish_total") == 0


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("0.0.0.0:9809", ("0.0.0.0", 9809)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":9809", ("", 9809)),
        ("[::1]:9809", ("::1", 9809)),
        ("[::]:80", ("::", 80)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_addr_accepts_the_documented_forms(addr: str, expected: tuple[str, int]) -> None:
    assert parse_addr(addr) == expected


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("9809", "a port alone; write :9809"),
        ("0.0.0.0", "no port"),
        ("host:", "not a number"),
        ("host:http", "not a number"),
        ("host:-1", "not a number"),
        ("host:65536", "out of range"),
        ("::1:9809", "brackets"),
        ("[::1:9809", "brackets"),
        ("[]:9809", "brackets"),
        ("a b:1", "invalid host"),
        ("host:٣", "not a number"),
    ],
)
def test_parse_addr_explains_what_is_wrong(addr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_addr(addr)


async def test_serving_on_every_interface_with_an_empty_host(nursery: trio.Nursery) -> None:
    host, port = parse_addr(":0")
    bound: int = await nursery.start(_serve_all, host, port)
    # With port 0 each address family gets its own port; "localhost" tries both.
    data = await raw(bound, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", host="localhost")
    assert parse_response(data).status == 200


async def _serve_all(
    host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    await serve_http(host, port, Metrics(), Readiness(), task_status=task_status)


def test_every_metric_and_outcome_is_documented_for_operators() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    metrics = Metrics()
    metrics.set_expiry_source(lambda: [time.time() + 60])
    families = [f for f in metrics.registry.collect() if f.name.startswith("trio_spirecsi_")]
    assert len({f.name for f in families}) == len(METRIC_NAMES)
    for family in families:
        shown = family.name + ("_total" if family.type == "counter" else "")
        shown += "_info" if family.type == "info" else ""
        assert f"`{shown}`" in doc, shown
    for outcome in PUBLISH_OUTCOMES:
        assert f"`{outcome}`" in doc, outcome
    for phase in PUBLISH_PHASES:
        assert f"`{phase}`" in doc, phase


async def wait_for_readyz(port: int, status: int) -> Response:
    with trio.fail_after(WAIT):
        while True:
            response = await request(port, "/readyz")
            if response.status == status:
                return response
            await trio.sleep(0.05)


async def test_the_running_driver_reports_volumes_expiry_and_agent_readiness(
    tmp_path: Path,
) -> None:
    (tmp_path / "node" / "spire").mkdir(parents=True)
    async with open_node(tmp_path / "node") as node:
        driver = await node.start_driver(metrics_addr="127.0.0.1:0")
        assert driver.metrics_port
        port = driver.metrics_port

        async def scrape() -> bytes:
            return (await request(port, "/metrics")).body

        await node.publish(node.pod("web-0", "shop", "web"))
        body = await scrape()
        assert value(body, "trio_spirecsi_volumes_published") == 1
        assert value(body, "trio_spirecsi_publish_duration_seconds_count", outcome="ok") == 1
        assert value(body, "trio_spirecsi_agent_connected") == 1
        minimum = value(body, "trio_spirecsi_svid_expiry_min_seconds")
        assert minimum is not None and minimum > 0
        assert value(body, "trio_spirecsi_svids_expiring", within_seconds="+Inf") == 1
        assert (await request(port, "/readyz")).status == 200

        await node.stop_agent()
        response = await wait_for_readyz(port, 503)
        assert response.body.startswith(b"agent unreachable: ")
        assert (await request(port, "/healthz")).status == 200
        assert value(await scrape(), "trio_spirecsi_agent_connected") == 0

        await node.start_agent()
        await wait_for_readyz(port, 200)
        reconnects = value(await scrape(), "trio_spirecsi_agent_reconnects_total")
        assert reconnects is not None and reconnects >= 1


async def test_readyz_tells_a_refusing_agent_from_an_unreachable_one_and_recovers_fast(
    tmp_path: Path,
) -> None:
    refusing = DevAgent("example.org", authorized_uids={os.getuid() + 4242})
    (tmp_path / "node" / "spire").mkdir(parents=True)
    async with open_node(tmp_path / "node", refusing) as node:
        driver = await node.start_driver(metrics_addr="127.0.0.1:0")
        assert driver.metrics_port
        port = driver.metrics_port
        response = await wait_for_readyz(port, 503)
        assert response.body.startswith(b"agent refused: ")
        assert b"authorized_delegates" in response.body
        # Long enough for an exponential schedule to back off to many seconds; a refused
        # driver keeps asking at least every second instead.
        await trio.sleep(8)
        refusing.authorized_uids = None
        with trio.fail_after(4):  # generous: the schedule retries within a second
            await wait_for_readyz(port, 200)
        await node.stop_agent()
        response = await wait_for_readyz(port, 503)
        assert response.body.startswith(b"agent unreachable: ")


async def test_a_publish_shows_where_its_time_went_phase_by_phase(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "node" / "spire").mkdir(parents=True)
    async with open_node(tmp_path / "node") as node:
        driver = await node.start_driver(metrics_addr="127.0.0.1:0")
        assert driver.metrics_port
        pod = node.pod("web-0", "shop", "web")
        with caplog.at_level(logging.DEBUG, logger="trio_spirecsi.csi.node"):
            volume_id, target = await node.publish(pod)
        body = (await request(driver.metrics_port, "/metrics")).body
        total = value(body, "trio_spirecsi_publish_duration_seconds_sum", outcome="ok")
        assert total is not None
        spent = 0.0
        for phase in PUBLISH_PHASES:
            name = "trio_spirecsi_publish_phase_seconds"
            assert value(body, f"{name}_count", phase=phase) == 1, phase
            seconds = value(body, f"{name}_sum", phase=phase)
            assert seconds is not None and seconds >= 0, phase
            spent += seconds
        # The phases follow each other inside the handler: together, never more than it.
        assert spent <= total
        [line] = [r for r in caplog.records if r.getMessage() == "publish_phases"]
        fields = line.__dict__["fields"]
        assert fields["volume_id"] == volume_id
        assert fields["pod"] == "shop/web-0"
        assert {f"{p}_ms" for p in PUBLISH_PHASES} <= set(fields)

        # Publishing the same volume again creates nothing: no phases to show.
        await node.client.publish(publish_request(volume_id, str(target), volume_context(pod)))
        body = (await request(driver.metrics_port, "/metrics")).body
        assert value(body, "trio_spirecsi_publish_duration_seconds_count", outcome="ok") == 2
        for phase in PUBLISH_PHASES:
            assert value(body, "trio_spirecsi_publish_phase_seconds_count", phase=phase) == 1
