"""The objective's per-epoch storage calls: the learning curve is written off the training loop."""

from __future__ import annotations

import threading
import time
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.objective import HistoryWriter


class GatedStorage(optuna.storages.InMemoryStorage):
    """Optuna's in-memory storage whose history writes wait for a gate (a slow proxy), and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.histories: list[Any] = []

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == attrs.HISTORY and value:
            assert self.gate.wait(10), "the gate was never opened"
        super().set_trial_user_attr(trial_id, key, value)
        if key == attrs.HISTORY:
            self.histories.append(value)


def curve(n: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "val_acc": e / 10} for e in range(1, n + 1)]


def test_history_writes_never_hold_the_training_loop_and_a_slow_storage_gets_only_the_newest_curve() -> None:
    storage = GatedStorage()
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    with HistoryWriter(trial) as history:
        t0 = time.perf_counter()
        history.put(curve(1))  # the writer thread takes it and waits at the gate
        time.sleep(0.2)
        for n in (2, 3, 4):
            history.put(curve(n))
        waited = time.perf_counter() - t0 - 0.2
        storage.gate.set()
    assert waited < 1.0, f"put() waited {waited:.1f} s for a write"
    # The first write was in flight; 2 and 3 were replaced by 4 before the writer came back for them.
    assert storage.histories == [[], curve(1), curve(4)]
    assert study.trials[0].user_attrs[attrs.HISTORY] == curve(4)


def test_a_failed_history_write_is_raised_when_the_trial_ends_unless_it_is_already_ending_with_another() -> None:
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        with HistoryWriter(trial) as history:
            # failed behind the worker's back (its heartbeat went stale): the next write is refused
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            history.put(curve(1))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        with HistoryWriter(trial) as history:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            history.put(curve(1))
            raise optuna.TrialPruned("pruned at epoch 1")
