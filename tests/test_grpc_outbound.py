"""Frames the engine sends without h2's encoder and frame objects: header blocks
(``_H2Connection.send_header_list``, ``grpc/_hpack.py``) and DATA
(``_H2Connection.send_data_frame``). What the peer decodes, the streams' states, the windows
and the errors are exactly those of h2's ``send_headers`` and ``send_data``."""

from __future__ import annotations

import struct
from typing import Any

import h2.exceptions
import h2.utilities
import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.hpack import decode_integer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import PREFACE, grpc_message, raw_frame, request_headers
from trio_spirecsi.grpc import ClientLimits, ServerLimits
from trio_spirecsi.grpc._hpack import integer, static_block
from trio_spirecsi.grpc._protocol import NoStreamAvailable, ProtocolCore, StreamGone
from trio_spirecsi.grpc.limits import WireLimits

_HEADERS, _CONTINUATION, _SETTINGS = 0x1, 0x9, 0x4
_END_STREAM, _END_HEADERS = 0x1, 0x4

# -- the encoder on its own

_NAMES = st.one_of(
    st.sampled_from(
        [b":status", b":path", b"content-type", b"grpc-status", b"grpc-message", b"te", b"age"]
    ),
    st.binary(min_size=0, max_size=300),
)
_VALUES = st.one_of(
    st.sampled_from([b"200", b"/", b"", b"0", b"trailers"]), st.binary(max_size=300)
)


@settings(max_examples=300)
@given(
    fields=st.lists(st.tuples(_NAMES, _VALUES, st.booleans()), max_size=12),
)
def test_a_static_block_decodes_to_its_fields_and_leaves_the_peer_table_empty(
    fields: list[tuple[bytes, bytes, bool]],
) -> None:
    headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
    decoder = Decoder()
    decoded = decoder.decode(static_block(headers), raw=True)
    assert decoded == [(n, v) for n, v, _ in fields]
    never = [isinstance(h, HeaderTuple) and not h.indexable for h in decoded]
    assert never == [never for _, _, never in fields]
    assert len(decoder.header_table.dynamic_entries) == 0


@pytest.mark.parametrize("prefix", [4, 7])
@pytest.mark.parametrize("value", [0, 1, 14, 15, 16, 126, 127, 128, 142, 143, 270, 16_511, 2**21])
def test_integers_round_trip_across_the_prefix_boundaries(prefix: int, value: int) -> None:
    data = integer(value, prefix, 0x80 if prefix == 7 else 0x10)
    assert data[0] & ~((1 << prefix) - 1) == (0x80 if prefix == 7 else 0x10)
    assert decode_integer(data, prefix) == (value, len(data))


def test_the_blocks_of_a_response_are_the_static_table_and_plain_literals() -> None:
    block = static_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
    # :status 200 is static entry 8; content-type is static name 31, a value of 16 bytes
    assert block == b"\x88" + b"\x0f\x10" + b"\x10application/grpc"


# -- send_header_list against h2's send_headers


def _reference(core: ProtocolCore) -> ProtocolCore:
    """The same core sending every header block and DATA frame through h2's own
    ``send_headers`` and ``send_data``."""

    def headers_through_h2(stream_id: int, headers: Any, *, end_stream: bool = False) -> None:
        core.h2.send_headers(stream_id, headers, end_stream=end_stream)

    def data_through_h2(stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        core.h2.send_data(stream_id, data, end_stream=end_stream)

    core.h2.send_header_list = headers_through_h2  # type: ignore[method-assign]
    core.h2.send_data_frame = data_through_h2  # type: ignore[method-assign]
    return core


def _server() -> ProtocolCore:
    """A server core whose peer has opened stream 1 (still sending), 3 (done sending) and
    5 and 7 (reset by the peer at once)."""
    core = ProtocolCore(client_side=False, limits=WireLimits.for_server(ServerLimits()))
    core.initiate()
    encoder = Encoder()
    data = PREFACE + raw_frame(_SETTINGS, 0, 0, b"")
    for sid in (1, 3, 5, 7):
        data += raw_frame(_HEADERS, _END_HEADERS, sid, encoder.encode(request_headers("/a.B/C")))
    data += raw_frame(0x0, _END_STREAM, 3, grpc_message(b"hi"))
    for sid in (5, 7):
        data += raw_frame(0x3, 0, sid, struct.pack(">I", 8))
    core.receive(data, now=0.0)
    return core


def _client() -> ProtocolCore:
    core = ProtocolCore(client_side=True, limits=WireLimits.for_client(ClientLimits()))
    core.initiate()
    core.receive(raw_frame(_SETTINGS, 0, 0, b"") + raw_frame(_SETTINGS, 0x1, 0, b""), now=0.0)
    return core


def _settings(code: int, value: int) -> bytes:
    return raw_frame(_SETTINGS, 0, 0, struct.pack(">HI", code, value))


def _sent(data: bytes, decoder: Decoder) -> list[tuple[Any, ...]]:
    """The frames in ``data``; a header block as (stream, END_STREAM, whether it starts with
    a table size update, its decoded fields)."""
    found: list[tuple[Any, ...]] = []
    block, opened = b"", None
    while data:
        length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
        sid = int.from_bytes(data[5:9], "big")
        payload, data = data[9 : 9 + length], data[9 + length :]
        if kind in (_HEADERS, _CONTINUATION):
            if kind == _HEADERS:
                assert opened is None
                opened = (sid, bool(flags & _END_STREAM))
            assert opened is not None and opened[0] == sid
            block += payload
            if flags & _END_HEADERS:
                fields = [tuple(f) for f in decoder.decode(block, raw=True)]
                resize = bool(block) and block[0] & 0xE0 == 0x20  # RFC 7541 6.3
                found.append(("headers", *opened, resize, fields))
                block, opened = b"", None
        else:
            found.append((kind, flags, sid, payload))
    assert opened is None
    return found


def _state(core: ProtocolCore) -> dict[int, tuple[Any, ...]]:
    return {
        sid: (
            stream.state_machine.state,
            stream.state_machine.headers_sent,
            stream.state_machine.trailers_sent,
            stream.request_method,
            stream._authority,
            stream.outbound_flow_control_window,
        )
        for sid, stream in core.h2.streams.items()
    } | {0: (core.h2.outbound_flow_control_window, core.h2.state_machine.state)}


def _outcome(call: Any) -> Any:
    try:
        return call()
    except (StreamGone, NoStreamAvailable) as exc:
        return type(exc)


def _as_the_encoder_sees_it(core: ProtocolCore) -> Decoder:
    """A decoder holding the dynamic table of the core's encoder as it is now.

    h2 grows its encoder's table while it encodes, before it validates the whole list: a
    list it refuses leaves entries the peer never received, and later blocks refer to them.
    Decoding each block against the encoder's own table compares what each side meant to
    send; the fast side's real wire is checked separately, across the whole connection."""
    table = core.h2.encoder.header_table
    decoder = Decoder()
    decoder.header_table.maxsize = table.maxsize
    decoder.header_table.dynamic_entries.extend(table.dynamic_entries)
    decoder.header_table._current_size = table._current_size
    return decoder


def _run(make: Any, steps: list[tuple[Any, ...]], act: Any) -> None:
    fast, reference = make(), _reference(make())
    wire = Decoder()  # the fast side's peer, from the first block to the last
    for core in (fast, reference):
        core.data_to_send()
    for step in steps:
        results = []
        for core in (fast, reference):
            decoder = _as_the_encoder_sees_it(core)
            outcome = act(core, step)
            data = core.data_to_send()
            results.append((outcome, _sent(data, decoder), _state(core)))
            if core is fast:
                assert _sent(data, wire) == results[0][1]
        assert results[0] == results[1], step
    assert fast.h2.open_outbound_streams == reference.h2.open_outbound_streams


_SIDS = st.sampled_from([1, 3, 5, 7, 9])
# none, a message, a whole frame, one byte over the peer's frame size, most of its window
_DATA_SIZES = st.sampled_from([0, 11, 16_384, 16_385, 40_000])
SERVER_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("respond"), _SIDS),
        st.tuples(
            st.just("status"),
            _SIDS,
            st.sampled_from([0, 0, 2, 5, 13]),
            st.sampled_from(["", "", "not found", "x" * 20_000]),
            st.booleans(),
        ),
        st.tuples(st.just("data"), _SIDS, _DATA_SIZES, st.booleans()),
        st.tuples(st.just("window"), st.sampled_from([0, 1, 3]), st.sampled_from([1, 40_000])),
        st.tuples(st.just("reset"), _SIDS),
        st.tuples(st.just("trailers"), _SIDS, st.booleans()),
        st.tuples(st.just("table"), st.sampled_from([0, 100, 4096])),
    ),
    max_size=20,
)


def _data_step(core: ProtocolCore, step: tuple[Any, ...]) -> Any:
    kind, sid, size, *end = step
    if kind == "window":  # the peer's WINDOW_UPDATE (0: the connection's)
        return core.receive(raw_frame(0x8, 0, sid, struct.pack(">I", size)), now=0.0)
    return _outcome(lambda: core.send_data(sid, b"d" * size, end_stream=end[0]))


def _server_step(core: ProtocolCore, step: tuple[Any, ...]) -> Any:
    kind, *args = step
    if kind == "respond":
        return _outcome(lambda: core.respond(args[0]))
    if kind == "status":
        sid, code, message, trailers_only = args
        return _outcome(
            lambda: core.respond_status(sid, code, message, trailers_only=trailers_only)
        )
    if kind in ("data", "window"):
        return _data_step(core, step)
    if kind == "reset":
        return core.reset(args[0])
    if kind == "trailers":  # what ProtocolCore never sends: trailers that do not end
        sid, end_stream = args
        try:
            return core.h2.send_header_list(sid, ((b"grpc-status", b"0"),), end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            return type(exc)
    return core.receive(_settings(0x1, args[0]), now=0.0)  # SETTINGS_HEADER_TABLE_SIZE


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=SERVER_STEPS)
@example(steps=[("respond", 1), ("status", 1, 0, "", False), ("respond", 3)])
@example(steps=[("respond", 1), ("respond", 1), ("status", 1, 0, "", False)])  # trailers twice
@example(steps=[("status", 3, 0, "", False), ("status", 5, 2, "x" * 20_000, True)])
@example(steps=[("table", 100), ("respond", 1), ("respond", 3), ("table", 0), ("respond", 9)])
@example(steps=[("reset", 1), ("respond", 1), ("respond", 7), ("status", 7, 0, "", True)])
@example(steps=[("respond", 1), ("trailers", 1, False), ("respond", 3), ("trailers", 3, True)])
@example(steps=[("respond", 1), *[("data", 1, 16_384, False)] * 5, ("window", 0, 40_000)])
@example(
    steps=[("respond", 1), ("data", 1, 16_385, False), ("data", 1, 0, True), ("data", 1, 11, False)]
)
@example(steps=[("data", 9, 11, False), ("respond", 7), ("data", 7, 11, False)])
# the connection's window runs out before stream 3's does
@example(
    steps=[
        ("respond", 1),
        ("respond", 3),
        *[("data", 1, 16_384, False)] * 3,
        *[("data", 3, 16_384, False)] * 2,
    ]
)
def test_server_frames_do_what_h2_does(steps: list[tuple[Any, ...]]) -> None:
    """Responses, DATA and trailers (trailers-only, errors, a status message longer than a
    frame, DATA beyond the frame size or the windows) on streams in every state: the peer
    decodes the same fields and frames, the streams and windows end up the same, and the
    same calls fail, as with h2's ``send_headers`` and ``send_data``. A table size change
    (which h2's encoder announces) and the peer's WINDOW_UPDATEs included."""
    _run(_server, steps, _server_step)


_METADATA = st.sampled_from(
    [
        (),
        (("x-pod", "p"),),
        (("authorization", "Bearer secret"),),  # h2 sends it never indexed
        (("X-Upper", " padded "),),  # h2 lowercases the name and strips the value
        (("connection", "close"),),  # h2 refuses it
        (("te", "gzip"),),  # h2 refuses it
        (("x-big", "b" * 20_000),),  # a block in CONTINUATION frames
    ]
)
CLIENT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(["/a.B/C", "/a.B/D"]), _METADATA),
        st.tuples(st.just("end"), _SIDS),
        st.tuples(st.just("data"), _SIDS, _DATA_SIZES, st.booleans()),
        st.tuples(st.just("window"), st.sampled_from([0, 1, 3]), st.sampled_from([1, 40_000])),
        st.tuples(st.just("reset"), _SIDS),
        st.tuples(st.just("table"), st.sampled_from([0, 100, 4096])),
        st.tuples(st.just("max_streams"), st.sampled_from([0, 2, 100])),
    ),
    max_size=20,
)


def _client_step(core: ProtocolCore, step: tuple[Any, ...]) -> Any:
    kind, *args = step
    if kind == "open":
        path, metadata = args
        return _outcome(lambda: core.open_stream(request_headers(path, *metadata)))
    if kind == "end":
        return _outcome(lambda: core.send_data(args[0], b"", end_stream=True))
    if kind in ("data", "window"):
        return _data_step(core, step)
    if kind == "reset":
        return core.reset(args[0])
    code = 0x1 if kind == "table" else 0x3  # HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS
    return core.receive(_settings(code, args[0]), now=0.0)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=CLIENT_STEPS)
@example(steps=[("open", "/a.B/C", ()), ("open", "/a.B/C", ()), ("open", "/a.B/D", ())])
@example(
    steps=[
        ("max_streams", 2),
        ("open", "/a.B/C", ()),
        ("open", "/a.B/C", ()),
        ("open", "/a.B/C", ()),
    ]
)
@example(steps=[("open", "/a.B/C", (("te", "gzip"),)), ("open", "/a.B/C", ())])
@example(steps=[("open", "/a.B/C", (("x-big", "b" * 20_000),)), ("end", 1)])
@example(steps=[("open", "/a.B/C", ()), ("data", 1, 40_000, False), ("data", 1, 40_000, True)])
@example(steps=[("table", 0), ("open", "/a.B/C", (("authorization", "Bearer secret"),))])
def test_client_frames_do_what_h2_does(steps: list[tuple[Any, ...]]) -> None:
    """Requests the engine opens (metadata that h2 rewrites, refuses, hides from indexing or
    splits into CONTINUATION frames), at the peer's stream limit and after table size
    changes, and their DATA: the same stream ids, fields, frames, states, windows and
    failures as h2's ``send_headers`` and ``send_data``."""
    _run(_client, steps, _client_step)


def test_a_header_list_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second response on a connection reuses the first one's block: nothing of h2's
    normalisation, validation or HPACK encoding runs for it."""
    import trio_spirecsi.grpc._protocol as protocol

    core = _server()
    core.respond(1)
    core.data_to_send()

    def fail(*args: Any) -> Any:
        raise AssertionError("encoded again")

    monkeypatch.setattr(protocol, "static_block", fail)
    monkeypatch.setattr(h2.utilities, "validate_outbound_headers", fail)
    monkeypatch.setattr(core.h2.encoder, "encode", fail)
    core.respond(3)
    [(kind, sid, end, resize, fields)] = _sent(core.data_to_send(), Decoder())
    assert (kind, sid, end, resize) == ("headers", 3, False, False)
    assert fields[:2] == [(b":status", b"200"), (b"content-type", b"application/grpc")]


def test_the_remembered_blocks_stay_bounded_whatever_the_messages() -> None:
    """Error messages vary (some quote what a pod sent): the blocks kept for reuse never
    exceed their count, a long one is not kept at all, and every status still reaches the
    peer whole."""
    import trio_spirecsi.grpc._protocol as protocol

    core = _server()
    decoder = Decoder()
    for n in range(3 * protocol._BLOCKS_KEPT):
        sid = 9 + 2 * n
        request = Encoder().encode(request_headers("/a.B/C"))
        core.receive(raw_frame(_HEADERS, _END_HEADERS | _END_STREAM, sid, request), now=0.0)
        core.respond_status(sid, 5, f"volume-{n}-is-unknown", trailers_only=True)
        assert len(protocol._BLOCKS) <= protocol._BLOCKS_KEPT
    blocks = [s for s in _sent(core.data_to_send(), decoder) if s[0] == "headers"]
    assert len(blocks) == 3 * protocol._BLOCKS_KEPT
    assert (b"grpc-message", b"volume-700-is-unknown") in blocks[700][4]
    protocol._BLOCKS.clear()
    long = "p" * 4000  # e.g. the path of an unknown method, quoted
    sid += 2
    core.receive(raw_frame(_HEADERS, _END_HEADERS | _END_STREAM, sid, request), now=0.0)
    core.respond_status(sid, 12, long, trailers_only=True)
    assert not protocol._BLOCKS
    [(kind, _, _, _, fields)] = _sent(core.data_to_send(), decoder)
    assert kind == "headers"
    assert (b"grpc-message", long.encode()) in fields
