"""One read of a study for all the callers that asked for it at once: the gRPC proxy's reads, grouped.

Every claim reads its study (Optuna's client cache asks the proxy for the unfinished trials and anything new),
and the proxy answers each such request by re-reading every unfinished trial of the study from the database
— under Optuna's cache lock, so requests that arrive together are read one after another, each paying the
full read (at 256 workers: ~300 unfinished trials, tens of milliseconds). :class:`SharedReadsStorage` lets
them share: a request that arrives while a read of its study is in progress waits for the *next* read (the
one in progress may have begun before this caller's last write, so it could miss it), and one read then serves
every request that arrived in the meantime. Each caller therefore gets a read that began after it asked — what
it would have got alone — and under load the database is read once per round instead of once per request.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Container
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial, TrialState

from sft_optuna.coordination.retrying import RetryingStorage

__all__ = ["SharedReadsStorage"]


@dataclass
class _Study:
    asked: int = 0
    """Requests so far (each caller's ticket is the count when it asked)."""
    answered: int = 0
    """Requests the latest finished read answers: those asked before it began."""
    reading: bool = False
    latest: list[FrozenTrial] = field(default_factory=list)


class SharedReadsStorage(RetryingStorage):
    """A :class:`RetryingStorage` whose ``get_all_trials`` of a study is shared by concurrent callers (see the
    module docstring); everything else as the storage it is built from."""

    def __init__(self, storage: RetryingStorage) -> None:
        super().__init__(storage.inner, storage.fast, storage.label)
        self._cond = threading.Condition()
        self._studies: dict[int, _Study] = {}

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        with self._cond:
            study = self._studies.setdefault(study_id, _Study())
            study.asked += 1
            ticket = study.asked
            while study.answered < ticket and study.reading:
                self._cond.wait()
            lead = study.answered < ticket  # none in progress: read for everyone who has asked so far
            if lead:
                study.reading, covers = True, study.asked
            else:  # a read that began after this request has finished
                trials = study.latest
        if lead:
            read: list[FrozenTrial] | None = None
            try:
                read = super().get_all_trials(study_id, deepcopy=False)
            finally:
                with self._cond:
                    study.reading = False
                    if read is not None:
                        study.latest, study.answered = read, covers
                    self._cond.notify_all()  # after an error the waiters read again, one of them for all
            trials = read
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials
