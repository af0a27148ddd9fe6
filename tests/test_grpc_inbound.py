"""Header blocks the engine receives, decoded without hpack's decoder loop
(``grpc/_hpack.py``'s :class:`Decoder`) and checked without h2's generator pipeline
(``grpc/_received.py``): the same header lists, the same dynamic table and the same errors
as :class:`hpack.Decoder` and h2's ``validate_headers``, whatever the peer sends."""

from __future__ import annotations

import re
from typing import Any

import h2.exceptions
import h2.utilities
import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import PREFACE, raw_frame, request_headers
from trio_spirecsi.grpc import ClientLimits, ServerLimits
from trio_spirecsi.grpc._hpack import Decoder, integer
from trio_spirecsi.grpc._protocol import ConnectionFailed, ProtocolCore
from trio_spirecsi.grpc._purerpc import (
    HeaderError,
    _plain_request,
    _plain_response,
    _purerpc_request,
    _purerpc_response,
    parse_request,
    parse_response,
)
from trio_spirecsi.grpc._received import check_received
from trio_spirecsi.grpc.limits import WireLimits

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_STATIC = len(hpack.table.HeaderTable.STATIC_TABLE)


def _string(data: bytes, huffman: bool) -> bytes:
    if huffman:
        coded: bytes = _HUFFMAN.encode(data)
        return integer(len(coded), 7, 0x80) + coded
    return integer(len(data), 7, 0) + data


_BYTES = st.one_of(
    st.sampled_from([b"", b"te", b"trailers", b":path", b"grpc-timeout", b"cookie", b"x" * 70]),
    st.binary(max_size=40),
)
# Indices around the edges: 0 (invalid), the static table's end, the dynamic table's (it
# holds at most a few dozen entries here), and beyond.
_INDEX = st.one_of(
    st.integers(1, _STATIC),
    st.integers(0, _STATIC + 12),
    st.sampled_from([_STATIC, _STATIC + 1, 126, 127, 128, 2**14, 2**40]),
)


@st.composite
def _representation(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["indexed", "incremental", "incremental", "without", "never", "size"])
        | st.just("raw")
    )
    if kind == "indexed":
        return integer(draw(_INDEX), 7, 0x80)
    if kind == "size":
        return integer(draw(st.sampled_from([0, 1, 100, 4096, 4097, 65_536])), 5, 0x20)
    if kind == "raw":  # anything at all, invalid Huffman and over-long integers included
        return draw(
            st.one_of(
                st.binary(min_size=1, max_size=12),
                st.just(b"\xff" + b"\xff" * 12 + b"\x01"),
                st.just(b"\x40\x81\xff"),  # a literal name of one invalid Huffman byte
            )
        )
    first, bits = {"incremental": (0x40, 6), "without": (0x00, 4), "never": (0x10, 4)}[kind]
    name_index = draw(st.one_of(st.just(0), _INDEX))
    out = integer(name_index, bits, first)
    if not name_index:
        out += _string(draw(_BYTES), draw(st.booleans()))
    return out + _string(draw(_BYTES), draw(st.booleans()))


_BLOCK = st.builds(
    lambda parts, cut: b"".join(parts)[: cut if cut is not None else None],
    st.lists(_representation(), max_size=8),
    st.one_of(st.none(), st.integers(0, 60)),
)


def _outcome(decoder: hpack.Decoder, block: bytes) -> object:
    """What decoding ``block`` gives: each field with whether it may be indexed, or the
    error (its class; its message unless hpack's is about an integer and names a
    memoryview's address)."""
    try:
        fields = decoder.decode(block, raw=True)
    except (hpack.HPACKError, ValueError) as exc:
        message = str(exc)
        if re.search(r"integer|Invalid table index \d{5,}", message):
            message = "an integer"
        return type(exc), message
    return [(type(f), bytes(f[0]), bytes(f[1]), f.indexable) for f in fields]


def _table(decoder: hpack.Decoder) -> object:
    table = decoder.header_table
    entries = [(bytes(n), bytes(v)) for n, v in table.dynamic_entries]
    return entries, table._current_size, table.maxsize, table.resized


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    blocks=st.lists(_BLOCK, min_size=1, max_size=6),
    list_size=st.sampled_from([64, 300, 16_384]),
    allowed=st.sampled_from([0, 100, 4096]),
)
@example(blocks=[b"\x7f\x81\x01"], list_size=16_384, allowed=4096)  # integer in two bytes
@example(blocks=[b"\x3f\xe1\x1f"], list_size=16_384, allowed=4096)  # size update 4096
@example(blocks=[b"\x3f\xe2\x1f"], list_size=16_384, allowed=4096)  # 4097: one too many
@example(blocks=[b"\x82\x20"], list_size=16_384, allowed=4096)  # size update after a field
@example(blocks=[b"\x10\x01a\x01b"], list_size=16_384, allowed=4096)  # never indexed
@example(blocks=[b"\x80"], list_size=16_384, allowed=4096)  # index 0
@example(blocks=[b"\xbe"], list_size=16_384, allowed=4096)  # index 62, the table empty
@example(blocks=[b"\x00\x01a\x02b"], list_size=16_384, allowed=4096)  # a byte short
@example(  # a list of exactly the limit, then one byte over it
    blocks=[
        b"\x00\x10" + b"n" * 16 + b"\x10" + b"v" * 16,
        b"\x00\x10" + b"n" * 16 + b"\x11" + b"v" * 17,
    ],
    list_size=64,
    allowed=4096,
)
# the table shrunk to 100 bytes, then an entry of exactly 100 bytes, then one of 101
@example(
    blocks=[b"\x3f\x45\x40\x02ab\x42" + b"v" * 66, b"\x40\x02ab\x43" + b"v" * 67],
    list_size=16_384,
    allowed=4096,
)
def test_the_decoder_does_exactly_what_hpacks_does(
    blocks: list[bytes], list_size: int, allowed: int
) -> None:
    ours, reference = Decoder(), hpack.Decoder()
    for decoder in (ours, reference):
        decoder.max_header_list_size = list_size
        decoder.max_allowed_table_size = allowed
    for block in blocks:
        mine, theirs = _outcome(ours, block), _outcome(reference, block)
        if mine == (hpack.HPACKDecodingError, "an integer"):
            # An integer of more than 10 bytes: ours stops at once; hpack fails as well.
            assert isinstance(theirs, tuple)
            return
        assert mine == theirs
        if isinstance(mine, tuple):  # the connection ends here
            return
        assert _table(ours) == _table(reference)


def test_indexed_literals_fill_and_evict_the_table_as_hpacks_do() -> None:
    """A peer that indexes a new value with every request (grpc-timeout does) keeps the
    table full: entries are evicted oldest first, exactly as hpack evicts them."""
    encoder = hpack.Encoder()
    ours, reference = Decoder(), hpack.Decoder()
    for n in range(300):
        block = encoder.encode([(":path", "/a.B/C"), ("grpc-timeout", f"{1_999_000 + n}u")])
        assert ours.decode(block, raw=True) == reference.decode(block, raw=True)
        assert _table(ours) == _table(reference)
    assert len(ours.header_table.dynamic_entries) > 50


def test_an_integer_thousands_of_bytes_long_is_a_decoding_error() -> None:
    """hpack adds up every byte of an integer (16,000 bytes cost it tens of milliseconds of
    big-number arithmetic) and then fails with a ValueError, which h2 does not expect; ours
    refuses the eleventh byte with a decoding error, which h2 answers with
    COMPRESSION_ERROR."""
    block = b"\xff" + b"\xff" * 16_000 + b"\x01"
    with pytest.raises(ValueError):
        hpack.Decoder().decode(block, raw=True)
    with pytest.raises(hpack.HPACKDecodingError, match="longer than 10 bytes"):
        Decoder().decode(block, raw=True)


def test_a_connection_sending_an_over_long_integer_ends_with_compression_error() -> None:
    core = ProtocolCore(client_side=False, limits=WireLimits.for_server(ServerLimits()))
    core.initiate()
    block = b"\xff" + b"\xff" * 2_000 + b"\x01"
    events = core.receive(PREFACE + raw_frame(0x4, 0, 0, b"") + raw_frame(0x1, 0x5, 1, block), 0.0)
    [failure] = [e for e in events if isinstance(e, ConnectionFailed)]
    assert (failure.kind, failure.error_code) == ("grpc_protocol_error", 0x9)
    assert "longer than 10 bytes" in failure.reason


# -- received header lists, checked in one pass

_FIELD_NAMES = st.sampled_from(
    [
        b":method", b":scheme", b":path", b":authority", b":status", b":protocol", b":bogus",
        b"host", b"te", b"cookie", b"connection", b"upgrade", b"content-type", b"grpc-timeout",
        b"Upper", b" lead", b"trail\t", b" Upper", b"x-pod", b"",
    ]
)  # fmt: skip
_FIELD_VALUES = st.sampled_from(
    [b"", b"POST", b"CONNECT", b"http", b"/", b"/a.B/C", b"a", b"b", b"trailers", b"TRAILERS",
     b"gzip", b" a", b"a\n", b"200", b"1S"]
)  # fmt: skip
_FIELD = st.builds(
    lambda name, value, never: (NeverIndexedHeaderTuple if never else HeaderTuple)(name, value),
    _FIELD_NAMES,
    _FIELD_VALUES,
    st.booleans(),
)
_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C")]


def _fields(*pairs: tuple[bytes, bytes]) -> list[HeaderTuple]:
    return [HeaderTuple(name, value) for name, value in pairs]


def _checked(check: Any, headers: list[Any], flags: Any) -> object:
    try:
        result = check([*headers], flags)
    except (h2.exceptions.ProtocolError, IndexError) as exc:
        return type(exc), str(exc)
    return [(type(field), *field) for field in result]


def _h2_check(headers: list[Any], flags: Any) -> list[Any]:
    normalised = h2.utilities.normalize_inbound_headers(headers, flags)
    return list(h2.utilities.validate_headers(normalised, flags))


@settings(max_examples=500, deadline=None)
@given(
    prefix=st.sampled_from(
        [[], _REQUEST, [*_REQUEST, (b":authority", b"a")], [(b":status", b"200")]]
    ),
    fields=st.lists(_FIELD, max_size=8),
    kind=st.sampled_from(["request", "response", "trailers"]),
    client=st.booleans(),
)
@example(prefix=_REQUEST, fields=_fields((b"host", b"a")), kind="request", client=False)
@example(  # :authority and host differ
    prefix=[*_REQUEST, (b":authority", b"a")],
    fields=_fields((b"host", b"b")),
    kind="request",
    client=False,
)
@example(  # te in capitals is allowed; two cookies are joined, last
    prefix=[*_REQUEST, (b":authority", b"a")],
    fields=_fields((b"cookie", b"a"), (b"te", b"TRAILERS"), (b"cookie", b"b"), (b"x-pod", b"a")),
    kind="request",
    client=False,
)
@example(  # :protocol belongs to CONNECT only
    prefix=[],
    fields=_fields(
        (b":method", b"CONNECT"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"a"),
        (b":protocol", b"a"),
    ),
    kind="request",
    client=False,
)
@example(  # an empty :path
    prefix=[],
    fields=_fields(
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")
    ),
    kind="request",
    client=False,
)
@example(prefix=[], fields=_fields((b" Upper", b"a")), kind="trailers", client=True)
def test_received_headers_are_checked_exactly_as_h2_checks_them(
    prefix: list[tuple[bytes, bytes]], fields: list[Any], kind: str, client: bool
) -> None:
    flags = h2.utilities.HeaderValidationFlags(
        is_client=client,
        is_trailer=kind == "trailers",
        is_response_header=kind == "response",
        is_push_promise=False,
    )
    headers = [HeaderTuple(*field) for field in prefix] + fields
    assert _checked(check_received, headers, flags) == _checked(_h2_check, headers, flags)


_GRPC_REQUEST = [*_REQUEST, (b":authority", b"a"), (b"content-type", b"application/grpc")]
# END_HEADERS, END_STREAM, PRIORITY; without END_HEADERS, a CONTINUATION carries the rest
_FRAME_FLAGS = st.sampled_from([0x4, 0x4, 0x5, 0x24, 0x25, 0x0, 0x1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lists=st.lists(
        st.tuples(
            st.sampled_from([[], _GRPC_REQUEST, [(b":status", b"200")]]),
            st.lists(_FIELD, max_size=4),
            _FRAME_FLAGS,
            st.sampled_from([0, 2, 2, -1]),  # the previous stream again, a new one, or 0
            st.booleans(),  # with PRIORITY: the stream depends on itself
        ),
        min_size=1,
        max_size=6,
    ),
    client=st.booleans(),
)
@example(  # the third stream is refused, and its headers are checked all the same
    lists=[(_GRPC_REQUEST, [], 0x4, 2, False)] * 2
    + [(_GRPC_REQUEST, [HeaderTuple(b"connection", b"a")], 0x4, 2, False)],
    client=False,
)
@example(  # two errors in one frame: h2 names the header's, not the priority's
    lists=[(_GRPC_REQUEST, [HeaderTuple(b"connection", b"a")], 0x24, 2, True)],
    client=False,
)
def test_a_connection_receives_header_blocks_exactly_as_with_h2s_checks(
    lists: list[tuple[list[Any], list[Any], int, int, bool]],
    client: bool,
) -> None:
    """Requests (on a server, one stream beyond its limit of 2 among them), responses and
    trailers (on a client), with and without END_STREAM, PRIORITY or CONTINUATION: the same
    events and the same bytes back (RST_STREAM, GOAWAY and its reason) as a core where h2
    parses the frames and checks the headers."""

    def core() -> ProtocolCore:
        if client:
            made = ProtocolCore(client_side=True, limits=WireLimits.for_client(ClientLimits()))
            made.initiate()
            made.receive(raw_frame(0x4, 0, 0, b""), now=0.0)
            for _ in range(8):
                made.open_stream(request_headers("/a.B/C"))
        else:
            limits = WireLimits.for_server(ServerLimits(max_concurrent_streams=2))
            made = ProtocolCore(client_side=False, limits=limits)
            made.initiate()
            made.receive(PREFACE + raw_frame(0x4, 0, 0, b""), now=0.0)
        made.data_to_send()
        return made

    ours, reference = core(), core()
    reference.h2.config.validate_inbound_headers = True  # h2's pipeline, not check_received
    reference.h2.config.normalize_inbound_headers = True
    # ... and h2's frame buffer, not receive_headers
    reference.h2.receive_headers = reference.h2.receive_data  # type: ignore[method-assign]
    encoders = hpack.Encoder(), hpack.Encoder()
    sid = -1
    for prefix, fields, flags, step, itself in lists:
        sid = sid + 2 if step > 0 or sid < 0 else sid
        results = []
        for one, encoder in zip((ours, reference), encoders, strict=True):
            block = encoder.encode([*prefix, *fields])
            if flags & 0x20:  # PRIORITY: on stream 0 (or on itself, an error), weight 16
                block = (sid if itself else 0).to_bytes(4, "big") + b"\x0f" + block
            on = 0 if step < 0 else sid
            if flags & 0x4:
                data = raw_frame(0x1, flags, on, block)
            else:
                half = len(block) // 2
                data = raw_frame(0x1, flags, on, block[:half])
                data += raw_frame(0x9, 0x4, on, block[half:])
            events = one.receive(data, now=0.0)
            results.append((_without_addresses(events), one.data_to_send()))
        assert results[0] == results[1]
    assert ours.h2.config.validate_inbound_headers is False


def _without_addresses(events: list[Any]) -> list[Any]:
    return [re.sub(r"0x[0-9a-f]+", "0x", repr(event)) for event in events]


# -- gRPC request and response heads: purerpc's answer, without purerpc for plain ones

_HEAD_VALUES = {
    ":method": ["POST", "GET"],
    ":scheme": ["http", "https", "ftp"],
    ":path": ["/a.B/C", "/a/b/c", "/x", "//m", "a/b"],
    ":authority": ["localhost"],
    ":status": ["200", "404", " 200"],
    ":protocol": ["x"],
    "te": ["trailers", "gzip"],
    "content-type": ["application/grpc", "application/grpc+proto", "text/plain"],
    "grpc-timeout": [
        *("1999829u", "5S", "3m", "2H", "7M", "10n", "S", "+5S", "a5S", "5x"),
        *("123456789m", "99999999999999H"),
    ],
    "grpc-encoding": ["identity", "gzip"],
    "grpc-accept-encoding": ["identity,gzip"],
    "grpc-status": ["0", "5"],
    "grpc-message": ["a%20b"],
    "grpc-x": ["1"],
    "user-agent": ["grpc-go/1.60.1"],
    "x-pod": ["web-0", "db-1"],
    "x-trace-bin": ["AAEC", "!!"],
}
_HEAD_FIELD = st.sampled_from(sorted(_HEAD_VALUES)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(_HEAD_VALUES[name]))
)
_PLAIN_REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/csi.v1.Node/NodePublishVolume"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.60.1"),
    ("te", "trailers"),
    ("grpc-timeout", "1999829u"),
]
_PLAIN_RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


def _either(parse: Any, headers: list[tuple[str, str]]) -> object:
    try:
        return parse(list(headers))
    except HeaderError as exc:
        return str(exc)


@settings(max_examples=500, deadline=None)
@given(
    base=st.sampled_from([[], _PLAIN_REQUEST, _PLAIN_RESPONSE]),
    changes=st.lists(_HEAD_FIELD, max_size=3),
    drop=st.integers(-1, 8),
    repeat=st.integers(-1, 8),
)
@example(base=_PLAIN_REQUEST, changes=[], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[("x-pod", "web-0"), ("grpc-x", "1")], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[(":path", "/a/b/c")], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[("content-type", "text/plain")], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[("grpc-timeout", "10n")], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[("grpc-timeout", "a5S")], drop=-1, repeat=-1)
@example(base=_PLAIN_REQUEST, changes=[("grpc-timeout", "99999999999999H")], drop=-1, repeat=-1)
@example(base=_PLAIN_RESPONSE, changes=[("grpc-status", "0")], drop=-1, repeat=-1)
@example(
    base=_PLAIN_RESPONSE, changes=[("x-pod", "a"), ("grpc-encoding", "gzip")], drop=-1, repeat=-1
)
def test_plain_heads_are_parsed_exactly_as_purerpc_parses_them(
    base: list[tuple[str, str]], changes: list[tuple[str, str]], drop: int, repeat: int
) -> None:
    """Requests and responses: the same head (path, timeout, encoding, metadata in order)
    or the same error as purerpc's parsing, whichever fields are changed, added, missing or
    repeated."""
    headers = list(base)
    for name, value in changes:  # a field of that name takes the value, or one is added
        at = next((n for n, (known, _) in enumerate(headers) if known == name), None)
        if at is None:
            headers.append((name, value))
        else:
            headers[at] = (name, value)
    if 0 <= repeat < len(headers):
        headers.append(headers[repeat])
    if 0 <= drop < len(headers):
        del headers[drop]
    assert _either(parse_request, headers) == _either(_purerpc_request, headers)
    assert _either(parse_response, headers) == _either(_purerpc_response, headers)


def test_a_kubelet_request_and_an_agent_response_are_parsed_without_purerpc() -> None:
    """The fast path is the one taken for what the driver receives every time."""
    head = _plain_request([*_PLAIN_REQUEST, ("x-pod", "web-0")])
    assert head is not None
    assert (head.path, head.metadata) == ("/csi.v1.Node/NodePublishVolume", (("x-pod", "web-0"),))
    assert head.timeout == pytest.approx(1.999829)
    grpc_go = [*_PLAIN_RESPONSE, ("grpc-accept-encoding", "identity,gzip")]
    assert _plain_response(grpc_go) is not None
