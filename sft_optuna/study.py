"""Studies by name: create once (idempotent, refusing a different config), load with their stored config."""

from __future__ import annotations

import logging

import optuna

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, config_diff
from sft_optuna.coordination.storage import Storage
from sft_optuna.errors import ConfigError, UserError
from sft_optuna.results.notes import write_study_note
from sft_optuna.search.samplers import make_pruner, make_sampler
from sft_optuna.search.space import grid_points, is_grid
from sft_optuna.study_file import parse_study

__all__ = ["create_study", "load_study"]

log = logging.getLogger(__name__)


def _find(storage: Storage, name: str) -> bool:
    return name in storage.study_names()


def create_study(config: StudyConfig, storage: Storage, study_file: str | None = None) -> tuple[optuna.Study, bool]:
    """Create the study ``config.name`` with its config stored; a no-op if it exists with the same config.

    Returns (study, created). Serialized by the storage lock, so workers started together on an empty
    storage do not race each other into duplicate-study errors.
    """
    with storage.lock("create"):
        if _find(storage, config.name):
            study, stored = load_study(config.name, storage)
            diff = config_diff(stored.to_dict(), config.to_dict())
            if diff:
                raise ConfigError(
                    f"study {config.name!r} already exists in {storage.masked} with a different config "
                    f"(differs in: {', '.join(diff)}); use another name or the stored config"
                )
            return study, False
        study = optuna.create_study(
            storage=storage.optuna,
            study_name=config.name,
            direction=config.direction,
            sampler=make_sampler(config.sampler, 0),
            pruner=make_pruner(config.pruner),
        )
        study.set_user_attr(attrs.STUDY_CONFIG, config.to_dict())
        if study_file is not None:
            study.set_user_attr(attrs.STUDY_FILE, study_file)
        write_study_note(study, config, study_file)
        if is_grid(config):
            points = grid_points(config.search_space)
            if len(points) > config.budget.n_trials:
                log.warning(
                    "grid has %d points but the budget is %d trials: only the first %d will run",
                    len(points),
                    config.budget.n_trials,
                    config.budget.n_trials,
                )
            # Each point queued exactly once; workers claim queued trials under the storage lock.
            for params in points[: config.budget.n_trials]:
                study.enqueue_trial(params)
        log.info("created study %r in %s", config.name, storage.masked)
        return study, True


def load_study(name: str, storage: Storage, trial_number: int = 0) -> tuple[optuna.Study, StudyConfig]:
    """Open study ``name`` with the config stored at creation (the only config a worker uses)."""
    if not _find(storage, name):
        known = ", ".join(storage.study_names()) or "none"
        raise UserError(f"no study named {name!r} in {storage.masked} (studies there: {known})")
    raw = optuna.load_study(study_name=name, storage=storage.optuna).user_attrs.get(attrs.STUDY_CONFIG)
    if raw is None:
        raise UserError(f"study {name!r} in {storage.masked} was not created by sft-optuna (no stored config)")
    config = parse_study(raw, f"study {name!r} (stored config)")
    study = optuna.load_study(
        study_name=name,
        storage=storage.optuna,
        sampler=make_sampler(config.sampler, trial_number),
        pruner=make_pruner(config.pruner),
    )
    return study, config
