"""The five backbones, built from their YAMLs through one code path, and their weights."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from hydra.utils import instantiate

from skinlesion.cli import user_error
from skinlesion.errors import ConfigError, WeightsError
from skinlesion.models.backbone import head_parameters
from skinlesion.models.module import SkinLesionClassifier

from conftest import compose_config

BACKBONES = ("resnet50", "densenet121", "mobilenetv2", "efficientnet_b0", "inception_v3")
SMALL_SIZE = {"inception_v3": 75}  # its stride-2 valid convolutions need >= 75 px; the others run at 32


def build(name: str, *overrides: str) -> SkinLesionClassifier:
    """The classifier exactly as ``skinlesion.train`` builds it from the config."""
    size = SMALL_SIZE.get(name, 32)
    cfg = compose_config("train", [f"model={name}", "model.pretrained=false", f"data.image_size={size}", *overrides])
    return instantiate(cfg.module)


@pytest.fixture(scope="module", params=BACKBONES)
def classifier(request) -> SkinLesionClassifier:
    return build(request.param)


def test_blocks_cover_every_backbone_parameter_exactly_once(classifier: SkinLesionClassifier) -> None:
    seen: dict[int, int] = {}
    for block in classifier.blocks():
        for module in block:
            for param in module.parameters():
                seen[id(param)] = seen.get(id(param), 0) + 1
    head = {id(p) for p in head_parameters(classifier.backbone)}
    names = {id(p): n for n, p in classifier.backbone.named_parameters()}
    assert not head & seen.keys(), "the head must not be in any block"
    uncovered = [names[i] for i in names if i not in head and i not in seen]
    assert uncovered == []
    assert [names[i] for i, n in seen.items() if n > 1] == []


def test_forward_gives_seven_logits_and_gradcam_layer_is_spatial(classifier: SkinLesionClassifier) -> None:
    size = classifier.preprocessing.image_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    classifier.eval()
    with torch.no_grad():
        logits = classifier(classifier.normalize(images))
        probs = classifier.predict_proba(images)
    assert logits.shape == (2, 7)
    assert torch.allclose(probs.sum(1), torch.ones(2))

    activations = []
    hook = classifier.gradcam_layer().register_forward_hook(lambda m, i, out: activations.append(out))
    with torch.no_grad():  # 32 px more than the smallest input: the last feature map is larger than 1x1
        classifier(torch.randn(1, 3, size + 32, size + 32))
    hook.remove()
    (activation,) = activations
    assert activation.ndim == 4 and activation.shape[-1] > 1 and activation.shape[-2] > 1


def test_new_head_has_seven_classes_and_dropout(classifier: SkinLesionClassifier) -> None:
    model = classifier.backbone
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    model.eval()
    features = model.forward_features(torch.randn(4, 3, *[classifier.preprocessing.image_size] * 2))
    with torch.no_grad():
        assert torch.equal(model.forward_head(features), model.forward_head(features))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model.forward_head(features), model.forward_head(features)), "no head dropout"
    model.eval()


def test_image_size_too_small_for_the_backbone_is_a_config_error() -> None:
    with pytest.raises(Exception) as info:
        build("inception_v3", "data.image_size=64")
    assert isinstance(user_error(info.value), ConfigError)
    assert re.search(r"image size 64 is too small for inception_v3.*75.*data\.image_size", str(user_error(info.value)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded_through_the_config(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("mobilenetv2_100.ra_in1k", pretrained=False)  # an ImageNet-shaped state dict
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()  # unlike any initialisation
    path = tmp_path / f"mobilenetv2{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)

    loaded = build("mobilenetv2", f"model.weights={path}").backbone.state_dict()
    expected = source.state_dict()
    backbone_keys = [k for k in expected if not k.startswith("classifier.")]
    assert all(torch.equal(loaded[k], expected[k]) for k in backbone_keys)
    assert loaded["classifier.weight"].shape == (7, 1280)  # a new 7-class head, not the file's 1000 classes


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(Exception) as info:
        build("mobilenetv2", f"model.weights={path}")
    assert isinstance(user_error(info.value), WeightsError)
    assert re.search(r"cannot be loaded into mobilenetv2_100.*keys missing", str(user_error(info.value)))


def imagenet_state_dict(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict shaped like the backbone's ImageNet weights, with values unlike any initialisation."""
    timm_name = compose_config("train", [f"model={name}"]).model.timm_name
    source = timm.create_model(timm_name, pretrained=False, **kwargs)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    return source.state_dict()


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", BACKBONES)
def test_weights_file_holding_only_the_classifier_is_refused(tmp_path: Path, name: str) -> None:
    full = imagenet_state_dict(name)
    head = timm.create_model(compose_config("train", [f"model={name}"]).model.timm_name).pretrained_cfg["classifier"]
    path = save_weights({k: v for k, v in full.items() if k.startswith(f"{head}.")}, tmp_path / f"{name}.safetensors")
    with pytest.raises(Exception) as info:
        build(name, f"model.weights={path}")
    error = user_error(info.value)
    assert isinstance(error, WeightsError)
    missing = int(re.search(r"(\d+) of its \d+ keys missing", str(error)).group(1))
    assert str(path) in str(error) and missing > 100 and "\n" not in str(error)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", BACKBONES)
def test_complete_weights_file_gives_its_backbone_weights(tmp_path: Path, name: str, suffix: str) -> None:
    # InceptionV3's torchvision weights carry the auxiliary classifier, which the model leaves out
    expected = imagenet_state_dict(name, **({"aux_logits": True} if name == "inception_v3" else {}))
    path = save_weights(expected, tmp_path / f"{name}{suffix}")
    model = build(name, f"model.weights={path}").backbone
    loaded = model.state_dict()
    head = {f"{n}.{k}" for n, m in model.named_modules() if m is model.get_classifier() for k in m.state_dict()}
    assert set(loaded) - head <= set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in set(loaded) - head)


def test_missing_weights_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        build("mobilenetv2", f"model.weights={tmp_path / 'nothere.pth'}")
    assert isinstance(user_error(info.value), WeightsError)
    assert re.search(r"model\.weights=.*nothere\.pth: file not found", str(user_error(info.value)))


def test_hub_failure_names_both_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(Exception) as info:
        build("mobilenetv2", "model.pretrained=true")
    assert isinstance(user_error(info.value), WeightsError)
    message = str(user_error(info.value))
    assert "model.pretrained=false" in message and "model.weights=" in message and "\n" not in message


def test_channels_last_converts_weights_and_inputs_without_changing_outputs() -> None:
    plain = build("mobilenetv2", "module.channels_last=false").eval()
    fast = build("mobilenetv2", "module.channels_last=true").eval()
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    assert fast.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert fast.normalize(images).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(plain.predict_proba(images), fast.predict_proba(images), atol=1e-5)
    assert not build("mobilenetv2").uses_channels_last  # "auto" on a CPU


def test_an_unreachable_hub_fails_at_once_in_offline_mode_with_the_one_line_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No minute of retries: one refused connection, then the load runs in huggingface_hub's offline mode."""
    import socket

    import timm
    from huggingface_hub import constants

    from skinlesion.errors import WeightsError
    from skinlesion.models.backbone import BackboneSpec, create_backbone

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    seen_offline = []

    def load(*args, **kwargs):
        seen_offline.append(constants.is_offline_mode())
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(timm, "create_model", load)
    spec = BackboneSpec(name="resnet50", timm_name="resnet50.a1_in1k", blocks=[], gradcam_layer="layer4")
    with pytest.raises(WeightsError, match=r"model\.pretrained=false .* model\.weights=/path/to/resnet50"):
        create_backbone(spec, num_classes=7)
    assert seen_offline == [True]
    assert constants.is_offline_mode() is False  # the setting is the user's again afterwards
