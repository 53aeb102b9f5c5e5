"""Correctness of the batched on-device pipeline against per-image torchvision references."""

from __future__ import annotations

import pytest
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


def _reference_cifar_batches(
    x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int, bs: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches as the CIFAR path made them before photo pipelines existed (the code of f642859,
    written out): shuffled order, 4-px pad-crop offsets, flips, normalize, bilinear resize."""
    import torch.nn.functional as F

    from sft_optuna.training.augment import crop_nhwc, normalize_nhwc

    gen = torch.Generator().manual_seed(seed)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    order = torch.randperm(len(y), generator=gen)
    out = []
    for start in range(0, len(y) - len(y) % bs, bs):
        idx = order[start : start + bs]
        xb, yb = nhwc.index_select(0, idx), y.index_select(0, idx)
        offsets = torch.randint(0, 2 * PAD + 1, (len(yb), 2), generator=gen)
        flips = torch.rand(len(yb), generator=gen) < 0.5
        img = normalize_nhwc(crop_nhwc(xb, offsets, flips), mean, std).permute(0, 3, 1, 2)
        if img.shape[-1] != size:
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        out.append((img.contiguous(memory_format=torch.channels_last), yb))
    return out


def test_the_cifar_path_keeps_producing_the_same_tensors() -> None:
    x, y = _images(40), torch.arange(40)
    mean, std = channel_stats(x)
    for size in (32, 64):
        pipe = BatchPipeline(x, y, mean, std, torch.device("cpu"), size)  # the defaults: pad-crop + flip
        got = list(
            pipe.batches(16, shuffle=True, augment=True, generator=torch.Generator().manual_seed(3), drop_last=True)
        )
        ref = _reference_cifar_batches(x, y, mean, std, size, 16, 3)
        assert len(got) == len(ref) == 2
        for (gx, gy), (rx, ry) in zip(got, ref, strict=True):
            assert torch.equal(gx, rx) and torch.equal(gy, ry)


def test_resized_crop_equals_torchvision_inside_each_box() -> None:
    from sft_optuna.training.augment import resized_crop

    x = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 6) * 255, size=40, mode="bilinear").to(torch.uint8)
    boxes = torch.tensor([[0, 0, 40, 40], [5, 3, 20, 30], [10, 12, 25, 17]])
    flips = torch.tensor([False, True, False])
    out = resized_crop(x.permute(0, 2, 3, 1).contiguous(), boxes, flips, 24)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i].float(), top, left, h, w, [24, 24], antialias=False)
        ref = TF.horizontal_flip(ref) if flips[i] else ref
        # the edge pixels of a downscaled box blend with the pixels just outside it (torchvision repeats its own)
        assert torch.allclose(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-3), i
    # evaluation's centre crop of 24 of 40 px at 24 px: the centre pixels themselves, no resampling
    from sft_optuna.training.augment import center_boxes

    centre = resized_crop(x.permute(0, 2, 3, 1).contiguous(), center_boxes(3, 40, 0.6, x.device), None, 24)
    assert torch.allclose(centre, x[:, :, 8:32, 8:32].float(), atol=1e-3)


def test_resized_crop_boxes_follow_torchvisions_rules_and_are_seeded() -> None:
    from sft_optuna.training.augment import resized_crop_boxes

    def draw(seed: int) -> torch.Tensor:
        return resized_crop_boxes(4000, 50, 50, 0.25, 4 / 3, torch.Generator().manual_seed(seed), torch.device("cpu"))

    boxes = draw(0)
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, draw(0)) and not torch.equal(boxes, draw(1))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 50).all()
    assert torch.equal(boxes, boxes.round()), "whole pixels, as torchvision's get_params"
    area = h * w / 2500
    assert area.min() >= 0.25 - 0.05 and area.max() <= 1.0  # rounding of the sides moves the area a little
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.06 and ratio.max() <= 4 / 3 + 0.06
    # the same distribution as torchvision's own draws (a box too large for its ratio is redrawn: areas lean low)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, 50, 50)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, [0.25, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    their_area = theirs[:, 2] * theirs[:, 3] / 2500
    assert area.mean() == pytest.approx(float(their_area.mean()), abs=0.015)
    assert area.std() == pytest.approx(float(their_area.std()), abs=0.015)
    assert (w / h).log().std() == pytest.approx(float((theirs[:, 3] / theirs[:, 2]).log().std()), abs=0.015)


def test_every_policy_op_equals_torchvisions_on_each_image() -> None:
    import math

    from torchvision.transforms import InterpolationMode

    from sft_optuna.training.policies import OPS, SIGNED, apply_ops, magnitude_table

    nearest = InterpolationMode.NEAREST
    refs = {
        "Identity": lambda img, m: img,
        "ShearX": lambda img, m: TF.affine(
            img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], interpolation=nearest, center=[0, 0]
        ),
        "ShearY": lambda img, m: TF.affine(
            img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], interpolation=nearest, center=[0, 0]
        ),
        "TranslateX": lambda img, m: TF.affine(img, 0.0, [int(m), 0], 1.0, [0.0, 0.0], interpolation=nearest),
        "TranslateY": lambda img, m: TF.affine(img, 0.0, [0, int(m)], 1.0, [0.0, 0.0], interpolation=nearest),
        "Rotate": lambda img, m: TF.rotate(img, m, interpolation=nearest),
        "Brightness": lambda img, m: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda img, m: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda img, m: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda img, m: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda img, m: TF.posterize(img, int(m)),
        "Solarize": lambda img, m: TF.solarize(img, m),
        "AutoContrast": lambda img, m: TF.autocontrast(img),
        "Equalize": lambda img, m: TF.equalize(img),
    }
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 5, 4) * 255, size=(22, 18), mode="bilinear")
    x = smooth.round().to(torch.uint8)
    for policy in ("trivialaugment", "randaugment"):
        table = magnitude_table(policy, 22)
        for k, name in enumerate(OPS):
            for b in (0, 9, 20, 30):
                for sign in (1, -1) if name in SIGNED else (1,):
                    m = float(table[k, b]) * sign
                    # each image of the batch its own op: image i gets op k, the others other ops
                    ops = torch.tensor([k, (k + 1) % len(OPS), k, (k + 5) % len(OPS)])
                    mags = torch.tensor(
                        [m, float(table[(k + 1) % len(OPS), 3]), m, float(table[(k + 5) % len(OPS), 7])]
                    )
                    out = apply_ops(x, ops, mags)
                    for i in (0, 2):
                        diff = (out[i].int() - refs[name](x[i], m).int()).abs()
                        # colour blends may round one grey level differently (torchvision's scalars are doubles)
                        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05, (policy, name, b, sign)
                        if name not in ("Color", "AutoContrast"):
                            assert diff.max() == 0, (policy, name, b, sign)


def test_trivialaugment_draws_an_op_per_image_and_randaugment_applies_num_ops() -> None:
    from sft_optuna.config import AugmentConfig

    x, y = _images(256, 16), torch.arange(256)
    trivial = BatchPipeline(
        x,
        y,
        torch.zeros(3),
        torch.ones(3),
        torch.device("cpu"),
        16,
        False,
        AugmentConfig(crop="none", flip=False, policy="trivialaugment"),
    )
    gen = torch.Generator().manual_seed(0)
    out = (trivial.augment(trivial.x, gen) * 255).round()
    changed = (out != x.float()).flatten(1).any(1).float().mean()
    assert 0.7 < changed < 1.0, "most images change (Identity and a zero magnitude leave some unchanged)"
    rand = BatchPipeline(
        x,
        y,
        torch.zeros(3),
        torch.ones(3),
        torch.device("cpu"),
        16,
        False,
        AugmentConfig(crop="none", flip=False, policy="randaugment", num_ops=3, magnitude=0),
    )
    gen = torch.Generator().manual_seed(0)
    rand.augment(rand.x, gen)
    draws_after = torch.rand(1, generator=gen)
    gen2 = torch.Generator().manual_seed(0)
    for _ in range(3):  # three ops drawn per image: op, bin-less magnitude, sign
        torch.randint(0, 14, (256,), generator=gen2)
        torch.rand(256, generator=gen2)
    assert torch.equal(draws_after, torch.rand(1, generator=gen2))


def test_mixup_blends_cutmix_pastes_a_box_of_its_weight_and_both_resume() -> None:
    from sft_optuna.training.augment import Mixer

    x = torch.rand(6, 3, 10, 10)
    y = torch.arange(6)
    mixer = Mixer(mixup=0.5, cutmix=0.0, seed=1)
    mixed, _, yb, lam = mixer(x, y)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0)) and torch.equal(yb, y.flip(0))
    cut = Mixer(mixup=0.0, cutmix=1.0, seed=2)
    for _ in range(20):
        pasted, _, _, lam = cut(x, y)
        from_partner = (pasted == x.flip(0)) & (pasted != x)
        assert from_partner[:, 0].float().mean() == pytest.approx(1 - lam, abs=1e-6)
    both = Mixer(mixup=0.5, cutmix=1.0, seed=3)
    both(x, y)
    state = both.state_dict()
    expected = [both(x, y)[3] for _ in range(5)]
    again = Mixer(mixup=0.5, cutmix=1.0, seed=99)
    again.load_state_dict(state)
    assert [again(x, y)[3] for _ in range(5)] == expected


def test_host_placement_gives_the_same_batches_as_device_placement() -> None:
    from sft_optuna.config import AugmentConfig

    x, y = _images(50, 20), torch.arange(50)
    mean, std = channel_stats(x)
    for aug in (AugmentConfig(), AugmentConfig(crop="resized", policy="trivialaugment")):
        pipes = {
            where: BatchPipeline(x, y, mean, std, torch.device("cpu"), 16, True, aug, where)
            for where in ("device", "host")
        }
        for train in (True, False):
            runs = {}
            for where, pipe in pipes.items():
                gen = torch.Generator().manual_seed(7)
                runs[where] = list(pipe.batches(16, shuffle=train, augment=train, generator=gen, drop_last=train))
            assert len(runs["host"]) == len(runs["device"]) == (3 if train else 4)
            for (hx, hy), (dx, dy) in zip(runs["host"], runs["device"], strict=True):
                assert torch.equal(hx, dx) and torch.equal(hy, dy)
