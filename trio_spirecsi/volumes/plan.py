"""What a volume needs to run, derived from its metadata: shared by the volume's own tasks
and the servers on its per-pod socket (which import it from here, not from the volume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..attributes import VolumeSpec
from ..spire.selectors import Selector


@dataclass(frozen=True)
class VolumePlan:
    volume_id: str
    target_path: Path
    data_dir: Path
    """The volume's files (and per-pod socket): the source of its bind mount."""
    spec: VolumeSpec
    selectors: tuple[Selector, ...]
    selinux_context: str | None = None
    fsync: bool = True
    """Whether writes into ``data_dir`` are fsynced (not on tmpfs: see storage.sync)."""

    @property
    def pod(self) -> str:
        return f"{self.spec.pod.namespace}/{self.spec.pod.name}"
