"""Optuna's RDB storage with the fast paths of :mod:`.fast_reads` and :mod:`.fast_writes` under its own methods.

The reads and the writes a trial makes through Optuna's cache (``_CachedStorage``, which every Optuna RDB storage
is wrapped in) call the RDB storage's methods — some of them private ones, under the cache's one lock, which
every other call of the process then waits on (in the gRPC proxy: every worker's). Overriding them here puts
the plain-SQL statements under every caller: our workers, the proxy, and plain Optuna clients of the proxy.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from sft_optuna.coordination.fast_reads import FastReads
from sft_optuna.coordination.fast_writes import FastWrites

__all__ = ["FastRDBStorage"]


class FastRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose trial reads, parameter writes and trial creations go through the fast paths
    once :meth:`use_fast_paths` found the schema to be one they know (until then, and otherwise, Optuna's own)."""

    fast_reads: FastReads | None = None
    fast_writes: FastWrites | None = None

    def use_fast_paths(self, version: str) -> FastWrites | None:
        """``version``: the schema's, as ``get_current_version`` read it. Returns the fast writes (``None`` where
        they do not apply), for the storage's other writes (:class:`.retrying.RetryingStorage`)."""
        self.fast_reads = FastReads.for_storage(self, version)
        self.fast_writes = FastWrites.for_storage(self, version)
        return self.fast_writes

    def __getstate__(self) -> dict[str, Any]:
        # Optuna's RDB storage drops its engine to pickle and rebuilds it; the fast paths hold it too, so a
        # copy (a user's joblib or spawned process) serves with Optuna's own statements.
        state = super().__getstate__()
        state["fast_reads"] = None
        state["fast_writes"] = None
        return state

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if self.fast_reads is None:
            return super().get_trial(trial_id)
        return self.fast_reads.trial(trial_id)

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        if self.fast_reads is None:
            return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        return self.fast_reads.trials(study_id, states, included_trial_ids, trial_id_greater_than)

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        created = None if self.fast_writes is None else self.fast_writes.create_trial(study_id, template_trial)
        return created if created is not None else super()._create_new_trial(study_id, template_trial)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        # The fast path needs the study's distribution of this parameter to check against: Optuna's cache passes
        # it once it has seen one. The first write of each parameter, and any the fast path refuses, is Optuna's
        # (which raises its errors in its order: unknown trial, finished trial, incompatible distribution).
        fast = self.fast_writes
        if (
            fast is not None
            and previous_distribution is not None
            and _compatible(previous_distribution, distribution)
            and fast.param(trial_id, param_name, param_value_internal, distribution_to_json(distribution))
        ):
            return
        super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)


def _compatible(old: BaseDistribution, new: BaseDistribution) -> bool:
    try:
        check_distribution_compatibility(old, new)
    except ValueError:
        return False
    return True
