"""One StreamSecrets stream's state machine (pure): SPIRE's streaming tests ported
(Streaming, KeepNodeInformation, ApplicationDoesNotSpin, RequestReceivedBeforeWorkloadUpdate,
SubChanged, BadNonce), the stream ending on an error, and a property over random sequences of
requests and updates: an ACK is never answered, the version moves only with a new snapshot,
nonces never repeat."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sds_fixtures import (
    BUNDLES,
    FED_ID,
    OWN_ID,
    V17,
    V18,
    WORKLOAD1,
    WORKLOAD2,
    WORKLOAD_ID,
    Seen,
    request,
    seen,
    snapshot,
)
from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.grpc import StatusCode
from trio_spirecsi.sds import RequestKind, SdsError, SdsSnapshot, SdsStream
from trio_spirecsi.spire.responses import X509SVID

OTHER_FED_ROOT = CertificateAuthority("otherdomain.test").root_der
"""The federated trust domain's bundle after its CA changed."""
NONCE = re.compile(r"[0-9a-f]{8}")
FIRST = snapshot(WORKLOAD1)
ROTATED = snapshot(WORKLOAD2)


def cert_of(response: discovery_pb2.DiscoveryResponse, svid: X509SVID = WORKLOAD1) -> list[Seen]:
    """What Envoy sees, checking the certificate and key are ``svid``'s."""
    return seen(response, (svid,))


def started(names: tuple[str, ...] = (WORKLOAD_ID,)) -> tuple[SdsStream, str]:
    """A stream that has had its snapshot and answered its first request; returns the stream
    and the first response's nonce."""
    stream = SdsStream()
    assert stream.on_update(FIRST) is None
    result = stream.on_request(request(*names, node=V18))
    assert result.kind is RequestKind.INITIAL
    assert result.response is not None
    return stream, result.response.nonce


def test_streaming_first_response_then_rotation_pushed_unasked() -> None:
    stream = SdsStream()
    assert stream.on_update(FIRST) is None
    result = stream.on_request(request(WORKLOAD_ID, node=V18))
    first = result.response
    assert first is not None
    assert first.version_info == "1"
    assert NONCE.fullmatch(first.nonce)
    assert cert_of(first) == [Seen(WORKLOAD_ID, "cert", (WORKLOAD_ID,))]
    ack = stream.on_request(request(WORKLOAD_ID, version="1", nonce=first.nonce))
    assert ack.kind is RequestKind.ACK
    assert ack.response is None

    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    assert pushed.version_info == "2"
    assert NONCE.fullmatch(pushed.nonce)
    assert pushed.nonce != first.nonce
    assert cert_of(pushed, WORKLOAD2) == [Seen(WORKLOAD_ID, "cert", (WORKLOAD_ID,))]


def test_keep_node_information_when_later_requests_omit_it() -> None:
    """Envoy 1.17 gets trusted_ca; if the node were forgotten after the first request, the
    rotation push would switch to the SPIFFE validator."""
    stream = SdsStream()
    stream.on_update(FIRST)
    first = stream.on_request(request(OWN_ID, node=V17)).response
    assert first is not None
    assert seen(first) == [Seen(OWN_ID, "trusted_ca", ("domain.test",))]
    assert stream.on_request(request(OWN_ID, version="1", nonce=first.nonce)).response is None
    assert stream.node == V17

    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    assert seen(pushed) == [Seen(OWN_ID, "trusted_ca", ("domain.test",))]
    changed = stream.on_request(request(OWN_ID, FED_ID, version="2", nonce=pushed.nonce))
    assert changed.response is not None
    assert [s.kind for s in seen(changed.response)] == ["trusted_ca", "trusted_ca"]


def test_a_newer_node_replaces_the_kept_one() -> None:
    stream = SdsStream()
    stream.on_update(FIRST)
    first = stream.on_request(request(OWN_ID, node=V17)).response
    assert first is not None
    stream.on_request(request(OWN_ID, version="1", nonce=first.nonce, node=V18))
    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    assert seen(pushed) == [Seen(OWN_ID, "spiffe", ("domain.test",))]


def test_application_does_not_spin_on_a_nack() -> None:
    stream, nonce = started()
    nack = stream.on_request(request(WORKLOAD_ID, version="OHNO", nonce=nonce, error="OHNO!"))
    assert nack.kind is RequestKind.NACK
    assert nack.error_detail == "OHNO!"
    assert nack.response is None
    again = stream.on_request(request(WORKLOAD_ID, version="", nonce=nonce))
    assert again.kind is RequestKind.NACK
    assert again.response is None

    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    assert pushed.version_info == "2"
    assert cert_of(pushed, WORKLOAD2) == [Seen(WORKLOAD_ID, "cert", (WORKLOAD_ID,))]


def test_a_nack_with_the_current_version_but_an_error_detail_is_a_nack() -> None:
    stream, nonce = started()
    result = stream.on_request(request(WORKLOAD_ID, version="1", nonce=nonce, error="bad key"))
    assert result.kind is RequestKind.NACK
    assert result.response is None


def test_a_nack_that_changes_the_names_is_answered_for_the_new_names() -> None:
    stream, nonce = started()
    result = stream.on_request(request(OWN_ID, version="0", nonce=nonce, error="no"))
    assert result.kind is RequestKind.NACK
    assert result.response is not None
    assert result.response.version_info == "1"
    assert seen(result.response) == [Seen(OWN_ID, "spiffe", ("domain.test",))]


def test_request_received_before_workload_update_is_parked() -> None:
    stream = SdsStream()
    parked = stream.on_request(request(WORKLOAD_ID, node=V18))
    assert parked.kind is RequestKind.INITIAL
    assert parked.parked
    assert parked.response is None
    assert stream.parked
    assert stream.version_info == "0"

    response = stream.on_update(FIRST)
    assert response is not None
    assert not stream.parked
    assert response.version_info == "1"
    assert cert_of(response) == [Seen(WORKLOAD_ID, "cert", (WORKLOAD_ID,))]


def test_names_changed_while_parked_are_the_ones_answered() -> None:
    stream = SdsStream()
    stream.on_request(request(WORKLOAD_ID, node=V18))
    later = stream.on_request(request(OWN_ID))
    assert later.kind is RequestKind.INITIAL
    assert later.parked
    response = stream.on_update(FIRST)
    assert response is not None
    assert seen(response) == [Seen(OWN_ID, "spiffe", ("domain.test",))]


def test_sub_changed_is_answered_at_once_with_the_same_version() -> None:
    stream, nonce = started()
    ack = stream.on_request(request(WORKLOAD_ID, version="1", nonce=nonce))
    assert ack.kind is RequestKind.ACK
    assert ack.response is None

    changed = stream.on_request(request(OWN_ID, version="1", nonce=nonce))
    assert changed.kind is RequestKind.ACK
    assert changed.response is not None
    assert changed.response.version_info == "1"
    assert changed.response.nonce not in ("", nonce)
    assert seen(changed.response) == [Seen(OWN_ID, "spiffe", ("domain.test",))]
    assert stream.resource_names == (OWN_ID,)


def test_bad_nonce_is_ignored_even_when_it_changes_names() -> None:
    stream, nonce = started()
    stale = stream.on_request(request(OWN_ID, version="1", nonce="FOO"))
    assert stale.kind is RequestKind.STALE
    assert stale.response is None
    assert stream.resource_names == (WORKLOAD_ID,)
    assert stream.last_nonce == nonce

    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    assert cert_of(pushed, WORKLOAD2) == [Seen(WORKLOAD_ID, "cert", (WORKLOAD_ID,))]


def test_an_answer_to_an_older_response_is_stale() -> None:
    stream, first_nonce = started()
    pushed = stream.on_update(ROTATED)
    assert pushed is not None
    late_ack = stream.on_request(request(OWN_ID, version="1", nonce=first_nonce))
    assert late_ack.kind is RequestKind.STALE
    assert late_ack.response is None
    assert stream.on_request(request(WORKLOAD_ID, version="2", nonce=pushed.nonce)).kind is (
        RequestKind.ACK
    )


def test_an_unchanged_snapshot_moves_nothing() -> None:
    stream, _nonce = started()
    same = SdsSnapshot((WORKLOAD1,), dict(BUNDLES), "domain.test", ("otherdomain.test",))
    assert stream.on_update(same) is None
    assert stream.version_info == "1"


def test_updates_before_any_request_count_versions_but_send_nothing() -> None:
    stream = SdsStream()
    assert stream.on_update(FIRST) is None
    assert stream.on_update(ROTATED) is None
    response = stream.on_request(request(WORKLOAD_ID)).response
    assert response is not None
    assert response.version_info == "2"


def test_unknown_names_end_the_stream() -> None:
    stream = SdsStream()
    stream.on_update(FIRST)
    with pytest.raises(SdsError) as caught:
        stream.on_request(request("spiffe://domain.test/WHATEVER"))
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        'workload is not authorized for the requested identities ["spiffe://domain.test/WHATEVER"]'
    )
    with pytest.raises(RuntimeError, match="end the stream"):
        stream.on_update(ROTATED)


def test_an_update_that_loses_the_requested_identity_ends_the_stream() -> None:
    stream, _nonce = started(("default",))
    gone = SdsSnapshot((), BUNDLES, "domain.test", ("otherdomain.test",))
    with pytest.raises(SdsError) as caught:
        stream.on_update(gone)
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message.endswith('["default"]')


def test_error_detail_on_a_first_request_is_reported() -> None:
    stream = SdsStream()
    result = stream.on_request(request(WORKLOAD_ID, error="could not apply"))
    assert result.kind is RequestKind.INITIAL
    assert result.error_detail == "could not apply"


def test_a_repeating_nonce_source_is_drawn_again() -> None:
    draws = iter(["aaaaaaaa", "aaaaaaaa", "", "bbbbbbbb", "aaaaaaaa", "bbbbbbbb", "cccccccc"])
    stream = SdsStream(nonce_source=lambda: next(draws))
    stream.on_update(FIRST)
    first = stream.on_request(request(WORKLOAD_ID)).response
    second = stream.on_update(ROTATED)
    third = stream.on_update(FIRST)
    assert first is not None and second is not None and third is not None
    assert [first.nonce, second.nonce, third.nonce] == ["aaaaaaaa", "bbbbbbbb", "cccccccc"]

    stuck = SdsStream(nonce_source=lambda: "aaaaaaaa")
    stuck.on_update(FIRST)
    stuck.on_request(request(WORKLOAD_ID))
    with pytest.raises(RuntimeError, match="nonce source"):
        stuck.on_update(ROTATED)


def test_the_default_nonces_are_eight_hex_digits() -> None:
    stream = SdsStream()
    stream.on_update(FIRST)
    nonces = []
    response = stream.on_request(request(WORKLOAD_ID)).response
    for index in range(50):
        assert response is not None
        nonces.append(response.nonce)
        response = stream.on_update(ROTATED if index % 2 == 0 else FIRST)
    assert all(NONCE.fullmatch(n) for n in nonces)
    assert len(set(nonces)) == len(nonces)


def test_settings_reject_a_useless_nonce_window() -> None:
    with pytest.raises(ValueError, match="nonce_window"):
        SdsStream(nonce_window=0)


# The property ------------------------------------------------------------------------------

NAME_SETS = [
    (WORKLOAD_ID,),
    ("default",),
    ("ROOTCA",),
    (OWN_ID,),
    (FED_ID, "ALL"),
    ("default", "ROOTCA"),
    ("ROOTCA", "default"),
    ("default", "default"),
    (),
]
SNAPSHOTS = [
    FIRST,
    ROTATED,
    SdsSnapshot((WORKLOAD1,), dict(BUNDLES), "domain.test", ("otherdomain.test",)),  # == FIRST
    snapshot(WORKLOAD1, bundles={**BUNDLES, "otherdomain.test": (OTHER_FED_ROOT,)}),
]

_update = st.tuples(st.just("update"), st.integers(0, len(SNAPSHOTS) - 1))
_request = st.tuples(
    st.just("request"),
    st.integers(0, len(NAME_SETS) - 1),
    st.sampled_from(["last", "older", "foreign", "empty"]),
    st.sampled_from(["current", "previous", "empty", "junk"]),
    st.booleans(),  # error_detail
    st.booleans(),  # node
)


def _changed(old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    return len(old) != len(new) or any(name not in old for name in new)


@given(st.lists(st.one_of(_update, _request), max_size=40), st.randoms(use_true_random=False))
def test_property_acks_unanswered_versions_only_move_on_updates_nonces_unique(
    ops: list[tuple[object, ...]], rng: random.Random
) -> None:
    """A model of the rules, checked after every step against random interleavings: a
    small pool of snapshots (two of them equal), name sets that always resolve, answers with
    the right, an older, a foreign or no nonce, and a nonce source that collides often."""
    stream = SdsStream(nonce_source=lambda: f"{rng.randrange(64):08x}")
    sent: list[str] = []
    distinct = 0
    current: SdsSnapshot | None = None
    names: tuple[str, ...] | None = None

    def check(response: discovery_pb2.DiscoveryResponse | None) -> None:
        if response is not None:
            assert response.version_info == str(distinct)
            assert NONCE.fullmatch(response.nonce)
            assert response.nonce not in sent
            sent.append(response.nonce)

    for op in ops:
        version_before = stream.version_info
        if op[0] == "update":
            snap = SNAPSHOTS[int(op[1])]  # type: ignore[call-overload]
            pushed = stream.on_update(snap)
            if snap != current:
                distinct += 1
                current = snap
                assert (pushed is not None) == (names is not None)
            else:
                assert pushed is None
                assert stream.version_info == version_before
            check(pushed)
            continue

        _, index, nonce_kind, version_kind, error, with_node = op
        wanted = NAME_SETS[int(index)]  # type: ignore[call-overload]
        nonce = {
            "last": stream.last_nonce,
            "older": sent[-2] if len(sent) > 1 else "",
            "foreign": "FOO",
            "empty": "",
        }[str(nonce_kind)]
        version = {
            "current": stream.version_info,
            "previous": str(max(distinct - 1, 0)),
            "empty": "",
            "junk": "OHNO",
        }[str(version_kind)]
        req = request(
            *wanted,
            node=V18 if with_node else None,
            version=version,
            nonce=nonce,
            error="rejected" if error else None,
        )
        result = stream.on_request(req)
        assert stream.version_info == version_before
        if sent and nonce != sent[-1]:
            assert result.kind is RequestKind.STALE
            assert result.response is None
            continue
        if not sent:
            assert result.kind is RequestKind.INITIAL
        elif version == stream.version_info and not error:
            assert result.kind is RequestKind.ACK
        else:
            assert result.kind is RequestKind.NACK
        changed = names is None or _changed(names, wanted)
        names = wanted
        if not changed:
            assert result.response is None  # an ACK or NACK of the same names: never answered
        assert (result.response is not None) == (changed and current is not None)
        assert result.parked == (changed and current is None)
        check(result.response)
