"""One-statement trial writes for SQL storages: an epoch's report costs one round trip, not four.

Optuna's RDB storage writes an intermediate value through its ORM: select the trial, check its state, select
the existing row, insert or update, commit — four round trips and about 4 ms of Python per call, paid by every
worker on every epoch (and again for each attribute write). :class:`FastWrites` does the same write as one
``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` whose ``SELECT`` only yields a row while the trial is
unfinished. When nothing was written (the trial is finished, or does not exist) the caller hands over to
Optuna's own method, which raises exactly the error Optuna would (``UpdateFinishedTrialError``, ``KeyError``).
A trial's parameters are written the same way, and a queued trial is created in one short transaction (in the
gRPC proxy these were, after the reads, the largest share of its CPU: ~a third).

The statements name Optuna's tables through Optuna's own SQLAlchemy models, and are only used on the schema
versions listed in :data:`SCHEMA_VERSIONS` (checked when the storage is opened); on any other version, or a
database other than PostgreSQL and SQLite, the storage keeps Optuna's methods.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from datetime import datetime
from typing import Any

import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql, sqlite

__all__ = ["SCHEMA_VERSIONS", "FastWrites"]

SCHEMA_VERSIONS = frozenset({"v3.2.0.a"})  # Optuna 3.2 – 5.0; a new Optuna migration turns the fast path off
_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)  # what Optuna's check_trial_is_updatable lets through
_INSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}  # both have on_conflict_do_update


class FastWrites:
    """Upserts of a trial's intermediate value or attribute, its parameters and guarded state changes, each in
    one statement and one transaction; the creation of a queued trial in one short transaction.

    Each method returns ``True`` when the row was written and ``False`` when the trial is not an unfinished
    trial (then nothing was written). Build it with :meth:`for_storage`, which returns ``None`` when the
    storage's database or schema version is not one these statements were written for.
    """

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        # One statement is atomic on its own: autocommit saves the BEGIN and COMMIT round trips. The option is
        # a client-side switch of the driver, and this engine shares the storage's connection pool.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        insert = _INSERTS[engine.dialect.name]
        self._value = _upsert(
            insert,
            models.TrialIntermediateValueModel.__table__,
            ["step"],
            ["intermediate_value", "intermediate_value_type"],
        )
        self._user = _upsert(insert, models.TrialUserAttributeModel.__table__, ["key"], ["value_json"])
        self._system = _upsert(insert, models.TrialSystemAttributeModel.__table__, ["key"], ["value_json"])
        self._start = _transition([TrialState.WAITING], TrialState.RUNNING, "datetime_start", skip_locked=True)
        self._fail = _transition(list(_UNFINISHED), TrialState.FAIL, "datetime_complete")
        self._param = _insert_once(
            insert, models.TrialParamModel.__table__, ["param_name"], ["param_value", "distribution_json"]
        )
        self._transactions = engine  # the trial creation: a transaction of a few statements
        self._creation = _creation(insert)

    @classmethod
    def for_storage(cls, rdb: Any, version: str) -> FastWrites | None:
        """``FastWrites`` on ``rdb``'s engine (an Optuna ``RDBStorage`` whose schema is at ``version``), or
        ``None`` if it does not apply."""
        name = rdb.engine.dialect.name
        if name not in _INSERTS or version not in SCHEMA_VERSIONS:
            return None
        if name == "sqlite" and sqlite3.sqlite_version_info < (3, 24, 0):  # no upsert before SQLite 3.24
            return None
        return cls(rdb.engine)

    def intermediate_value(self, trial_id: int, step: int, value: float) -> bool:
        """``storage.set_trial_intermediate_value`` (NaN and ±inf stored the way Optuna stores them)."""
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
        return self._run(
            self._value, trial_id=trial_id, step=step, intermediate_value=stored, intermediate_value_type=kind
        )

    def user_attr(self, trial_id: int, key: str, value: Any) -> bool:
        """``storage.set_trial_user_attr``."""
        return self._run(self._user, trial_id=trial_id, key=key, value_json=json.dumps(value))

    def system_attr(self, trial_id: int, key: str, value: Any) -> bool:
        """``storage.set_trial_system_attr`` (heartbeats)."""
        return self._run(self._system, trial_id=trial_id, key=key, value_json=json.dumps(value))

    def param(self, trial_id: int, name: str, value_internal: float, distribution_json: str) -> bool:
        """``storage.set_trial_param`` once the distribution was checked against the study's (by the caller):
        ``False`` also when the trial has this parameter already (Optuna's method then ignores the write)."""
        return self._run(
            self._param,
            trial_id=trial_id,
            param_name=name,
            param_value=value_internal,
            distribution_json=distribution_json,
        )

    def create_trial(self, study_id: int, template: FrozenTrial | None) -> FrozenTrial | None:
        """``RDBStorage._create_new_trial`` for no template (a RUNNING trial) or a template of state, times and
        attributes only — a queued trial (``study.enqueue_trial``) — in one transaction: the study's row taken
        ``FOR UPDATE`` as Optuna takes it (the number is the count of the study's trials before it), the trial
        with its number, its attributes. ``None`` where this does not apply (a template with parameters, values
        or intermediate values; an unknown study): the caller uses Optuna's method."""
        if template is None:  # what Optuna creates without one: a RUNNING trial started now
            template = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        elif template.params or template.values is not None or template.intermediate_values:
            return None
        lock, insert, user, system = self._creation
        with self._transactions.begin() as conn:
            if conn.execute(lock, {"sid": study_id}).first() is None:
                return None
            trial_id, number = conn.execute(
                insert,
                {
                    "sid": study_id,
                    "state": template.state,
                    "start": template.datetime_start,
                    "complete": template.datetime_complete,
                },
            ).one()
            for stmt, attrs in ((user, template.user_attrs), (system, template.system_attrs)):
                if attrs:
                    conn.execute(
                        stmt, [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
                    )
        frozen = copy.deepcopy(template)
        frozen.number = number
        frozen._trial_id = trial_id
        return frozen

    def start(self, trial_id: int) -> bool:
        """WAITING -> RUNNING, only if the trial is still WAITING: exactly one caller pops a queued trial.

        Optuna's own pop reads the state, then writes it; SQLite ignores its ``FOR UPDATE``, so two workers
        could both read WAITING and both run the trial (measured: 43 duplicates in 143 pops from 8 processes).
        One guarded ``UPDATE`` is atomic on every SQL database."""
        return self._run(self._start, tid=trial_id, now=datetime.now())

    def fail(self, trial_id: int) -> bool:
        """RUNNING or WAITING -> FAIL, only if unfinished: of two workers failing one dead trial (each then
        queues its retry), exactly one wins."""
        return self._run(self._fail, tid=trial_id, now=datetime.now())

    def _run(self, stmt: Any, **params: Any) -> bool:
        with self.engine.connect() as conn:
            # rowcount of an INSERT is only kept on request (SQLAlchemy 2); 1 = inserted or updated.
            return conn.execute(stmt, params, execution_options={"preserve_rowcount": True}).rowcount > 0


def _transition(old: list[TrialState], new: TrialState, stamp: str, skip_locked: bool = False) -> Any:
    """``UPDATE trials SET state = new, <stamp> = :now WHERE trial_id = :tid AND state IN old``.

    ``skip_locked``: the row is first taken with ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite, whose
    writes hold the whole database, has no row locks and renders it without), so a caller whose trial another
    caller is changing this instant loses at once instead of queuing behind that change. Measured: at a cold
    start of 64 claimers on PostgreSQL, up to 47 connections sat waiting on the lock of one queued trial."""
    trials = models.TrialModel.__table__
    target: Any = sqlalchemy.bindparam("tid")
    if skip_locked:
        target = (
            sqlalchemy.select(trials.c.trial_id)
            .where(trials.c.trial_id == sqlalchemy.bindparam("tid"), trials.c.state.in_(old))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    return (
        trials.update()
        .where(trials.c.trial_id == target, trials.c.state.in_(old))
        .values({"state": new, stamp: sqlalchemy.bindparam("now")})
    )


def _creation(insert: Any) -> tuple[Any, Any, Any, Any]:
    """The statements of :meth:`FastWrites.create_trial`: take the study's row, insert the trial numbered by the
    count of the study's trials (a statement of its own after the lock, so it sees every trial committed before),
    insert attributes."""
    studies, trials = models.StudyModel.__table__, models.TrialModel.__table__
    sid: Any = sqlalchemy.bindparam("sid", type_=studies.c.study_id.type)
    lock = sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == sid).with_for_update()
    count = (
        sqlalchemy.select(sqlalchemy.func.count()).select_from(trials).where(trials.c.study_id == sid).scalar_subquery()
    )
    new = (
        insert(trials)
        .values(
            study_id=sid,
            number=count,
            state=sqlalchemy.bindparam("state", type_=trials.c.state.type),
            datetime_start=sqlalchemy.bindparam("start", type_=trials.c.datetime_start.type),
            datetime_complete=sqlalchemy.bindparam("complete", type_=trials.c.datetime_complete.type),
        )
        .returning(trials.c.trial_id, trials.c.number)
    )
    user = insert(models.TrialUserAttributeModel.__table__)
    system = insert(models.TrialSystemAttributeModel.__table__)
    return lock, new, user, system


def _insert_once(insert: Any, table: sqlalchemy.Table, key: list[str], values: list[str]) -> Any:
    """As :func:`_upsert`, but a row already there is kept (``ON CONFLICT DO NOTHING``)."""
    stmt = _from_trial(insert, table, key, values)
    return stmt.on_conflict_do_nothing(index_elements=[table.c.trial_id, *(table.c[c] for c in key)])


def _upsert(insert: Any, table: sqlalchemy.Table, key: list[str], values: list[str]) -> Any:
    """``INSERT INTO table SELECT <the trial's id>, :key, :values... WHERE the trial is unfinished ON CONFLICT
    (trial_id, key) DO UPDATE SET values``: the trial's own row is the source, so a finished or unknown trial
    yields no row and nothing is written. Built once; executed with bound parameters."""
    stmt = _from_trial(insert, table, key, values)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.trial_id, *(table.c[c] for c in key)], set_={c: stmt.excluded[c] for c in values}
    )


def _from_trial(insert: Any, table: sqlalchemy.Table, key: list[str], values: list[str]) -> Any:
    """``INSERT INTO table SELECT <the trial's id>, :key, :values... WHERE the trial is unfinished``."""
    trials = models.TrialModel.__table__
    source = sqlalchemy.select(
        trials.c.trial_id, *(sqlalchemy.bindparam(c, type_=table.c[c].type) for c in [*key, *values])
    ).where(trials.c.trial_id == sqlalchemy.bindparam("trial_id"), trials.c.state.in_(_UNFINISHED))
    return insert(table).from_select(["trial_id", *key, *values], source)
