"""gRPC on Trio over unix sockets: the only way the rest of the project speaks gRPC.

The engine (purerpc's protocol core plus our own Trio I/O, see ``_connection``) stays behind
this surface, so it can be replaced in one place.
"""

from .client import Channel, ResponseStream, open_channel
from .methods import Method
from .server import PeerCredentials, Server, ServerContext, StreamSender
from .status import RpcError, StatusCode

__all__ = [
    "Channel",
    "Method",
    "PeerCredentials",
    "ResponseStream",
    "RpcError",
    "Server",
    "ServerContext",
    "StatusCode",
    "StreamSender",
    "open_channel",
]
