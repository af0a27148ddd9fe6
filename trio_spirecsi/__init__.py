"""trio-spirecsi: a CSI driver that delivers SPIFFE identities from a SPIRE agent into pods."""

from __future__ import annotations

import functools


@functools.cache
def _version() -> str:
    # Read on first use: importlib.metadata scans the installed distributions, which costs
    # tens of milliseconds that `csi probe` and `healthcheck` (liveness probes) need not pay.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-spirecsi")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
