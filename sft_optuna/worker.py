"""A worker: pull trials from a study by name until its budget is spent; signals, failures, heartbeats.

No central master: workers coordinate only through the storage (see ``coordination/claims.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from sft_optuna import attrs
from sft_optuna.config import StudyConfig
from sft_optuna.coordination.checkpoints import CheckpointStore
from sft_optuna.coordination.claims import (
    claim_trial,
    queue_retry,
    raced,
    recover_trials,
    slots_to_queue,
    study_done,
    unretried,
    wrong_verdicts,
)
from sft_optuna.coordination.heartbeat import Heartbeat, StaleTrials, Watcher, watch_interval
from sft_optuna.coordination.retrying import error_reason, is_storage_error
from sft_optuna.errors import DataError, ModelError, NodeFault, StorageUnavailable
from sft_optuna.node import (
    DEFAULT_CHECKPOINT_DIR,
    DEFAULT_DEVICE,
    check_checkpoint_dir,
    resolve_device,
    use_threads,
)
from sft_optuna.objective import Interrupted, InvalidValueError, Objective, Paused
from sft_optuna.results.notes import write_best_figure, write_progress, write_trial_note
from sft_optuna.search.samplers import CachedCompletedPruner
from sft_optuna.study import identity
from sft_optuna.training.data import PROGRESS_EVERY_S, Splits, load_splits
from sft_optuna.training.model import build_model
from sft_optuna.training.packs import Pack
from sft_optuna.training.placement import decide_placement, pin_splits, study_archs
from sft_optuna.training.trainer import DivergedError, EpochResult

__all__ = ["Node", "WorkerOptions", "prepare_node", "run_worker"]

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class WorkerOptions:
    """How one worker runs; per node, unlike the study config which is per study."""

    device: str = DEFAULT_DEVICE
    """``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    data_root: str | None = None
    """Overrides the study's ``data.root`` on this node."""
    max_trials: int | None = None
    """Stop after this many trials of this worker (the study budget still applies)."""
    checkpoint_dir: str | None = DEFAULT_CHECKPOINT_DIR
    """Shared directory for per-epoch checkpoints; None disables checkpoints (no resume)."""
    threads: int | None = None
    """torch CPU threads; default: ``$OMP_NUM_THREADS`` if set, else torch's default."""
    poll_s: float | None = None
    """With the budget spent but trials still running elsewhere, how often to look for a retry to take
    (default: the study's heartbeat interval)."""
    max_consecutive_failures: int = 5
    """A node that fails this many trials in a row is broken: the worker exits non-zero."""
    device_memory: int | None = None
    """Bytes of its device this worker may use (its share when workers share a GPU); default: all that is free.
    ``data.placement`` decides against it."""
    pack: int = 1
    """Trials this worker trains at once; those of one shape (architecture, image size, batch size, ...) as one
    fused model (``--pack``)."""


class _StopFlag:
    """First SIGTERM/SIGINT: stop after the current epoch. Second SIGINT: stop now."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s: stopping after the current epoch (Ctrl-C again to stop now)", signal.Signals(signum).name)
        self.event.set()

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class _Progress:
    """A tqdm bar per epoch when stderr is a terminal; in a log file a plain line every ~30 s of a long epoch
    (``trial N epoch E: step S/T``), so that a log never goes quiet for a whole epoch."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.bar: Any = None
        self.key: tuple[int, int] | None = None
        self.last = time.monotonic()

    def step(self, number: int, epoch: int, step: int, total: int) -> None:
        if not self.enabled:
            if time.monotonic() - self.last >= PROGRESS_EVERY_S:
                log.info("trial %d epoch %d: step %d/%d", number, epoch, step, total)
                self.last = time.monotonic()
            return
        from tqdm import tqdm

        if self.key != (number, epoch):
            self.close()
            self.bar = tqdm(total=total, desc=f"trial {number} epoch {epoch}", unit="step", leave=False)
            self.key = (number, epoch)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.last = time.monotonic()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.key = None


def _log_epoch(number: int, r: EpochResult) -> None:
    log.info(
        "trial %d epoch %d: val_acc %.4f train_loss %.4f lr %.3g %.0f img/s %.1fs",
        number,
        r.epoch,
        r.val_acc,
        r.train_loss,
        r.lr,
        r.images_per_s,
        r.seconds,
    )


def _safe_tell(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, **kwargs: Any) -> bool:
    try:
        study.tell(trial, **kwargs)
        return True
    except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
        # Another worker already failed this trial (we were frozen past the grace period) and retried it.
        log.warning("trial %d was finished elsewhere (%s); dropping it", trial.number, exc)
        _wrong_verdict(study, config, trial)
        return False


def _wrong_verdict(study: optuna.Study, config: StudyConfig, trial: optuna.Trial) -> None:
    """Our trial was failed as stale while we ran it: say so on the study, so that the failure does not use up
    one of the lineage's ``max_retries``; and if the watcher that failed it found no retries left (it counted
    the failure), queue the retry now. A duplicate this may make (the watcher queued one too) is dropped when
    claimed. Only a watcher's failure has no reason; our own (a lost reply of our own FAIL) is left as it is.
    Best effort: during an outage it gives up with a log line (the failure then counts, as it would have)."""
    storage = study._storage
    try:
        stored = storage.get_trial(trial._trial_id)
        if stored.state != TrialState.FAIL or attrs.REASON in stored.user_attrs:
            return  # finished some other way, or by ourselves
        storage.set_study_system_attr(study._study_id, f"{attrs.WRONG_VERDICT}{trial.number}", True)
        trials = study.get_trials(deepcopy=False)
        retried = any(
            t.user_attrs.get(attrs.RETRY_OF) == trial.number and not raced(trials, t.number)
            for t in trials
            if t.user_attrs.get(attrs.REASON) != attrs.CLAIM_RACED
        )
        log.warning(
            "trial %d was failed as stale while this worker ran it: the verdict was wrong (not counted against "
            "max_retries)%s",
            trial.number,
            "" if retried else "; queuing its retry",
        )
        if not retried:
            queue_retry(study, config, stored, trials)
    except Exception as exc:
        if not _outage(exc):
            raise
        log.warning("trial %d: cannot say the verdict was wrong (%s)", trial.number, error_reason(exc))


def _outage(exc: BaseException) -> bool:
    """A storage or transport failure (not the trial's own error), however it surfaced: through our storage
    wrapper, or raw from a driver or gRPC inside Optuna. An OSError inside a trial is the trial's (or its
    node's): a journal file's I/O errors reach us wrapped."""
    return is_storage_error(exc)


def _give_back_after_outage(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, exc: BaseException) -> None:
    """The storage stayed away past the outage window: once it answers again (within one more window), fail
    the trial as ``storage outage`` — retried from its checkpoint, not counted — and queue its retry. If it
    does not answer, the trial stays RUNNING and a watcher retries it later."""
    log.error(
        "trial %d: the storage stayed away (%s); giving the trial back once it answers",
        trial.number,
        error_reason(exc),
    )
    try:
        trial.set_user_attr(attrs.REASON, attrs.OUTAGE)
        _fail_and_retry(study, config, trial)
    except optuna.exceptions.UpdateFinishedTrialError:
        _wrong_verdict(study, config, trial)
    except Exception as again:
        if not _outage(again):
            raise
        log.error("trial %d: the storage is still away; it stays RUNNING for a watcher to retry", trial.number)


def _set_reason(trial: optuna.Trial, reason: str) -> None:
    """Record why the trial ends; an outage is raised (the worker gives the trial back as an outage), not
    swallowed: a FAIL told without its reason would read as a dead worker and count against the retries."""
    try:
        trial.set_user_attr(attrs.REASON, reason)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, KeyError) as exc:
        log.debug("cannot record reason of trial %d: %s", trial.number, exc)  # finished elsewhere


@dataclass
class Node:
    """This node, checked and ready: its device, the study's data on it, its checkpoint store."""

    device: torch.device
    splits: Splits
    classes: list[str]
    checkpoints: CheckpointStore | None
    placement: str = "device"
    """Where the splits live while trials train (``device`` or ``host``), decided once (see ``data.placement``)."""


def prepare_node(config: StudyConfig, options: WorkerOptions) -> Node:
    """Check everything a trial needs from this node before the first claim; a problem is one line.

    Cheap checks first (device, threads, checkpoint directory, model weights), the data last: a wrong
    ``--device`` should not wait for 60,000 images to be decoded.
    """
    device = resolve_device(options.device)
    use_threads(options.threads)
    checkpoints = None
    if options.checkpoint_dir:
        check_checkpoint_dir(options.checkpoint_dir)
        checkpoints = CheckpointStore(options.checkpoint_dir, config.name)
    for arch in study_archs(config):  # each weights file or cache is readable and fits its architecture
        build_model(2, dataclasses.replace(config.model, arch=arch))
    splits, classes = load_splits(config.data, options.data_root)
    split_bytes = sum(t.numel() * t.element_size() for t in (splits.train_x, splits.val_x))
    placement = decide_placement(
        config, split_bytes, splits.num_classes, device, options.device_memory, trials=options.pack
    )
    log.info("%s", placement.describe(device))
    if placement.where == "host" and device.type == "cuda":
        splits = pin_splits(splits)
    return Node(device, splits, classes, checkpoints, placement.where)


def run_worker(study: optuna.Study, config: StudyConfig, options: WorkerOptions, node: Node | None = None) -> int:
    """Pull and run trials until the study is done; returns the process exit code.

    Done means: the budget is spent, nothing is left to retry, and no trial is still running — a trial
    running elsewhere may lose its worker, and its retry must find someone to run it, even the last one.

    With ``options.pack`` K > 1, K slots pull trials side by side, each on a thread of its own, and the trials
    of one shape train as one fused model (:mod:`~sft_optuna.training.packs`); each trial keeps its own claim,
    heartbeat, reports, checkpoint and ending, exactly as when it runs alone.
    """
    if study_done(study.get_trials(deepcopy=False), config):
        log.info("study %r: done (budget of %d trials spent, nothing to retry)", config.name, config.budget.n_trials)
        return 0
    node = node or prepare_node(config, options)
    stop = _StopFlag()
    progress = _Progress()
    pack = Pack() if options.pack > 1 else None
    if pack is not None:
        progress.enabled = False  # several trials' bars would overwrite each other: the ~30 s log lines stay

    def on_epoch(number: int, r: EpochResult) -> None:
        progress.close()
        _log_epoch(number, r)

    checkpoints = node.checkpoints
    objective = Objective(
        config, node.splits, node.device, checkpoints, stop.event.is_set, on_epoch, progress.step, node.placement, pack
    )
    objective.study_identity = identity(study, config)
    slots = _Slots(study, config, options, node, objective, stop)
    evidence = StaleTrials(config.heartbeat.grace_period, getattr(study._storage, "health", None))
    watcher = Watcher(
        watch_interval(config.heartbeat.interval, config.heartbeat.grace_period),
        lambda: recover_trials(study, config, evidence, slots.running()),
        "stale-trial watcher",
    )
    with stop.installed(), watcher:
        if pack is None:
            return slots.work()
        log.info("worker: %d trials at a time, those of one shape fused into one model", options.pack)
        return slots.work_packed(options.pack, pack)


class _Slots:
    """The claim-run-tell loop of one worker, run by one slot (the main thread) or by several side by side."""

    def __init__(
        self,
        study: optuna.Study,
        config: StudyConfig,
        options: WorkerOptions,
        node: Node,
        objective: Objective,
        stop: _StopFlag,
    ) -> None:
        self.study = study
        self.config = config
        self.options = options
        self.node = node
        self.objective = objective
        self.stop = stop
        self.host = f"{socket.gethostname()}:{os.getpid()} {node.device}"
        self.poll_s = options.poll_s or config.heartbeat.interval
        self._claiming = threading.Lock()  # one claim at a time
        self._lock = threading.Lock()  # the fields below (held briefly: the watcher reads them)
        self._current: set[int] = set()  # trials this worker runs: alive, whatever their beats look like
        self._claimed = 0
        self._failures = 0
        self._freed = False
        self.code = 0

    def running(self) -> set[int]:
        """The trials this worker runs now (the watcher never fails them)."""
        with self._lock:
            return set(self._current)

    def work_packed(self, k: int, pack: Pack) -> int:
        """K slots on threads of their own; the first error of one (an outage, a node fault) stops the others
        after their epoch (their trials are given back, uncounted) and is raised here, once they have."""
        errors: list[BaseException] = []
        done = [threading.Event() for _ in range(k)]

        def slot(finished: threading.Event) -> None:
            try:
                self.work()
            except BaseException as exc:  # noqa: BLE001 - raised on the main thread below
                errors.append(exc)
                self.stop.event.set()
            finally:
                finished.set()

        def wait(interruptible: bool) -> None:
            # Events, not Thread.join: a KeyboardInterrupt inside join() marks a running thread as stopped
            # (CPython's bpo-45274 handling), and the process would then exit under a training thread
            for finished in done:
                while True:
                    try:
                        if finished.wait(0.2):  # short waits: the main thread takes the signals
                            break
                    except KeyboardInterrupt:
                        if interruptible:
                            raise

        for i, finished in enumerate(done):
            threading.Thread(target=slot, args=(finished,), name=f"slot-{i}", daemon=True).start()
        try:
            wait(interruptible=True)
        except KeyboardInterrupt:
            pack.abort()  # stop now: every member's step raises, and its trial is given back
            self.stop.event.set()
            wait(interruptible=False)  # each slot marks its trial interrupted first; a third Ctrl-C changes nothing
            raise
        if pack.fused_steps:
            log.info(
                "worker: %d training steps of trials in %d fused steps (%.2f trials per step)",
                pack.member_steps,
                pack.fused_steps,
                pack.member_steps / pack.fused_steps,
            )
        first = next((e for e in errors if not isinstance(e, KeyboardInterrupt)), errors[0] if errors else None)
        if first is not None:
            raise first
        return self.code

    def _enough(self) -> bool:
        limit = self.options.max_trials
        return self.stop.event.is_set() or self.code != 0 or (limit is not None and self._claimed >= limit)

    def _claim(self) -> optuna.Trial | None:
        with self._claiming:
            with self._lock:
                if self._enough():
                    raise _SlotDone
            trial = claim_trial(self.study, self.config)
            if trial is not None:
                with self._lock:
                    self._claimed += 1
                    self._current.add(trial.number)
            return trial

    def work(self) -> int:
        """Claim and run trials until the study is done, the worker is told to stop, or this node fails."""
        study, config = self.study, self.config
        waiting = False
        while True:
            try:
                trial = self._claim()
            except _SlotDone:
                return self.code
            if trial is None:
                trials = study.get_trials(deepcopy=False)
                if study_done(trials, config, wrong_verdicts(study) if unretried(trials) else ()):
                    log.info("study %r: budget spent, worker done", config.name)
                    with self._lock:
                        free, self._freed = not self._freed, True
                    if free:
                        _free_paused_checkpoints(trials, self.node.checkpoints)
                    return self.code
                if not waiting and slots_to_queue(trials, config):
                    log.info("study %r: no queued trial yet; waiting for the next budget slots", config.name)
                    waiting = True
                elif not waiting:
                    running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
                    log.info(
                        "study %r: budget spent; waiting for running trial(s) %s to finish (a retry, if one of "
                        "their workers dies, runs here)",
                        config.name,
                        running,
                    )
                    waiting = True
                self.stop.event.wait(self.poll_s)
                continue
            waiting = False
            state = self._run(trial)
            if state is not None:
                _annotate(study, trial, config, self.node.classes, state)
            with self._lock:
                # a trial ended by a stop (interrupted, given back) says nothing about this node
                if state == TrialState.FAIL and not self.stop.event.is_set():
                    self._failures += 1
                elif state != TrialState.FAIL:
                    self._failures = 0
                if self._failures >= self.options.max_consecutive_failures and self.code == 0:
                    log.error(
                        "%d trials failed in a row on %s: this node looks broken, exiting", self._failures, self.host
                    )
                    self.code = 1
                    self.stop.event.set()  # the other slots give their trials back after their epoch
            if self.code != 0:
                return self.code

    def _run(self, trial: optuna.Trial) -> TrialState | None:
        study, config = self.study, self.config
        source = trial.user_attrs.get(attrs.WARM_START)
        log.info("trial %d: %s%s", trial.number, trial.params, f" (warm start from {source})" if source else "")
        try:
            trial.set_user_attr(attrs.HOST, self.host)
            return _run_one(study, config, trial, self.objective, self.node.checkpoints)
        except Exception as exc:
            if not _outage(exc):
                raise
            # The storage stayed away longer than the outage window, wherever it surfaced: never the
            # trial's error. Give it back (uncounted) if the storage answers again; stop (exit 3).
            _give_back_after_outage(study, config, trial, exc)
            raise StorageUnavailable(str(exc) if isinstance(exc, StorageUnavailable) else error_reason(exc)) from exc
        finally:
            with self._lock:
                self._current.discard(trial.number)


class _SlotDone(Exception):  # noqa: N818 - a control-flow signal, not an error
    """This slot claims no more trials (stop asked, ``--max-trials`` reached, or the node failed)."""


def _run_one(
    study: optuna.Study,
    config: StudyConfig,
    trial: optuna.Trial,
    objective: Objective,
    checkpoints: CheckpointStore | None,
) -> TrialState | None:
    """Run one claimed trial and tell the storage how it ended; returns the state told."""
    lineage = attrs.lineage(trial)
    try:
        # trial._trial_id: Optuna has no public accessor for the storage id that heartbeats are written to.
        with Heartbeat(study._storage, trial._trial_id, config.heartbeat.interval):
            value = objective(trial)
    except Paused as exc:
        _set_reason(trial, str(exc))
        try:
            trial.set_user_attr(attrs.RUNG, exc.rung)
        except optuna.exceptions.UpdateFinishedTrialError:
            _wrong_verdict(study, config, trial)
            return None
        log.info("trial %d: %s; its checkpoint is kept for a promotion", trial.number, exc)
        return TrialState.PRUNED if _safe_tell(study, config, trial, state=TrialState.PRUNED) else None
    except optuna.TrialPruned as exc:
        log.info("trial %d: %s", trial.number, exc)
        state = TrialState.PRUNED
    except DivergedError as exc:
        _set_reason(trial, f"diverged: {exc}")
        log.warning("trial %d diverged: %s", trial.number, exc)
        state = TrialState.PRUNED
    except (Interrupted, KeyboardInterrupt) as exc:
        _set_reason(trial, attrs.INTERRUPTED)
        log.warning("trial %d interrupted (%s); it will be retried from its checkpoint", trial.number, exc or "now")
        _fail_and_retry(study, config, trial)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return TrialState.FAIL
    except (NodeFault, ModelError, DataError) as exc:
        _give_back(study, config, trial, str(exc))
        raise NodeFault(f"{exc}; trial {trial.number} was given back and will be retried") from None
    except torch.cuda.OutOfMemoryError:
        _set_reason(trial, "out of memory")
        log.error("trial %d: CUDA out of memory\n%s", trial.number, traceback.format_exc())
        torch.cuda.empty_cache()
        state = TrialState.FAIL
    except InvalidValueError as exc:
        _set_reason(trial, f"invalid: {exc}")
        log.error("trial %d: %s", trial.number, exc)
        state = TrialState.FAIL
    except optuna.exceptions.UpdateFinishedTrialError as exc:
        log.warning("trial %d was finished elsewhere (%s); dropping it", trial.number, exc)
        _wrong_verdict(study, config, trial)
        return None
    except Exception as exc:
        if _outage(exc):
            raise  # never the trial's error: run_worker gives the trial back (uncounted) and stops (exit 3)
        if isinstance(exc, RuntimeError) and _is_device_fault(exc):
            reason = str(exc).strip().splitlines()[0]
            _give_back(study, config, trial, reason)
            raise NodeFault(
                f"device failed ({reason}); trial {trial.number} was given back and will be retried"
            ) from None
        _set_reason(trial, f"error: {type(exc).__name__}: {exc}")
        log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        state = TrialState.FAIL
    except BaseException as exc:
        # SystemExit from user code, a second Ctrl-C already handled above, ...: never leave it RUNNING.
        _set_reason(trial, f"error: {type(exc).__name__}: {exc}")
        _safe_tell(study, config, trial, state=TrialState.FAIL)
        raise
    else:
        if not _safe_tell(study, config, trial, values=value):
            return None
        if isinstance(study.pruner, CachedCompletedPruner):
            study.pruner.invalidate()  # our own completion counts at once, not after the cache's refresh
        log.info("trial %d: value %.4f", trial.number, value)
        _keep_best_checkpoint(study, trial.number, lineage, checkpoints)
        return TrialState.COMPLETE
    if not _safe_tell(study, config, trial, state=state):
        return None
    if checkpoints is not None:
        checkpoints.remove(lineage)
    return state


def _is_device_fault(exc: RuntimeError) -> bool:
    """A CUDA error other than running out of memory: the GPU or its driver, not the trial's parameters."""
    text = str(exc)
    return ("CUDA error" in text or "CUDA driver" in text or "cuDNN error" in text) and "out of memory" not in text


def _fail_and_retry(study: optuna.Study, config: StudyConfig, trial: optuna.Trial) -> None:
    """Fail our own trial with a retryable reason and queue its retry (unless a watcher failed it first: then
    the watcher queued the retry)."""
    if _safe_tell(study, config, trial, state=TrialState.FAIL):
        queue_retry(study, config, study._storage.get_trial(trial._trial_id))


def _give_back(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, detail: str) -> None:
    """Fail a trial this node could not run, with a retryable reason: another worker retries it, uncounted."""
    _set_reason(trial, attrs.NODE_FAULT)
    try:
        trial.set_user_attr(attrs.NODE_FAULT_DETAIL, detail[:500])
    except Exception as exc:  # noqa: BLE001 - the trial may already be finished elsewhere
        log.debug("cannot record the fault of trial %d: %s", trial.number, exc)
    log.error("trial %d: this node cannot run trials (%s); giving the trial back", trial.number, detail)
    _fail_and_retry(study, config, trial)


def _annotate(
    study: optuna.Study, trial: optuna.Trial, config: StudyConfig, classes: list[str], state: TrialState
) -> None:
    """Dashboard notes: the trial's own; the study's progress and the best trial's confusion matrix on the study."""
    write_trial_note(study, trial, config)
    write_progress(study, config)
    if state == TrialState.COMPLETE:
        try:
            best = study.best_trial
        except ValueError:
            return
        if best.number == trial.number:
            write_best_figure(study, best, classes)


def _free_paused_checkpoints(trials: list[optuna.trial.FrozenTrial], checkpoints: CheckpointStore | None) -> None:
    """The study is done: no promotion can use an ASHA-paused trial's checkpoint any more (the best trial's is
    kept apart, as ``best.pt``). A 9-configuration toy study kept 598 MB of them."""
    if checkpoints is None:
        return
    paused = {attrs.lineage(t) for t in trials if attrs.RUNG in t.user_attrs}
    files, size = checkpoints.free(paused)
    if files:
        log.info("study done: freed %d checkpoints of paused trials (%.1f MB)", files, size / 1e6)


def _keep_best_checkpoint(study: optuna.Study, number: int, lineage: int, checkpoints: CheckpointStore | None) -> None:
    """A finished lineage gives its checkpoint back, unless it is now the study's best: that one is kept."""
    if checkpoints is None:
        return
    try:
        best = study.best_trial.number
    except ValueError:
        best = -1
    if best == number:
        checkpoints.keep_as_best(lineage, number)
    else:
        checkpoints.remove(lineage)
