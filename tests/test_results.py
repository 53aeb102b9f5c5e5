"""Results: export files match the storage, retrain touches only the test split for its number, plan's
arithmetic follows from its calibration."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import study_dict, write_imagefolder

from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.results.export import FIGURES
from sft_optuna.results.plan import EVAL_FACTOR, describe, make_plan
from sft_optuna.results.retrain import evaluate_model_file
from sft_optuna.study_file import load_study_file
from sft_optuna.training.data import load_imagefolder


@pytest.fixture(scope="module")
def finished_study(folder_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{tmp / 'studies.db'}"
    cfg = study_dict(
        folder_root,
        budget={"n_trials": 4},
        train={"epochs": 2},
        search_space={
            "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
            "momentum": {"type": "float", "low": 0.5, "high": 0.9},
        },
    )
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--storage", url, "run", str(path), "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    return url, path


def test_export_writes_csv_best_yaml_and_every_figure(finished_study: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = finished_study
    assert main(["--storage", url, "export", "t", "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for stem in FIGURES:
        html = (out / f"{stem}.html").read_text()
        # self-contained offline: the page loads the plotly.js copy beside it, nothing from a CDN
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in html and "cdn.plot.ly" not in html
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    study = optuna.load_study(study_name="t", storage=url)
    with (out / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    trials = study.get_trials()
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, t in zip(rows, trials, strict=True):
        assert row["state"] == t.state.name and float(row["value"]) == pytest.approx(t.value)
        assert float(row["param_lr"]) == pytest.approx(t.params["lr"])
        assert int(row["epochs"]) == len(t.intermediate_values)
        assert int(row["lineage"]) == t.number and int(row["retry"]) == 0  # how each trial is chained
        assert {"promoted_from", "rung", "resumed_from_epoch", "audit_stopped_at", "retry_of"} <= set(row)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == pytest.approx(study.best_trial.params["lr"])
    # best.yaml is a complete train block: it validates as a study file's train section
    parse_config({"name": "x", "train": best["train"]}, "best.yaml")


def test_export_of_a_study_without_a_completed_trial_is_one_line_and_the_csv(
    folder_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: 11 empty figures after 14 warnings.
    url = f"sqlite:///{tmp_path / 's.db'}"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study_dict(folder_root)))
    assert main(["--storage", url, "create", str(path)]) == 0
    capsys.readouterr()
    assert main(["--storage", url, "export", "t", "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path / 'out'}/trials.csv; no completed trial yet, so no best.yaml and no figures\n"
    assert err == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["trials.csv"]


def test_retrain_reports_test_accuracy_from_the_test_split_only(
    finished_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = finished_study
    honest = tmp_path / "honest"
    assert (
        main(
            ["--storage", url, "retrain", "t", "--seeds", "2", "--epochs", "3", "--device", "cpu", "--out", str(honest)]
        )
        == 0
    )
    card = json.loads((honest / "model-card.json").read_text())
    assert len(card["test_acc"]) == 2 and card["test_acc_mean"] > 0.6
    assert card["data"]["train_images"] == 200  # train + validation: every training image
    assert (honest / "summary.md").read_text().count("±") == 1
    # the card's model reproduces the card's number
    data = load_imagefolder(card["data"]["root"], card["data"]["image_size"])
    assert evaluate_model_file(honest / "model-card.json", data, torch.device("cpu")) == pytest.approx(
        card["test_acc"][0]
    )
    # status shows the result stored on the study
    capsys.readouterr()
    assert main(["--storage", url, "status", "t"]) == 0
    assert f"retrain: test accuracy {card['test_acc_mean']:.4f}" in capsys.readouterr().out

    # Same training images, test images filed under the wrong classes: the number must collapse.
    planted = write_imagefolder(tmp_path / "planted", test_labels_shift=1)
    assert (
        main(
            [
                "--storage",
                url,
                "retrain",
                "t",
                "--seeds",
                "1",
                "--epochs",
                "3",
                "--device",
                "cpu",
                "--data-root",
                str(planted),
                "--train-subset",
                "160",
                "--out",
                str(tmp_path / "planted-out"),
            ]
        )
        == 0
    )
    planted_card = json.loads((tmp_path / "planted-out" / "model-card.json").read_text())
    assert planted_card["data"]["train_images"] == 160
    assert planted_card["test_acc_mean"] < 0.35 < card["test_acc_mean"]


def test_plan_arithmetic_follows_from_the_calibration(tmp_path: Path) -> None:
    cfg = parse_config(
        study_dict(
            tmp_path,
            budget={"n_trials": 10},
            train={"epochs": 4},
            pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        ),
        "p",
    )
    plan = make_plan(cfg, images_per_s=100.0, train_images=1000)
    epoch_s = 1000 / 100 + 40 / (EVAL_FACTOR * 100)
    assert plan.epoch_seconds == pytest.approx(epoch_s)
    assert plan.hours_without_pruning == pytest.approx(10 * 4 * epoch_s / 3600)
    # 2 startup trials in full; 8 others: half full, half stopped after the 2 warm-up epochs
    assert plan.hours_with_pruning == pytest.approx((2 * 4 + 8 * (0.5 * 4 + 0.5 * 2)) * epoch_s / 3600)


def test_plan_expects_ashas_epochs_and_caps_by_the_epoch_budget(tmp_path: Path) -> None:
    asha = {"name": "asha", "min_epochs": 1, "reduction_factor": 3}
    cfg = parse_config(study_dict(tmp_path, budget={"n_trials": 27}, train={"epochs": 12}, pruner=asha), "p")
    plan = make_plan(cfg, images_per_s=100.0, train_images=1000)
    # rungs 1, 3, 9: 27 configs train 1 epoch, 9 go on to 3, 3 to 9, 1 to 12
    assert plan.epochs_with_pruning == pytest.approx(27 * 1 + 9 * 2 + 3 * 6 + 1 * 3)
    assert plan.epochs_full == 27 * 12
    assert plan.hours_with_pruning == pytest.approx(66 * plan.epoch_seconds / 3600)
    capped = parse_config(
        study_dict(tmp_path, budget={"n_trials": 27, "epochs": 50}, train={"epochs": 12}, pruner=asha), "p"
    )
    plan = make_plan(capped, images_per_s=100.0, train_images=1000)
    assert plan.epochs_with_pruning == 50 and plan.epochs_full == 50
    assert any("budget.epochs 50 stops the study" in w for w in plan.warnings)
    assert "ASHA's expected epochs at rungs [1, 3, 9]" in describe(capped, plan, "cpu")


def test_plan_warns_when_the_grid_exceeds_the_budget(
    folder_root: Path, write_study: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    space = {
        "lr": {"type": "categorical", "choices": [0.01, 0.02, 0.03]},
        "momentum": {"type": "categorical", "choices": [0.8, 0.9]},
    }
    path = write_study(study_dict(folder_root, sampler={"name": "grid"}, budget={"n_trials": 4}, search_space=space))
    assert main(["plan", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "trials: 4 (grid of 6 points)" in out and "warning: the grid has 6 points" in out
    assert "training images/s" in out and "160 training / 40 validation images" in out
    assert "lr: one of [0.01, 0.02, 0.03]" in out


def test_shipped_gpu_study_plans_without_its_data(capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import REPO

    cfg = load_study_file(REPO / "studies" / "cifar10-resnet18-tpe.yaml")
    plan = make_plan(cfg, images_per_s=5000.0, train_images=45000)
    assert plan.trials == 100 and plan.epochs == 15
    # ASHA (rungs 3, 9 of 15) expects 100 x (3 + 6/3 + 6/9) = 567 epochs; the study's epoch budget caps it
    assert plan.epochs_with_pruning == 450 and plan.hours_with_pruning <= plan.hours_without_pruning


def test_retrain_keeps_the_studys_training_subset_unless_told_otherwise(
    folder_root: Path, write_study: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    cache = tmp_path / "cache"
    monkeypatch.setenv("SFT_OPTUNA_CACHE", str(cache))  # what gets decoded, seen in the decode cache
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = study_dict(folder_root, budget={"n_trials": 1}, train={"epochs": 1}, data={"train_subset": 120})
    assert main(["--storage", url, "run", str(write_study(cfg)), "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    out = tmp_path / "out"
    argv = ["--storage", url, "retrain", "t", "--seeds", "1", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "model-card.json").read_text())["data"]["train_images"] == 120
    decoded = [len(np.load(f)["y"]) for f in cache.glob("train-*.npz")]
    assert decoded and max(decoded) < 200, f"retrain decoded every training image: {decoded}"
