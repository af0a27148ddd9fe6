"""The fuzz targets (fuzz/targets/) under hypothesis, so they run in every test run.

Each target is fed its committed seed corpus (which also holds every input that once broke
it), random bytes, and seeds with random edits. A target raises only when the code under test
broke its promise, so these tests fail exactly when the fuzzer would report a crash. Longer
runs: ``just fuzz``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.targets import NAMES, load, seeds

OUTCOMES = {"accepted", "rendered", "rejected", "undecodable"}
DEEPEST = {
    "attributes": "accepted",
    "metadata": "accepted",
    "svid_response": "rendered",
    "bundle_response": "rendered",
    "publish_request": "accepted",
    "grpc_server": "accepted",
}


def _seed_cases() -> list[tuple[str, Path]]:
    return [(name, path) for name in NAMES for path in seeds(name)]


@pytest.mark.parametrize(("name", "seed"), _seed_cases(), ids=lambda v: getattr(v, "name", v))
def test_seed_holds(name: str, seed: Path) -> None:
    assert load(name)(seed.read_bytes()) in OUTCOMES


@pytest.mark.parametrize("name", NAMES)
def test_seeds_reach_the_deepest_path(name: str) -> None:
    """A corpus whose inputs are all refused early would leave most of the code unfuzzed."""
    outcomes = {load(name)(path.read_bytes()) for path in seeds(name)}
    assert DEEPEST[name] in outcomes
    assert "rejected" in outcomes


@st.composite
def edited(draw: st.DrawFn, name: str) -> bytes:
    """A seed of ``name`` with a few random byte edits, as a mutating fuzzer makes them."""
    data = bytearray(draw(st.sampled_from(seeds(name))).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        if edit == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif edit == "cut":
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_random_bytes_hold(name: str, data: st.DataObject) -> None:
    assert load(name)(data.draw(st.binary(max_size=512))) in OUTCOMES


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_edited_seeds_hold(name: str, data: st.DataObject) -> None:
    assert load(name)(data.draw(edited(name))) in OUTCOMES
