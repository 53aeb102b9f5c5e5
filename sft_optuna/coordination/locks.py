"""The storage-wide lock: for creating schemas and studies (claims take no lock: see ``claims.py``).

SQLite and journal files: a lock file in a hidden folder beside the file (one machine, or a filesystem with
working locks). PostgreSQL: a session advisory lock, released by the server if the worker dies holding it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from filelock import FileLock

from sft_optuna.coordination.retrying import OUTAGE_S, retry

__all__ = ["LOCK_DIR", "LockHold", "advisory_lock", "file_lock", "memory_lock"]

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600  # a claim takes milliseconds; ten minutes means something is badly wrong
LOCK_DIR = ".sft-optuna-locks"  # beside the storage file; ignores itself in git (see _lock_file)


class LockHold:
    """What a lock yields: ``lost`` turns true, at the end of the block, if the lock may have been released
    while the block ran (PostgreSQL dropped the session holding it: a restart or a failover)."""

    lost: bool = False


def _lock_file(storage_file: Path, name: str) -> str:
    """``<dir>/.sft-optuna-locks/<file>.<name>.lock``: one hidden folder, not a lock file per name beside the
    user's files (they showed up in ``git status``)."""
    folder = storage_file.parent / LOCK_DIR
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        (folder / ".gitignore").write_text("*\n")
    return str(folder / f"{storage_file.name}.{name}.lock")


@contextlib.contextmanager
def file_lock(storage_file: Path, name: str) -> Iterator[LockHold]:
    """The lock ``name`` of a storage kept in ``storage_file`` (SQLite database, journal)."""
    with FileLock(_lock_file(storage_file, name), timeout=LOCK_TIMEOUT_S):
        yield LockHold()


_memory_lock = threading.RLock()


@contextlib.contextmanager
def memory_lock() -> Iterator[LockHold]:
    """An in-memory SQLite database lives in one process: a process-wide lock is all it needs."""
    with _memory_lock:
        yield LockHold()


_lock_engines: dict[str, sqlalchemy.Engine] = {}


def _lock_engine(url: str) -> sqlalchemy.Engine:
    if url not in _lock_engines:
        # Locks are rare (schema, study creation): no pool, so a worker's steady state is its one storage
        # connection; the lock's connection is closed when the lock is released.
        _lock_engines[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    return _lock_engines[url]


@contextlib.contextmanager
def advisory_lock(url: str, name: str, patience: float = OUTAGE_S) -> Iterator[LockHold]:
    """PostgreSQL's session advisory lock ``name``; waits up to ``patience`` s for an unreachable server."""
    hold = LockHold()
    key = int.from_bytes(hashlib.sha256(f"sft-optuna:{name}".encode()).digest()[:8], "little", signed=True)

    def acquire() -> sqlalchemy.Connection:
        conn = _lock_engine(url).connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except Exception:
            conn.close()
            raise
        return conn

    conn = retry(acquire, "lock", patience)
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
