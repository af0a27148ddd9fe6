"""Received header lists checked as h2 checks them (RFC 9113 8.2-8.3), in one pass.

h2 normalises and validates every received header list through a pipeline of eight
generators (``normalize_inbound_headers`` then ``validate_headers``). :func:`check_received`
does the same in one loop, in the same order: cookie fields joined and moved last, then for
each field, the checks of each stage in pipeline order, then the pseudo-header and
``:authority``/``host`` checks at the end. The list it returns and the error it raises (class
and message) are h2's. Its only caller is ``_protocol._H2Connection``, which has h2's own
pipeline switched off.
"""

from __future__ import annotations

from typing import Any

from h2.exceptions import ProtocolError
from h2.utilities import (
    _ALLOWED_PSEUDO_HEADER_FIELDS,
    _WHITESPACE,
    CONNECTION_HEADERS,
    HeaderValidationFlags,
    _check_pseudo_header_field_acceptability,
)
from hpack import NeverIndexedHeaderTuple

# h2's own sets, so that both accept and refuse the same names; uppercase is tested by set
# (h2 runs a regular expression per name).
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_received(headers: list[Any], flags: HeaderValidationFlags) -> list[Any]:
    """``headers`` (bytes pairs, as hpack decodes them) normalised and validated as h2's
    ``validate_headers(normalize_inbound_headers(headers, flags), flags)`` does; raises
    its ProtocolError (or, for an empty name, its IndexError)."""
    cookies = [field[1] for field in headers if field[0] == b"cookie"]
    if cookies:
        headers = [field for field in headers if field[0] != b"cookie"]
        headers.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
    request = not flags.is_response_header and not flags.is_trailer
    pseudo: set[bytes] = set()
    regular = False
    method = None
    authority = host = None
    for field in headers:
        name, value = field[0], field[1]
        if not _UPPER.isdisjoint(name):
            raise ProtocolError(f"Received uppercase header name {name}.")
        if name[0] in _WHITESPACE or name[-1] in _WHITESPACE:
            raise ProtocolError(f"Received header name surrounded by whitespace {name!r}")
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            raise ProtocolError(f"Received header value surrounded by whitespace {value!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise ProtocolError(f"Invalid value for Transfer-Encoding header: {value}")
        if name in CONNECTION_HEADERS:
            raise ProtocolError(f"Connection-specific header field present: {name}.")
        if name[0] == 0x3A:  # b":"
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name}")
            pseudo.add(name)
            if regular:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name}")
            if name not in _ALLOWED_PSEUDO_HEADER_FIELDS:
                raise ProtocolError(f"Received custom pseudo-header field {name}")
            if name == b":method":
                method = value
        else:
            regular = True
        if request:
            if name == b":authority":
                authority = value
            elif name == b"host":
                host = value
            elif name == b":path" and not value:
                raise ProtocolError("An empty :path header is forbidden")
    _check_pseudo_header_field_acceptability(pseudo, method, flags)
    if request:
        if authority is None and host is None:
            raise ProtocolError("Request header block does not have an :authority or Host header.")
        if authority is not None and host is not None and authority != host:
            raise ProtocolError(
                "Request header block has mismatched :authority and Host headers: "
                f"{authority!r} / {host!r}"
            )
    return headers
