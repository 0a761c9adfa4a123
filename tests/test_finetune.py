"""The two-stage callback on all five backbones (direct) and through Lightning's Trainer (MobileNetV2).

Direct tests build each backbone once and drive the callback by hand; the Trainer tests use in-memory
uint8 images at 32 px so that schedulers, checkpoints and resume run for real in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from skinlesion.callbacks.finetune import TwoStageFinetuning, auto_unfreeze_epoch, blocks_for_share
from skinlesion.errors import ConfigError
from skinlesion.models.module import SkinLesionClassifier

from conftest import compose_config

HEAD_LR, BACKBONE_LR = 1e-3, 1e-4
# Per backbone: input size, width of the features the head sees, and the modules of its last block.
BACKBONES = {
    "resnet50": (32, 2048, ["layer4.2"]),
    "densenet121": (32, 1024, ["features.norm5"]),
    "mobilenetv2": (32, 1280, ["conv_head", "bn2"]),
    "efficientnet_b0": (32, 1280, ["conv_head", "bn2"]),
    "inception_v3": (75, 2048, ["Mixed_7c"]),
}


def build(name: str, *overrides: str, backbone_lr: float = BACKBONE_LR) -> SkinLesionClassifier:
    cfg = compose_config(
        "train",
        [
            f"model={name}",
            "model.pretrained=false",
            f"data.image_size={BACKBONES[name][0]}",
            "scheduler=constant",
            f"optimizer.lr={HEAD_LR}",
            f"finetune.backbone_lr={backbone_lr}",
            *overrides,
        ],
    )
    return instantiate(cfg.module)


def trainable_names(module: SkinLesionClassifier) -> set[str]:
    return {n for n, p in module.backbone.named_parameters() if p.requires_grad}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=list(BACKBONES))
def classifier(request) -> SkinLesionClassifier:
    return build(request.param)


# ---- direct tests on every backbone --------------------------------------------------------------------
def test_trainable_counts_before_and_after_the_unfreeze_epoch(classifier: SkinLesionClassifier) -> None:
    _, features, last_block = BACKBONES[classifier.spec.name]
    model = classifier.backbone
    total = numel(model)
    head = features * 7 + 7
    callback = TwoStageFinetuning(unfreeze_at_epoch=2, num_blocks=1, backbone_lr=BACKBONE_LR)
    classifier.train()
    for epoch in (0, 1):
        callback.apply(classifier, epoch)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == head
    callback.apply(classifier, 2)
    expected = head + sum(numel(model.get_submodule(name)) for name in last_block)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected and total - trainable > 0
    assert {n.split(".")[0] for n in trainable_names(classifier)} <= {n.split(".")[0] for n in last_block} | {
        model.pretrained_cfg["classifier"].split(".")[0]
    }

    TwoStageFinetuning(unfreeze_at_epoch=0, num_blocks=1).apply(classifier, 0)  # full fine-tuning
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total
    TwoStageFinetuning(unfreeze_at_epoch=None).apply(classifier, 50)  # head only, ever
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == head


def test_optimizer_groups_and_learning_rates_after_unfreezing(classifier: SkinLesionClassifier) -> None:
    classifier.train()
    TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=2, backbone_lr=BACKBONE_LR).apply(classifier, 1)
    optimizer = classifier.configure_optimizers()  # scheduler=constant: the optimiser alone
    head = {id(p) for p in classifier.backbone.get_classifier().parameters()}
    seen = set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert not ids & seen
        seen |= ids
        is_head = group["name"] in ("head", "head/no_decay")  # and the backbone's two: one name each
        assert group["lr"] == (HEAD_LR if is_head else BACKBONE_LR)
        assert (ids <= head) == is_head
        if group["weight_decay"] == 0.0 and optimizer.defaults["weight_decay"] > 0:
            assert all(p.ndim == 1 for p in group["params"])
    assert seen == {id(p) for p in classifier.backbone.parameters()}, "every parameter is in the optimiser"


def test_one_step_changes_only_trainable_weights_and_frozen_bn_statistics_stay(
    classifier: SkinLesionClassifier,
) -> None:
    size = BACKBONES[classifier.spec.name][0]
    torch.manual_seed(0)
    classifier.train()
    callback = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, backbone_lr=1e-2, bn="frozen_eval")
    callback.apply(classifier, 1)
    optimizer = classifier.configure_optimizers()
    model = classifier.backbone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    loss = classifier._loss(classifier(classifier.normalize(images)), torch.tensor([0, 1, 2, 3]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.state_dict()

    params = dict(model.named_parameters())
    changed = {k for k in params if not torch.equal(before[k], after[k])}
    with_gradient = {k for k, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert changed == with_gradient
    assert changed <= trainable_names(classifier)
    assert {"weight", "bias"} <= {k.rsplit(".", 1)[1] for k in changed}

    trainable_modules = {
        id(m) for block in callback._blocks_to_unfreeze(classifier) for b in block for m in b.modules()
    }
    frozen_bn = unfrozen_bn = 0
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            moved = not torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])
            if id(module) in trainable_modules:
                assert module.training and moved
                unfrozen_bn += 1
            else:
                assert not module.training and not moved, f"frozen {name} updated its statistics"
                frozen_bn += 1
    assert frozen_bn > 0 and unfrozen_bn > 0


def test_default_share_trains_the_same_part_of_every_backbone(classifier: SkinLesionClassifier) -> None:
    """Within 2.5 points of the 70% target, so any two of the five are within 5 points of each other."""
    cfg = compose_config("train", [f"model={classifier.spec.name}"])
    callback = instantiate(cfg.finetune)
    assert (callback.share, callback.num_blocks) == (0.7, None)  # the default recipe
    callback.resolve(classifier, max_epochs=15)  # stage 2 from epoch 5
    classifier.train()
    callback.apply(classifier, 10)
    model = classifier.backbone
    backbone = numel(model) - numel(model.get_classifier())
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) - numel(model.get_classifier())
    stages = callback.describe(classifier)
    assert stages["stage2_backbone_params"] == trained and stages["backbone_params"] == backbone
    assert stages["stage2_backbone_share"] == pytest.approx(trained / backbone, abs=1e-4)
    assert abs(trained / backbone - 0.7) <= 0.025, f"{classifier.spec.name}: {trained / backbone:.3f}"
    assert stages["stage1_trainable_params"] == numel(model.get_classifier())
    blocks = classifier.blocks()  # whole blocks, counted from the end
    unfrozen = callback._blocks_to_unfreeze(classifier)
    assert unfrozen == blocks[-len(unfrozen) :] and 1 < len(unfrozen) < len(blocks)


@pytest.mark.parametrize(
    ("sizes", "share", "expected"),
    [
        ([1, 1, 1, 1], 0.5, 2),
        ([1, 1, 1, 1], 1.0, 4),
        ([1, 1, 1, 1], 0.01, 1),
        ([6, 1, 3], 0.3, 1),
        ([6, 1, 3], 0.35, 1),
    ],
)
def test_share_picks_the_closest_number_of_last_blocks(sizes: list[int], share: float, expected: int) -> None:
    assert blocks_for_share(sizes, share) == expected


def test_num_blocks_still_asks_for_the_last_n_blocks_explicitly() -> None:
    module = build("mobilenetv2").train()
    callback = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=3)
    callback.apply(module, 1)
    assert callback.rule == "num_blocks=3" and callback.share is None
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in trainable_names(module) if n.startswith("blocks")} == {
        "blocks.6",
        "blocks.5",
    }  # blocks.5.2, blocks.6.0 and the head conv
    assert callback.describe(module)["stage2_blocks"] == 3


# ---- BatchNorm policies and settings (MobileNetV2) --------------------------------------------------
def bn_modes(module: SkinLesionClassifier) -> dict[str, bool]:
    return {n: m.training for n, m in module.backbone.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.parametrize(
    ("policy", "last_block_bn_train", "other_bn_train"),
    [("frozen_eval", True, False), ("all_eval", False, False), ("train", True, True)],
)
def test_batchnorm_policies(policy: str, last_block_bn_train: bool, other_bn_train: bool) -> None:
    module = build("mobilenetv2").train()
    TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, bn=policy).apply(module, 1)
    for name, training in bn_modes(module).items():
        in_last = name == "bn2"  # the last block: the 1x1 head conv and its BatchNorm
        assert training == (last_block_bn_train if in_last else other_bn_train), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bn": "sometimes"}, "finetune.bn='sometimes' is not valid"),
        ({"unfreeze_at_epoch": -1}, "finetune.unfreeze_at_epoch=-1 must be"),
        ({"num_blocks": 0}, "finetune.num_blocks=0 must be"),
        ({"share": 0.0}, r"finetune.share=0.0 must be a fraction"),
        ({"share": 1.5}, r"finetune.share=1.5 must be a fraction"),
    ],
)
def test_invalid_callback_settings(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TwoStageFinetuning(**settings)


# ---- through Lightning's Trainer ------------------------------------------------------------------------
class RandomImages(L.LightningDataModule):
    """uint8 images in the project's batch format, with class weights like the real DataModule's."""

    def __init__(self, n: int = 16, size: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        self.items = [{"image": images[i], "label": i % 7, "index": i} for i in range(n)]
        self.batch_size = batch_size
        self.class_weights = torch.linspace(0.5, 2.0, 7)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size)


class Probe(Callback):
    """Per epoch, at its first step (after the callbacks' epoch-start hooks): trainable set, LRs, BN modes."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        self.lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        if trainer.current_epoch not in self.epochs:
            self.epochs[trainer.current_epoch] = {
                "trainable": frozenset(trainable_names(pl_module)),
                "bn": bn_modes(pl_module),
                "groups": len(optimizer.param_groups),
                "adam_state": len(optimizer.state),
            }


def flat(lrs: list[dict[str, float]]) -> list[float]:
    return [lr for step in lrs for lr in (step["head"], step["backbone"])]


def fit(
    tmp_path: Path,
    scheduler: str = "constant",
    max_epochs: int = 3,
    unfreeze_at_epoch: int | None = 1,
    ckpt_path: str | None = None,
) -> tuple[SkinLesionClassifier, Probe, L.Trainer]:
    module = build("mobilenetv2", f"scheduler={scheduler}")
    probe = Probe()
    callbacks = [
        TwoStageFinetuning(unfreeze_at_epoch=unfreeze_at_epoch, num_blocks=1, backbone_lr=BACKBONE_LR),
        probe,
        ModelCheckpoint(
            dirpath=tmp_path / "ckpt", filename="epoch{epoch}", save_top_k=-1, auto_insert_metric_name=False
        ),
    ]
    return module, probe, fit_tiny(module, tmp_path, callbacks, max_epochs, ckpt_path)


def fit_tiny(
    module: SkinLesionClassifier, tmp_path: Path, callbacks: list, max_epochs: int, ckpt_path: str | None = None
) -> L.Trainer:
    """Fit ``module`` on :class:`RandomImages` on the CPU from seed 0, with these callbacks only."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    L.seed_everything(0)
    trainer.fit(module, datamodule=RandomImages(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "plateau"])
def test_unfreezing_keeps_every_scheduler_s_schedule(tmp_path: Path, scheduler: str) -> None:
    module, probe, trainer = fit(tmp_path / "two_stage", scheduler)
    assert trainer.current_epoch == 3
    assert probe.epochs[0]["trainable"] < probe.epochs[1]["trainable"]  # stage 2 ran
    assert len({e["groups"] for e in probe.epochs.values()}) == 1  # no param group was ever added
    assert module.hparams.backbone_lr == BACKBONE_LR  # the callback reads it, never writes it
    assert bool(module.use_class_weights) and torch.equal(module.class_weights, RandomImages().class_weights)
    for lrs in probe.lrs:
        assert lrs["backbone"] == pytest.approx(lrs["head"] * BACKBONE_LR / HEAD_LR)
    heads = [lrs["head"] for lrs in probe.lrs]
    if scheduler == "constant":
        assert set(heads) == {HEAD_LR}
    if scheduler == "cosine":  # per-step warm-up then decay, exactly as without any unfreezing
        assert heads[0] == pytest.approx(0.1 * HEAD_LR) and max(heads) == pytest.approx(HEAD_LR)
        assert heads[-1] < 0.5 * HEAD_LR
        _, head_only, _ = fit(tmp_path / "head_only", scheduler, 3, None)
        assert flat(probe.lrs) == pytest.approx(flat(head_only.lrs))
    if scheduler == "plateau":
        config = trainer.lr_scheduler_configs[0]
        assert isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert len(config.scheduler.min_lrs) == len(trainer.optimizers[0].param_groups)
        assert config.scheduler.last_epoch == 3  # stepped on val/balanced_acc after every epoch


def test_resume_before_and_after_the_unfreeze_epoch_restores_the_trainable_set(tmp_path: Path) -> None:
    _, full, _ = fit(tmp_path / "full", "cosine", 4, 2)
    checkpoints = tmp_path / "full" / "ckpt"
    assert full.epochs[1]["trainable"] < full.epochs[2]["trainable"] == full.epochs[3]["trainable"]
    for saved_after_epoch in (0, 2):  # stage 1 checkpoint, and one from after the unfreeze epoch
        path = checkpoints / f"epoch{saved_after_epoch}.ckpt"
        assert torch.load(path, weights_only=True)["callbacks"]["TwoStageFinetuning"]["unfrozen_at"] == (
            None if saved_after_epoch < 2 else 2
        )
        _, resumed, _ = fit(tmp_path / f"resumed{saved_after_epoch}", "cosine", 4, 2, str(path))
        assert sorted(resumed.epochs) == list(range(saved_after_epoch + 1, 4))
        for epoch, seen in resumed.epochs.items():
            assert seen["trainable"] == full.epochs[epoch]["trainable"]
            assert seen["bn"] == full.epochs[epoch]["bn"]
            assert seen["adam_state"] == full.epochs[epoch]["adam_state"]  # optimiser moments restored
        assert flat(resumed.lrs) == pytest.approx(flat(full.lrs[-len(resumed.lrs) :]))  # the schedule goes on


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"unfreeze_at_epoch": 3}, r"unfreeze_at_epoch=3 is at or past trainer.max_epochs=3"),
        ({"num_blocks": 20}, r"num_blocks=20 but mobilenetv2 has 19 blocks"),
    ],
)
def test_settings_that_cannot_work_stop_before_training(tmp_path: Path, settings: dict, message: str) -> None:
    module = build("mobilenetv2")
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[TwoStageFinetuning(**({"unfreeze_at_epoch": 1} | settings)), probe],
        default_root_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module, datamodule=RandomImages())
    assert probe.lrs == []  # not one step


@pytest.mark.parametrize(("max_epochs", "expected"), [(15, 5), (30, 10), (3, 1), (2, 1), (1, None), (None, 5)])
def test_auto_unfreeze_epoch_keeps_both_stages_inside_the_run(max_epochs, expected) -> None:
    assert auto_unfreeze_epoch(max_epochs) == expected


def test_auto_unfreeze_makes_a_one_epoch_run_head_only() -> None:
    callback = TwoStageFinetuning(unfreeze_at_epoch="auto", num_blocks=1, backbone_lr=BACKBONE_LR)
    callback.resolve(build("mobilenetv2"), max_epochs=1)  # the default recipe must not reject trainer.max_epochs=1
    assert callback.unfreeze_at_epoch is None
    assert callback.stage_for_epoch(0) == 1


def test_a_module_built_with_another_backbone_lr_is_refused_not_overwritten() -> None:
    """One owner: the optimiser's rate comes from the module's settings; the callback only checks it agrees."""
    module = build("mobilenetv2", backbone_lr=1.0)
    callback = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, backbone_lr=BACKBONE_LR)
    with pytest.raises(ConfigError, match=r"finetune.backbone_lr=0.0001 but the module's optimiser was built with"):
        callback.resolve(module, max_epochs=3)
    assert module.hparams.backbone_lr == 1.0 and not callback.resolved


def test_auto_is_resolved_once_for_the_run() -> None:
    """train resolves it before the data is read; the fit's setup does not resolve it again."""
    module = build("mobilenetv2")
    callback = TwoStageFinetuning(unfreeze_at_epoch="auto", num_blocks=1, backbone_lr=BACKBONE_LR)
    callback.resolve(module, max_epochs=9)
    trainer = L.Trainer(accelerator="cpu", max_epochs=30, logger=False, enable_progress_bar=False)
    callback.setup(trainer, module, "fit")
    assert callback.unfreeze_at_epoch == 3  # a third of the 9 it was resolved for, not of 30


def test_a_checkpoint_from_before_the_no_decay_group_names_resumes_with_the_learning_rate_monitor(
    tmp_path: Path,
) -> None:
    """Such a checkpoint holds two groups called head (and two backbone): LearningRateMonitor would refuse them."""
    fit(tmp_path / "old", "constant", max_epochs=1, unfreeze_at_epoch=None)
    checkpoint = torch.load(tmp_path / "old" / "ckpt" / "epoch0.ckpt", weights_only=False)
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        group["name"] = group["name"].removesuffix("/no_decay")  # as the earlier version saved them
    assert [g["name"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == ["head"] * 2 + ["backbone"] * 2
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = build("mobilenetv2", "scheduler=constant")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[TwoStageFinetuning(unfreeze_at_epoch=None, backbone_lr=BACKBONE_LR), LearningRateMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=RandomImages(), ckpt_path=str(old))
    assert trainer.current_epoch == 2
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["head", "head/no_decay", "backbone", "backbone/no_decay"]
