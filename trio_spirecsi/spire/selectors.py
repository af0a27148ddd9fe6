"""SPIRE selectors for a pod, in the vocabulary of SPIRE's k8s workload attestor.

The agent gives a workload every registration entry whose selectors are a subset of
the ones we send, so sending all of them lets an entry match on any combination.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .._proto.spire.api.types import types_pb2
from ..attributes import PodInfo


class Selector(NamedTuple):
    """One selector, e.g. ``Selector("k8s", "ns:default")``.

    A named tuple, so it is also the plain ``(type, value)`` pair the agent client uses.
    """

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def selectors_for(pod: PodInfo, node_name: str) -> tuple[Selector, ...]:
    """The selectors SPIRE's k8s attestor would produce for ``pod`` on ``node_name``:
    ``ns``, ``sa``, ``pod-uid``, ``pod-name``, ``node-name``, in that order."""
    return (
        Selector("k8s", f"ns:{pod.namespace}"),
        Selector("k8s", f"sa:{pod.service_account}"),
        Selector("k8s", f"pod-uid:{pod.uid}"),
        Selector("k8s", f"pod-name:{pod.name}"),
        Selector("k8s", f"node-name:{node_name}"),
    )


def format_selectors(selectors: Iterable[tuple[str, str]]) -> str:
    """``k8s:ns:default, k8s:sa:web, ...``: how SPIRE's CLI writes them, for messages."""
    return ", ".join(f"{type_}:{value}" for type_, value in selectors)


def to_proto(selectors: Iterable[tuple[str, str]]) -> list[types_pb2.Selector]:
    """The ``spire.api.types.Selector`` messages for a Delegated Identity request."""
    return [types_pb2.Selector(type=type_, value=value) for type_, value in selectors]


__all__ = ["Selector", "format_selectors", "selectors_for", "to_proto"]
