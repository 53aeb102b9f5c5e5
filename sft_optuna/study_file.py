"""A study file read and checked whole: YAML -> :mod:`config` (structure, types, ranges, search-space values)
-> sampler and pruner names and options (:mod:`search.samplers`). The only module that reads YAML; every check
on a study runs through here, so that a bad file fails before anything touches a storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sft_optuna.config import StudyConfig, parse_config
from sft_optuna.errors import ConfigError
from sft_optuna.search.asha import study_rungs
from sft_optuna.search.samplers import check_pruner, check_sampler

__all__ = ["load_study_file", "parse_study"]


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
    return parse_study(raw, str(path))
