"""The mutation table stays runnable: every deliberately broken patch in scripts/mutants.py
still applies to the code, and names a test that exists (running them is ``just mutants``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_patch_applies_once_and_its_test_exists(mutant: Mutant) -> None:
    code = (ROOT / mutant.path).read_text()
    for old, new in mutant.edits:
        assert code.count(old) == 1, f"{mutant.name}: patch text found {code.count(old)} times"
        assert old != new
    path, _, name = mutant.test.partition("::")
    tests = (ROOT / path).read_text()
    assert re.search(rf"^(async )?def {re.escape(name)}\(", tests, re.M), mutant.test


def test_the_mutation_table_in_contributing_lists_every_mutant() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for mutant in MUTANTS:
        assert f"| {mutant.name}: " in text, mutant.name
