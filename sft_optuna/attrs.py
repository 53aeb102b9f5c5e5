"""Names of the study and trial user attributes sft-optuna writes (what the dashboard and exports read)."""

from __future__ import annotations

from typing import Any, Protocol


class _HasUserAttrs(Protocol):
    @property
    def number(self) -> int: ...

    @property
    def user_attrs(self) -> dict[str, Any]: ...


STUDY_CONFIG = "sft_optuna.config"
"""Study: the full validated config (JSON-able dict); workers read it, nothing else."""
STUDY_UID = "sft_optuna.study_id"
"""Study: a random id made when it is created; its checkpoints are bound to it (not to its name)."""
STUDY_FILE = "sft_optuna.study_file"
"""Study: the path of the study file it was created from."""
RETRAIN = "sft_optuna.retrain"
"""Study: the result of ``sft-optuna retrain`` (test accuracy over seeds)."""

HISTORY = "history"
"""Trial: list of per-epoch figures (train loss, val accuracy, seconds, images/s, peak memory)."""
REASON = "reason"
"""Trial: why it ended when not COMPLETE: pruned at epoch k, diverged, out of memory, error, interrupted."""
LINEAGE = "lineage"
"""Trial: the number of the first trial of its retry chain (shares its checkpoint)."""
RETRY_OF = "retry_of"
"""Trial: the number of the failed trial this one retries."""
RETRY = "retry"
"""Trial: how many retries precede it in its lineage (0 for a first attempt)."""
RESUMED_FROM_EPOCH = "resumed_from_epoch"
"""Trial: the last epoch restored from the checkpoint (0: started fresh)."""
CONFUSION = "confusion_matrix"
"""Trial: validation confusion matrix after the last epoch (rows true class, columns predicted)."""
HOST = "host"
"""Trial: hostname:pid and device of the worker that ran it."""
SLOT = "slot"
"""Trial: which of the study's budget slots (0 .. n_trials-1) it fills; a retry keeps its trial's slot. The
budget is queued as WAITING trials, and Optuna hands each queued trial to exactly one worker."""
WARM_START = "warm_start_from"
"""Trial: ``STUDY#N``, the trial of another study whose configuration it runs (``create --warm-start``)."""
RUNG = "rung"
"""Trial (ASHA): the rung (0, 1, ...) it paused at; its checkpoint is kept for a promotion."""
PROMOTED_FROM = "promoted_from"
"""Trial (ASHA): the number of the paused trial it continues (same parameters, lineage and checkpoint)."""
FROM_RUNG = "from_rung"
"""Trial (ASHA): the rung its lineage was promoted from; it pauses only at higher rungs."""
PAUSED = "paused at rung"
"""Start of the reason of a trial ASHA paused (``paused at rung k``)."""
AUDITED = "audit_stopped_at"
"""Trial: the epoch at which its pruner would have stopped it (or ASHA paused it); the audit let it run on."""
CLAIM_RACED = "claim raced"
"""Reason of a trial dropped right after its claim: a duplicate (a second retry of the same trial, a slot
queued twice after a crash) or a fresh trial Optuna made when the queue ran dry. Not counted, not retried."""
NODE_FAULT = "node fault"
"""Reason of a trial its node could not run (device failed, checkpoint directory unwritable, weights or data
gone): given back, retried by another worker, not counted against the budget."""
NODE_FAULT_DETAIL = "node_fault"
"""Trial: what the node's fault was (with ``reason`` = ``node fault``)."""
INTERRUPTED = "interrupted"
"""Reason of a trial its worker was told to stop (SIGTERM, Ctrl-C): an operator's stop, retried, never counted
against ``max_retries``."""
OUTAGE = "storage outage"
"""Reason of a trial its worker gave back after the storage stayed away past the outage window: retried from
its checkpoint, never counted against ``max_retries``."""
RETRYABLE_REASONS = (INTERRUPTED, NODE_FAULT, OUTAGE)
"""Reasons whose trials are retried; a trial failed by a stale heartbeat has no reason and is retried too."""
UNCOUNTED_REASONS = (INTERRUPTED, OUTAGE, CLAIM_RACED)
"""Failures that are not the trial's: they never use up one of ``max_retries``. Counted: a worker that died
(stale heartbeat, no reason) — unless its worker turns out alive (:data:`WRONG_VERDICT`) — and a node fault."""
WRONG_VERDICT = "sft_optuna:wrong_verdict:"
"""Study system attribute prefix (+ trial number): that trial was failed as stale while its worker was alive
(the worker found out at its next storage call and said so); its failure does not count against
``max_retries``. On the study, because a finished trial cannot be written to."""


def lineage(trial: _HasUserAttrs) -> int:
    """The number of the first trial of ``trial``'s lineage (its retries and promotions share its checkpoint)."""
    return int(trial.user_attrs.get(LINEAGE, trial.number))
