"""Where a trial's uint8 split lives while it trains: on the device, or in pinned host memory.

On the device a batch costs no copy at all; a split larger than the device's free memory (100k photos at 256 px
are 20 GB) lives in pinned host memory instead and each batch is copied one step ahead
(:class:`~sft_optuna.training.augment.BatchPipeline`). ``data.placement: auto`` decides once per worker, before
its first claim, from the device's free memory and the memory a training step takes at the study's largest
batch (measured: a step of each searched architecture at the largest batch and image size).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from sft_optuna.config import StudyConfig
from sft_optuna.errors import DataError
from sft_optuna.training.data import Splits

__all__ = [
    "HEADROOM",
    "Placement",
    "choose_placement",
    "decide_placement",
    "free_memory",
    "largest_choices",
    "measure_step_memory",
    "pin_splits",
    "study_archs",
]

log = logging.getLogger(__name__)

HEADROOM = 0.9
"""Share of the free memory a worker plans to use: the allocator's fragmentation and cuDNN's workspaces need
the rest (a split that fills the card to the last byte out-of-memories at the first odd-sized batch)."""


@dataclass(frozen=True)
class Placement:
    """The decision and the figures it was made from (bytes), for the worker's log and ``plan``."""

    where: str
    """``device`` or ``host``."""
    split_bytes: int
    step_bytes: int
    free_bytes: int
    why: str

    def describe(self, device: torch.device) -> str:
        """One line: where the data lives and why."""
        place = f"on {device}" if self.where == "device" else "in pinned host memory, copied a batch ahead"
        return (
            f"data ({_size(self.split_bytes)}) {place}: {self.why} (free on {device}: {_size(self.free_bytes)}, "
            f"a training step: {_size(self.step_bytes) if self.step_bytes else 'not measured on the CPU'})"
        )


def free_memory(device: torch.device, cap: int | None = None) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: the memory the kernel says is available), no more
    than ``cap`` (a worker's share of the device, ``--device-memory``)."""
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 2**62  # no way to know: assume it fits, as before placements existed
    return min(free, cap) if cap is not None else free


def choose_placement(
    requested: str, device: torch.device, split_bytes: int, step_bytes: int, free_bytes: int, capped: bool = False
) -> Placement:
    """``data.placement`` -> where the split lives. ``device`` that cannot fit beside a training step is a
    :class:`DataError` (one line, before any claim); ``auto`` takes the device when it fits, else the host. On
    the CPU the host *is* the device. ``capped``: ``free_bytes`` is the worker's ``--device-memory``."""
    need = split_bytes + step_bytes
    fits = need <= HEADROOM * free_bytes
    if requested == "host":
        return Placement(
            "host" if device.type == "cuda" else "device", split_bytes, step_bytes, free_bytes, "data.placement: host"
        )
    if requested == "device" and not fits:
        free = f"{_size(free_bytes)} {'this worker may use (--device-memory)' if capped else 'free'} on {device}"
        raise DataError(
            f"data.placement: device: the split ({_size(split_bytes)}) and a training step ({_size(step_bytes)}) "
            f"do not fit in {HEADROOM:.0%} of the {free}; use data.placement: auto or host, a smaller "
            "data.image_size or train_subset"
        )
    if device.type != "cuda":
        return Placement("device", split_bytes, step_bytes, free_bytes, "the CPU holds the data either way")
    if fits:
        why = "data.placement: device" if requested == "device" else "it fits beside a training step"
        return Placement("device", split_bytes, step_bytes, free_bytes, why)
    return Placement("host", split_bytes, step_bytes, free_bytes, "it does not fit beside a training step")


def _size(n: int) -> str:
    """Bytes as a person reads them: 15.00 GB, 320.0 MB, 10 KB."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB"
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} KB"


def largest_choices(config: StudyConfig) -> StudyConfig:
    """The study's config at its largest batch size and image size, with an EMA if any trial may keep one (for
    the memory of a step)."""
    space = config.search_space

    def biggest(name: str, fixed: int) -> int:
        spec = space.get(name)
        if spec is None:
            return fixed
        if spec.choices is not None:
            return int(max(spec.choices))
        return int(spec.high if spec.high is not None else fixed)

    train = dataclasses.replace(config.train, batch_size=biggest("batch_size", config.train.batch_size))
    ema = space.get("ema_decay")  # a searched EMA keeps a second copy of the model: count it if any trial may
    if ema is not None and max([*(ema.choices or []), ema.high or 0.0, config.train.ema_decay]) > 0:
        train = dataclasses.replace(train, ema_decay=0.9)
    model = dataclasses.replace(config.model, image_size=biggest("model.image_size", config.model.image_size))
    return dataclasses.replace(config, train=train, model=model)


def measure_step_memory(config: StudyConfig, archs: list[str], num_classes: int, device: torch.device) -> int:
    """Peak CUDA memory (bytes) of two training steps of each architecture in ``archs`` at the study's largest
    batch and image size, on random images; 0 off CUDA (no such counter for the CPU)."""
    if device.type != "cuda":
        return 0
    from sft_optuna.training.trainer import Trainer

    big = largest_choices(config)
    bs, size = big.train.batch_size, big.data.image_size
    x = torch.randint(0, 256, (2 * bs, 3, size, size), dtype=torch.uint8)
    y = torch.arange(2 * bs) % num_classes
    peak = 0
    for arch in archs:
        model = dataclasses.replace(big.model, arch=arch, weights="none")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        trainer = Trainer(Splits(x, y, x[:bs], y[:bs], num_classes), model, big.train, device)
        trainer.train_steps(2)
        split = trainer.train_data.x.numel() + trainer.val_data.x.numel()  # the probe's own images, not the step's
        peak = max(peak, torch.cuda.max_memory_allocated(device) - base - split)
        del trainer
    torch.cuda.empty_cache()
    return peak


def study_archs(config: StudyConfig) -> list[str]:
    """The architectures the study's trials may build: the fixed one, or each choice of ``model.arch``."""
    spec = config.search_space.get("model.arch")
    return [str(a) for a in spec.choices] if spec is not None and spec.choices else [config.model.arch]


def decide_placement(
    config: StudyConfig,
    split_bytes: int,
    num_classes: int,
    device: torch.device,
    cap: int | None = None,
    trials: int = 1,
) -> Placement:
    """``data.placement`` for a split of ``split_bytes`` on ``device`` (at most ``cap`` bytes of it): the step's
    memory measured where it matters (not for ``host``, not off CUDA), times the ``trials`` a packed worker
    trains at once."""
    step = 0
    if config.data.placement != "host":
        step = trials * measure_step_memory(config, study_archs(config), num_classes, device)
    free = free_memory(device, cap)
    capped = cap is not None and free == cap
    return choose_placement(config.data.placement, device, split_bytes, step, free, capped)


def pin_splits(splits: Splits) -> Splits:
    """The splits' images in pinned (page-locked) host memory, NHWC as the pipeline reads them, once per worker:
    every trial's pipeline then copies batches out of them asynchronously, without pinning 20 GB per trial."""

    def pinned(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous().pin_memory().permute(0, 3, 1, 2)

    return dataclasses.replace(splits, train_x=pinned(splits.train_x), val_x=pinned(splits.val_x))
