"""The one place where the project's errors become gRPC status codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import AlreadyExists, InvalidArgument, NotFound, PublishFailed, SpireCSIError
from ..grpc import RpcError, ServerContext, StatusCode
from ..storage.errors import MountError, StorageError
from ..storage.metadata import MetadataError

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_PUBLISH_CODES = {
    "timeout": StatusCode.FAILED_PRECONDITION,
    "unavailable": StatusCode.UNAVAILABLE,
    "permission_denied": StatusCode.PERMISSION_DENIED,
    "internal": StatusCode.INTERNAL,
}


def to_rpc_error(exc: SpireCSIError) -> RpcError:
    if isinstance(exc, InvalidArgument):
        return RpcError(StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}")
    if isinstance(exc, AlreadyExists):
        return RpcError(StatusCode.ALREADY_EXISTS, exc.message)
    if isinstance(exc, NotFound):
        return RpcError(StatusCode.NOT_FOUND, exc.message)
    if isinstance(exc, PublishFailed):
        return RpcError(_PUBLISH_CODES.get(exc.kind, StatusCode.INTERNAL), exc.message)
    return RpcError(StatusCode.INTERNAL, exc.message)


def internal_error(exc: OSError | MetadataError) -> tuple[str, RpcError]:
    """A storage, mount or metadata failure: its ``errors_total`` kind and the INTERNAL
    status that tells the kubelet (and the pod's events) the reason."""
    if isinstance(exc, MountError):
        kind = "mount_failed"
    elif isinstance(exc, MetadataError):
        kind = "metadata_failed"
    else:
        kind = "storage_failed"
    if isinstance(exc, OSError) and not isinstance(exc, MountError | StorageError):
        text = exc.strerror or str(exc)
        message = f"{text}: {exc.filename}" if exc.filename else text
    else:
        message = str(exc)
    return kind, RpcError(StatusCode.INTERNAL, message)


def handler(
    fn: Callable[[Req, ServerContext], Awaitable[Resp]],
    count: Callable[[str], None] | None = None,
) -> Callable[[Req, ServerContext], Awaitable[Resp]]:
    """Wrap a handler so that project errors leave as their gRPC status, and storage, mount
    and metadata failures as INTERNAL with their reason (``count(kind)`` counts them)."""

    async def wrapped(request: Req, context: ServerContext) -> Resp:
        try:
            return await fn(request, context)
        except SpireCSIError as exc:
            raise to_rpc_error(exc) from None
        except (OSError, MetadataError) as exc:
            kind, error = internal_error(exc)
            if count is not None:
                count(kind)
            raise error from None

    wrapped.__name__ = fn.__name__
    return wrapped
