"""Metadata fusion: a small MLP embeds the metadata vector, which is concatenated with the backbone's pooled
image features before a new classifier.

The fusion head takes the place of the timm model's classifier (``get_classifier()`` returns it), so the
metadata MLP and the new classifier are "the head" everywhere the recipe asks: ``head_parameters`` (the
optimiser's head groups, trained from stage 1), the fine-tuning callback's stage 1 and the parameter counts.
The model is then called through :func:`fused_logits` (timm's ``forward_features`` and
``forward_head(pre_logits=True)``: global pooling and the backbone's dropout), never through timm's forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from skinlesion.config import to_plain
from skinlesion.data.metadata import MetadataSpec
from skinlesion.errors import ConfigError


def fusion_spec(metadata: Mapping | MetadataSpec | None, compile: Any = False) -> MetadataSpec | None:
    """``module.metadata`` checked (None: the option is off), and refused with ``module.compile``, which compiles
    the backbone's forward that the fusion model never calls. The one check of both the settings check
    (:mod:`skinlesion.settings`, before anything is written) and the model."""
    if metadata is None:
        return None
    spec = MetadataSpec.from_config(to_plain(metadata))
    if compile:
        raise ConfigError(
            "module.compile compiles the backbone's forward, which the metadata model does not call; "
            "set module.compile=false with metadata=fusion"
        )
    return spec


class MetadataFusionHead(nn.Module):
    """(pooled image features, metadata vector) -> logits. In training each metadata field of each image is
    replaced by its missing encoding with probability ``field_dropout``, and all of an image's fields at once
    with probability ``drop_all``: the very vector of an image without metadata (the ISIC 2018 test set,
    ``predict`` without ``metadata_csv``), so the model also works without it."""

    def __init__(self, spec: MetadataSpec, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(spec.width, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.hidden), nn.ReLU()
        )
        self.fc = nn.Linear(num_features + spec.hidden, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # as the image-only head: uniform probabilities at start
        nn.init.zeros_(self.fc.bias)
        self.field_dropout = spec.field_dropout
        self.drop_all = spec.drop_all
        self.slices = spec.field_slices()
        self.register_buffer("missing", torch.from_numpy(spec.missing_row()), persistent=False)

    def drop_fields(self, metadata: torch.Tensor) -> torch.Tensor:
        """Each field of each row replaced by its missing encoding with probability ``field_dropout``, and
        every field of a row with probability ``drop_all``."""
        dropped = metadata.clone()
        whole = torch.rand(len(metadata), device=metadata.device) < self.drop_all
        for start, stop in self.slices:
            rows = whole | (torch.rand(len(metadata), device=metadata.device) < self.field_dropout)
            dropped[rows, start:stop] = self.missing[start:stop].to(dropped.dtype)
        return dropped

    def forward(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        if self.training and (self.field_dropout > 0 or self.drop_all > 0):
            metadata = self.drop_fields(metadata)
        embedded = self.embed(metadata.to(features.dtype))
        return self.fc(torch.cat([features, embedded], dim=1))


def attach_fusion_head(backbone: nn.Module, spec: MetadataSpec, num_classes: int) -> None:
    """Put a :class:`MetadataFusionHead` where the timm model's (new) classifier is."""
    classifier = backbone.get_classifier()
    name = next(name for name, module in backbone.named_modules() if module is classifier)
    backbone.set_submodule(name, MetadataFusionHead(spec, classifier.in_features, num_classes))


def fused_logits(backbone: nn.Module, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """Logits of a backbone carrying a fusion head, for normalised images and encoded metadata."""
    features = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    return backbone.get_classifier()(features, metadata)
