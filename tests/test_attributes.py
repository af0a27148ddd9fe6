"""Parsing a volume's ``volume_context``: every attribute, every refusal, the canonical form."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_spirecsi.attributes import (
    ATTRIBUTE_NAMES,
    MAX_AUDIENCE_SETS,
    MAX_VALUE_BYTES,
    NAME_MAX,
    PodInfo,
    VolumeSpec,
    file_name_problem,
    parse_volume_context,
)
from trio_spirecsi.errors import InvalidArgument

POD = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11",
    "csi.storage.k8s.io/serviceAccount.name": "web",
    "csi.storage.k8s.io/ephemeral": "true",
}
P = "csi.spire.io/"


def parse(**attributes: str) -> VolumeSpec:
    return parse_volume_context(
        {**POD, **{P + k.replace("_", "-"): v for k, v in attributes.items()}}
    )


def refused(context: dict[str, str], volume_mount_group: str = "") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_volume_context(context, volume_mount_group=volume_mount_group)
    assert info.value.message
    assert str(info.value) == f"{info.value.field}: {info.value.message}"
    return info.value


def refused_attribute(name: str, value: str, **others: str) -> InvalidArgument:
    error = refused({**POD, P + name: value, **{P + k: v for k, v in others.items()}})
    assert error.field == f"volume_context[{P}{name}]"
    return error


# Pod info -------------------------------------------------------------------------


def test_pod_info_and_defaults() -> None:
    spec = parse_volume_context(POD)
    assert spec.pod == PodInfo(
        name="web-0",
        namespace="default",
        uid="0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11",
        service_account="web",
    )
    assert (spec.svid_file, spec.svid_key_file, spec.bundle_file) == (
        "svid.pem",
        "svid_key.pem",
        "svid_bundle.pem",
    )
    assert (spec.svid_hint, spec.spiffe_id, spec.all_svids) == ("", "", False)
    assert spec.federated_bundles == "none"
    assert spec.intermediates_in_bundle is False
    assert (spec.layout, spec.key_format) == ("default", "pkcs8")
    assert spec.jwt_audiences == ()
    assert spec.jwt_svid_file == "jwt_svid.token"
    assert spec.jwt_bundle_file is None
    assert spec.gid is None
    assert (spec.cert_file_mode, spec.key_file_mode) == (0o644, 0o600)
    assert (spec.workload_api, spec.workload_api_socket) == (False, "agent.sock")


@pytest.mark.parametrize(
    "key",
    [
        "csi.storage.k8s.io/pod.name",
        "csi.storage.k8s.io/pod.namespace",
        "csi.storage.k8s.io/pod.uid",
        "csi.storage.k8s.io/serviceAccount.name",
    ],
)
def test_missing_pod_info_names_the_key_and_the_fix(key: str) -> None:
    error = refused({k: v for k, v in POD.items() if k != key})
    assert error.field == f"volume_context[{key}]"
    assert "podInfoOnMount: true" in error.message
    empty = refused({**POD, key: ""})
    assert empty.field == f"volume_context[{key}]"
    assert "not a valid value" in empty.message


@pytest.mark.parametrize("value", ["false", "True", "", None])
def test_only_inline_ephemeral_volumes_are_supported(value: str | None) -> None:
    context = {k: v for k, v in POD.items() if k != "csi.storage.k8s.io/ephemeral"}
    if value is not None:
        context["csi.storage.k8s.io/ephemeral"] = value
    error = refused(context)
    assert error.field == "volume_context[csi.storage.k8s.io/ephemeral]"
    assert "only inline ephemeral volumes are supported" in error.message


def test_other_kubelet_keys_are_ignored() -> None:
    context = {**POD, "csi.storage.k8s.io/serviceAccount.tokens": "{}", "csi.storage.k8s.io/x": ""}
    assert parse_volume_context(context) == parse_volume_context(POD)


# Attribute names ------------------------------------------------------------------


def test_an_unknown_attribute_name_is_refused_listing_the_accepted_ones() -> None:
    error = refused({**POD, P + "svid-flie": "x.pem"})
    assert error.field == "volume_context[csi.spire.io/svid-flie]"
    for name in ATTRIBUTE_NAMES:
        assert P + name in error.message


def test_a_key_without_the_driver_prefix_is_refused() -> None:
    error = refused({**POD, "svid-file": "x.pem"})
    assert error.field == "volume_context[svid-file]"
    assert error.message.startswith(
        "unknown volume attribute 'svid-file': this driver's attributes are named "
        "csi.spire.io/<name>"
    )


def test_every_documented_attribute_is_accepted() -> None:
    assert (
        frozenset(
            {
                "svid-file",
                "svid-key-file",
                "bundle-file",
                "svid-hint",
                "spiffe-id",
                "all-svids",
                "federated-bundles",
                "intermediates-in-bundle",
                "layout",
                "key-format",
                "jwt-audiences",
                "jwt-svid-file",
                "jwt-bundle-file",
                "fs-group",
                "cert-file-mode",
                "key-file-mode",
                "workload-api",
                "workload-api-socket",
            }
        )
        == ATTRIBUTE_NAMES
    )


# Values ---------------------------------------------------------------------------


def test_file_name_attributes() -> None:
    spec = parse(
        svid_file="tls.crt",
        svid_key_file="tls.key",
        bundle_file="ca.crt",
        jwt_svid_file="token",
        jwt_bundle_file="jwks.json",
        workload_api="true",
        workload_api_socket="spire.sock",
    )
    assert (spec.svid_file, spec.svid_key_file, spec.bundle_file) == (
        "tls.crt",
        "tls.key",
        "ca.crt",
    )
    assert (spec.jwt_svid_file, spec.jwt_bundle_file) == ("token", "jwks.json")
    assert (spec.workload_api, spec.workload_api_socket) == (True, "spire.sock")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "cannot be empty"),
        ("../escape.pem", "contains '/'"),
        ("a/b", "contains '/'"),
        (".", "starts with '.'"),
        ("..", "starts with '.'"),
        ("..data", "starts with '.'"),
        (".key", "starts with '.'"),
        ("a\0b", "control character"),
        ("a\nb", "control character"),
        ("é" * 128, "256 bytes long"),
    ],
)
@pytest.mark.parametrize(
    "attribute",
    ["svid-file", "svid-key-file", "bundle-file", "jwt-svid-file", "jwt-bundle-file",
     "workload-api-socket"],
)  # fmt: skip
def test_bad_file_names_are_refused_naming_the_attribute(
    attribute: str, name: str, expected: str
) -> None:
    assert expected in refused_attribute(attribute, name).message


def test_file_names_of_255_bytes_are_accepted() -> None:
    assert parse(svid_file="é" * 127 + "a").svid_file == "é" * 127 + "a"
    assert file_name_problem("a" * 255) is None
    assert file_name_problem("a" * 256) is not None


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"svid-file": "same.pem", "bundle-file": "same.pem"}, "bundle-file"),
        ({"svid-key-file": "svid.pem"}, "svid-key-file"),
        ({"jwt-bundle-file": "svid_bundle.pem"}, "jwt-bundle-file"),
        ({"jwt-audiences": "api", "jwt-svid-file": "svid.pem"}, "jwt-svid-file"),
        (
            {"jwt-audiences": "a;b", "jwt-svid-file": "x.pem", "bundle-file": "x-1.pem"},
            "jwt-audiences",
        ),
        ({"workload-api": "true", "workload-api-socket": "svid.pem"}, "workload-api-socket"),
        ({"layout": "spiffe-fs", "jwt-bundle-file": "credential-bundle.pem"}, "jwt-bundle-file"),
    ],
)
def test_every_file_of_a_volume_needs_its_own_name(attributes: dict[str, str], named: str) -> None:
    error = refused({**POD, **{P + k: v for k, v in attributes.items()}})
    assert error.field == f"volume_context[{P}{named}]"
    assert "is also used by csi.spire.io/" in error.message


def test_unused_names_may_repeat() -> None:
    spec = parse(workload_api_socket="svid.pem", jwt_svid_file="svid.pem")
    assert spec.workload_api is False


@pytest.mark.parametrize("name", ["all-svids", "intermediates-in-bundle", "workload-api"])
def test_booleans_are_true_or_false(name: str) -> None:
    field = name.replace("-", "_")
    assert getattr(parse(**{field: "true"}), field) is True
    assert getattr(parse(**{field: "false"}), field) is False
    for bad in ("yes", "True", "1", ""):
        error = refused_attribute(name, bad)
        assert "true, false" in error.message


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("federated-bundles", ("none", "files", "merged")),
        ("layout", ("default", "spiffe-fs")),
        ("key-format", ("pkcs8", "traditional")),
    ],
)
def test_choices_list_the_accepted_values(name: str, values: tuple[str, ...]) -> None:
    error = refused_attribute(name, "bogus")
    assert "'bogus'" in error.message
    assert ", ".join(values) in error.message


def test_svid_selection_attributes() -> None:
    spec = parse(svid_hint="internal", spiffe_id="spiffe://example.org/ns/default/sa/web")
    assert (spec.svid_hint, spec.spiffe_id) == (
        "internal",
        "spiffe://example.org/ns/default/sa/web",
    )
    assert parse(spiffe_id="spiffe://example.org").spiffe_id == "spiffe://example.org"
    assert parse(spiffe_id="").spiffe_id == ""


@pytest.mark.parametrize(
    "bad",
    [
        "example.org/web",
        "https://example.org/web",
        "spiffe://Example.org/web",
        "spiffe://example.org/",
        "spiffe://example.org//web",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/a b",
        "spiffe:///web",
    ],
)
def test_malformed_spiffe_ids_are_refused(bad: str) -> None:
    assert "SPIFFE ID" in refused_attribute("spiffe-id", bad).message


def test_jwt_audiences_are_sets_separated_by_semicolons() -> None:
    spec = parse(jwt_audiences="api, db ;billing")
    assert spec.jwt_audiences == (("api", "db"), ("billing",))
    assert spec.jwt_files() == {("api", "db"): "jwt_svid-0.token", ("billing",): "jwt_svid-1.token"}
    single = parse(jwt_audiences="https://api.example.com/v1")
    assert single.jwt_files() == {("https://api.example.com/v1",): "jwt_svid.token"}
    assert parse(jwt_audiences="a;b", jwt_svid_file="token").jwt_files() == {
        ("a",): "token-0",
        ("b",): "token-1",
    }
    assert parse(jwt_audiences="").jwt_audiences == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("api;", "empty audience"),
        ("api,,db", "empty audience"),
        (";", "empty audience"),
        ("api,api", "names an audience twice"),
        ("api;api", "listed twice"),
        ("a\tb", "control character"),
    ],
)
def test_malformed_jwt_audiences_are_refused(value: str, expected: str) -> None:
    assert expected in refused_attribute("jwt-audiences", value).message


def test_modes_are_octal_and_key_modes_keep_others_out() -> None:
    assert parse(cert_file_mode="0640").cert_file_mode == 0o640
    assert parse(cert_file_mode="444").cert_file_mode == 0o444
    assert parse(key_file_mode="0o400").key_file_mode == 0o400
    assert parse(key_file_mode="0640").key_file_mode == 0o640
    assert "octal" in refused_attribute("cert-file-mode", "rw-r--r--").message
    assert "octal" in refused_attribute("cert-file-mode", "0648").message
    assert "octal" in refused_attribute("cert-file-mode", "00644").message
    assert "executable" in refused_attribute("cert-file-mode", "0755").message
    assert "setuid" in refused_attribute("cert-file-mode", "4644").message
    assert "setuid" in refused_attribute("key-file-mode", "2600").message
    assert "every user" in refused_attribute("key-file-mode", "0644").message
    assert "every user" in refused_attribute("key-file-mode", "0602").message
    assert "executable" in refused_attribute("key-file-mode", "0700").message


def test_the_group_comes_from_the_kubelet_or_fs_group() -> None:
    from_kubelet = parse_volume_context(POD, volume_mount_group="2000")
    assert (from_kubelet.gid, from_kubelet.key_file_mode) == (2000, 0o640)
    from_attribute = parse(fs_group="3000")
    assert (from_attribute.gid, from_attribute.key_file_mode) == (3000, 0o640)
    both = parse_volume_context({**POD, P + "fs-group": "3000"}, volume_mount_group="2000")
    assert both.gid == 2000
    explicit = parse(fs_group="3000", key_file_mode="0600")
    assert explicit.key_file_mode == 0o600
    assert parse(fs_group="0").gid == 0


@pytest.mark.parametrize(
    "bad", ["-1", "abc", "1.5", "4294967295", "99999999999", "", "\uff11\uff12"]
)
def test_bad_groups_are_refused(bad: str) -> None:
    assert "numeric group ID" in refused_attribute("fs-group", bad).message
    if bad:  # an empty volume_mount_group is the kubelet saying "no fsGroup"
        error = refused(POD, volume_mount_group=bad)
        assert error.field == "volume_capability.mount.volume_mount_group"


def test_spiffe_fs_layout_refuses_what_it_cannot_honour() -> None:
    spec = parse(layout="spiffe-fs", federated_bundles="files")
    assert (spec.layout, spec.federated_bundles) == ("spiffe-fs", "files")
    for name in ("svid-file", "svid-key-file", "bundle-file"):
        error = refused_attribute(name, "x.pem", layout="spiffe-fs")
        assert "layout spiffe-fs" in error.message
    assert "PKCS#8" in refused_attribute("key-format", "traditional", layout="spiffe-fs").message
    assert (
        "use files" in refused_attribute("federated-bundles", "merged", layout="spiffe-fs").message
    )


def test_all_svids_leaves_room_for_the_label() -> None:
    assert parse(all_svids="true", svid_file="a" * 186 + ".pem").all_svids
    error = refused_attribute("svid-file", "a" * 187 + ".pem", **{"all-svids": "true"})
    assert "all-svids" in error.message


def test_long_values_are_cut_short_in_messages() -> None:
    error = refused_attribute("layout", "x" * 10000)
    assert len(error.message) < 300


# Bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTRIBUTE_NAMES))
def test_every_attribute_has_a_maximum_size_named_in_its_refusal(name: str) -> None:
    limit = MAX_VALUE_BYTES.get(name, NAME_MAX)
    error = refused_attribute(name, "a" * (limit + 1))
    assert f"at most {limit}" in error.message


def test_eleven_kilobytes_of_audiences_are_refused_before_anything_starts() -> None:
    audiences = ";".join(f"aud{n}" for n in range(2000))
    error = refused_attribute("jwt-audiences", audiences)
    assert "at most 4096" in error.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (";".join(f"a{n}" for n in range(MAX_AUDIENCE_SETS + 1)), "at most 8 are allowed"),
        (",".join(f"a{n}" for n in range(17)), "17 audiences; at most 16"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_audience_sets_are_bounded(value: str, fragment: str) -> None:
    assert fragment in refused_attribute("jwt-audiences", value).message


def test_the_largest_allowed_audience_attribute_is_accepted() -> None:
    value = ";".join(",".join(f"s{s}a{a}" for a in range(16)) for s in range(8))
    spec = parse_volume_context({**POD, P + "jwt-audiences": value})
    assert len(spec.jwt_audiences) == 8
    assert all(len(audiences) == 16 for audiences in spec.jwt_audiences)


def test_pod_info_longer_than_kubernetes_allows_is_refused() -> None:
    error = refused({**POD, "csi.storage.k8s.io/pod.name": "p" * 254})
    assert error.field == "volume_context[csi.storage.k8s.io/pod.name]"


# Equivalence ----------------------------------------------------------------------


def test_equivalent_requests_parse_to_equal_specs() -> None:
    a = parse(cert_file_mode="644", key_file_mode="0o600")
    b = parse(cert_file_mode="0644")
    c = parse_volume_context(POD)
    assert a == b == c
    assert parse(svid_file="other.pem") != c


def test_effective_values_fill_every_default() -> None:
    spec = parse_volume_context(
        {**POD, P + "jwt-audiences": "api,db;billing"}, volume_mount_group="2000"
    )
    assert spec.gid == 2000
    assert spec.key_file_mode == 0o640
    assert spec.cert_file_mode == 0o644
    assert spec.jwt_audiences == (("api", "db"), ("billing",))
    assert spec.svid_file == "svid.pem"
    assert spec.jwt_bundle_file is None


# Properties -----------------------------------------------------------------------

ALL_KEYS = [P + name for name in sorted(ATTRIBUTE_NAMES)] + sorted(POD)
SAMPLE_VALUES = [
    "true", "false", "none", "files", "merged", "default", "spiffe-fs", "pkcs8",
    "traditional", "svid.pem", "svid_key.pem", "svid_bundle.pem", "x.pem", "0644", "0600",
    "0640", "0755", "1000", "", "spiffe://example.org/web", "api,db;billing", "api", ".hidden",
    "a/b", "credential-bundle.pem", "jwt_svid.token", "agent.sock", "jwt_svid-0.token",
]  # fmt: skip

values = st.one_of(st.sampled_from(SAMPLE_VALUES), st.text(max_size=20))
keys = st.one_of(
    st.sampled_from(ALL_KEYS), st.text(max_size=30), st.text(max_size=10).map(lambda s: P + s)
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(), st.text()), st.text(max_size=12))
def test_arbitrary_string_dicts_parse_or_raise_invalid_argument(
    context: dict[str, str], group: str
) -> None:
    try:
        parse_volume_context(context, volume_mount_group=group)
    except InvalidArgument as exc:
        assert exc.field and exc.message


@st.composite
def near_valid_contexts(draw: st.DrawFn) -> dict[str, str]:
    """Valid pod info plus attributes drawn from real names and plausible values, with
    now and then a key removed or an arbitrary key added."""
    context = dict(POD)
    attributes = draw(st.dictionaries(st.sampled_from(sorted(ATTRIBUTE_NAMES)), values))
    context.update({P + name: value for name, value in attributes.items()})
    if draw(st.integers(0, 9)) == 0:
        context.pop(draw(st.sampled_from(sorted(context))))
    if draw(st.integers(0, 9)) == 0:
        context[draw(keys)] = draw(values)
    return context


@settings(max_examples=1000, deadline=None)
@given(near_valid_contexts(), st.sampled_from(["", "0", "1234", "x"]))
def test_parsed_specs_are_consistent_and_round_trip(context: dict[str, str], group: str) -> None:
    try:
        spec = parse_volume_context(context, volume_mount_group=group)
    except InvalidArgument as exc:
        assert exc.field.startswith(("volume_context", "volume_capability"))
        return
    assert parse_volume_context(context, volume_mount_group=group) == spec
    names = list(spec.jwt_files().values())
    if spec.layout == "default":
        names += [spec.svid_file, spec.svid_key_file, spec.bundle_file]
    else:
        names.append("credential-bundle.pem")
    if spec.jwt_bundle_file is not None:
        names.append(spec.jwt_bundle_file)
    if spec.workload_api:
        names.append(spec.workload_api_socket)
    assert len(set(names)) == len(names)
    assert all(file_name_problem(n) is None for n in names)
    assert spec.key_file_mode & 0o7117 == 0
    assert spec.cert_file_mode & 0o7111 == 0
    if group:
        assert spec.gid == int(group)


@st.composite
def valid_contexts(draw: st.DrawFn) -> dict[str, str]:
    name = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
    layout = draw(st.sampled_from(["default", "spiffe-fs"]))
    attributes = {"layout": layout}
    if layout == "default":
        files = ["f" + n for n in draw(st.lists(name, min_size=3, max_size=3, unique=True))]
        attributes.update(zip(["svid-file", "svid-key-file", "bundle-file"], files, strict=True))
        attributes["key-format"] = draw(st.sampled_from(["pkcs8", "traditional"]))
        attributes["federated-bundles"] = draw(st.sampled_from(["none", "files", "merged"]))
    audiences = draw(
        st.lists(
            st.lists(name, min_size=1, max_size=3, unique=True).map(tuple), max_size=3, unique=True
        )
    )
    attributes["jwt-audiences"] = ";".join(",".join(a) for a in audiences)
    attributes["jwt-svid-file"] = "token-" + draw(name)
    attributes["cert-file-mode"] = draw(st.sampled_from(["0644", "644", "0o444", "0640"]))
    attributes["key-file-mode"] = draw(st.sampled_from(["0600", "0640", "400", "0o440"]))
    attributes["all-svids"] = draw(st.sampled_from(["true", "false"]))
    if draw(st.booleans()):
        attributes["fs-group"] = str(draw(st.integers(0, 2**32 - 2)))
    if draw(st.booleans()):
        attributes["svid-hint"] = draw(name)
    return {**POD, **{P + k: v for k, v in attributes.items()}}


@settings(max_examples=300, deadline=None)
@given(valid_contexts())
def test_valid_contexts_parse_to_exactly_the_values_given(context: dict[str, str]) -> None:
    spec = parse_volume_context(context)
    given = {k.removeprefix(P): v for k, v in context.items() if k.startswith(P)}
    for name in ("svid-file", "svid-key-file", "bundle-file", "svid-hint", "jwt-svid-file"):
        if name in given:
            assert getattr(spec, name.replace("-", "_")) == given[name]
    for name in ("cert-file-mode", "key-file-mode"):
        assert getattr(spec, name.replace("-", "_")) == int(given[name].removeprefix("0o"), 8)
    assert spec.layout == given["layout"]
    assert spec.all_svids == (given["all-svids"] == "true")
    assert ";".join(",".join(a) for a in spec.jwt_audiences) == given["jwt-audiences"]
    assert spec.gid == (int(given["fs-group"]) if "fs-group" in given else None)


def test_every_example_pod_in_the_documentation_is_accepted() -> None:
    text = (Path(__file__).parent.parent / "docs" / "attributes.md").read_text()
    documented = set(re.findall(r"^### ([a-z-]+)$", text, re.M))
    assert documented == ATTRIBUTE_NAMES
    seen: set[str] = set()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        pod = yaml.safe_load(block)
        for volume in pod["spec"]["volumes"]:
            attributes = volume["csi"].get("volumeAttributes", {})
            assert volume["csi"]["driver"] == "csi.spire.io"
            parse_volume_context({**POD, **attributes})
            seen |= {key.removeprefix(P) for key in attributes}
    assert seen == ATTRIBUTE_NAMES


def test_a_workload_api_socket_name_longer_than_a_socket_path_allows_is_refused() -> None:
    from trio_spirecsi.attributes import parse_volume_context as parse
    from trio_spirecsi.errors import InvalidArgument as Invalid

    base = {
        "csi.storage.k8s.io/pod.name": "p",
        "csi.storage.k8s.io/pod.namespace": "n",
        "csi.storage.k8s.io/pod.uid": "u",
        "csi.storage.k8s.io/serviceAccount.name": "s",
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.spire.io/workload-api": "true",
    }
    assert parse({**base, "csi.spire.io/workload-api-socket": "a" * 64}).workload_api
    with pytest.raises(Invalid) as info:
        parse({**base, "csi.spire.io/workload-api-socket": "a" * 65})
    assert info.value.field == "volume_context[csi.spire.io/workload-api-socket]"
    assert "64 bytes" in info.value.message
