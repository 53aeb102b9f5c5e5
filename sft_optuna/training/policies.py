"""TrivialAugment (Wide) and RandAugment on a whole uint8 batch at once, each image with its own op and strength.

torchvision's ``TrivialAugmentWide`` / ``RandAugment`` draw one op per call and apply it to one image (or the
same op to a whole batch). Here every image draws its own op, magnitude bin and sign on the device, and the
batch goes through each kind of op once with per-image parameters — one affine ``grid_sample`` for the five
geometric ops (identity for the rest), one blend for brightness/colour/contrast/sharpness, masks for posterize
and solarize, and per-image autocontrast and equalize selected where drawn: no per-image Python, no host sync.
The ops and their magnitude tables follow torchvision's ``transforms/autoaugment.py`` (same names, same
ranges, nearest interpolation, zero fill), so that a search over ``augment.policy`` means what its papers mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["OPS", "apply_ops", "draw_ops", "magnitude_table", "signed_ops"]

OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
BINS = 31  # torchvision's num_magnitude_bins
_OP = {name: i for i, name in enumerate(OPS)}


def magnitude_table(policy: str, size: int) -> torch.Tensor:
    """``len(OPS) x BINS`` magnitudes of ``policy`` (``trivialaugment``: torchvision's *Wide* space; else
    RandAugment's) for ``size`` px images, as torchvision's ``_augmentation_space``."""
    wide = policy == "trivialaugment"
    lin = lambda hi: torch.linspace(0.0, hi, BINS)  # noqa: E731 - a table of ranges reads best as one-liners
    zero = torch.zeros(BINS)
    shear, rotate, colour = (0.99, 135.0, 0.99) if wide else (0.3, 30.0, 0.9)
    translate = 32.0 if wide else 150.0 / 331.0 * size
    posterize = 8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4))).round()
    rows = {
        "Identity": zero,
        "ShearX": lin(shear),
        "ShearY": lin(shear),
        "TranslateX": lin(translate),
        "TranslateY": lin(translate),
        "Rotate": lin(rotate),
        "Brightness": lin(colour),
        "Color": lin(colour),
        "Contrast": lin(colour),
        "Sharpness": lin(colour),
        "Posterize": posterize,
        "Solarize": torch.linspace(255.0, 0.0, BINS),
        "AutoContrast": zero,
        "Equalize": zero,
    }
    return torch.stack([rows[name] for name in OPS])


def signed_ops() -> torch.Tensor:
    """Which of :data:`OPS` take a random sign (a bool vector, to be put on the device once)."""
    return torch.tensor([name in SIGNED for name in OPS])


def draw_ops(
    b: int,
    table: torch.Tensor,
    signed: torch.Tensor,
    generator: torch.Generator | None,
    device: torch.device,
    magnitude: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: an op (uniform over :data:`OPS`) and its signed magnitude — a random bin (TrivialAugment) or
    bin ``magnitude`` (RandAugment), negated with probability 1/2 for the signed ops (``signed``: on the device,
    as ``table``)."""
    op = torch.randint(0, len(OPS), (b,), device=device, generator=generator)
    if magnitude is None:
        bins = torch.randint(0, BINS, (b,), device=device, generator=generator)
    else:
        bins = torch.full((b,), magnitude, device=device, dtype=torch.long)
    negative = torch.rand(b, device=device, generator=generator) < 0.5
    mag = table[op, bins]
    return op, torch.where(signed[op] & negative, -mag, mag)


def _affine_theta(op: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per image, torchvision's inverse affine matrix (``_get_inverse_affine_matrix``) of its geometric op, or
    the identity, as ``B x 2 x 3`` in pixel units around the image centre."""
    zero = torch.zeros_like(mag)
    is_ = lambda name: op == _OP[name]  # noqa: E731
    shear_deg = torch.rad2deg(torch.atan(mag))
    shear_x = torch.where(is_("ShearX"), shear_deg, zero)
    shear_y = torch.where(is_("ShearY"), shear_deg, zero)
    tx = torch.where(is_("TranslateX"), mag.trunc(), zero)  # torchvision: int(magnitude)
    ty = torch.where(is_("TranslateY"), mag.trunc(), zero)
    angle = torch.where(is_("Rotate"), -mag, zero)  # F.rotate passes -angle to the affine matrix
    # Shears turn about the top-left corner (torchvision's center=[0, 0]), the rest about the image centre.
    shear = is_("ShearX") | is_("ShearY")
    cx = torch.where(shear, torch.full_like(mag, -w * 0.5), zero)
    cy = torch.where(shear, torch.full_like(mag, -h * 0.5), zero)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3)


def _geometric(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Shear, translate and rotate, each image by its own matrix (torchvision's ``_affine_grid``: nearest
    neighbour, zero fill); images with another op pass through unchanged (an identity matrix samples each
    pixel at its own centre)."""
    b, _, h, w = x.shape
    # the matrix in doubles, rounded to floats once, as torchvision builds its own: nearest-neighbour ties
    # (a source coordinate at exactly .5) then fall the same way
    theta = _affine_theta(op, mag.double(), h, w).float()
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1)
    rescaled = theta.transpose(1, 2).clone()  # torchvision's _affine_grid, its divisor as two scalar divisions
    rescaled[..., 0] /= 0.5 * w
    rescaled[..., 1] /= 0.5 * h
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale of a uint8 image (ITU-R 601-2 luma), floored, as float ``B x 1 x H x W``."""
    r, g, b = x.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1).floor()


def _blends(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Brightness, Color (saturation), Contrast and Sharpness: each a blend of the image with a degenerate
    image (black, its grayscale, its mean gray, its blur) at ratio 1 + magnitude, as torchvision's ``_blend``."""
    is_ = lambda name: (op == _OP[name])[:, None, None, None]  # noqa: E731
    xf = x.float()
    gray = _gray(x)
    kernel = torch.ones(3, 3, device=x.device)  # torchvision's smoothing kernel: 1s around a 5, over 13
    kernel[1, 1] = 5.0
    kernel /= 13.0
    blurred = F.conv2d(xf, kernel.expand(3, 1, 3, 3), groups=3).round()
    blurred = F.pad(blurred, (1, 1, 1, 1))
    border = torch.ones_like(gray, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    sharp_degenerate = torch.where(border, xf, blurred)  # torchvision leaves a sharpened image's border as it is
    degenerate = torch.where(
        is_("Brightness"),
        torch.zeros_like(xf),
        torch.where(
            is_("Color"), gray, torch.where(is_("Contrast"), gray.mean((1, 2, 3), keepdim=True), sharp_degenerate)
        ),
    )
    blend = is_("Brightness") | is_("Color") | is_("Contrast") | is_("Sharpness")
    m = torch.where(blend, mag.float()[:, None, None, None], torch.zeros_like(mag.float())[:, None, None, None])
    # torchvision's ratio is 1 + m and its 1 - ratio is computed in doubles, i.e. exactly -m: the same here.
    # Sharpness: x + (1 - r)(blurred - x), its own arithmetic in torchvision; the others x*r + d*(1 - r).
    sharpened = xf + (-m) * (degenerate - xf)
    mixed = torch.where(is_("Sharpness"), sharpened, xf * (1.0 + m) + degenerate * (-m))
    return torch.where(blend, mixed.clamp(0, 255).to(torch.uint8), x)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    lo = xf.amin((2, 3), keepdim=True)
    hi = xf.amax((2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255.0))  # torchvision's rounding
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((xf - lo) / scale).clamp(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``equalize_image`` (PIL's LUT scheme), which already works on a batch."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w).long()
    hist = torch.zeros(b, c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(2, flat, torch.ones_like(flat, dtype=torch.int32))
    cum = hist.cumsum(2)
    last = cum.argmax(2, keepdim=True)
    step = torch.div(h * w - hist.gather(2, last), 255, rounding_mode="floor")
    valid = step != 0
    lut = torch.div(cum[..., :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp(0, 255).to(torch.uint8)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], 2)
    out = lut.gather(2, flat).view(b, c, h, w)
    return torch.where(valid[..., None], out, x)


def apply_ops(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Apply to each uint8 image of ``x`` (``B x 3 x H x W``) its op ``op[i]`` at magnitude ``mag[i]``."""
    is_ = lambda name: (op == _OP[name])[:, None, None, None]  # noqa: E731
    x = _geometric(x, op, mag)
    x = _blends(x, op, mag)
    bits = torch.where(op == _OP["Posterize"], mag, torch.full_like(mag, 8.0)).long()
    mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8)[:, None, None, None]
    x = x & mask
    threshold = torch.where(op == _OP["Solarize"], mag.float(), torch.full_like(mag.float(), math.inf))
    x = torch.where(x.float() >= threshold[:, None, None, None], 255 - x, x)
    x = torch.where(is_("AutoContrast"), _autocontrast(x), x)
    return torch.where(is_("Equalize"), _equalize(x), x)
