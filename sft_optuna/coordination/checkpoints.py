"""Per-trial training checkpoints in a directory shared by the workers.

A trial and its retries form a *lineage* (named by the first trial's number); they share one checkpoint
file, so a retry resumes where the dead worker's last finished epoch left off.

A checkpoint is bound to what produced it: the study's identity (a random id stored with the study when it
is created, not its name: a same-name study in a fresh database is another study) and the trial's parameters.
One that does not match is never restored: a log line says it was ignored, and the trial starts fresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sft_optuna.errors import NodeFault

__all__ = ["OWNER_KEY", "CheckpointStore", "owner"]

log = logging.getLogger(__name__)


OWNER_KEY = "sft_optuna.owner"
"""Key of a checkpoint's owner (study identity and trial parameters) in the saved dict."""


def owner(study_identity: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint is bound to: the study (its identity) and the trial's parameters."""
    return {"study": study_identity, "params": dict(sorted(params.items()))}


def _describe(found: Any) -> str:
    if not isinstance(found, dict):
        return "an unknown study (no owner recorded)"
    return f"study {found.get('study')} with parameters {found.get('params')}"


class CheckpointStore:
    """``<root>/<study name>/trial-<lineage>.pt``, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path, study_name: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
        self.dir = Path(root) / safe

    def path(self, lineage: int) -> Path:
        """Where lineage ``lineage`` keeps its checkpoint."""
        return self.dir / f"trial-{lineage}.pt"

    def save(self, lineage: int, state: dict[str, Any], owner: dict[str, Any] | None = None) -> None:
        """Write a checkpoint bound to ``owner`` (see :func:`owner`); a reader never sees a half-written file.

        Any failure to write it (a full disk: torch raises ``RuntimeError`` from its zip writer, not
        ``OSError``) keeps the previous good checkpoint, removes the partial file and is a
        :class:`NodeFault`: the node's disk, not the trial (see ``worker.py``)."""
        path = self.path(lineage)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            torch.save({**state, OWNER_KEY: owner}, tmp)
            tmp.replace(path)
        except Exception as exc:  # noqa: BLE001 - whatever torch raises for a full disk, it is the node's
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            raise NodeFault(f"cannot write checkpoint {path} ({why or type(exc).__name__})") from None

    def load(self, lineage: int, device: torch.device, owner: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The lineage's last checkpoint, or None if there is none, it cannot be read, or it belongs to another
        study or other parameters than ``owner`` (then it is ignored out loud, never used)."""
        path = self.path(lineage)
        if not path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint means starting over, not dying
            log.warning("cannot read checkpoint %s (%s); starting from epoch 1", path, exc)
            return None
        if not isinstance(state, dict):
            log.warning("checkpoint %s is not a checkpoint dict; ignored, starting from epoch 1", path)
            return None
        found = state.pop(OWNER_KEY, None)
        if owner is not None and found != owner:
            log.warning(
                "checkpoint %s was written by %s, not by this trial (%s); ignored, starting from epoch 1",
                path,
                _describe(found),
                _describe(owner),
            )
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

    def free(self, lineages: set[int]) -> tuple[int, int]:
        """Delete the checkpoints of ``lineages`` (a done study's paused ones: no promotion can use them);
        returns (files, bytes) freed. The best trial's checkpoint (``best.pt``) is another file and stays."""
        files = size = 0
        for lineage in sorted(lineages):
            path = self.path(lineage)
            try:
                n = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue  # another worker of the done study freed it a moment ago
            files, size = files + 1, size + n
        return files, size
