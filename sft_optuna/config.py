"""A study's config as typed dataclasses (a docstring under every field), and their checks: structure, types,
ranges, every value a search space can produce. The ground floor: every layer imports it, it imports none.

Sampler and pruner names and options are checked against their constructors in ``search/samplers.py``;
``study_file.py`` runs both checks on a whole study file. Errors are one line: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from sft_optuna.errors import ConfigError

__all__ = [
    "BOUNDS",
    "RULES",
    "AugmentConfig",
    "Bound",
    "BudgetConfig",
    "DataConfig",
    "HeartbeatConfig",
    "ModelConfig",
    "ParamSpec",
    "PrunerConfig",
    "SamplerConfig",
    "StudyConfig",
    "TrainConfig",
    "config_diff",
    "parse_config",
    "train_config_for",
    "trial_config",
]


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"
    """Sampler by name: ``tpe``, ``random``, ``grid``, ``gp``, ``cmaes`` or ``qmc`` (``search/samplers.py``)."""
    seed: int | None = 0
    """Study-wide seed; each trial's sampler RNG is derived from (seed, trial number)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other keys of the ``sampler:`` mapping, passed to the sampler's constructor."""


@dataclass(frozen=True)
class PrunerConfig:
    name: str = "median"
    """Pruner, by name: ``asha`` (pauses trials at rungs and promotes the best from their checkpoints),
    ``median``, ``percentile``, ``hyperband``, ``successive_halving`` or ``none``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other keys of the ``pruner:`` mapping, passed to the pruner's constructor."""


@dataclass(frozen=True)
class BudgetConfig:
    n_trials: int = 20
    """Trials for the whole study across all workers; every finished trial counts, whatever its state."""
    max_retries: int = 2
    """Failures of a trial's own (its worker died while the storage was reachable, its node failed) that are
    retried, each resuming from its checkpoint; an operator's stop, a storage outage or a wrong verdict never
    uses one up."""
    epochs: int | None = None
    """Epochs the whole study may train, promotions and retries' re-run epochs included: no trial starts
    whose planned epochs (to its end, or with ASHA to its next rung) would go past it. ``null``: no cap."""


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: float = 30.0
    """Seconds between a running trial's heartbeats (one small write each)."""
    grace_period: float = 120.0
    """A running trial whose beat did not advance across a watcher's own uninterrupted reads of the storage
    for this long is failed and retried (from its checkpoint). Several beats, so that a GC pause or a slow
    write does not fail healthy trials."""


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["cifar10", "imagefolder"] = "cifar10"
    """``cifar10``: the official python release under ``ROOT/cifar-10-batches-py``; ``imagefolder``:
    ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``."""
    root: str = "data"
    """Where the dataset lies; a worker's ``--data-root`` overrides it (each node may keep data elsewhere)."""
    download: bool = False
    """``cifar10`` only: download the official release (checksum checked) if it is missing."""
    val_size: int = 5000
    """Images held out of the training set (stratified, seeded) for validation. The test set is never used."""
    train_subset: int | None = None
    """Cap on the training images (after the validation split), for quick runs. ``null``: all of them."""
    image_size: int = 32
    """Side of the stored (square) images; ``imagefolder`` images are resized once, when decoded. For photos
    fine-tuned at ``model.image_size`` px, store about ``model.image_size / 0.875`` (256 for 224): the training
    crop has room to move and evaluation takes the centre."""
    resize: Literal["center_crop", "squash"] = "center_crop"
    """How an ``imagefolder`` image becomes a square of ``image_size``: ``center_crop`` scales its shorter side
    to ``image_size`` and keeps the centre square (the aspect ratio is kept); ``squash`` scales both sides to
    ``image_size`` (a 4:3 photo is distorted). Square images give the same pixels either way."""
    placement: Literal["auto", "device", "host"] = "auto"
    """Where the decoded uint8 split lives while a trial trains: ``device`` (on the GPU: no copies at all),
    ``host`` (pinned host memory, each batch copied to the device one step ahead), or ``auto``: the device when
    the split fits beside a training step at the study's largest batch, else the host (the worker's log says
    which and why)."""
    seed: int = 0
    """Seed of the validation split and of the training subset."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    """Any torchvision classification model by its builder name (``resnet50``, ``efficientnet_b0``,
    ``convnext_tiny``, ``vit_b_16``, ``swin_t``, ...); its classification head is replaced by one for the
    dataset's classes."""
    weights: str = "none"
    """``imagenet`` (the architecture's default ImageNet weights from torchvision, from
    ``$TORCH_HOME/hub/checkpoints/`` or downloaded), ``none`` (random init) or a state-dict file."""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """``imagenet``: the architecture's own stem; ``cifar`` (ResNet family only): a 3x3/1 conv and no max-pool,
    the usual change for 32 px images."""
    image_size: int = 32
    """Side of the model's input: training crops and evaluation images are resized to it on the device."""


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, all of it batched on the training device (``training/augment.py``). Each key is
    searchable as ``augment.<key>``; ``train.augment: true`` is these defaults, ``false`` no augmentation."""

    crop: Literal["pad", "resized", "none"] = "pad"
    """``pad``: a random crop of the stored image zero-padded by 4 px (CIFAR's), resized to
    ``model.image_size``; ``resized``: RandomResizedCrop (a random area ``min_scale``..1 of the image, aspect
    ratio 1/``max_ratio``..``max_ratio``) resized to ``model.image_size``, evaluation on the centre
    ``eval_crop`` of the image (ImageNet's recipe, for photos); ``none``: the whole image."""
    min_scale: float = 0.08
    """``resized``: smallest crop area, as a fraction of the image (torchvision's 0.08; larger for small data)."""
    max_ratio: float = 4 / 3
    """``resized``: crops' aspect ratios lie between 1/max_ratio and max_ratio (log-uniform)."""
    eval_crop: float = 0.875
    """``resized``: evaluation takes the centre square of this fraction of the stored image side (224 of 256)."""
    flip: bool = True
    """Random horizontal flips."""
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    """A random photometric/geometric op per image after the crop: ``trivialaugment`` (TrivialAugment Wide: one
    op, random strength) or ``randaugment`` (``num_ops`` ops at strength ``magnitude``), as torchvision's."""
    magnitude: int = 9
    """``randaugment``: strength of its ops, 0..30 (torchvision's 31 bins)."""
    num_ops: int = 2
    """``randaugment``: ops applied to each image."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) parameter (0: off): a batch is blended with itself reversed, labels likewise."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) parameter (0: off): a box of the reversed batch is pasted in. With both on,
    each batch uses one of the two at random."""


NO_AUGMENT = AugmentConfig(crop="none", flip=False)
"""What ``train.augment: false`` means."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Training epochs of a trial; validation accuracy is reported after each."""
    batch_size: int = 128
    """Training batch size."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` (with momentum / nesterov) or ``adamw``."""
    lr: float = 0.05
    """Peak learning rate (after warmup)."""
    momentum: float = 0.9
    """SGD momentum (AdamW: beta1)."""
    nesterov: bool = True
    """SGD: Nesterov momentum (ignored when momentum is 0)."""
    weight_decay: float = 5.0e-4
    """Decoupled for AdamW, L2 for SGD; not applied to biases and norm layers."""
    scheduler: Literal["constant", "exponential", "cosine"] = "cosine"
    """``constant``; ``exponential``: lr0*exp(-k*t), t in epochs; ``cosine``: annealed to ``lr_min_ratio*lr0``."""
    lr_decay: float = 0.1
    """``k`` of the exponential schedule, per epoch."""
    lr_min_ratio: float = 0.0
    """Cosine: the final learning rate as a fraction of the peak."""
    warmup_epochs: float = 0.0
    """Linear warmup from 0 to the peak over this many epochs (may be fractional)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (:class:`AugmentConfig`); ``true`` for its defaults (a 4-pixel pad-crop and a flip),
    ``false`` for none. Searchable as a whole (``augment``: true/false) or key by key (``augment.mixup``)."""
    backbone_lr_scale: float = 1.0
    """Discriminative learning rates: the new head trains at ``lr``, the pretrained backbone at
    ``lr * backbone_lr_scale`` (0: the backbone's weights stay; its BatchNorm statistics still move unless
    ``bn: frozen``)."""
    freeze_epochs: int = 0
    """LP-FT (Kumar et al., 2022): the first ``freeze_epochs`` epochs train the head only (the backbone's weights
    and BatchNorm statistics frozen: a linear probe), then everything; must be below ``epochs``."""
    bn: Literal["train", "frozen"] = "train"
    """``frozen``: BatchNorm layers normalise with their (pretrained) running statistics and never update them;
    their scale and shift still train. For architectures with BatchNorm only."""
    ema_decay: float = 0.0
    """An exponential moving average of the weights (0: off; 0.999-0.9999 typical), updated every step with the
    decay warmed up as min(ema_decay, (1+s)/(10+s)); validation and checkpoints use it."""
    head_dropout: float = 0.0
    """Dropout before the new classification head (in addition to any dropout the architecture has)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere."""
    channels_last: bool = True
    """Channels-last memory format (faster convolutions on tensor-core GPUs)."""
    compile: bool = False
    """``torch.compile`` the model; its compile time is reported separately."""
    cuda_graph: Literal["auto", "on", "off"] = "off"
    """Replay each training step from a CUDA graph (forward, backward and a fused optimizer step in one launch;
    ``training/graphs.py``): ``auto`` and ``on`` on CUDA, eager elsewhere. Off by default until the GPU check
    (``benchmarks/gpu.sh``) has measured it against eager on real hardware."""
    eval_batch_size: int = 1024
    """Batch size of evaluation (no gradients, so it can be large)."""
    seed: int = 0
    """Seed of model init, shuffling and augmentation; a trial adds its trial number."""


@dataclass(frozen=True)
class ParamSpec:
    type: Literal["float", "int", "categorical"]
    """Distribution kind."""
    low: float | None = None
    """Lower bound (float, int)."""
    high: float | None = None
    """Upper bound, inclusive (float, int)."""
    step: float | None = None
    """Discretisation step (float, int); needed for a grid over a float range."""
    log: bool = False
    """Sample on a log scale (float, int); needs low > 0."""
    choices: list[Any] | None = None
    """Values of a categorical parameter."""


@dataclass(frozen=True)
class StudyConfig:
    name: str
    """Study name in the storage."""
    direction: Literal["maximize"] = "maximize"
    """Always ``maximize``: the value is a validation accuracy."""
    objective: Literal["last", "best"] = "last"
    """Which epoch's validation accuracy is the trial's value: ``last`` (what a retrain with the same
    epochs gives) or ``best`` (early-stopping view)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler settings."""
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    """Pruner settings."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Trial budget."""
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    """Dead-worker detection."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Fixed training values; the search space overrides those it names."""
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    """Parameter name -> distribution: a ``train`` key (``lr``), ``augment.<key>`` or ``model.<key>``."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data (what is stored with the study)."""
        out = dataclasses.asdict(self)
        out["sampler"] = {"name": self.sampler.name, "seed": self.sampler.seed, **self.sampler.options}
        out["pruner"] = {"name": self.pruner.name, **self.pruner.options}
        out["search_space"] = {
            k: {f: v for f, v in dataclasses.asdict(s).items() if v is not None and not (f == "log" and not v)}
            for k, s in self.search_space.items()
        }
        return out

    def to_json(self) -> str:
        """Canonical JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)


_SECTIONS: dict[str, type] = {
    "budget": BudgetConfig,
    "heartbeat": HeartbeatConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
}


def _type_ok(value: Any, tp: Any) -> bool:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Literal": Literal})  # noqa: S307 - our own annotations only
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    if text.startswith("Literal["):
        return "one of " + text[len("Literal[") : -1]
    return text


def _build(cls: type, raw: Any, where: str, *, extra_to: str | None = None) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``; ``extra_to`` collects unknown keys instead of failing."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields or key == extra_to:
            if extra_to is not None:
                extra[key] = value
                continue
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        tp = fields[key].type
        if tp == "AugmentConfig":
            kwargs[key] = augment_config(value, f"{where}.{key}")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}.{key}: expected {_describe(tp)}, got {value!r}")
        if tp in ("float", "float | None") and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    if extra_to is not None:
        kwargs[extra_to] = extra
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    return cls(**kwargs)


def augment_config(value: Any, where: str) -> AugmentConfig:
    """``train.augment`` as written: ``true`` (the defaults), ``false`` (none) or a mapping of its keys."""
    if isinstance(value, AugmentConfig):
        return value
    if isinstance(value, bool):
        return AugmentConfig() if value else NO_AUGMENT
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected true, false or a mapping of augmentation keys, got {value!r}")
    return _build(AugmentConfig, value, where)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Bound:
    """An allowed range of a numeric key: above (or at least) ``low``, below (or at most) ``high``."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = False

    def describe(self) -> str:
        """``> 0``, ``>= 0 and < 1``, ... (what an error and the reference say)."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {self.high:g}")
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        """Is ``value`` (finite) in the range?"""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)))


POSITIVE = Bound(low=0)
NON_NEGATIVE = Bound(low=0, low_inclusive=True)
FRACTION = Bound(low=0, high=1, low_inclusive=True)  # [0, 1)
BOUNDS: dict[str, Bound] = {
    "budget.n_trials": POSITIVE,
    "budget.max_retries": NON_NEGATIVE,
    "budget.epochs": POSITIVE,
    "heartbeat.interval": POSITIVE,
    "heartbeat.grace_period": POSITIVE,
    "data.val_size": POSITIVE,
    "data.train_subset": POSITIVE,
    "data.image_size": POSITIVE,
    "model.image_size": POSITIVE,
    "train.epochs": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.eval_batch_size": POSITIVE,
    "train.lr": POSITIVE,
    "train.momentum": FRACTION,
    "train.weight_decay": NON_NEGATIVE,
    "train.lr_decay": NON_NEGATIVE,
    "train.warmup_epochs": NON_NEGATIVE,
    "train.label_smoothing": FRACTION,
    "train.lr_min_ratio": Bound(low=0, high=1, low_inclusive=True, high_inclusive=True),
    "train.backbone_lr_scale": NON_NEGATIVE,
    "train.freeze_epochs": NON_NEGATIVE,
    "train.ema_decay": FRACTION,
    "train.head_dropout": FRACTION,
    "train.augment.min_scale": Bound(low=0, high=1, high_inclusive=True),
    "train.augment.max_ratio": Bound(low=1, high=100, low_inclusive=True),
    "train.augment.eval_crop": Bound(low=0, high=1, high_inclusive=True),
    "train.augment.magnitude": Bound(low=0, high=30, low_inclusive=True, high_inclusive=True),
    "train.augment.num_ops": Bound(low=1, high=10, low_inclusive=True, high_inclusive=True),
    "train.augment.mixup": NON_NEGATIVE,
    "train.augment.cutmix": NON_NEGATIVE,
}
"""Every numeric key's range, by its dotted path: the checks below and the study-file reference read this."""

RULES: list[tuple[str, str, Callable[[StudyConfig], bool]]] = [
    (
        "heartbeat.grace_period",
        "at least 2 heartbeat intervals",
        lambda c: c.heartbeat.grace_period >= 2 * c.heartbeat.interval,
    ),
    ("train.warmup_epochs", "below train.epochs", lambda c: c.train.warmup_epochs < c.train.epochs),
    (
        "train.freeze_epochs",
        "below train.epochs (the head-only phase is followed by full fine-tuning)",
        lambda c: c.train.freeze_epochs < c.train.epochs,
    ),
    ("model.arch", "a torchvision model name", lambda c: bool(c.model.arch.strip())),
]
"""Checks that relate keys: (key, what it must be, whether it is)."""


def _values(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of every field of dataclass ``obj`` and of the dataclasses inside it."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _values(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value))
    return out


def _check_param(where: str, spec: ParamSpec, sampler: str) -> None:
    if spec.type == "categorical":
        if not spec.choices:
            raise ConfigError(f"{where}.choices: a categorical parameter needs a non-empty list of choices")
        for key in ("low", "high", "step"):
            if getattr(spec, key) is not None:
                raise ConfigError(f"{where}.{key}: not allowed for a categorical parameter")
        for choice in spec.choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(f"{where}.choices: {choice!r} is not a number, string, bool or null")
        return
    if spec.choices is not None:
        raise ConfigError(f"{where}.choices: only for type categorical")
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{where}.{'low' if spec.low is None else 'high'}: required for type {spec.type}")
    if spec.low >= spec.high:
        raise ConfigError(f"{where}.low: must be below high ({spec.low!r} >= {spec.high!r})")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}.low: must be > 0 with log: true, got {spec.low!r}")
    if spec.log and spec.step is not None and spec.type == "float":
        raise ConfigError(f"{where}.step: cannot be combined with log: true")
    if spec.step is not None and spec.step <= 0:
        raise ConfigError(f"{where}.step: must be > 0, got {spec.step!r}")
    if spec.type == "int":
        for key in ("low", "high", "step"):
            value = getattr(spec, key)
            if value is not None and float(value) != int(value):
                raise ConfigError(f"{where}.{key}: must be a whole number for type int, got {value!r}")
    if sampler == "grid" and spec.type == "float" and spec.step is None:
        raise ConfigError(f"{where}.step: the grid sampler needs a step for a float range")


SECTIONS_SEARCHED: dict[str, type] = {"augment": AugmentConfig, "model": ModelConfig}
"""Search-space names other than bare ``train`` keys: ``augment.<key>`` (``train.augment``) and ``model.<key>``."""


def _with_params(config: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """``config`` with parameter values laid over it (bare names: ``train``; ``augment.x``, ``model.x``)."""
    train: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"augment": {}, "model": {}}
    for name, value in params.items():
        section, _, key = name.rpartition(".")
        if section:
            nested[section][key] = value
        elif key == "augment":
            train[key] = augment_config(value, "augment")
        else:
            train[key] = value
    augment = train.get("augment", config.train.augment)
    if nested["augment"]:
        train["augment"] = dataclasses.replace(augment, **nested["augment"])
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, **train),
        model=dataclasses.replace(config.model, **nested["model"]),
    )


def trial_config(config: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The study's config with a trial's parameters laid over it, validated (ConfigError: a combination the
    study file's checks could not see, say ``warmup_epochs`` and ``epochs`` both searched)."""
    out = _with_params(config, params)
    _check_values(out, "trial params")
    return out


def train_config_for(config: StudyConfig, params: dict[str, Any]) -> TrainConfig:
    """The study's fixed train values with a trial's parameters laid over them, validated (ConfigError)."""
    return trial_config(config, params).train


def parse_config(raw: Any, source: str = "<config>") -> StudyConfig:
    """Turn parsed YAML (or a stored config dict) into a validated :class:`StudyConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: {key}: unknown key (known: {', '.join(sorted(known))})")
    if "name" not in raw:
        raise ConfigError(f"{source}: name: required key is missing")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: name: expected a non-empty string, got {name!r}")
    kwargs: dict[str, Any] = {"name": name}
    for key in ("direction", "objective"):
        if key in raw:
            tp = StudyConfig.__dataclass_fields__[key].type
            if not _type_ok(raw[key], tp):
                raise ConfigError(f"{source}: {key}: expected {_describe(tp)}, got {raw[key]!r}")
            kwargs[key] = raw[key]
    for key, cls in _SECTIONS.items():
        kwargs[key] = _build(cls, raw.get(key), f"{source}: {key}")
    kwargs["sampler"] = _build(SamplerConfig, raw.get("sampler"), f"{source}: sampler", extra_to="options")
    kwargs["pruner"] = _build(PrunerConfig, raw.get("pruner"), f"{source}: pruner", extra_to="options")

    space_raw = raw.get("search_space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError(f"{source}: search_space: expected a mapping of parameter name -> spec")
    space: dict[str, ParamSpec] = {}
    for pname, spec_raw in space_raw.items():
        where = f"{source}: search_space.{pname}"
        if _field_type(pname) is None:
            raise ConfigError(f"{where}: not a searchable key (searchable: {', '.join(_searchable())})")
        spec = _build(ParamSpec, spec_raw, where)
        _check_param(where, spec, kwargs["sampler"].name)
        space[pname] = spec
    kwargs["search_space"] = space
    config = StudyConfig(**kwargs)
    _check_values(config, source)
    for pname, spec in space.items():
        _check_space_values(f"{source}: search_space.{pname}", pname, spec, config)
    return config


def _searchable() -> list[str]:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for section, cls in SECTIONS_SEARCHED.items():
        names += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return names


def _field_type(pname: str) -> Any:
    """The declared type of a search-space name's field; None for a name that is not searchable."""
    section, _, key = pname.rpartition(".")
    cls = SECTIONS_SEARCHED.get(section) if section else TrainConfig
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    if key not in fields:
        return None
    tp = fields[key].type
    return "bool" if tp == "AugmentConfig" else tp  # ``augment`` as a whole is searched as on/off


def _check_space_values(where: str, pname: str, spec: ParamSpec, config: StudyConfig) -> None:
    """Every value the parameter can take — each choice, both ends of a range — must pass the same checks as
    a fixed value, so that ``cosin`` fails at ``create``, not as a silently misread trial."""
    tp = _field_type(pname)
    if spec.type == "categorical":
        assert spec.choices is not None
        values = [("choices", v) for v in spec.choices]
    else:
        values = [("low", spec.low), ("high", spec.high)]
        if spec.type == "int":
            values = [(k, int(v)) for k, v in values if v is not None]
    for key, value in values:
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid {pname} (expected {_describe(tp)})")
        try:
            _check_values(_with_params(config, {pname: value}), "")
        except ConfigError as exc:
            raise ConfigError(f"{where}.{key}: value {value!r} is refused: {exc}") from None


def _check_values(config: StudyConfig, source: str) -> None:
    """Every numeric value in its range (:data:`BOUNDS`) and every rule between keys (:data:`RULES`)."""
    pre = f"{source}: " if source else ""
    for section in ("budget", "heartbeat", "data", "model", "train"):
        for key, value in _values(getattr(config, section), f"{section}."):
            bound = BOUNDS.get(key)
            if bound is not None and value is not None and not bound.holds(value):
                raise ConfigError(f"{pre}{key}: must be {bound.describe()}, got {value!r}")
    for key, what, holds in RULES:
        if not holds(config):
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{pre}{key}: must be {what}, got {value!r}")


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
