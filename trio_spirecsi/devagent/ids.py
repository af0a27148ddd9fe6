"""SPIFFE IDs and trust domain names, validated as the SPIFFE ID specification says."""

from __future__ import annotations

import re

SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def normalize_trust_domain(value: str) -> str:
    """``example.org`` or ``spiffe://example.org`` -> ``example.org``; ValueError if invalid."""
    name = value[len(SCHEME) :] if value.startswith(SCHEME) else value
    if not _TRUST_DOMAIN.fullmatch(name):
        raise ValueError(
            f"invalid trust domain {value!r}: use lower-case letters, digits, '.', '-' and '_'"
        )
    return name


def trust_domain_id(trust_domain: str) -> str:
    """The trust domain's own SPIFFE ID, the form used as bundle map keys."""
    return SCHEME + normalize_trust_domain(trust_domain)


def split_spiffe_id(spiffe_id: str) -> tuple[str, str]:
    """``spiffe://td/a/b`` -> ``("td", "/a/b")``; ValueError naming the rule it breaks.

    Workload IDs must have a path: a trust domain's own ID is not an SVID.
    """
    if not spiffe_id.startswith(SCHEME):
        raise ValueError(f"invalid SPIFFE ID {spiffe_id!r}: must start with {SCHEME!r}")
    if len(spiffe_id) > 2048:
        raise ValueError("invalid SPIFFE ID: longer than 2048 bytes")
    rest = spiffe_id[len(SCHEME) :]
    trust_domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(f"invalid SPIFFE ID {spiffe_id!r}: bad trust domain {trust_domain!r}")
    if not slash or not path:
        raise ValueError(f"invalid SPIFFE ID {spiffe_id!r}: a workload ID needs a path")
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(
                f"invalid SPIFFE ID {spiffe_id!r}: path segment {segment!r} must be non-empty, "
                "not '.' or '..', and use letters, digits, '.', '-' and '_'"
            )
    return trust_domain, "/" + path


def is_path_segment(value: str) -> bool:
    """True if ``value`` can stand as one segment of a SPIFFE ID path."""
    return bool(_SEGMENT.fullmatch(value)) and value not in (".", "..")


def is_valid_spiffe_id(spiffe_id: str) -> bool:
    try:
        split_spiffe_id(spiffe_id)
    except ValueError:
        return False
    return True
