"""Batched, on-device input pipeline: shuffle, random crop, flip, normalize, resize.

The textbook pipeline runs PIL transforms per image in DataLoader worker processes, which caps a GPU at a few
thousand images/s per CPU core. Here the whole split sits on the training device as one uint8 tensor and every
step is a handful of tensor ops on a whole batch (the approach of the fastest CIFAR-10 trainers, e.g. airbench).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["BatchPipeline", "channel_stats", "flip", "normalize", "random_crop"]

PAD = 4  # the standard CIFAR augmentation: random 32x32 crop of the image zero-padded by 4 pixels


def random_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Crop each image of ``x`` (B x C x H x W) at ``offsets`` (B x 2: row, col) from its zero-padded copy.

    Equal to ``torchvision.transforms.RandomCrop(H, padding=pad)`` with those offsets, for a whole batch.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # B x H
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # B x W
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of ``x`` whose ``mask`` entry is true (horizontal flip)."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] then standardised per channel (torchvision's Normalize)."""
    return (x.float().div_(255.0) - mean[:, None, None]) / std[:, None, None]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] units of a uint8 image tensor (N x C x H x W)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double() / 255.0
    return flat.mean(1).float(), flat.std(1).float()


class BatchPipeline:
    """Yields normalized (inputs, labels) batches from a split held on ``device`` as uint8."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
        image_size: int,
        channels_last: bool = True,
    ) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        self.mean = mean.to(device)
        self.std = std.to(device)
        self.device = device
        self.image_size = image_size
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.y)

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> the model's input: normalized, resized to ``image_size``, channels-last."""
        out = normalize(xb, self.mean, self.std)
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear", align_corners=False)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the split. No host synchronisation: every random number is drawn on the device."""
        n = len(self.y)
        order = torch.randperm(n, device=self.device, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            if order is None:
                xb, yb = self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                xb, yb = self.x[idx], self.y[idx]
            if augment:
                b = len(yb)
                offsets = torch.randint(0, 2 * PAD + 1, (b, 2), device=self.device, generator=generator)
                xb = random_crop(xb, offsets)
                xb = flip(xb, torch.rand(b, device=self.device, generator=generator) < 0.5)
            yield self.prepare(xb), yb

    def steps(self, batch_size: int, drop_last: bool) -> int:
        """Batches per pass."""
        n = len(self.y)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
