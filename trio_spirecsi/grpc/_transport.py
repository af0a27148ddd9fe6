"""The Trio side of one gRPC connection, shared by the client and the server.

:class:`Transport` runs a :class:`~._protocol.ProtocolCore` on a socket: a reader that feeds
it and hands its events to the owner (while the reader waits for the socket, a caller may read
for it, :meth:`Transport.pull`), a writer that sends what it produces, a watchdog for
the handshake and idle timeouts, and flow-controlled message sending that also waits while
too much output is queued for a peer that does not read. However the connection ends,
:meth:`Transport.run` returns (it raises nothing but Cancelled), GOAWAY has been sent if the
peer still listens, the socket is closed, one log line says why, and the owner's ``on_error``
hook has been told the kind of failure, if any.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from ..errors import leaves
from ._protocol import (
    HANDSHAKE_TIMEOUT,
    INTERNAL_ERROR,
    SLOW_READER,
    ConnectionFailed,
    ErrorCodes,
    Event,
    ProtocolCore,
    StreamGone,
)

logger = logging.getLogger(__name__)

IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
READ_BYTES = 16384
"""Bytes read from the socket per turn of the event loop, unless a connection says otherwise."""
_CLOSE_GRACE = 1.0

ErrorHook = Callable[[str], None]


class Transport:
    """One HTTP/2 connection on a socket stream; see the module docstring.

    Any task may change the core's state and then call :meth:`flush`; :meth:`close` ends the
    connection from any task.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        core: ProtocolCore,
        *,
        handshake_timeout: float,
        idle_timeout: float | None,
        max_send_queue_bytes: int,
        log_fields: Mapping[str, Any],
        on_error: ErrorHook | None,
        read_bytes: int = READ_BYTES,
    ) -> None:
        self.core = core
        self._read_bytes = read_bytes
        # A read of more than ~128 KiB into a new bytes object costs an mmap and munmap (12 us
        # against 1.5 us): big reads go into one buffer kept for the connection instead.
        self._read_buffer = bytearray(read_bytes) if read_bytes > READ_BYTES else None
        self._stream = stream
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._max_queue = max_send_queue_bytes
        self._high_water = max(max_send_queue_bytes // 2, 1)
        self._log_fields = dict(log_fields)
        self._on_error = on_error
        self._scope = trio.CancelScope()
        self._dirty = trio.Event()
        self._changed = trio.Event()
        self._idle_changed = trio.Event()
        self._handshake = trio.Event()
        self._busy = False
        self._sending = False  # the writer task is inside a send
        self._outbox = bytearray()  # taken from the core, not yet sent
        self._on_events: Callable[[Sequence[Event]], None] | None = None
        self._read_wait: trio.CancelScope | None = None
        """Around the read loop's wait for the socket, while it waits: :meth:`pull` may
        read for it, and cancels it when the loop must look again without new bytes."""

    @property
    def queued(self) -> int:
        """Bytes produced for the peer that it has not taken yet (as far as we can tell)."""
        return len(self._outbox) + self.core.outbound_pending

    @property
    def ended(self) -> bool:
        return self.core.failure is not None

    def flush(self) -> None:
        """Wake the writer task if there is anything to send. Acknowledging a message
        usually queues nothing (WINDOW_UPDATE goes out once half a window is consumed), and
        neither does :meth:`send_now` once the socket took everything: no writer turn then."""
        if self._outbox or self.core.outbound_pending:
            self._dirty.set()

    def send_now(self) -> None:
        """Flush, and send what the core has right away from the calling task when nothing
        else is being sent: a call's request or response leaves without waiting for the
        writer task's next turn (which, with many tasks runnable, can be a long wait).
        What the socket does not take at once (or any error) is left to the writer task."""
        if not self._sending and not self._outbox and self.core.failure is None:
            data = self.core.data_to_send()
            if data:
                try:
                    sent = os.write(self._stream.socket.fileno(), data)
                except OSError:  # full (EAGAIN), or broken: the writer finds out
                    sent = 0
                if sent < len(data):
                    self._outbox += data[sent:]
                self.notify()
        self.flush()

    def notify(self) -> None:
        """Wake every task in :meth:`wait_changed` (window, stream or connection news)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def set_busy(self, busy: bool) -> None:
        """Whether any stream is open: the idle timeout runs only while none is."""
        if busy != self._busy:
            self._busy = busy
            self._idle_changed.set()
            self._idle_changed = trio.Event()

    def report(self, kind: str) -> None:
        """Tell the owner's ``on_error`` hook about a failure (never raises)."""
        if self._on_error is not None:
            try:
                self._on_error(kind)
            except Exception:
                logger.exception("gRPC on_error hook failed")

    def close(
        self, error_code: int, kind: str | None, reason: str, error: Exception | None = None
    ) -> None:
        """End the connection: GOAWAY with ``error_code`` is sent, then the socket closed."""
        self.core.fail(error_code, kind, reason, error)
        self.flush()
        self.notify()
        self._scope.cancel()

    async def run(
        self,
        on_events: Callable[[Sequence[Event]], None],
        on_close: Callable[[ConnectionFailed], None],
    ) -> ConnectionFailed:
        """Serve the connection until it ends, and return why.

        ``on_events`` (synchronous) gets every batch of events; ``on_close`` runs once, before
        the socket is closed, however the run ends. Exceptions from either end this
        connection with INTERNAL_ERROR and are logged; only Cancelled propagates.
        """
        try:
            with self._scope:
                if self.core.failure is None:
                    self.core.initiate()
                    self.flush()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._watchdog)
                    await self._read_loop(on_events)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug of ours: the tasks handle every expected error
            self.core.fail_internal(exc)
        finally:
            end = self.core.fail(ErrorCodes.NO_ERROR, None, "connection closed")
            try:
                on_close(end)
            except Exception:
                logger.exception("gRPC connection close handling failed")
            self.notify()
            with trio.CancelScope(shield=True):
                await self._close()
            self.core.release()
            self._log(end)
            if end.kind is not None:
                self.report(end.kind)
        return end

    async def _read_loop(self, on_events: Callable[[Sequence[Event]], None]) -> None:
        self._on_events = on_events
        try:
            await self._read_until_end(on_events)
        finally:
            self._on_events = None  # the owner holds this transport: no cycle left behind

    async def _read_until_end(self, on_events: Callable[[Sequence[Event]], None]) -> None:
        core = self.core
        while core.failure is None:
            try:
                if core.backlogged:
                    # Frames read earlier wait: a turn for the other tasks, then whatever
                    # has arrived meanwhile (its first responses go ahead), and the next few.
                    await trio.lowlevel.checkpoint()
                    data = self._receive_now(core.backlog_bytes)
                else:
                    data = await self._receive()
            except IO_ERRORS as exc:
                self._end_reading(on_events, _describe(exc))
                return
            self._handle(data, on_events)

    def pull(self) -> None:
        """Read and handle what the socket holds right now, from the calling task, if the
        read loop is waiting for the socket: a caller about to wait for a response that
        has already arrived gets it in its own turn, instead of waiting for the reader's
        turn and then its own. The bytes are handled exactly as the read loop handles them
        (same order: the loop handles each read before it waits again), and the loop is
        woken when what it must do next no longer depends on new bytes (a backlog left,
        the connection ended). What the bytes call for (a PING's ACK) is left to the writer
        task: the caller goes on with its own work first."""
        wait = self._read_wait
        on_events = self._on_events
        core = self.core
        if wait is None or wait.cancel_called or on_events is None or core.failure is not None:
            return
        try:
            data = self._receive_now(0)
        except IO_ERRORS as exc:
            self._end_reading(on_events, _describe(exc))
        else:
            if data is None:
                return
            self._handle(data, on_events, send=False)
        if core.failure is not None or core.backlogged:
            wait.cancel()

    def _handle(
        self,
        data: bytes | None,
        on_events: Callable[[Sequence[Event]], None],
        *,
        send: bool = True,
    ) -> None:
        """Feed what was read to the core and its events to the owner: ``data`` None when
        nothing new was read (the backlog's turn), b"" at the end of the stream. ``send``:
        what the core queued in answer is sent from this task, if the socket takes it."""
        core = self.core
        if data is not None and not data:
            self._end_reading(on_events, "connection closed by peer")
            return
        events = core.receive(data or b"", trio.current_time())
        if core.handshake_done and not self._handshake.is_set():
            self._handshake.set()
        try:
            on_events(events)
        except Exception as exc:
            core.fail_internal(exc)
        if self.queued > self._max_queue:
            core.fail(
                ErrorCodes.ENHANCE_YOUR_CALM,
                SLOW_READER,
                f"peer does not read: more than {self._max_queue} bytes queued",
            )
        if core.outbound_pending:
            # PING and SETTINGS acks (grpc-go pings with every response), GOAWAY: sent
            # from this task when the socket takes them, without a turn of the writer's.
            if send:
                self.send_now()
            else:
                self.flush()

    def _end_reading(self, on_events: Callable[[Sequence[Event]], None], reason: str) -> None:
        """The socket is closed or failed: what was read before still counts, then the end."""
        try:
            on_events(self.core.drain())
        except Exception as exc:
            self.core.fail_internal(exc)
        self.core.fail(ErrorCodes.NO_ERROR, None, reason)

    def _receive_now(self, backlog: int) -> bytes | None:
        """What the socket holds, without waiting: None if nothing (or if the backlog is
        four reads' worth already), b"" at end of stream. Reading and handling what was
        read happen in one step, with no turn between them (see :meth:`_receive`)."""
        if backlog >= 4 * self._read_bytes:
            return None
        buffer = self._read_buffer
        try:
            if buffer is None:
                return os.read(self._stream.socket.fileno(), self._read_bytes)
            size = os.readv(self._stream.socket.fileno(), [buffer])
        except BlockingIOError:
            return None
        return bytes(memoryview(buffer)[:size])

    async def _receive(self) -> bytes | None:
        """The next read, once the socket is readable; None if :meth:`pull` took the bytes
        first or woke the loop. Trio's ``receive_some`` would not do: after a read that
        succeeds at once it gives up a turn holding the bytes, and a pull meanwhile would
        handle later bytes first."""
        with trio.CancelScope() as wait:
            self._read_wait = wait
            try:
                await trio.lowlevel.wait_readable(self._stream.socket)
            finally:
                self._read_wait = None
        if wait.cancelled_caught:
            return None
        return self._receive_now(0)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                await self._drain()
        except IO_ERRORS as exc:
            self.core.fail(ErrorCodes.NO_ERROR, None, _describe(exc))
            self._scope.cancel()

    async def _drain(self) -> None:
        """Send until the core has nothing more; cancellation loses no byte (no partial send)."""
        sock = self._stream.socket
        while True:
            if not self._outbox:
                self._outbox += self.core.data_to_send()
                if not self._outbox:
                    return
            self._sending = True
            try:
                sent = await sock.send(self._outbox)
            finally:
                self._sending = False
            del self._outbox[:sent]
            self.notify()

    async def _watchdog(self) -> None:
        with trio.move_on_after(self._handshake_timeout):
            await self._handshake.wait()
        if not self._handshake.is_set():
            reason = f"no HTTP/2 preface and SETTINGS within {self._handshake_timeout:g} s"
            self.close(ErrorCodes.SETTINGS_TIMEOUT, HANDSHAKE_TIMEOUT, reason)
            return
        if self._idle_timeout is None:
            return
        while True:
            changed = self._idle_changed
            if self._busy:
                await changed.wait()
                continue
            with trio.move_on_after(self._idle_timeout) as idle:
                await changed.wait()
            if idle.cancelled_caught and not self._busy:
                self.close(ErrorCodes.NO_ERROR, None, f"idle for {self._idle_timeout:g} s")
                return

    async def _close(self) -> None:
        """Best effort: send what is pending (GOAWAY last), then close the socket."""
        with trio.move_on_after(_CLOSE_GRACE), contextlib.suppress(*IO_ERRORS):
            await self._drain()
        with contextlib.suppress(*IO_ERRORS):
            await self._stream.aclose()

    def _log(self, end: ConnectionFailed) -> None:
        fields = dict(self._log_fields, reason=end.reason)
        level = logging.DEBUG
        if end.kind is not None:
            level = logging.ERROR if end.kind == INTERNAL_ERROR else logging.WARNING
            fields.update(kind=end.kind, http2_error=_error_name(end.error_code))
        if logger.isEnabledFor(level):
            exc_info = None
            if end.error is not None:
                exc_info = (type(end.error), end.error, end.error.__traceback__)
            logger.log(level, "grpc_connection_closed", extra={"fields": fields}, exc_info=exc_info)

    async def send_message(
        self, stream_id: int, data: bytes, *, end_stream: bool = False, flush: bool = True
    ) -> None:
        """Send one gRPC message as the peer's windows and our send queue allow.

        With ``flush=False`` the message's last bytes are left queued for the caller's
        :meth:`send_now` in the same turn (one write, no writer turn); anything queued before
        a wait for window or room is flushed all the same. Raises StreamGone if the stream
        is reset or the connection ends first.
        """
        # Not a schedule point when the message fits at once: a request or response goes out
        # in the task's current turn (cancellation is still checked).
        await trio.lowlevel.checkpoint_if_cancelled()
        payload = memoryview(struct.pack(">?I", False, len(data)) + data)
        offset = 0
        while True:
            if self.core.failure is not None:
                raise StreamGone
            room = self._high_water - self.queued
            if room > 0:
                size = min(self.core.send_window(stream_id), room, len(payload) - offset)
                if size > 0:
                    chunk = bytes(payload[offset : offset + size])
                    offset += size
                    last = offset == len(payload)
                    self.core.send_data(stream_id, chunk, end_stream=end_stream and last)
                    if last:
                        if flush:
                            self.flush()
                        return
                    self.flush()
                    continue
            self.flush()
            await self.wait_changed()


def _error_name(code: int) -> str:
    try:
        return str(ErrorCodes(code).name)
    except ValueError:
        return str(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def encode_timeout(seconds: float) -> str:
    """grpc-timeout value: at most 8 digits, rounded up so the peer never sees less."""
    for unit, scale in (("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = math.ceil(seconds * scale)
        if value < 10**8:
            return f"{max(value, 1)}{unit}"
    return "99999999H"


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a nursery body raised, so that callers never see ExceptionGroup.

    Background tasks here never raise (except Cancelled), so a group holds the body's exception
    plus, at most, Cancelled from those tasks.
    """
    found = leaves(group)
    others = [e for e in found if not isinstance(e, trio.Cancelled)]
    if len(others) == 1:
        return others[0]
    return group if others else found[0]
