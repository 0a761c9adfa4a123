"""Optimiser parameter groups and learning-rate schedules for the two-stage recipe.

Every parameter is in the optimiser from the first step; the finetuning callback only flips
``requires_grad``. Adding a param group mid-training is what breaks ``ReduceLROnPlateau`` and OneCycle
under Lightning's ``BaseFinetuning`` (Lightning issues #12141, #8720); a parameter without a gradient
is skipped by Adam/AdamW (no moment update, no weight decay) until it is unfrozen, and its moments then
start from zero as they would in a freshly added group.

Biases and normalisation parameters (1-D tensors) get no weight decay, as in timm's training recipes:
decaying BatchNorm scales towards zero only fights the normalisation.

Layer-wise learning-rate decay (``finetune.layer_decay``) gives each block of ``conf/model/<name>.yaml``
(the blocks stage 2 unfreezes, stem first, together covering the backbone once) a group of its own: the
last block at ``backbone_lr``, each earlier one ``layer_decay`` times its successor's. timm's
``param_groups_layer_decay`` would number layers by its own ``group_matcher`` and hand the scale over as
``lr_scale``, which only timm's schedulers apply; here the scale is already in each group's ``lr``, so every
scheduler (``WarmupCosine``'s single factor, plateau, constant) keeps the ratios.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.optim.lr_scheduler import LambdaLR

from skinlesion.errors import ConfigError
from skinlesion.labels import CLASSES
from skinlesion.models.backbone import (
    BackboneSpec,
    backbone_parameters,
    create_backbone,
    head_parameters,
    resolve_blocks,
)

HEAD, BACKBONE = "head", "backbone"
NO_DECAY = "/no_decay"  # suffix of the twin group without weight decay (same learning rate)


def _split_decay(name: str, params: list[torch.nn.Parameter], **settings) -> list[dict]:
    """One group with weight decay (weights) called ``name`` and one without (biases, norms) called
    ``<name>/no_decay``: Lightning's LearningRateMonitor refuses two groups of one name."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"name": name, "params": decay, **settings}]
    if no_decay:
        groups.append({"name": f"{name}{NO_DECAY}", "params": no_decay, "weight_decay": 0.0, **settings})
    return [g for g in groups if g["params"]]


def param_groups(
    model: torch.nn.Module,
    backbone_lr: float,
    layer_decay: float | None = None,
    blocks: list[list[torch.nn.Module]] | None = None,
) -> list[dict]:
    """Head groups with the optimiser's own lr; backbone groups with ``backbone_lr``, or with ``layer_decay``
    one pair per block (``backbone/<index>``, stem first) at :func:`layer_rates`."""
    head = _split_decay(HEAD, head_parameters(model))
    if layer_decay is None:
        return head + _split_decay(BACKBONE, backbone_parameters(model), lr=backbone_lr)
    params = block_parameters(model, blocks or [])
    width = len(str(len(params) - 1))  # backbone/07 sorts before backbone/12 in loggers and history.csv
    rates = layer_rates(len(params), backbone_lr, layer_decay)
    return head + [
        group
        for index, (block, lr) in enumerate(zip(params, rates, strict=True))
        for group in _split_decay(f"{BACKBONE}/{index:0{width}d}", block, lr=lr)
    ]


def is_block_group(name: str) -> bool:
    """One block's group under layer-wise decay (``backbone/<index>``; not its ``/no_decay`` twin)."""
    prefix, _, index = name.partition("/")
    return prefix == BACKBONE and index.isdigit()


def layer_rates(num_blocks: int, backbone_lr: float, layer_decay: float) -> list[float]:
    """Per block, stem first: the last at ``backbone_lr``, each earlier one ``layer_decay`` x the next."""
    return [backbone_lr * layer_decay ** (num_blocks - 1 - index) for index in range(num_blocks)]


def block_parameters(model: torch.nn.Module, blocks: list[list[torch.nn.Module]]) -> list[list[torch.nn.Parameter]]:
    """Each block's parameters; refused unless the blocks hold every backbone parameter exactly once (a
    parameter left out would never train, one in two blocks would get two rates)."""
    params = [list({id(p): p for module in block for p in module.parameters()}.values()) for block in blocks]
    counts: dict[int, int] = {}
    for block in params:
        for p in block:
            counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): name for name, p in model.named_parameters()}
    backbone = {id(p) for p in backbone_parameters(model)}
    wrong = [names[i] for i in backbone if counts.get(i) != 1] + [names[i] for i in counts if i not in backbone]
    if wrong:
        raise ConfigError(
            f"finetune.layer_decay needs model.blocks that hold every backbone parameter exactly once; "
            f"{len(wrong)} do not (e.g. {', '.join(wrong[:3])}): fix the block list in conf/model/, or set "
            "finetune.layer_decay=null"
        )
    return params


def check_layer_blocks(spec: BackboneSpec) -> None:
    """:func:`block_parameters`' check at startup, not minutes later in ``configure_optimizers``: on a copy of
    the backbone built on the meta device (no weights loaded, nothing allocated)."""
    with torch.device("meta"):
        model = create_backbone(replace(spec, pretrained=False, weights=None), num_classes=len(CLASSES))
    block_parameters(model, resolve_blocks(model, spec))


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``warmup_start`` x lr, then cosine decay to ``min_lr_ratio`` x lr, per step.

    Every group follows the same factor, so the backbone keeps ``finetune.backbone_lr`` x factor: the
    ratio between head and backbone learning rates is the same at every step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        warmup_start: float = 0.1,
    ) -> None:
        warmup = round(warmup_epochs * steps_per_epoch)
        total = max(total_steps, warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return warmup_start + (1 - warmup_start) * step / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


def rename_saved_groups(optimizer_state: dict) -> None:
    """A checkpoint saved before the no-decay twins had names of their own holds two groups called ``head``
    (and two ``backbone``); ``Optimizer.load_state_dict`` puts those names back, and LearningRateMonitor
    refuses duplicates. The twin without weight decay is renamed as :func:`param_groups` names it now."""
    seen: set[str] = set()
    for group in optimizer_state.get("param_groups", []):
        name = group.get("name")
        if name in seen and not str(name).endswith(NO_DECAY):
            group["name"] = f"{name}{NO_DECAY}"
        seen.add(group.get("name"))
