"""Storage URL -> Optuna storage; the study-wide lock workers claim trials under; heartbeats.

Spellings: any SQLAlchemy URL Optuna accepts (``sqlite:///study.db``, ``postgresql+psycopg://u:p@host/db``),
or ``journal:///path/to/studies.log`` for Optuna's journal file on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from filelock import FileLock
from sqlalchemy.engine import make_url

from sft_optuna.errors import StorageError

__all__ = [
    "DEFAULT_STORAGE",
    "Heartbeat",
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


def resolve_url(url: str | None) -> str:
    """``--storage``, else ``$SFT_OPTUNA_STORAGE``, else a SQLite file in the working directory."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for logs and error messages)."""
    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse: hide everything between : and @
        head, sep, tail = url.rpartition("@")
        if not sep:
            return url
        scheme, _, creds = head.partition("://")
        return f"{scheme}://{creds.split(':')[0]}:***@{tail}"


def _journal_path(url: str) -> Path:
    path = url.removeprefix("journal://")
    if not path.startswith("/"):
        raise StorageError(f"{url}: a journal URL needs an absolute path, e.g. journal:///nfs/studies.log")
    return Path(path)


def _sqlite_path(url: sqlalchemy.URL) -> Path | None:
    db = url.database
    return None if not db or db == ":memory:" else Path(db).resolve()


def _parse(url: str) -> sqlalchemy.URL:
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001
        raise StorageError(
            f"malformed storage URL {mask_url(url)!r}: expected e.g. sqlite:///study.db, "
            "postgresql+psycopg://user:pass@host/db or journal:///path/studies.log"
        ) from None


@contextlib.contextmanager
def storage_lock(url: str, name: str = "claim") -> Iterator[None]:
    """A lock shared by every worker of this storage, for claiming trials and creating schema/studies.

    SQLite and journal files: a lock file beside the database (one machine, or a filesystem with working
    locks). PostgreSQL: a session advisory lock, released by the server if the worker dies holding it.
    SQLite ignores ``SELECT ... FOR UPDATE``, which is why claiming a queued trial needs this at all.
    """
    if url.startswith("journal:"):
        with FileLock(f"{_journal_path(url)}.{name}.lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(parsed)
        if path is None:
            with _memory_lock:
                yield
            return
        with FileLock(f"{path}.{name}.lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    if backend == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"sft-optuna:{name}".encode()).digest()[:8], "little", signed=True)
        with _lock_engine(url).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    log.warning("no cross-worker lock for %s storage; run one worker at a time", backend)
    yield


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


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None) -> Any:
    """The Optuna storage behind ``url``; schema creation is serialized so cold starts of many workers don't race."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        path = _journal_path(url)
        if not path.parent.is_dir():
            raise StorageError(f"{url}: directory {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    parsed = _parse(url)
    try:
        parsed.get_dialect()
    except Exception as exc:  # noqa: BLE001 - unknown dialect or missing driver
        raise StorageError(f"storage URL {mask_url(url)}: unsupported or driver missing ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        db_path = _sqlite_path(parsed)
        if db_path is not None and not db_path.parent.is_dir():
            raise StorageError(f"storage URL {mask_url(url)}: directory {db_path.parent} does not exist")
    try:
        with storage_lock(url, "schema"):
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(parsed),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
            )
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {mask_url(url)}: {reason}") from None


class Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds in a thread while the context is open.

    Optuna only beats inside ``study.optimize``; our workers use ask/tell, so they beat here.
    """

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        assert self.interval is not None
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a storage outage must not kill the trial
                log.warning("heartbeat for trial id %d failed: %s", self.trial_id, exc)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
