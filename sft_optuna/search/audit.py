"""The pruner audit: let a random share of the trials a pruner would stop (or ASHA would pause) run to the end,
and measure how often that stop threw a good configuration away — the false-prune rate, on the user's data.

``pruner: {name: median, ..., audit: 0.1}``. Which trials are audited is decided per lineage from the study
seed, so every worker (and a retry) decides the same. An audited trial keeps its value and may be the best:
the audit costs the epochs it runs on, and buys an answer to "do my pruner settings discard winners?".
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs

__all__ = ["AUDIT", "audit_rate", "audit_summary", "is_audited"]

AUDIT = "audit"
"""The pruner option: the share (0..1) of stop decisions overridden."""


def audit_rate(options: dict[str, Any]) -> float:
    return float(options.get(AUDIT, 0.0))


def is_audited(rate: float, seed: int | None, lineage: int) -> bool:
    """The same answer in every worker for one lineage: a hash of (study seed, lineage) below ``rate``."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"audit:{seed}:{lineage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < rate


def audit_summary(trials: Sequence[FrozenTrial]) -> dict[str, Any] | None:
    """Audited trials that finished, and how many would have been wrongly stopped: finished at or above the
    median final value of the trials the pruner let run (the survivors), or as the study's best.

    None when no audited trial has finished yet, or no trial the pruner let run has: there is nothing to
    compare with (every audited trial would otherwise read as "at or above the median")."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    audited = [t for t in done if attrs.AUDITED in t.user_attrs]
    survivors = [float(t.value) for t in done if attrs.AUDITED not in t.user_attrs and t.value is not None]
    if not audited or not survivors:
        return None
    bar = statistics.median(survivors)
    best = max(float(t.value) for t in done if t.value is not None)
    false = [t for t in audited if t.value is not None and t.value >= bar]
    return {
        "audited": len(audited),
        "false_prunes": len(false),
        "false_prune_rate": round(len(false) / len(audited), 4),
        "best_was_audited": any(t.value == best for t in audited),
        "survivors_median": round(bar, 4),
    }
