"""Per-trial training checkpoints in a directory shared by the workers.

A trial and its retries form a *lineage* (named by the first trial's number); they share one checkpoint
file, so a retry resumes where the dead worker's last finished epoch left off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sft_optuna.errors import NodeFault

__all__ = ["CheckpointStore"]

log = logging.getLogger(__name__)


class CheckpointStore:
    """``<root>/<study name>/trial-<lineage>.pt``, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path, study_name: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
        self.dir = Path(root) / safe

    def path(self, lineage: int) -> Path:
        """Where lineage ``lineage`` keeps its checkpoint."""
        return self.dir / f"trial-{lineage}.pt"

    def save(self, lineage: int, state: dict[str, Any]) -> None:
        """Write a checkpoint; a reader never sees a half-written file."""
        path = self.path(lineage)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            # The node's disk, not the trial: give the trial back (see ``worker.py``) instead of failing it.
            raise NodeFault(f"cannot write checkpoint {path} ({exc.strerror or exc})") from None

    def load(self, lineage: int, device: torch.device) -> dict[str, Any] | None:
        """The lineage's last checkpoint, or None if there is none (or it cannot be read)."""
        path = self.path(lineage)
        if not path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint means starting over, not dying
            log.warning("cannot read checkpoint %s (%s); starting from epoch 1", path, exc)
            return None
        return state

    def best_path(self) -> Path:
        """The kept checkpoint of the study's best trial (model, optimizer, learning curve)."""
        return self.dir / "best.pt"

    def keep_as_best(self, lineage: int, trial_number: int) -> None:
        """Make the lineage's last checkpoint the study's best (replacing the previous best)."""
        path = self.path(lineage)
        if path.is_file():
            path.replace(self.best_path())
            log.info("trial %d is the best so far; its checkpoint is %s", trial_number, self.best_path())

    def remove(self, lineage: int) -> None:
        """Delete the lineage's checkpoint if there is one."""
        self.path(lineage).unlink(missing_ok=True)
