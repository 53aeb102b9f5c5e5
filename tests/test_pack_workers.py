"""``worker --pack K``: real worker processes training several trials at once, fused where their shapes match."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_resumed_from_checkpoint, spawn_worker, stored_trials, study_dict, wait_for
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main

pytestmark = pytest.mark.slow


def test_a_packed_worker_runs_the_budget_several_trials_at_a_time(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    # two batch sizes: trials of one fuse, a trial of the other trains in a group of its own beside them
    cfg = study_dict(
        folder_root,
        budget={"n_trials": 4},
        search_space={
            "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
            "batch_size": {"type": "categorical", "choices": [16, 32]},
        },
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    proc = spawn_worker(sqlite_url, "t", tmp_path / "ck", "--pack", "3")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "3 trials at a time" in out
    fused = re.search(r"(\d+) training steps of trials in (\d+) fused steps", out)
    assert fused is not None and int(fused[1]) > int(fused[2]), out[-3000:]  # some steps trained several trials
    trials = stored_trials(sqlite_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, out[-3000:]
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2]
        assert [h["epoch"] for h in t.user_attrs[attrs.HISTORY]] == [1, 2]
        assert t.value == max(t.intermediate_values.values())
    # they ran side by side: the first three started before any of them finished
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_start and t.datetime_complete)
    first = spans[:3]
    assert max(start for start, _ in first) < min(end for _, end in first)


def test_a_killed_packed_worker_leaves_every_trial_to_resume_from_its_checkpoint(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    cfg = study_dict(
        folder_root, budget={"n_trials": 2}, train={"epochs": 12}, heartbeat={"interval": 0.5, "grace_period": 2}
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    proc = spawn_worker(sqlite_url, "t", ckpt, "--pack", "2")
    wait_for(lambda: all((ckpt / "t" / f"trial-{n}.pt").is_file() for n in (0, 1)), 180, "both trials' checkpoints")
    proc.kill()
    proc.communicate(timeout=30)
    dead = stored_trials(sqlite_url)
    assert [t.state for t in dead] == [TrialState.RUNNING] * 2

    log = tmp_path / "second.log"
    with log.open("w") as fh:
        second = spawn_worker(sqlite_url, "t", ckpt, "--pack", "2", stdout=fh)
        assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    trials = stored_trials(sqlite_url)
    states = sorted((t.state for t in trials), key=lambda s: s.name)
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2, log.read_text()[-3000:]
    for old in dead:
        retry = next(t for t in trials if t.user_attrs.get(attrs.RETRY_OF) == old.number)
        assert retry.state == TrialState.COMPLETE and retry.params == old.params
        assert_resumed_from_checkpoint(retry, old, 12)


def test_ctrl_c_stops_every_slot_after_its_epoch_and_each_trial_resumes(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    cfg = study_dict(folder_root, budget={"n_trials": 2}, train={"epochs": 12})
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    proc = spawn_worker(sqlite_url, "t", ckpt, "--pack", "2")
    wait_for(lambda: all((ckpt / "t" / f"trial-{n}.pt").is_file() for n in (0, 1)), 180, "both trials' checkpoints")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped = stored_trials(sqlite_url)[:2]  # and their retries, queued
    assert [t.state for t in stopped] == [TrialState.FAIL] * 2, out[-3000:]
    assert all(t.user_attrs[attrs.REASON] == attrs.INTERRUPTED for t in stopped)

    again = spawn_worker(sqlite_url, "t", ckpt, "--pack", "2")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    trials = stored_trials(sqlite_url)
    for old in stopped:
        retry = next(t for t in trials if t.user_attrs.get(attrs.RETRY_OF) == old.number)
        assert retry.state == TrialState.COMPLETE
        assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] == len(old.intermediate_values) >= 1


def test_ctrl_c_twice_stops_a_packed_worker_at_once_and_leaves_no_trial_running(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    # 48 px: epochs of several seconds, so that the second Ctrl-C lands inside one
    cfg = study_dict(
        folder_root, budget={"n_trials": 2}, model={"image_size": 48}, train={"epochs": 12}, data={"image_size": 16}
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    proc = spawn_worker(sqlite_url, "t", ckpt, "--pack", "2")
    wait_for(lambda: all((ckpt / "t" / f"trial-{n}.pt").is_file() for n in (0, 1)), 180, "both trials' checkpoints")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "terminate called" not in out, out[-3000:]  # the process never exits under a training thread
    trials = stored_trials(sqlite_url)
    assert not [t for t in trials if t.state == TrialState.RUNNING], out[-3000:]
    assert [t.user_attrs.get(attrs.REASON) for t in trials[:2]] == [attrs.INTERRUPTED] * 2, out[-3000:]
