"""Reading trials from a SQL storage in a handful of statements, without Optuna's ORM.

Optuna's RDB storage builds every trial it reads through SQLAlchemy's ORM: a trial with its parameters,
values, attributes and intermediate values costs ~0.4 ms of Python, and a single ``get_trial`` six queries.
Its cache re-reads every *unfinished* trial on every ``get_all_trials``, so a study with 256 trials running
pays that for all 256 on every claim (measured on PostgreSQL: 106 ms a read, made under the cache's lock that
every other call of the process waits on — in the gRPC proxy, every worker's). :class:`FastReads` reads the
same rows with plain SQL — the trials' rows, then all their children in one ``UNION ALL`` — and builds the same
``FrozenTrial`` objects (``benchmarks/reads.py``: 3-7x faster).

Like :mod:`.fast_writes`, it names Optuna's tables through Optuna's own models and is only used on the schema
versions it was written for (:data:`.fast_writes.SCHEMA_VERSIONS`); elsewhere the storage keeps Optuna's methods.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterable
from functools import lru_cache
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from sft_optuna.coordination import fast_writes

__all__ = ["FastReads"]

_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_VALUES = models.TrialValueModel.__table__
_USER = models.TrialUserAttributeModel.__table__
_SYSTEM = models.TrialSystemAttributeModel.__table__
_STEPS = models.TrialIntermediateValueModel.__table__
_STUDIES = models.StudyModel.__table__


MAX_LISTED = 500
"""Unfinished trials named in one statement at most; past that, every trial from the oldest one is read."""


@lru_cache(maxsize=1024)
def _distribution(distribution_json: str) -> BaseDistribution:
    """A study's trials share a few distributions: each JSON text is parsed once (distributions are not
    changed after they are made)."""
    return json_to_distribution(distribution_json)


class FastReads:
    """``RDBStorage._get_trials`` and ``RDBStorage.get_trial`` in plain SQL: the trials' rows first, then their
    children by those trials' ids (a trial read finished has its values already: Optuna writes both in one
    transaction, and a finished trial's children no longer change)."""

    def __init__(self, rdb: optuna.storages.RDBStorage) -> None:
        # Optuna's own per-thread session: a read made while Optuna holds a session (its error paths read the
        # trial inside one) shares its connection instead of asking the pool (one connection a worker) for more.
        self.session = rdb.scoped_session

    @classmethod
    def for_storage(cls, rdb: optuna.storages.RDBStorage, version: str) -> FastReads | None:
        """``FastReads`` on ``rdb`` (whose schema is at ``version``), or ``None`` where that is not a schema this
        was written for."""
        if version not in fast_writes.SCHEMA_VERSIONS:
            return None
        return cls(rdb)

    def trial(self, trial_id: int) -> FrozenTrial:
        """``RDBStorage.get_trial``: ``KeyError`` if there is no such trial."""
        with _create_scoped_session(self.session) as conn:
            found = self._read(conn, _TRIALS.c.trial_id == trial_id)
        if not found:
            raise KeyError(models.NOT_FOUND_MSG)
        return found[0]

    def trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """``RDBStorage._get_trials``: the study's trials numbered above ``trial_id_greater_than`` and those in
        ``included_trial_ids`` (all of them when that is -1), in ``states``, ordered by id; ``KeyError`` if the
        study does not exist."""
        included = sorted(i for i in included_trial_ids if i <= trial_id_greater_than)
        wanted, newer_than = None, trial_id_greater_than
        if len(included) > MAX_LISTED:  # an IN list past SQLite's old 999 variables: read from the oldest, filter
            wanted, included = set(included), []
            trial_id_greater_than = min(wanted) - 1
        where = _TRIALS.c.study_id == study_id
        if states is not None:
            assert isinstance(states, Iterable)
            where = sqlalchemy.and_(where, _TRIALS.c.state.in_(list(states)))
        if trial_id_greater_than > -1:
            newer = _TRIALS.c.trial_id > trial_id_greater_than
            where = sqlalchemy.and_(
                where, sqlalchemy.or_(newer, _TRIALS.c.trial_id.in_(included)) if included else newer
            )
        with _create_scoped_session(self.session) as conn:
            if (
                conn.execute(sqlalchemy.select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == study_id)).first()
                is None
            ):
                raise KeyError(models.NOT_FOUND_MSG)
            found = self._read(conn, where)
        if wanted is not None:
            found = [t for t in found if t._trial_id in wanted or t._trial_id > newer_than]
        return found

    def _read(self, conn: sqlalchemy.orm.Session, where: Any) -> list[FrozenTrial]:
        """The trials matching ``where``: their rows, then all their children in one ``UNION ALL``."""
        rows = conn.execute(
            sqlalchemy.select(
                _TRIALS.c.trial_id,
                _TRIALS.c.number,
                _TRIALS.c.state,
                _TRIALS.c.datetime_start,
                _TRIALS.c.datetime_complete,
            )
            .where(where)
            .order_by(_TRIALS.c.trial_id)
        ).all()
        if not rows:
            return []
        children: dict[int, dict[str, Any]] = {
            r.trial_id: {"params": [], "values": {}, "user": {}, "system": {}, "steps": {}} for r in rows
        }
        add = {
            _PARAM: lambda c, i, k, f, s: c["params"].append((i, k, f, s)),
            _VALUE: lambda c, i, k, f, s: c["values"].__setitem__(i, _value(f, k)),
            _USER_ATTR: lambda c, i, k, f, s: c["user"].__setitem__(k, json.loads(s)),
            _SYSTEM_ATTR: lambda c, i, k, f, s: c["system"].__setitem__(k, json.loads(s)),
            _STEP: lambda c, i, k, f, s: c["steps"].__setitem__(i, _step(f, k)),
        }
        # By the ids just read, as Optuna's loader does: the filter evaluated again would take in a trial created
        # (or leave out one finished) between the two statements.
        ids = [r.trial_id for r in rows]
        for at in range(0, len(ids), CHUNK):
            for trial_id, kind, i, k, f, s in conn.execute(_CHILDREN, {"ids": ids[at : at + CHUNK]}).all():
                add[kind](children[trial_id], i, k, f, s)
        return [_frozen(r, children[r.trial_id]) for r in rows]


_PARAM, _VALUE, _USER_ATTR, _SYSTEM_ATTR, _STEP = range(5)


def _children() -> Any:
    """Every child row of the trials ``ids`` as ``(trial_id, kind, int, text, float, text)``: a parameter
    ``(param_id, name, internal value, distribution JSON)``, a value ``(objective, value type, value, -)``, a user
    or system attribute ``(-, key, -, value JSON)``, an intermediate value ``(step, value type, value, -)``.
    Enum columns come back as their stored names."""
    none_i, none_f, none_s = (sqlalchemy.cast(sqlalchemy.null(), t) for t in (_INT, _FLOAT, _TEXT))

    def part(table: sqlalchemy.Table, kind: int, i: Any, k: Any, f: Any, s: Any) -> Any:
        key = table.c.trial_id.in_(sqlalchemy.bindparam("ids", expanding=True))
        cols = [table.c.trial_id, sqlalchemy.literal(kind, _INT), i, sqlalchemy.cast(k, _TEXT), f, s]
        return sqlalchemy.select(*cols).where(key)

    return sqlalchemy.union_all(
        part(
            _PARAMS,
            _PARAM,
            _PARAMS.c.param_id,
            _PARAMS.c.param_name,
            _PARAMS.c.param_value,
            _PARAMS.c.distribution_json,
        ),
        part(_VALUES, _VALUE, _VALUES.c.objective, _VALUES.c.value_type, _VALUES.c.value, none_s),
        part(_USER, _USER_ATTR, none_i, _USER.c.key, none_f, _USER.c.value_json),
        part(_SYSTEM, _SYSTEM_ATTR, none_i, _SYSTEM.c.key, none_f, _SYSTEM.c.value_json),
        part(_STEPS, _STEP, _STEPS.c.step, _STEPS.c.intermediate_value_type, _STEPS.c.intermediate_value, none_s),
    )


_INT, _FLOAT, _TEXT = sqlalchemy.Integer(), sqlalchemy.Float(), sqlalchemy.Text()
_CHILDREN = _children()
CHUNK = 500
"""Trials whose children one statement reads (as Optuna's loader batches them)."""


def _value(stored: float | None, kind: str) -> float:
    return models.TrialValueModel.stored_repr_to_value(stored, models.TrialValueModel.TrialValueType[kind])


def _step(stored: float | None, kind: str) -> float:
    return models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
        stored, models.TrialIntermediateValueModel.TrialIntermediateValueType[kind]
    )


def _frozen(row: Any, c: dict[str, Any]) -> FrozenTrial:
    """What ``RDBStorage._build_frozen_trial_from_trial_model`` builds from the same rows."""
    values = c["values"]
    params = sorted(c["params"])  # by param_id, as Optuna orders them
    dists = {name: _distribution(dist) for _, name, _, dist in params}
    return FrozenTrial(
        number=row.number,
        state=row.state,
        value=None,
        values=[values[k] for k in range(len(values))] if values else None,
        datetime_start=row.datetime_start,
        datetime_complete=row.datetime_complete,
        params={name: dists[name].to_external_repr(value) for _, name, value, _ in params},
        distributions=dists,
        user_attrs=c["user"],
        system_attrs=c["system"],
        intermediate_values=c["steps"],
        trial_id=row.trial_id,
    )
