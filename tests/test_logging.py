"""Structured logs: one JSON object a line with the fields operators search by, and never
key material or tokens."""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path

import trio

from tests.harness import eventually, open_node, read_identity


async def test_json_logs_carry_ids_and_durations_but_no_keys_or_tokens(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        proc = node.spawn_driver(**{"log-format": "json", "log-level": "debug"})
        await node.wait_for_socket(proc)
        pod = node.pod("api-0", "shop", "api")
        volume_id, target = await node.publish(
            pod, attributes={"csi.spire.io/jwt-audiences": "billing"}
        )
        before = read_identity(target).serial
        node.agent.rotate()
        await eventually(lambda: read_identity(target).serial != before, "rotated files")
        secrets = [
            (target / "svid_key.pem").read_bytes(),
            (target / "jwt_svid.token").read_bytes(),
        ]
        await node.client.unpublish(volume_id, str(target))
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 30) == 0
        assert proc.stderr is not None
        output = proc.stderr.read()

    lines = [json.loads(line) for line in output.decode().splitlines()]
    assert all(line["msg"] == line["event"] for line in lines)
    events = {line["msg"] for line in lines}
    assert {"serving", "publish", "files_written", "unpublish", "stopping"} <= events
    publish = next(line for line in lines if line["event"] == "publish")
    assert publish["volume_id"] == volume_id
    assert publish["pod"] == "shop/api-0"
    assert publish["spiffe_id"] == "spiffe://example.org/ns/shop/sa/api"
    assert publish["outcome"] == "ok"
    assert publish["duration_ms"] > 0

    key_pem, token = secrets
    key_body = b"".join(key_pem.strip().splitlines()[1:-1])
    forbidden = [b"PRIVATE KEY", key_body, key_body[:40], token, token.split(b".")[2]]
    forbidden.append(base64.b64encode(base64.b64decode(key_body))[:40])
    for needle in forbidden:
        assert needle not in output


def test_json_lines_start_with_the_klog_zap_keys() -> None:
    """ts, level and msg come first, as klog/zap-style log pipelines expect."""
    import logging

    from trio_spirecsi.log import JSONFormatter

    record = logging.LogRecord(
        "trio_spirecsi.daemon", logging.WARNING, "x", 1, "serving", None, None
    )
    record.fields = {"node_id": "node-a"}
    doc = json.loads(JSONFormatter().format(record))
    assert list(doc)[:3] == ["ts", "level", "msg"]
    assert doc["msg"] == doc["event"] == "serving"
    assert doc["level"] == "warning"
    assert doc["node_id"] == "node-a"
    assert abs(doc["ts"] - record.created) < 0.01
