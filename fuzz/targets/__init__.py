"""One module per fuzz target, each with ``test_one_input(data: bytes) -> str``.

A target returns a short word for the path the input took (``accepted``, ``rejected``,
``undecodable``...) and raises only when the code under test broke a promise: an exception
other than the documented one, or an accepted input whose result is not valid. The same
functions run under atheris (``python -m fuzz.run <target>``) and under hypothesis in the test
suite (``tests/test_fuzz_targets.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

NAMES = (
    "attributes",
    "metadata",
    "svid_response",
    "bundle_response",
    "publish_request",
    "grpc_server",
)
CORPUS = Path(__file__).resolve().parent.parent / "corpus"

Target = Callable[[bytes], str]


def load(name: str) -> Target:
    """The ``test_one_input`` of target ``name``."""
    if name not in NAMES:
        raise KeyError(f"unknown fuzz target {name!r}: one of {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return cast(Target, module.test_one_input)


def seeds(name: str) -> list[Path]:
    """The committed seed corpus of target ``name``, sorted by file name."""
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())
