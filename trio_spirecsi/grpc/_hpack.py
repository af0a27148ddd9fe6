"""HPACK (RFC 7541) for the engine: blocks it sends without the dynamic table, and a faster
decoder for the blocks it receives.

Sending: the header lists the engine sends again and again (response headers, trailers, the
agent's request headers) go out as blocks that never touch the dynamic table. A field that is
in the static table (name and value) is sent as its index; any other field is a literal
"without indexing" (or "never indexed", for what h2 marks so), its name by static index where
the table has it, no Huffman coding. Such a block means the same to the peer whatever both
dynamic tables hold, so it can be encoded once and sent as it is for the life of the process;
the cost is a few bytes more on a unix socket than h2's indexing.

Receiving: :class:`Decoder` is hpack's decoder, its state and its errors, with the decoding
loop written for speed; every request and response header block goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)

_INDEXED = 0x80  # 6.1: indexed header field, 7-bit prefix
_WITHOUT_INDEXING = 0x00  # 6.2.2: literal without indexing, 4-bit prefix
_NEVER_INDEXED = 0x10  # 6.2.3: literal never indexed, 4-bit prefix


def integer(value: int, prefix_bits: int, first: int) -> bytes:
    """``value`` as an HPACK integer (5.1) whose first byte carries ``first`` above the
    prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return integer(len(data), 7, 0) + data  # 5.2, H bit clear: no Huffman coding


def static_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The header block for ``headers`` (names and values as bytes) that uses the static
    table only. An :class:`hpack.HeaderTuple` that is not indexable (h2 marks credentials
    so) goes out as "never indexed"."""
    out = bytearray()
    for field in headers:
        name, value = field[0], field[1]
        never = isinstance(field, HeaderTuple) and not field.indexable
        if not never:
            index = _STATIC_FIELDS.get((name, value))
            if index is not None:
                out += integer(index, 7, _INDEXED)
                continue
        index = _STATIC_NAMES.get(name, 0)
        out += integer(index, 4, _NEVER_INDEXED if never else _WITHOUT_INDEXING)
        if not index:
            out += _string(name)
        out += _string(value)
    return bytes(out)


# Decoding -------------------------------------------------------------------------------------

_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_LENGTH = len(_STATIC)
_LONGEST_INTEGER = 10  # bytes after the prefix; 70 bits is beyond any index, length or size


class Decoder(hpack.Decoder):  # type: ignore[misc]
    """hpack's decoder with :meth:`decode` for ``raw=True`` rewritten as one loop: the same
    header lists, the same changes to the dynamic table and the same exceptions, at half
    the cost (no logging call per field, no memoryview per representation).

    One difference, on purpose: an integer longer than :data:`_LONGEST_INTEGER` bytes after
    its prefix is a decoding error (RFC 7541 5.1 lets a decoder limit them) instead of a
    number thousands of digits long that hpack builds and then fails on.
    """

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        if not raw:
            decoded: list[HeaderTuple] = super().decode(data, raw)
            return decoded
        data = bytes(data)
        table = self.header_table
        dynamic = table.dynamic_entries
        limit = self.max_header_list_size
        headers: list[HeaderTuple] = []
        inflated = 0
        pos = 0
        end = len(data)
        while pos < end:
            first = data[pos]
            if first & 0x80:  # 6.1: indexed header field
                index = first & 0x7F
                pos += 1
                if index == 0x7F:
                    index, pos = _integer(data, pos - 1, 0x7F)
                name, value = _entry(index, dynamic)
                header = _new(HeaderTuple, (name, value))
            elif first & 0x40 or not first & 0x20:  # 6.2: a literal
                indexing = first & 0x40
                mask = 0x3F if indexing else 0x0F
                index = first & mask
                if not index:
                    name, pos = _literal(data, pos + 1)
                else:
                    pos += 1
                    if index == mask:
                        index, pos = _integer(data, pos - 1, mask)
                    name = _entry(index, dynamic)[0]
                value, pos = _literal(data, pos)
                if indexing:
                    header = _new(HeaderTuple, (name, value))
                    size = 32 + len(name) + len(value)
                    if size > table._maxsize:  # hpack's HeaderTable.add, without logging
                        dynamic.clear()
                        table._current_size = 0
                    else:
                        dynamic.appendleft((name, value))
                        current = table._current_size + size
                        while current > table._maxsize:
                            evicted = dynamic.pop()
                            current -= 32 + len(evicted[0]) + len(evicted[1])
                        table._current_size = current
                elif first & 0x10:
                    header = _new(NeverIndexedHeaderTuple, (name, value))
                else:
                    header = _new(HeaderTuple, (name, value))
            else:  # 6.3: dynamic table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, pos = _integer(data, pos, 0x1F)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            headers.append(header)
            inflated += 32 + len(name) + len(value)
            if inflated > limit:
                raise OversizedHeaderListError(
                    f"A header list larger than {limit} has been received"
                )
        if table.maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers


_new = tuple.__new__


def _entry(index: int, dynamic: Any) -> tuple[bytes, bytes]:
    """The table's entry ``index`` (2.3.3), as bytes."""
    if 0 < index <= _STATIC_LENGTH:
        return _STATIC[index - 1]
    if _STATIC_LENGTH < index <= _STATIC_LENGTH + len(dynamic):
        name, value = dynamic[index - _STATIC_LENGTH - 1]
        return bytes(name), bytes(value)
    raise InvalidTableIndex(f"Invalid table index {index}")


def _integer(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    """The integer (5.1) whose prefix is the low bits ``mask`` of ``data[pos]``, and the
    position after it."""
    if pos >= len(data):
        raise HPACKDecodingError("Unable to decode HPACK integer representation: no bytes")
    number = data[pos] & mask
    pos += 1
    if number < mask:
        return number, pos
    shift = 0
    for at in range(pos, min(len(data), pos + _LONGEST_INTEGER)):
        byte = data[at]
        number += (byte & 0x7F) << shift
        if byte < 0x80:
            return number, at + 1
        shift += 7
    if len(data) - pos < _LONGEST_INTEGER:
        raise HPACKDecodingError("Unable to decode HPACK integer representation: truncated")
    raise HPACKDecodingError(f"HPACK integer longer than {_LONGEST_INTEGER} bytes")


def _literal(data: bytes, pos: int) -> tuple[bytes, int]:
    """A string literal (5.2) at ``pos``, Huffman-decoded if so marked, and the position
    after it."""
    length, start = _integer(data, pos, 0x7F)
    stop = start + length
    if stop > len(data):
        raise HPACKDecodingError("Truncated header block")
    if data[pos] & 0x80:
        return decode_huffman(data[start:stop]), stop
    return data[start:stop], stop
