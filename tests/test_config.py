"""Study files: every shipped file loads; every kind of bad input is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, study_dict

from sft_optuna.cli import main
from sft_optuna.config import config_diff, parse_config
from sft_optuna.errors import ConfigError
from sft_optuna.search.space import grid_points
from sft_optuna.study_file import load_study_file

STUDY_FILES = sorted((REPO / "studies").glob("*.yaml"))


def test_studies_folder_has_the_documented_files() -> None:
    names = {p.name for p in STUDY_FILES}
    for required in (
        "cifar10-resnet18-tpe.yaml",
        "cifar10-resnet18-grid.yaml",
        "cifar10-resnet18-random.yaml",
        "smoke.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_shipped_study_file_loads_and_round_trips(path: Path) -> None:
    config = load_study_file(path)
    assert config.name
    assert parse_config(config.to_dict(), "stored") == config
    if config.sampler.name == "grid":
        assert 0 < len(grid_points(config.search_space))


def _with(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    keys = dotted.split(".")
    node = base
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return base


BAD = [
    ("unknown top-level key", "colour", "red", "colour: unknown key"),
    ("unknown train key", "train.lrate", 0.1, "train.lrate: unknown key"),
    ("wrong type", "train.epochs", "ten", "train.epochs: expected int"),
    ("bool is not an int", "train.epochs", True, "train.epochs: expected int"),
    ("negative lr", "train.lr", -1.0, "train.lr: must be > 0"),
    ("bad scheduler", "train.scheduler", "linear", "train.scheduler: expected one of"),
    ("bad dataset", "data.dataset", "mnist", "data.dataset: expected one of"),
    (
        "low >= high",
        "search_space.lr",
        {"type": "float", "low": 0.1, "high": 0.01},
        "search_space.lr.low: must be below high",
    ),
    (
        "log with low <= 0",
        "search_space.lr",
        {"type": "float", "low": 0.0, "high": 0.1, "log": True},
        "search_space.lr.low: must be > 0 with log",
    ),
    (
        "unsearchable name",
        "search_space.colour",
        {"type": "categorical", "choices": [1]},
        "search_space.colour: not a searchable key",
    ),
    (
        "empty choices",
        "search_space.scheduler",
        {"type": "categorical", "choices": []},
        "search_space.scheduler.choices",
    ),
    (
        "unknown param type",
        "search_space.lr",
        {"type": "normal", "low": 0.1, "high": 1.0},
        "search_space.lr.type: expected one of",
    ),
    ("unknown sampler", "sampler.name", "cmaes2", "sampler.name: unknown sampler"),
    ("unknown sampler option", "sampler.n_startup", 3, "sampler.n_startup: unknown option"),
    ("unknown pruner", "pruner.name", "magic", "pruner.name: unknown pruner"),
    ("unknown pruner option", "pruner.warmup", 1, "pruner.warmup: unknown option"),
    ("zero budget", "budget.n_trials", 0, "budget.n_trials: must be > 0"),
    (
        "int param not whole",
        "search_space.epochs",
        {"type": "int", "low": 1.5, "high": 4},
        "search_space.epochs.low: must be a whole number",
    ),
]


@pytest.mark.parametrize(("case", "key", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_study_file_is_one_line_naming_file_and_key(
    tmp_path: Path, case: str, key: str, value: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(study_dict(tmp_path), key, value)))
    with pytest.raises(ConfigError) as info:
        load_study_file(path)
    assert str(path) in str(info.value) and message in str(info.value)

    db = tmp_path / "never.db"
    code = main(["--storage", f"sqlite:///{db}", "create", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and message in err
    assert not db.exists(), "a bad study file must write nothing to the storage"


def test_grid_over_float_range_without_step_is_refused(tmp_path: Path) -> None:
    cfg = study_dict(tmp_path, sampler={"name": "grid"})
    with pytest.raises(ConfigError, match=r"search_space\.lr\.step: the grid sampler needs a step"):
        parse_config(cfg, "grid.yaml")


def test_missing_file_and_invalid_yaml_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_study_file(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line"):
        load_study_file(broken)


def test_config_diff_names_differing_dotted_keys(tmp_path: Path) -> None:
    a = parse_config(study_dict(tmp_path), "a").to_dict()
    b = parse_config(study_dict(tmp_path, train={"epochs": 3}, budget={"n_trials": 9}), "b").to_dict()
    assert config_diff(a, b) == ["budget.n_trials", "train.epochs"]
