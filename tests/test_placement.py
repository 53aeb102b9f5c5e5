"""``data.placement``: the split on the device when it fits beside a training step, else in pinned host memory;
a forced ``device`` that cannot fit is one line before any claim."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
from conftest import study_dict, write_imagefolder

from sft_optuna.cli import main
from sft_optuna.config import parse_config
from sft_optuna.errors import DataError
from sft_optuna.training.placement import HEADROOM, choose_placement, largest_choices

GPU = torch.device("cuda", 0)  # a device object only: choose_placement does arithmetic, it touches no GPU
GB = 10**9


def test_auto_keeps_the_split_on_the_device_when_it_fits_beside_a_step_else_on_the_host() -> None:
    fits = choose_placement("auto", GPU, split_bytes=10 * GB, step_bytes=8 * GB, free_bytes=24 * GB)
    assert fits.where == "device" and "fits beside a training step" in fits.why
    # 100k photos at 224 px on a 24 GB card: 15 GB of images + a step do not fit in 90% of it
    big = choose_placement("auto", GPU, split_bytes=15 * GB, step_bytes=8 * GB, free_bytes=24 * GB)
    assert big.where == "host" and "does not fit" in big.why
    edge = math.ceil(20 * GB / HEADROOM)
    assert choose_placement("auto", GPU, 12 * GB, 8 * GB, edge).where == "device"
    assert choose_placement("auto", GPU, 12 * GB, 8 * GB, edge - 1).where == "host"
    assert choose_placement("host", GPU, 1, 1, 24 * GB).where == "host"
    line = big.describe(GPU)
    assert "pinned host memory" in line and "15.00 GB" in line and "24.00 GB" in line


def test_a_forced_device_placement_that_cannot_fit_is_one_line() -> None:
    with pytest.raises(DataError) as err:
        choose_placement("device", GPU, split_bytes=15 * GB, step_bytes=8 * GB, free_bytes=24 * GB)
    text = str(err.value)
    assert text.startswith("data.placement: device: the split (15.00 GB)") and "\n" not in text
    assert "24.00 GB free on cuda:0" in text


def test_the_step_is_measured_at_the_largest_batch_and_image_size_of_the_space(tmp_path: Path) -> None:
    raw = study_dict(tmp_path)
    raw["search_space"] = {
        "batch_size": {"type": "categorical", "choices": [32, 256, 64]},
        "model.image_size": {"type": "int", "low": 64, "high": 160, "step": 32},
    }
    big = largest_choices(parse_config(raw))
    assert big.train.batch_size == 256 and big.model.image_size == 160


def test_a_worker_whose_forced_device_placement_cannot_fit_stops_before_any_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    root = write_imagefolder(tmp_path / "data", n_train=60, n_test=8)
    raw = study_dict(root, name="placed", data={"placement": "device"})
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["--storage", url, "create", str(study)]) == 0
    capsys.readouterr()
    argv = ["--storage", url, "worker", "placed", "--device", "cpu", "--device-memory", "10KB"]
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "data.placement: device: the split" in err[0]
    assert "10 KB this worker may use (--device-memory) on cpu" in err[0]
    trials = optuna.load_study(study_name="placed", storage=url).get_trials()
    assert trials and all(t.state == optuna.trial.TrialState.WAITING for t in trials), "no trial touched"


def test_a_size_on_the_command_line_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "x", "--device-memory", "lots"])
    assert exit_.value.code == 2 and "'lots' is not a size" in capsys.readouterr().err
