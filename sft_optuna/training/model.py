"""Any torchvision classifier by its builder name, with a new head for the dataset's classes, and where its
starting weights come from (the architecture's ImageNet weights, a state-dict file, or none).

The head is found per family (ResNet/RegNet ``fc``, MobileNet/EfficientNet/ConvNeXt/VGG ``classifier[-1]``,
ViT ``heads.head``, Swin ``head``, ...), so the fine-tuning knobs (``backbone_lr_scale``, ``freeze_epochs``)
know which parameters are the new head and which the pretrained backbone.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sft_optuna.config import ModelConfig, TrainConfig
from sft_optuna.errors import ConfigError, ModelError

__all__ = [
    "architectures",
    "build_model",
    "check_architecture",
    "has_batchnorm",
    "head_name",
    "head_parameters",
    "imagenet_cache_path",
    "load_state_dict_file",
]

log = logging.getLogger(__name__)

# Where each family keeps its classification head (a dotted path; -1 is the last entry of a Sequential). A model
# not listed here has its head found as the last Linear layer with torchvision's 1000 ImageNet outputs.
HEADS: tuple[tuple[str, str], ...] = (
    ("resnet", "fc"),
    ("resnext", "fc"),
    ("wide_resnet", "fc"),
    ("regnet", "fc"),
    ("shufflenet", "fc"),
    ("googlenet", "fc"),
    ("inception", "fc"),
    ("densenet", "classifier"),
    ("mobilenet", "classifier.-1"),
    ("efficientnet", "classifier.-1"),
    ("mnasnet", "classifier.-1"),
    ("convnext", "classifier.-1"),
    ("vgg", "classifier.-1"),
    ("alexnet", "classifier.-1"),
    ("maxvit", "classifier.-1"),
    ("squeezenet", "classifier.1"),  # a 1x1 convolution, not a Linear
    ("vit_", "heads.head"),
    ("swin", "head"),
)
CIFAR_STEM_FAMILIES = ("resnet", "resnext", "wide_resnet")
"""Families with a ``conv1`` + ``maxpool`` stem that ``stem: cifar`` replaces."""


@functools.cache
def architectures() -> tuple[str, ...]:
    """torchvision's classification models, by builder name."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _check_arch_name(arch: str, where: str = "model.arch") -> None:
    if arch not in architectures():
        near = difflib.get_close_matches(arch, architectures(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else "see torchvision.models.list_models()"
        raise ConfigError(f"{where}: unknown architecture {arch!r} ({hint})")


def _builder_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.arch.startswith("vit_"):
        return {"image_size": cfg.image_size}  # a ViT's position embedding is made for one input size
    if cfg.arch in ("googlenet", "inception_v3"):
        # no auxiliary heads (their outputs would need a loss of their own) and no input re-normalisation
        return {"aux_logits": False, "transform_input": False, "init_weights": False}
    return {}


def _family(arch: str) -> str | None:
    return next((prefix for prefix, _ in HEADS if arch.startswith(prefix)), None)


def head_name(model: nn.Module, arch: str) -> str:
    """The dotted name of ``model``'s classification head (see :data:`HEADS`)."""
    path = dict(HEADS).get(_family(arch) or "")
    if path is not None:
        parent, _, last = path.rpartition(".")
        if last == "-1":
            seq = model.get_submodule(parent)
            assert isinstance(seq, nn.Sequential)
            return f"{parent}.{len(seq) - 1}"
        return path
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if not linears:
        raise ModelError(f"model.arch: {arch}: cannot find its classification head")
    return linears[-1]


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes)
    if isinstance(old, nn.Conv2d):  # SqueezeNet: a 1x1 convolution per class
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    raise ModelError(f"model.arch: its head is a {type(old).__name__}, which cannot be replaced")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The new head's parameters (:func:`build_model` records which module it is)."""
    return list(model.get_submodule(model.sft_head).parameters())  # type: ignore[arg-type]


def train_mode(model: nn.Module, bn: str) -> None:
    """``model`` in training mode; with ``bn: frozen`` every BatchNorm layer normalises with its running
    statistics and leaves them as they are."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def has_batchnorm(model: nn.Module) -> bool:
    """Does ``model`` normalise with BatchNorm (``bn: frozen`` applies)?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def imagenet_cache_path(arch: str = "resnet18") -> Path:
    """Where torch keeps ``arch``'s downloaded ImageNet weights (``$TORCH_HOME/hub/checkpoints``)."""
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = imagenet_cache_path(arch)
    if not path.is_file():
        log.info("downloading ImageNet %s weights into %s", arch, path)
    try:
        # torch.hub prints its own "Downloading: ..." line; ours above says it, and a failure stays one line
        with contextlib.redirect_stdout(io.StringIO()):
            return weights.get_state_dict(progress=False, check_hash=True)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: one message for the user
        raise ModelError(
            f"cannot load ImageNet {arch} weights: not in {path} and download failed ({exc}); "
            f"put {path.name} there, or set model.weights to none or a state-dict file"
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
    strip = lambda k: k.removeprefix("module.").removeprefix("_orig_mod.")  # noqa: E731
    out = OrderedDict((strip(k), v) for k, v in obj.items())
    metadata = getattr(obj, "_metadata", None)  # module versions: MNASNet refuses a state dict without them
    if metadata is not None:
        out._metadata = OrderedDict((strip(k), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    return out


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, cfg: ModelConfig) -> None:
    head = f"{model.sft_head}."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    # The head always starts fresh (its class count differs), as does a stem whose shape changed.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable and not k.startswith(head))
    missing = sorted(k for k in own if k not in usable)
    allowed = {"conv1.weight"} if cfg.stem == "cifar" else set()
    if not usable or set(missing) - allowed:
        hint = (
            " (a ViT's position embedding fits one image size: use the weights' own model.image_size)"
            if any("pos_embedding" in k for k in missing)
            else ""
        )
        raise ModelError(
            f"model.weights: {source}: does not fit {cfg.arch} ({len(missing)} of {len(own)} tensors missing or "
            f"of another shape, e.g. {', '.join(missing[:3])}){hint}"
        )
    if skipped:
        log.info("weights from %s: not loaded (shape or name differs): %s", source, ", ".join(skipped[:10]))
    loadable = OrderedDict(usable)
    loadable._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(loadable, strict=False)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model.weights: {source}: cannot be loaded into {cfg.arch} ({first[:200]})") from None


def _dropout_before(p: float) -> Any:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (F.dropout(args[0], p, module.training), *args[1:])

    return hook


def build_model(num_classes: int, cfg: ModelConfig, head_dropout: float = 0.0) -> nn.Module:
    """torchvision's ``cfg.arch`` with its head replaced by one with ``num_classes`` outputs (the module's name
    is kept in ``model.sft_head``), starting from ``cfg.weights``.

    ``cfg.stem == "cifar"`` (ResNet family) swaps the 7x7/2 conv and max-pool for a 3x3/1 conv (no
    downsampling), the usual change for 32 px images; pretrained weights then load everywhere but the first
    conv. ``head_dropout`` drops the head's inputs in training (a hook: the state dict keeps torchvision's
    layout, so weights files and exported models load into the plain architecture).
    """
    _check_arch_name(cfg.arch)
    model = torchvision.models.get_model(cfg.arch, weights=None, **_builder_kwargs(cfg))
    if cfg.stem == "cifar":
        if not cfg.arch.startswith(CIFAR_STEM_FAMILIES):
            raise ConfigError(
                f"model.stem: cifar applies to the ResNet family only (resnet*, resnext*, wide_resnet*), not {cfg.arch}"
            )
        width = int(model.conv1.out_channels)  # type: ignore[union-attr]
        model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    name = head_name(model, cfg.arch)
    model.sft_head = name  # type: ignore[assignment]
    if cfg.weights == "imagenet":
        _load_backbone(model, _imagenet_state_dict(cfg.arch), "imagenet", cfg)
    elif cfg.weights != "none":
        _load_backbone(model, load_state_dict_file(cfg.weights), cfg.weights, cfg)
    parent, _, last = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    head = _new_head(getattr(owner, last) if not last.isdigit() else owner[int(last)], num_classes)  # type: ignore[index]
    if last.isdigit():
        owner[int(last)] = head  # type: ignore[index]
    else:
        setattr(owner, last, head)
    if head_dropout > 0:
        head.register_forward_pre_hook(_dropout_before(head_dropout))
    return model


def _shape_probe(cfg: ModelConfig) -> nn.Module | None:
    """Build ``cfg.arch`` without its weights and run one image of ``cfg.image_size`` through it, on the meta
    device (no memory, no arithmetic: shapes only); returns the model, or None where the architecture cannot be
    built on the meta device (RegNet computes its widths with tensors)."""
    plain = ModelConfig(arch=cfg.arch, weights="none", stem=cfg.stem, image_size=cfg.image_size)
    try:
        with torch.device("meta"):
            model = build_model(2, plain)
    except (NotImplementedError, RuntimeError) as exc:
        if "meta" not in str(exc):
            raise
        return None
    model.eval()
    try:
        with torch.device("meta"), torch.no_grad():
            model(torch.empty(2, 3, cfg.image_size, cfg.image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.image_size: {cfg.arch} does not take {cfg.image_size} px images ({first[:160]})"
        ) from None
    return model


def check_architecture(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Refuse, as one line naming the key, an architecture torchvision does not have (with the nearest names), a
    stem or knob that does not apply to it (``stem: cifar`` outside the ResNet family, ``bn: frozen`` without
    BatchNorm) and an input size it cannot take. Nothing is allocated: the check runs on the meta device."""
    _check_arch_name(model_cfg.arch)
    if model_cfg.stem == "cifar" and not model_cfg.arch.startswith(CIFAR_STEM_FAMILIES):
        raise ConfigError(
            f"model.stem: cifar applies to the ResNet family only (resnet*, resnext*, wide_resnet*), "
            f"not {model_cfg.arch}"
        )
    model = _shape_probe(model_cfg)
    if model is not None and train_cfg.bn == "frozen" and not has_batchnorm(model):
        raise ConfigError(f"train.bn: frozen: {model_cfg.arch} has no BatchNorm layers (it uses LayerNorm)")
