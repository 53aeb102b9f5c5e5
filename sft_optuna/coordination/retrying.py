"""An Optuna storage that rides out outages: each call retried for up to a minute while the database is away.

With ``pool_pre_ping`` the next attempt gets a fresh connection, so a database restart costs workers a pause,
not a crash. A retried write whose commit did reach the server before the connection died could apply twice;
Optuna's writes are idempotent except trial creation, where the claim lock limits the harm to one extra trial
record.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from sft_optuna.coordination.fast_writes import FastWrites

__all__ = ["OUTAGE_S", "RetryingStorage", "error_reason", "retry"]

log = logging.getLogger(__name__)

OUTAGE_S = 60.0  # how long a worker keeps retrying a storage that stopped answering (restarts, failovers)

T = TypeVar("T")


def error_reason(exc: BaseException) -> str:
    """The first line of what the database driver said (unwrapping Optuna's and SQLAlchemy's wrappers)."""
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _transient(exc: BaseException) -> bool:
    """Is this a storage error worth retrying (server gone or busy), not a bug or a full disk?"""
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        # Optuna's RDB storage wraps the driver's error; judge the error it wraps.
        cause = exc.__cause__ or exc.__context__
        return cause is not None and _transient(cause)
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        text = str(exc.orig).lower()
        if "disk is full" in text or "no space" in text:
            return False
        return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    if _grpc_unavailable(exc):
        return True
    # Optuna's RDB session helper can hit an UnboundLocalError when the connection dies mid-commit
    # (seen with Optuna 5.0 on a PostgreSQL restart); it is the same outage.
    return isinstance(exc, (sqlalchemy.exc.DisconnectionError, ConnectionError, UnboundLocalError))


def _grpc_unavailable(exc: BaseException) -> bool:
    """The gRPC proxy is down or restarting (grpc is only imported where a grpc:// storage loaded it)."""
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(exc, grpc.RpcError):
        return False
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def retry(fn: Callable[[], T], what: str, max_wait: float = OUTAGE_S) -> T:
    """``fn()``, retried with backoff (0.25 s doubling to 5 s) while it fails transiently, for ``max_wait`` s."""
    deadline = time.monotonic() + max_wait
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("storage %s failed (%s); retrying in %.1f s", what, error_reason(exc)[:200], delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class RetryingStorage(optuna.storages.BaseStorage):
    """Delegates every storage call to ``inner``, retried through outages (see the module docstring).

    With ``fast`` (SQL storages, see :mod:`.fast_writes`) the per-epoch writes — intermediate values, trial
    attributes, heartbeats — take one statement each; a write the fast path refuses (finished or unknown
    trial) goes to Optuna's method, which raises Optuna's error.
    """

    def __init__(self, inner: optuna.storages.BaseStorage, fast: FastWrites | None = None) -> None:
        self.inner = inner
        self.fast = fast
        self._local = threading.local()

    @contextlib.contextmanager
    def serving(self, study_id: int, trials: list[FrozenTrial]) -> Iterator[None]:
        """Within the block, this thread's reads of the study's trials are served from ``trials`` (a read made
        a moment ago) instead of the storage. A claim reads the study once to pop a queued trial; the sampler
        then reads it again (TPE with ``constant_liar`` bypasses Optuna's per-trial cache on purpose) — through
        the gRPC proxy that second read re-sends every running and queued trial, ~a third of a claim's cost."""
        self._local.served = (study_id, trials)
        try:
            yield
        finally:
            self._local.served = None

    def _call(self, name: str, *args: Any) -> Any:
        return retry(lambda: getattr(self.inner, name)(*args), name)

    def _write(self, name: str, fast_name: str, *args: Any) -> None:
        fast = self.fast
        if fast is not None and retry(lambda: getattr(fast, fast_name)(*args), name):
            return
        self._call(name, *args)

    # The per-epoch writes: one statement each where the fast path applies.
    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write("set_trial_intermediate_value", "intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_user_attr", "user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_system_attr", "system_attr", trial_id, key, value)

    # Everything else: Optuna's method, retried.
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return int(self._call("create_new_study", directions, study_name))

    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return int(self._call("get_study_id_from_name", study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return str(self._call("get_study_name_from_id", study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._call("get_study_directions", study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_user_attrs", study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_system_attrs", study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        return list(self._call("get_all_studies"))

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return int(self._call("create_new_trial", study_id, template_trial))

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Popping a queued trial (-> RUNNING) and failing one (-> FAIL) are guarded single statements where
        the fast path applies, so one caller wins on SQLite too; a lost FAIL gets Optuna's error."""
        fast = self.fast
        if fast is not None and values is None and state in (TrialState.RUNNING, TrialState.FAIL):
            change = fast.start if state == TrialState.RUNNING else fast.fail
            if retry(lambda: change(trial_id), "set_trial_state_values"):
                return True
            if state == TrialState.RUNNING:
                return False
        return bool(self._call("set_trial_state_values", trial_id, state, values))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        trial: FrozenTrial = self._call("get_trial", trial_id)
        return trial

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        served = getattr(self._local, "served", None)
        if served is not None and served[0] == study_id:
            trials = [t for t in served[1] if states is None or t.state in states]
            return copy.deepcopy(trials) if deepcopy else trials
        return list(self._call("get_all_trials", study_id, deepcopy, states))

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return int(self._call("get_n_trials", study_id, state))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        trial: FrozenTrial = self._call("get_best_trial", study_id)
        return trial

    def __getattr__(self, name: str) -> Any:  # anything not in BaseStorage (e.g. Optuna's heartbeat API): as is
        return getattr(self.inner, name)
