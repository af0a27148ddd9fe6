"""Header blocks the engine receives, decoded without hpack's decoder loop
(``grpc/_hpack.py``'s :class:`Decoder`): the same header lists, the same dynamic table and the
same errors as :class:`hpack.Decoder`, whatever the peer sends."""

from __future__ import annotations

import re

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.h2_raw import PREFACE, raw_frame
from trio_spirecsi.grpc import ServerLimits
from trio_spirecsi.grpc._hpack import Decoder, integer
from trio_spirecsi.grpc._protocol import ConnectionFailed, ProtocolCore
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
