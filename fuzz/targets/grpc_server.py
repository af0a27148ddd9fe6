"""The gRPC server's protocol core on any bytes a pod could write to its Workload API socket.

Feeds the bytes (in two pieces, so that frames straddle reads) to a server-side
``ProtocolCore`` with the untrusted default limits, answering requests and consuming
messages as the server does. Promise: ``receive`` never raises; a connection failure is the
last event, is reported once, and queues GOAWAY with its error code; no message delivered is
larger than the limit; a stream failure carries a stream kind.
"""

from __future__ import annotations

import contextlib

from trio_spirecsi.grpc import ServerLimits
from trio_spirecsi.grpc._protocol import (
    BAD_STREAM,
    MESSAGE_TOO_LARGE,
    ConnectionFailed,
    MessageReceived,
    ProtocolCore,
    RequestStarted,
    StreamEnded,
    StreamFailed,
    StreamGone,
)
from trio_spirecsi.grpc.limits import WireLimits

LIMITS = WireLimits.for_server(ServerLimits())


def _goaway_code(data: bytes) -> int | None:
    """The error code of the last GOAWAY frame in ``data``, if any."""
    code = None
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if data[3] == 0x7 and length >= 8:
            code = int.from_bytes(data[13:17], "big")
        data = data[9 + length :]
    return code


def test_one_input(data: bytes) -> str:
    core = ProtocolCore(client_side=False, limits=LIMITS)
    core.initiate()
    core.data_to_send()
    events = []
    started: set[int] = set()
    half = len(data) // 2
    for now, piece in ((0.0, data[:half]), (0.5, data[half:])):
        batch = core.receive(piece, now)
        events += batch
        for event in batch:
            if isinstance(event, RequestStarted):
                started.add(event.stream_id)
            elif isinstance(event, StreamEnded) and event.stream_id in started:
                with contextlib.suppress(StreamGone):
                    core.respond(event.stream_id)
                core.respond_status(event.stream_id, 0, "", trailers_only=False)
                core.forget(event.stream_id)
            elif isinstance(event, MessageReceived):
                if len(event.data) > LIMITS.max_message_bytes:
                    raise AssertionError("a message larger than the limit was delivered")
                core.ack(event.stream_id, event.size)
            elif isinstance(event, StreamFailed) and event.kind not in (
                BAD_STREAM,
                MESSAGE_TOO_LARGE,
            ):
                raise AssertionError(f"stream failure of kind {event.kind}")
    failures = [e for e in events if isinstance(e, ConnectionFailed)]
    if failures:
        if len(failures) > 1 or events[-1] is not failures[0]:
            raise AssertionError("events after the connection failed")
        if _goaway_code(core.data_to_send()) != failures[0].error_code:
            raise AssertionError("a failed connection did not queue GOAWAY with its code")
        return "rejected"
    if any(isinstance(e, MessageReceived) for e in events):
        return "accepted"
    return "undecodable"
