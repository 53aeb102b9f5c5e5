"""The study-wide budget, claiming trials, and retrying the trials of dead or preempted workers — without a lock.

Everything goes through Optuna's storage API alone, so it works the same on SQLite, PostgreSQL, journal files
and Optuna's gRPC proxy, and no claim waits for another:

- **The budget is a queue.** Each of the ``n_trials`` budget slots is a WAITING trial (user attr ``slot``);
  a claim takes one with the WAITING -> RUNNING change Optuna's own ``ask()`` uses, which has one winner on
  every storage (a guarded ``UPDATE`` on SQL: see ``RetryingStorage.set_trial_state_values``); retries first,
  then the lowest slot, and after losing that one others in a random order (no herd). The queue is
  kept a couple of chunks ahead of the workers, not materialised whole: whoever takes the first slot of chunk
  ``c`` queues chunk ``c + 2`` (10,000 WAITING trials would be re-read by every claim). A grid queues its
  points, once, when the study is created.
- **A retry is queued by whoever fails the dead trial**: the RUNNING -> FAIL change has one winner, and only
  the winner queues the retry (a worker failing its own trial — interrupted, node fault — wins its own).
- **Duplicates are dropped when claimed.** A retry of a trial that already has an earlier retry (a crash
  between failing a trial and queuing its retry, seconds apart; journal files, whose failure is not
  exclusive) is failed as ``claim raced`` — not counted, not retried — by the worker that takes it; so is the
  later of two ASHA promotions of one paused trial made at the same instant.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig
from sft_optuna.coordination.heartbeat import StaleTrials, fail_stale_trials
from sft_optuna.coordination.retrying import RetryingStorage, is_storage_error
from sft_optuna.errors import NodeFault
from sft_optuna.search.asha import due_promotion, pause_epochs, reduction_factor, sampler_view, study_rungs
from sft_optuna.search.samplers import sampler_for_trial
from sft_optuna.search.space import grid_points, is_grid, suggest

__all__ = [
    "QUEUE_CHUNK",
    "budget_used",
    "claim_trial",
    "epochs_used",
    "more_to_claim",
    "queue_budget",
    "queue_retry",
    "raced",
    "recover_trials",
    "retries_due",
    "retries_used",
    "slots_to_queue",
    "study_done",
    "unretried",
    "wrong_verdicts",
]

log = logging.getLogger(__name__)

QUEUE_CHUNK = 32
"""Budget slots queued at a time; the queue holds up to two chunks ahead of the workers (every claim re-reads
the queued trials: more costs every claim, fewer makes concurrent claims find it empty)."""
REFILL_PATIENCE_S = 30.0
"""How long a claim that finds no queued trial it can take, while budget slots are still to be queued (whoever
took the first slot of a chunk is queuing the next one), keeps trying before it returns None; its tries back off
from 0.1 s to 2 s with jitter (each reads the study). At a cold start of more workers than the queue holds, the
rest get their trials seconds later, not a poll interval later."""
PROMOTION_SETTLE_S = 0.2
"""A new promotion waits this long before checking it is the only one of its paused trial (the earlier wins),
so that a promotion created by another worker in the same instant has committed."""


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    return {
        int(t.user_attrs[attrs.RETRY_OF])
        for t in trials
        if attrs.RETRY_OF in t.user_attrs and t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
    }


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count against the budget: finished (any state) or running, minus failures retried.

    A failed trial that was retried is replaced by its retry, so a crash does not eat budget.
    """
    return len(_counted(trials))


def _counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """One per configuration started: promotions continue a configuration, retries replace a failed attempt."""
    retried = _retried_numbers(trials)
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return [
        t
        for t in trials
        if t.state in states
        and t.number not in retried
        and t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
        and attrs.PROMOTED_FROM not in t.user_attrs
    ]


def _counts(t: FrozenTrial, wrong: Collection[int]) -> bool:
    """Does failed trial ``t`` use up one of its lineage's retries? Only a failure of the trial: its worker
    died while the storage was reachable (a stale heartbeat, no reason; unless the worker turned out alive) or
    its node failed. An operator's stop, a storage outage, a dropped duplicate never count."""
    return t.user_attrs.get(attrs.REASON) not in attrs.UNCOUNTED_REASONS and t.number not in wrong


def retries_used(trials: Sequence[FrozenTrial], lineage: int, wrong: Collection[int] = ()) -> int:
    """The failures of lineage ``lineage`` that count against ``max_retries`` (see :func:`_counts`)."""
    return sum(
        1
        for t in trials
        if t.state == TrialState.FAIL
        and attrs.lineage(t) == lineage
        and t.user_attrs.get(attrs.REASON) in (None, *attrs.RETRYABLE_REASONS)
        and _counts(t, wrong)
    )


def wrong_verdicts(study: optuna.Study) -> set[int]:
    """Trials failed as stale whose live workers said the verdict was wrong (:data:`attrs.WRONG_VERDICT`)."""
    prefix = attrs.WRONG_VERDICT
    notes = study._storage.get_study_system_attrs(study._study_id)
    return {int(k[len(prefix) :]) for k in notes if k.startswith(prefix)}


def unretried(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Failed trials of a retryable kind (a dead worker, a stop, an outage, a node fault) without a retry yet,
    whatever their lineage's retries: a wrong verdict may still give them one (see :func:`retries_due`)."""
    retried = _retried_numbers(trials)
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in retried
        and t.user_attrs.get(attrs.REASON) in (None, *attrs.RETRYABLE_REASONS)
    ]


def retries_due(trials: Sequence[FrozenTrial], max_retries: int, wrong: Collection[int] = ()) -> list[FrozenTrial]:
    """Failed trials still without their retry: their worker died (no reason recorded) or was preempted, and
    retries remain. Normally the winner of the failure queues the retry at once (see :func:`queue_retry`).
    ``wrong``: :func:`wrong_verdicts`, read by the caller whenever :func:`unretried` finds any."""
    return [t for t in unretried(trials) if retries_used(trials, attrs.lineage(t), wrong) <= max_retries]


def _trained(t: FrozenTrial) -> int:
    """Epochs trial ``t`` trained itself (a resumed trial re-reports the epochs it restored; not trained)."""
    return max(len(t.intermediate_values) - int(t.user_attrs.get(attrs.RESUMED_FROM_EPOCH, 0)), 0)


def _planned(t: FrozenTrial, config: StudyConfig) -> int:
    """Epochs a running trial will have trained at its next stop: its end, or with ASHA its next rung."""
    start = int(t.user_attrs.get(attrs.RESUMED_FROM_EPOCH, 0))
    target = _next_stop(config, int(t.user_attrs.get(attrs.FROM_RUNG, -1)))
    return max(target - start, _trained(t))


def _next_stop(config: StudyConfig, from_rung: int) -> int:
    return min(pause_epochs(config, from_rung), default=config.train.epochs)


def epochs_used(trials: Sequence[FrozenTrial], config: StudyConfig) -> int:
    """Epochs the study has trained, and will have once its running trials reach their next stop."""
    return sum(
        _planned(t, config) if t.state == TrialState.RUNNING else _trained(t)
        for t in trials
        if t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
    )


def _epochs_left(trials: Sequence[FrozenTrial], config: StudyConfig) -> int | None:
    cap = config.budget.epochs
    return None if cap is None else cap - epochs_used(trials, config)


def study_done(trials: Sequence[FrozenTrial], config: StudyConfig, wrong: Collection[int] = ()) -> bool:
    """No work is left, now or later: nothing running (its worker may still die), queued or due for a retry,
    and the budget spent (or, for a grid, every point claimed). ``wrong``: as for :func:`retries_due`."""
    if any(t.state == TrialState.RUNNING for t in trials):
        return False
    left = _epochs_left(trials, config)
    if left is not None and left < _next_stop(config, -1) and _fitting_promotion(trials, config, left) is None:
        return True  # the epoch budget is spent: neither a new configuration nor a promotion fits
    if any(t.state == TrialState.WAITING for t in trials):
        return False
    if retries_due(trials, config.budget.max_retries, wrong):
        return False
    if _fitting_promotion(trials, config, left) is not None:
        return False
    return is_grid(config) or budget_used(trials) >= config.budget.n_trials


def _queue_chunk(study: optuna.Study, config: StudyConfig, chunk: int, skip: int = 0) -> None:
    """Queue the budget slots of ``chunk`` from slot ``skip`` on (those below are a warm start's, queued)."""
    first = max(chunk * QUEUE_CHUNK, skip)
    for slot in range(first, min((chunk + 1) * QUEUE_CHUNK, config.budget.n_trials)):
        study.enqueue_trial({}, user_attrs={attrs.SLOT: slot}, skip_if_exists=False)


def queue_budget(study: optuna.Study, config: StudyConfig, warm: Sequence[tuple[dict[str, Any], str]] = ()) -> None:
    """Queue a new study's budget: every grid point (up to ``n_trials``), or the first two chunks of slots —
    the first ``len(warm)`` of them with a warm start's parameters (``create --warm-start``; the sampler
    chooses what they leave out), all of which are queued now (a chunk's queuer skips slots already there)."""
    for slot, (params, source) in enumerate(warm[: config.budget.n_trials]):
        study.enqueue_trial(params, user_attrs={attrs.SLOT: slot, attrs.WARM_START: source}, skip_if_exists=False)
    if is_grid(config):
        points = grid_points(config.search_space)
        if len(points) > config.budget.n_trials:
            log.warning(
                "grid has %d points but the budget is %d trials: only the first %d will run",
                len(points),
                config.budget.n_trials,
                config.budget.n_trials,
            )
        for slot, params in enumerate(points[: config.budget.n_trials]):
            study.enqueue_trial(params, user_attrs={attrs.SLOT: slot}, skip_if_exists=False)
        return
    for chunk in (0, 1):
        _queue_chunk(study, config, chunk, skip=len(warm))


def _queue_ahead(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, trials: Sequence[FrozenTrial]) -> None:
    """The first slot of chunk c queues chunk c + 2. A retry of it (``trials``: a fresh read) queues what its
    trial did not get to; a queuer stops as soon as its own trial is no longer running (frozen past the grace
    period, it was failed and retried: the retry queues the rest), so no slot is queued twice."""
    slot = int(trial.user_attrs.get(attrs.SLOT, -1))
    if is_grid(config) or slot < 0 or slot % QUEUE_CHUNK:
        return
    chunk = slot // QUEUE_CHUNK + 2
    first = chunk * QUEUE_CHUNK
    present = {int(t.user_attrs.get(attrs.SLOT, -1)) for t in trials}
    for s in range(first, min(first + QUEUE_CHUNK, config.budget.n_trials)):
        if s in present:
            continue
        if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            return
        study.enqueue_trial({}, user_attrs={attrs.SLOT: s}, skip_if_exists=False)


def _drop(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
    log.info("trial %d: %s; dropping it (not counted)", trial.number, why)
    trial.set_user_attr(attrs.REASON, attrs.CLAIM_RACED)
    study.tell(trial, state=TrialState.FAIL)


def claim_trial(study: optuna.Study, config: StudyConfig) -> optuna.Trial | None:
    """Start the next trial of the study: an ASHA promotion that is due, else a queued trial (a retry or a
    budget slot); None when there is neither (having waited up to :data:`REFILL_PATIENCE_S` for budget slots
    still to be queued).

    No lock: Optuna pops each queued trial for one worker. The sampler then suggests the slot's parameters
    (a retry or a grid point has them fixed); a concurrent TPE with ``constant_liar`` sees running trials.
    """
    epochs = study_rungs(config)
    patience = time.monotonic() + REFILL_PATIENCE_S
    delay = 0.1
    while True:
        left = None
        if epochs or config.budget.epochs is not None:
            trials = study.get_trials(deepcopy=False)
            left = _epochs_left(trials, config)
            paused = _fitting_promotion(trials, config, left) if epochs else None
            if paused is not None:
                trial = _promote(study, paused)
                if trial is not None:
                    return trial
                continue
        if left is not None and left < _next_stop(config, -1):
            return None  # the epoch budget cannot pay for another configuration
        trial, read = _pop(study)
        if trial is None:
            if not more_to_claim(read, config) or time.monotonic() + delay > patience:
                return None
            time.sleep(delay * random.uniform(0.5, 1.5))  # the queue is being refilled, or others took this read's
            delay = min(delay * 2, 2.0)
            continue
        fresh: Sequence[FrozenTrial] = ()
        if attrs.RETRY_OF in trial.user_attrs:  # retries are rare: a fresh read to drop a duplicate one
            fresh = study.get_trials(deepcopy=False)
            if raced(fresh, trial.number):
                _drop(study, trial, "a duplicate of an earlier queued trial")
                continue
        _queue_ahead(study, config, trial, fresh)
        # Seeded by the trial's number, known only now: Optuna samples at the first suggest, not in ask().
        study.sampler = sampler_for_trial(study.sampler, config.sampler, trial.number)
        storage = study._storage
        # The sampler sees the study as the pop read it a moment ago (one read per claim), one trial per lineage
        # (and under ASHA at one budget).
        serving = (
            storage.serving(study._study_id, sampler_view(read, config))
            if isinstance(storage, RetryingStorage)
            else nullcontext()
        )
        with serving:
            try:
                suggest(trial, config.search_space)
            except Exception as exc:
                if is_storage_error(exc):
                    raise  # RUNNING without beats: a watcher retries it
                _give_back_unsuggested(study, config, trial, exc)
        return trial


def _give_back_unsuggested(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, exc: Exception) -> None:
    """The sampler raised while suggesting a claimed trial: never leave it RUNNING. It is failed as this
    node's fault (retryable: its slot is not lost) and the worker stops with one line."""
    detail = f"the sampler failed suggesting trial {trial.number} ({type(exc).__name__}: {exc})"
    log.error("%s; giving the trial back", detail)
    trial.set_user_attr(attrs.REASON, attrs.NODE_FAULT)
    trial.set_user_attr(attrs.NODE_FAULT_DETAIL, detail[:500])
    study.tell(trial, state=TrialState.FAIL)
    queue_retry(study, config, study._storage.get_trial(trial._trial_id))
    raise NodeFault(f"{detail}; trial {trial.number} was given back") from None


def _pop(study: optuna.Study) -> tuple[optuna.Trial | None, list[FrozenTrial]]:
    """Take one queued trial (retries first) and return it (None if the queue is empty or every queued trial of
    the read was taken by others) with the read of the study it was chosen from.

    What Optuna's ``ask()`` does with a queue, minus its two habits that hurt many workers: every claimer
    walking the queue in the same order (at a cold start, claimer k loses k state changes before it wins),
    and creating a fresh trial when the queue is empty. Each WAITING -> RUNNING change has one winner on every
    storage."""
    storage = study._storage
    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    # The lowest first (so one worker alone takes them in order, reproducibly), then, having lost it to another
    # claimer, the others in a random order (claimers that share a read spread over the queue, not in a herd),
    # retries still first.
    order = sorted(waiting, key=lambda t: (attrs.RETRY_OF not in t.user_attrs, t.number))
    rest = order[1:]
    random.shuffle(rest)
    rest.sort(key=lambda t: attrs.RETRY_OF not in t.user_attrs)
    for t in [*order[:1], *rest]:
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id), trials
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None, trials


def more_to_claim(trials: Sequence[FrozenTrial], config: StudyConfig) -> bool:
    """Will a claim find a queued trial soon: one is queued (others may have taken it a moment ago; this read
    says), or budget slots are still to be queued?"""
    return bool(slots_to_queue(trials, config)) or any(t.state == TrialState.WAITING for t in trials)


def slots_to_queue(trials: Sequence[FrozenTrial], config: StudyConfig) -> int:
    """Budget slots not queued yet: the owners of earlier chunks will queue them (0 for a grid: queued whole)."""
    if is_grid(config):
        return 0
    present = {t.user_attrs[attrs.SLOT] for t in trials if attrs.SLOT in t.user_attrs}
    return max(config.budget.n_trials - len(present), 0)


def _fitting_promotion(trials: Sequence[FrozenTrial], config: StudyConfig, left: int | None) -> FrozenTrial | None:
    """The due ASHA promotion, if the epoch budget (``left``) pays for its epochs to the next rung."""
    epochs = study_rungs(config)
    if not epochs:
        return None
    paused = due_promotion(trials, epochs, reduction_factor(config))
    if paused is None or left is None:
        return paused
    k = int(paused.user_attrs[attrs.RUNG])
    return paused if _next_stop(config, k) - epochs[k] <= left else None


def _promote(study: optuna.Study, paused: FrozenTrial) -> optuna.Trial | None:
    """A RUNNING trial that continues ``paused`` (same parameters and lineage: it resumes from the lineage's
    checkpoint); None when another worker promoted it at the same instant (theirs is kept)."""
    lineage = attrs.lineage(paused)
    template = FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),
        datetime_complete=None,
        params=paused.params,
        distributions=paused.distributions,
        user_attrs={
            attrs.LINEAGE: lineage,
            attrs.PROMOTED_FROM: paused.number,
            attrs.FROM_RUNG: int(paused.user_attrs[attrs.RUNG]),
        },
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    trial = optuna.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))
    time.sleep(PROMOTION_SETTLE_S)
    if raced(study.get_trials(deepcopy=False), trial.number):
        _drop(study, trial, f"trial {paused.number} was promoted by another worker at the same instant")
        return None
    log.info("trial %d promotes trial %d (rung %d)", trial.number, paused.number, paused.user_attrs[attrs.RUNG])
    return trial


def raced(trials: Sequence[FrozenTrial], number: int) -> bool:
    """Is trial ``number`` a duplicate: a retry of a trial that has an earlier retry, or a slot (not a retry)
    that an earlier trial fills? The earlier one is kept; duplicates only arise from writes seconds apart
    (a crash between failing a trial and queuing its retry; journal files, whose failure is not exclusive)."""
    mine = next(t for t in trials if t.number == number)
    retry_of = mine.user_attrs.get(attrs.RETRY_OF)
    promoted_from = mine.user_attrs.get(attrs.PROMOTED_FROM)
    slot = mine.user_attrs.get(attrs.SLOT)
    for t in trials:
        if t.number >= number or t.user_attrs.get(attrs.REASON) == attrs.CLAIM_RACED:
            continue
        if retry_of is not None:
            if t.user_attrs.get(attrs.RETRY_OF) == retry_of:
                return True
        elif attrs.RETRY_OF in t.user_attrs:
            continue
        elif promoted_from is not None:
            if t.user_attrs.get(attrs.PROMOTED_FROM) == promoted_from:
                return True
        elif slot is not None and t.user_attrs.get(attrs.SLOT) == slot and attrs.PROMOTED_FROM not in t.user_attrs:
            return True
    return False


def queue_retry(
    study: optuna.Study,
    config: StudyConfig,
    failed: FrozenTrial,
    trials: Sequence[FrozenTrial] | None = None,
    wrong: Collection[int] | None = None,
) -> None:
    """Queue the retry of ``failed`` (same parameters, lineage and slot) if its lineage has retries left. Call
    it only after winning the trial's change to FAIL, so that each failure is retried once.

    ``max_retries`` bounds the failures of the trial (:func:`retries_used`), not its attempts: an operator's
    stop, an outage or a wrong verdict is retried whatever came before. ``trials``: a read of the study made
    a moment ago (else one is made); ``failed`` counts as FAIL whatever state that read saw it in."""
    reason = failed.user_attrs.get(attrs.REASON)
    if reason not in (None, *attrs.RETRYABLE_REASONS):
        # decided before its worker vanished (pruned, paused, its parameters failed, a dropped duplicate):
        # retrying it would run a configuration, a slot or a duplicate twice
        log.warning("trial %d failed with reason %r, which is not retried", failed.number, reason)
        return
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    wrong = wrong_verdicts(study) if wrong is None else wrong
    lineage = attrs.lineage(failed)
    others = [t for t in trials if t.number != failed.number]
    used = retries_used(others, lineage, wrong) + int(_counts(failed, wrong))
    if used > config.budget.max_retries:
        log.warning(
            "trial %d failed; no retries left (lineage %d: %d failures of %d allowed)",
            failed.number,
            lineage,
            used,
            config.budget.max_retries,
        )
        return
    retry = int(failed.user_attrs.get(attrs.RETRY, 0)) + 1
    log.warning(
        "retrying trial %d (lineage %d, retries used %d of %d) with the same parameters",
        failed.number,
        lineage,
        used,
        config.budget.max_retries,
    )
    user_attrs = {attrs.LINEAGE: lineage, attrs.RETRY_OF: failed.number, attrs.RETRY: retry}
    for key in (attrs.SLOT, attrs.PROMOTED_FROM, attrs.FROM_RUNG):  # a retry is what it retries
        if key in failed.user_attrs:
            user_attrs[key] = failed.user_attrs[key]
    study.enqueue_trial(failed.params, user_attrs=user_attrs, skip_if_exists=False)


def recover_trials(study: optuna.Study, config: StudyConfig, evidence: StaleTrials, alive: Collection[int] = ()) -> int:
    """Fail the trials of dead workers and queue the retries of those this call failed; ``alive``: our own.
    Returns the number of running trials seen (the watcher spaces its checks by it). One read of the study.

    A worker is dead only on ``evidence`` (see :class:`StaleTrials`): its beat did not advance across this
    watcher's own uninterrupted reads for a grace period. Also queues the retry of a failed trial whose worker
    died between failing it and queuing its retry, once a grace period has passed since it failed (a duplicate
    this might make is dropped when claimed).
    """
    grace = config.heartbeat.grace_period
    started = time.monotonic()  # before the read: a slow read must not age anyone's beat
    try:
        trials = study.get_trials(deepcopy=False)
    except Exception:
        evidence.restart()  # this watcher's own outage: no verdict on anyone
        raise
    stale = evidence.observe(trials, started, time.monotonic())
    for failed in fail_stale_trials(study, stale, grace, alive):
        queue_retry(study, config, failed, trials)
    cutoff = time.time() - grace
    # the trials failed above were RUNNING in this read, so not due: their retries are queued
    wrong = wrong_verdicts(study) if unretried(trials) else set()
    for t in retries_due(trials, config.budget.max_retries, wrong):
        # .timestamp(): SQL storages keep local naive times, journal files aware UTC ones; both compare right
        if t.datetime_complete is not None and t.datetime_complete.timestamp() < cutoff:
            log.warning("trial %d failed %s without a retry queued; queuing it", t.number, t.datetime_complete)
            queue_retry(study, config, t, trials, wrong)
    return sum(t.state == TrialState.RUNNING for t in trials)
