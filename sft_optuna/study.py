"""Studies by name: create once (idempotent, refusing a different config), load with their stored config."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid

import optuna

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, config_diff
from sft_optuna.coordination.claims import queue_budget
from sft_optuna.coordination.storage import Storage
from sft_optuna.errors import ConfigError, UserError
from sft_optuna.results.notes import write_study_note
from sft_optuna.search.samplers import make_pruner, make_sampler
from sft_optuna.search.space import is_grid
from sft_optuna.search.warm_start import WarmStart, warm_start_points
from sft_optuna.study_file import parse_study

__all__ = ["create_study", "identity", "load_study"]

log = logging.getLogger(__name__)


def _study_id(name: str, storage: Storage) -> int:
    return storage.optuna.get_study_id_from_name(name)


def _find(storage: Storage, name: str) -> bool:
    return name in storage.study_names()


def create_study(
    config: StudyConfig, storage: Storage, study_file: str | None = None, warm_start: tuple[str, int] | None = None
) -> tuple[optuna.Study, bool]:
    """Create the study ``config.name`` with its config stored; a no-op if it exists with the same config.

    ``warm_start=(OTHER, K)``: the first K budget slots run the K best configurations of study OTHER in the same
    storage (see ``search/warm_start.py``). Returns (study, created). Serialized by the storage lock, so workers
    started together on an empty storage do not race each other into duplicate-study errors.
    """
    with storage.lock("create"):
        if _find(storage, config.name):
            if warm_start is not None:
                log.warning("study %r exists: --warm-start applies only when a study is created", config.name)
            return _existing(config, storage), False
        warm = _warm_points(config, storage, *warm_start) if warm_start is not None else []
        try:
            study = optuna.create_study(
                storage=storage.optuna,
                study_name=config.name,
                direction=config.direction,
                sampler=make_sampler(config.sampler, 0),
                pruner=make_pruner(config.pruner),
            )
        except optuna.exceptions.DuplicatedStudyError:  # created a moment ago through a lock-less proxy
            return _existing(config, storage), False
        study.set_user_attr(attrs.STUDY_UID, uuid.uuid4().hex)  # before the config: workers wait for that
        study.set_user_attr(attrs.STUDY_CONFIG, config.to_dict())
        if study_file is not None:
            study.set_user_attr(attrs.STUDY_FILE, study_file)
        write_study_note(study, config, study_file)
        # the budget as queued trials: workers claim them without a lock
        queue_budget(study, config, [(w.params, w.source) for w in warm])
        log.info("created study %r in %s", config.name, storage.masked)
        return study, True


def _warm_points(config: StudyConfig, storage: Storage, other: str, top: int) -> list[WarmStart]:
    """The warm start's configurations from study ``other``, each said in one log line; a one-line
    :class:`UserError` when there is nothing to carry over (nothing has been written yet)."""
    if is_grid(config):
        raise UserError(f"--warm-start {other}: study {config.name!r} runs a grid, whose points are its own")
    source, source_config = load_study(other, storage)
    points = warm_start_points(
        source.get_trials(deepcopy=False), other, source_config.search_space, config.search_space, top
    )
    for slot, w in enumerate(points[: config.budget.n_trials]):
        left = f"; left to the sampler: {', '.join(w.dropped)}" if w.dropped else ""
        log.info("warm start: slot %d runs %s's configuration %s%s", slot, w.source, w.params, left)
    if len(points) < top:
        log.info(
            "warm start: study %r has %d distinct completed configuration(s) that fit this space, fewer than --top %d",
            other,
            len(points),
            top,
        )
    return points


def _existing(config: StudyConfig, storage: Storage) -> optuna.Study:
    study, stored = load_study(config.name, storage)
    diff = config_diff(stored.to_dict(), config.to_dict())
    if diff:
        raise ConfigError(
            f"study {config.name!r} already exists in {storage.masked} with a different config "
            f"(differs in: {', '.join(diff)}); use another name or the stored config"
        )
    return study


CONFIG_WAIT_S = 3.0  # a study just created elsewhere gets its config a moment after its name


def load_study(name: str, storage: Storage, trial_number: int = 0) -> tuple[optuna.Study, StudyConfig]:
    """Open study ``name`` with the config stored at creation (the only config a worker uses)."""
    if not _find(storage, name):
        known = ", ".join(storage.study_names()) or "none"
        raise UserError(f"no study named {name!r} in {storage.masked} (studies there: {known})")
    deadline = time.monotonic() + CONFIG_WAIT_S
    while (raw := storage.optuna.get_study_user_attrs(_study_id(name, storage)).get(attrs.STUDY_CONFIG)) is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
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


def identity(study: optuna.Study, config: StudyConfig) -> str:
    """The study's identity, which its checkpoints are bound to: the random id stored when it was created (a
    same-name study in a fresh database, or created again after a delete, is another study). A study created
    before ids were stored is known by its name and a digest of its config."""
    uid = study.user_attrs.get(attrs.STUDY_UID)
    if isinstance(uid, str) and uid:
        return uid
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{config.name}:{digest}"
