"""SPIFFE IDs and trust domains: the one place that says what a valid one looks like.

Everything that builds, checks or compares SPIFFE IDs uses this module: the volume
attributes (``spiffe-id``), the parsing of the SPIRE agent's responses, the Workload API and
SDS answers, JWT-SVID validation. It also holds the rule a volume uses to choose among a
workload's identities (``svid-hint`` and ``spiffe-id``), so the files, the JWT-SVID and the
per-pod socket always agree on which identity is "the" one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

SCHEME = "spiffe://"
TRUST_DOMAIN_MAX = 255
SPIFFE_ID_MAX = 2048

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SHOWN = 80

T = TypeVar("T")


class SpiffeIdError(ValueError):
    """Not a valid SPIFFE ID or trust domain; ``message`` says why, for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _show(value: str) -> str:
    return repr(value[:_SHOWN] + "..." if len(value) > _SHOWN else value)


def trust_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a trust domain name (``example.org``), or None."""
    if not name:
        return "the trust domain is empty"
    if len(name) > TRUST_DOMAIN_MAX or not _TRUST_DOMAIN.fullmatch(name):
        return (
            f"{_show(name)} is not a trust domain name: lowercase letters, digits, '.', '-' "
            f"and '_' only, at most {TRUST_DOMAIN_MAX} characters"
        )
    if name.startswith("."):
        return f"{_show(name)} is not a trust domain name: it starts with '.'"
    return None


def spiffe_id_problem(spiffe_id: str) -> str | None:
    """Why ``spiffe_id`` is not a SPIFFE ID (``spiffe://example.org/path``), or None."""
    if not spiffe_id.startswith(SCHEME):
        return f"{_show(spiffe_id)} is not a SPIFFE ID: it must start with 'spiffe://'"
    if len(spiffe_id) > SPIFFE_ID_MAX:
        return f"a SPIFFE ID is at most {SPIFFE_ID_MAX} characters long"
    trust_domain, slash, path = spiffe_id[len(SCHEME) :].partition("/")
    problem = trust_domain_problem(trust_domain)
    if problem is not None:
        return f"{_show(spiffe_id)} is not a SPIFFE ID: {problem}"
    if slash:
        for segment in path.split("/"):
            if segment in ("", ".", "..") or not _PATH_SEGMENT.fullmatch(segment):
                return (
                    f"{_show(spiffe_id)} is not a SPIFFE ID: path segments are non-empty, "
                    "not '.' or '..', and use letters, digits, '.', '-' and '_' only"
                )
    return None


def normalise_trust_domain(name: str) -> str:
    """``spiffe://example.org`` and ``example.org`` -> ``example.org``.

    The SPIRE agent keys bundles and ``federates_with`` by the first form although its
    proto says "trust domain name"; both are accepted. Raises SpiffeIdError otherwise.
    """
    bare = name.removeprefix(SCHEME)
    problem = trust_domain_problem(bare)
    if problem is not None:
        raise SpiffeIdError(problem)
    return bare


def spiffe_id(trust_domain: str, path: str) -> str:
    """The SPIFFE ID of SPIRE's ``SPIFFEID{trust_domain, path}`` message, validated.

    The trust domain may carry the ``spiffe://`` scheme or not; the path is empty or starts
    with ``/``. Raises SpiffeIdError naming what is wrong.
    """
    bare = normalise_trust_domain(trust_domain)
    if path and not path.startswith("/"):
        raise SpiffeIdError(f"the path {_show(path)} of a SPIFFE ID does not start with '/'")
    result = f"{SCHEME}{bare}{path}"
    problem = spiffe_id_problem(result)
    if problem is not None:
        raise SpiffeIdError(problem)
    return result


def trust_domain_of(spiffe_id: str) -> str:
    """``spiffe://example.org/web`` -> ``example.org`` (for an ID already validated)."""
    return spiffe_id.removeprefix(SCHEME).partition("/")[0]


def trust_domain_id(trust_domain: str) -> str:
    """``example.org`` -> ``spiffe://example.org``: how the Workload API and SDS name it."""
    return SCHEME + trust_domain


@dataclass(frozen=True, slots=True)
class Preference:
    """Which of a workload's identities a volume uses: the first, in the agent's order,
    whose hint is ``hint`` and whose SPIFFE ID is ``spiffe_id`` ("" = any)."""

    hint: str = ""
    spiffe_id: str = ""

    def accepts(self, hint: str, spiffe_id: str) -> bool:
        return (not self.hint or hint == self.hint) and (
            not self.spiffe_id or spiffe_id == self.spiffe_id
        )

    def first(self, items: Sequence[T], key: Callable[[T], tuple[str, str]]) -> T | None:
        """The chosen item (``key`` gives its hint and SPIFFE ID), or None."""
        for item in items:
            if self.accepts(*key(item)):
                return item
        return None

    def chosen_first(self, items: Sequence[T], key: Callable[[T], tuple[str, str]]) -> list[T]:
        """``items`` with the chosen one moved to the front (unchanged when none is)."""
        chosen = self.first(items, key)
        if chosen is None:
            return list(items)
        return [chosen, *(item for item in items if item is not chosen)]

    def describe(self) -> str:
        """``hint 'web' and SPIFFE ID spiffe://...``, for messages."""
        parts = [
            f"hint {self.hint!r}" if self.hint else "",
            self.spiffe_id and f"SPIFFE ID {self.spiffe_id}",
        ]
        return " and ".join(p for p in parts if p) or "any identity"


def is_path_segment(value: str) -> bool:
    """True if ``value`` can stand as one segment of a SPIFFE ID path."""
    return bool(_PATH_SEGMENT.fullmatch(value)) and value not in (".", "..")


def workload_id_parts(spiffe_id: str) -> tuple[str, str]:
    """``spiffe://td/a/b`` -> ``("td", "/a/b")`` for a workload's SPIFFE ID.

    Raises SpiffeIdError naming the rule it breaks; a trust domain's own ID (no path) is not
    a workload's.
    """
    problem = spiffe_id_problem(spiffe_id)
    if problem is not None:
        raise SpiffeIdError(problem)
    trust_domain, _, path = spiffe_id.removeprefix(SCHEME).partition("/")
    if not path:
        raise SpiffeIdError(f"{_show(spiffe_id)} is not a workload's SPIFFE ID: it needs a path")
    return trust_domain, "/" + path
