"""A client's backlog of received frames (``ClientLimits.frames_per_step``).

When a read holds more frames than a step processes, the rest wait for the next steps, and
the frames of a call still waiting for its first response go ahead of them: a publish's
first SVID, read behind a rotation of every other volume, is not held up by it. Whatever
the frames and however the bytes are cut, every stream sees exactly the events it sees when
every frame is processed at once and in order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import hpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import frame_header, grpc_message, raw_frame, request_headers
from trio_spirecsi.grpc import ClientLimits
from trio_spirecsi.grpc._protocol import (
    Event,
    MessageReceived,
    ProtocolCore,
    ResponseEnded,
    ResponseStarted,
    StreamEnded,
)
from trio_spirecsi.grpc.limits import WireLimits

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 8
_END_STREAM, _END_HEADERS = 0x1, 0x4
_RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
_STREAMS = 6


def _core(frames_per_step: int) -> ProtocolCore:
    """A client core past the handshake, with ``_STREAMS`` calls open (streams 1, 3, ...)."""
    # 0, the reference: every frame of a read at once, in order (a server's way)
    limits = dataclasses.replace(
        WireLimits.for_client(ClientLimits()), frames_per_step=frames_per_step
    )
    core = ProtocolCore(client_side=True, limits=limits)
    core.initiate()
    core.receive(raw_frame(_SETTINGS, 0, 0, b""), now=0.0)
    for _ in range(_STREAMS):
        core.open_stream(request_headers("/a.B/C"))
    core.data_to_send()
    return core


def _sid(index: int) -> int:
    return 2 * index + 1


# One stream's frames: response headers, messages (some cut across two DATA frames), then
# trailers, a reset or nothing.
_LIFE = st.tuples(
    st.lists(st.tuples(st.binary(max_size=40), st.booleans()), max_size=4),
    st.sampled_from(["trailers", "reset", "open"]),
)
# Frames of the connection itself, or about what the client sends.
_CONTROL = st.sampled_from(["ping", "window0", "window", "settings"])


def _stream_frames(encoder: hpack.Encoder, index: int, life: Any) -> list[tuple[str, Any]]:
    messages, end = life
    sid = _sid(index)
    frames: list[tuple[str, Any]] = [("headers", (sid, _RESPONSE, 0))]
    for payload, cut in messages:
        data = grpc_message(payload)
        if cut:
            half = len(data) // 2
            frames += [("data", (sid, data[:half])), ("data", (sid, data[half:]))]
        else:
            frames.append(("data", (sid, data)))
    if end == "trailers":
        frames.append(("headers", (sid, [("grpc-status", "0")], _END_STREAM)))
    elif end == "reset":
        frames.append(("reset", sid))
    return frames


def _encode(encoder: hpack.Encoder, frame: tuple[str, Any]) -> bytes:
    """Header blocks are encoded in the order the frames are sent: one HPACK table."""
    kind, value = frame
    if kind == "headers":
        sid, headers, flags = value
        return raw_frame(_HEADERS, _END_HEADERS | flags, sid, encoder.encode(headers))
    if kind == "data":
        sid, data = value
        return raw_frame(_DATA, 0, sid, data)
    if kind == "reset":
        return raw_frame(_RST_STREAM, 0, value, (8).to_bytes(4, "big"))
    if kind == "ping":
        return raw_frame(_PING, 0, 0, bytes(8))
    if kind == "window0":
        return raw_frame(_WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big"))
    if kind == "window":
        return raw_frame(_WINDOW_UPDATE, 0, value, (1000).to_bytes(4, "big"))
    assert kind == "settings"
    return raw_frame(_SETTINGS, 0, 0, b"")


def _by_stream(events: list[Event]) -> dict[object, list[str]]:
    """Each stream's events in order; the connection's own (stream None) as a count."""
    seen: dict[object, list[str]] = {}
    for event in events:
        sid = getattr(event, "stream_id", None)
        seen.setdefault(sid, []).append(re.sub(r"0x[0-9a-f]+", "0x", repr(event)))
    if None in seen:
        seen[None] = sorted(seen[None])
    return seen


def _frames(data: bytes) -> list[bytes]:
    found = []
    while data:
        size = 9 + int.from_bytes(data[:3], "big")
        found.append(data[:size])
        data = data[size:]
    return sorted(found)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lives=st.lists(_LIFE, min_size=_STREAMS, max_size=_STREAMS),
    controls=st.lists(st.tuples(_CONTROL, st.integers(0, 200)), max_size=4),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(1, 400), max_size=12),
    per_step=st.integers(1, 6),
    drain=st.booleans(),
)
@example(  # a stream's first message behind others' data, the backlog one frame a step
    lives=[([(b"a", False)] * 3, "open")] * _STREAMS,
    controls=[],
    order=None,
    cuts=[],
    per_step=1,
    drain=False,
)
def test_every_stream_sees_what_it_sees_when_frames_are_processed_in_order(
    lives: list[Any],
    controls: list[tuple[str, int]],
    order: Any,
    cuts: list[int],
    per_step: int,
    drain: bool,
) -> None:
    """Streams' frames interleaved at random (each stream's in its order), with PING,
    WINDOW_UPDATE and SETTINGS among them, the bytes cut anywhere: per stream the same
    events as a core that processes every frame at once, the same acknowledgements sent back,
    and the same windows at the end."""
    queues = [_stream_frames(hpack.Encoder(), i, life) for i, life in enumerate(lives)]
    script: list[tuple[str, Any]] = []
    while any(queues):
        live = [q for q in queues if q]
        pick = live[order.randrange(len(live))] if order is not None else live[0]
        script.append(pick.pop(0))
    for kind, where in controls:
        sid = _sid(where % _STREAMS)
        script.insert(where % (len(script) + 1), (kind, sid))
    encoder = hpack.Encoder()
    wire = b"".join(_encode(encoder, frame) for frame in script)

    ours, reference = _core(per_step), _core(0)
    got: list[Event] = []
    want: list[Event] = []
    position = 0
    for cut in [*cuts, len(wire)]:
        chunk = wire[position : position + cut]
        position += len(chunk)
        got += ours.receive(chunk, now=0.0)
        want += reference.receive(chunk, now=0.0)
    while ours.backlogged:
        got += ours.drain() if drain else ours.receive(b"", now=0.0)
    assert ours.failure is None and reference.failure is None
    assert _by_stream(got) == _by_stream(want)
    assert _frames(ours.data_to_send()) == _frames(reference.data_to_send())
    window = "_inbound_flow_control_window_manager"
    assert getattr(ours.h2, window).current_window_size == (
        getattr(reference.h2, window).current_window_size
    )
    for sid, stream in reference.h2.streams.items():
        mine = ours.h2.streams[sid]
        assert mine.state_machine.state == stream.state_machine.state
        assert (
            mine._inbound_window_manager.current_window_size
            == stream._inbound_window_manager.current_window_size
        )


def _burst(encoder: hpack.Encoder, streams: range, between: list[bytes]) -> bytes:
    """A message on each of ``streams`` (already answered once), then ``between``, then the
    answer of the call on stream ``_sid(_STREAMS - 1)``."""
    last = _sid(_STREAMS - 1)
    wire = b"".join(raw_frame(_DATA, 0, _sid(i), grpc_message(b"update")) for i in streams)
    wire += b"".join(between)
    wire += raw_frame(_HEADERS, _END_HEADERS, last, encoder.encode(_RESPONSE))
    return wire + raw_frame(_DATA, 0, last, grpc_message(b"first"))


def _answered(core: ProtocolCore, encoder: hpack.Encoder, streams: range) -> None:
    wire = b""
    for i in streams:
        wire += raw_frame(_HEADERS, _END_HEADERS, _sid(i), encoder.encode(_RESPONSE))
        wire += raw_frame(_DATA, 0, _sid(i), grpc_message(b"first"))
    core.receive(wire, now=0.0)


def test_a_first_response_read_behind_a_burst_is_processed_in_the_step_that_reads_it() -> None:
    core = _core(2)
    encoder = hpack.Encoder()
    others = range(_STREAMS - 1)
    _answered(core, encoder, others)
    ping = raw_frame(_PING, 0, 0, bytes(8))
    events = core.receive(_burst(encoder, others, [ping]), now=0.0)
    last = _sid(_STREAMS - 1)
    # The new call's headers and message, and the first two frames of the burst.
    assert [type(e) for e in events if getattr(e, "stream_id", None) == last] == [
        ResponseStarted,
        MessageReceived,
    ]
    assert sum(isinstance(e, MessageReceived) for e in events) == 3
    assert core.backlogged
    later: list[Event] = []
    while core.backlogged:
        later += core.receive(b"", now=0.0)
    assert [e.stream_id for e in later if isinstance(e, MessageReceived)] == [
        _sid(i) for i in others[2:]
    ]


def test_a_header_block_in_the_backlog_keeps_every_later_frame_behind_it() -> None:
    """Trailers of another call in the backlog: one HPACK table, so the new call's headers
    wait for their turn, and so does its message."""
    core = _core(2)
    encoder = hpack.Encoder()
    others = range(_STREAMS - 1)
    _answered(core, encoder, others)
    trailers = raw_frame(
        _HEADERS, _END_HEADERS | _END_STREAM, _sid(0), encoder.encode([("grpc-status", "0")])
    )
    events = core.receive(_burst(encoder, others, [trailers]), now=0.0)
    last = _sid(_STREAMS - 1)
    assert not [e for e in events if getattr(e, "stream_id", None) == last]
    later: list[Event] = []
    while core.backlogged:
        later += core.receive(b"", now=0.0)
    kinds = [type(e) for e in later if getattr(e, "stream_id", None) in (_sid(0), last)]
    assert kinds == [ResponseEnded, StreamEnded, ResponseStarted, MessageReceived]


def test_frames_read_before_a_broken_frame_are_processed_before_the_connection_fails() -> None:
    core = _core(1)
    encoder = hpack.Encoder()
    others = range(_STREAMS - 1)
    _answered(core, encoder, others)
    burst = b"".join(raw_frame(_DATA, 0, _sid(i), grpc_message(b"u")) for i in others)
    events = core.receive(burst, now=0.0)
    assert sum(isinstance(e, MessageReceived) for e in events) == 1
    # A frame larger than the limit is a connection error at its header; the four updates
    # read before it still reach their calls, then the connection fails.
    events = core.receive(frame_header(20_000, _DATA, 0, _sid(0)), now=0.0)
    assert sum(isinstance(e, MessageReceived) for e in events) == len(others) - 1
    assert core.failure is not None and events[-1] is core.failure
    assert not core.backlogged
