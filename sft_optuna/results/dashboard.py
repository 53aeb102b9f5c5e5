"""``sft-optuna dashboard``: optuna-dashboard on the study storage, safe by default.

optuna-dashboard has no login and no CSRF protection, and its API can delete a study. So: bind to 127.0.0.1
unless told otherwise; read-only (every request that could change the storage refused with 403) by default
whenever the address is not a loopback one; optional HTTP basic auth whose password comes from an environment
variable, never from the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import os
import socketserver
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["PASSWORD_ENV", "access", "basic_auth", "is_loopback", "read_only", "serve"]

log = logging.getLogger(__name__)

PASSWORD_ENV = "SFT_OPTUNA_DASHBOARD_PASSWORD"  # noqa: S105 - the name of the variable, not a password
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_only(app: WSGIApp) -> WSGIApp:
    """Refuse every request that could write (anything but GET/HEAD/OPTIONS) with 403."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() not in SAFE_METHODS:
            body = b'{"reason": "this dashboard is read-only (sft-optuna dashboard --read-only)"}'
            start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return wrapped


def basic_auth(app: WSGIApp, user: str, password: str) -> WSGIApp:
    """HTTP basic authentication in front of ``app`` (use it behind TLS: basic auth is not encryption)."""
    expected = base64.b64encode(f"{user}:{password}".encode()).decode()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not hmac.compare_digest(token.strip(), expected):
            body = b"authentication required"
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", 'Basic realm="sft-optuna"'),
                    ("Content-Type", "text/plain"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return app(environ, start_response)

    return wrapped


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def access(host: str, read_only: bool | None) -> tuple[bool, str | None]:
    """The dashboard's policy for ``host``: (read-only?, basic-auth password or None).

    Read-only unless asked otherwise (``read_only`` False) when the address is not a loopback one; the password
    comes only from ``$SFT_OPTUNA_DASHBOARD_PASSWORD``, and exposing the dashboard without one is warned about.
    """
    loopback = is_loopback(host)
    password = os.environ.get(PASSWORD_ENV)
    if not loopback and not password:
        log.warning(
            "dashboard on %s without a password: anyone who reaches this port can read every study "
            "(set %s for basic auth, and put TLS in front)",
            host,
            PASSWORD_ENV,
        )
    return (read_only if read_only is not None else not loopback), password


def build_app(storage: Any, read_only_mode: bool, user: str | None, password: str | None) -> WSGIApp:
    """optuna-dashboard's WSGI app with the protections asked for."""
    from optuna_dashboard import wsgi

    app: WSGIApp = wsgi(storage)
    if read_only_mode:
        app = read_only(app)
    if password:
        app = basic_auth(app, user or "sft", password)
    return app


def serve(app: WSGIApp, host: str, port: int) -> None:
    """Serve until interrupted."""
    with make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler) as server:
        log.info("dashboard on http://%s:%d/dashboard", host, server.server_port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("dashboard stopped")
