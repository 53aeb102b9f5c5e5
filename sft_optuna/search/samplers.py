"""Samplers and pruners, picked by name from a table.

The grid is not an Optuna ``GridSampler``: that sampler re-picks a running point once every point is taken,
so several workers train a point twice. Instead each grid point is queued once when the study is created and
each queued trial is claimed by exactly one worker (see ``coordination/claims.py``); the sampler of a grid
study only ever sees fixed parameters.

Concurrent workers: ``tpe`` treats running trials as bad guesses (``constant_liar``, on by default); ``qmc``
needs nothing of the kind (trial n takes the n-th point of one scrambled Sobol sequence, seeded by the study
seed in every worker); ``gp`` passes running trials to its acquisition function as pending points (Optuna 5)
but models COMPLETE trials only; ``cmaes`` has no such option: concurrent workers may propose points close to
each other (it updates its distribution once per generation of ``popsize`` trials).
"""

from __future__ import annotations

import hashlib
import inspect
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial, TrialState

from sft_optuna.config import PrunerConfig, SamplerConfig
from sft_optuna.errors import ConfigError
from sft_optuna.search.asha import AshaPruner
from sft_optuna.search.audit import AUDIT

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "CachedCompletedPruner",
    "check_pruner",
    "check_sampler",
    "make_pruner",
    "make_sampler",
    "refresh_stretch",
    "sampler_for_trial",
    "trial_seed",
]


def _tpe(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    # constant_liar: running trials count as bad guesses, so concurrent workers spread out.
    options.setdefault("constant_liar", True)
    return optuna.samplers.TPESampler(seed=seed, **options)


def _random(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **options)


def _gp(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, **options)


def _cmaes(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    # Categorical parameters (batch size, schedule) go to its independent (random) sampler: say so once, in the
    # README, not in a warning per trial.
    options.setdefault("warn_independent_sampling", False)
    return optuna.samplers.CmaEsSampler(seed=seed, **options)


def _qmc(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    # The same scrambled sequence in every worker: seeded by the study seed (see STUDY_SEEDED), never None.
    options.setdefault("warn_independent_sampling", False)
    return optuna.samplers.QMCSampler(seed=0 if seed is None else seed, **options)


def _grid(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    # Every grid trial is queued with all its parameters fixed; this sampler is never asked to choose.
    return optuna.samplers.RandomSampler(seed=seed, **options)


SAMPLERS: dict[str, tuple[Callable[..., optuna.samplers.BaseSampler], Callable[..., Any]]] = {
    # name -> (factory, constructor whose keyword arguments the study file may set)
    "tpe": (_tpe, optuna.samplers.TPESampler),
    "random": (_random, optuna.samplers.RandomSampler),
    "grid": (_grid, lambda: None),
    "gp": (_gp, optuna.samplers.GPSampler),
    "cmaes": (_cmaes, optuna.samplers.CmaEsSampler),
    "qmc": (_qmc, optuna.samplers.QMCSampler),
}

STUDY_SEEDED = frozenset({"qmc"})
"""Samplers built with the study's own seed for every trial, not a per-trial one (a QMC sequence must be one
sequence across workers and trials)."""

PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
    "asha": AshaPruner,  # pauses and promotes from checkpoints (search/asha.py); never stops a trial
}


def _check_options(where: str, ctor: Callable[..., Any], options: dict[str, Any], reserved: set[str]) -> None:
    params = inspect.signature(ctor).parameters
    for key in options:
        if key in reserved or key not in params:
            allowed = sorted(set(params) - reserved - {"self"})
            raise ConfigError(f"{where}.{key}: unknown option (allowed: {', '.join(allowed) or 'none'})")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(where: str, ctor: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse an option whose value is not of the constructor's declared type (``n_startup_trials: "two"``):
    Optuna's constructors store it and fail only at the first suggest, inside a claimed trial. Only plain
    declared types (int, float, bool, str, None and their unions) are checked; the rest the constructor judges."""
    params = inspect.signature(ctor).parameters
    for key, value in options.items():
        annotation = params[key].annotation if key in params else inspect.Parameter.empty
        text = annotation if isinstance(annotation, str) else str(getattr(annotation, "__name__", ""))
        parts = [p.strip() for p in text.split("|")]
        if not parts or not all(p in _TYPES or p == "None" for p in parts):
            continue
        if value is None and "None" in parts:
            continue
        kinds = tuple(k for p in parts if p in _TYPES for k in _TYPES[p])
        if (isinstance(value, bool) and "bool" not in parts) or not isinstance(value, kinds):
            raise ConfigError(f"{where}.{key}: {value!r} is not {' or '.join(parts)}")


def check_sampler(cfg: SamplerConfig, where: str = "sampler") -> None:
    """Refuse an unknown sampler name or option, and options the sampler rejects."""
    if cfg.name not in SAMPLERS:
        raise ConfigError(f"{where}.name: unknown sampler {cfg.name!r} (known: {', '.join(SAMPLERS)})")
    _check_options(where, SAMPLERS[cfg.name][1], cfg.options, {"seed"})
    _check_types(where, SAMPLERS[cfg.name][1], cfg.options)
    try:
        make_sampler(cfg, 0)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_pruner(cfg: PrunerConfig, where: str = "pruner") -> None:
    """Refuse an unknown pruner name or option, and options the pruner rejects."""
    if cfg.name not in PRUNERS:
        raise ConfigError(f"{where}.name: unknown pruner {cfg.name!r} (known: {', '.join(PRUNERS)})")
    rate = cfg.options.get(AUDIT, 0.0)
    if AUDIT in cfg.options and (cfg.name == "none" or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ConfigError(f"{where}.{AUDIT}: a share of stop decisions between 0 and 1 (and a pruner that stops)")
    _check_options(where, PRUNERS[cfg.name], {k: v for k, v in cfg.options.items() if k != AUDIT}, set())
    _check_types(where, PRUNERS[cfg.name], {k: v for k, v in cfg.options.items() if k != AUDIT})
    try:
        make_pruner(cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def trial_seed(study_seed: int | None, trial_number: int) -> int | None:
    """A seed for one trial's sampler: the same in every worker for the same trial, different across trials.

    One seeded sampler per worker would make every worker draw the same start-up points.
    """
    if study_seed is None:
        return None
    digest = hashlib.sha256(f"{study_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(cfg: SamplerConfig, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler that picks trial ``trial_number``'s parameters."""
    factory = SAMPLERS[cfg.name][0]
    seed = cfg.seed if cfg.name in STUDY_SEEDED else trial_seed(cfg.seed, trial_number)
    return factory(seed, **cfg.options)


def _reseedable(sampler: optuna.samplers.BaseSampler) -> bool:
    if type(sampler) is optuna.samplers.RandomSampler:
        return isinstance(getattr(sampler, "_rng", None), LazyRandomState)
    if type(sampler) is optuna.samplers.TPESampler:
        return isinstance(getattr(sampler, "_rng", None), LazyRandomState) and _reseedable(
            getattr(sampler, "_random_sampler", None)  # type: ignore[arg-type]
        )
    return False


def sampler_for_trial(
    sampler: optuna.samplers.BaseSampler, cfg: SamplerConfig, trial_number: int
) -> optuna.samplers.BaseSampler:
    """What :func:`make_sampler` returns, reusing ``sampler`` (the study's current one) where that is the same.

    TPE keeps the study's search space as it grows (an incremental pass over new trials); a new sampler per
    claim recomputes it over every trial — 65 ms a claim at 2,000 trials. So a TPE or random sampler is kept and
    only its random state is seeded for the trial (Optuna has no public call for that: where its internals are
    not the ones known here, a new sampler is made; tests check both give the same parameters).
    """
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if type(sampler) is not kinds.get(cfg.name) or not _reseedable(sampler):
        return make_sampler(cfg, trial_number)
    seed = trial_seed(cfg.seed, trial_number)
    if seed is None:
        sampler.reseed_rng()
        return sampler
    sampler._rng.rng.seed(seed)  # type: ignore[attr-defined]
    if isinstance(sampler, optuna.samplers.TPESampler):
        sampler._random_sampler._rng.rng.seed(seed)
    return sampler


COMPLETED_REFRESH_S = 60.0  # how stale the pruner's view of *completed* trials may be (trials take minutes)
VIEWS_PER_REFRESH = 8
"""With many workers, the study's completed trials are read for pruning about this many times per
:data:`COMPLETED_REFRESH_S` in all, not once per worker: each worker's refresh interval stretches with the
running trials it saw (up to :data:`MAX_REFRESH_STRETCH` times)."""
MAX_REFRESH_STRETCH = 4.0
"""The most a worker's refresh interval stretches: its median comes from a view at most 4 minutes old."""


class _StudyView:
    """A study whose list of COMPLETE trials comes from a cache; everything else is the study itself."""

    def __init__(self, study: optuna.Study, completed: list[FrozenTrial]) -> None:
        self._study = study
        self._completed = completed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        if not deepcopy and states is not None and tuple(states) == (TrialState.COMPLETE,):
            return self._completed
        return self._study.get_trials(deepcopy=deepcopy, states=states)


class _View(NamedTuple):
    fetched_at: float
    completed: list[FrozenTrial]
    stretch: float
    """The refresh interval's factor: ``min(max(1, running / VIEWS_PER_REFRESH), MAX_REFRESH_STRETCH)``,
    jittered by U(0.75, 1.25) where it is above 1 (never below 1) so that a cluster's refreshes do not fall in
    step."""


def refresh_stretch(running: int) -> float:
    """The factor a worker's refresh interval is stretched by when it saw ``running`` trials (not jittered)."""
    return min(max(1.0, running / VIEWS_PER_REFRESH), MAX_REFRESH_STRETCH)


class CachedCompletedPruner(optuna.pruners.BasePruner):
    """Wraps a pruner that compares against the study's completed trials (median, percentile) and serves
    those from a cache refreshed at most every ``refresh_s`` seconds — stretched up to 4× in a large cluster.

    Optuna's percentile pruner re-reads the study on every ``should_prune``: on PostgreSQL that is ~9 queries,
    ~11 ms per epoch even with 100 trials (measured, benchmarks/storage.py). Completed trials never change, so
    a view up to a minute old prunes the same way for trials that take minutes, at a fraction of the cost.
    With R trials running, each worker refreshes every ``refresh_s × min(max(1, R/8), 4)``: 256 workers read
    the study for pruning about 8 times a minute in all, not 256 (through the gRPC proxy every such read
    carries every running trial: at 256 workers they were most of the proxy's reads, benchmarks/scale.py).
    A median over hundreds of completed trials moves little in four minutes.
    """

    def __init__(self, inner: optuna.pruners.BasePruner, refresh_s: float = COMPLETED_REFRESH_S) -> None:
        self.inner = inner
        self.refresh_s = refresh_s
        self._cache: dict[int, _View] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        now = time.monotonic()
        key = study._study_id
        view = self._cache.get(key)
        # Below the startup count the pruner is idle and the study small: keep the view fresh, so that the
        # pruning starts as soon as enough trials have completed.
        startup = int(getattr(self.inner, "_n_startup_trials", 0))
        if view is None or now - view.fetched_at > self.refresh_s * view.stretch or len(view.completed) < startup:
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            completed = [t for t in trials if t.state == TrialState.COMPLETE]
            stretch = refresh_stretch(len(trials) - len(completed))
            view = _View(now, completed, max(1.0, stretch * random.uniform(0.75, 1.25)) if stretch > 1 else 1.0)
            self._cache[key] = view
        return self.inner.prune(_StudyView(study, view.completed), trial)  # type: ignore[arg-type]

    def invalidate(self) -> None:
        """Forget the cached view (a worker calls this after finishing a trial of its own) where the cluster
        is small; among more than :data:`VIEWS_PER_REFRESH` running trials one more completion hardly moves
        the median, and a read per finished trial is what the stretched interval saves."""
        self._cache = {k: v for k, v in self._cache.items() if v.stretch > 1}


def make_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    """The pruner a config names (median and percentile read completed trials through a cache)."""
    pruner = PRUNERS[cfg.name](**{k: v for k, v in cfg.options.items() if k != AUDIT})
    if cfg.name in ("median", "percentile"):
        return CachedCompletedPruner(pruner)
    return pruner
