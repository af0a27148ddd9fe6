"""Selectors for a pod: the k8s workload attestor's vocabulary, in a fixed order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.attributes import PodInfo
from trio_spirecsi.spire.selectors import Selector, format_selectors, selectors_for, to_proto

POD = PodInfo(
    name="web-0",
    namespace="default",
    uid="0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11",
    service_account="web",
)


def test_selectors_are_ns_sa_pod_uid_pod_name_node_name_in_that_order() -> None:
    assert selectors_for(POD, "node-1") == (
        Selector("k8s", "ns:default"),
        Selector("k8s", "sa:web"),
        Selector("k8s", "pod-uid:0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11"),
        Selector("k8s", "pod-name:web-0"),
        Selector("k8s", "node-name:node-1"),
    )


def test_format_selectors_reads_like_spire() -> None:
    assert format_selectors(selectors_for(POD, "node-1")) == (
        "k8s:ns:default, k8s:sa:web, k8s:pod-uid:0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11, "
        "k8s:pod-name:web-0, k8s:node-name:node-1"
    )
    assert str(Selector("k8s", "ns:default")) == "k8s:ns:default"


def test_a_selector_is_the_plain_pair_the_agent_client_uses() -> None:
    selectors = selectors_for(POD, "node-1")
    pairs = tuple((s.type, s.value) for s in selectors)
    assert pairs == selectors
    assert format_selectors(pairs) == format_selectors(selectors)
    assert to_proto(pairs) == to_proto(selectors)


def test_to_proto_gives_spire_selector_messages() -> None:
    messages = to_proto(selectors_for(POD, "node-1"))
    assert all(isinstance(m, types_pb2.Selector) for m in messages)
    decoded = [types_pb2.Selector.FromString(m.SerializeToString()) for m in messages]
    assert [(m.type, m.value) for m in decoded] == [
        ("k8s", "ns:default"),
        ("k8s", "sa:web"),
        ("k8s", "pod-uid:0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11"),
        ("k8s", "pod-name:web-0"),
        ("k8s", "node-name:node-1"),
    ]


text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30)


@given(st.builds(PodInfo, text, text, text, text), text)
def test_every_pod_field_appears_once_with_its_prefix(pod: PodInfo, node: str) -> None:
    selectors = selectors_for(pod, node)
    assert [s.type for s in selectors] == ["k8s"] * 5
    assert [s.value for s in selectors] == [
        f"ns:{pod.namespace}",
        f"sa:{pod.service_account}",
        f"pod-uid:{pod.uid}",
        f"pod-name:{pod.name}",
        f"node-name:{node}",
    ]
    decoded = [types_pb2.Selector.FromString(m.SerializeToString()) for m in to_proto(selectors)]
    assert tuple(Selector(m.type, m.value) for m in decoded) == selectors
    assert format_selectors(selectors).count("k8s:") == 5 + sum(
        s.value.count("k8s:") for s in selectors
    )
