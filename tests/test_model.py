"""ResNet-18 construction and where its weights come from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from sft_optuna.config import ModelConfig
from sft_optuna.errors import ModelError
from sft_optuna.training.model import build_model


def test_new_head_has_one_output_per_class() -> None:
    model = build_model(7, ModelConfig())
    assert model.fc.out_features == 7
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_saved_state_dict_is_loaded_as_weights_except_the_head(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    model = build_model(10, ModelConfig(weights=str(tmp_path / "backbone.pt")))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 10


def test_checkpoint_wrapped_and_prefixed_state_dicts_load(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    model = build_model(10, ModelConfig(weights=str(tmp_path / "ckpt.pt")))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_cifar_stem_loads_pretrained_weights_everywhere_but_the_first_conv(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(10, ModelConfig(weights=str(tmp_path / "w.pt"), stem="cifar"))
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_missing_or_foreign_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        build_model(10, ModelConfig(weights=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a torch state dict"):
        build_model(10, ModelConfig(weights=str(tmp_path / "junk.pt")))
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="does not fit ResNet-18"):
        build_model(10, ModelConfig(weights=str(tmp_path / "other.pt")))


def test_unavailable_imagenet_weights_fail_naming_the_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    with pytest.raises(ModelError) as info:
        build_model(10, ModelConfig(weights="imagenet"))
    message = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "none or a state-dict file" in message


def test_imagenet_weights_load_from_the_local_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for resnet18-f37072fd.pth (unobtainable offline): a state dict saved under the cache name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr(
        torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "get_state_dict",
        lambda **kw: torch.hub.load_state_dict_from_url(
            torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, check_hash=False
        ),
    )
    model = build_model(10, ModelConfig(weights="imagenet"))
    assert torch.equal(model.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


def test_a_garbage_weights_file_is_one_line(tmp_path: Path) -> None:
    from sft_optuna.errors import ModelError
    from sft_optuna.training.model import load_state_dict_file

    path = tmp_path / "w.pt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match=r"model.weights: .*w.pt: not a torch state dict") as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)
