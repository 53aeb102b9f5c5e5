"""Several worker processes on one storage: exact budget, no grid point twice, resume after Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import assert_resumed_from_checkpoint, spawn_worker, started, study_dict, wait_for
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.cli import main
from sft_optuna.coordination.storage import open_storage
from sft_optuna.study import load_study

pytestmark = pytest.mark.slow


def _study(url: str, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url).optuna)


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_workers_on_one_storage_reach_exactly_the_budget(
    folder_root: Path, write_study: Callable[..., Path], storage_url: str, tmp_path: Path
) -> None:
    sqlite_url = storage_url
    cfg = study_dict(
        folder_root,
        sampler={"name": "tpe", "seed": 0, "n_startup_trials": 2},
        budget={"n_trials": 5},
        train={"epochs": 1},
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    outs = _finish([spawn_worker(sqlite_url, "t", tmp_path / "ck") for _ in range(2)])
    trials = _study(sqlite_url).get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    hosts = {t.user_attrs[attrs.HOST].split()[0] for t in trials}
    assert len(hosts) == 2, "both workers should have run trials"
    assert len({t.params["lr"] for t in trials}) == 5, "workers must not draw the same points"
    assert not any("database is locked" in o for o in outs)


def test_grid_with_three_workers_trains_no_point_twice(
    folder_root: Path, write_study: Callable[..., Path], storage_url: str, tmp_path: Path
) -> None:
    sqlite_url = storage_url
    space = {"lr": {"type": "categorical", "choices": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]}}
    cfg = study_dict(
        folder_root, sampler={"name": "grid"}, budget={"n_trials": 100}, search_space=space, train={"epochs": 1}
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    _finish([spawn_worker(sqlite_url, "t", tmp_path / "ck") for _ in range(3)])
    trials = _study(sqlite_url).get_trials()
    assert sorted(t.params["lr"] for t in trials) == [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    assert all(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.parametrize("n_trials, max_retries", [(2, 2), (1, 2), (1, 0)])
def test_ctrl_c_fails_the_trial_and_the_next_worker_resumes_it_from_its_checkpoint(
    n_trials: int,
    max_retries: int,
    folder_root: Path,
    write_study: Callable[..., Path],
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # n_trials 1: the interrupted trial is the last of the budget (before: "budget already spent", never resumed)
    # max_retries 0: an operator's stop is not a failure of the trial and uses up no retry
    cfg = study_dict(folder_root, budget={"n_trials": n_trials, "max_retries": max_retries}, train={"epochs": 4})
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    proc = spawn_worker(sqlite_url, "t", ckpt)

    def first_epoch_reported() -> bool:
        trials = _study(sqlite_url).get_trials()
        return bool(trials) and len(trials[0].intermediate_values) >= 1

    wait_for(first_epoch_reported, 120, "the first epoch")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    first = _study(sqlite_url).get_trials()[0]
    assert first.state == TrialState.FAIL and first.user_attrs[attrs.REASON] == "interrupted"
    done_epochs = len(first.intermediate_values)
    assert 1 <= done_epochs < 4

    _finish([spawn_worker(sqlite_url, "t", ckpt)])
    trials = _study(sqlite_url).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n_trials and TrialState.RUNNING not in states
    capsys.readouterr()
    assert main(["--storage", sqlite_url, "status", "t"]) == 0
    out = capsys.readouterr().out
    assert f"budget {n_trials}/{n_trials} used; " in out
    assert "lineage 0: 1 retried, 0 used" in out, "an operator's stop uses up no retry"
    retry = next(t for t in trials if t.user_attrs.get(attrs.RETRY_OF) == 0)
    assert retry.params == first.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] == done_epochs
    # the learning curve continues: the same values for the epochs done before, then the rest, no gaps
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]
    for step, value in first.intermediate_values.items():
        assert retry.intermediate_values[step] == value


def test_a_claim_on_an_empty_queue_makes_no_trial_and_the_budget_stays_exact(
    folder_root: Path, write_study: Callable[..., Path], storage_url: str
) -> None:
    from sft_optuna.coordination import claims

    cfg = study_dict(folder_root, budget={"n_trials": 2}, train={"epochs": 1})
    assert main(["--storage", storage_url, "create", str(write_study(cfg))]) == 0
    storage = open_storage(storage_url)
    study, config = load_study("t", storage)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 2, "the budget is queued"
    first, second = claims.claim_trial(study, config), claims.claim_trial(study, config)
    assert first is not None and second is not None
    assert {first.user_attrs[attrs.SLOT], second.user_attrs[attrs.SLOT]} == {0, 1}
    # Optuna's ask() would now make a third, fresh trial (over the budget); a claim makes none
    assert claims.claim_trial(study, config) is None
    trials = study.get_trials()
    assert len(trials) == 2 and claims.budget_used(trials) == 2


def test_a_claim_waits_for_budget_slots_still_to_be_queued_and_not_when_none_are(
    folder_root: Path, sqlite_url: str
) -> None:
    """More workers than the queue holds (a cluster's cold start): a claim that finds the queue empty while the
    owner of an earlier chunk is still queuing the next one gets a trial seconds later, not None (on which a
    worker would sleep a whole poll interval, saying the budget was spent)."""
    from sft_optuna.coordination import claims
    from sft_optuna.study_file import parse_study

    n = claims.QUEUE_CHUNK + 8
    config = parse_study(study_dict(folder_root, budget={"n_trials": n}, train={"epochs": 1}))
    study = optuna.create_study(storage=open_storage(sqlite_url).optuna, study_name="t", direction="maximize")
    study.set_user_attr(attrs.STUDY_CONFIG, config.to_dict())
    claims._queue_chunk(study, config, 1)  # slots 32..39 queued; 0..31 still to be queued
    for _ in range(8):
        trial = claims.claim_trial(study, config)
        assert trial is not None
        study.tell(trial, 0.5)
    assert claims.slots_to_queue(study.get_trials(), config) == claims.QUEUE_CHUNK
    threading.Timer(1.0, claims._queue_chunk, (study, config, 0)).start()  # the owner, a moment later
    t0 = time.monotonic()
    trial = claims.claim_trial(study, config)
    assert trial is not None, "the claim gave up while budget slots were still to be queued"
    assert trial.user_attrs[attrs.SLOT] in range(claims.QUEUE_CHUNK) and time.monotonic() - t0 >= 0.9
    study.tell(trial, 0.5)
    while (trial := claims.claim_trial(study, config)) is not None:
        study.tell(trial, 0.5)
    t0 = time.monotonic()
    assert claims.claim_trial(study, config) is None and time.monotonic() - t0 < 1.0, "nothing to wait for"
    trials = study.get_trials()
    assert sorted(t.user_attrs[attrs.SLOT] for t in trials) == list(range(n)) and claims.budget_used(trials) == n


def _frozen(number: int, state: TrialState, **user_attrs: object) -> optuna.trial.FrozenTrial:
    from optuna.distributions import FloatDistribution

    t = optuna.trial.create_trial(
        params={"lr": 0.1},
        distributions={"lr": FloatDistribution(0.01, 1.0)},
        value=0.5 if state == TrialState.COMPLETE else None,
        state=state,
        user_attrs=user_attrs,
    )
    t.number = number
    return t


def test_of_two_retries_of_one_trial_or_two_copies_of_one_slot_the_later_is_the_raced_one() -> None:
    from sft_optuna.coordination.claims import raced

    trials = [
        _frozen(0, TrialState.FAIL, slot=0),
        _frozen(1, TrialState.RUNNING, retry_of=0, slot=0),
        _frozen(2, TrialState.RUNNING, retry_of=0, slot=0),
    ]
    assert raced(trials, 2) and not raced(trials, 1), "a retry does not duplicate its own trial's slot"
    trials[1] = _frozen(1, TrialState.FAIL, retry_of=0, slot=0, reason=attrs.CLAIM_RACED)
    assert not raced(trials, 2), "the lower one was itself dropped: ours is the retry"
    slots = [_frozen(0, TrialState.COMPLETE, slot=0), _frozen(1, TrialState.RUNNING, slot=1)]
    slots.append(_frozen(2, TrialState.RUNNING, slot=1))
    assert raced(slots, 2) and not raced(slots, 1) and not raced(slots, 0)


def test_a_worker_killed_on_the_last_trial_is_retried_by_a_worker_that_waits_out_the_grace_period(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    # Before: the second worker saw the budget spent (a RUNNING trial counts) and exited at once; the dead
    # worker's trial stayed RUNNING forever.
    cfg = study_dict(
        folder_root, budget={"n_trials": 1}, train={"epochs": 40}, heartbeat={"interval": 0.5, "grace_period": 2}
    )
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    ckpt = tmp_path / "ck"
    proc = spawn_worker(sqlite_url, "t", ckpt)
    wait_for(lambda: (ckpt / "t" / "trial-0.pt").is_file(), 120, "the first checkpoint")
    # A second worker arrives while the last trial runs: the budget is spent, but it must not leave.
    log = tmp_path / "second.log"
    with log.open("w") as fh:
        second = spawn_worker(sqlite_url, "t", ckpt, stdout=fh)
    wait_for(lambda: "waiting for running trial(s) [0]" in log.read_text(), 120, "the second worker to wait")
    proc.kill()
    proc.communicate(timeout=30)
    first = _study(sqlite_url).get_trials()[0]
    assert first.state == TrialState.RUNNING and len(first.intermediate_values) < 40

    assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
    out = log.read_text()
    trials = _study(sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], out[-3000:]
    retry = trials[1]
    assert retry.user_attrs[attrs.RETRY_OF] == 0 and retry.params == first.params
    assert "heartbeat did not advance for" in out, "the waiting worker failed the dead trial itself"
    assert_resumed_from_checkpoint(retry, first, 40)


def test_ctrl_c_twice_stops_at_once_with_one_line_and_the_trial_resumable(
    folder_root: Path, write_study: Callable[..., Path], sqlite_url: str, tmp_path: Path
) -> None:
    # 64 px on the device: epochs of a few seconds, so the second Ctrl-C lands inside one
    cfg = study_dict(folder_root, budget={"n_trials": 1}, train={"epochs": 30}, model={"image_size": 64})
    assert main(["--storage", sqlite_url, "create", str(write_study(cfg))]) == 0
    proc = spawn_worker(sqlite_url, "t", tmp_path / "ck")

    def first_epoch_reported() -> bool:
        trials = _study(sqlite_url).get_trials()
        return bool(trials) and len(trials[0].intermediate_values) >= 1

    wait_for(first_epoch_reported, 120, "the first epoch")
    time.sleep(0.5)  # into epoch 2 (about 3 s here): both presses land inside it
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    # Before: a KeyboardInterrupt traceback.
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert out.rstrip().endswith("sft-optuna: interrupted")
    (trial,) = started(_study(sqlite_url))
    assert trial.state == TrialState.FAIL and trial.user_attrs[attrs.REASON] == "interrupted"
