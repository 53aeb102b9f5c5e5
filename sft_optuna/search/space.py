"""Search-space specs -> a trial's suggestions (``suggest``), random points (``random_points``) and the grid from
the same spec (``grid_points``)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import optuna

from sft_optuna.config import ParamSpec, StudyConfig

__all__ = ["grid_points", "grid_size", "is_grid", "random_points", "suggest"]


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ask the trial for every parameter of the space; returns name -> value."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            assert spec.choices is not None
            values[name] = trial.suggest_categorical(name, list(spec.choices))
        elif spec.type == "int":
            assert spec.low is not None and spec.high is not None
            values[name] = trial.suggest_int(
                name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log
            )
        else:
            assert spec.low is not None and spec.high is not None
            values[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return values


def random_points(space: dict[str, ParamSpec], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` points of the space drawn by Optuna's random sampler: the same points for the same seed."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(suggest(trial, space))
        study.tell(trial, 0.0)
    return points


def _axis(spec: ParamSpec) -> list[Any]:
    if spec.type == "categorical":
        assert spec.choices is not None
        return list(spec.choices)
    assert spec.low is not None and spec.high is not None
    if spec.type == "int":
        step = int(spec.step or 1)
        return list(range(int(spec.low), int(spec.high) + 1, step))
    assert spec.step is not None  # config refuses a float grid axis without a step
    n = math.floor((spec.high - spec.low) / spec.step + 1e-9) + 1
    # round() so 0.1 + 2*0.1 is stored as 0.3, the value a user reads in the study file
    return [round(spec.low + i * spec.step, 12) for i in range(n)]


def grid_points(space: dict[str, ParamSpec]) -> list[dict[str, Any]]:
    """Every point of the grid the space spans, in a stable order."""
    names = sorted(space)
    axes = [_axis(space[n]) for n in names]
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes)]


# The grid, in one place. It is not Optuna's GridSampler (which re-picks a running point once every point is
# taken): each point is queued once when the study is created (study.py), workers claim queued trials under
# the claim lock, and the study is done when no point is left queued (coordination/claims.py).


def is_grid(config: StudyConfig) -> bool:
    """Does the study run a grid (every point queued at creation) rather than a sampler's choices?"""
    return config.sampler.name == "grid"


def grid_size(config: StudyConfig) -> int | None:
    """How many points the study's grid has (None for a sampler that chooses)."""
    return len(grid_points(config.search_space)) if is_grid(config) else None
