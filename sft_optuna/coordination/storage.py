"""One :class:`Storage` per URL: the Optuna storage (retried through outages), the storage-wide lock, the
masked URL — built once and handed to every layer above, from a table of the backends sft-optuna supports.

Spellings: ``sqlite:///study.db``, ``postgresql+psycopg://u:p@host/db`` (SQLAlchemy URLs),
``journal:///path/to/studies.log`` for Optuna's journal file on a shared filesystem, or ``grpc://host:port``
for Optuna's gRPC storage proxy (``sft-optuna proxy``) in front of any of them. Another database is refused.

Connections: a worker talking to PostgreSQL directly holds one (trial, heartbeat and stale-trial watcher
take turns on it); the proxy holds a fixed pool, whatever the number of workers behind it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from sft_optuna.coordination.fast_rdb import FastRDBStorage
from sft_optuna.coordination.locks import LockHold, advisory_lock, file_lock, memory_lock
from sft_optuna.coordination.retrying import OUTAGE_S, RetryingStorage, error_reason, retry
from sft_optuna.errors import StorageError

__all__ = [
    "BACKENDS",
    "DEFAULT_STORAGE",
    "OUTAGE_S",
    "Backend",
    "LockHold",
    "Storage",
    "error_reason",
    "mask_url",
    "open_storage",
    "resolve_url",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///sft-optuna.db"
ENV_STORAGE = "SFT_OPTUNA_STORAGE"
SQLITE_BUSY_TIMEOUT_S = 60  # workers wait for each other's writes instead of failing with "database is locked"


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


def _open_journal(url: str, patience: float, connections: int = 1) -> RetryingStorage:
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
    return RetryingStorage(journal, label=url)


def _open_sql(
    url: str, patience: float, engine_kwargs: dict[str, Any], overflow_once_open: int | None = None
) -> RetryingStorage:
    """Optuna's RDB storage behind Optuna's cache of finished trials, with the one-statement writes.

    Schema creation runs under the storage lock, so a cold start of many workers on an empty database does not
    race into "table already exists" / duplicate ``alembic_version`` errors. Where the schema is already
    there (every open but the first), no lock is taken: 64 workers opening one PostgreSQL database at once
    queued on that lock for most of a minute (measured: up to 49 sessions waiting in ``pg_advisory_lock``)."""
    parsed = _parse(url)
    _check_driver(url, parsed)

    def open_existing() -> FastRDBStorage | None:
        # Optuna's own compatibility check holds one connection while it opens a second: done here one at a
        # time instead, so a cold start of N workers needs N connections, not 2N. On a schema version other
        # than this Optuna's, the locked open below raises Optuna's own error.
        rdb = FastRDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True, skip_compatibility_check=True)
        if rdb.get_current_version() == rdb.get_head_version():
            return rdb
        rdb.engine.dispose()
        return None

    try:
        rdb = (
            retry(open_existing, "open", patience)
            if retry(lambda: _schema_ready(url, engine_kwargs), "open", patience)
            else None
        )
        if rdb is None:
            with backend_for(url).lock(url, "schema", patience):
                rdb = retry(lambda: FastRDBStorage(url, engine_kwargs=engine_kwargs), "open", patience)
        version = retry(rdb.get_current_version, "open", patience)  # read once for every fast path
        fast = rdb.use_fast_paths(version)
        pool = rdb.engine.pool
        if isinstance(pool, sqlalchemy.pool.QueuePool) and overflow_once_open is not None:
            # Optuna's schema creation and check nest a second connection inside a session (the locked open
            # only); after that its calls take one connection at a time: from here on, the pool is fixed.
            pool._max_overflow = overflow_once_open
        return RetryingStorage(optuna.storages.get_storage(rdb), fast, label=mask_url(url))
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        raise StorageError(f"cannot open storage {mask_url(url)}: {error_reason(exc)}") from None


def _schema_ready(url: str, engine_kwargs: dict[str, Any]) -> bool:
    """Has Optuna's schema been created in full? Its creator stamps ``alembic_version`` last, in the same
    locked open, so a stamped version means every table is there and opening needs no lock (nor writes)."""
    connect_args = engine_kwargs.get("connect_args", {})
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table("alembic_version"):
                return False
            return bool(conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def _open_sqlite(url: str, patience: float, connections: int = 1) -> RetryingStorage:
    db_path = _sqlite_path(_parse(url))
    if db_path is not None and not db_path.parent.is_dir():
        raise StorageError(f"storage URL {mask_url(url)}: directory {db_path.parent} does not exist")
    return _open_sql(url, patience, {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}})


def _open_postgresql(url: str, patience: float, connections: int = 1) -> RetryingStorage:
    # Pre-ping: a database restart costs a reconnect, not a crash. A fixed pool (no overflow once open): a
    # worker's threads (trial, heartbeat, watcher) take turns on one connection; the proxy passes its pool size.
    engine_kwargs = {"pool_pre_ping": True, "pool_size": connections, "max_overflow": 1, "pool_recycle": 3600}
    return _open_sql(url, patience, engine_kwargs, overflow_once_open=0)


GRPC_DEFAULT_PORT = 13000
GRPC_RECONNECT_MAX_S = 1.0
"""The most a worker's gRPC channel waits between two tries to reach a proxy that went away. gRPC's default
backoff grows to 120 s (measured here: workers reconnected 7-19 s after a restarted proxy listened again, each
at its own time); capped, a worker is back within about a second of its proxy."""
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),  # as Optuna's client: a study's trials in one message
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", int(GRPC_RECONNECT_MAX_S * 1000)),
]


def _grpc_client(host: str, port: int) -> Any:
    """Optuna's gRPC client whose channel reconnects with a capped backoff (:data:`GRPC_RECONNECT_MAX_S`)."""
    import grpc
    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.client import GrpcClientCache

    class _Client(GrpcStorageProxy):
        def _setup(self) -> None:  # Optuna's own, with the channel options above
            self._channel = grpc.insecure_channel(f"{self._host}:{self._port}", options=CHANNEL_OPTIONS)
            self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
            self._cache = GrpcClientCache(self._stub)

        def __reduce__(self) -> Any:  # a local class does not pickle: rebuild through the module function
            return (_grpc_client, (self._host, self._port))

    return _Client(host=host, port=port)


def _grpc_address(url: str) -> tuple[str, int]:
    rest = url.removeprefix("grpc://").rstrip("/")
    host, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not colon:
        host, port = rest, str(GRPC_DEFAULT_PORT)
    if not host or "/" in host or "@" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(f"storage URL {mask_url(url)}: expected grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000")
    return host, int(port)


def _open_grpc(url: str, patience: float, connections: int = 1) -> RetryingStorage:
    """Optuna's gRPC client, retried through proxy restarts like a database outage."""
    host, port = _grpc_address(url)
    proxy = _grpc_client(host, port)
    try:
        proxy.wait_server_ready(timeout=min(patience, OUTAGE_S))
    except ConnectionError:
        proxy.close()
        raise StorageError(
            f"no sft-optuna proxy answers at {url} (start one: sft-optuna proxy --storage URL --port {port})"
        ) from None
    return RetryingStorage(proxy, label=url)


@contextlib.contextmanager
def _no_lock(url: str, name: str, patience: float) -> Iterator[LockHold]:
    """Through the proxy there is no lock, and nothing needs one: claims and retries are lock-free, the
    proxy creates the schema, and a study created twice at once is caught as a duplicate name."""
    yield LockHold()


def _sqlite_lock(url: str, name: str, patience: float) -> AbstractContextManager[LockHold]:
    path = _sqlite_path(_parse(url))
    return memory_lock() if path is None else file_lock(path, name)


@dataclass(frozen=True)
class Backend:
    """What sft-optuna needs of a kind of storage: how to open it, and a lock every worker of it honours."""

    name: str
    open: Callable[[str, float, int], RetryingStorage]
    """``open(url, patience, connections)``: the Optuna storage, retried through outages; ``patience`` bounds
    the wait for a server that does not answer; ``connections``: the database connection pool's size."""
    lock: Callable[[str, str, float], AbstractContextManager[LockHold]]
    """``lock(url, name, patience)``: the storage-wide lock ``name``."""


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("sqlite", _open_sqlite, _sqlite_lock),
    "postgresql": Backend("postgresql", _open_postgresql, advisory_lock),
    "journal": Backend("journal", _open_journal, lambda url, name, patience: file_lock(_journal_path(url), name)),
    "grpc": Backend("grpc", _open_grpc, _no_lock),
}


def backend_for(url: str) -> Backend:
    """The backend of ``url``; a kind of storage without a cross-worker lock is refused, not run unlocked."""
    if url.startswith(("journal:", "grpc:")):
        name = url.partition(":")[0]
    else:
        name = _parse(url).get_backend_name()
    if name not in BACKENDS:
        raise StorageError(
            f"storage URL {mask_url(url)}: {name} is not supported (sft-optuna supports {', '.join(BACKENDS)}): "
            "use sqlite:///, postgresql+psycopg://, journal:/// or grpc://"
        )
    return BACKENDS[name]


class Storage:
    """One storage, opened once from its URL and handed to every layer above instead of a (storage, url) pair."""

    def __init__(self, url: str, backend: Backend, optuna_storage: RetryingStorage) -> None:
        self.url = url
        self.backend = backend
        self.optuna = optuna_storage
        """The Optuna storage (what ``optuna.load_study(storage=...)`` takes)."""

    @property
    def masked(self) -> str:
        """The URL without its password, for messages and logs."""
        return mask_url(self.url)

    def lock(self, name: str, patience: float = OUTAGE_S) -> AbstractContextManager[LockHold]:
        """The storage-wide lock ``name`` (schema and study creation; claims take none)."""
        return self.backend.lock(self.url, name, patience)

    def study_names(self) -> list[str]:
        """Names of all studies in the storage, sorted."""
        return sorted(s.study_name for s in self.optuna.get_all_studies())


def open_storage(url: str, patience: float = OUTAGE_S, connections: int = 1, create: bool = True) -> Storage:
    """The storage behind ``url``; every problem with the URL or the storage is a one-line StorageError.

    ``patience``: how long opening waits for a server that does not answer (a command a person types to look
    at results passes a few seconds, so a wrong host fails fast). ``create=False`` (look-up commands): a SQLite
    or journal file that does not exist is an error, not a new empty storage made from a mistyped path.
    """
    backend = backend_for(url)
    if not create:
        missing = _sqlite_path(_parse(url)) if backend.name == "sqlite" else None
        missing = _journal_path(url) if backend.name == "journal" else missing
        if missing is not None and not missing.exists():
            raise StorageError(f"storage URL {mask_url(url)}: {missing} does not exist (nothing was created)")
    return Storage(url, backend, backend.open(url, patience, connections))
