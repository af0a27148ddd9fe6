"""The project's errors: each carries a message that tells a user what to fix.

They are mapped to gRPC status codes in one place (:mod:`trio_spirecsi.csi.status`);
nothing else in the project needs to know about wire codes.
"""

from __future__ import annotations

from typing import Literal, TypeVar

E = TypeVar("E", bound=BaseException)


class SpireCSIError(Exception):
    """Base of every error the driver reports to its callers.

    ``message`` is written for the person who has to act on it and never contains key
    material or tokens.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SpireCSIError):
    """A request field (or one volume attribute) is malformed; ``field`` names it exactly,
    e.g. ``volume_context[csi.spire.io/svid-file]``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RenderError(SpireCSIError):
    """The agent sent something that cannot be turned into the volume's files (a chain
    that does not parse, a key that does not match its certificate, no SVID matching the
    volume's selection, a missing trust bundle)."""


class AlreadyExists(SpireCSIError):
    """The volume ID is already published with other parameters."""


class NotFound(SpireCSIError):
    """The volume is not published on this node (at that path)."""


PublishFailureKind = Literal["timeout", "unavailable", "permission_denied", "internal"]


class PublishFailed(SpireCSIError):
    """Publish could not complete; ``kind`` says why in one word the CSI layer maps to a
    status code: ``timeout`` (no usable SVID in time), ``unavailable`` (agent unreachable)
    or ``permission_denied`` (the driver is not an authorized delegate)."""

    def __init__(self, kind: PublishFailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: PublishFailureKind = kind


def leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions inside ``group``, however deeply its groups nest, in order."""
    found: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(leaves(exc))
        else:
            found.append(exc)
    return found


__all__ = [
    "AlreadyExists",
    "InvalidArgument",
    "NotFound",
    "PublishFailed",
    "PublishFailureKind",
    "RenderError",
    "SpireCSIError",
    "leaves",
]
