"""Registration entries: matching as the SPIRE agent does, templates, entries files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_spirecsi.devagent.entries import (
    EntriesError,
    Entry,
    StaticEntries,
    TemplateEntries,
    load_entries_file,
    parse_selector,
)

TD = "example.org"


def pod_selectors(
    ns: str = "shop", sa: str = "web", name: str = "web-0", uid: str = "u-1", node: str = "node-a"
) -> frozenset[tuple[str, str]]:
    return frozenset(
        {
            ("k8s", f"ns:{ns}"),
            ("k8s", f"sa:{sa}"),
            ("k8s", f"pod-name:{name}"),
            ("k8s", f"pod-uid:{uid}"),
            ("k8s", f"node-name:{node}"),
        }
    )


# A small universe, so that generated sets overlap often.
selector_st = st.tuples(
    st.sampled_from(["k8s", "unix"]),
    st.sampled_from(["ns:a", "ns:b", "sa:x", "uid:0", "pod-uid:1"]),
)
selector_sets = st.frozensets(selector_st, max_size=5)


@given(entry_selectors=selector_sets, request=selector_sets)
def test_an_entry_matches_iff_its_selectors_are_a_subset(
    entry_selectors: frozenset[tuple[str, str]], request: frozenset[tuple[str, str]]
) -> None:
    entry = Entry("spiffe://example.org/w", entry_selectors)
    assert entry.matches(request) == all(s in request for s in entry_selectors)


@given(
    entries=st.lists(st.tuples(st.integers(0, 99), selector_sets.filter(bool)), max_size=8),
    request=selector_sets,
)
def test_static_entries_return_every_matching_entry_in_order(
    entries: list[tuple[int, frozenset[tuple[str, str]]]], request: frozenset[tuple[str, str]]
) -> None:
    all_entries = tuple(Entry(f"spiffe://example.org/w{n}", sels) for n, sels in entries)
    found = StaticEntries(all_entries).entries_for(request)
    assert found == [e for e in all_entries if e.selectors <= request]


def test_default_template_gives_one_entry_per_service_account() -> None:
    source = TemplateEntries(TD)
    [entry] = source.entries_for(pod_selectors())
    assert entry.spiffe_id == "spiffe://example.org/ns/shop/sa/web"
    assert entry.selectors == {("k8s", "ns:shop"), ("k8s", "sa:web")}
    # Two pods of one service account get the same entry (one cached SVID in the agent).
    assert source.entries_for(pod_selectors(name="web-1", uid="u-2")) == [entry]


def test_template_has_no_entry_without_the_selectors_it_needs() -> None:
    source = TemplateEntries(TD)
    assert source.entries_for(frozenset({("k8s", "ns:shop")})) == []
    assert source.entries_for(frozenset({("k8s", "ns:shop"), ("unix", "sa:web")})) == []
    assert source.entries_for(frozenset({("k8s", "ns:shop"), ("k8s", "sa:")})) == []
    # A value that would break the SPIFFE ID's path yields no entry rather than a bad ID.
    assert source.entries_for(frozenset({("k8s", "ns:a/b"), ("k8s", "sa:web")})) == []


def test_template_placeholders_fill_from_k8s_selectors() -> None:
    source = TemplateEntries(
        TD,
        "spiffe://{td}/node/{node_name}/pod/{pod_name}/{pod_uid}",
        federates_with=("partner.example",),
        ttl=60,
        hint="pod",
    )
    [entry] = source.entries_for(pod_selectors())
    assert entry.spiffe_id == "spiffe://example.org/node/node-a/pod/web-0/u-1"
    assert entry.selectors == {
        ("k8s", "node-name:node-a"),
        ("k8s", "pod-name:web-0"),
        ("k8s", "pod-uid:u-1"),
    }
    assert (entry.federates_with, entry.ttl, entry.hint) == (("partner.example",), 60, "pod")


def test_template_gives_an_entry_per_value_when_a_selector_repeats() -> None:
    source = TemplateEntries(TD)
    selectors = frozenset({("k8s", "ns:a"), ("k8s", "ns:b"), ("k8s", "sa:w")})
    found = source.entries_for(selectors)
    assert [e.spiffe_id for e in found] == [
        "spiffe://example.org/ns/a/sa/w",
        "spiffe://example.org/ns/b/sa/w",
    ]
    assert all(e.matches(selectors) for e in found)


@given(request=st.frozensets(
    st.tuples(st.sampled_from(["k8s", "x"]),
              st.sampled_from(["ns:a", "ns:b", "sa:w", "sa:v", "pod-name:p", "bogus"])),
    max_size=6,
))  # fmt: skip
def test_template_entries_always_match_the_request_they_came_from(
    request: frozenset[tuple[str, str]],
) -> None:
    found = TemplateEntries(TD).entries_for(request)
    has_ns = any(t == "k8s" and v.startswith("ns:") for t, v in request)
    has_sa = any(t == "k8s" and v.startswith("sa:") for t, v in request)
    assert bool(found) == (has_ns and has_sa)
    assert all(e.matches(request) for e in found)
    assert len({e.spiffe_id for e in found}) == len(found)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("spiffe://{td}/ns/{namespace}", "unknown placeholder {namespace}"),
        ("spiffe://{td}/ns/{ns!r}", "no format specs"),
        ("spiffe://other.org/ns/{ns}", "not the agent's"),
        ("spiffe://{td}", "needs a path"),
        ("https://{td}/{ns}", "must start with"),
        ("spiffe://{td}/{ns", "template"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(template: str, fragment: str) -> None:
    with pytest.raises(EntriesError) as info:
        TemplateEntries(TD, template)
    assert fragment in str(info.value)


def test_parse_selector_splits_at_the_first_colon() -> None:
    assert parse_selector("k8s:ns:default") == ("k8s", "ns:default")
    assert parse_selector("unix:uid:0") == ("unix", "uid:0")
    for bad in ("k8s", ":ns:x", "k8s:"):
        with pytest.raises(ValueError, match="type:value"):
            parse_selector(bad)


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "entries.json"
    path.write_text(json.dumps(document))
    return path


def test_entries_file_loads_every_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {
                "spiffe_id": "spiffe://example.org/web",
                "selectors": ["k8s:ns:default", "k8s:sa:web"],
                "hint": "internal",
                "federates_with": ["partner.example", "spiffe://other.example"],
                "ttl": 120,
            },
            {"spiffe_id": "spiffe://example.org/any", "selectors": ["k8s:ns:default"]},
        ],
    )
    source = load_entries_file(path, trust_domain=TD)
    web, anything = source.entries
    assert web == Entry(
        "spiffe://example.org/web",
        frozenset({("k8s", "ns:default"), ("k8s", "sa:web")}),
        "internal",
        ("partner.example", "other.example"),
        120,
    )
    assert anything.hint == "" and anything.ttl is None and anything.federates_with == ()
    request = frozenset({("k8s", "ns:default"), ("k8s", "sa:web"), ("k8s", "pod-name:p")})
    assert source.entries_for(request) == [web, anything]
    assert source.entries_for(frozenset({("k8s", "ns:default")})) == [anything]


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"spiffe_id": "x"}, "expected a JSON list"),
        (["spiffe://example.org/a"], "entry 0: expected an object"),
        ([{"selectors": ["k8s:ns:a"]}], "entry 0: 'spiffe_id' is required"),
        ([{"spiffe_id": "example.org/a", "selectors": ["k8s:ns:a"]}], "must start with"),
        (
            [{"spiffe_id": "spiffe://partner.example/a", "selectors": ["k8s:ns:a"]}],
            "not in the agent's trust domain",
        ),
        ([{"spiffe_id": "spiffe://example.org/a", "selectors": []}], "non-empty list"),
        ([{"spiffe_id": "spiffe://example.org/a", "selectors": "k8s:ns:a"}], "non-empty list"),
        ([{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s"]}], "type:value"),
        (
            [{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s:ns:a"], "ttl": -1}],
            "'ttl' must be a positive",
        ),
        (
            [{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s:ns:a"], "ttl": True}],
            "'ttl' must be a positive",
        ),
        (
            [{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s:ns:a"], "hint": 3}],
            "'hint' must be a string",
        ),
        (
            [{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s:ns:a"],
              "federates_with": ["Bad Domain"]}],
            "is not a trust domain name",
        ),
        (
            [{"spiffe_id": "spiffe://example.org/a", "selectors": ["k8s:ns:a"],
              "federatesWith": ["x"]}],
            "unknown field(s) federatesWith",
        ),
        (
            [{"spiffe_id": "spiffe://example.org/ok", "selectors": ["k8s:ns:a"]},
             {"spiffe_id": "spiffe://example.org/a"}],
            "entry 1:",
        ),
    ],
)  # fmt: skip
def test_malformed_entries_file_names_the_entry_and_field(
    tmp_path: Path, document: object, fragment: str
) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(EntriesError) as info:
        load_entries_file(path, trust_domain=TD)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_or_invalid_json_entries_file(tmp_path: Path) -> None:
    with pytest.raises(EntriesError, match="cannot read entries file"):
        load_entries_file(tmp_path / "missing.json", trust_domain=TD)
    path = tmp_path / "broken.json"
    path.write_text('[{"spiffe_id": "spiffe://example.org/a",\n  "selectors": [}]')
    with pytest.raises(EntriesError, match="invalid JSON at line 2"):
        load_entries_file(path, trust_domain=TD)
