"""The stale-trial watcher: a worker that stopped beating loses its trial to a retry; live ones keep theirs."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from conftest import study_dict
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.coordination.claims import recover_trials, study_done
from sft_optuna.coordination.heartbeat import BEAT_ATTR, MAX_STRETCH, StaleTrials, Watcher
from sft_optuna.coordination.storage import open_storage
from sft_optuna.study import create_study


def test_an_old_heartbeat_is_failed_and_retried_while_fresh_and_own_trials_are_not(
    tmp_path: Path, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_config(study_dict(tmp_path, budget={"n_trials": 3}, heartbeat={"interval": 1, "grace_period": 5}))
    study, _ = create_study(config, open_storage(storage_url))
    dead, fresh, own = (study.ask() for _ in range(3))
    for trial in (dead, fresh, own):
        trial.suggest_float("lr", 0.01, 0.1, log=True)
    now = time.time()
    beats = study._storage
    beats.set_trial_system_attr(dead._trial_id, BEAT_ATTR, now - 60)  # its worker died a minute ago
    beats.set_trial_system_attr(fresh._trial_id, BEAT_ATTR, now - 1)
    beats.set_trial_system_attr(own._trial_id, BEAT_ATTR, now - 60)  # ours, old only because of an outage

    assert main(["--storage", storage_url, "status", "t"]) == 0
    out = capsys.readouterr().out
    stale = [line for line in out.splitlines() if "no heartbeat for" in line]
    assert len(stale) == 2 and stale[0].startswith("running: trial 0") and stale[1].startswith("running: trial 2")
    assert "running: trial 1 starting (0/2 epochs)" in out, "a trial that reported no epoch yet is starting"

    reads = []
    read = study._storage.get_all_trials
    study._storage.get_all_trials = lambda *a, **k: reads.append(1) or read(*a, **k)  # type: ignore[method-assign]
    evidence = StaleTrials(config.heartbeat.grace_period, study._storage.health)
    assert recover_trials(study, config, evidence, alive={own.number}) == 3, "the running trials it saw"
    assert len(reads) == 1, "a watcher's pass reads the study once"
    del study._storage.get_all_trials
    assert all(t.state == TrialState.RUNNING for t in study.get_trials()), "an old beat by the clock proves nothing"
    beats.set_trial_system_attr(fresh._trial_id, BEAT_ATTR, time.time())  # the live worker beats on
    time.sleep(config.heartbeat.grace_period + 0.2)
    beats.set_trial_system_attr(fresh._trial_id, BEAT_ATTR, time.time())
    recover_trials(study, config, evidence, alive={own.number})
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    (retry,) = trials[3:]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == trials[0].params
    assert retry.user_attrs[attrs.RETRY_OF] == 0 and retry.user_attrs[attrs.LINEAGE] == 0
    assert retry.user_attrs[attrs.RETRY] == 1
    # a second pass changes nothing: the dead trial is retried once
    recover_trials(study, config, evidence, alive={own.number})
    assert len(study.get_trials()) == 4


def test_a_study_is_done_only_when_nothing_runs_waits_or_is_due_for_a_retry(tmp_path: Path) -> None:
    config = parse_config(study_dict(tmp_path, budget={"n_trials": 1, "max_retries": 1}))
    study = optuna.create_study()
    trial = study.ask()
    assert not study_done(study.get_trials(), config), "the budget is spent, but the trial may lose its worker"
    trial.set_user_attr(attrs.REASON, "interrupted")
    study.tell(trial, state=TrialState.FAIL)
    assert not study_done(study.get_trials(), config), "an interrupted last trial is due for a retry"
    study.enqueue_trial({}, user_attrs={attrs.RETRY_OF: 0, attrs.RETRY: 1, attrs.LINEAGE: 0})
    assert not study_done(study.get_trials(), config), "its retry is queued"
    retry = study.ask()
    study.tell(retry, 0.5)
    assert study_done(study.get_trials(), config)


def test_with_many_workers_each_watches_less_often_and_the_cluster_about_8_times_per_interval() -> None:
    watcher = Watcher(10.0, lambda: None, "w")
    for running, stretch in [(None, 1), (0, 1), (8, 1), (16, 2), (24, 3), (32, 4), (512, MAX_STRETCH)]:
        waits = [watcher.next_wait(running) for _ in range(200)]
        assert 7.5 * stretch <= min(waits) and max(waits) <= 12.5 * stretch, (running, min(waits), max(waits))
    # the timer follows it: seeing 32 running trials, a 0.1 s watcher waits 0.3-0.5 s between its checks
    calls: list[float] = []
    with Watcher(0.1, lambda: calls.append(time.monotonic()) or 32, "w"):
        time.sleep(1.3)
    assert 1 <= len(calls) <= 5, calls
