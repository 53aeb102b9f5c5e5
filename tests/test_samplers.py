"""Samplers and pruners: per-trial seeds, and the cached median pruner deciding exactly as Optuna's."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from sft_optuna.config import PrunerConfig, SamplerConfig
from sft_optuna.search.samplers import (
    CachedCompletedPruner,
    make_pruner,
    make_sampler,
    refresh_stretch,
    sampler_for_trial,
    trial_seed,
)


def test_trial_seeds_are_shared_across_workers_and_differ_across_trials() -> None:
    assert trial_seed(0, 5) == trial_seed(0, 5)
    assert len({trial_seed(0, n) for n in range(100)}) == 100
    assert trial_seed(None, 3) is None
    a = make_sampler(SamplerConfig("random", 0), 7)
    b = make_sampler(SamplerConfig("random", 0), 7)
    dist = {"x": FloatDistribution(0, 1)}
    sa = optuna.create_study(sampler=a)
    sb = optuna.create_study(sampler=b)
    assert sa.ask(dist).params == sb.ask(dist).params


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_a_kept_sampler_reseeded_per_trial_suggests_what_a_new_one_would(name: str) -> None:
    """Claims keep the study's TPE sampler (its search space grows incrementally) and only reseed it: every
    trial must get exactly the parameters a sampler made for that trial would give (start-up and TPE phase)."""
    cfg = SamplerConfig(name, 3, {"n_startup_trials": 5, "multivariate": True} if name == "tpe" else {})
    dists = {
        "lr": FloatDistribution(1e-4, 1.0, log=True),
        "momentum": FloatDistribution(0.8, 0.99),
        "batch": CategoricalDistribution([64, 128, 256]),
    }
    kept = optuna.create_study(direction="maximize", sampler=make_sampler(cfg, 0))
    fresh = optuna.create_study(direction="maximize")
    first = kept.sampler
    for number in range(15):
        kept.sampler = sampler_for_trial(kept.sampler, cfg, number)
        fresh.sampler = make_sampler(cfg, number)
        a, b = kept.ask(dists), fresh.ask(dists)
        assert a.params == b.params, number
        value = -abs(math.log10(a.params["lr"]) + 2) + a.params["momentum"]
        kept.tell(a, value)
        fresh.tell(b, value)
    assert kept.sampler is first  # reused, not remade (else the test above would prove nothing)


def _study_with_curves(n: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    study.add_trials(
        [
            create_trial(
                params={"lr": 0.01},
                distributions=dist,
                value=0.5,
                # spread out, so the median of all of them differs from the median of any half
                intermediate_values={s: 0.1 * s + 0.05 * i for s in range(1, 6)},
                state=TrialState.COMPLETE,
            )
            for i in range(n)
        ]
    )
    return study


# at step 2 the completed curves run 0.2 .. 0.75 (median 0.475); the first half's median is 0.325
@pytest.mark.parametrize("value", [0.05, 0.2, 0.4, 0.46, 0.5, 0.8])
def test_cached_median_pruner_decides_like_optunas(value: float) -> None:
    study = _study_with_curves(12)
    trial = study.ask({"lr": FloatDistribution(1e-4, 1.0, log=True)})
    trial.report(value, 2)
    frozen = study._storage.get_trial(trial._trial_id)
    plain = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    ours = make_pruner(PrunerConfig("median", {"n_startup_trials": 5, "n_warmup_steps": 1}))
    assert isinstance(ours, CachedCompletedPruner)
    assert ours.prune(study, frozen) == plain.prune(study, frozen)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every ``Study.get_trials`` call from now on, by the states it asked for."""
    calls: list[object] = []
    real = optuna.Study.get_trials

    def counting(self: optuna.Study, deepcopy: bool = True, states: object = None) -> list:  # type: ignore[type-arg]
        calls.append(states)
        return real(self, deepcopy=deepcopy, states=states)  # type: ignore[arg-type]

    monkeypatch.setattr(optuna.Study, "get_trials", counting)
    return calls


def test_cached_pruner_reads_completed_trials_once_per_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study_with_curves(8)
    calls = _count_reads(monkeypatch)
    pruner = CachedCompletedPruner(optuna.pruners.MedianPruner(n_startup_trials=2), refresh_s=3600)
    trial = study.ask({"lr": FloatDistribution(1e-4, 1.0, log=True)})
    for step in range(1, 6):
        trial.report(0.9, step)
        pruner.prune(study, study._storage.get_trial(trial._trial_id))
    assert len(calls) == 1
    pruner.refresh_s = 0.0
    pruner.prune(study, study._storage.get_trial(trial._trial_id))
    assert len(calls) == 2


@pytest.mark.parametrize("running", [0, 40])
def test_in_a_large_cluster_the_cached_pruner_refreshes_less_often_and_not_per_own_trial(
    running: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 running trials: each worker's view lives refresh_s x 4 (jittered 3..5x), so 256 workers read the
    # study for pruning ~8 times per refresh_s, not 256; a worker's own completion does not force a read.
    # No running trials (a small cluster): every refresh_s, and at once after the worker's own completion.
    assert [refresh_stretch(r) for r in (0, 8, 16, 40, 256)] == [1.0, 1.0, 2.0, 4.0, 4.0]
    study = _study_with_curves(8)
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    for _ in range(running):
        study.ask(dist)
    trial = study.ask(dist)
    trial.report(0.9, 2)
    reads = _count_reads(monkeypatch)
    pruner = CachedCompletedPruner(optuna.pruners.MedianPruner(n_startup_trials=2), refresh_s=10.0)
    frozen = study._storage.get_trial(trial._trial_id)

    def aged(seconds: float) -> int:  # the view made ``seconds`` ago; how many reads after one more check
        key = study._study_id
        pruner._cache[key] = pruner._cache[key]._replace(fetched_at=pruner._cache[key].fetched_at - seconds)
        pruner.prune(study, frozen)
        return len(reads)

    pruner.prune(study, frozen)
    assert len(reads) == 1
    assert aged(11.0) == (1 if running else 2)  # past refresh_s: a small cluster reads again
    assert aged(20.0) == (1 if running else 3)  # 31 s: still inside a large cluster's 30-50 s
    assert aged(20.0) == (2 if running else 4)  # 51 s: past it
    pruner.invalidate()  # the worker finished a trial of its own
    pruner.prune(study, frozen)
    assert len(reads) == (2 if running else 5)


def test_cached_pruner_refreshes_below_the_startup_count_when_other_workers_complete_trials(tmp_path: Path) -> None:
    # Two workers = two processes' views of one storage. Worker A's cache is filled while only 2 trials are
    # complete (below n_startup_trials: no pruning yet); worker B then completes 8 more. A's next check must
    # see them at once (a stale view would stay below the startup count and never prune) and prune a trial
    # that is worse than the median of all ten.
    url = f"sqlite:///{tmp_path / 'p.db'}"
    optuna.create_study(study_name="p", storage=url, direction="maximize")
    pruner = make_pruner(PrunerConfig("median", {"n_startup_trials": 4, "n_warmup_steps": 0}))
    assert isinstance(pruner, CachedCompletedPruner)
    pruner.refresh_s = 3600.0  # only the start-up rule can make it read again
    worker_a = optuna.load_study(study_name="p", storage=url, pruner=pruner)
    worker_b = optuna.load_study(study_name="p", storage=url)
    dist = {"lr": FloatDistribution(1e-4, 1.0, log=True)}

    def complete(i: int) -> None:
        worker_b.add_trial(
            create_trial(
                params={"lr": 0.01},
                distributions=dist,
                value=0.5,
                intermediate_values={1: 0.1 * i, 2: 0.1 * i},
                state=TrialState.COMPLETE,
            )
        )

    for i in range(2):
        complete(i)
    trial = worker_a.ask(dist)
    trial.report(0.35, 1)
    assert not trial.should_prune(), "2 completed trials: below the startup count"
    for i in range(2, 10):
        complete(i)
    trial.report(0.35, 2)
    assert trial.should_prune(), "0.35 is below the median (0.45) of the ten completed trials"


@pytest.mark.parametrize("name", ["gp", "cmaes", "qmc"])
def test_more_samplers_by_name_propose_distinct_points_through_the_real_claims(name: str, tmp_path: Path) -> None:
    from conftest import study_dict

    from sft_optuna.coordination.claims import claim_trial
    from sft_optuna.coordination.storage import open_storage
    from sft_optuna.study import create_study, load_study
    from sft_optuna.study_file import parse_study

    space = {
        "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "momentum": {"type": "float", "low": 0.8, "high": 0.99},
    }
    options = {"n_startup_trials": 3} if name in ("gp", "cmaes") else {}
    cfg = study_dict(tmp_path, sampler={"name": name, "seed": 0, **options}, budget={"n_trials": 8}, search_space=space)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    create_study(parse_study(cfg), storage)
    study, config = load_study("t", storage)
    seen = []
    while (trial := claim_trial(study, config)) is not None:
        seen.append((trial.params["lr"], trial.params["momentum"]))
        study.tell(trial, 1.0 - abs(trial.params["lr"] - 0.1))  # something to model
    assert len(seen) == 8 and len(set(seen)) == 8
    if name == "qmc":  # one scrambled Sobol sequence, whoever claims: trial n is its n-th point
        plain = optuna.create_study(sampler=optuna.samplers.QMCSampler(seed=0, warn_independent_sampling=False))
        for _ in range(8):
            t = plain.ask()
            t.suggest_float("lr", 1e-3, 1.0, log=True)
            t.suggest_float("momentum", 0.8, 0.99)
            plain.tell(t, 0.0)
        assert seen == [(t.params["lr"], t.params["momentum"]) for t in plain.trials]


def test_a_new_samplers_unknown_option_is_one_line() -> None:
    from sft_optuna.errors import ConfigError
    from sft_optuna.search.samplers import check_sampler

    with pytest.raises(ConfigError, match=r"sampler\.constant_liar: unknown option \(allowed: .*n_startup_trials"):
        check_sampler(SamplerConfig("gp", 0, {"constant_liar": True}))


def test_random_points_are_the_same_for_the_same_seed_and_lie_in_the_space() -> None:
    from sft_optuna.config import ParamSpec
    from sft_optuna.search.space import random_points

    space = {
        "lr": ParamSpec("float", low=1e-4, high=0.3, log=True),
        "batch_size": ParamSpec("categorical", choices=[64, 128]),
    }
    points = random_points(space, 20, seed=0)  # record_curves.py's configurations: a resumed run continues them
    assert points == random_points(space, 20, seed=0) and points != random_points(space, 20, seed=1)
    assert all(1e-4 <= p["lr"] <= 0.3 and p["batch_size"] in (64, 128) for p in points)
    assert len({p["lr"] for p in points}) == 20
