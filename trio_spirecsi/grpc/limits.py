"""How much one gRPC peer may cost us: frozen limits for servers and channels.

The defaults are safe for a peer that is hostile: the per-pod Workload API socket, which any
process in the pod may open, flood and never read. :meth:`ServerLimits.trusted` and
:meth:`ClientLimits.trusted` keep the generous sizes the kubelet's CSI socket and the SPIRE
agent connection need (4 MiB messages, big windows, tens of thousands of streams).

Every limit is enforced per connection (``max_connections`` per listening socket), so a peer
that exceeds one loses its own stream or connection and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

KiB = 1024
MiB = 1024 * KiB

_MIN_FRAME = 16_384
_MAX_FRAME = 2**24 - 1
_MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class ServerLimits:
    """Limits of a :class:`~trio_spirecsi.grpc.Server`; the defaults suit an untrusted peer.

    A value out of range raises ValueError naming the field, when the limits are created.
    """

    max_connections: int = 16
    """Open connections per listening socket (16). One more is accepted and closed at once
    with GOAWAY ENHANCE_YOUR_CALM; it is never queued."""
    max_concurrent_streams: int = 16
    """Streams per connection (16), advertised in SETTINGS. A stream beyond it is refused
    with RST_STREAM REFUSED_STREAM; the connection lives."""
    max_request_bytes: int = 64 * KiB
    """Largest request message after decompression (64 KiB); a larger one fails its call
    RESOURCE_EXHAUSTED."""
    max_header_list_bytes: int = 16 * KiB
    """Largest header block (16 KiB), advertised in SETTINGS and checked frame by frame as it
    arrives; a larger one (encoded or decoded) closes the connection with GOAWAY
    ENHANCE_YOUR_CALM, since HPACK state cannot survive a block that was not decoded."""
    max_continuation_frames: int = 8
    """CONTINUATION frames in one header block (8); more close the connection with GOAWAY
    ENHANCE_YOUR_CALM."""
    max_frame_bytes: int = 16_384
    """Largest frame payload accepted (16,384, the HTTP/2 default), advertised in SETTINGS;
    a bigger frame closes the connection with GOAWAY FRAME_SIZE_ERROR as soon as its 9-byte
    header arrives."""
    stream_window: int = 64 * KiB
    """Receive window of one stream (64 KiB): bytes received but not yet consumed by the
    handler. Raised to ``max_request_bytes + 5`` when smaller, so one whole message fits."""
    connection_window: int = 256 * KiB
    """Receive window of the connection (256 KiB): unconsumed bytes across its streams.
    Raised to the stream window when smaller."""
    handshake_timeout: float = 5.0
    """Seconds from accept until the client preface and SETTINGS have arrived (5 s)."""
    idle_timeout: float | None = 300.0
    """Seconds a connection may have no open stream before GOAWAY and close (300 s);
    None keeps idle connections."""
    max_send_queue_bytes: int = 1 * MiB
    """Bytes produced for the peer that it has not read yet (1 MiB). Responses wait once half
    of it is queued; beyond all of it (control frames the peer provokes and never reads) the
    connection is closed."""
    control_frames_per_second: float = 100.0
    """Refill rate of the control frame budget (100/s): PING, SETTINGS, RST_STREAM, PRIORITY,
    WINDOW_UPDATE, GOAWAY, unknown frames and empty DATA/HEADERS/CONTINUATION frames without
    END_STREAM each spend a token. Exhausted: GOAWAY ENHANCE_YOUR_CALM."""
    control_frame_burst: int = 1000
    """Size of the control frame budget (1000 tokens, also its initial content)."""
    new_streams_per_second: float = 100.0
    """Refill rate of the new stream budget (100/s): every stream the client opens spends a
    token (rapid reset: HEADERS + RST_STREAM loops). Exhausted: GOAWAY ENHANCE_YOUR_CALM."""
    new_stream_burst: int = 1000
    """Size of the new stream budget (1000 tokens)."""

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def trusted(cls) -> ServerLimits:
        """For a peer that is root on the node (the kubelet, the SPIRE agent's driver)."""
        return cls(
            max_connections=1024,
            max_concurrent_streams=65_536,
            max_request_bytes=4 * MiB,
            max_header_list_bytes=64 * KiB,
            max_continuation_frames=64,
            max_frame_bytes=_MAX_FRAME,
            stream_window=4 * MiB + 5,
            connection_window=64 * MiB,
            handshake_timeout=5.0,
            idle_timeout=None,
            max_send_queue_bytes=64 * MiB,
            control_frames_per_second=10_000.0,
            control_frame_burst=100_000,
            new_streams_per_second=10_000.0,
            new_stream_burst=100_000,
        )


@dataclass(frozen=True)
class ClientLimits:
    """Limits of a channel (:func:`~trio_spirecsi.grpc.open_channel`) on what the server sends.

    The defaults are gRPC's usual client sizes with HTTP/2 defenses; :meth:`trusted` is for
    the SPIRE agent connection, which carries thousands of streams.
    """

    max_response_bytes: int = 4 * MiB
    """Largest response message after decompression (4 MiB, gRPC's default); a larger one
    fails its call RESOURCE_EXHAUSTED."""
    max_header_list_bytes: int = 16 * KiB
    """Largest header block (16 KiB); see :attr:`ServerLimits.max_header_list_bytes`."""
    max_continuation_frames: int = 8
    """CONTINUATION frames in one header block (8)."""
    max_frame_bytes: int = 16_384
    """Largest frame payload accepted (16,384); a bigger one closes the connection."""
    stream_window: int = 64 * KiB
    """Receive window of one call (64 KiB), raised to ``max_response_bytes + 5``."""
    connection_window: int = 8 * MiB
    """Receive window of the connection (8 MiB), raised to the stream window."""
    handshake_timeout: float = 5.0
    """Seconds to connect and receive the server's SETTINGS (5 s); calls fail UNAVAILABLE."""
    max_send_queue_bytes: int = 1 * MiB
    """Bytes produced for the server that it has not read yet (1 MiB); requests wait at
    half, the connection is closed beyond it."""
    control_frames_per_second: float = 100.0
    """Refill rate of the control frame budget (100/s); see :class:`ServerLimits`."""
    control_frame_burst: int = 1000
    """Size of the control frame budget (1000 tokens)."""
    read_bytes: int = 16 * KiB
    """Bytes read from the socket at a time (16 KiB). One read and the events it carries are
    one step of the event loop; :meth:`trusted` reads up to 256 KiB (about what a unix socket
    buffers), so that a burst of responses on thousands of streams (a rotation) is read in a
    few steps and the first response of a new call behind it is not many loop turns away."""
    messages_per_turn: int = 16
    """Later messages of calls (after each call's first) handed to their callers per turn of
    the event loop (16); first messages, statuses and errors are handed over at once. A
    burst of responses on many streams then never makes one turn long, and a new call's first
    response overtakes the burst."""
    messages_per_busy_turn: int = 2
    """:attr:`messages_per_turn` while the channel's owner is busy (2; see
    :func:`~trio_spirecsi.grpc.open_channel`): a burst then takes more, shorter turns, and
    the owner's own work waits less at each of its steps."""
    frames_per_step: int = 64
    """Frames received from the server processed per turn of the event loop (64) once more
    have been read than that; the rest wait, read but unprocessed, for the next turns, up to
    four reads' worth (then reading pauses). A call still waiting for its first response
    has its frames processed as soon as they are read, ahead of that backlog: a new call's
    first response read behind a burst on thousands of streams (a rotation) reaches its
    caller in the turn it is read, and no turn is long."""

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def trusted(cls) -> ClientLimits:
        """For the SPIRE agent: one connection, up to 65,536 streams, 4 MiB messages."""
        return cls(
            max_response_bytes=4 * MiB,
            max_header_list_bytes=64 * KiB,
            max_continuation_frames=64,
            max_frame_bytes=_MAX_FRAME,
            stream_window=4 * MiB + 5,
            connection_window=64 * MiB,
            handshake_timeout=5.0,
            max_send_queue_bytes=64 * MiB,
            control_frames_per_second=10_000.0,
            control_frame_burst=100_000,
            read_bytes=256 * KiB,
        )


@dataclass(frozen=True)
class WireLimits:
    """What the protocol core enforces, derived from either kind of limits (internal)."""

    max_message_bytes: int
    max_header_list_bytes: int
    max_continuation_frames: int
    max_frame_bytes: int
    stream_window: int
    connection_window: int
    max_concurrent_streams: int
    control_frames_per_second: float
    control_frame_burst: int
    new_streams_per_second: float
    new_stream_burst: int
    frames_per_step: int = 0
    """Received frames processed per step once a read holds more (0: every frame of a read
    at once, in order; a server's cores)."""

    @classmethod
    def for_server(cls, limits: ServerLimits) -> WireLimits:
        return cls._make(
            limits,
            limits.max_request_bytes,
            limits.max_concurrent_streams,
            limits.new_streams_per_second,
            limits.new_stream_burst,
        )

    @classmethod
    def for_client(cls, limits: ClientLimits) -> WireLimits:
        # A client accepts no stream from the server (push is disabled): no stream budget.
        wire = cls._make(limits, limits.max_response_bytes, 0, 1.0, 1)
        return dataclasses.replace(wire, frames_per_step=limits.frames_per_step)

    @classmethod
    def _make(
        cls,
        limits: ServerLimits | ClientLimits,
        max_message: int,
        streams: int,
        stream_rate: float,
        stream_burst: int,
    ) -> WireLimits:
        stream_window = min(max(limits.stream_window, max_message + 5), _MAX_WINDOW)
        return cls(
            max_message_bytes=max_message,
            max_header_list_bytes=limits.max_header_list_bytes,
            max_continuation_frames=limits.max_continuation_frames,
            max_frame_bytes=limits.max_frame_bytes,
            stream_window=stream_window,
            connection_window=min(max(limits.connection_window, stream_window), _MAX_WINDOW),
            max_concurrent_streams=streams,
            control_frames_per_second=limits.control_frames_per_second,
            control_frame_burst=limits.control_frame_burst,
            new_streams_per_second=stream_rate,
            new_stream_burst=stream_burst,
        )


def _check(limits: ServerLimits | ClientLimits) -> None:
    name = type(limits).__name__
    for field in fields(limits):
        value: Any = getattr(limits, field.name)
        if value is None and field.name == "idle_timeout":
            continue
        kinds: tuple[type, ...] = (int,) if field.type == "int" else (int, float)
        typed = isinstance(value, kinds) and not isinstance(value, bool)
        if not typed or not value > 0:
            what = "a positive integer" if kinds == (int,) else "a positive number"
            raise ValueError(f"{name}.{field.name} must be {what}, got {value!r}")
    if not _MIN_FRAME <= limits.max_frame_bytes <= _MAX_FRAME:
        raise ValueError(
            f"{name}.max_frame_bytes must be between {_MIN_FRAME} and {_MAX_FRAME}, "
            f"got {limits.max_frame_bytes}"
        )
    for window in ("stream_window", "connection_window"):
        if getattr(limits, window) > _MAX_WINDOW:
            raise ValueError(f"{name}.{window} must be at most {_MAX_WINDOW}")
    if isinstance(limits, ServerLimits) and limits.max_concurrent_streams > _MAX_WINDOW:
        raise ValueError(f"{name}.max_concurrent_streams must be at most {_MAX_WINDOW}")
