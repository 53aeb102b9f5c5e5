"""ResNet-18 with a new classification head, and where its starting weights come from."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from sft_optuna.config import ModelConfig
from sft_optuna.errors import ModelError

__all__ = ["build_model", "imagenet_cache_path", "load_state_dict_file"]

log = logging.getLogger(__name__)


def imagenet_cache_path() -> Path:
    """Where torch keeps the downloaded ImageNet ResNet-18 weights (``$TORCH_HOME/hub/checkpoints``)."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    if not imagenet_cache_path().is_file():
        log.info("downloading ImageNet ResNet-18 weights into %s", imagenet_cache_path())
    try:
        # torch.hub prints its own "Downloading: ..." line; ours above says it, and a failure stays one line
        with contextlib.redirect_stdout(io.StringIO()):
            return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: one message for the user
        raise ModelError(
            f"cannot load ImageNet ResNet-18 weights: not in {imagenet_cache_path()} and download failed ({exc}); "
            "put resnet18-f37072fd.pth there, or set model.weights to none or a state-dict file"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``; a checkpoint dict with a ``model`` entry is accepted too."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.weights: {path}: no such file (expected imagenet, none or a state-dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        # torch's own text runs to six lines ("Please file an issue..."): its first line is enough
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.weights: {path}: not a torch state dict ({first[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.weights: {path}: not a state dict of tensors")
    # Accept checkpoints of DataParallel / torch.compile models.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # The head always starts fresh (its class count differs), as does a stem whose shape changed.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc.")}
    skipped = sorted(k for k in state if k not in usable and not k.startswith("fc."))
    missing = sorted(k for k in own if k not in usable and not k.startswith("fc."))
    if not usable or len(missing) > 2:  # the cifar stem legitimately drops conv1.weight only
        raise ModelError(f"model.weights: {source}: does not fit ResNet-18 (missing {missing[:3]}...)")
    if skipped:
        log.info("weights from %s: not loaded (shape or name differs): %s", source, ", ".join(skipped))
    model.load_state_dict(usable, strict=False)


def build_model(num_classes: int, cfg: ModelConfig) -> nn.Module:
    """torchvision's ResNet-18, its ``fc`` replaced by a head with ``num_classes`` outputs.

    ``cfg.stem == "cifar"`` swaps the 7x7/2 conv and max-pool for a 3x3/1 conv (no downsampling), the usual
    change for 32 px images; pretrained weights then load everywhere but the first conv.
    """
    model = torchvision.models.resnet18(weights=None)
    if cfg.stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()  # type: ignore[assignment]
    if cfg.weights == "imagenet":
        _load_backbone(model, _imagenet_state_dict(), "imagenet")
    elif cfg.weights != "none":
        _load_backbone(model, load_state_dict_file(cfg.weights), cfg.weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
