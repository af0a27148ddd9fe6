"""HPACK header blocks that never touch the dynamic table (RFC 7541), for the header lists
the engine sends again and again: response headers, trailers, the agent's request headers.

A field that is in the static table (name and value) is sent as its index; any other field
is a literal "without indexing" (or "never indexed", for what h2 marks so), its name by
static index where the table has it, no Huffman coding. Such a block means the same to the
peer whatever both dynamic tables hold, so it can be encoded once and sent as it is for the
life of the process; the cost is a few bytes more on a unix socket than h2's indexing.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import HeaderTuple
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
