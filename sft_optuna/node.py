"""What one node brings to a study: its device, CPU threads, data and checkpoint directory — checked before
the first claim, so that a broken node stops with one line instead of failing trial after trial."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from sft_optuna.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHECKPOINT_DIR",
    "DEFAULT_DEVICE",
    "check_checkpoint_dir",
    "resolve_device",
    "resolve_threads",
    "use_threads",
]

log = logging.getLogger(__name__)

# The per-node defaults, here once; the CLI and the worker take them from here. Precedence everywhere:
# the command-line flag, then the environment ($OMP_NUM_THREADS for threads), then these.
DEFAULT_DEVICE = "auto"
"""``auto``: CUDA if this node has it, else the CPU."""
DEFAULT_CHECKPOINT_DIR = "checkpoints"
"""Relative to the working directory; workers on different machines need a shared one for retries to resume."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; otherwise the named device, checked to be usable."""
    import torch  # here, not at the top: the CLI reads this module's defaults without paying for torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available on this machine")
    try:
        torch.empty(1, device=device)  # one allocation proves the backend is compiled in and has a device
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--device {name}: not usable on this machine ({first[:160]})") from None
    return device


def resolve_threads(threads: int | None) -> int | None:
    """torch CPU threads: ``--threads``, else ``$OMP_NUM_THREADS``, else torch's default (None)."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: must be at least 1")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"$OMP_NUM_THREADS={env!r}: must be a whole number of at least 1")
    return int(env)


def use_threads(threads: int | None) -> int | None:
    """Resolve the thread count (:func:`resolve_threads`) and give it to torch; returns it (None: torch's own)."""
    resolved = resolve_threads(threads)
    if resolved:
        import torch

        torch.set_num_threads(resolved)
    return resolved


def check_checkpoint_dir(root: str | Path) -> None:
    """Refuse a checkpoint directory this node cannot write (a file, read-only, a missing mount)."""
    root = Path(root)
    probe = root / f".sft-optuna-probe-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--checkpoint-dir {root}: not a writable directory ({exc.strerror or exc})") from None
