"""The storage wrapper: one-statement per-epoch writes that store exactly what Optuna's own methods store."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import yaml
from conftest import PYTHON, free_port, study_dict, worker_env
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from sft_optuna.cli import main
from sft_optuna.coordination import fast_reads, fast_writes
from sft_optuna.coordination.shared_reads import SharedReadsStorage
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
    assert _rdb(storage).fast_reads is None
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


def _fields(t: optuna.trial.FrozenTrial) -> tuple[Any, ...]:
    """A trial's every field, comparable (NaN equal to NaN, attributes in any order)."""
    nan = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return (
        t._trial_id,
        t.number,
        t.state,
        t.datetime_start,
        t.datetime_complete,
        None if t.values is None else [nan(v) for v in t.values],
        list(t.params.items()),  # in Optuna's order (by param_id)
        sorted(t.distributions.items()),
        sorted((k, repr(v)) for k, v in t.user_attrs.items()),
        sorted((k, repr(v)) for k, v in t.system_attrs.items()),
        sorted((s, nan(v)) for s, v in t.intermediate_values.items()),
    )


def _every_kind_of_trial(storage: Any, directions: list[str]) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=uuid.uuid4().hex, directions=directions)
    n = len(directions)
    study.enqueue_trial({"x": 0.5, "c": None}, user_attrs={"slot": 1})  # stays WAITING
    for i, (state, values) in enumerate(
        [
            (TrialState.COMPLETE, [0.5] * n),
            (TrialState.COMPLETE, [float("inf")] + [float("-inf")] * (n - 1)),
            (TrialState.PRUNED, None),
            (TrialState.FAIL, None),
            (TrialState.RUNNING, None),
            (TrialState.RUNNING, None),
        ]
    ):
        trial = study.ask()
        if i == 0:  # the queued one: fixed parameters in its system attributes
            assert storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 8, log=True)
        trial.suggest_categorical("c", [None, "a", True, 2.5])
        trial.suggest_float("lr", 1e-4, 0.3, log=True)
        for step, value in enumerate(VALUES):
            trial.report(value, step) if n == 1 else None
        for key, value in ATTRS.items():
            trial.set_user_attr(key, value)
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
        if state == TrialState.COMPLETE:
            study.tell(trial, values if n > 1 else values[0])
        elif state != TrialState.RUNNING:
            study.tell(trial, state=state)
    study.enqueue_trial({"x": 0.25})
    return study


@pytest.mark.parametrize("directions", [["maximize"], ["minimize", "maximize", "minimize"]])
def test_fast_reads_build_exactly_what_optunas_orm_builds(sql_url: str, directions: list[str]) -> None:
    storage = open_storage(sql_url).optuna
    rdb = _rdb(storage)
    assert rdb.fast_reads is not None
    study = _every_kind_of_trial(storage, directions)
    sid, orm = study._study_id, optuna.storages.RDBStorage
    trials = orm._get_trials(rdb, sid, None, set(), -1)
    assert {t.state for t in trials} == set(TrialState) and len(trials) == 7
    ids = [t._trial_id for t in trials]
    unfinished = {t._trial_id for t in trials if not t.state.is_finished()}
    for states, included, newer in [
        (None, set(), -1),
        (None, unfinished, ids[3]),  # what Optuna's cache asks: the unfinished ones and anything newer
        (None, unfinished, ids[-1]),
        ((TrialState.COMPLETE, TrialState.WAITING), set(), -1),
        ((TrialState.RUNNING,), {ids[0], ids[5]}, ids[2]),
        (None, {ids[0]}, ids[-1] + 5),
    ]:
        expected = orm._get_trials(rdb, sid, states, included, newer)
        got = rdb.fast_reads.trials(sid, states, included, newer)
        assert [_fields(t) for t in got] == [_fields(t) for t in expected], (states, included, newer)
    for trial in trials:
        assert _fields(rdb.get_trial(trial._trial_id)) == _fields(orm.get_trial(rdb, trial._trial_id))
        assert _fields(storage.get_trial(trial._trial_id)) == _fields(trial)  # through the cache as well
    with pytest.raises(KeyError):
        rdb.get_trial(ids[-1] + 1000)
    with pytest.raises(KeyError):
        rdb.fast_reads.trials(sid + 1000, None, set(), -1)


def test_fast_reads_past_the_listed_limit_read_from_the_oldest(sql_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(sql_url).optuna
    rdb = _rdb(storage)
    study = _every_kind_of_trial(storage, ["maximize"])
    sid, orm = study._study_id, optuna.storages.RDBStorage
    ids = [t._trial_id for t in orm._get_trials(rdb, sid, None, set(), -1)]
    monkeypatch.setattr(fast_reads, "MAX_LISTED", 1)
    included, newer = {ids[1], ids[4]}, ids[5]
    expected = orm._get_trials(rdb, sid, None, included, newer)
    assert [t._trial_id for t in expected] == [ids[1], ids[4], ids[6]]
    assert [_fields(t) for t in rdb.fast_reads.trials(sid, None, included, newer)] == [_fields(t) for t in expected]


def test_a_trial_is_read_in_two_statements(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    running = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    statements: list[str] = []
    sqlalchemy.event.listen(_rdb(storage).engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert storage.get_trial(running._trial_id).intermediate_values.keys() == set(range(len(VALUES)))
    assert len(statements) == 2, statements  # Optuna's ORM: six
    statements.clear()
    storage.get_all_trials(study._study_id)  # the cache re-reads the unfinished trials
    assert len(statements) == 3, statements  # the study, the trials, their children (Optuna's ORM: seven)


def test_a_read_keeps_the_trials_it_read_first_when_others_change_between_its_statements(postgres_url: str) -> None:
    # Found by the claim race test: the children were read by the filter evaluated again, which took in a trial
    # created between the two statements (KeyError) and would drop the children of one finished meanwhile.
    storage = open_storage(postgres_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(postgres_url).optuna)
    fired: list[str] = []

    def meanwhile(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if "ORDER BY trials.trial_id" in statement and not fired:
            fired.append(statement)
            new = other.ask()
            new.suggest_float("x", 0.0, 1.0)
            other.tell(running[0].number, 0.9)

    rdb = _rdb(storage)
    sqlalchemy.event.listen(rdb.engine, "after_cursor_execute", meanwhile)
    assert rdb.fast_reads is not None
    got = rdb.fast_reads.trials(study._study_id, (TrialState.RUNNING,), set(), -1)
    assert fired
    # As they were read, params and all (the finished one's value, written meanwhile, may show: so it does in
    # Optuna's ORM, whose loader reads the children by the ids read, as this does)
    assert [_fields(t)[:5] + _fields(t)[6:] for t in got] == [_fields(t)[:5] + _fields(t)[6:] for t in running]


def _created_by(storage: Any) -> list[optuna.trial.FrozenTrial]:
    """Trials created and given parameters every way a study does: queued (with and without fixed parameters),
    asked without a queue, added whole with parameters and values (Optuna's method), parameters written again."""
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(storage=storage, study_name=uuid.uuid4().hex, direction="maximize", sampler=sampler)
    study.enqueue_trial({"x": 0.5, "c": None}, user_attrs={"slot": 0, "lineage": [1, "a"]})
    study.enqueue_trial({}, user_attrs={"slot": 1}, skip_if_exists=False)
    for _ in range(3):  # the queued two, then a fresh one
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 8, log=True)
        trial.suggest_categorical("c", [None, "a", True, 2.5])
        trial.suggest_float("x", 0.0, 1.0)  # asked again: Optuna writes it again, which changes nothing
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.75},
            distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
            value=0.5,
            user_attrs={"k": 1},
            intermediate_values={1: 0.25},
        )
    )
    return study.get_trials()


def test_fast_creations_and_parameters_store_exactly_what_optunas_methods_store(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    assert isinstance(_rdb(storage).fast_writes, fast_writes.FastWrites)
    optunas = optuna.storages.RDBStorage(sql_url)
    assert not hasattr(optunas, "fast_writes")
    ours, theirs = _created_by(storage), _created_by(optunas)
    assert [t.state for t in ours] == [TrialState.RUNNING] * 3 + [TrialState.COMPLETE]
    for a, b in zip(ours, theirs, strict=True):
        assert a.system_attrs.get("fixed_params") == b.system_attrs.get("fixed_params")
        skip = {0, 3, 4}  # trial ids and times differ
        assert [f for i, f in enumerate(_fields(a)) if i not in skip] == [
            f for i, f in enumerate(_fields(b)) if i not in skip
        ]
        # Read back by Optuna's own ORM, not only by the fast reads
        assert _fields(optuna.storages.RDBStorage.get_trial(_rdb(storage), a._trial_id)) == _fields(a)
    # What a creation returns (Optuna's cache keeps it) is what was stored
    rdb, sid = _rdb(storage), optuna.create_study(storage=storage)._study_id
    queued = optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={"slot": 2}, system_attrs={"a": [1]})
    for template in (None, queued):
        created = rdb._create_new_trial(sid, template)
        assert _fields(created) == _fields(optuna.storages.RDBStorage.get_trial(rdb, created._trial_id))


def test_a_queued_trial_is_created_in_one_transaction_and_a_parameter_written_in_one_statement(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    sampler = optuna.samplers.RandomSampler(seed=0)  # one that reads nothing to sample
    study = optuna.create_study(storage=storage, study_name="count", direction="maximize", sampler=sampler)
    study.ask().suggest_float("x", 0.0, 1.0)  # the study's first "x": Optuna's method (it reads the study's)
    statements: list[str] = []
    sqlalchemy.event.listen(_rdb(storage).engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    study.enqueue_trial({}, user_attrs={"slot": 7}, skip_if_exists=False)
    # the study's row, the trial, its user and system attributes (Optuna's ORM: 10)
    assert len(statements) == 4, statements
    assert "FOR UPDATE" in statements[0] or sql_url.startswith("sqlite")
    statements.clear()
    trial = study.ask()
    statements.clear()
    trial.suggest_float("x", 0.0, 1.0)
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("INSERT"), statements


def test_parameters_and_creations_refused_raise_optunas_errors(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = optuna.create_study(storage=storage, study_name="refused", direction="maximize")
    first = study.ask()
    first.suggest_float("x", 0.0, 1.0)
    study.tell(first, 0.5)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_param(first._trial_id, "x", 0.5, dist)
    with pytest.raises(KeyError):
        storage.set_trial_param(first._trial_id + 1000, "x", 0.5, dist)
    trial = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution"):
        storage.set_trial_param(trial._trial_id, "x", 1, optuna.distributions.CategoricalDistribution([1, 2]))
    storage.set_trial_param(trial._trial_id, "x", 0.25, dist)
    storage.set_trial_param(trial._trial_id, "x", 0.75, dist)  # a second write of a parameter: ignored, as Optuna
    assert storage.get_trial(trial._trial_id).params == {"x": 0.25}
    assert [t.params for t in study.get_trials()] == [{"x": first.params["x"]}, {"x": 0.25}]
    with pytest.raises(KeyError):
        storage.create_new_trial(study._study_id + 1000)


def test_trials_created_at_the_same_instant_get_distinct_numbers(sql_url: str) -> None:
    open_storage(sql_url)
    study_name = uuid.uuid4().hex
    optuna.create_study(storage=open_storage(sql_url).optuna, study_name=study_name)
    start = threading.Barrier(4)

    def create() -> None:
        study = optuna.load_study(study_name=study_name, storage=open_storage(sql_url).optuna)
        start.wait()
        for slot in range(25):
            study.enqueue_trial({}, user_attrs={"slot": slot}, skip_if_exists=False)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = optuna.load_study(study_name=study_name, storage=sql_url).get_trials()
    assert sorted(t.number for t in trials) == list(range(100))


def _slowed_reads(storage: Any, seconds: float, fail: int = 0) -> tuple[threading.Event, list[str]]:
    """Each read of a study's trials holds ``seconds`` after its rows came back (so what it read is fixed before
    the wait); the event is set when the first one is waiting. ``fail``: the read of that count raises instead."""
    started, reads = threading.Event(), []

    def hold(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if "ORDER BY trials.trial_id" in statement:
            reads.append(threading.current_thread().name)
            started.set()
            time.sleep(seconds)
            if len(reads) == fail:
                raise RuntimeError(f"read {fail} failed")

    sqlalchemy.event.listen(_rdb(storage).engine, "after_cursor_execute", hold)
    return started, reads


def _read_together(shared: Any, study_id: int, n: int) -> tuple[list[Any], list[BaseException]]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    go = threading.Barrier(n)

    def read(i: int) -> None:
        go.wait()
        try:
            results[i] = [t.number for t in shared.get_all_trials(study_id)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,), name=f"reader-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_the_proxy_serves_requests_that_arrive_together_with_one_read(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    shared = SharedReadsStorage(storage)
    _, reads = _slowed_reads(storage, 0.3)
    results, errors = _read_together(shared, study._study_id, 8)
    assert not errors
    assert results == [list(range(7))] * 8
    assert len(reads) <= 2, reads  # the first, and one for those who came while it ran (alone: 8)


def test_a_request_is_never_answered_by_a_read_that_began_before_it(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    shared = SharedReadsStorage(storage)
    started, reads = _slowed_reads(storage, 0.5)
    early = threading.Thread(target=lambda: shared.get_all_trials(study._study_id), name="early")
    early.start()
    assert started.wait(10)
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(sql_url).optuna)
    new = other.ask()  # written after the early read fetched its rows, before this caller asks
    got = [t.number for t in shared.get_all_trials(study._study_id)]
    early.join()
    assert new.number in got
    assert len(reads) == 2


def test_when_a_shared_read_fails_the_callers_who_waited_for_it_read_again(sql_url: str) -> None:
    storage = open_storage(sql_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    shared = SharedReadsStorage(storage)
    # The first read serves the first caller; those who came meanwhile share the second, which fails: its
    # reader gets the error, the others read again (a third read) instead of taking a read that never came.
    _, reads = _slowed_reads(storage, 0.3, fail=2)
    results, errors = _read_together(shared, study._study_id, 6)
    assert [str(e) for e in errors] == ["read 2 failed"]
    assert [r for r in results if r is not None] == [list(range(7))] * 5
    assert len(reads) == 3, reads


def test_the_proxy_makes_each_trials_message_once_and_answers_what_optunas_servicer_answers(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    from sft_optuna.coordination import proxy

    storage = open_storage(sql_url).optuna
    study = _every_kind_of_trial(storage, ["maximize"])
    ours, optunas = proxy.MessageCachingService(storage), OptunaStorageProxyService(storage)
    made: list[int] = []
    make = proxy._to_proto_trial
    monkeypatch.setattr(proxy, "_to_proto_trial", lambda t: made.append(t.number) or make(t))
    unfinished = [t for t in study.get_trials() if not t.state.is_finished()]
    everything = api_pb2.GetTrialsRequest(study_id=study._study_id, trial_id_greater_than=-1)
    # what a client that has seen every finished trial asks: its unfinished ones and anything new
    client = api_pb2.GetTrialsRequest(
        study_id=study._study_id,
        included_trial_ids=[t._trial_id for t in unfinished[:-1]],
        trial_id_greater_than=max(t._trial_id for t in study.get_trials() if t.state.is_finished()),
    )
    first = ours.GetTrials(everything, None)
    assert first == optunas.GetTrials(everything, None) and len(first.trials) == 7
    assert ours.GetTrials(everything, None) == first
    assert ours.GetTrials(client, None) == optunas.GetTrials(client, None)
    assert len(ours.GetTrials(client, None).trials) == len(unfinished)
    # a finished trial's message is made once; an unfinished one is re-read (a new object) by every request
    assert sorted(made) == sorted([*range(7), *[t.number for t in unfinished] * 3])
    running = next(t for t in unfinished if t.state == TrialState.RUNNING)
    storage.set_trial_intermediate_value(running._trial_id, 99, 0.5)
    storage.set_trial_user_attr(running._trial_id, "new", 1)
    after = ours.GetTrials(everything, None)
    assert after == optunas.GetTrials(everything, None) and after != first, "a change is in the next answer"


def _listening(port: int) -> int:
    """Sockets listening on ``port`` (each proxy process has its own)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            n += local.endswith(f":{port:04X}") and state == "0A"
    return n


def _children(pid: int) -> list[int]:
    """The proxy's processes started by ``pid`` (not multiprocessing's resource tracker)."""
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _proxy(db_url: str, port: int, *extra: str, group: bool = False) -> subprocess.Popen[str]:
    """``group``: in a process group of its own, with Ctrl-C's default action (as in a terminal)."""
    return subprocess.Popen(
        [PYTHON, "-m", "sft_optuna", "proxy", "--port", str(port), "--threads", "2", *extra],
        env=worker_env(SFT_OPTUNA_STORAGE=db_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if group else None,
    )


def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts listening sockets in /proc")
def test_a_proxy_of_several_processes_shares_its_port_and_ends_as_one(postgres_url: str) -> None:
    port = free_port()
    proxy = _proxy(postgres_url, port, "--processes", "3")
    try:
        _until(lambda: _listening(port) == 3, "three processes listening on the port")
        # a second proxy on that port (maybe for another database) fails instead of taking some of the workers
        other = _proxy(postgres_url, port)
        try:
            _, err = other.communicate(timeout=60)
        finally:
            other.kill()
        assert other.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in err.strip().splitlines()[-1], err
        assert _listening(port) == 3
        url = f"grpc://127.0.0.1:{port}"
        optuna.create_study(storage=open_storage(url).optuna, study_name="shared", direction="maximize")
        for _ in range(6):  # new clients, spread over the processes by the kernel: one study for all
            study = optuna.load_study(study_name="shared", storage=open_storage(url).optuna)
            study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
        assert len(study.get_trials()) == 6
        # one process dies: the whole proxy stops (for its supervisor to restart), the others with it
        assert len(_children(proxy.pid)) == 2
        os.kill(_children(proxy.pid)[0], signal.SIGKILL)
        assert proxy.wait(timeout=30) != 0
        _until(lambda: _listening(port) == 0, "no process left listening", timeout=20)
    finally:
        proxy.kill()
        proxy.wait()
    proxy = _proxy(postgres_url, port, "--processes", "2")
    try:
        _until(lambda: _listening(port) == 2, "two processes listening on the port")
        proxy.kill()  # the parent killed outright: its children go too
        proxy.wait()
        _until(lambda: _listening(port) == 0, "no process left listening", timeout=20)
    finally:
        proxy.kill()
        proxy.wait()
    proxy = _proxy(postgres_url, port, "--processes", "2", group=True)
    try:
        _until(lambda: _listening(port) == 2, "two processes listening on the port")
        os.killpg(proxy.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        _, err = proxy.communicate(timeout=30)
        assert proxy.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "sft-optuna: interrupted", err
    finally:
        proxy.kill()
        proxy.wait()


def test_a_wrong_database_password_is_one_error_at_once_not_an_outage(postgres_url: str) -> None:
    import time

    from sft_optuna.errors import StorageError

    wrong = postgres_url.replace("sft:sft@", "sft:not-the-password@")
    start = time.monotonic()
    with pytest.raises(StorageError, match="password authentication failed") as err:
        open_storage(wrong)  # a worker's patience (60 s): an authentication failure is not waited out
    assert time.monotonic() - start < 5, "the wrong password was retried like an outage"
    assert "not-the-password" not in str(err.value)
