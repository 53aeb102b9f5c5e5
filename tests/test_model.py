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
    with pytest.raises(ModelError, match="does not fit resnet18"):
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


# One small member of each family torchvision has, with the head each keeps (ResNet/RegNet `fc`,
# MobileNet/EfficientNet/ConvNeXt/VGG `classifier[-1]`, ViT `heads.head`, Swin `head`, ...).
FAMILIES = [
    ("resnet18", "fc"),
    ("regnet_x_400mf", "fc"),
    ("mobilenet_v3_small", "classifier.3"),
    ("efficientnet_b0", "classifier.1"),
    ("convnext_tiny", "classifier.2"),
    ("vgg11_bn", "classifier.6"),
    ("vit_b_32", "heads.head"),
    ("swin_t", "head"),
    ("densenet121", "classifier"),
    ("shufflenet_v2_x0_5", "fc"),
    ("mnasnet0_5", "classifier.1"),
    ("squeezenet1_1", "classifier.1"),
]


@pytest.mark.parametrize(("arch", "head"), FAMILIES, ids=[a for a, _ in FAMILIES])
def test_each_family_builds_loads_a_saved_state_dict_and_trains_one_step(tmp_path: Path, arch: str, head: str) -> None:
    size = 32
    kwargs = {"image_size": size} if arch.startswith("vit_") else {}
    source = torchvision.models.get_model(arch, weights=None, **kwargs)  # a "pretrained" backbone, 1000 classes
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(3, ModelConfig(arch=arch, weights=str(tmp_path / "w.pt"), image_size=size))
    assert model.sft_head == head
    assert model.get_submodule(head).weight.shape[0] == 3  # the new head: one output per class
    ours, theirs = model.state_dict(), source.state_dict()
    backbone = [k for k in theirs if not k.startswith(head + ".")]
    assert backbone and all(torch.equal(ours[k], theirs[k]) for k in backbone), "every backbone tensor loaded"
    before = {k: v.clone() for k, v in ours.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.state_dict()[head + ".weight"], before[head + ".weight"]), "the step trained"


def test_a_weights_file_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ModelError) as err:
        build_model(10, ModelConfig(arch="mobilenet_v3_small", weights=str(tmp_path / "resnet.pt")))
    assert "resnet.pt: does not fit mobilenet_v3_small" in str(err.value) and "\n" not in str(err.value)


def test_unknown_architectures_stems_knobs_and_sizes_that_do_not_apply_are_one_line() -> None:
    from sft_optuna.config import TrainConfig
    from sft_optuna.errors import ConfigError
    from sft_optuna.training.model import check_architecture

    cases = [
        (
            ModelConfig(arch="resnet81"),
            TrainConfig(),
            "model.arch: unknown architecture 'resnet81' (did you mean resnet18",
        ),
        (ModelConfig(arch="vit_b_16", stem="cifar", image_size=224), TrainConfig(), "model.stem: cifar applies to"),
        (ModelConfig(arch="swin_t", image_size=64), TrainConfig(bn="frozen"), "train.bn: frozen: swin_t has no Batch"),
        (ModelConfig(arch="maxvit_t", image_size=64), TrainConfig(), "model.image_size: maxvit_t does not take 64 px"),
    ]
    for model_cfg, train_cfg, message in cases:
        with pytest.raises(ConfigError) as err:
            check_architecture(model_cfg, train_cfg)
        assert message in str(err.value) and "\n" not in str(err.value)
    check_architecture(ModelConfig(arch="efficientnet_b0", image_size=64), TrainConfig(bn="frozen"))  # applies


def test_imagenet_weights_of_any_architecture_name_the_file_expected_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(weights, "get_state_dict", offline)
    with pytest.raises(ModelError) as info:
        build_model(10, ModelConfig(arch="mobilenet_v3_small", weights="imagenet"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    assert str(expected) in str(info.value) and "\n" not in str(info.value)


def test_head_dropout_acts_in_training_only_and_keeps_the_plain_state_dict() -> None:
    torch.manual_seed(0)
    plain = build_model(4, ModelConfig(arch="resnet18"))
    torch.manual_seed(0)
    dropped = build_model(4, ModelConfig(arch="resnet18"), head_dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # exported models load into the plain arch
    x = torch.randn(2, 3, 32, 32)
    plain.eval()
    dropped.eval()
    assert torch.allclose(plain(x), dropped(x)), "no dropout at evaluation"
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x)), "dropout draws differ from call to call in training"
