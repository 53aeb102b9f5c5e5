"""An Optuna storage that rides out outages: each call retried for up to a minute while the database is away.

With ``pool_pre_ping`` the next attempt gets a fresh connection, so a database restart costs workers a pause,
not a crash. A retried write whose commit did reach the server before the connection died could apply twice;
Optuna's writes are idempotent except trial creation, where the claim lock limits the harm to one extra trial
record.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import random
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
from sft_optuna.errors import StorageUnavailable

__all__ = ["OUTAGE_S", "Health", "RetryingStorage", "error_reason", "is_storage_error", "retry"]

log = logging.getLogger(__name__)

OUTAGE_ENV = "SFT_OPTUNA_OUTAGE_S"


def _outage_s() -> float:
    raw = os.environ.get(OUTAGE_ENV, "")
    try:
        value = float(raw) if raw else 60.0
    except ValueError:
        value = -1.0
    if not value > 0:
        print(
            f"sft-optuna: warning: ${OUTAGE_ENV}={raw!r} is not a positive number of seconds; using 60", file=sys.stderr
        )
        return 60.0
    return value


OUTAGE_S = _outage_s()
"""The outage window: how long a worker rides out a storage that gives no successful answer (restarts,
failovers) before it stops with exit code 3, its trial resumable. 60 s, or ``$SFT_OPTUNA_OUTAGE_S``."""

T = TypeVar("T")


PERMANENT_GRPC_CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "UNIMPLEMENTED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "OUT_OF_RANGE",
)
"""gRPC codes that are an answer, not an outage (Optuna's client turns most into KeyError/ValueError/...);
every other code — UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN (the proxy's own storage failed), ABORTED,
RESOURCE_EXHAUSTED, INTERNAL — is the transport or the storage behind it, retried like a database outage."""
MAX_DELAY_S = 1.0
"""The longest pause between two tries of a failed call: a worker's beats resume within about this long (plus
the gRPC reconnect, ``storage.GRPC_RECONNECT_MAX_S``) of the storage coming back, well inside a grace period,
so no watcher back a moment earlier sees a live worker's beat stand still."""
MAX_CALL_S = 4 * OUTAGE_S
"""The most one call retries while other calls of this process succeed (so the outage window never closes)."""


TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR})
"""I/O errors of a journal file worth retrying (an NFS server restarting); a full or read-only disk is not."""


def _grpc_code(exc: BaseException) -> str | None:
    """The status code's name of a gRPC error (grpc is only imported where a grpc:// storage loaded it)."""
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(exc, grpc.RpcError):
        return None
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return getattr(code, "name", None) or "UNKNOWN"


def error_reason(exc: BaseException) -> str:
    """The first line of what the database driver said (unwrapping Optuna's and SQLAlchemy's wrappers); for a
    gRPC error its status code and details (its text alone is ``<_InactiveRpcError of RPC that terminated
    with:>``)."""
    if isinstance(exc, StorageUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    code = _grpc_code(exc)
    if code is not None:
        details = exc.details() if callable(getattr(exc, "details", None)) else ""  # type: ignore[attr-defined]
        return f"gRPC {code}: {(details or '').strip().splitlines()[0] if details else 'no details'}"
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _auth_failure(text: str) -> bool:
    """A wrong password or unknown role: an answer from the server, not an outage (retrying it only delays
    the one-line error)."""
    if "authentication failed" in text or ("password" in text and "fail" in text):
        return True
    return "role" in text and "does not exist" in text


def _transient(exc: BaseException) -> bool:
    """Is this a storage error worth retrying (server gone or busy), not a bug, a full disk or a wrong password?"""
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        # Optuna's RDB storage wraps the driver's error; judge the error it wraps.
        cause = exc.__cause__ or exc.__context__
        return cause is not None and _transient(cause)
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        text = str(exc.orig).lower()
        if "disk is full" in text or "no space" in text or _auth_failure(text):
            return False
        return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    code = _grpc_code(exc)
    if code is not None:
        return code not in PERMANENT_GRPC_CODES
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True  # a journal file on a network filesystem that hiccups
    # Optuna's RDB session helper can hit an UnboundLocalError when the connection dies mid-commit
    # (seen with Optuna 5.0 on a PostgreSQL restart); it is the same outage.
    return isinstance(exc, (sqlalchemy.exc.DisconnectionError, ConnectionError, UnboundLocalError))


def is_storage_error(exc: BaseException) -> bool:
    """Did the storage or its transport fail (not the caller's request, not a trial's own code)? Our
    :class:`StorageUnavailable`, or a raw driver or transport error that reached the caller some other way: any
    SQLAlchemy or Optuna storage error, any gRPC error. An OSError is a storage error only when it comes from a
    storage call, which :class:`RetryingStorage` wraps (a trial's own FileNotFoundError is the trial's)."""
    if isinstance(exc, StorageUnavailable) or _grpc_code(exc) is not None:
        return True
    return isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError))


OUTAGE_EVIDENCE_S = 1.0
"""A failure streak (no successful storage call of this process) at least this long is an outage that voids a
watcher's evidence. A shorter one — a deadlock retried, a busy SQLite — delays a live worker's beats by at most
about this plus one retry pause (``MAX_DELAY_S``), well inside any grace period; counting it too would let
frequent blips keep a dead worker's trial RUNNING forever."""


class Health:
    """This process's record of reaching its storage: when a call last succeeded, and its outages.

    The evidence a watcher needs before it calls another worker dead (``heartbeat.StaleTrials``): a beat that
    did not advance means nothing across an interval in which this process could not reach the storage
    either. Shared by every thread of the process (heartbeats, the watcher, the training loop)."""

    def __init__(self) -> None:
        self.failures = 0
        """Storage calls that failed (each failed attempt of a retried call counts)."""
        self.outages = 0
        """Failure streaks of at least :data:`OUTAGE_EVIDENCE_S` that have ended (a call succeeded again)."""
        self.last_success = time.monotonic()
        """``time.monotonic()`` of the last successful call (or of the storage's opening)."""
        self._failing_since: float | None = None
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._failing_since is not None and now - self._failing_since >= OUTAGE_EVIDENCE_S:
                self.outages += 1
            self._failing_since = None
            self.last_success = now

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()

    def outage_marker(self) -> tuple[int, bool]:
        """(outages ended so far, whether an outage is going on now): evidence spans must see it unchanged."""
        with self._lock:
            ongoing = self._failing_since is not None and time.monotonic() - self._failing_since >= OUTAGE_EVIDENCE_S
            return self.outages, ongoing


def retry(fn: Callable[[], T], what: str, max_wait: float = OUTAGE_S, health: Health | None = None) -> T:
    """``fn()``, retried with backoff (0.25 s doubling to :data:`MAX_DELAY_S`, jittered) while it fails transiently.

    It gives up when the outage window closes: no successful storage call for ``max_wait`` seconds — counted
    from the last success of *any* call of this process (``health``), or from this call's start, whichever is
    later, so the seconds a reconnect takes after the server is back do not eat into a later call's window —
    or after :data:`MAX_CALL_S` of this call alone."""
    start = time.monotonic()
    delay = 0.25
    while True:
        try:
            result = fn()
        except Exception as exc:
            if health is not None and is_storage_error(exc):
                health.failed()
            now = time.monotonic()
            since = max(start, health.last_success) if health is not None else start
            if not _transient(exc) or now + delay - since > max_wait or now + delay - start > MAX_CALL_S:
                raise
            log.warning("storage %s failed (%s); retrying in %.1f s", what, error_reason(exc)[:200], delay)
            time.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, MAX_DELAY_S)
        else:
            if health is not None:
                health.succeeded()
            return result


class RetryingStorage(optuna.storages.BaseStorage):
    """Delegates every storage call to ``inner``, retried through outages (see the module docstring).

    With ``fast`` (SQL storages, see :mod:`.fast_writes`) the per-epoch writes — intermediate values, trial
    attributes, heartbeats — take one statement each; a write the fast path refuses (finished or unknown
    trial) goes to Optuna's method, which raises Optuna's error.
    """

    def __init__(self, inner: optuna.storages.BaseStorage, fast: FastWrites | None = None, label: str = "") -> None:
        self.inner = inner
        self.fast = fast
        self.label = label
        """Where the storage is (the URL without its password), for messages."""
        self.health = Health()
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # A user's joblib/spawned process gets the storage without this process's thread-locals and engine-bound
        # fast paths (Optuna's own methods serve it; Optuna's RDB storage drops its engine the same way).
        state = self.__dict__.copy()
        state["_local"] = None
        state["fast"] = None
        state["health"] = None  # this process's record; a copy keeps its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self.health = Health()

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

    def _retry(self, fn: Callable[[], T], name: str) -> T:
        """``fn()`` retried through an outage; a storage error that outlasts it is :class:`StorageUnavailable`
        (never mistaken for the caller's own error), naming the call, the storage and the status."""
        try:
            return retry(fn, f"{name} on {self.label}" if self.label else name, health=self.health)
        except Exception as exc:
            # From a storage call, an OSError (a journal file's I/O) or a dropped connection is the storage's too.
            ours = is_storage_error(exc) or _transient(exc) or isinstance(exc, OSError)
            if isinstance(exc, StorageUnavailable) or not ours:
                raise
            where = f" {self.label}" if self.label else ""
            raise StorageUnavailable(f"storage{where}: {name} failed ({error_reason(exc)[:300]})") from exc

    def _call(self, name: str, *args: Any) -> Any:
        return self._retry(lambda: getattr(self.inner, name)(*args), name)

    def _write(self, name: str, fast_name: str, *args: Any) -> None:
        fast = self.fast
        if fast is not None and self._retry(lambda: getattr(fast, fast_name)(*args), name):
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
            if self._retry(lambda: change(trial_id), "set_trial_state_values"):
                return True
            if state == TrialState.RUNNING:
                # Lost the pop: raise as Optuna does for a trial that is no longer WAITING (finished, or unknown:
                # KeyError); a trial another claimer just took (RUNNING) is the plain lost race.
                current = self.get_trial(trial_id)
                if current.state.is_finished():
                    raise optuna.exceptions.UpdateFinishedTrialError(
                        f"Trial#{current.number} has already finished and can not be updated."
                    )
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

    # Methods Optuna's base class implements itself: the inner storage's own (cached, gRPC) versions, retried.
    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return int(self._call("get_trial_id_from_study_id_trial_number", study_id, trial_number))

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return int(self._call("get_trial_number_from_id", trial_id))

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return float(self._call("get_trial_param", trial_id, param_name))

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return dict(self._call("get_trial_params", trial_id))

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return dict(self._call("get_trial_user_attrs", trial_id))

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return dict(self._call("get_trial_system_attrs", trial_id))

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    def __getattr__(self, name: str) -> Any:  # anything not in BaseStorage (e.g. Optuna's heartbeat API): as is
        if name.startswith("__") or name in ("inner", "fast", "label", "health", "_local"):
            raise AttributeError(name)  # copy/pickle probe before __init__ ran: no recursion through self.inner
        return getattr(self.inner, name)
