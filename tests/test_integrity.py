"""A result is bound to what produced it and a node's fault is never the trial's: checkpoints across studies,
a checkpoint disk that fills up, a sampler that raises while suggesting."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import run_on_cpu, spawn_worker, stored_trials, study_dict
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.coordination.checkpoints import CheckpointStore, owner
from sft_optuna.coordination.claims import claim_trial
from sft_optuna.coordination.storage import open_storage
from sft_optuna.errors import NodeFault
from sft_optuna.study import create_study


def test_a_new_study_under_an_old_name_never_resumes_the_old_studys_checkpoint(
    folder_root: Path,
    write_study: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ckpt = tmp_path / "ck"  # one checkpoint directory for both, as with the default ./checkpoints
    old_url = f"sqlite:///{tmp_path / 'old.db'}"
    old = study_dict(folder_root, budget={"n_trials": 1}, train={"epochs": 6})
    assert main(["--storage", old_url, "create", str(write_study(old, "old.yaml"))]) == 0
    worker = spawn_worker(old_url, "t", ckpt)
    deadline = time.monotonic() + 120
    while not (ckpt / "t" / "trial-0.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)  # the old study's trial 0 leaves its checkpoint behind
    worker.communicate()
    assert (ckpt / "t" / "trial-0.pt").exists()

    # the database is gone (or another one is used); a study of the same name, another lr range
    new_url = f"sqlite:///{tmp_path / 'new.db'}"
    new = study_dict(
        folder_root,
        budget={"n_trials": 1},
        train={"epochs": 2},
        search_space={"lr": {"type": "float", "low": 0.001, "high": 0.002, "log": True}},
    )
    assert main(run_on_cpu(new_url, write_study(new, "new.yaml"), ckpt)) == 0
    err = caplog.text
    (trial,) = stored_trials(new_url)
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs[attrs.RESUMED_FROM_EPOCH] == 0, "it resumed another study's weights"
    assert sorted(trial.intermediate_values) == [1, 2]
    assert "not by this trial" in err and "ignored" in err, err[-3000:]


def test_a_checkpoint_of_other_parameters_is_ignored_and_one_of_the_same_is_restored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "t")
    mine = owner("study-a", {"lr": 0.01})
    store.save(0, {"epoch": 3}, mine)
    assert store.load(0, torch.device("cpu"), mine) == {"epoch": 3}
    assert store.load(0, torch.device("cpu"), owner("study-a", {"lr": 0.02})) is None
    assert store.load(0, torch.device("cpu"), owner("study-b", {"lr": 0.01})) is None


def test_a_full_checkpoint_disk_keeps_the_last_good_checkpoint_and_gives_the_trial_back(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    """torch's zip writer raises RuntimeError ("unexpected pos"), not OSError, on a full disk; /dev/full is one."""
    ckpt = tmp_path / "ck"
    good = ckpt / "t" / "trial-0.pt"
    partial = ckpt / "t" / f".trial-0.pt.{os.getpid()}.tmp"  # where this process writes its next checkpoint
    cfg = study_dict(folder_root, budget={"n_trials": 1, "max_retries": 2}, train={"epochs": 6})
    study_file = write_study(cfg)

    def fill_the_disk() -> None:  # once the first checkpoint is there, the next write meets a full disk
        deadline = time.monotonic() + 120
        while not good.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        partial.symlink_to("/dev/full")

    filler = threading.Thread(target=fill_the_disk)
    filler.start()
    code = main(run_on_cpu(sqlite_url, study_file, ckpt))
    filler.join()
    assert code == 1, "a node whose checkpoint disk is full stops non-zero"
    trials = stored_trials(sqlite_url)
    first = trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs[attrs.REASON] == attrs.NODE_FAULT
    assert "cannot write checkpoint" in first.user_attrs[attrs.NODE_FAULT_DETAIL]
    assert [t.state for t in trials[1:]] == [TrialState.WAITING], "given back: its retry is queued"
    assert good.exists(), "the last good checkpoint is kept"
    assert torch.load(good, weights_only=False)["epoch"] >= 1
    assert not partial.exists() and not list((ckpt / "t").glob("*.tmp")), "no partial file is left"


class _BrokenSampler(optuna.samplers.RandomSampler):
    def sample_independent(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("'<=' not supported between instances of 'str' and 'int'")


def test_a_sampler_that_raises_while_suggesting_leaves_no_running_trial(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(study_dict(tmp_path, budget={"n_trials": 2}))
    study, _ = create_study(config, open_storage(sqlite_url))
    # the claim makes each trial's sampler from the study's: here one that raises at its first suggest
    monkeypatch.setattr("sft_optuna.coordination.claims.sampler_for_trial", lambda *a: _BrokenSampler())
    with pytest.raises(NodeFault, match="the sampler failed suggesting trial 0"):
        claim_trial(study, config)
    trials = study.get_trials()
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[attrs.REASON] == attrs.NODE_FAULT
    assert any(t.user_attrs.get(attrs.RETRY_OF) == 0 and t.state == TrialState.WAITING for t in trials)


def test_the_storage_raises_as_optuna_does_on_a_finished_trial_and_pickles(storage_url: str) -> None:
    """What Optuna's own storage suite found: a user's joblib or spawned process around ``optuna.load_study``
    needs the storage to pickle; ``copy.copy`` must not recurse; RUNNING on a finished trial raises."""
    import copy
    import pickle

    storage = open_storage(storage_url).optuna
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
    assert copy.copy(storage).get_trial(trial._trial_id).value == 0.5
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.get_trial(trial._trial_id).value == 0.5
    assert clone.get_trial_id_from_study_id_trial_number(study._study_id, 0) == trial._trial_id


def test_a_trials_own_os_error_is_its_error_not_a_storage_outage(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only storage and transport errors are outages: a FileNotFoundError in training code fails the trial."""

    def missing(self: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/data/gone.jpg")

    monkeypatch.setattr("sft_optuna.training.trainer.Trainer.run_epoch", missing)
    cfg = study_dict(folder_root, budget={"n_trials": 1})
    assert main(run_on_cpu(sqlite_url, write_study(cfg), "none")) == 0
    (trial,) = [t for t in stored_trials(sqlite_url) if t.state != TrialState.WAITING]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[attrs.REASON].startswith("error: FileNotFoundError"), trial.user_attrs


def test_a_blip_shorter_than_a_second_does_not_void_a_watchers_evidence_and_an_outage_does() -> None:
    from sft_optuna.coordination.retrying import OUTAGE_EVIDENCE_S, Health

    health = Health()
    before = health.outage_marker()
    health.failed()  # a deadlock retried at once
    health.succeeded()
    assert health.outage_marker() == before, "a blip restarted every clock: frequent ones would hide the dead"
    health.failed()
    time.sleep(OUTAGE_EVIDENCE_S + 0.1)
    assert health.outage_marker()[1], "an outage going on is seen while it lasts"
    health.succeeded()
    assert health.outage_marker() == (before[0] + 1, False)


def test_a_decided_trial_is_never_retried_and_a_wrong_verdict_revives_a_spent_lineage(
    tmp_path: Path, sqlite_url: str
) -> None:
    from sft_optuna.coordination.claims import queue_retry, recover_trials, retries_due
    from sft_optuna.coordination.heartbeat import StaleTrials

    config = parse_config(
        study_dict(tmp_path, budget={"n_trials": 3, "max_retries": 0}, heartbeat={"interval": 0.5, "grace_period": 1})
    )
    study, _ = create_study(config, open_storage(sqlite_url))
    pruned, dead = (claim_trial(study, config) for _ in range(2))
    assert pruned is not None and dead is not None
    pruned.set_user_attr(attrs.REASON, "pruned at epoch 2")  # decided; its worker died before telling it
    study.tell(pruned, state=TrialState.FAIL)
    queue_retry(study, config, study._storage.get_trial(pruned._trial_id))
    study.tell(dead, state=TrialState.FAIL)  # as a watcher does: no reason
    trials = study.get_trials()
    assert not any(attrs.RETRY_OF in t.user_attrs for t in trials), "a decided trial was retried"
    assert retries_due(trials, 0) == [], "max_retries 0: a dead worker's trial has no retry left"
    study._storage.set_study_system_attr(study._study_id, f"{attrs.WRONG_VERDICT}{dead.number}", True)
    time.sleep(config.heartbeat.grace_period + 0.1)
    recover_trials(study, config, StaleTrials(config.heartbeat.grace_period, study._storage.health))
    retries = [t for t in study.get_trials() if attrs.RETRY_OF in t.user_attrs]
    assert [t.user_attrs[attrs.RETRY_OF] for t in retries] == [dead.number], "the wrong verdict gets its retry"
