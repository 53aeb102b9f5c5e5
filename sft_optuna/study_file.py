"""A study file read and checked whole: YAML -> :mod:`config` (structure, types, ranges, search-space values)
-> sampler and pruner names and options (:mod:`search.samplers`). The only module that reads YAML; every check
on a study runs through here, so that a bad file fails before anything touches a storage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from sft_optuna.config import StudyConfig, parse_config
from sft_optuna.errors import ConfigError
from sft_optuna.search.asha import reduction_factor, study_rungs
from sft_optuna.search.samplers import check_pruner, check_sampler
from sft_optuna.search.space import is_grid

__all__ = ["check_models", "load_study_file", "parse_study"]


def parse_study(raw: Any, source: str = "<config>") -> StudyConfig:
    """Parsed YAML (or a config stored with a study) -> a :class:`StudyConfig` that passed every check."""
    config = parse_config(raw, source)
    check_sampler(config.sampler, f"{source}: sampler")
    check_pruner(config.pruner, f"{source}: pruner")
    if config.pruner.name == "asha":
        if "epochs" in config.search_space:
            raise ConfigError(f"{source}: search_space.epochs: ASHA sets its rungs from train.epochs; do not search it")
        if not study_rungs(config):
            raise ConfigError(f"{source}: pruner.min_epochs: no rung below train.epochs ({config.train.epochs})")
    return config


def load_study_file(path: str | Path) -> StudyConfig:
    """Read and validate a study file; every problem is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read study file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); save the study file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    config = parse_study(raw, str(path))
    check_models(config, str(path))
    _check_asha_budget(config, str(path))
    return config


def _check_asha_budget(config: StudyConfig, source: str) -> None:
    """ASHA promotes the top 1/eta of a rung: with fewer configurations than eta^rungs none reaches the end, and
    the study finishes without a completed trial (nothing to retrain). Checked for study files, not for stored
    configs (a study created before this check still loads)."""
    rungs = study_rungs(config)
    if config.pruner.name != "asha" or not rungs or is_grid(config):
        return
    eta = reduction_factor(config)
    need = eta ** len(rungs)
    if config.budget.n_trials < need:
        raise ConfigError(
            f"{source}: budget.n_trials: {config.budget.n_trials} configurations are too few for ASHA's "
            f"{len(rungs)} rung(s) at reduction factor {eta:g}: none would reach train.epochs (it takes at least "
            f"{need:g}); raise n_trials, raise pruner.min_epochs, or use the median pruner"
        )


def _values(config: StudyConfig, name: str, fixed: Any) -> list[Any]:
    spec = config.search_space.get(name)
    if spec is None:
        return [fixed]
    if spec.choices is not None:
        return list(spec.choices)
    return sorted({int(spec.low), int(spec.high)}) if spec.low is not None and spec.high is not None else [fixed]


def check_models(config: StudyConfig, source: str) -> None:
    """Every architecture the study may build (``model.arch`` and ``model.image_size`` as fixed or searched)
    exists in torchvision, takes the image size, and has what its fixed knobs need (``stem: cifar``, ``bn:
    frozen``); a combination of two searched values that does not fit fails that trial as invalid instead.
    Imports torch and torchvision, so it runs for study files only (``create``, ``run``, ``plan``), not for
    the commands that read a stored config."""
    from sft_optuna.training.model import check_architecture

    model, train = config.model, config.train
    bn = train.bn if "bn" not in config.search_space else "train"
    archs = _values(config, "model.arch", model.arch)
    if "model.arch" in config.search_space:  # the fixed value is a default a person reads: it must exist too
        try:
            check_architecture(dataclasses.replace(model, arch=model.arch), dataclasses.replace(train, bn="train"))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for arch in archs:
        for size in _values(config, "model.image_size", model.image_size):
            candidate = dataclasses.replace(model, arch=str(arch), image_size=int(size))
            try:
                check_architecture(candidate, dataclasses.replace(train, bn=bn))
            except ConfigError as exc:
                searched = "search_space.model.arch: " if "model.arch" in config.search_space else ""
                raise ConfigError(f"{source}: {searched}{exc}") from None
