"""The study-wide budget, claiming trials, and retrying the trials of dead or preempted workers.

Everything here that must be atomic across workers happens under the storage lock
(``Storage.claim_lock``), which SQLite, PostgreSQL and journal files all honour.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig
from sft_optuna.coordination.heartbeat import fail_stale_trials
from sft_optuna.coordination.storage import Storage
from sft_optuna.search.samplers import make_sampler
from sft_optuna.search.space import is_grid, suggest

__all__ = ["budget_used", "claim_trial", "raced", "recover_trials", "retries_due", "study_done"]

log = logging.getLogger(__name__)


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    return {int(t.user_attrs[attrs.RETRY_OF]) for t in trials if attrs.RETRY_OF in t.user_attrs}


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count against the budget: finished (any state) or running, minus failures retried.

    A failed trial that was retried is replaced by its retry, so a crash does not eat budget.
    """
    return len(_counted(trials))


def _counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    retried = _retried_numbers(trials)
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return [
        t
        for t in trials
        if t.state in states and t.number not in retried and t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
    ]


def retries_due(trials: Sequence[FrozenTrial], max_retries: int) -> list[FrozenTrial]:
    """Failed trials to retry: their worker died (no reason recorded) or was preempted, and retries remain."""
    retried = _retried_numbers(trials)
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in retried
        and t.user_attrs.get(attrs.REASON) in (None, *attrs.RETRYABLE_REASONS)
        and int(t.user_attrs.get(attrs.RETRY, 0)) < max_retries
    ]


def study_done(trials: Sequence[FrozenTrial], config: StudyConfig) -> bool:
    """No work is left, now or later: nothing running (its worker may still die), queued or due for a retry,
    and the budget spent (or, for a grid, every point claimed)."""
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    if retries_due(trials, config.budget.max_retries):
        return False
    return is_grid(config) or budget_used(trials) >= config.budget.n_trials


def _enqueue_retries(study: optuna.Study, config: StudyConfig, alive: Collection[int] = ()) -> None:
    fail_stale_trials(study, config.heartbeat.grace_period, alive)
    trials = study.get_trials(deepcopy=False)
    for t in retries_due(trials, config.budget.max_retries):
        lineage = int(t.user_attrs.get(attrs.LINEAGE, t.number))
        log.warning("retrying trial %d (lineage %d) with the same parameters", t.number, lineage)
        study.enqueue_trial(
            t.params,
            user_attrs={
                attrs.LINEAGE: lineage,
                attrs.RETRY_OF: t.number,
                attrs.RETRY: int(t.user_attrs.get(attrs.RETRY, 0)) + 1,
            },
            skip_if_exists=False,
        )


def recover_trials(study: optuna.Study, config: StudyConfig, storage: Storage, alive: Collection[int] = ()) -> None:
    """Fail trials of dead workers and queue their retries (under the storage lock); ``alive``: our own."""
    with storage.claim_lock(config.name):
        _enqueue_retries(study, config, alive)


def claim_trial(study: optuna.Study, config: StudyConfig, storage: Storage) -> optuna.Trial | None:
    """Start the next trial of the study, or None when the budget (or the grid) is spent.

    Under the storage lock: retry dead workers' trials, count the budget (running trials included, so N
    workers never overshoot), then take a queued trial or ask the sampler for a new point — and suggest its
    parameters before letting go, so a concurrent TPE sees them as running (constant liar).
    """
    with storage.claim_lock(config.name) as hold:
        _enqueue_retries(study, config)
        trials = study.get_trials(deepcopy=False)
        if budget_used(trials) >= config.budget.n_trials:
            return None
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if is_grid(config) and not waiting:
            return None  # every grid point was claimed once; the grid is done
        study.sampler = make_sampler(config.sampler, len(trials))
        trial = study.ask()
        suggest(trial, config.search_space)
    if hold.lost and raced(study.get_trials(deepcopy=False), trial.number, config.budget.n_trials):
        log.warning("trial %d: the claim lock was lost mid-claim and another claim won; dropping it", trial.number)
        trial.set_user_attr(attrs.REASON, attrs.CLAIM_RACED)
        study.tell(trial, state=TrialState.FAIL)
        return claim_trial(study, config, storage)
    return trial


def raced(trials: Sequence[FrozenTrial], number: int, n_trials: int) -> bool:
    """Is trial ``number`` excess, claimed while another worker claimed too (the lock having been lost)?

    Excess: a second retry of the same failed trial (the lower number keeps it), or a trial over the budget
    (the newest counted trials are the excess ones). Only PostgreSQL's lock can be lost, and there Optuna
    hands each queued trial (a grid point) to one worker (a row lock), so grid points cannot be claimed twice
    this way. (On SQLite Optuna can hand one queued trial to two workers; there the file lock is never lost.)
    """
    mine = trials[number]
    retry_of = mine.user_attrs.get(attrs.RETRY_OF)
    counted = _counted(trials)
    if retry_of is not None and any(
        t.user_attrs.get(attrs.RETRY_OF) == retry_of and t.number < number
        for t in trials
        if t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
    ):
        return True
    excess = len(counted) - n_trials
    return excess > 0 and number in {t.number for t in counted[-excess:]}
