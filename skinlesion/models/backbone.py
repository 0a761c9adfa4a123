"""All five backbones through one code path: ``timm.create_model`` with a new 7-class head.

A backbone's YAML (``conf/model/*.yaml``) names its timm model, the modules that count as its blocks
for unfreezing (in order, stem first) and its Grad-CAM layer. Weights come from the Hugging Face hub
(``pretrained=true``) or from a local ``.safetensors``/``.pth`` file (``weights=PATH``) through timm's
own loader, which drops the ImageNet classifier and keeps everything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
from torch import nn

from skinlesion.errors import ConfigError, WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class BackboneSpec:
    """What ``conf/model/<name>.yaml`` holds."""

    name: str
    timm_name: str
    blocks: Sequence[str | Sequence[str]]
    gradcam_layer: str
    pretrained: bool = True
    weights: str | None = None
    drop_rate: float = 0.2
    min_input_size: int = 32
    extra: Mapping = field(default_factory=dict)  # passed to timm.create_model

    @classmethod
    def from_config(cls, values: Mapping) -> BackboneSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"unknown model setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _hub_error(spec: BackboneSpec, err: Exception) -> WeightsError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return WeightsError(
        f"could not load ImageNet weights for {spec.timm_name} from the Hugging Face hub ({reason[:200]}). "
        f"Without network either set model.pretrained=false to train from scratch, or download the weights "
        f"elsewhere and set model.weights=/path/to/{spec.name}.safetensors (or .pth)"
    )


def create_backbone(spec: BackboneSpec, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """The timm model with a fresh ``num_classes`` head; ``pretrained`` overrides the spec's flag."""
    model = _create(spec, num_classes, pretrained)
    head = model.get_classifier()
    # A near-zero new head starts at uniform probabilities (loss ln 7) instead of timm's from-scratch init,
    # whose large initial logits cost the first epochs of fine-tuning.
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return model


def _create(spec: BackboneSpec, num_classes: int, pretrained: bool | None) -> nn.Module:
    kwargs = dict(num_classes=num_classes, drop_rate=spec.drop_rate, **dict(spec.extra))
    use_pretrained = spec.pretrained if pretrained is None else pretrained
    if spec.weights and use_pretrained is not False:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"model.weights={spec.weights}: file not found; give the path of a .safetensors or .pth file"
            )
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"model.weights={path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
        try:
            return timm.create_model(
                spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise WeightsError(
                f"model.weights={path}: cannot be loaded into {spec.timm_name} ({first}); "
                f"the file must hold a state dict of that architecture"
            ) from err
    if use_pretrained:
        try:
            return timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as err:  # the hub raises network, HTTP and cache errors of many types
            raise _hub_error(spec, err) from err
    try:
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.timm_name={spec.timm_name}: {err}") from err


def get_module(model: nn.Module, name: str, setting: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"{setting}: the model has no module '{name}'; its top-level modules are {top}") from err


def resolve_blocks(model: nn.Module, spec: BackboneSpec) -> list[list[nn.Module]]:
    """The backbone's blocks in order (stem first), each a list of modules unfrozen together."""
    blocks = []
    for entry in spec.blocks:
        names = [entry] if isinstance(entry, str) else list(entry)
        blocks.append([get_module(model, name, f"model.blocks of {spec.name}") for name in names])
    return blocks


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def set_requires_grad(modules: Sequence[nn.Module] | nn.Module, flag: bool) -> None:
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for param in module.parameters():
            param.requires_grad_(flag)
