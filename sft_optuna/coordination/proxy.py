"""``sft-optuna proxy``: Optuna's gRPC storage proxy in front of one storage, for studies with many workers.

Workers point at ``grpc://HOST:PORT`` instead of the database: the proxy holds a fixed pool of database
connections (one per server thread) whatever the number of workers, and serves the storage with sft-optuna's
guarded state changes and one-statement writes (``RetryingStorage``), so claims stay exact through it.
The proxy has no authentication: keep it on a private network (it binds to 127.0.0.1 unless told otherwise).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from sft_optuna.coordination.storage import Storage
from sft_optuna.errors import UserError

__all__ = ["DEFAULT_PORT", "DEFAULT_THREADS", "serve"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 13000
DEFAULT_THREADS = 16
"""Server threads, and database connections in the pool (one each)."""


def serve(storage: Storage, host: str, port: int, threads: int = DEFAULT_THREADS) -> None:
    """Serve ``storage`` over gRPC on ``host:port`` until interrupted."""
    from optuna.storages._grpc.server import make_server  # what run_grpc_proxy_server does, minus its logging

    if storage.backend.name == "grpc":
        raise UserError(f"{storage.masked} is itself a proxy: point the proxy at the database (--storage URL)")
    server = make_server(storage.optuna, host, port, ThreadPoolExecutor(max_workers=threads))
    try:
        server.start()
    except RuntimeError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {exc}") from None
    log.info("serving %s on grpc://%s:%d with %d threads", storage.masked, host, port, threads)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=5)
