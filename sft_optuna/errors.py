"""Errors that mean "the user asked for something we cannot do".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, key, value, URL, path); the message names the bad thing."""


class ConfigError(UserError):
    """A study file or stored study config is invalid."""


class DataError(UserError):
    """A dataset is missing, malformed or cannot be downloaded."""


class ModelError(UserError):
    """Model weights cannot be had or do not fit."""


class StorageError(UserError):
    """A storage URL is malformed or the storage cannot be reached."""


class NodeFault(Exception):  # noqa: N818 - named for what it is, like Optuna's TrialPruned
    """This node cannot run trials (device, disk, weights file, data), whatever the trial's parameters.

    Raised inside a trial, the trial is given back (failed as retryable, not counted) and the worker stops:
    a broken node must not burn the study's budget trial after trial.
    """


class StorageUnavailable(Exception):  # noqa: N818 - named for what it is
    """The storage (database, journal file, gRPC proxy) failed, or gave no successful answer for ``OUTAGE_S``.

    Never a trial's error, whatever call it surfaced from (a report, a prune check, an attribute, a claim): the
    worker gives its trial back once the storage answers again (FAIL, reason ``storage outage``: retried from its
    checkpoint, uncounted) — or, when it does not answer, leaves it RUNNING for a watcher — and stops with exit
    code 3. ``__cause__`` is the driver's or transport's own exception.
    """
