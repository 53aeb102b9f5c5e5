"""Trials that go wrong end with a reason; the worker goes on, or stops cleanly when the node is broken."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import PYTHON, study_dict, worker_env
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.train import EpochResult, Trainer


def _run(url: str, path: Path, *extra: str) -> int:
    return main(["--storage", url, "run", str(path), "--device", "cpu", "--checkpoint-dir", "none", *extra])


def _fake_epoch(val_acc: float) -> Callable[[Trainer], EpochResult]:
    def run_epoch(self: Trainer) -> EpochResult:
        self.epoch += 1
        result = EpochResult(self.epoch, 1.0, 0.5, val_acc, 0.1, 0.01, 100.0, 1.0)
        self.history.append(result)
        return result

    return run_epoch


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1.5])
def test_a_non_accuracy_value_fails_the_trial_and_never_becomes_best(
    bad: float,
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Trainer, "run_epoch", _fake_epoch(bad))
    # report() itself refuses nan/inf in some Optuna versions; either way the trial must end FAIL
    assert _run(sqlite_url, write_study(study_dict(folder_root, budget={"n_trials": 2}))) == 0
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs[attrs.REASON].startswith(("invalid", "error")) for t in trials)


def test_many_failures_in_a_row_make_the_worker_exit_non_zero(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Trainer) -> EpochResult:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Trainer, "run_epoch", broken)
    assert _run(sqlite_url, write_study(study_dict(folder_root, budget={"n_trials": 20}))) == 1
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.FAIL for t in trials)
    assert "illegal memory access" in trials[0].user_attrs[attrs.REASON]


def test_system_exit_in_a_trial_never_leaves_it_running(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exits(self: Trainer) -> EpochResult:
        sys.exit(3)

    monkeypatch.setattr(Trainer, "run_epoch", exits)
    with pytest.raises(SystemExit):
        _run(sqlite_url, write_study(study_dict(folder_root)))
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]


def test_diverged_training_is_pruned_with_its_reason(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    cfg = study_dict(
        folder_root,
        budget={"n_trials": 1},
        search_space={"lr": {"type": "categorical", "choices": [1.0e30]}},
        train={"momentum": 0.0, "epochs": 2},
    )
    assert _run(sqlite_url, write_study(cfg)) == 0
    (trial,) = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert trial.state == TrialState.PRUNED and trial.user_attrs[attrs.REASON].startswith("diverged")


def test_a_full_disk_under_sqlite_stops_the_worker_cleanly(
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = optuna.trial.Trial.report

    def full(self: optuna.trial.Trial, value: float, step: int) -> None:
        if step == 2:
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))
        real(self, value, step)

    monkeypatch.setattr(optuna.trial.Trial, "report", full)
    assert _run(sqlite_url, write_study(study_dict(folder_root))) == 3
    err = capsys.readouterr().err
    assert "disk is full" in err and "worker stopped" in err and "Traceback" not in err
    (trial,) = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    # left RUNNING on purpose: its heartbeat goes stale and the next worker retries it from the checkpoint
    assert trial.state == TrialState.RUNNING and trial.intermediate_values == {1: trial.intermediate_values[1]}


@pytest.mark.slow
def test_launch_runs_one_prefixed_worker_per_slot_and_forwards_sigterm(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    cfg = study_dict(folder_root, budget={"n_trials": 4}, train={"epochs": 6})
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "sft_optuna",
            "--storage",
            sqlite_url,
            "launch",
            "t",
            "--gpus",
            "cpu",
            "--workers-per-gpu",
            "2",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
        if sum(len(t.intermediate_values) >= 1 for t in trials) >= 2:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "[cpu.0]" in out and "[cpu.1]" in out
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert all(t.state != TrialState.RUNNING for t in trials)
    interrupted = [t for t in trials if t.user_attrs.get(attrs.REASON) == "interrupted"]
    assert len(interrupted) == 2, "each worker stopped its trial after the epoch, resumable"


def test_launch_refuses_bad_gpu_lists(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--storage", sqlite_url, "launch", "t", "--gpus", "0,x"]) == 2
    assert "--gpus '0,x'" in capsys.readouterr().err
