"""The training options that are off by default: an EMA of the weights, early stopping in stage 2, and
layer-wise learning-rate decay. Unit tests drive the callbacks with Lightning's Trainer on in-memory
images (MobileNetV2 at 32 px); one subprocess run switches all three on from the command line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_finetune import BACKBONE_LR, RandomImages, build, fit_tiny

from skinlesion.callbacks.early_stopping import Stage2EarlyStopping
from skinlesion.callbacks.ema import EMAWeights
from skinlesion.callbacks.finetune import TwoStageFinetuning
from skinlesion.errors import ConfigError
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.models.optim import NO_DECAY, is_block_group, layer_rates

from conftest import USER_TINY, compose_config, run_user


def layer_decay_module(name: str, decay: float) -> SkinLesionClassifier:
    cfg = compose_config(
        "train",
        [
            f"model={name}",
            "model.pretrained=false",
            "model.weights=null",
            f"data.image_size={75 if name == 'inception_v3' else 32}",
            "scheduler=constant",
            f"finetune.backbone_lr={BACKBONE_LR}",
            f"finetune.layer_decay={decay}",
        ],
    )
    return instantiate(cfg.module)


# ---- layer-wise learning-rate decay --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["mobilenetv2", "efficientnet_b0", "efficientnet_lite0", "resnet50", "densenet121", "inception_v3"]
)
def test_layer_decay_gives_every_block_its_rate_rising_with_depth(name: str) -> None:
    module = layer_decay_module(name, 0.8)
    groups = module.configure_optimizers().param_groups
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names)  # LearningRateMonitor refuses duplicate names
    rates: dict[str, float] = {}  # per block (a block of BatchNorm alone has only the no-decay group)
    for group in groups[2:]:
        assert is_block_group(group["name"].removesuffix(NO_DECAY))
        assert rates.setdefault(group["name"].removesuffix(NO_DECAY), group["lr"]) == group["lr"]  # twins agree
    assert len(rates) == len(module.blocks())
    by_depth = [rates[block] for block in sorted(rates)]
    assert by_depth[-1] == pytest.approx(BACKBONE_LR)  # the deepest block gets finetune.backbone_lr
    assert all(earlier < later for earlier, later in itertools.pairwise(by_depth))
    assert by_depth == pytest.approx([BACKBONE_LR * 0.8 ** (len(rates) - 1 - i) for i in range(len(rates))])
    # Each block's parameters at that block's rate; every parameter in exactly one group.
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in module.backbone.parameters())
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for block, lr in zip(module.blocks(), by_depth, strict=True):
        assert {lr_of[id(p)] for m in block for p in m.parameters()} == {lr}


def test_layer_rates_and_the_default_single_backbone_rate() -> None:
    assert layer_rates(3, 1e-3, 0.5) == pytest.approx([2.5e-4, 5e-4, 1e-3])
    names = [g["name"] for g in build("mobilenetv2").configure_optimizers().param_groups]
    assert names == ["head", "head/no_decay", "backbone", "backbone/no_decay"]  # the default is unchanged


def test_a_module_built_with_another_layer_decay_is_refused() -> None:
    callback = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, backbone_lr=BACKBONE_LR, layer_decay=0.7)
    with pytest.raises(ConfigError, match=r"finetune.layer_decay=0.7 but the module's optimiser was built with"):
        callback.resolve(build("mobilenetv2"), max_epochs=3)
    assert callback.describe(build("mobilenetv2"))["layer_decay"] == 0.7


# ---- EMA of the weights --------------------------------------------------------------------------------
class Weights(Callback):
    """The module's weights when training starts (after a resume restored them) and the average then."""

    def on_train_start(self, trainer, pl_module) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
        self.current = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.average = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
        self.updates = int(ema._average_model.n_averaged)


def fit_with(tmp_path: Path, callbacks: list, max_epochs: int = 3, ckpt_path: str | None = None):
    module = build("mobilenetv2", "scheduler=constant")
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="epoch{epoch}", monitor="val/loss", save_top_k=-1,
        auto_insert_metric_name=False,
    )  # fmt: skip
    finetune = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, backbone_lr=BACKBONE_LR)
    return module, fit_tiny(module, tmp_path, [finetune, *callbacks, checkpoint], max_epochs, ckpt_path)


def differs(a: dict, b: dict, key: str) -> bool:
    return not torch.equal(a[key], b[key])


HEAD, FIRST = "backbone.classifier.weight", "backbone.conv_stem.weight"


def test_the_average_is_validated_checkpointed_and_left_in_the_module(tmp_path: Path) -> None:
    ema = EMAWeights(decay=0.9, warmup=True)
    module, trainer = fit_with(tmp_path, [ema])
    saved = torch.load(tmp_path / "ckpt" / "epoch2.ckpt", weights_only=False)
    average, trained = saved["state_dict"], saved["current_model_state"]
    assert differs(average, trained, HEAD)  # the average lags the trained weights
    assert not differs(average, trained, FIRST)  # a block that never trained averages to itself
    assert differs(average, trained, "backbone.bn2.running_mean")  # BN statistics of the trained block too
    assert all(torch.equal(v, average[k]) for k, v in module.state_dict().items())  # the module is the average
    assert ema.describe() | {"final_decay": None} == {
        "evaluated": "ema", "decay": 0.9, "warmup": True, "updates": 6, "final_decay": None,
    }  # fmt: skip

    # What fit validated is the average: evaluating the best checkpoint's weights gives its score again, and
    # test and a weights-only save afterwards use them as they are (not the trained weights kept beside them).
    best = trainer.checkpoint_callback
    score = trainer.validate(module, datamodule=RandomImages(), ckpt_path=best.best_model_path, verbose=False)
    assert score[0]["val/loss"] == pytest.approx(float(best.best_model_score), abs=1e-5)
    trainer.test(module, dataloaders=RandomImages().val_dataloader(), verbose=False)
    trainer.save_checkpoint(tmp_path / "best.ckpt", weights_only=True)
    shipped = torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"]
    chosen = torch.load(best.best_model_path, weights_only=False)
    assert all(torch.equal(v, chosen["state_dict"][k]) for k, v in shipped.items())
    assert differs(shipped, chosen["current_model_state"], HEAD)


def test_resume_continues_the_average_and_the_trained_weights(tmp_path: Path) -> None:
    fit_with(tmp_path / "first", [EMAWeights(decay=0.9, warmup=True)], max_epochs=2)
    path = tmp_path / "first" / "ckpt" / "epoch1.ckpt"
    saved = torch.load(path, weights_only=False)
    weights, ema = Weights(), EMAWeights(decay=0.9, warmup=True)
    fit_with(tmp_path / "resumed", [ema, weights], max_epochs=3, ckpt_path=str(path))
    assert weights.updates == 4  # 2 epochs x 2 steps averaged before the checkpoint
    assert all(torch.equal(v, saved["current_model_state"][k]) for k, v in weights.current.items())
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in weights.average.items())
    assert ema.updates == 6


def test_decay_warms_up_to_its_ceiling() -> None:
    ema = EMAWeights(decay=0.99, warmup=True)
    assert ema.decay_after(1) < ema.decay_after(100) < ema.decay_after(1000) == 0.99
    assert ema.decay_after(100) == pytest.approx(1 - 101 ** (-2 / 3))
    assert EMAWeights(decay=0.99, warmup=False).decay_after(1) == 0.99


def test_each_update_takes_its_decay_from_the_host_count_not_the_device() -> None:
    ema, averaged = EMAWeights(decay=0.99, warmup=True), [torch.zeros(3)]
    ema.updates = 5
    ema._update(averaged, [torch.ones(3)], torch.tensor(5, device="meta"))  # reading it would wait for a GPU
    torch.testing.assert_close(averaged[0], torch.full((3,), 1 - ema.decay_after(5)))


# ---- early stopping ------------------------------------------------------------------------------------
def never_improving(patience: int = 1) -> Stage2EarlyStopping:
    """Only the first validation it counts can beat the start (min_delta larger than any change of val/loss)."""
    return Stage2EarlyStopping("val/loss", "min", patience=patience, min_delta=1e6)


def test_early_stopping_counts_from_stage_2_and_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    stopping = never_improving()
    _, trainer = fit_with(tmp_path, [stopping], max_epochs=6)
    # Stage 1 (epoch 0) is not counted: epoch 1 sets the best, epoch 2 does not beat it and stops the run.
    assert stopping.describe()["stopped_epoch"] == 2 and trainer.current_epoch == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch0.ckpt", "epoch1.ckpt", "epoch2.ckpt"]
    best = trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file()
    trainer.validate(datamodule=RandomImages(), ckpt_path=best, verbose=False)  # as train does after fit
    assert stopping.describe()["stopped_epoch"] == 2  # evaluating the best epoch does not rewind the record
    # Resumed from the stage-2 epoch it counted first, it goes on counting and stops at the same epoch.
    resumed = never_improving()
    fit_with(tmp_path / "resumed", [resumed], max_epochs=6, ckpt_path=str(tmp_path / "ckpt" / "epoch1.ckpt"))
    assert resumed.describe()["stopped_epoch"] == 2


def test_without_stage_2_early_stopping_counts_from_the_first_epoch(tmp_path: Path) -> None:
    stopping = never_improving()
    head_only = TwoStageFinetuning(unfreeze_at_epoch=None, backbone_lr=BACKBONE_LR)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, callbacks=[head_only, stopping],
    )  # fmt: skip
    trainer.fit(build("mobilenetv2", "scheduler=constant"), datamodule=RandomImages())
    assert stopping.describe()["stopped_epoch"] == 1


# ---- the command line ----------------------------------------------------------------------------------
def test_train_with_ema_early_stopping_and_layer_decay(tmp_path: Path) -> None:
    options = ["ema.enabled=true", "ema.decay=0.9", "early_stopping.patience=1", "early_stopping.min_delta=1e6",
               "finetune.layer_decay=0.8", "trainer.max_epochs=4", "model=mobilenetv2"]  # fmt: skip
    tiny = [o for o in USER_TINY if not o.startswith("trainer.max_epochs=")]
    result = run_user(tmp_path, "python", "-m", "skinlesion.train", *tiny, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ema"]["evaluated"] == "ema" and metrics["ema"]["updates"] == 6
    assert metrics["early_stopping"]["stopped_epoch"] == 2 and metrics["epochs"] == 3
    assert metrics["finetune"]["layer_decay"] == 0.8
    assert "test/balanced_acc" in metrics["metrics"]
    assert "early stopping in epoch 2" in (run / "train.log").read_text()
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    (chosen,) = (run / "checkpoints").glob("best-epoch*.ckpt")
    assert chosen.name == f"best-epoch{metrics['best_epoch']:03d}.ckpt"
    saved = torch.load(chosen, weights_only=False)  # the average of that epoch, the trained weights beside it
    weights = [k for k in best if k.startswith("backbone.")]  # best.ckpt adds the fitted temperature
    assert all(torch.equal(best[k], saved["state_dict"][k]) for k in weights)
    assert differs(best, saved["current_model_state"], HEAD)  # the average, not the trained weights
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 4 and "lr/backbone/00" in history[0] and "lr/backbone/18" in history[0]
