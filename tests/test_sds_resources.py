"""SDS resolution and encodings (pure): every row of the SPIRE agent's resolution table, the
errors it gives, and the sensible answers where SPIRE's behaviour is a quirk. Every response
is decoded as Envoy would decode it; certificates and keys are real and must parse."""

from __future__ import annotations

import pytest

from tests.sds_fixtures import (
    BUNDLES,
    FED,
    FED_ID,
    OWN,
    OWN_ID,
    V17,
    V18,
    WORKLOAD1,
    WORKLOAD_ID,
    Seen,
    metadata_value,
    node,
    request,
    seen,
    snapshot,
    svid_of,
)
from trio_spirecsi._proto.envoy.config.core.v3 import base_pb2
from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.grpc import StatusCode
from trio_spirecsi.sds import (
    SdsError,
    SdsSettings,
    SdsSnapshot,
    build_response,
    fetch_response,
    snapshot_of,
    uses_spiffe_validator,
)
from trio_spirecsi.sds.resources import go_parse_bool, go_quote

DEFAULT = SdsSettings()
DISABLED = SdsSettings(disable_spiffe_cert_validation=True)
DISABLED_BUNDLE_IS_ALL = SdsSettings(disable_spiffe_cert_validation=True, default_bundle_name="ALL")


def answer(
    req: discovery_pb2.DiscoveryRequest,
    settings: SdsSettings = DEFAULT,
    snap: SdsSnapshot | None = None,
) -> discovery_pb2.DiscoveryResponse:
    return build_response(
        req, snap or snapshot(), version_info="1", nonce="0a1b2c3d", settings=settings
    )


def own(kind: str, name: str = OWN_ID) -> Seen:
    return Seen(name, kind, ("domain.test",))


def fed(kind: str) -> Seen:
    return Seen(FED_ID, kind, ("otherdomain.test",))


def cert(name: str = WORKLOAD_ID) -> Seen:
    return Seen(name, "cert", (WORKLOAD_ID,))


# SPIRE's table (handler_test.go), one row per case -------------------------------------------

TABLE = [
    ("all, v17", (), V17, DEFAULT, [own("trusted_ca"), fed("trusted_ca"), cert()]),
    ("all, v18", (), V18, DEFAULT, [own("spiffe"), fed("spiffe"), cert()]),
    ("own td, v17", (OWN_ID,), V17, DEFAULT, [own("trusted_ca")]),
    ("own td, v18", (OWN_ID,), V18, DEFAULT, [own("spiffe")]),
    ("own td, node without version", (OWN_ID,), node(), DEFAULT, [own("spiffe")]),
    ("own td, no node", (OWN_ID,), None, DEFAULT, [own("spiffe")]),
    ("ROOTCA, v18", ("ROOTCA",), V18, DEFAULT, [own("spiffe", "ROOTCA")]),
    ("federated td, v17", (FED_ID,), V17, DEFAULT, [fed("trusted_ca")]),
    ("federated td, v18", (FED_ID,), V18, DEFAULT, [fed("spiffe")]),
    ("identity, v17", (WORKLOAD_ID,), V17, DEFAULT, [cert()]),
    ("identity, v18", (WORKLOAD_ID,), V18, DEFAULT, [cert()]),
    ("default, v17", ("default",), V17, DEFAULT, [cert("default")]),
    (
        "ALL, v18",
        ("ALL",),
        V18,
        DEFAULT,
        [Seen("ALL", "spiffe", ("domain.test", "otherdomain.test"))],
    ),
    ("disabled in config", (OWN_ID,), V18, DISABLED, [own("trusted_ca")]),
    ("default, bundle name ALL", ("default",), V18, DISABLED_BUNDLE_IS_ALL, [cert("default")]),
    ("ALL as bundle name", ("ALL",), V18, DISABLED_BUNDLE_IS_ALL, [own("trusted_ca", "ALL")]),
]


@pytest.mark.parametrize(
    ("names", "envoy", "settings", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_resolution_table(
    names: tuple[str, ...],
    envoy: base_pb2.Node | None,
    settings: SdsSettings,
    expected: list[Seen],
) -> None:
    response = answer(request(*names, node=envoy), settings)
    assert seen(response) == expected
    assert response.version_info == "1"
    assert response.nonce == "0a1b2c3d"


METADATA = [
    ("bool true", DEFAULT, True, "trusted_ca"),
    ("string true", DEFAULT, "true", "trusted_ca"),
    ("bool false", DEFAULT, False, "spiffe"),
    ("string that is no bool", DEFAULT, "test", "spiffe"),
    ("config true, string true", DISABLED, "true", "trusted_ca"),
    ("config true, string false opts back in", DISABLED, "false", "spiffe"),
    ("config true, bool false opts back in", DISABLED, False, "spiffe"),
    ("config true, bad string ignored", DISABLED, "test", "trusted_ca"),
    ("config true, number ignored", DISABLED, 5, "trusted_ca"),
    ("config true, null ignored", DISABLED, None, "trusted_ca"),
    ("Go spelling T", DEFAULT, "T", "trusted_ca"),
    ("Go spelling 0", DISABLED, "0", "spiffe"),
    ("yes is not a Go bool", DEFAULT, "yes", "spiffe"),
]


@pytest.mark.parametrize(
    ("settings", "value", "kind"), [row[1:] for row in METADATA], ids=[row[0] for row in METADATA]
)
def test_node_metadata_overrides_the_validation_setting(
    settings: SdsSettings, value: object, kind: str
) -> None:
    envoy = node(1, 18, metadata=metadata_value(value))
    assert seen(answer(request(OWN_ID, node=envoy), settings)) == [own(kind)]


def test_all_with_trusted_ca_is_internal_as_in_spire() -> None:
    with pytest.raises(SdsError) as caught:
        answer(request("ALL", node=V17))
    assert caught.value.code == StatusCode.INTERNAL
    assert caught.value.message == 'unable to use "SPIFFE validator" on Envoy below 1.17'


def test_an_unknown_identity_is_invalid_argument_naming_it_as_spire_does() -> None:
    with pytest.raises(SdsError) as caught:
        answer(request("spiffe://domain.test/WHATEVER", node=V17))
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        'workload is not authorized for the requested identities ["spiffe://domain.test/WHATEVER"]'
    )


def test_leftover_names_are_sorted_and_go_quoted_and_served_names_are_not_listed() -> None:
    with pytest.raises(SdsError) as caught:
        answer(request("zz", "default", 'a"b', "spiffe://x.test", node=V18))
    assert caught.value.message == (
        'workload is not authorized for the requested identities ["a\\"b" "spiffe://x.test" "zz"]'
    )


def test_the_list_of_unknown_names_is_bounded() -> None:
    names = [f"n{i:02d}" for i in range(20)]
    with pytest.raises(SdsError) as caught:
        answer(request(*names), SdsSettings(max_listed_names=3))
    assert caught.value.message == (
        'workload is not authorized for the requested identities ["n00" "n01" "n02" '
        "... and 17 more]"
    )
    with pytest.raises(SdsError) as long_name:
        answer(request("x" * 5000))
    assert len(long_name.value.message) < 400


def test_a_workload_without_an_identity_asking_for_default_is_refused() -> None:
    empty = SdsSnapshot((), BUNDLES, "domain.test", ("otherdomain.test",))
    with pytest.raises(SdsError) as caught:
        answer(request("default", node=V18), snap=empty)
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message.endswith('identities ["default"]')
    assert seen(answer(request(node=V18), snap=empty)) == [own("spiffe"), fed("spiffe")]


def test_type_url_is_echoed_and_empty_names_mean_everything() -> None:
    response = answer(request("", node=V18, type_url="TYPEURL"))
    assert response.type_url == "TYPEURL"
    assert [s.name for s in seen(response)] == [OWN_ID, FED_ID, WORKLOAD_ID]
    assert seen(answer(request("", "default", node=V18))) == [cert("default")]


def test_fetch_secrets_has_no_version_and_no_nonce() -> None:
    response = fetch_response(request(WORKLOAD_ID, type_url="TYPEURL"), snapshot(), DEFAULT)
    assert response.version_info == ""
    assert response.nonce == ""
    assert response.type_url == "TYPEURL"
    assert seen(response) == [cert()]
    everything = fetch_response(request(node=V17), snapshot(), DEFAULT)
    assert seen(everything) == [own("trusted_ca"), fed("trusted_ca"), cert()]


def test_envoy_versions_around_1_18() -> None:
    def spiffe(major: int, minor: int) -> bool:
        return uses_spiffe_validator(node(major, minor), DEFAULT)

    assert not spiffe(1, 17)
    assert not spiffe(0, 99)
    assert spiffe(1, 18)
    assert spiffe(2, 0)
    only_string = base_pb2.Node(user_agent_version="1.10.0")
    assert uses_spiffe_validator(only_string, DEFAULT)
    assert uses_spiffe_validator(None, DEFAULT)
    assert not uses_spiffe_validator(None, DISABLED)


def test_chain_with_intermediate_is_leaf_first() -> None:
    ca = CertificateAuthority("domain.test", intermediate=True)
    svid = svid_of(ca, "spiffe://domain.test/deep")
    assert len(svid.cert_chain) == 2
    snap = SdsSnapshot((svid,), {"domain.test": (ca.root_der,)}, "domain.test")
    response = answer(request("default", node=V18), snap=snap)
    # seen() checks the PEM chain equals the SVID's chain, leaf first, and the key.
    assert seen(response, (svid,), {"domain.test": (ca.root_der,)}) == [
        Seen("default", "cert", ("spiffe://domain.test/deep",))
    ]


def test_a_bundle_of_several_certificates_is_served_whole() -> None:
    second = CertificateAuthority("domain.test")
    bundles = {"domain.test": (OWN.root_der, second.root_der)}
    snap = SdsSnapshot((WORKLOAD1,), bundles, "domain.test")
    for envoy, kind in ((V17, "trusted_ca"), (V18, "spiffe")):
        response = answer(request("ROOTCA", node=envoy), snap=snap)
        assert seen(response, bundles=bundles) == [own(kind, "ROOTCA")]


# Missing bundles, unrelated trust domains --------------------------------------------------


def test_a_federated_trust_domain_without_bundle_is_not_found_as_in_spire() -> None:
    snap = snapshot(federated=("otherdomain.test", "missing.test"))
    with pytest.raises(SdsError) as spiffe:
        answer(request("spiffe://missing.test", node=V18), snap=snap)
    assert spiffe.value.code == StatusCode.NOT_FOUND
    assert spiffe.value.message == 'no bundle found for trust domain: "spiffe://missing.test"'
    with pytest.raises(SdsError) as root_ca:
        answer(request("spiffe://missing.test", node=V17), snap=snap)
    assert root_ca.value.code == StatusCode.INTERNAL
    assert root_ca.value.message == spiffe.value.message
    # Asked for everything, or for ALL, a missing bundle is simply not there.
    assert [s.name for s in seen(answer(request(node=V18), snap=snap))] == [
        OWN_ID,
        FED_ID,
        WORKLOAD_ID,
    ]
    assert seen(answer(request("ALL", node=V18), snap=snap)) == [
        Seen("ALL", "spiffe", ("domain.test", "otherdomain.test"))
    ]


def test_a_missing_own_bundle_is_an_error_when_asked_for_and_left_out_otherwise() -> None:
    snap = SdsSnapshot((WORKLOAD1,), {"otherdomain.test": (FED.root_der,)}, "domain.test")
    for name in (OWN_ID, "ROOTCA", "ALL"):
        with pytest.raises(SdsError) as caught:
            answer(request(name, node=V18), snap=snap)
        assert caught.value.code == StatusCode.NOT_FOUND
        assert caught.value.message == 'no bundle found for trust domain: "spiffe://domain.test"'
    assert [s.name for s in seen(answer(request(node=V18), snap=snap))] == [WORKLOAD_ID]


def test_only_federated_trust_domains_are_served() -> None:
    unrelated = CertificateAuthority("unrelated.test")
    bundles = {**BUNDLES, "unrelated.test": (unrelated.root_der,)}
    snap = SdsSnapshot((WORKLOAD1,), bundles, "domain.test", ())
    with pytest.raises(SdsError) as caught:
        answer(request(FED_ID, node=V18), snap=snap)
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert seen(answer(request(node=V18), snap=snap), bundles=bundles) == [own("spiffe"), cert()]
    assert seen(answer(request("ALL", node=V18), snap=snap), bundles=bundles) == [
        Seen("ALL", "spiffe", ("domain.test",))
    ]


def test_federated_bundles_come_sorted_by_trust_domain() -> None:
    alpha, zeta = CertificateAuthority("alpha.test"), CertificateAuthority("zeta.test")
    bundles = {**BUNDLES, "alpha.test": (alpha.root_der,), "zeta.test": (zeta.root_der,)}
    snap = SdsSnapshot(
        (WORKLOAD1,), bundles, "domain.test", ("zeta.test", "otherdomain.test", "alpha.test")
    )
    everything = seen(answer(request(node=V18), snap=snap), bundles=bundles)
    assert [s.name for s in everything] == [
        OWN_ID,
        "spiffe://alpha.test",
        FED_ID,
        "spiffe://zeta.test",
        WORKLOAD_ID,
    ]
    assert seen(answer(request("ALL", node=V18), snap=snap), bundles=bundles) == [
        Seen("ALL", "spiffe", ("alpha.test", "domain.test", "otherdomain.test", "zeta.test"))
    ]


# Where SPIRE has a quirk ---------------------------------------------------------------------


def test_two_own_bundle_names_in_one_request_are_both_served() -> None:
    """SPIRE answers INVALID_ARGUMENT (its switch serves only the first match)."""
    assert seen(answer(request("ROOTCA", OWN_ID, node=V17))) == [
        own("trusted_ca"),
        own("trusted_ca", "ROOTCA"),
    ]
    assert seen(answer(request("ALL", "ROOTCA", OWN_ID, node=V18))) == [
        own("spiffe"),
        own("spiffe", "ROOTCA"),
        Seen("ALL", "spiffe", ("domain.test", "otherdomain.test")),
    ]


def test_the_svid_by_id_and_as_default_in_one_request_are_both_served() -> None:
    """SPIRE leaves ``default`` unresolved when the first SVID matched by ID."""
    assert seen(answer(request("default", WORKLOAD_ID, node=V18))) == [cert(), cert("default")]


def test_a_build_version_without_version_gets_the_spiffe_validator() -> None:
    """SPIRE dereferences the missing version and panics."""
    envoy = base_pb2.Node(user_agent_build_version=base_pb2.BuildVersion())
    assert envoy.HasField("user_agent_build_version")
    assert seen(answer(request(OWN_ID, node=envoy))) == [own("spiffe")]


def test_two_svids_with_one_spiffe_id_give_one_resource() -> None:
    again = svid_of(OWN, WORKLOAD_ID, hint="second")
    other = svid_of(OWN, "spiffe://domain.test/other")
    snap = SdsSnapshot((WORKLOAD1, again, other), BUNDLES, "domain.test", ())
    svids = (WORKLOAD1, other)  # seen() checks the chain is the first SVID's, not again's
    assert seen(answer(request(node=V18), snap=snap), svids) == [
        own("spiffe"),
        cert(),
        Seen("spiffe://domain.test/other", "cert", ("spiffe://domain.test/other",)),
    ]
    assert seen(answer(request(WORKLOAD_ID, "default", node=V18), snap=snap), svids) == [
        cert(),
        cert("default"),
    ]


def test_default_is_the_first_svid_and_others_are_served_by_id_in_order() -> None:
    other = svid_of(OWN, "spiffe://domain.test/other")
    snap = SdsSnapshot((WORKLOAD1, other), BUNDLES, "domain.test", ())
    response = answer(request("spiffe://domain.test/other", "default", node=V18), snap=snap)
    assert seen(response, (WORKLOAD1, other)) == [
        cert("default"),
        Seen("spiffe://domain.test/other", "cert", ("spiffe://domain.test/other",)),
    ]


# Snapshots and settings ----------------------------------------------------------------------


def test_snapshot_of_waits_for_an_svid_and_its_own_bundle() -> None:
    assert snapshot_of((), ("otherdomain.test",), BUNDLES) is None
    assert snapshot_of((WORKLOAD1,), (), {"otherdomain.test": (FED.root_der,)}) is None
    made = snapshot_of((WORKLOAD1,), ("otherdomain.test", "domain.test"), BUNDLES)
    assert made == SdsSnapshot((WORKLOAD1,), BUNDLES, "domain.test", ("otherdomain.test",))


def test_snapshot_of_keeps_only_what_sds_may_serve() -> None:
    unrelated = CertificateAuthority("unrelated.test")
    before = snapshot_of((WORKLOAD1,), ("otherdomain.test",), BUNDLES)
    after = snapshot_of(
        (WORKLOAD1,), ("otherdomain.test",), {**BUNDLES, "unrelated.test": (unrelated.root_der,)}
    )
    assert before == after
    assert after is not None
    assert set(after.bundles) == {"domain.test", "otherdomain.test"}
    rotated = snapshot_of((svid_of(OWN, WORKLOAD_ID),), ("otherdomain.test",), BUNDLES)
    assert rotated != before


def test_snapshot_and_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="bare trust domain name"):
        SdsSnapshot((WORKLOAD1,), BUNDLES, "spiffe://domain.test")
    with pytest.raises(ValueError, match="bare trust domain name"):
        SdsSnapshot((WORKLOAD1,), BUNDLES, "")
    with pytest.raises(ValueError, match="max_listed_names"):
        SdsSettings(max_listed_names=0)
    snap = SdsSnapshot((WORKLOAD1,), BUNDLES, "domain.test", ("domain.test", "a.test", "a.test"))
    assert snap.federated == ("a.test",)
    with pytest.raises(TypeError):
        snap.bundles["x.test"] = ()  # type: ignore[index]


# Go's formatting and parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("spiffe://td/w", '"spiffe://td/w"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("tab\tnl\n\a\b\f\r\v", '"tab\\tnl\\n\\a\\b\\f\\r\\v"'),
        ("\x00\x1b\x7f", '"\\x00\\x1b\\x7f"'),
        ("héllo ✓ 😀", '"héllo ✓ 😀"'),
        ("\u00a0\u200b\ue000", '"\\u00a0\\u200b\\ue000"'),
        ("\U000f0000", '"\\U000f0000"'),
    ],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


def test_go_parse_bool() -> None:
    for text in ("1", "t", "T", "TRUE", "true", "True"):
        assert go_parse_bool(text) is True
    for text in ("0", "f", "F", "FALSE", "false", "False"):
        assert go_parse_bool(text) is False
    for text in ("", "yes", "tRUE", " true", "2"):
        assert go_parse_bool(text) is None
