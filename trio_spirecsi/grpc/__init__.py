"""gRPC on Trio over unix sockets: the only way the rest of the project speaks gRPC.

The engine stays behind this surface: ``_protocol`` (sans-IO HTTP/2 and gRPC on h2, with its
own events and limits), ``_transport`` (Trio I/O) and ``_purerpc`` (the one module that
imports purerpc, for gRPC header parsing and message deframing). Any of them can be replaced
in one place.

Peers may be hostile (the per-pod Workload API socket): whatever one sends ends at worst its
own stream or connection. ``Server(on_error=...)`` and ``open_channel(on_error=...)`` report
each such failure with one of these kinds (:data:`ERROR_KINDS`):

- ``grpc_protocol_error``: the peer broke HTTP/2 or HPACK (bad preface, frame larger than
  allowed, flow-control violation, undecodable header block...); connection closed with GOAWAY
  PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR, FLOW_CONTROL_ERROR or STREAM_CLOSED.
- ``grpc_limit_exceeded``: a header block larger than ``max_header_list_bytes`` or in more
  than ``max_continuation_frames`` CONTINUATION frames; GOAWAY ENHANCE_YOUR_CALM.
- ``grpc_flood``: the control-frame or new-stream budget ran out; GOAWAY ENHANCE_YOUR_CALM.
- ``grpc_slow_reader``: more than ``max_send_queue_bytes`` queued for a peer that does not
  read; GOAWAY ENHANCE_YOUR_CALM and close.
- ``grpc_handshake_timeout``: no preface and SETTINGS within ``handshake_timeout``; GOAWAY
  SETTINGS_TIMEOUT.
- ``grpc_too_many_connections``: a connection beyond ``max_connections``, closed at once with
  GOAWAY ENHANCE_YOUR_CALM.
- ``grpc_internal_error``: a bug here while handling the connection (logged with its
  traceback); GOAWAY INTERNAL_ERROR.
- ``grpc_stream_refused``: a stream beyond ``max_concurrent_streams``, refused with
  RST_STREAM REFUSED_STREAM; the connection lives.
- ``grpc_message_too_large``: a message larger than the limit (declared, or once
  decompressed); that call fails RESOURCE_EXHAUSTED.
- ``grpc_bad_stream``: headers that are not printable ASCII or not a gRPC call, an unknown
  grpc-encoding, an undecodable compressed message, a stream cut mid-message; that call fails
  (INTERNAL, or UNIMPLEMENTED for the encoding).

Orderly closes (peer hung up, idle timeout, shutdown) are no error and are not reported.
"""

from ._protocol import (
    BAD_STREAM,
    FLOOD,
    HANDSHAKE_TIMEOUT,
    INTERNAL_ERROR,
    LIMIT_EXCEEDED,
    MESSAGE_TOO_LARGE,
    PROTOCOL_ERROR,
    SLOW_READER,
    STREAM_REFUSED,
    TOO_MANY_CONNECTIONS,
)
from .client import Channel, ResponseStream, open_channel
from .limits import ClientLimits, ServerLimits
from .methods import Method
from .server import PeerCredentials, Server, ServerContext, StreamSender
from .status import RpcError, StatusCode

ERROR_KINDS = (
    PROTOCOL_ERROR,
    LIMIT_EXCEEDED,
    FLOOD,
    SLOW_READER,
    HANDSHAKE_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    INTERNAL_ERROR,
    STREAM_REFUSED,
    MESSAGE_TOO_LARGE,
    BAD_STREAM,
)
"""Every ``kind`` an ``on_error`` hook may receive."""

__all__ = [
    "ERROR_KINDS",
    "Channel",
    "ClientLimits",
    "Method",
    "PeerCredentials",
    "ResponseStream",
    "RpcError",
    "Server",
    "ServerContext",
    "ServerLimits",
    "StatusCode",
    "StreamSender",
    "open_channel",
]
