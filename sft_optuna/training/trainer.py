"""One trial's training: epochs, evaluation, learning-rate schedules. Plain PyTorch; knows nothing of Optuna.

A :class:`Trainer` runs one epoch at a time so that its caller (the objective) can report, prune, and
checkpoint between epochs; :meth:`Trainer.state_dict` holds everything needed to resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.training.augment import BatchPipeline, Mixer, channel_stats
from sft_optuna.training.data import Splits
from sft_optuna.training.graphs import GraphedStep, float_learning_rates, graphs_enabled, tensor_learning_rates
from sft_optuna.training.model import build_model, head_parameters, train_mode
from sft_optuna.training.packs import Member, Pack, PackAborted, pack_key

__all__ = ["DivergedError", "EpochResult", "Trainer", "WeightEMA", "lr_factor", "predict"]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (typically a too-high learning rate)."""


@dataclass(frozen=True)
class EpochResult:
    """What one epoch measured; ``epoch`` counts from 1."""

    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    lr: float
    seconds: float
    images_per_s: float
    peak_memory_mb: float
    compile_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, rounded for storage."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def lr_factor(cfg: TrainConfig, t: float) -> float:
    """Learning rate at time ``t`` (in epochs, fractional) as a fraction of ``cfg.lr``.

    Linear warmup over ``warmup_epochs``, then: constant; exponential ``exp(-k t')``; or cosine from 1 to
    ``lr_min_ratio`` over the remaining epochs, ``t'`` counting from the end of warmup.
    """
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return t / cfg.warmup_epochs
    t_after = t - cfg.warmup_epochs
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "exponential":
        return math.exp(-cfg.lr_decay * t_after)
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    lo = cfg.lr_min_ratio
    return lo + 0.5 * (1.0 - lo) * (1.0 + math.cos(math.pi * min(t_after / span, 1.0)))


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The new head at ``lr``, the backbone at ``lr * backbone_lr_scale`` (head first: its rate is the one
    reported); weight decay on the weights of convs/linears only (decaying BN scales and biases only hurts)."""
    head = {id(p) for p in head_parameters(model)}
    groups = []
    for in_head, scale in ((True, 1.0), (False, cfg.backbone_lr_scale)):
        params = [p for p in model.parameters() if (id(p) in head) == in_head]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                wd = cfg.weight_decay if decay else 0.0
                groups.append({"params": chosen, "weight_decay": wd, "lr": cfg.lr * scale})
    return groups


def _make_optimizer(model: nn.Module, cfg: TrainConfig, graphed: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`_param_groups`; for a graphed step the fused, capturable kind (one kernel)."""
    groups = _param_groups(model, cfg)
    fused: dict[str, Any] = {"fused": True} if graphed else {}
    if cfg.optimizer == "adamw":
        capturable = {"capturable": True} if graphed else {}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), **fused, **capturable)
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, **fused)


class WeightEMA:
    """An exponential moving average of a model's weights and buffers, updated after every optimizer step:
    ``ema = d * ema + (1 - d) * weights`` with ``d = min(decay, (1 + s) / (10 + s))`` at update ``s`` — the
    warmed-up decay of TensorFlow's and timm's EMA, so that a short fine-tune is not dominated by the random
    head it started from. Integer buffers (BatchNorm's batch count) are copied.

    >>> net = nn.Linear(1, 1, bias=False)
    >>> _ = net.weight.data.fill_(0.0)
    >>> ema = WeightEMA(net, decay=0.5)
    >>> _ = net.weight.data.fill_(1.0)
    >>> ema.update(net)  # s = 1: d = min(0.5, 2 / 11)
    >>> round(float(ema.model.weight), 4)
    0.8182
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the one it was made from)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats = [(e, m) for e, m in self._pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - d)
        for e, m in self._pairs:
            if not e.is_floating_point():
                e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def _autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast where ``precision`` asks for it; ``cache=False`` inside a CUDA graph capture (autocast's
    cache of cast weights would outlive the capture)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predict(model: nn.Module, data: BatchPipeline, batch_size: int, precision: str = "auto") -> torch.Tensor:
    """Predicted class of every image of ``data``, in order, without augmentation."""
    model.eval()
    preds = []
    with _autocast(data.device, precision):
        for xb, _ in data.batches(batch_size, shuffle=False, augment=False):
            preds.append(model(xb).argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=data.device)


class Trainer:
    """Fine-tunes a fresh ``model_cfg.arch`` on ``splits`` with ``train_cfg``, one epoch per :meth:`run_epoch`.

    ``placement``: where the uint8 splits live while training (``device`` or ``host``; see
    :class:`BatchPipeline`). ``pack``: train as a member of a fused pack (:mod:`~sft_optuna.training.packs`),
    each step fused with those of the pack's other trainers of the same shape; :meth:`close` leaves it."""

    def __init__(
        self,
        splits: Splits,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        device: torch.device,
        seed: int | None = None,
        placement: str = "device",
        pack: Pack | None = None,
    ) -> None:
        self.cfg = train_cfg
        self.device = device
        self.num_classes = splits.num_classes
        seed = train_cfg.seed if seed is None else seed
        key = pack_key(model_cfg, train_cfg) if pack is not None else None
        # torch's global generators are shared by a pack's threads: seeding, reading and restoring them is
        # one thread at a time
        self._rng_lock: contextlib.AbstractContextManager[Any] = (
            pack.init_lock if pack is not None else contextlib.nullcontext()
        )
        with self._rng_lock:
            torch.manual_seed(seed)  # model init
            model = build_model(splits.num_classes, model_cfg, train_cfg.head_dropout).to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        if train_cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.head = model.get_submodule(model.sft_head)  # type: ignore[arg-type]
        head_ids = {id(p) for p in self.head.parameters()}
        self.backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
        self.step_model: Callable[..., torch.Tensor] = torch.compile(model) if train_cfg.compile else model
        size, last, aug = model_cfg.image_size, train_cfg.channels_last, train_cfg.augment

        def pipelines() -> tuple[torch.Tensor, torch.Tensor, BatchPipeline, BatchPipeline]:
            mean, std = channel_stats(splits.train_x)
            train = BatchPipeline(splits.train_x, splits.train_y, mean, std, device, size, last, aug, placement)
            val = BatchPipeline(splits.val_x, splits.val_y, mean, std, device, size, last, aug, placement)
            return mean, std, train, val

        made: tuple[torch.Tensor, torch.Tensor, BatchPipeline, BatchPipeline]
        if pack is None:
            made = pipelines()
        else:  # a pack's members share one copy of the splits on the device, whatever their sizes and augmentation
            mean, std, train, val = pack.shared((id(splits), device, placement), pipelines)
            made = (mean, std, train.variant(size, last, aug), val.variant(size, last, aug))
        self.mean, self.std, self.train_data, self.val_data = made
        self.ema = WeightEMA(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
        self.mixer = Mixer(aug.mixup, aug.cutmix, seed)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # torch.compile captures graphs of its own when asked; ours serve the eager model
        self.graphed = graphs_enabled(train_cfg.cuda_graph, device) and not train_cfg.compile and key is None
        self.optimizer = _make_optimizer(model, train_cfg, self.graphed)
        self.graph: GraphedStep | None = None
        if self.graphed:
            tensor_learning_rates(self.optimizer, device)  # before the schedule reads its base rates
            self.graph = GraphedStep(
                self.step_model,
                self.optimizer,
                lambda: _autocast(device, train_cfg.precision, cache=False),
                train_cfg.label_smoothing,
            )
        self.steps_per_epoch = max(self.train_data.steps(train_cfg.batch_size, drop_last=True), 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(train_cfg, step / self.steps_per_epoch)
        )
        self.epoch = 0
        self.history: list[EpochResult] = []
        self.on_step: Callable[[int, int], None] | None = None
        """Called as ``on_step(step, steps_per_epoch)`` after each training step (progress bars); no sync."""
        self._compiled = not train_cfg.compile
        self._weights_version = 0  # bumped whenever the weights change; keys the cached predictions
        self._predictions: tuple[BatchPipeline, int, torch.Tensor] | None = None
        self.pack = pack
        self.member: Member | None = pack.join(self, key) if pack is not None and key is not None else None
        if self.member is not None:  # the pack steps the weights; this trainer's optimizer only holds the rates
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def close(self) -> None:
        """Leave the pack (if any): its other members go on without this trainer."""
        if self.member is not None:
            self.member.leave()
            self.member = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.train_data.batches(
            self.cfg.batch_size, shuffle=True, augment=True, generator=self.generator, drop_last=True
        )

    def train_steps(self, max_steps: int | None = None) -> tuple[float, float, int, float, float]:
        """Train one pass (or ``max_steps`` steps) over the training split.

        Returns (mean loss, accuracy, images, seconds without compilation, compile seconds).
        """
        model, cfg, device = self.model, self.cfg, self.device
        self._weights_version += 1
        self._train_mode()
        _sync(device)
        start = time.perf_counter()
        compile_seconds = 0.0
        # Accumulated on the device and read once per pass: a .item() per step would stall the GPU queue.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for step, (xb, yb) in enumerate(self._batches()):
            if max_steps is not None and step >= max_steps:
                break
            if self.pack is not None and self.pack.aborted:  # stop now, fused with the others or not
                raise PackAborted("stopped now")
            y_a, y_b, lam = yb, yb, 1.0
            if self.mixer.active:
                xb, y_a, y_b, lam = self.mixer(xb, yb)
            if self.member is not None:  # forward, backward and step fused with the pack's other members
                loss, logits = self.member.step(xb, y_a, y_b, lam)
            elif self.graph is not None:  # forward, backward and the optimizer's step in one replay
                phase = (self.epoch < cfg.freeze_epochs, cfg.bn)
                loss, logits = self.graph.step(xb, y_a, y_b, torch.full((), lam, device=device), phase)
            else:
                with _autocast(device, cfg.precision):
                    logits = self.step_model(xb)
                    loss = F.cross_entropy(logits, y_a, label_smoothing=cfg.label_smoothing)
                    if lam < 1.0:
                        mixed = F.cross_entropy(logits, y_b, label_smoothing=cfg.label_smoothing)
                        loss = lam * loss + (1.0 - lam) * mixed
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(model)
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            if self.on_step is not None:
                self.on_step(step + 1, self.steps_per_epoch)
            if not self._compiled:
                _sync(device)
                compile_seconds = time.perf_counter() - start
                self._compiled = True
        if self.member is not None:
            self.member.sync()  # this trainer's own weights, for its evaluation and checkpoint
        mean_loss = float(loss_sum) / max(seen, 1)  # the one host sync of the pass
        seconds = time.perf_counter() - start - compile_seconds
        return mean_loss, int(correct) / max(seen, 1), seen, seconds, compile_seconds

    def _train_mode(self) -> None:
        """Training mode for this epoch: during ``freeze_epochs`` only the head trains (the backbone's weights
        take no gradient and its BatchNorm statistics stay: a linear probe); with ``bn: frozen`` every BatchNorm
        layer normalises with its running statistics and leaves them as they are."""
        probing = self.epoch < self.cfg.freeze_epochs
        for p in self.backbone_params:
            p.requires_grad_(not probing)
        if probing:
            self.model.eval()
            self.head.train()
            return
        train_mode(self.model, self.cfg.bn)

    @property
    def final_model(self) -> nn.Module:
        """The weights validation measures and a retrain keeps: the EMA's with ``ema_decay``, else the model's."""
        return self.ema.model if self.ema is not None else self.model

    def run_epoch(self) -> EpochResult:
        """Train one epoch, evaluate on the validation split; raises :class:`DivergedError` on NaN/inf loss."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        train_loss, train_acc, seen, train_seconds, compile_seconds = self.train_steps()
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss is {train_loss} at epoch {self.epoch + 1} (lr {self.cfg.lr:g})")
        val_acc = self.evaluate()
        self.epoch += 1
        result = EpochResult(
            epoch=self.epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            val_acc=val_acc,
            lr=float(self.optimizer.param_groups[0]["lr"]),  # a device tensor when the step is graphed
            seconds=time.perf_counter() - start,
            images_per_s=seen / max(train_seconds, 1e-9),
            peak_memory_mb=_peak_memory_mb(self.device),
            compile_seconds=compile_seconds,
        )
        self.history.append(result)
        return result

    def evaluate(self, data: BatchPipeline | None = None) -> float:
        """Accuracy on ``data`` (the validation split by default), without augmentation."""
        data = data or self.val_data
        if len(data) == 0:
            return 0.0
        return float((self._predict(data) == data.y).float().mean())

    def confusion_matrix(self, data: BatchPipeline | None = None) -> list[list[int]]:
        """Counts of (true class, predicted class) on ``data`` (the validation split by default)."""
        data = data or self.val_data
        n = self.num_classes
        flat = torch.bincount(data.y * n + self._predict(data), minlength=n * n)
        return flat.view(n, n).tolist()  # type: ignore[no-any-return]

    def _predict(self, data: BatchPipeline) -> torch.Tensor:
        """Predictions on ``data``, reused while the weights are unchanged (the last epoch's validation pass
        also gives the trial's confusion matrix)."""
        cached = self._predictions
        if cached is not None and cached[0] is data and cached[1] == self._weights_version:
            return cached[2]
        model = self.ema.model if self.ema is not None else self.step_model
        preds = predict(model, data, self.cfg.eval_batch_size, self.cfg.precision)  # type: ignore[arg-type]
        self._predictions = (data, self._weights_version, preds)
        return preds

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, schedule position, RNG, learning curve."""
        with self._rng_lock:
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "model": self.model.state_dict(),
            # float learning rates: a graphed trial's checkpoint resumes on any device, graphed or not
            "optimizer": float_learning_rates(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "history": [r.to_dict() for r in self.history],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "mixer": self.mixer.state_dict(),
            # dropout and stochastic depth draw from torch's global generators (seeded per trial in __init__)
            "torch_rng": rng,
            "cuda_rng": cuda_rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next :meth:`run_epoch` is epoch ``state['epoch'] + 1``."""
        self.model.load_state_dict(state["model"])
        self._weights_version += 1
        optimizer_state = state["optimizer"]
        if self.graphed:
            # the saved groups' flags are the saving trainer's (maybe an eager one on another node): ours replay a
            # fused, capturable step, and torch decides from the loaded flags where AdamW's step counts live
            own = {
                k: self.optimizer.param_groups[0][k]
                for k in ("fused", "capturable")
                if k in self.optimizer.param_groups[0]
            }
            groups = [{**g, **own} for g in optimizer_state["param_groups"]]
            optimizer_state = {**optimizer_state, "param_groups": groups}
        self.optimizer.load_state_dict(optimizer_state)
        if self.graphed:
            tensor_learning_rates(self.optimizer, self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if "mixer" in state:
            self.mixer.load_state_dict(state["mixer"])
        with self._rng_lock:
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"].cpu())
            if state.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.epoch = int(state["epoch"])
        self.history = [EpochResult(**r) for r in state["history"]]
