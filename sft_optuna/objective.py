"""One trial: its parameters -> a trainer -> report and prune each epoch -> checkpoint; its value.

The only place where training meets Optuna: the trainer below knows no trials. (Claiming a trial and telling
the storage how it ended are the worker's and the claims' business.)"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import optuna
import torch

from sft_optuna import attrs
from sft_optuna.config import StudyConfig, TrainConfig, trial_config
from sft_optuna.coordination.checkpoints import CheckpointStore, owner
from sft_optuna.errors import ConfigError
from sft_optuna.search.asha import pause_epochs
from sft_optuna.search.audit import audit_rate, is_audited
from sft_optuna.training.data import Splits
from sft_optuna.training.model import check_architecture
from sft_optuna.training.packs import Pack
from sft_optuna.training.trainer import EpochResult, Trainer

__all__ = ["HistoryWriter", "Interrupted", "InvalidValueError", "Objective", "Paused"]

log = logging.getLogger(__name__)


class Interrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The worker was asked to stop (SIGTERM/SIGINT); the trial is checkpointed and can be resumed."""


class Paused(Exception):  # noqa: N818 - a control-flow signal, not an error
    """ASHA paused the trial at a rung: its checkpoint is kept, and a claim may promote it later."""

    def __init__(self, rung: int, epoch: int) -> None:
        super().__init__(f"paused at rung {rung} (epoch {epoch})")
        self.rung = rung


class InvalidValueError(ValueError):
    """The objective produced something that is not a finite accuracy in [0, 1]."""


class HistoryWriter:
    """Writes a trial's learning curve (user attribute ``history``) on a thread of its own.

    Of an epoch's storage calls, ``report`` (which also fails fast when the trial was failed behind the
    worker's back) and ``should_prune`` decide something and stay on the training loop; the history is for
    people (``status``, the study note) and need not hold the GPU — through the gRPC proxy each write is a
    round trip to a server that hundreds of workers share. Curves handed in while a write is in flight
    coalesce into the newest one. Leaving the context writes the last curve, and raises the first failed
    write's error unless another exception is already on its way out.

    >>> import optuna
    >>> study = optuna.create_study()
    >>> trial = study.ask()
    >>> with HistoryWriter(trial) as history:
    ...     history.put([{"epoch": 1, "val_acc": 0.5}])
    >>> study.trials[0].user_attrs["history"]
    [{'epoch': 1, 'val_acc': 0.5}]
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self._trial = trial
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] | None = None
        self._closed = False
        self._error: Exception | None = None
        self._latest: list[dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._run, name=f"history-{trial.number}", daemon=True)

    def put(self, history: list[dict[str, Any]]) -> None:
        """Hand in the curve so far; it replaces one not yet written."""
        with self._cond:
            self._pending = history
            self._latest = history
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                value, self._pending = self._pending, None
            try:
                self._trial.set_user_attr(attrs.HISTORY, value)
            except Exception as exc:  # noqa: BLE001 - re-raised on the training thread when the context closes
                with self._cond:
                    self._error = self._error or exc
                    self._pending = None
                return

    def __enter__(self) -> HistoryWriter:
        # The key exists before the thread writes: ``trial.user_attrs`` copies the dict on the training
        # thread, which a key added meanwhile would break ("dictionary changed size during iteration").
        if attrs.HISTORY not in self._trial.user_attrs:
            self._trial.set_user_attr(attrs.HISTORY, [])
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if exc_type is None and self._error is not None:
            # One write failed (its storage call outlasted the outage window) and the writer stopped; the storage
            # may be back: the newest curve once more, and only its failure is raised.
            if self._latest is None:
                raise self._error
            self._trial.set_user_attr(attrs.HISTORY, self._latest)


def _trial_config(config: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The trial's config; a combination the study file's checks could not see (say warmup_epochs and epochs
    both searched, or ``bn: frozen`` with a searched architecture that has no BatchNorm) fails the trial as
    invalid."""
    try:
        out = trial_config(config, params)
        if "model.arch" in params or "bn" in params or "model.stem" in params or "model.image_size" in params:
            check_architecture(out.model, out.train)
        return out
    except ConfigError as exc:
        raise InvalidValueError(str(exc)) from None


class Objective:
    """Callable objective: fine-tunes one configuration and returns its validation accuracy."""

    def __init__(
        self,
        config: StudyConfig,
        splits: Splits,
        device: torch.device,
        checkpoints: CheckpointStore | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_epoch: Callable[[int, EpochResult], None] | None = None,
        on_step: Callable[[int, int, int, int], None] | None = None,
        placement: str = "device",
        pack: Pack | None = None,
    ) -> None:
        self.config = config
        self.splits = splits
        self.device = device
        self.placement = placement
        """Where the splits live while a trial trains (``device`` or ``host``: the node decided, once)."""
        self.checkpoints = checkpoints
        self.should_stop = should_stop
        self.on_epoch = on_epoch
        self.on_step = on_step
        """``on_step(trial number, epoch, step, steps per epoch)``: progress for a person at a terminal."""
        self.pack = pack
        """Trials called on several threads train as members of this fused pack (``worker --pack K``)."""
        self.study_identity: str | None = None
        """The study's identity (``study.identity``): checkpoints are bound to it and to the trial's parameters."""

    def __call__(self, trial: optuna.Trial) -> float:
        config = _trial_config(self.config, trial.params)
        train_cfg = config.train
        lineage = attrs.lineage(trial)

        def fresh() -> Trainer:
            seed = train_cfg.seed + lineage
            return Trainer(
                self.splits, config.model, train_cfg, self.device, seed=seed, placement=self.placement, pack=self.pack
            )

        trainer = fresh()
        try:
            # local, not on self: with a pack, trials run on several threads at once
            bound = owner(self.study_identity, trial.params) if self.study_identity is not None else None
            if not self._resume(trial, trainer, lineage, bound):
                trainer.close()
                trainer = fresh()  # a checkpoint this version cannot restore was ignored: start from a clean slate
            return self._trained(trial, trainer, train_cfg, lineage, bound)
        finally:
            trainer.close()  # leaves its pack: the other members go on

    def _trained(
        self, trial: optuna.Trial, trainer: Trainer, train_cfg: TrainConfig, lineage: int, bound: dict[str, Any] | None
    ) -> float:
        if self.on_step is not None:
            report_step = self.on_step
            trainer.on_step = lambda step, total: report_step(trial.number, trainer.epoch + 1, step, total)
        # ASHA: pause after these epochs (only at rungs above the one this lineage was promoted from)
        pause_at = pause_epochs(self.config, int(trial.user_attrs.get(attrs.FROM_RUNG, -1)))
        with HistoryWriter(trial) as history:
            return self._train(trial, trainer, train_cfg, lineage, pause_at, history, bound)

    def _train(
        self,
        trial: optuna.Trial,
        trainer: Trainer,
        train_cfg: TrainConfig,
        lineage: int,
        pause_at: dict[int, int],
        history: HistoryWriter,
        bound: dict[str, Any] | None,
    ) -> float:
        while trainer.epoch < train_cfg.epochs:
            result = trainer.run_epoch()
            # Report first: if the trial was failed behind our back (stale heartbeat), this raises and we
            # never overwrite the checkpoint that its retry now owns.
            trial.report(result.val_acc, result.epoch)
            history.put([r.to_dict() for r in trainer.history])
            if self.on_epoch is not None:
                self.on_epoch(trial.number, result)
            if trial.should_prune() and not self._audit(trial, lineage, result.epoch):
                trial.set_user_attr(attrs.REASON, f"pruned at epoch {result.epoch}")
                raise optuna.TrialPruned(f"pruned at epoch {result.epoch} (val acc {result.val_acc:.4f})")
            if self.checkpoints is not None:
                self.checkpoints.save(lineage, trainer.state_dict(), bound)
            if trainer.epoch in pause_at and trainer.epoch < train_cfg.epochs:
                if not self._audit(trial, lineage, trainer.epoch):
                    raise Paused(pause_at[trainer.epoch], trainer.epoch)
                pause_at.clear()  # audited: it runs to the end
            if self.should_stop() and trainer.epoch < train_cfg.epochs:
                raise Interrupted(f"stopped after epoch {trainer.epoch}")
        trial.set_user_attr(attrs.CONFUSION, trainer.confusion_matrix())
        values = [r.val_acc for r in trainer.history]
        value = values[-1] if self.config.objective == "last" else max(values)
        if not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidValueError(f"objective value {value!r} is not an accuracy in [0, 1]")
        return value

    def _audit(self, trial: optuna.Trial, lineage: int, epoch: int) -> bool:
        """Does the pruner audit let this trial run on past a stop (or a pause)? Records where it would have
        stopped, once."""
        if not is_audited(audit_rate(self.config.pruner.options), self.config.sampler.seed, lineage):
            return False
        if attrs.AUDITED not in trial.user_attrs:
            trial.set_user_attr(attrs.AUDITED, epoch)
            log.info("trial %d: the pruner would stop it at epoch %d; the audit lets it run on", trial.number, epoch)
        return True

    def _resume(self, trial: optuna.Trial, trainer: Trainer, lineage: int, bound: dict[str, Any] | None) -> bool:
        """Restore the lineage's checkpoint into ``trainer``; False when one was found but does not fit it (then
        ``trainer`` may be half-restored and is not to be used)."""
        store = self.checkpoints
        state = store.load(lineage, self.device, bound) if store is not None else None
        if state is None:
            trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, 0)
            return True
        try:
            trainer.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            # written by another version of the trainer (other parameter groups, no EMA entry, ...): ignored out
            # loud, never half-used
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning(
                "trial %d: checkpoint of lineage %d does not fit this trainer (%s); starting from epoch 1",
                trial.number,
                lineage,
                first[:200],
            )
            trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, 0)
            return False
        # Recorded before the re-reports below: a worker frozen or killed between the two leaves a trial that
        # says where it resumed from (the epochs it re-reported are not counted as trained).
        trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, trainer.epoch)
        # Continue the learning curve: the retry carries the earlier epochs' values under the same steps.
        for r in trainer.history:
            trial.report(r.val_acc, r.epoch)
        trial.set_user_attr(attrs.HISTORY, [r.to_dict() for r in trainer.history])
        log.info("trial %d resumes lineage %d after epoch %d", trial.number, lineage, trainer.epoch)
        return True
