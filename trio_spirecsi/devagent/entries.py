"""Registration entries and how a SPIRE agent matches them against selectors.

An entry matches a request when the entry's selectors are a subset of the
request's (SPIRE's "subset" match for workload attestation); several entries
may match, each giving the workload one more SVID. Entries come either from a
template (one entry per service account, by default) or from a JSON file.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..spiffe import (
    SpiffeIdError,
    is_path_segment,
    normalise_trust_domain,
    workload_id_parts,
)

"""(type, value), e.g. ``("k8s", "ns:default")``."""

DEFAULT_TEMPLATE = "spiffe://{td}/ns/{ns}/sa/{sa}"

PLACEHOLDERS: Mapping[str, str] = {
    "ns": "ns:",
    "sa": "sa:",
    "pod_name": "pod-name:",
    "pod_uid": "pod-uid:",
    "node_name": "node-name:",
}
"""Template placeholder -> the k8s selector value prefix it is filled from."""


class EntriesError(ValueError):
    """Entries (a file or a template) that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Entry:
    """A registration entry: who gets ``spiffe_id``, and how its SVIDs look."""

    spiffe_id: str
    selectors: frozenset[tuple[str, str]]
    hint: str = ""
    federates_with: tuple[str, ...] = ()
    ttl: int | None = None

    def matches(self, selectors: Collection[tuple[str, str]]) -> bool:
        """True iff every selector of this entry is among ``selectors``."""
        return self.selectors.issubset(selectors)

    @property
    def svid_key(self) -> tuple[str, frozenset[tuple[str, str]], int | None]:
        """What determines this entry's X.509-SVID; entries that differ only in hint or
        federation share cached SVIDs."""
        return (self.spiffe_id, self.selectors, self.ttl)


class EntrySource(Protocol):
    def entries_for(self, selectors: frozenset[tuple[str, str]]) -> list[Entry]:
        """Every entry that matches ``selectors``, in a stable order."""
        ...


def format_selector(selector: tuple[str, str]) -> str:
    return f"{selector[0]}:{selector[1]}"


def parse_selector(text: str) -> tuple[str, str]:
    """``"k8s:ns:default"`` -> ``("k8s", "ns:default")`` (the type ends at the first colon)."""
    kind, colon, value = text.partition(":")
    if not colon or not kind or not value:
        raise ValueError(f"selector {text!r} must look like 'type:value', e.g. 'k8s:ns:default'")
    return (kind, value)


@dataclass(frozen=True)
class StaticEntries:
    """A fixed list of entries (e.g. from an entries file)."""

    entries: tuple[Entry, ...]

    def entries_for(self, selectors: frozenset[tuple[str, str]]) -> list[Entry]:
        return [e for e in self.entries if e.matches(selectors)]


@dataclass(frozen=True)
class TemplateEntries:
    """An entry for every k8s workload, its SPIFFE ID rendered from a template.

    With the default template, every (namespace, service account) pair has an
    entry whose selectors are ``k8s:ns:<ns>`` and ``k8s:sa:<sa>``: the selectors
    of the placeholders the template uses. ``{td}`` is the trust domain. A
    selector value that is not a valid SPIFFE ID path segment gives no entry.
    """

    trust_domain: str
    template: str = DEFAULT_TEMPLATE
    federates_with: tuple[str, ...] = ()
    ttl: int | None = None
    hint: str = ""
    placeholders: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise EntriesError(f"template {self.template!r}: {exc}") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name != "td" and name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in ("td", *PLACEHOLDERS))
                raise EntriesError(
                    f"template {self.template!r}: unknown placeholder {{{name}}}; use {known}"
                )
            if spec or conversion:
                raise EntriesError(f"template {self.template!r}: no format specs or conversions")
            if name != "td" and name not in names:
                names.append(name)
        object.__setattr__(self, "placeholders", tuple(names))
        sample = self.template.format(td=self.trust_domain, **dict.fromkeys(PLACEHOLDERS, "x"))
        try:
            trust_domain, _ = workload_id_parts(sample)
        except ValueError as exc:
            raise EntriesError(
                f"template {self.template!r} does not give SPIFFE IDs: {exc}"
            ) from None
        if trust_domain != self.trust_domain:
            raise EntriesError(
                f"template {self.template!r} names trust domain {trust_domain!r}, "
                f"not the agent's {self.trust_domain!r}"
            )

    def entries_for(self, selectors: frozenset[tuple[str, str]]) -> list[Entry]:
        choices: list[list[tuple[str, str]]] = []
        for name in self.placeholders:
            prefix = PLACEHOLDERS[name]
            values = sorted(
                v[len(prefix) :]
                for t, v in selectors
                if t == "k8s" and v.startswith(prefix) and is_path_segment(v[len(prefix) :])
            )
            if not values:
                return []
            choices.append([(name, v) for v in values])
        found = []
        for combination in itertools.product(*choices):
            spiffe_id = self.template.format(td=self.trust_domain, **dict(combination))
            try:
                workload_id_parts(spiffe_id)
            except SpiffeIdError:
                continue
            found.append(
                Entry(
                    spiffe_id=spiffe_id,
                    selectors=frozenset(("k8s", PLACEHOLDERS[n] + v) for n, v in combination),
                    hint=self.hint,
                    federates_with=self.federates_with,
                    ttl=self.ttl,
                )
            )
        return found


_FIELDS = {"spiffe_id", "selectors", "hint", "federates_with", "ttl"}


def parse_entries(
    document: object, *, trust_domain: str, source: str = "entries"
) -> tuple[Entry, ...]:
    """Entries from a decoded JSON document (a list of objects); EntriesError names the
    entry and field at fault."""
    if not isinstance(document, list):
        raise EntriesError(
            f"{source}: expected a JSON list of entries, got {type(document).__name__}"
        )
    entries: list[Entry] = []
    for index, item in enumerate(document):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise EntriesError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            raise EntriesError(
                f"{where}: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_FIELDS))}"
            )
        entries.append(_parse_entry(item, where, trust_domain))
    return tuple(entries)


def _parse_entry(item: Mapping[str, object], where: str, trust_domain: str) -> Entry:
    spiffe_id = item.get("spiffe_id")
    if not isinstance(spiffe_id, str):
        raise EntriesError(f"{where}: 'spiffe_id' is required and must be a string")
    try:
        entry_domain, _ = workload_id_parts(spiffe_id)
    except ValueError as exc:
        raise EntriesError(f"{where}: {exc}") from None
    if entry_domain != trust_domain:
        raise EntriesError(
            f"{where}: {spiffe_id} is not in the agent's trust domain {trust_domain!r}"
        )
    raw_selectors = item.get("selectors")
    if (
        not isinstance(raw_selectors, list)
        or not raw_selectors
        or not all(isinstance(s, str) for s in raw_selectors)
    ):
        raise EntriesError(
            f"{where}: 'selectors' must be a non-empty list of 'type:value' strings, "
            'e.g. ["k8s:ns:default", "k8s:sa:web"]'
        )
    try:
        selectors = frozenset(parse_selector(s) for s in raw_selectors)
    except ValueError as exc:
        raise EntriesError(f"{where}: {exc}") from None
    hint = item.get("hint", "")
    if not isinstance(hint, str):
        raise EntriesError(f"{where}: 'hint' must be a string")
    raw_federates = item.get("federates_with", [])
    if not isinstance(raw_federates, list) or not all(isinstance(t, str) for t in raw_federates):
        raise EntriesError(f"{where}: 'federates_with' must be a list of trust domain names")
    try:
        federates_with = tuple(dict.fromkeys(normalise_trust_domain(t) for t in raw_federates))
    except ValueError as exc:
        raise EntriesError(f"{where}: federates_with: {exc}") from None
    ttl = item.get("ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise EntriesError(f"{where}: 'ttl' must be a positive number of seconds or null")
    return Entry(spiffe_id, selectors, hint, federates_with, ttl)


def load_entries_file(path: str | Path, *, trust_domain: str) -> StaticEntries:
    """The entries in a JSON file; EntriesError for an unreadable or malformed file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise EntriesError(f"cannot read entries file {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EntriesError(
            f"entries file {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return StaticEntries(parse_entries(document, trust_domain=trust_domain, source=str(path)))


def matching(entries: Iterable[Entry], selectors: Collection[tuple[str, str]]) -> list[Entry]:
    """The entries whose selectors are all in ``selectors``."""
    return [e for e in entries if e.matches(selectors)]


def as_source(entries: EntrySource | Sequence[Entry]) -> EntrySource:
    if isinstance(entries, (list, tuple)):
        return StaticEntries(tuple(entries))
    return entries  # type: ignore[return-value]
