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
from conftest import PYTHON, started, study_dict, worker_env
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.training.trainer import EpochResult, Trainer


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
        raise ValueError("a bug in the training code that every trial hits")

    monkeypatch.setattr(Trainer, "run_epoch", broken)
    assert _run(sqlite_url, write_study(study_dict(folder_root, budget={"n_trials": 20}))) == 1
    trials = started(optuna.load_study(study_name="t", storage=sqlite_url))
    assert len(trials) == 5 and all(t.state == TrialState.FAIL for t in trials)
    assert "every trial hits" in trials[0].user_attrs[attrs.REASON]


def _flaky(fault: Callable[[], None]) -> Callable[[Trainer], EpochResult]:
    """run_epoch that raises ``fault`` in the first trial's second epoch, then trains normally."""
    real = Trainer.run_epoch
    calls = {"n": 0}

    def run_epoch(self: Trainer) -> EpochResult:
        calls["n"] += 1
        if calls["n"] == 2:
            fault()
        return real(self)

    return run_epoch


def _cuda_fault() -> None:
    raise RuntimeError("CUDA error: unspecified launch failure")


def _disk_full() -> None:
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["device", "checkpoint disk"])
def test_a_node_fault_inside_a_trial_gives_it_back_and_stops_the_worker(
    fault: str,
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: the trial failed with reason "error: ...", counted against the budget, never retried, and the
    # worker took the next trial on the same broken node.
    if fault == "device":
        monkeypatch.setattr(Trainer, "run_epoch", _flaky(_cuda_fault))
    else:
        import sft_optuna.coordination.checkpoints as checkpoints_mod

        real_save = checkpoints_mod.torch.save
        calls = {"n": 0}

        def save(obj: object, f: object) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                _disk_full()
            real_save(obj, f)  # type: ignore[arg-type]

        monkeypatch.setattr(checkpoints_mod.torch, "save", save)
    path = write_study(study_dict(folder_root, budget={"n_trials": 2}, train={"epochs": 3}))
    argv = ["--storage", sqlite_url, "run", str(path), "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "this node cannot run trials" in err and "trial 0 was given back" in err and "Traceback" not in err
    (first,) = started(optuna.load_study(study_name="t", storage=sqlite_url))
    assert first.state == TrialState.FAIL and first.user_attrs[attrs.REASON] == attrs.NODE_FAULT
    assert ("launch failure" if fault == "device" else "No space left") in first.user_attrs[attrs.NODE_FAULT_DETAIL]

    monkeypatch.undo()  # the node is mended: the next worker retries the trial from its checkpoint
    assert main(argv) == 0
    trials = started(optuna.load_study(study_name="t", storage=sqlite_url))
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    (retry,) = [t for t in trials if attrs.RETRY_OF in t.user_attrs]
    assert retry.user_attrs[attrs.RETRY_OF] == 0 and retry.params == first.params
    assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] == 1, "epoch 1 was checkpointed before the fault"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("weights file missing", "model.weights: {d}/missing.pt: no such file"),
        ("checkpoint dir is a file", "--checkpoint-dir {d}/ck: not a writable directory"),
        ("no such device", "--device mps: "),
        ("data missing", "image folder not found: expected {d}/nodata/train"),
    ],
)
def test_a_broken_node_stops_before_its_first_claim_and_burns_no_budget(
    case: str,
    expected: str,
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: each of these failed trial after trial (each counted) until the five-failures rule stopped it.
    cfg = study_dict(folder_root, budget={"n_trials": 20})
    args = ["--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck")]
    if case == "weights file missing":
        cfg["model"]["weights"] = str(tmp_path / "missing.pt")
    elif case == "checkpoint dir is a file":
        (tmp_path / "ck").write_text("")
    elif case == "no such device":
        args = ["--device", "mps", "--checkpoint-dir", str(tmp_path / "ck")]
    else:
        args += ["--data-root", str(tmp_path / "nodata")]
    path = write_study(cfg)
    assert main(["--storage", sqlite_url, "run", str(path), *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected.format(d=tmp_path) in lines[0], err
    # `run` checks the node before it creates the study: a failed first run leaves nothing behind
    assert optuna.get_all_study_names(sqlite_url) == []
    # and a worker on an existing study stops before claiming anything
    assert main(["--storage", sqlite_url, "create", str(path)]) == 0
    capsys.readouterr()
    assert main(["--storage", sqlite_url, "worker", "t", *args]) == 2
    assert expected.format(d=tmp_path) in capsys.readouterr().err
    assert started(optuna.load_study(study_name="t", storage=sqlite_url)) == []


def test_system_exit_in_a_trial_never_leaves_it_running(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exits(self: Trainer) -> EpochResult:
        sys.exit(3)

    monkeypatch.setattr(Trainer, "run_epoch", exits)
    with pytest.raises(SystemExit):
        _run(sqlite_url, write_study(study_dict(folder_root)))
    trials = started(optuna.load_study(study_name="t", storage=sqlite_url))
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
    (trial,) = started(optuna.load_study(study_name="t", storage=sqlite_url))
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
    study = optuna.load_study(study_name="t", storage=sqlite_url)
    (trial,) = started(study)
    # a storage error, not the trial's: given back (uncounted) once the storage answers, retried from its checkpoint
    assert trial.state == TrialState.FAIL and trial.user_attrs[attrs.REASON] == attrs.OUTAGE
    assert trial.intermediate_values == {1: trial.intermediate_values[1]}
    assert [t.user_attrs.get(attrs.RETRY_OF) for t in study.get_trials(states=(TrialState.WAITING,))] == [None, 0]


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
    seen: dict[int, tuple[str, str]] = {}  # worker pid -> (command line, environment)
    while time.monotonic() < deadline:
        seen.update(_children(proc.pid))
        trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
        if sum(len(t.intermediate_values) >= 1 for t in trials) >= 2:
            break
        time.sleep(0.3)
    seen.update(_children(proc.pid))
    # The storage URL (a password, on PostgreSQL) reaches the workers through their environment, never their
    # command line, which every user of the node reads with ps. Before: `... --storage URL ... worker t`.
    assert len(seen) == 2
    for cmdline, environ in seen.values():
        assert "worker t" in cmdline and "--storage" not in cmdline and sqlite_url not in cmdline, cmdline
        assert f"SFT_OPTUNA_STORAGE={sqlite_url}" in environ.split("\0")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "[cpu.0]" in out and "[cpu.1]" in out
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert all(t.state != TrialState.RUNNING for t in trials)
    interrupted = [t for t in trials if t.user_attrs.get(attrs.REASON) == "interrupted"]
    assert len(interrupted) == 2, "each worker stopped its trial after the epoch, resumable"


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """Command line and environment of each child process of ``pid`` (Linux /proc)."""
    found: dict[int, tuple[str, str]] = {}
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for kid in map(int, kids):
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found[kid] = (cmdline, Path(f"/proc/{kid}/environ").read_bytes().decode(errors="replace"))
    except (FileNotFoundError, ProcessLookupError):
        pass  # a worker that already exited
    return found


def test_launch_refuses_bad_gpu_lists(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--storage", sqlite_url, "launch", "t", "--gpus", "0,x"]) == 2
    assert "--gpus '0,x'" in capsys.readouterr().err
