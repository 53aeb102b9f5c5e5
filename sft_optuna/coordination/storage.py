"""Storage URL -> Optuna storage that rides out outages; the storage-wide lock workers claim trials under.

Spellings: any SQLAlchemy URL Optuna accepts (``sqlite:///study.db``, ``postgresql+psycopg://u:p@host/db``),
or ``journal:///path/to/studies.log`` for Optuna's journal file on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from filelock import FileLock
from sqlalchemy.engine import make_url

from sft_optuna.coordination.fast_writes import FastWrites
from sft_optuna.errors import StorageError

__all__ = [
    "DEFAULT_STORAGE",
    "OUTAGE_S",
    "LockHold",
    "RetryingStorage",
    "error_reason",
    "mask_url",
    "open_storage",
    "resolve_url",
    "storage_lock",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///sft-optuna.db"
ENV_STORAGE = "SFT_OPTUNA_STORAGE"
SQLITE_BUSY_TIMEOUT_S = 60  # workers wait for each other's writes instead of failing with "database is locked"
LOCK_TIMEOUT_S = 600  # a claim takes milliseconds; ten minutes means something is badly wrong
OUTAGE_S = 60.0  # how long a worker keeps retrying a storage that stopped answering (restarts, failovers)


def resolve_url(url: str | None) -> str:
    """``--storage``, else ``$SFT_OPTUNA_STORAGE``, else a SQLite file in the working directory."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for logs and error messages).

    Done by hand, not by SQLAlchemy's parser: with an unencoded ``@`` in the password (``u:SEC@RET@host``) a
    parser splits at the first ``@`` and prints the password's tail as the host. Everything between ``://``
    and the *last* ``@`` before the query string is credentials.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, _, query = rest.partition("?")
    creds, at, host = head.rpartition("@")
    if not at:
        return url if "password=" not in url.lower() else re.sub(r"(password=)[^&]*", r"\1***", url, flags=re.I)
    user, colon, _ = creds.partition(":")
    masked = f"{scheme}://{user}{':***' if colon else ''}@{host}"
    query = re.sub(r"(password=)[^&]*", r"\1***", query, flags=re.IGNORECASE)
    return masked + (f"?{query}" if query else "")


def _journal_path(url: str) -> Path:
    path = url.removeprefix("journal://")
    if not path.startswith("/"):
        raise StorageError(f"{url}: a journal URL needs an absolute path, e.g. journal:///nfs/studies.log")
    return Path(path)


LOCK_DIR = ".sft-optuna-locks"  # beside the storage file; ignores itself in git (see _lock_file)


def _lock_file(storage_file: Path, name: str) -> str:
    """``<dir>/.sft-optuna-locks/<file>.<name>.lock``: one hidden folder, not a lock file per name beside the
    user's files (they showed up in ``git status``)."""
    folder = storage_file.parent / LOCK_DIR
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        (folder / ".gitignore").write_text("*\n")
    return str(folder / f"{storage_file.name}.{name}.lock")


def _looks_like_journal(path: Path) -> bool:
    """An absent or empty file, or one whose first line is a journal entry (a JSON object with an op code).

    Optuna skips lines it cannot parse, so without this a worker would append a study to any file it is
    pointed at, a user's notes included."""
    try:
        with path.open("rb") as fh:
            first = fh.readline(1 << 20)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise StorageError(f"journal://{path}: cannot read ({exc.strerror or exc})") from None
    if not first.strip():
        return True
    try:
        entry = json.loads(first)
    except ValueError:
        return False
    return isinstance(entry, dict) and "op_code" in entry


def _sqlite_path(url: sqlalchemy.URL) -> Path | None:
    db = url.database
    return None if not db or db == ":memory:" else Path(db).resolve()


def _parse(url: str) -> sqlalchemy.URL:
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        raise StorageError(
            f"malformed storage URL {mask_url(url)!r}: expected e.g. sqlite:///study.db, "
            "postgresql+psycopg://user:pass@host/db or journal:///path/studies.log"
        ) from None
    if "@" in (parsed.host or ""):
        # SQLAlchemy split at the first @: the rest of the password would be tried, and printed, as the host.
        raise StorageError(
            f"storage URL {mask_url(url)}: the password contains an unencoded '@'; percent-encode it as %40 "
            "(and ':' as %3A, '/' as %2F)"
        )
    return parsed


class LockHold:
    """What :func:`storage_lock` yields: ``lost`` turns true, at the end of the block, if the lock may have
    been released while the block ran (PostgreSQL dropped the session holding it: a restart or a failover)."""

    lost: bool = False


@contextlib.contextmanager
def storage_lock(url: str, name: str = "claim", patience: float = OUTAGE_S) -> Iterator[LockHold]:
    """A lock shared by every worker of this storage, for claiming trials and creating schema/studies.

    SQLite and journal files: a lock file beside the database (one machine, or a filesystem with working
    locks). PostgreSQL: a session advisory lock, released by the server if the worker dies holding it.
    SQLite ignores ``SELECT ... FOR UPDATE``, which is why claiming a queued trial needs this at all.
    ``patience``: how long to wait for an unreachable PostgreSQL server.
    """
    hold = LockHold()
    if url.startswith("journal:"):
        with FileLock(_lock_file(_journal_path(url), name), timeout=LOCK_TIMEOUT_S):
            yield hold
        return
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(parsed)
        if path is None:
            with _memory_lock:
                yield hold
            return
        with FileLock(_lock_file(path, name), timeout=LOCK_TIMEOUT_S):
            yield hold
        return
    if backend == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"sft-optuna:{name}".encode()).digest()[:8], "little", signed=True)

        def acquire() -> sqlalchemy.Connection:
            conn = _lock_engine(url).connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except Exception:
                conn.close()
                raise
            return conn

        conn = _retry(acquire, "lock", patience)
        try:
            yield hold
        finally:
            try:
                # False: this session no longer held it. The same session answering True held it throughout.
                held = conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key}).scalar()
                conn.close()
                hold.lost = not held
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # The server ended the session (restart): it released the lock with it, maybe mid-block.
                log.warning("storage lock connection lost (%s); the server released the lock", exc)
                conn.invalidate()
                hold.lost = True
        return
    log.warning("no cross-worker lock for %s storage; run one worker at a time", backend)
    yield hold


_memory_lock = threading.RLock()
_lock_engines: dict[str, sqlalchemy.Engine] = {}


def _lock_engine(url: str) -> sqlalchemy.Engine:
    if url not in _lock_engines:
        # One connection is all a lock needs; pre-ping so a restarted server does not hand us a dead one.
        _lock_engines[url] = sqlalchemy.create_engine(url, pool_size=1, max_overflow=1, pool_pre_ping=True)
    return _lock_engines[url]


def _engine_kwargs(parsed: sqlalchemy.URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    # Pre-ping: a database restart costs a reconnect, not a crash. Small pool: a worker needs two
    # connections (trial + heartbeat) and a third for the lock; max_connections must cover 3 per worker.
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 3600}


def open_storage(url: str, patience: float = OUTAGE_S) -> Any:
    """The Optuna storage behind ``url``, retrying through short outages (see :class:`RetryingStorage`).

    ``patience``: how long opening waits for a server that does not answer (a command a person types to look
    at results passes a few seconds, so a wrong host fails fast).

    Schema creation is serialized by the storage lock, so a cold start of many workers on an empty database
    does not race into "table already exists" / duplicate ``alembic_version`` errors.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        path = _journal_path(url)
        if not path.parent.is_dir():
            raise StorageError(f"{url}: directory {path.parent} does not exist")
        if path.is_dir():
            example = f"journal://{str(path).rstrip('/')}/studies.log"
            raise StorageError(f"{url}: {path} is a directory; name a file in it, e.g. {example}")
        if not _looks_like_journal(path):
            raise StorageError(f"{url}: {path} is not an Optuna journal file (its first line is not a journal entry)")
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        try:
            journal = JournalStorage(backend)  # replays the whole log: a file that is not a journal fails here
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise StorageError(f"{url}: {path} is not an Optuna journal file ({type(exc).__name__})") from None
        except OSError as exc:
            raise StorageError(f"{url}: cannot open {path} ({exc.strerror or exc})") from None
        return RetryingStorage(journal)  # type: ignore[abstract]  # methods set below the class
    parsed = _parse(url)
    _check_driver(url, parsed)
    if parsed.get_backend_name() == "sqlite":
        db_path = _sqlite_path(parsed)
        if db_path is not None and not db_path.parent.is_dir():
            raise StorageError(f"storage URL {mask_url(url)}: directory {db_path.parent} does not exist")
    try:
        with storage_lock(url, "schema", patience):
            rdb = _retry(
                lambda: optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(parsed)), "open", patience
            )
            fast = _retry(lambda: FastWrites.for_storage(rdb), "open", patience)
            # get_storage adds Optuna's cache of finished trials in front of the database.
            return RetryingStorage(optuna.storages.get_storage(rdb), fast)  # type: ignore[abstract]
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        reason = error_reason(exc)
        raise StorageError(f"cannot open storage {mask_url(url)}: {reason}") from None


# driver name (as SQLAlchemy calls it) -> what to install for it
DRIVER_PACKAGES = {
    "psycopg": "pip install 'psycopg[binary]' (or pip install -e '.[postgres]')",
    "psycopg2": "pip install psycopg2-binary, or use postgresql+psycopg:// with pip install -e '.[postgres]'",
    "asyncpg": "use postgresql+psycopg:// (pip install -e '.[postgres]'); async drivers do not fit Optuna",
    "pg8000": "pip install pg8000",
    "mysqldb": "pip install mysqlclient, or use mysql+pymysql:// with pip install pymysql",
    "pymysql": "pip install pymysql",
    "mysqlconnector": "pip install mysql-connector-python",
}


def _check_driver(url: str, parsed: sqlalchemy.URL) -> None:
    """Refuse an unknown database kind, or a driver that is not installed, naming what to install."""
    try:
        dialect = parsed.get_dialect()
    except Exception:  # noqa: BLE001 - SQLAlchemy's NoSuchModuleError and friends: not a database it knows
        raise StorageError(
            f"storage URL {mask_url(url)}: unknown database kind {parsed.drivername!r} "
            "(expected sqlite:///, postgresql+psycopg://, mysql+pymysql:// or journal:///)"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError:
        driver = dialect.driver
        hint = DRIVER_PACKAGES.get(driver, f"install the Python package of the {driver!r} driver")
        raise StorageError(f"storage URL {mask_url(url)}: driver {driver!r} is not installed ({hint})") from None


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
    # Optuna's RDB session helper can hit an UnboundLocalError when the connection dies mid-commit
    # (seen with Optuna 5.0 on a PostgreSQL restart); it is the same outage.
    return isinstance(exc, (sqlalchemy.exc.DisconnectionError, ConnectionError, UnboundLocalError))


def _retry(fn: Any, what: str, max_wait: float = OUTAGE_S) -> Any:
    deadline = time.monotonic() + max_wait
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            reason = error_reason(exc)[:200]
            log.warning("storage %s failed (%s); retrying in %.1f s", what, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class RetryingStorage(optuna.storages.BaseStorage):
    """Delegates to an Optuna storage and retries a call for up to a minute when the database is away.

    With ``pool_pre_ping`` the next attempt gets a fresh connection, so a database restart costs workers a
    pause, not a crash. A retried write whose commit did reach the server before the connection died could
    apply twice; Optuna's writes are idempotent except trial creation, where the budget check's lock limits
    the harm to one extra trial record.

    With ``fast`` (SQL storages, see :mod:`.fast_writes`) the per-epoch writes — intermediate values,
    trial attributes, heartbeats — take one statement each; a write the fast path refuses (finished or unknown
    trial) goes to Optuna's method, which raises Optuna's error.
    """

    def __init__(self, inner: optuna.storages.BaseStorage, fast: FastWrites | None = None) -> None:
        self.inner = inner
        self.fast = fast

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write("set_trial_intermediate_value", "intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_user_attr", "user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("set_trial_system_attr", "system_attr", trial_id, key, value)

    def _write(self, name: str, fast_name: str, *args: Any) -> None:
        fast = self.fast
        if fast is not None and _retry(lambda: getattr(fast, fast_name)(*args), name):
            return
        _retry(lambda: getattr(self.inner, name)(*args), name)

    def __getattr__(self, name: str) -> Any:  # anything not in BaseStorage: passed through unretried
        return getattr(self.inner, name)


def _delegate(name: str) -> Any:
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return _retry(lambda: getattr(self.inner, name)(*args, **kwargs), name)

    method.__name__ = name
    return method


for _name in [*sorted(optuna.storages.BaseStorage.__abstractmethods__), "get_n_trials", "get_best_trial"]:
    if _name not in RetryingStorage.__dict__:  # the writes defined in the class have a fast path
        setattr(RetryingStorage, _name, _delegate(_name))
RetryingStorage.__abstractmethods__ = frozenset()
