"""Where one NodePublishVolume spends its time, phase by phase.

The CSI handler marks the end of each phase on the publish's :class:`PublishTrace`: it
sends the pod's SubscribeToX509SVIDs request as soon as the request is checked, holds the
target folder and writes the metadata while the agent answers, and writes the first files
itself (:meth:`~trio_spirecsi.volumes.volume.Volume.first_svid`).
When its attempt fails, the volume's SVID task and writer take over and mark the phases they
reach. A phase runs from the end of the previous one to its own mark, so the phases of a
complete trace add up to the handler's whole time, waiting for a task to be scheduled
included:

============  ===================================================================
validate      the request checked
subscribe     the SubscribeToX509SVIDs request handed to the agent connection
metadata      the target folder checked and held, ``metadata.json`` written, the volume
              started (while the agent answers)
first_svid    the first SVID received and validated (what is left of the agent's time)
render        the files rendered
write         the files written (atomically)
mount         the files bind-mounted on the target
============  ===================================================================

Exposed as the ``trio_spirecsi_publish_phase_seconds`` histogram and a debug log line per
publish, so a slow publish shows where the time went.
"""

from __future__ import annotations

import time

from ..metrics import PUBLISH_PHASES as PHASES


class PublishTrace:
    """The phase durations of one publish (seconds); marks after the first of each phase,
    and marks made once the publish is over, change nothing."""

    __slots__ = ("_last", "closed", "durations")

    def __init__(self, started: float | None = None) -> None:
        self._last = time.perf_counter() if started is None else started
        self.durations: dict[str, float] = {}
        self.closed = False

    def mark(self, phase: str) -> None:
        """``phase`` ended now."""
        if self.closed or phase in self.durations:
            return
        now = time.perf_counter()
        self.durations[phase] = now - self._last
        self._last = now

    @property
    def complete(self) -> bool:
        """Every phase was marked: a publish that created the volume and mounted it."""
        return len(self.durations) == len(PHASES)

    def close(self) -> None:
        self.closed = True


__all__ = ["PHASES", "PublishTrace"]
