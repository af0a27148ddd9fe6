"""The one place where the project's errors become gRPC status codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import AlreadyExists, InvalidArgument, NotFound, PublishFailed, SpireCSIError
from ..grpc import RpcError, ServerContext, StatusCode

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


def handler(
    fn: Callable[[Req, ServerContext], Awaitable[Resp]],
) -> Callable[[Req, ServerContext], Awaitable[Resp]]:
    """Wrap a handler so that project errors leave as their gRPC status."""

    async def wrapped(request: Req, context: ServerContext) -> Resp:
        try:
            return await fn(request, context)
        except SpireCSIError as exc:
            raise to_rpc_error(exc) from None

    wrapped.__name__ = fn.__name__
    return wrapped
