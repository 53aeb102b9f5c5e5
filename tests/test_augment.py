"""Correctness of the batched on-device pipeline against per-image torchvision references."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torchvision import transforms

from sft_optuna.training.augment import PAD, BatchPipeline, channel_stats, flip, normalize, random_crop


def _images(n: int = 16, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_batched_crop_equals_per_image_reference_crop() -> None:
    x = _images()
    offsets = torch.randint(0, 2 * PAD + 1, (len(x), 2), generator=torch.Generator().manual_seed(1))
    out = random_crop(x, offsets)
    for i in range(len(x)):
        # torchvision's RandomCrop(32, padding=4): zero-pad, then crop at (top, left)
        padded = TF.pad(x[i], [PAD, PAD, PAD, PAD], fill=0)
        ref = TF.crop(padded, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        assert torch.equal(out[i], ref)


def test_centre_offset_crop_is_the_identity() -> None:
    x = _images()
    assert torch.equal(random_crop(x, torch.full((len(x), 2), PAD)), x)


def test_flip_mirrors_exactly_the_masked_images() -> None:
    x = _images(4)
    mask = torch.tensor([True, False, True, False])
    out = flip(x, mask)
    for i in range(4):
        expected = TF.horizontal_flip(x[i]) if mask[i] else x[i]
        assert torch.equal(out[i], expected)


def test_fused_crop_and_flip_equals_crop_then_mirror() -> None:
    x = _images()
    gen = torch.Generator().manual_seed(2)
    offsets = torch.randint(0, 2 * PAD + 1, (len(x), 2), generator=gen)
    flips = torch.rand(len(x), generator=gen) < 0.5
    out = random_crop(x, offsets, flips)
    for i in range(len(x)):
        ref = TF.crop(TF.pad(x[i], [PAD, PAD, PAD, PAD], fill=0), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        assert torch.equal(out[i], TF.horizontal_flip(ref) if flips[i] else ref)


def test_normalize_matches_torchvision_normalize() -> None:
    x = _images()
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    ref = transforms.Normalize(mean.tolist(), std.tolist())(x.float() / 255)
    assert torch.allclose(normalize(x, mean, std), ref, atol=1e-5)


def test_channel_stats_are_per_channel_mean_and_std() -> None:
    x = _images(64)
    mean, std = channel_stats(x)
    f = x.double() / 255
    assert torch.allclose(mean.double(), f.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), f.transpose(0, 1).reshape(3, -1).std(1), atol=1e-6)


def test_no_augmentation_at_evaluation_and_order_is_kept() -> None:
    x, y = _images(10), torch.arange(10)
    mean, std = torch.zeros(3), torch.ones(3)
    pipe = BatchPipeline(x, y, mean, std, torch.device("cpu"), image_size=32, channels_last=False)
    batches = list(pipe.batches(4, shuffle=False, augment=False))
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.allclose(torch.cat([b[0] for b in batches]), x.float() / 255)


def test_training_batches_are_shuffled_augmented_and_seeded() -> None:
    x, y = _images(32), torch.arange(32)
    pipe = BatchPipeline(x, y, torch.zeros(3), torch.ones(3), torch.device("cpu"), 32, channels_last=False)

    def one_pass(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        bs = list(pipe.batches(8, shuffle=True, augment=True, generator=gen, drop_last=True))
        return torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])

    xa, ya = one_pass(0)
    xb, yb = one_pass(0)
    _, yc = one_pass(1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert sorted(ya.tolist()) == list(range(32))
    assert not torch.allclose(xa, x[ya].float() / 255), "augmentation should change some images"


def test_upsampling_to_model_image_size_and_channels_last() -> None:
    x, y = _images(4), torch.arange(4)
    pipe = BatchPipeline(x, y, torch.zeros(3), torch.ones(3), torch.device("cpu"), image_size=64)
    xb, _ = next(pipe.batches(4, shuffle=False, augment=False))
    assert xb.shape == (4, 3, 64, 64) and xb.is_contiguous(memory_format=torch.channels_last)
