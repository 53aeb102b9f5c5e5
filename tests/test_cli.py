"""End-to-end through ``main(argv)``: create, run with each sampler, status/best/studies, idempotence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import started, study_dict, write_imagefolder
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_run_completes_the_budget_with_learning_curves(
    sampler: str,
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_study(study_dict(folder_root, sampler={"name": sampler, "seed": 1}, budget={"n_trials": 3}))
    code = main(
        ["--storage", sqlite_url, "run", str(path), "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ck")]
    )
    assert code == 0
    study = _load(sqlite_url, "t")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["lr"] for t in trials}) == 3
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2]
        history = t.user_attrs[attrs.HISTORY]
        assert [h["epoch"] for h in history] == [1, 2]
        assert {"train_loss", "val_acc", "seconds", "images_per_s", "peak_memory_mb"} <= set(history[0])
        # the curve is stored rounded to 6 decimals (EpochResult.to_dict); the value is the float itself
        assert t.value == pytest.approx(history[-1]["val_acc"], abs=1e-6) and 0 <= t.value <= 1
    assert max(t.value for t in trials) > 0.5  # 4 classes: chance is 0.25
    # finished trials give their checkpoints back, except the best one's
    assert sorted(p.name for p in (tmp_path / "ck" / "t").iterdir()) == ["best.pt"]
    out = capsys.readouterr().out
    assert "budget 3/3 used" in out and f"best: trial {study.best_trial.number}" in out


def test_grid_runs_every_point_exactly_once_then_stops(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    space = {
        "lr": {"type": "float", "low": 0.02, "high": 0.06, "step": 0.02},
        "scheduler": {"type": "categorical", "choices": ["constant", "cosine"]},
    }
    cfg = study_dict(
        folder_root, sampler={"name": "grid"}, budget={"n_trials": 50}, search_space=space, train={"epochs": 1}
    )
    path = write_study(cfg)
    assert main(["--storage", sqlite_url, "run", str(path), "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    trials = _load(sqlite_url, "t").get_trials()
    points = sorted((t.params["lr"], t.params["scheduler"]) for t in trials)
    assert points == sorted((lr, s) for lr in (0.02, 0.04, 0.06) for s in ("constant", "cosine"))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_median_pruner_prunes_a_trial_that_cannot_learn(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    space = {"lr": {"type": "categorical", "choices": [0.05, 0.04, 1.0e-7]}}
    cfg = study_dict(
        folder_root,
        sampler={"name": "grid"},
        budget={"n_trials": 3},
        search_space=space,
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        train={"epochs": 3},
    )
    assert (
        main(["--storage", sqlite_url, "run", str(write_study(cfg)), "--device", "cpu", "--checkpoint-dir", "none"])
        == 0
    )
    by_lr = {t.params["lr"]: t for t in _load(sqlite_url, "t").get_trials()}
    assert by_lr[0.05].state == by_lr[0.04].state == TrialState.COMPLETE
    bad = by_lr[1.0e-7]
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs[attrs.REASON].startswith("pruned at epoch")
    assert len(bad.intermediate_values) < 3


def test_create_is_idempotent_and_refuses_a_different_config(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(study_dict(folder_root))
    assert main(["--storage", sqlite_url, "create", str(path)]) == 0
    assert main(["--storage", sqlite_url, "create", str(path)]) == 0
    assert "exists (same config)" in capsys.readouterr().out
    changed = write_study(study_dict(folder_root, train={"epochs": 5}, budget={"n_trials": 7}), "changed.yaml")
    assert main(["--storage", sqlite_url, "create", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "differs in: budget.n_trials, train.epochs" in err and err.count("\n") == 1
    assert len(optuna.get_all_study_names(sqlite_url)) == 1


def test_worker_loads_by_name_and_exits_at_once_when_budget_is_spent(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(study_dict(folder_root, budget={"n_trials": 1}, train={"epochs": 1}))
    assert main(["--storage", sqlite_url, "create", str(path)]) == 0
    path.unlink()  # the worker needs only the name: its config comes from the storage
    assert main(["--storage", sqlite_url, "worker", "t", "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    assert len(_load(sqlite_url, "t").get_trials()) == 1
    assert main(["--storage", sqlite_url, "worker", "t", "--device", "cpu"]) == 0
    assert len(_load(sqlite_url, "t").get_trials()) == 1


def test_status_best_and_studies_report_the_study(
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SFT_OPTUNA_STORAGE", sqlite_url)  # the environment variable is honoured
    path = write_study(study_dict(folder_root, train={"epochs": 1}))
    assert main(["run", str(path), "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    capsys.readouterr()
    assert main(["status", "t"]) == 0
    out = capsys.readouterr().out
    assert "budget 2/2 used" in out and "COMPLETE 2" in out
    assert main(["best", "t"]) == 0
    best_yaml = capsys.readouterr().out
    block = yaml.safe_load(best_yaml)
    best = _load(sqlite_url, "t").best_trial
    assert block["train"]["lr"] == best.params["lr"] and block["train"]["epochs"] == 1
    assert main(["best", "t", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["trial"] == best.number
    assert main(["studies"]) == 0
    assert "t\ttrials 2 (COMPLETE 2)" in capsys.readouterr().out


def test_unknown_study_and_bad_device_are_one_line_errors(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--storage", sqlite_url, "worker", "nope"]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err
    path = write_study(study_dict(folder_root))
    assert main(["--storage", sqlite_url, "run", str(path), "--device", "tpu"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


def test_malformed_and_unreachable_storage_urls_mask_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--storage", "postgresql+psycopg://sft:s3cret@127.0.0.1:1/x", "studies"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "sft:***@127.0.0.1:1" in err and err.count("\n") == 1
    assert main(["--storage", "nosuchdb://a:b@c/d", "studies"]) == 2
    assert "nosuchdb is not supported" in capsys.readouterr().err


def test_trial_values_and_confusion_matrices_come_from_validation_only(
    tmp_path: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    # The test images are filed under shifted labels (class k's colour under class k+1): a search that read
    # the test split in place of validation would score near 0 here, not near 1.
    root = write_imagefolder(tmp_path / "shifted", test_labels_shift=1)
    cfg = study_dict(
        root,
        budget={"n_trials": 1},
        train={"epochs": 4, "batch_size": 32},
        search_space={"lr": {"type": "categorical", "choices": [0.05]}},
    )
    assert (
        main(["--storage", sqlite_url, "run", str(write_study(cfg)), "--device", "cpu", "--checkpoint-dir", "none"])
        == 0
    )
    (trial,) = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    matrix = trial.user_attrs["confusion_matrix"]
    assert sum(map(sum, matrix)) == 40, "every validation image once, no test image"
    assert sum(matrix[i][i] for i in range(4)) / 40 == pytest.approx(trial.value)
    assert trial.value >= 0.75, trial.intermediate_values
    assert trial.intermediate_values[4] == trial.value  # objective: last


def test_max_trials_caps_this_worker_and_n_trials_still_works(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    path = write_study(study_dict(folder_root, budget={"n_trials": 3}, train={"epochs": 1}))
    base = ["--storage", sqlite_url, "run", str(path), "--device", "cpu", "--checkpoint-dir", "none"]
    assert main([*base, "--max-trials", "1"]) == 0
    assert len(started(optuna.load_study(study_name="t", storage=sqlite_url))) == 1
    assert main([*base, "--n-trials", "1"]) == 0  # the flag's old name
    assert len(started(optuna.load_study(study_name="t", storage=sqlite_url))) == 2
