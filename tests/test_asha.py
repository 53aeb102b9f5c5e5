"""ASHA's rung arithmetic and promotion rule on constructed trials (the rule of #13, exactly)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import run_on_cpu, spawn_script
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from sft_optuna import attrs
from sft_optuna.attrs import PROMOTED_FROM, RUNG
from sft_optuna.search.asha import due_promotion, rungs


def test_rungs_are_min_epochs_times_powers_of_eta_below_the_last_epoch() -> None:
    assert rungs(1, 3, 12) == [1, 3, 9]
    assert rungs(2, 2, 16) == [2, 4, 8]
    assert rungs(1, 3, 9) == [1, 3], "a trial reaching train.epochs is complete, not paused"
    assert rungs(5, 3, 4) == []
    with pytest.raises(ValueError, match="reduction_factor"):
        rungs(1, 1, 10)


def _trial(number: int, curve: list[float], state: TrialState, **user_attrs: object) -> FrozenTrial:
    t = optuna.trial.create_trial(
        params={"lr": 0.1},
        distributions={"lr": FloatDistribution(0.01, 1.0)},
        value=curve[-1] if state == TrialState.COMPLETE else None,
        intermediate_values={e: v for e, v in enumerate(curve, start=1)},
        state=state,
        user_attrs=user_attrs,
    )
    t.number = number
    return t


def _paused(number: int, curve: list[float], rung: int, **user_attrs: object) -> FrozenTrial:
    return _trial(number, curve, TrialState.PRUNED, rung=rung, reason=f"paused at rung {rung}", **user_attrs)


EPOCHS = [1, 3, 9]  # min_epochs 1, eta 3, train.epochs 12


def test_the_best_paused_trial_in_the_top_third_of_its_rung_is_promoted() -> None:
    values = [0.30, 0.50, 0.20, 0.45, 0.10, 0.40, 0.35, 0.25, 0.15]
    trials = [_paused(i, [v], 0) for i, v in enumerate(values)]
    assert due_promotion(trials, EPOCHS, 3).number == 1  # top 3 of 9: 0.50, 0.45, 0.40
    # trial 1 promoted (a new trial carrying its curve, same lineage): next is 0.45, then 0.40, then nobody
    trials.append(_trial(9, [0.50, 0.52], TrialState.RUNNING, lineage=1, **{PROMOTED_FROM: 1}))
    assert due_promotion(trials, EPOCHS, 3).number == 3
    trials.append(_trial(10, [0.45], TrialState.RUNNING, lineage=3, **{PROMOTED_FROM: 3}))
    trials.append(_trial(11, [0.40], TrialState.RUNNING, lineage=5, **{PROMOTED_FROM: 5}))
    assert due_promotion(trials, EPOCHS, 3) is None, "0.35 is outside the top third: start a new configuration"
    trials.append(_paused(12, [0.60], 0))  # a tenth curve: top 3 of 10 now holds 0.60 (not yet promoted)
    assert due_promotion(trials, EPOCHS, 3).number == 12


def test_higher_rungs_first_and_fewer_than_eta_curves_promote_nobody() -> None:
    assert due_promotion([_paused(0, [0.9], 0), _paused(1, [0.8], 0)], EPOCHS, 3) is None
    low = [_paused(i, [0.1 * i], 0) for i in range(6)]
    high = [
        _paused(6, [0.2, 0.3, 0.4], 1, lineage=2),
        _paused(7, [0.3, 0.5, 0.6], 1, lineage=3),
        _paused(8, [0.4, 0.4, 0.3], 1, lineage=4),
    ]
    # rung 1 (epoch 3) has 3 curves: its top 1 is lineage 3 (0.5) -> trial 7, before rung 0's candidates
    assert due_promotion(low + high, EPOCHS, 3).number == 7


def test_a_promotion_and_a_retry_of_one_lineage_count_once_and_dropped_claims_not_at_all() -> None:
    trials = [_paused(i, [0.1 * (i + 1)], 0) for i in range(3)]  # 3 curves: top 1 is trial 2 (0.3)
    trials.append(_trial(3, [0.3], TrialState.FAIL, lineage=2, reason=attrs.CLAIM_RACED))
    trials.append(_trial(4, [0.3], TrialState.FAIL, lineage=2))  # a failed attempt of the same lineage
    assert due_promotion(trials, EPOCHS, 3).number == 2
    assert RUNG == "rung"


PROMOTER = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from sft_optuna.coordination.claims import claim_trial
from sft_optuna.coordination.storage import open_storage
from sft_optuna.study import load_study
storage = open_storage(sys.argv[1])
study, config = load_study("t", storage)
study.get_trials()
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
trial = claim_trial(study, config)
print(json.dumps(None if trial is None else trial.user_attrs.get("promoted_from")))
"""


def _asha_study(root: Path, **sections: object) -> dict[str, object]:
    from conftest import study_dict

    sections.setdefault("pruner", {"name": "asha", "min_epochs": 1, "reduction_factor": 3})
    return study_dict(root, **sections)


@pytest.mark.slow
def test_two_workers_racing_for_one_promotion_one_wins(storage_url: str, tmp_path: Path) -> None:
    import json
    import time

    from sft_optuna.coordination.claims import claim_trial
    from sft_optuna.coordination.storage import open_storage
    from sft_optuna.study import create_study
    from sft_optuna.study_file import parse_study

    storage = open_storage(storage_url)
    study, _ = create_study(parse_study(_asha_study(tmp_path, budget={"n_trials": 3}, train={"epochs": 4})), storage)
    config = parse_study(_asha_study(tmp_path, budget={"n_trials": 3}, train={"epochs": 4}))
    best = -1
    for value in (0.2, 0.6, 0.4):  # three configurations paused at rung 0: the top third is the 0.6 one
        trial = claim_trial(study, config)
        assert trial is not None
        best = trial.number if value == 0.6 else best
        trial.report(value, 1)
        trial.set_user_attr(attrs.RUNG, 0)
        study.tell(trial, state=TrialState.PRUNED)
    start = time.time() + 6
    procs = [spawn_script(PROMOTER, storage_url, str(start)) for _ in range(2)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        got.append(json.loads(out.splitlines()[-1]))
    assert sorted(got, key=str) == [best, None], "one worker promotes the best, the other finds nothing due"
    trials = study.get_trials()
    promotions = [
        t for t in trials if PROMOTED_FROM in t.user_attrs and t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
    ]
    assert len(promotions) == 1 and promotions[0].params == trials[best].params
    assert promotions[0].user_attrs[attrs.LINEAGE] == best and promotions[0].state == TrialState.RUNNING


def test_an_asha_study_pauses_promotes_from_checkpoints_and_ends(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    from sft_optuna.cli import main
    from sft_optuna.coordination.claims import budget_used, study_done
    from sft_optuna.study_file import parse_study

    cfg = _asha_study(
        folder_root,
        pruner={"name": "asha", "min_epochs": 1, "reduction_factor": 2},
        budget={"n_trials": 4},
        train={"epochs": 4},  # rungs at epochs 1 and 2; a trial reaching epoch 4 completes
        search_space={"lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True}},
    )
    argv = run_on_cpu(sqlite_url, write_study(cfg), tmp_path / "ck")
    assert main(argv) == 0
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert study_done(trials, parse_study(cfg)) and budget_used(trials) == 4
    kept = sorted(p.name for p in (tmp_path / "ck" / "t").iterdir())
    assert kept == ["best.pt"], "a done study keeps the best trial's checkpoint, not the paused ones'"
    paused = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs[attrs.REASON].startswith("paused at rung") for t in paused)
    promotions = [t for t in trials if PROMOTED_FROM in t.user_attrs]
    assert promotions, "the best configurations go on"
    assert len({t.user_attrs[PROMOTED_FROM] for t in promotions}) == len(promotions), "no trial promoted twice"
    for t in promotions:
        source = trials[t.user_attrs[PROMOTED_FROM]]
        rung_epoch = [1, 2][source.user_attrs[RUNG]]
        assert t.params == source.params and t.user_attrs[attrs.LINEAGE] == source.user_attrs.get(
            attrs.LINEAGE, source.number
        )
        assert t.user_attrs[attrs.RESUMED_FROM_EPOCH] == rung_epoch, "resumed from the paused trial's checkpoint"
        for epoch, value in source.intermediate_values.items():
            assert t.intermediate_values[epoch] == pytest.approx(value, abs=1e-6), "the learning curve continues"
    (done,) = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(done.intermediate_values) == [1, 2, 3, 4]
    from sft_optuna.search.asha import occupancy

    rows = occupancy(trials, [1, 2])
    assert rows[0][:2] == (1, 4), "all four configurations reached epoch 1"
    assert rows[0][3] == len([t for t in promotions if t.user_attrs[attrs.FROM_RUNG] == 0])
    assert sum(r[2] + r[3] for r in rows) == len(paused)
    assert main(["--storage", sqlite_url, "status", "t"]) == 0
    # at rung 0 all four configurations were compared: the best of them went on
    best_at_1 = max((t for t in trials if PROMOTED_FROM not in t.user_attrs), key=lambda t: t.intermediate_values[1])
    assert any(t.user_attrs[PROMOTED_FROM] == best_at_1.number for t in promotions)


def test_a_paused_trial_without_its_checkpoint_is_promoted_from_epoch_zero(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str
) -> None:
    from sft_optuna.cli import main

    cfg = _asha_study(
        folder_root,
        pruner={"name": "asha", "min_epochs": 1, "reduction_factor": 2},
        budget={"n_trials": 2},
        train={"epochs": 2},
    )
    argv = run_on_cpu(sqlite_url, write_study(cfg), "none")
    assert main(argv) == 0
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    (promoted,) = [t for t in trials if PROMOTED_FROM in t.user_attrs]
    assert promoted.state == TrialState.COMPLETE and promoted.user_attrs[attrs.RESUMED_FROM_EPOCH] == 0
    assert sorted(promoted.intermediate_values) == [1, 2], "trained again from the start: nothing lost"


def test_epochs_used_counts_what_each_trial_trained_and_what_running_ones_will() -> None:
    from sft_optuna.coordination.claims import epochs_used
    from sft_optuna.study_file import parse_study

    config = parse_study(_asha_study(Path("."), train={"epochs": 4}, pruner={"name": "median"}))
    trials = [
        _trial(0, [0.1, 0.2, 0.3, 0.4], TrialState.COMPLETE, resumed_from_epoch=0),
        _trial(1, [0.1, 0.2, 0.3], TrialState.FAIL),  # died after 3 epochs
        _trial(2, [0.1, 0.2, 0.3, 0.4], TrialState.COMPLETE, resumed_from_epoch=2, retry_of=1),  # 2 trained
        _trial(3, [0.1], TrialState.RUNNING, resumed_from_epoch=0),  # will train 4
        _trial(4, [0.1], TrialState.FAIL, reason=attrs.CLAIM_RACED),
    ]
    assert epochs_used(trials, config) == 4 + 3 + 2 + 4
    asha = parse_study(_asha_study(Path("."), train={"epochs": 4}, pruner={"name": "asha", "reduction_factor": 2}))
    running = [_trial(0, [0.5], TrialState.RUNNING, resumed_from_epoch=1, **{attrs.FROM_RUNG: 0})]
    assert epochs_used(running, asha) == 1, "promoted from rung 0 (epoch 1): its next stop is rung 1 (epoch 2)"


@pytest.mark.parametrize("pruner", [{"name": "none"}, {"name": "asha", "min_epochs": 1, "reduction_factor": 2}])
def test_the_epoch_budget_stops_starting_work_that_would_exceed_it(
    pruner: dict[str, object],
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sft_optuna.cli import main
    from sft_optuna.coordination.claims import epochs_used, study_done
    from sft_optuna.study_file import parse_study

    cfg = _asha_study(folder_root, pruner=pruner, budget={"n_trials": 10, "epochs": 5}, train={"epochs": 2})
    argv = run_on_cpu(sqlite_url, write_study(cfg), tmp_path / "ck")
    assert main(argv) == 0
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    used = epochs_used(trials, parse_study(cfg))
    assert study_done(trials, parse_study(cfg))
    if pruner["name"] == "none":  # two trials of 2 epochs; a third would make 6 > 5
        assert used == 4 and len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    else:  # rung at epoch 1: pauses and promotions of one epoch each, to exactly 5
        assert used == 5
        assert any(PROMOTED_FROM in t.user_attrs for t in trials)
    capsys.readouterr()
    assert main(["--storage", sqlite_url, "status", "t"]) == 0
    assert f"epochs: {used} trained or planned by running trials of a budget of 5 ({5 - used} left)" in (
        capsys.readouterr().out
    )


def test_the_audit_decides_per_lineage_at_its_rate_and_counts_false_prunes() -> None:
    from sft_optuna.search.audit import audit_summary, is_audited

    picks = [is_audited(0.1, 0, lineage) for lineage in range(2000)]
    assert 150 < sum(picks) < 250 and picks == [is_audited(0.1, 0, lineage) for lineage in range(2000)]
    assert not any(is_audited(0.0, 0, n) for n in range(100)) and all(is_audited(1.0, 0, n) for n in range(100))
    survivors = [_trial(i, [v], TrialState.COMPLETE) for i, v in enumerate([0.5, 0.6, 0.7])]  # median 0.6
    audited = [
        _trial(3, [0.65], TrialState.COMPLETE, **{attrs.AUDITED: 1}),  # would have beaten the median: false
        _trial(4, [0.40], TrialState.COMPLETE, **{attrs.AUDITED: 1}),  # rightly stopped
        _trial(5, [0.10], TrialState.RUNNING, **{attrs.AUDITED: 1}),  # not finished: not judged
    ]
    summary = audit_summary(survivors + audited)
    assert summary == {
        "audited": 2,
        "false_prunes": 1,
        "false_prune_rate": 0.5,
        "best_was_audited": False,
        "survivors_median": 0.6,
    }
    assert audit_summary(survivors) is None
    assert audit_summary(audited) is None, "no trial the pruner let run yet: nothing to compare with"


def test_an_audited_median_pruner_lets_would_be_pruned_trials_finish_and_status_reports_it(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sft_optuna.cli import main

    cfg = _asha_study(
        folder_root,
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "audit": 1.0},
        budget={"n_trials": 4},
        train={"epochs": 2},
        search_space={"lr": {"type": "float", "low": 1e-5, "high": 0.3, "log": True}},
    )
    argv = run_on_cpu(sqlite_url, write_study(cfg), "none")
    assert main(argv) == 0
    trials = optuna.load_study(study_name="t", storage=sqlite_url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials), "with audit 1.0 nothing is stopped"
    stopped = [t for t in trials if attrs.AUDITED in t.user_attrs]
    assert stopped, "the median pruner would have stopped some of these four"
    capsys.readouterr()
    assert main(["--storage", sqlite_url, "status", "t"]) == 0
    assert f"pruner audit: {len(stopped)} trials ran on past a stop" in capsys.readouterr().out


def test_an_audit_without_a_pruner_or_out_of_range_is_refused() -> None:
    from sft_optuna.config import PrunerConfig
    from sft_optuna.errors import ConfigError
    from sft_optuna.search.samplers import check_pruner

    for cfg in (PrunerConfig("none", {"audit": 0.1}), PrunerConfig("median", {"audit": 1.5})):
        with pytest.raises(ConfigError, match=r"pruner\.audit: a share of stop decisions between 0 and 1"):
            check_pruner(cfg)
    check_pruner(PrunerConfig("asha", {"audit": 0.2, "reduction_factor": 3}))


def test_the_sampler_learns_from_one_trial_per_lineage_its_latest_finished_one() -> None:
    from sft_optuna.search.asha import sampler_view

    trials = [
        _paused(0, [0.5], 0),  # promoted: its continuation (3) is still running
        _paused(1, [0.6], 0),  # promoted and finished (4)
        _paused(2, [0.2], 0),  # never promoted
        _trial(3, [0.5, 0.55], TrialState.RUNNING, lineage=0, **{PROMOTED_FROM: 0}),
        _trial(4, [0.6, 0.7, 0.8], TrialState.COMPLETE, lineage=1, **{PROMOTED_FROM: 1}),
        _trial(5, [0.3], TrialState.FAIL),  # died before finishing anything: its retry runs
        _trial(6, [0.3], TrialState.RUNNING, lineage=5),
        _trial(7, [0.4, 0.45], TrialState.PRUNED, lineage=2, **{PROMOTED_FROM: 2}),  # pruned at a later step
        _trial(8, [], TrialState.WAITING),
    ]
    assert [t.number for t in sampler_view(trials)] == [0, 4, 5, 6, 7, 8]


def test_a_claims_sampler_sees_a_promoted_configuration_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import study_dict

    from sft_optuna.coordination import claims
    from sft_optuna.coordination.storage import open_storage
    from sft_optuna.study import create_study, load_study
    from sft_optuna.study_file import parse_study

    seen: list[list[int]] = []

    class Recording(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):  # type: ignore[no-untyped-def]
            seen.append([t.number for t in study.get_trials(deepcopy=False)])
            return super().sample_independent(study, trial, name, distribution)

    monkeypatch.setattr(claims, "sampler_for_trial", lambda *_: Recording(seed=0))
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    create_study(parse_study(study_dict(tmp_path, budget={"n_trials": 2})), storage)
    study, config = load_study("t", storage)
    params = {"lr": 0.05, "momentum": 0.9}
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
        "momentum": optuna.distributions.FloatDistribution(0.8, 0.99),
    }
    paused = optuna.trial.create_trial(
        params=params,
        distributions=dists,
        state=TrialState.PRUNED,
        intermediate_values={1: 0.6},
        user_attrs={RUNG: 0},
    )
    study.add_trial(paused)
    number = study.trials[-1].number
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions=dists,
            state=TrialState.COMPLETE,
            value=0.8,
            intermediate_values={1: 0.6, 2: 0.7, 3: 0.8},
            user_attrs={attrs.LINEAGE: number, PROMOTED_FROM: number},
        )
    )
    trial = claims.claim_trial(study, config)
    assert trial is not None and seen, "the sampler was asked"
    assert number not in seen[0] and number + 1 in seen[0], f"the sampler saw {seen[0]}"


def test_under_asha_the_sampler_models_the_deepest_budget_enough_curves_reached(tmp_path: Path) -> None:
    from conftest import study_dict

    from sft_optuna.search.asha import sampler_view
    from sft_optuna.study_file import parse_study

    config = parse_study(
        study_dict(
            tmp_path,
            sampler={"name": "tpe", "seed": 0, "n_startup_trials": 3},
            pruner={"name": "asha", "min_epochs": 1, "reduction_factor": 3},
            train={"epochs": 12},
        )
    )  # rungs at epochs 1, 3, 9
    trials = [
        _paused(0, [0.1], 0),
        _paused(1, [0.2], 0),
        _trial(2, [0.3, 0.35, 0.4], TrialState.PRUNED, rung=1),
        _trial(3, [0.2, 0.3, 0.5], TrialState.PRUNED, rung=1),
        _trial(4, [0.4] * 9, TrialState.PRUNED, rung=2),
        _trial(5, [0.1], TrialState.RUNNING),
    ]
    view = sampler_view(trials, config)
    # epoch 9: one curve; epoch 3: three (= n_startup_trials) -> modelled at epoch 3, as finished trials
    assert [t.number for t in view] == [2, 3, 4, 5]
    assert [(t.state, t.value) for t in view[:3]] == [(TrialState.COMPLETE, v) for v in (0.4, 0.5, 0.4)]
    assert view[3].state == TrialState.RUNNING and trials[2].state == TrialState.PRUNED, "copies, not the trials"
    done = [_trial(n, [0.5] * 12, TrialState.COMPLETE) for n in (6, 7, 8)]
    assert [t.number for t in sampler_view(trials + done, config)] == [5, 6, 7, 8], "three finished: the end"
    # a study without ASHA: one trial per lineage, nothing else changed
    assert sampler_view(trials, parse_study(study_dict(tmp_path))) == trials
