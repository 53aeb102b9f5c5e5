"""``create --warm-start OTHER --top K``: the K best configurations of another study run first, projected into
this study's space; a value that does not fit is left to the sampler and named; no shared parameter: refused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import study_dict

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.config import ParamSpec
from sft_optuna.coordination.claims import claim_trial
from sft_optuna.coordination.storage import open_storage
from sft_optuna.results.status import status_lines
from sft_optuna.search.warm_start import fits
from sft_optuna.study import load_study


def _file(tmp_path: Path, raw: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _finished_source(tmp_path: Path, url: str) -> dict[int, float]:
    """Study ``src`` with four completed trials (values told, no training): trial number -> value."""
    raw = study_dict(tmp_path, name="src", budget={"n_trials": 4})
    raw["search_space"] = {
        "lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    }
    assert main(["--storage", url, "create", str(_file(tmp_path, raw, "src"))]) == 0
    study, config = load_study("src", open_storage(url))
    values = {}
    for value in (0.5, 0.9, 0.7, 0.8):
        trial = claim_trial(study, config)
        assert trial is not None
        study.tell(trial, value)
        values[trial.number] = value
    return values


def test_the_best_configurations_run_first_projected_into_the_new_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    _finished_source(tmp_path, url)
    source = {t.number: t for t in optuna.load_study(study_name="src", storage=url).trials}
    ranked = sorted(source.values(), key=lambda t: -t.value)  # type: ignore[operator]
    raw = study_dict(tmp_path, name="dst", budget={"n_trials": 6})
    raw["search_space"] = {
        "lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64]},  # 16 is not a choice here
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.01},  # not searched in src
    }
    with caplog.at_level(logging.INFO, logger="sft_optuna"):
        code = main(["--storage", url, "create", str(_file(tmp_path, raw, "dst")), "--warm-start", "src", "--top", "3"])
    assert code == 0 and "its first 3 trial(s) warm-started from study 'src'" in capsys.readouterr().out
    study, config = load_study("dst", open_storage(url))
    queued = sorted(
        (t for t in study.get_trials() if attrs.WARM_START in t.user_attrs), key=lambda t: t.user_attrs[attrs.SLOT]
    )
    assert [t.user_attrs[attrs.SLOT] for t in queued] == [0, 1, 2]
    assert [t.user_attrs[attrs.WARM_START] for t in queued] == [f"src#{t.number}" for t in ranked[:3]]
    for t in queued:
        src = source[int(t.user_attrs[attrs.WARM_START].split("#")[1])]
        expected = {"lr": src.params["lr"]}
        if src.params["batch_size"] in (32, 64):
            expected["batch_size"] = src.params["batch_size"]
        assert t.system_attrs["fixed_params"] == expected
    for src in ranked[:3]:
        line = next(r.getMessage() for r in caplog.records if f"src#{src.number}" in r.getMessage())
        assert "momentum (not searched in this study)" in line
        if src.params["batch_size"] == 16:
            assert "batch_size (16 is not among the choices [32, 64])" in line
    status = "\n".join(status_lines(study, config))
    assert f"warm start: trial {queued[0].number} runs src#{ranked[0].number} (WAITING)" in status
    # the first claim runs the best configuration; the sampler fills in what it leaves out
    first = claim_trial(study, config)
    assert first is not None and first.params["lr"] == ranked[0].params["lr"]
    assert 0.0 <= first.params["weight_decay"] <= 0.01 and first.params["batch_size"] in (32, 64)


def test_a_warm_start_with_no_shared_parameter_is_refused_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    _finished_source(tmp_path, url)
    raw = study_dict(tmp_path, name="other")
    raw["search_space"] = {"weight_decay": {"type": "float", "low": 0.0, "high": 0.01}}
    path = _file(tmp_path, raw, "other")
    for argv, message in (
        (["--warm-start", "src"], "--warm-start src: no parameter of its search space (batch_size, lr, momentum)"),
        (["--warm-start", "nope"], "no study named 'nope'"),
    ):
        assert main(["--storage", url, "create", str(path), *argv]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0], err
    assert "other" not in optuna.get_all_study_names(url)


def test_a_value_fits_a_spec_only_where_the_spec_can_take_it() -> None:
    assert fits(0.05, ParamSpec(type="float", low=0.01, high=0.1)) is None
    assert "outside" in str(fits(0.5, ParamSpec(type="float", low=0.01, high=0.1)))
    assert "off the step" in str(fits(0.25, ParamSpec(type="float", low=0.0, high=1.0, step=0.1)))
    assert fits(0.3, ParamSpec(type="float", low=0.0, high=1.0, step=0.1)) is None
    assert "whole number" in str(fits(2.5, ParamSpec(type="int", low=1, high=5)))
    assert fits(64.0, ParamSpec(type="categorical", choices=[32, 64])) is None
    assert fits(True, ParamSpec(type="categorical", choices=[1, 2])) is not None, "True is not the choice 1"
    assert fits("cosine", ParamSpec(type="categorical", choices=["cosine", "constant"])) is None
