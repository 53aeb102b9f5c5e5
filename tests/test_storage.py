"""The storage wrapper: one-statement per-epoch writes that store exactly what Optuna's own methods store."""

from __future__ import annotations

import math
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import yaml
from conftest import study_dict
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from sft_optuna.cli import main
from sft_optuna.coordination import fast_writes
from sft_optuna.coordination.storage import backend_for, open_storage

VALUES = [0.25, 0.0, 1e-300, float("nan"), float("inf"), float("-inf")]
ATTRS: dict[str, Any] = {"history": [{"epoch": 1, "val_acc": 0.5, "lr": 0.1}], "reason": "pruned at 2", "n": 3}


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The SQL storages (the journal file keeps Optuna's methods)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _rdb(storage: Any) -> optuna.storages.RDBStorage:
    return storage.inner._backend  # RetryingStorage -> Optuna's _CachedStorage -> RDBStorage


def _written_by(storage: Any, fast: bool) -> optuna.trial.FrozenTrial:
    """One trial's values and attrs written either through the fast path or through Optuna's own methods."""
    study = optuna.create_study(storage=storage, study_name=uuid.uuid4().hex, direction="maximize")
    trial = study.ask()
    writer = storage if fast else _rdb(storage)
    for step, value in enumerate(VALUES):
        writer.set_trial_intermediate_value(trial._trial_id, step, value)
    writer.set_trial_intermediate_value(trial._trial_id, 0, 0.75)  # overwrite an existing step
    for key, value in ATTRS.items():
        writer.set_trial_user_attr(trial._trial_id, key, value)
        writer.set_trial_system_attr(trial._trial_id, key, value)
    writer.set_trial_user_attr(trial._trial_id, "n", 4)  # overwrite an existing key
    return storage.get_trial(trial._trial_id)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_fast_writes_store_exactly_what_optunas_methods_store(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    assert storage.fast is not None
    ours, optunas = _written_by(storage, fast=True), _written_by(storage, fast=False)
    assert ours.intermediate_values.keys() == optunas.intermediate_values.keys() == set(range(len(VALUES)))
    assert all(_same(ours.intermediate_values[s], optunas.intermediate_values[s]) for s in ours.intermediate_values)
    assert ours.intermediate_values[0] == 0.75
    assert ours.user_attrs == optunas.user_attrs == {**ATTRS, "n": 4}
    assert ours.system_attrs == optunas.system_attrs


def test_a_report_is_one_statement(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = optuna.create_study(storage=storage, study_name="one", direction="maximize")
    trial = study.ask()
    statements: list[str] = []
    sqlalchemy.event.listen(_rdb(storage).engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    trial.report(0.5, 1)
    trial.set_user_attr("history", [1, 2])
    assert len(statements) == 2, statements
    assert all(s.lstrip().upper().startswith("INSERT") for s in statements)


def test_writes_to_a_finished_or_unknown_trial_raise_optunas_errors(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = optuna.create_study(storage=storage, study_name="done", direction="maximize")
    trial = study.ask()
    trial.report(0.5, 1)
    study.tell(trial, 0.5)
    tid = trial._trial_id
    for write in (
        lambda: storage.set_trial_intermediate_value(tid, 2, 0.6),
        lambda: storage.set_trial_user_attr(tid, "k", 1),
        lambda: storage.set_trial_system_attr(tid, "k", 1),
    ):
        with pytest.raises(UpdateFinishedTrialError):
            write()
    assert storage.get_trial(tid).intermediate_values == {1: 0.5}
    with pytest.raises(KeyError):
        storage.set_trial_intermediate_value(tid + 1000, 1, 0.5)


def test_an_unknown_schema_version_keeps_optunas_methods(sql_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_writes, "SCHEMA_VERSIONS", frozenset({"v9.9.9"}))
    storage = open_storage(sql_url).optuna
    assert storage.fast is None
    study = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    trial = study.ask()
    trial.report(0.5, 1)
    assert storage.get_trial(trial._trial_id).intermediate_values == {1: 0.5}


def test_opening_a_storage_whose_schema_exists_takes_no_lock(sql_url: str) -> None:
    """Only the first open creates the schema, under the storage lock; every later one (a cluster's workers
    starting together) opens without it — it must not queue behind another worker holding it."""
    open_storage(sql_url)  # creates the schema
    opened: list[object] = []
    with backend_for(sql_url).lock(sql_url, "schema", 5.0):  # another worker is opening under the lock
        worker = threading.Thread(target=lambda: opened.append(open_storage(sql_url)))
        worker.start()
        worker.join(timeout=10)
        blocked = worker.is_alive()
    worker.join()
    assert not blocked, "the open waited for the schema lock"
    assert len(opened) == 1


def test_a_claim_loses_at_once_to_a_claim_in_progress_instead_of_queuing_behind_it(postgres_url: str) -> None:
    """Of many workers claiming at once, all but one lose each queued trial: they must move on to the next one
    at once, not wait on the row lock of the winner's change (at a cold start of 64 claimers: a convoy of 47)."""
    storage = open_storage(postgres_url).optuna
    study = optuna.create_study(storage=storage, study_name="skip", direction="maximize")
    study.enqueue_trial({})
    tid = storage.get_all_trials(study._study_id, deepcopy=False)[0]._trial_id
    other = sqlalchemy.create_engine(postgres_url)
    with other.connect() as conn, conn.begin() as change:  # another claimer's change, not committed yet
        conn.execute(sqlalchemy.text("SELECT 1 FROM trials WHERE trial_id = :t FOR UPDATE"), {"t": tid})
        assert storage.fast is not None
        fast = storage.fast
        result: list[bool] = []
        claim = threading.Thread(target=lambda: result.append(fast.start(tid)))
        claim.start()
        claim.join(timeout=3)
        blocked = claim.is_alive()
        change.rollback()  # that claimer went away: the trial is still queued, and the next claim takes it
        claim.join()
    assert not blocked, "the claim waited for the other claimer's lock"
    assert result == [False]
    assert storage.fast.start(tid) is True
    assert storage.get_trial(tid).state == TrialState.RUNNING
    assert storage.fast.start(tid) is False  # once only
    other.dispose()


def test_a_postgresql_lock_whose_session_the_server_ended_is_reported_lost(postgres_url: str) -> None:
    with open_storage(postgres_url).lock("t") as hold:
        pass
    assert not hold.lost
    with open_storage(postgres_url).lock("t") as hold:
        # What a server restart does to the session holding the lock, done to that session alone.
        admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            ended = conn.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar()
        admin.dispose()
        assert ended == 1
    assert hold.lost
    with open_storage(postgres_url).lock("t") as hold:  # and the lock works again afterwards
        pass
    assert not hold.lost


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_lock_files_stay_out_of_the_users_git_status(kind: str, tmp_path: Path) -> None:
    # Before: studies.db.create.lock, studies.db.schema.lock, studies.db.claim:t.lock beside the database.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(study_dict(tmp_path)))
    url = f"sqlite:///{tmp_path / 'studies.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'studies.log'}"
    assert main(["--storage", url, "create", str(study)]) == 0
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    expected = {"?? s.yaml", f"?? studies.{'db' if kind == 'sqlite' else 'log'}"}
    assert set(status.splitlines()) == expected, status
    assert any((tmp_path / ".sft-optuna-locks").iterdir()), "the locks are there, hidden"
