"""trio-spirecsi: a CSI driver that delivers SPIFFE identities from a SPIRE agent into pods."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trio-spirecsi")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
