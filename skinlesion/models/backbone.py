"""All five backbones through one code path: ``timm.create_model``, then a new 7-class head.

A backbone's YAML (``conf/model/*.yaml``) names its timm model, the modules that count as its blocks
for unfreezing (in order, stem first, together covering every backbone parameter once) and its Grad-CAM
layer. ImageNet weights come from the Hugging Face hub (``pretrained=true``) or from a local
``.safetensors``/``.pth`` file (``weights=PATH``); ``weights=converted:PATH`` is such a file, made on first
use from weights that ship in a pip package (:mod:`skinlesion.models.converted`).

The model is first built with its ImageNet head so that the weights load *strictly*: with a different
class count timm drops the classifier and loads non-strictly, which would silently accept a file of the
wrong architecture. The head is replaced afterwards with ``reset_classifier``. A local file is loaded
here rather than by timm, because timm loads InceptionV3 non-strictly whatever the head (its
torchvision weights carry an auxiliary classifier the model leaves out), so a file holding only the
classifier would train from random init while the run says ``pretrained: true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import timm
from timm.models import load_state_dict
from timm.models.densenet import DenseNet, _filter_torchvision_pretrained
from torch import nn

from skinlesion.errors import ConfigError, WeightsError
from skinlesion.models.converted import CONVERTED_PREFIX, converted_weights
from skinlesion.models.hub import offline_unless_reachable

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


def _summary(err: BaseException) -> str:
    """The start of an error's text on one line (load_state_dict lists its missing keys on the next lines)."""
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:200]


def create_backbone(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """The timm model with weights from ``spec.weights`` (a file), the hub (``spec.pretrained``) or random."""
    weights = _weights_file(spec) if spec.weights else None
    pretrained = spec.pretrained and weights is None  # a local file replaces the hub
    kwargs = {"drop_rate": spec.drop_rate, **dict(spec.extra)}
    if not timm.is_model(spec.timm_name):
        raise ConfigError(f"model.timm_name={spec.timm_name}: timm has no such model (see timm.list_models())")
    try:
        with offline_unless_reachable() if pretrained else nullcontext():
            model = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    except Exception as err:  # the hub loader raises network, HTTP, cache and key errors
        if pretrained:
            raise WeightsError(
                f"could not load ImageNet weights for {spec.timm_name} from the Hugging Face hub "
                f"({_summary(err)}). Without network either set model.pretrained=false to train from scratch, "
                f"or download the weights elsewhere and set model.weights=/path/to/{spec.name}.safetensors (or .pth)"
            ) from err
        raise ConfigError(f"model.timm_name={spec.timm_name}: {_summary(err)}") from err
    if weights is not None:
        load_weights_file(model, weights, spec)
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    # A near-zero new head starts at uniform probabilities (loss ln 7) instead of timm's from-scratch init,
    # whose large initial logits cost the first epochs of fine-tuning.
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return model


# Modules a file may have or lack: InceptionV3's auxiliary classifier (torchvision's weights carry it,
# timm's other InceptionV3 weights do not; the model here builds it only with aux_logits=True).
OPTIONAL_PREFIXES = ("AuxLogits.",)
# timm's own key remapping for a file in an older layout, as its hub loader applies it (torchvision's
# DenseNet names ``norm.1`` what timm names ``norm1``).
CHECKPOINT_FILTERS = {DenseNet: _filter_torchvision_pretrained}


def load_weights_file(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load an ImageNet state dict into ``model`` (still with its ImageNet head) strictly: every key of the
    model must be in the file and nothing else, except :data:`OPTIONAL_PREFIXES` (and BatchNorm's
    ``num_batches_tracked``, which old torchvision files lack and torch fills in)."""
    hint = (
        f"give a complete ImageNet state dict of {spec.timm_name} (e.g. model.safetensors from "
        f"huggingface.co/timm/{spec.timm_name}), or set model.weights=null model.pretrained=false"
    )
    try:
        state = load_state_dict(str(path))  # safetensors, or torch.load(weights_only=True); unwraps "state_dict"
    except Exception as err:  # safetensors, pickle and zip errors
        raise WeightsError(f"model.weights={path} cannot be read ({_summary(err)}); {hint}") from err
    remap = CHECKPOINT_FILTERS.get(type(model))
    if remap is not None:
        state = remap(dict(state))
    own = model.state_dict()
    needed = [k for k in own if not k.startswith(OPTIONAL_PREFIXES) and not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in state]  # torch fills in an absent num_batches_tracked
    unexpected = [k for k in state if k not in own and not k.startswith(OPTIONAL_PREFIXES)]
    if missing or unexpected:
        found = [f"{len(missing)} of its {len(needed)} keys missing (e.g. {', '.join(missing[:3])})"] if missing else []
        found += [f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        raise WeightsError(
            f"model.weights={path} cannot be loaded into {spec.timm_name}: not its complete state dict "
            f"({'; '.join(found)}); {hint}"
        )
    try:  # strict but for the optional keys, whose absence the check above allowed
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # the keys match but a shape does not: another width or depth
        raise WeightsError(
            f"model.weights={path} cannot be loaded into {spec.timm_name} ({_summary(err)}); {hint}"
        ) from err


def _weights_file(spec: BackboneSpec) -> Path:
    if spec.weights.startswith(CONVERTED_PREFIX):  # made from an installed package on first use
        return converted_weights(spec.timm_name, spec.weights.removeprefix(CONVERTED_PREFIX))
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"model.weights={spec.weights}: file not found; give the path of a .safetensors or .pth file, or set "
            "model.weights=null to download from the Hugging Face hub (model.pretrained=true)"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"model.weights={path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    return path.resolve()


def get_module(model: nn.Module, name: str, setting: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"{setting}: the model has no module '{name}'; its top-level modules are {top}") from err


def resolve_blocks(model: nn.Module, spec: BackboneSpec) -> list[list[nn.Module]]:
    """The backbone's blocks in order (stem first), each a list of modules unfrozen together.

    An entry ``name.*`` stands for each child of ``name`` as a block of its own (ResNet bottlenecks,
    dense layers, inverted-residual blocks), so the YAML stays short while the blocks stay fine.
    """
    setting = f"model.blocks of {spec.name}"
    blocks = []
    for entry in spec.blocks:
        if isinstance(entry, str) and entry.endswith(".*"):
            blocks.extend([child] for child in get_module(model, entry[:-2], setting).children())
            continue
        names = [entry] if isinstance(entry, str) else list(entry)
        blocks.append([get_module(model, name, setting) for name in names])
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
