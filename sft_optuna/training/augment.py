"""Batched, on-device input pipeline: shuffle, random crop, flip, normalize, resize.

The textbook pipeline runs PIL transforms per image in DataLoader worker processes, which caps a GPU at a few
thousand images/s per CPU core. Here the whole split sits on the training device as one uint8 tensor and every
step is a handful of tensor ops on a whole batch (the approach of the fastest CIFAR-10 trainers, e.g. airbench).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["BatchPipeline", "channel_stats", "crop_nhwc", "flip", "normalize", "normalize_nhwc", "random_crop"]

PAD = 4  # the standard CIFAR augmentation: random 32x32 crop of the image zero-padded by 4 pixels


def crop_nhwc(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None = None, pad: int = PAD
) -> torch.Tensor:
    """:func:`random_crop` on channels-last images (B x H x W x C), returning B x H x W x C.

    One flat gather (``take``) with per-image start offsets into the padded batch; a flip is the same window
    read with its columns reversed. Measured on 2 CPU cores: 1.5x faster than two ``gather`` calls and 2.5x
    faster than masked copies per offset (airbench's way, which also syncs the host on CUDA).
    """
    b, h, w, c = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = x.device
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    i = torch.arange(h, device=dev)[:, None, None] * (wp * c)
    j = torch.arange(w, device=dev)[None, :, None]
    ch = torch.arange(c, device=dev)[None, None, :]
    window = (i + j * c + ch).reshape(-1)  # element offsets of an h x w x c window at (0, 0)
    start = torch.arange(b, device=dev) * (hp * wp * c) + offsets[:, 0] * (wp * c) + offsets[:, 1] * c
    if flips is None:
        index = start[:, None] + window
    else:
        mirrored = (i + (w - 1 - j) * c + ch).reshape(-1)
        index = start[:, None] + torch.stack([window, mirrored])[flips.long()]
    return padded.reshape(-1).take(index).view(b, h, w, c)


def random_crop(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None = None, pad: int = PAD
) -> torch.Tensor:
    """Crop each image of ``x`` (B x C x H x W) at ``offsets`` (B x 2: row, col) from its zero-padded copy,
    mirrored horizontally where ``flips`` is true.

    Equal to torchvision's ``RandomCrop(H, padding=pad)`` then ``RandomHorizontalFlip`` with those draws, for a
    whole batch in one flat gather (:func:`crop_nhwc`; a flip is the window read with its columns reversed),
    several times faster than advanced indexing plus a separate flip pass.
    """
    return crop_nhwc(x.permute(0, 2, 3, 1), offsets, flips, pad).permute(0, 3, 1, 2)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of ``x`` whose ``mask`` entry is true (horizontal flip); a reference for tests."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] then standardised per channel (torchvision's Normalize).

    One fused multiply-add, x * 1/(255 std) - mean/std: about 10x faster on a CPU than the three-step form.
    """
    return normalize_nhwc(x.permute(0, 2, 3, 1), mean, std).permute(0, 3, 1, 2)


def normalize_nhwc(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` on channels-last images (B x H x W x C)."""
    return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))


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
        # Held as N x H x W x C: crops gather along H and W, and the NCHW view of the result is already
        # channels-last, the layout fast convolutions want, with no copy.
        self.x = x.permute(0, 2, 3, 1).contiguous().to(device)
        self.y = y.to(device)
        self.mean = mean.to(device)
        self.std = std.to(device)
        self.device = device
        self.image_size = image_size
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.y)

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC batch -> the model's NCHW input: normalized, resized to ``image_size``."""
        out = normalize_nhwc(xb, self.mean, self.std).permute(0, 3, 1, 2)  # NCHW view, channels-last memory
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

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
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if augment:
                b = len(yb)
                offsets = torch.randint(0, 2 * PAD + 1, (b, 2), device=self.device, generator=generator)
                flips = torch.rand(b, device=self.device, generator=generator) < 0.5
                xb = crop_nhwc(xb, offsets, flips)
            yield self.prepare(xb), yb

    def steps(self, batch_size: int, drop_last: bool) -> int:
        """Batches per pass."""
        n = len(self.y)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
