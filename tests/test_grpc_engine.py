"""The gRPC engine's own promises: h2 left as shipped, purerpc in one module, limits, and a
sans-IO core that never raises whatever bytes it is fed."""

from __future__ import annotations

import ast
import itertools
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import PREFACE, deflate_bomb, grpc_message, raw_frame, request_headers
from trio_spirecsi.grpc import ClientLimits, ServerLimits
from trio_spirecsi.grpc._protocol import (
    ConnectionFailed,
    MessageReceived,
    ProtocolCore,
    RequestStarted,
    ResponseEnded,
    SettingsChanged,
    StreamEnded,
    StreamFailed,
    WindowUpdated,
)
from trio_spirecsi.grpc._purerpc import BadMessage, MessageReader, MessageTooLarge
from trio_spirecsi.grpc.limits import WireLimits

_END_STREAM_FLAG = 0x1

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_spirecsi"
KiB = 1024
MiB = 1024 * KiB


def test_importing_the_package_leaves_h2_as_shipped() -> None:
    script = textwrap.dedent(
        """
        import h2.connection, h2.stream
        transitions = dict(h2.stream._transitions)
        methods = dict(vars(h2.connection.H2Connection))

        def untouched():
            same_table = h2.stream._transitions.keys() == transitions.keys() and all(
                h2.stream._transitions[k] is v for k, v in transitions.items()
            )
            now = vars(h2.connection.H2Connection)
            return same_table and now.keys() == methods.keys() and all(
                now[k] is v for k, v in methods.items()
            )

        import trio_spirecsi.grpc
        trio_spirecsi.grpc.Server, trio_spirecsi.grpc.open_channel  # load the engine
        import purerpc  # already loaded through trio_spirecsi.grpc: no second patch
        print("after import:", untouched())
        from purerpc.grpclib._h2_monkeypatch import apply_patch
        apply_patch()  # what purerpc's import does: the check above would see it
        print("after patch:", untouched())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["after import: True", "after patch: False"]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_purerpc_is_imported_by_one_module_and_h2_only_by_the_core() -> None:
    importers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "purerpc" for name in _imports(path))
    }
    assert importers == {"grpc/_purerpc.py"}
    for name in ("client.py", "server.py", "_transport.py"):
        modules = _imports(PACKAGE / "grpc" / name)
        assert not [m for m in modules if m.split(".")[0] in ("h2", "hpack", "purerpc")], name


def test_limit_presets_and_defaults() -> None:
    untrusted = ServerLimits()
    assert (untrusted.max_connections, untrusted.max_concurrent_streams) == (16, 16)
    assert (untrusted.max_request_bytes, untrusted.max_header_list_bytes) == (64 * KiB, 16 * KiB)
    assert (untrusted.max_frame_bytes, untrusted.stream_window) == (16_384, 64 * KiB)
    assert (untrusted.connection_window, untrusted.max_send_queue_bytes) == (256 * KiB, MiB)
    assert (untrusted.handshake_timeout, untrusted.idle_timeout) == (5.0, 300.0)
    trusted = ServerLimits.trusted()
    assert trusted.max_request_bytes == 4 * MiB
    assert trusted.max_concurrent_streams == 65_536
    assert trusted.connection_window >= 64 * MiB
    assert ClientLimits.trusted().max_response_bytes == ClientLimits().max_response_bytes == 4 * MiB
    # A window always holds one whole message.
    wire = WireLimits.for_server(ServerLimits(max_request_bytes=MiB, stream_window=64 * KiB))
    assert wire.stream_window == MiB + 5
    assert wire.connection_window >= wire.stream_window


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_frame_bytes", 1000, "max_frame_bytes must be between 16384 and 16777215"),
        ("max_connections", 0, "max_connections must be a positive integer"),
        ("max_concurrent_streams", 2.5, "max_concurrent_streams must be a positive integer"),
        ("handshake_timeout", -1.0, "handshake_timeout must be a positive number"),
        ("stream_window", 2**31, "stream_window must be at most 2147483647"),
    ],
)
def test_limits_out_of_range_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerLimits(**{field: value})  # type: ignore[arg-type]
    assert ServerLimits(idle_timeout=None).idle_timeout is None


def test_decompression_never_yields_more_than_the_limit() -> None:
    limit = 64 * KiB
    exact = zlib.compress(b"a" * limit)
    reader = MessageReader("deflate", limit)
    [(data, size)] = reader.feed(grpc_message(exact, compressed=True), len(exact) + 5)
    assert (len(data), size) == (limit, len(exact) + 5)

    def feed(encoding: str | None, body: bytes) -> object:
        message = grpc_message(body, compressed=True)
        return MessageReader(encoding, limit).feed(message, len(message))

    for body in (zlib.compress(b"a" * (limit + 1)), deflate_bomb(512 * MiB)):
        with pytest.raises(MessageTooLarge):
            feed("deflate", body)
    with pytest.raises(BadMessage, match="truncated"):
        feed("gzip", deflate_bomb(1000, gzip=True)[:-6])
    with pytest.raises(BadMessage, match="without a grpc-encoding"):
        feed(None, exact)


@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    padding=st.integers(min_value=0, max_value=255),
    aligned=st.booleans(),
)
def test_messages_come_out_whole_however_the_frames_cut_them(
    bodies: list[bytes], cuts: list[int], padding: int, aligned: bool
) -> None:
    """Frames that hold one whole message each (``aligned``: cut at every message's end, and
    maybe inside some too), or parts and several: the same messages in the same order, and
    every flow-controlled byte (padding included) accounted once."""
    wire = b"".join(grpc_message(body) for body in bodies)
    ends = itertools.accumulate(len(body) + 5 for body in bodies) if aligned else ()
    points = sorted({0, len(wire), *ends, *(c for c in cuts if c < len(wire))})
    reader = MessageReader(None, 4096)
    out: list[tuple[bytes, int]] = []
    for start, end in itertools.pairwise(points):
        out.extend(reader.feed(wire[start:end], end - start + padding))
    assert [data for data, _ in out] == bodies
    assert sum(size for _, size in out) == len(wire) + padding * (len(points) - 1)
    assert not reader.partial


def test_a_whole_message_over_the_limit_in_one_frame_is_refused() -> None:
    frame = grpc_message(b"x" * 1025)
    with pytest.raises(MessageTooLarge):
        MessageReader(None, 1024).feed(frame, len(frame))
    [(data, size)] = MessageReader(None, 1025).feed(frame, len(frame))
    assert (data, size) == (b"x" * 1025, len(frame))


def _server_core() -> ProtocolCore:
    core = ProtocolCore(client_side=False, limits=WireLimits.for_server(ServerLimits()))
    core.initiate()
    return core


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(type, error code or 0) of each frame in ``data``."""
    found = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        kind = data[3]
        code = struct.unpack(">I", data[13:17])[0] if kind == 0x7 else 0
        found.append((kind, code))
        data = data[9 + length :]
    return found


def test_a_valid_request_goes_through_the_core() -> None:
    from hpack import Encoder

    core = _server_core()
    block = Encoder().encode(request_headers("/a.B/C", ("x-pod", "p")))
    data = PREFACE + raw_frame(0x4, 0, 0, b"") + raw_frame(0x1, 0x4, 1, block)
    data += raw_frame(0x0, 0x1, 1, grpc_message(b"hello"))
    events = core.receive(data, now=0.0)
    kinds = [SettingsChanged, RequestStarted, MessageReceived, StreamEnded]
    assert [type(e) for e in events] == kinds
    started, message = events[1], events[2]
    assert isinstance(message, MessageReceived) and message.data == b"hello"
    assert isinstance(started, RequestStarted)
    assert (started.path, started.metadata) == ("/a.B/C", (("x-pod", "p"),))


FRAME = st.builds(
    raw_frame,
    st.one_of(st.integers(0, 10), st.integers(0, 255)),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=40),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(FRAME, max_size=12),
    cuts=st.lists(st.integers(1, 64), max_size=8),
    client_side=st.booleans(),
)
def test_the_core_never_raises_and_a_failure_always_sends_goaway(
    frames: list[bytes], cuts: list[int], client_side: bool
) -> None:
    from hpack import Encoder

    limits = WireLimits.for_client(ClientLimits()) if client_side else None
    if client_side:
        assert limits is not None
        core = ProtocolCore(client_side=True, limits=limits)
        core.initiate()
        core.open_stream(request_headers("/a.B/C"))
        data = raw_frame(0x4, 0, 0, b"")
    else:
        core = _server_core()
        block = Encoder().encode(request_headers("/a.B/C"))
        data = PREFACE + raw_frame(0x4, 0, 0, b"") + raw_frame(0x1, 0x4, 1, block)
    data += b"".join(frames)
    core.data_to_send()
    events = []
    start = 0
    for cut in [*cuts, len(data)]:
        events += core.receive(data[start : start + cut], now=float(start))
        start += cut
    events += core.receive(data[start:], now=1e6)
    failures = [e for e in events if isinstance(e, ConnectionFailed)]
    assert len(failures) <= 1
    if failures:
        assert events[-1] is failures[0]
        assert core.receive(b"\0" * 9, now=2e6) == []
        sent = _frames(core.data_to_send())
        assert sent and sent[-1] == (0x7, failures[0].error_code)
    for event in events:
        if isinstance(event, StreamFailed):
            assert event.kind in ("grpc_message_too_large", "grpc_bad_stream")


def test_reset_and_window_update_after_a_finished_call_keep_the_connection() -> None:
    """grpcio ends unary responses with END_STREAM and then RST_STREAM; WINDOW_UPDATE may
    follow END_STREAM for a while. Neither is a connection error, forgotten stream or not."""
    import h2.connection
    from hpack import Encoder

    core = ProtocolCore(client_side=True, limits=WireLimits.for_client(ClientLimits()))
    core.initiate()
    encoder = Encoder()
    events = core.receive(raw_frame(0x4, 0, 0, b""), now=0.0)
    for sid in (1, 3):
        assert core.open_stream(request_headers("/a.B/C")) == sid
        core.send_data(sid, grpc_message(b"request"), end_stream=True)
        head = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        trailers = encoder.encode([("grpc-status", "0")])
        response = raw_frame(0x1, 0x4, sid, head) + raw_frame(0x0, 0, sid, grpc_message(b"r"))
        response += raw_frame(0x1, 0x5, sid, trailers)
        events += core.receive(response, now=0.0)
        if sid == 1:  # the first stream is dropped from h2's table, as it is under load
            h2.connection.H2Connection._open_streams(core.h2, 1)
            assert 1 not in core.h2.streams
        late = raw_frame(0x3, 0, sid, struct.pack(">I", 0))
        late += raw_frame(0x8, 0, sid, struct.pack(">I", 100))
        events += core.receive(late, now=0.0)
    assert not [e for e in events if isinstance(e, ConnectionFailed)]
    assert [e.code for e in events if isinstance(e, ResponseEnded)] == [0, 0]


def test_a_header_block_too_large_is_refused_at_its_first_frame_header() -> None:
    """With frames allowed up to 16 MiB (trusted), a 1 MiB HEADERS frame is still refused
    as soon as its 9-byte header arrives: its payload is never buffered."""
    start = PREFACE + raw_frame(0x4, 0, 0, b"")
    for flags in (0x0, 0x4):  # with or without END_HEADERS
        limits = WireLimits.for_server(ServerLimits.trusted())
        core = ProtocolCore(client_side=False, limits=limits)
        core.initiate()
        header = struct.pack(">I", MiB)[1:] + bytes([0x1, flags]) + struct.pack(">I", 1)
        [failure] = [
            e for e in core.receive(start + header, 0.0) if isinstance(e, ConnectionFailed)
        ]
        assert (failure.kind, failure.error_code) == ("grpc_limit_exceeded", 0xB)


def test_a_client_with_thousands_of_open_streams_opens_one_more_without_scanning_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent connection carries a stream per volume: opening the next one must not walk
    the whole table each time (h2 does; with 2,000 streams that is quadratic). A full scan,
    which also drops closed streams, runs only when the table has doubled."""
    import h2.connection
    import h2.settings

    scans = 0
    original = h2.connection.H2Connection._open_streams

    def counted(self: h2.connection.H2Connection, remainder: int) -> int:
        nonlocal scans
        scans += 1
        count: int = original(self, remainder)
        return count

    monkeypatch.setattr(h2.connection.H2Connection, "_open_streams", counted)
    core = ProtocolCore(client_side=True, limits=WireLimits.for_client(ClientLimits.trusted()))
    core.initiate()
    settings_payload = struct.pack(">HI", h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS, 65_536)
    core.receive(raw_frame(0x4, 0, 0, settings_payload), now=0.0)
    opened = [core.open_stream(request_headers("/a.B/C")) for _ in range(2000)]
    assert opened == list(range(1, 4000, 2))
    assert scans <= 12


def _client_with_streams() -> ProtocolCore:
    """A client core (the agent connection's side) with small windows (streams 40,005
    bytes, the connection HTTP/2's 65,535), its SETTINGS acknowledged; streams 1, 3 and 5 answered
    with response headers (5's with a content-length), 7 opened and not answered yet, 9
    half-closed by the client before any answer, 11 reset by the client."""
    from hpack import Encoder

    limits = ClientLimits(max_response_bytes=40_000, stream_window=40_005, connection_window=1)
    core = ProtocolCore(client_side=True, limits=WireLimits.for_client(limits))
    core.initiate()
    core.receive(raw_frame(0x4, 0, 0, b"") + raw_frame(0x4, 0x1, 0, b""), now=0.0)
    for sid in (1, 3, 5, 7, 9, 11):
        assert core.open_stream(request_headers("/a.B/C")) == sid
        if sid == 9:
            core.send_data(sid, b"", end_stream=True)
    encoder = Encoder()
    for sid in (1, 3, 5):
        headers = [(":status", "200"), ("content-type", "application/grpc")]
        if sid == 5:
            headers.append(("content-length", "12"))
        core.receive(raw_frame(0x1, 0x4, sid, encoder.encode(headers)), now=0.0)
    core.reset(11)
    return core


DATA_STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("data"),
            st.sampled_from([1, 3, 5, 7, 9, 11, 13]),
            st.sampled_from([0x0, 0x0, 0x0, _END_STREAM_FLAG, 0x8, 0x9]),
            st.integers(0, 16_000),
        ),
        st.tuples(
            st.just("ack"), st.sampled_from([1, 3, 5, 9]), st.just(0), st.integers(0, 30_000)
        ),
        st.tuples(st.just("reset"), st.sampled_from([1, 3, 5, 9]), st.just(0), st.just(0)),
        st.tuples(st.just("rst_stream"), st.sampled_from([1, 3, 9]), st.just(0), st.just(0)),
        st.tuples(st.just("goaway"), st.sampled_from([0, 1, 3]), st.just(0), st.just(0)),
    ),
    max_size=30,
)


_FULL = ("data", 1, 0, 16_000)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=DATA_STEPS)
@example(steps=[_FULL, _FULL, _FULL])  # the stream's window exceeded
# the connection's window exceeded, no stream's
@example(steps=[_FULL, _FULL, ("data", 3, 0, 16_000), ("data", 3, 0, 16_000), ("data", 1, 0, 3000)])
@example(steps=[_FULL, ("ack", 1, 0, 8000), _FULL, ("reset", 1, 0, 0), _FULL])
@example(steps=[("goaway", 3, 0, 0), _FULL, ("data", 3, 0, 100)])
# END_STREAM: mid-message, on the half-closed stream, then DATA after it
@example(steps=[("data", 1, 1, 100), ("data", 9, 1, 0), ("data", 1, 0, 10), ("data", 3, 1, 0)])
def test_the_fast_data_path_does_exactly_what_h2_does(
    steps: list[tuple[str, int, int, int]],
) -> None:
    """Received DATA frames skip h2's per-frame machinery where they can: the same events,
    the same bytes sent back (WINDOW_UPDATE, RST_STREAM, GOAWAY) and the same windows as a
    core that hands every frame to h2, whatever the frames, the streams' states and the
    windows (exceeded ones included)."""
    fast, reference = _client_with_streams(), _client_with_streams()
    reference._receive_data = lambda frame, out: False  # type: ignore[method-assign]
    for core in (fast, reference):
        core.data_to_send()
    # Each stream's DATA is one 40,000-byte message after another (whatever the frames),
    # so that unacknowledged bytes pile up to the windows.
    left: dict[int, int] = {}
    for step, sid, flags, size in steps:
        results = []
        if step == "data":
            body = b""
            while len(body) < size:
                if not left.get(sid):
                    body += b"\x00" + (40_000).to_bytes(4, "big")
                    left[sid] = 40_000
                take = min(size - len(body), left[sid])
                body += b"m" * take
                left[sid] -= take
            if flags & 0x8:
                body = b"\x00" + body
        for core in (fast, reference):
            if step == "data":
                events = core.receive(raw_frame(0x0, flags, sid, body), now=0.0)
            elif step == "ack":
                core.ack(sid, size)
                events = []
            elif step == "reset":
                core.reset(sid)
                events = []
            elif step == "rst_stream":
                events = core.receive(raw_frame(0x3, 0, sid, struct.pack(">I", 8)), now=0.0)
            else:  # GOAWAY letting streams up to ``sid`` finish
                events = core.receive(raw_frame(0x7, 0, 0, struct.pack(">II", sid, 0)), now=0.0)
            results.append((events, core.data_to_send()))
        assert results[0] == results[1]
    for core in (fast, reference):
        assert core.h2.inbound_flow_control_window == reference.h2.inbound_flow_control_window
    for sid, stream in reference.h2.streams.items():
        other = fast.h2.streams[sid]
        assert other.state_machine.state == stream.state_machine.state
        assert other.inbound_flow_control_window == stream.inbound_flow_control_window


CONTROL_STEPS = st.lists(
    st.one_of(
        st.tuples(  # PING: flags (ACK or not, unknown bits), stream, length of its data
            st.just(0x6),
            st.sampled_from([0x0, 0x1, 0x80]),
            st.sampled_from([0, 0, 0, 1]),
            st.sampled_from([8, 8, 8, 0, 7, 9]),
        ),
        st.tuples(  # WINDOW_UPDATE: flags, stream (0: the connection), increment
            st.just(0x8),
            st.just(0x0),
            st.sampled_from([0, 0, 0, 1, 3, 7]),
            st.one_of(
                st.integers(1, 70_000),
                st.sampled_from([0, 2**31 - 1, 2**31, 2**32 - 1, 2**30]),
            ),
        ),
        # Something about the streams between them: DATA for stream 1, or a GOAWAY.
        st.tuples(st.just(0x0), st.just(0x0), st.just(1), st.integers(0, 100)),
        st.tuples(st.just(0x7), st.just(0x0), st.just(0), st.sampled_from([1, 3])),
    ),
    max_size=25,
)


def _control_frame(kind: int, flags: int, sid: int, value: int) -> bytes:
    if kind == 0x6:
        return raw_frame(kind, flags, sid, bytes(range(value)))
    if kind == 0x8:
        return raw_frame(kind, flags, sid, value.to_bytes(4, "big"))
    if kind == 0x0:
        return raw_frame(kind, flags, sid, b"\x00" + value.to_bytes(4, "big") + bytes(value))
    return raw_frame(kind, flags, sid, struct.pack(">II", value, 0))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=CONTROL_STEPS)
@example(steps=[(0x8, 0x0, 0, 2**31 - 1 - 65_535), (0x8, 0x0, 0, 1)])  # one past the limit
@example(steps=[(0x6, 0x1, 0, 8), (0x6, 0x0, 1, 8), (0x6, 0x0, 0, 7)])
def test_the_fast_control_path_does_exactly_what_h2_does(
    steps: list[tuple[int, int, int, int]],
) -> None:
    """PING and the connection's WINDOW_UPDATE skip h2's frame machinery where they can:
    the same events, the same bytes sent back (PING ACK, GOAWAY), the same send windows
    and the same end of the connection as a core that hands them to h2, whatever the
    frames (ACKs, streams other than 0, wrong lengths, increments out of range, a window
    overflow)."""
    fast, reference = _client_with_streams(), _client_with_streams()
    reference._receive_control = lambda frame, out: False  # type: ignore[method-assign]
    for core in (fast, reference):
        core.data_to_send()
    for step in steps:
        frame = _control_frame(*step)
        results = [
            (core.receive(frame, now=0.0), core.data_to_send()) for core in (fast, reference)
        ]
        assert results[0] == results[1]
        assert fast.failure == reference.failure
        assert fast.h2.outbound_flow_control_window == reference.h2.outbound_flow_control_window
    for sid, stream in reference.h2.streams.items():
        other = fast.h2.streams[sid]
        assert other.outbound_flow_control_window == stream.outbound_flow_control_window
        assert other.state_machine.state == stream.state_machine.state


def test_a_grpc_go_answer_s_ping_and_window_update_never_reach_h2() -> None:
    """grpc-go sends a WINDOW_UPDATE of the connection and a PING (its bandwidth probe)
    with the answer to nearly every request: both are taken beside h2, the PING answered."""
    core = _client_with_streams()
    core.data_to_send()
    handled = 0
    original = core.h2.receive_data

    def counted(data: bytes) -> Any:
        nonlocal handled
        handled += 1
        return original(data)

    core.h2.receive_data = counted
    window = core.h2.outbound_flow_control_window
    probe = raw_frame(0x8, 0, 0, (1000).to_bytes(4, "big")) + raw_frame(0x6, 0, 0, b"bdp-ping")
    events = core.receive(probe, now=0.0)
    assert events == [WindowUpdated(0)]
    assert core.h2.outbound_flow_control_window == window + 1000
    assert core.data_to_send() == raw_frame(0x6, 0x1, 0, b"bdp-ping")
    assert handled == 0


def test_the_fast_data_path_carries_the_bulk_of_an_agent_connection() -> None:
    """Every SVID update is one DATA frame on an open stream: none of them reaches h2's
    frame handling."""
    core = _client_with_streams()
    handled = 0
    original = core.h2.receive_data

    def counted(data: bytes) -> Any:
        nonlocal handled
        handled += 1
        return original(data)

    core.h2.receive_data = counted
    frames = b"".join(raw_frame(0x0, 0, sid, grpc_message(b"svid")) for sid in (1, 3) * 10)
    events = core.receive(frames, now=0.0)
    assert [e.stream_id for e in events if isinstance(e, MessageReceived)] == [1, 3] * 10
    assert handled == 0


def test_a_bug_in_the_fast_data_path_ends_that_connection_only_with_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever goes wrong while a DATA frame is taken beside h2, the core still does not
    raise: that connection ends with INTERNAL_ERROR and GOAWAY, and another connection
    goes on receiving."""
    broken, other = _client_with_streams(), _client_with_streams()
    for core in (broken, other):
        core.data_to_send()

    def bug(sid: int, data: bytes, size: int, out: list[Any]) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(broken, "_on_data", bug)
    frame = raw_frame(0x0, 0, 1, grpc_message(b"svid"))
    [failure] = broken.receive(frame, now=0.0)
    assert isinstance(failure, ConnectionFailed)
    assert (failure.kind, failure.error_code) == ("grpc_internal_error", 0x2)
    assert _frames(broken.data_to_send())[-1] == (0x7, 0x2)
    assert broken.receive(frame, now=0.0) == []
    [message] = other.receive(frame, now=0.0)
    assert isinstance(message, MessageReceived) and message.data == b"svid"
