"""Heartbeats on every storage, and failing the trials of workers that stopped beating.

Optuna beats only inside ``study.optimize`` and only on RDB storages; our workers use ask/tell and also run on
journal files, so a trial's heartbeat is a system attribute its worker rewrites every ``interval`` seconds.
A RUNNING trial whose last beat is older than the grace period is failed (and then retried by the worker
loop). Beats use the workers' wall clocks: keep nodes NTP-synced; the grace period absorbs small skew.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = [
    "BEAT_ATTR",
    "MAX_STRETCH",
    "WATCHES_PER_INTERVAL",
    "Heartbeat",
    "StaleTrials",
    "Watcher",
    "fail_stale_trials",
    "last_beat",
    "watch_interval",
]

log = logging.getLogger(__name__)

BEAT_ATTR = "sft_optuna:heartbeat"


def last_beat(trial: optuna.trial.FrozenTrial) -> float:
    """Unix time of the trial's last heartbeat (its start if it never beat)."""
    beat = trial.system_attrs.get(BEAT_ATTR)
    if isinstance(beat, (int, float)):
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


class StaleTrials:
    """What one watcher has seen of other workers' beats: the evidence behind a verdict that a worker is gone.

    A RUNNING trial is stale only when its beat did not advance across this watcher's own successful reads of
    the study spanning at least ``grace_period`` seconds with no outage of this process between them (a failure
    streak of ``retrying.OUTAGE_EVIDENCE_S`` or more with no successful call; ``health``: every thread counts).
    A beat's age by the clock proves nothing: during an outage nobody's beats get through, and the first watcher
    back would fail every live worker's trial. So an outage of this process (a failure streak, a failed read)
    restarts every clock, and a watcher that just started has
    seen nothing yet: a dead worker's trial is failed about one grace period (plus a watch interval) after the
    storage became reachable to its watcher. Beat values are compared, never clocks: no skew between nodes
    matters. Times are ``time.monotonic()``, taken before and after each read: a slow read does not age a beat.

    >>> evidence = StaleTrials(grace_period=5.0)
    >>> evidence.observe([], read_started=0.0, read_ended=0.1)
    []
    """

    def __init__(self, grace_period: float, health: Any = None) -> None:
        self.grace_period = grace_period
        self.health = health
        self._seen: dict[int, tuple[Any, float]] = {}  # trial id -> (its beat, end of the read that first saw it)
        self._marker: tuple[int, bool] | None = None  # health's outage marker at the last read; None: restarted

    def restart(self) -> None:
        """Forget every clock (this process could not reach the storage)."""
        self._seen.clear()
        self._marker = None

    def observe(
        self, trials: Sequence[optuna.trial.FrozenTrial], read_started: float, read_ended: float
    ) -> list[tuple[optuna.trial.FrozenTrial, float]]:
        """Take one successful read of the study (``trials``, read between the two monotonic times); returns the
        RUNNING trials that are stale by the rule above, each with the seconds its beat is known not to have
        advanced while this watcher reached the storage."""
        marker = self.health.outage_marker() if self.health is not None else (0, False)
        if self._marker is None or marker != self._marker or marker[1]:
            self._seen.clear()  # an outage (or the first read): what was seen before proves nothing
        self._marker = marker
        stale = []
        running = set()
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            running.add(t._trial_id)
            beat = t.system_attrs.get(BEAT_ATTR)
            seen = self._seen.get(t._trial_id)
            if seen is None or seen[0] != beat:
                self._seen[t._trial_id] = (beat, read_ended)
            elif read_started - seen[1] >= self.grace_period:
                stale.append((t, read_started - seen[1]))
        for trial_id in list(self._seen):
            if trial_id not in running:
                del self._seen[trial_id]
        return stale


def fail_stale_trials(
    study: optuna.Study,
    stale: Sequence[tuple[optuna.trial.FrozenTrial, float]],
    grace_period: float,
    alive: Collection[int] = (),
) -> list[optuna.trial.FrozenTrial]:
    """Fail the ``stale`` trials (from :meth:`StaleTrials.observe`) except ``alive`` (trial numbers this process
    runs itself); returns those this call failed.

    Of several workers failing one trial at once, one wins the change to FAIL (the others get Optuna's
    UpdateFinishedTrialError), so the caller can queue exactly one retry per win.
    """
    failed = []
    storage = study._storage
    for t, silent in stale:
        if t.number in alive:
            continue
        # Lost: another watcher failed it, or its worker came back and finished it. Either is fine.
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        log.warning(
            "trial %d: its heartbeat did not advance for %.0f s while this worker reached the storage throughout "
            "(grace period %.0f s); failed (its worker is gone)",
            t.number,
            silent,
            grace_period,
        )
        failed.append(t)
    return failed


class _Periodic:
    """Calls ``fn`` every ``interval`` seconds in a daemon thread while the context is open."""

    def __init__(self, interval: float, fn: Callable[[], Any], name: str, first_after: float = 0.0) -> None:
        self.interval = interval
        self.fn = fn
        self.name = name
        self.first_after = first_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        if self.first_after and self._stop.wait(self.first_after):
            return
        while not self._stop.is_set():
            result = None
            try:
                result = self.fn()
            except Exception as exc:  # noqa: BLE001 - a storage outage must not kill the trial
                log.warning("%s failed: %s", self.name, exc)
            if self._stop.wait(self.next_wait(result)):
                return

    def next_wait(self, result: Any) -> float:
        """Seconds until the next call, given what this one returned."""
        return self.interval

    def __enter__(self) -> _Periodic:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Heartbeat(_Periodic):
    """Beats for one trial every ``interval`` seconds (the first beat at once)."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        super().__init__(interval, lambda: storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time()), "heartbeat")


def watch_interval(interval: float, grace_period: float) -> float:
    """How often each worker looks for silent trials: every half grace period (or every beat, if slower).

    Every worker reads every running trial when it looks: with hundreds of workers, looking at each beat
    would be most of the storage's load (and :class:`Watcher` stretches this with the number of workers). A
    dead worker's trial is still failed within about 1.5 grace periods."""
    return max(interval, grace_period / 2)


WATCHES_PER_INTERVAL = 8
"""With many workers, the study is looked at about this many times per watch interval in all, not once per
worker: each worker's interval stretches with the running trials it saw (up to :data:`MAX_STRETCH` times)."""
MAX_STRETCH = 4.0
"""The most a worker's watch interval stretches: when most of a large cluster dies at once, the survivors (their
intervals stretched for the cluster it was) still look within this many intervals."""


class Watcher(_Periodic):
    """Runs the stale-trial check on a timer, so a dead worker's trial is retried within about one grace
    period even while every other worker is busy with a long trial (Optuna only checks when a trial starts).

    ``fn`` returns the number of running trials it saw (or None). Each check reads every running trial, so
    with N workers each checking every interval the study would be read N times per interval (at 256
    workers through the proxy, as often as all the claims together); a worker that saw R running trials waits
    ``interval × min(max(1, R / 8), 4)``, jittered, so that the cluster still checks about 8 times per
    interval. The first check comes after a random half to whole interval: workers started together (a
    cluster's cold start) neither read every trial at once nor stay in step afterwards."""

    def __init__(self, interval: float, fn: Callable[[], int | None], name: str) -> None:
        super().__init__(interval, fn, name, first_after=interval * random.uniform(0.5, 1.0))

    def next_wait(self, result: Any) -> float:
        stretch = min(max(1.0, (result or 0) / WATCHES_PER_INTERVAL), MAX_STRETCH)
        return self.interval * stretch * random.uniform(0.75, 1.25)
