"""``module.compile`` compiles the backbone in place, so checkpoints load compiled or not.

Inductor (the default backend) needs minutes to compile MobileNetV2 on this CPU, so these tests use
TorchDynamo's ``eager`` backend: the same in-place wrapping and graph capture, without code generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from skinlesion.models.module import SkinLesionClassifier
from skinlesion.runfolder.checkpoints import load_classifier
from skinlesion.train import train

from conftest import compose_config, tiny_train_overrides

EAGER = "module.compile={backend:eager}"


def build(*overrides: str) -> SkinLesionClassifier:
    cfg = compose_config("train", ["model=mobilenetv2", "model.pretrained=false", "data.image_size=32", *overrides])
    return instantiate(cfg.module)


@pytest.mark.slow
def test_compiled_model_keeps_parameter_names_and_its_checkpoint_loads_uncompiled(tmp_path: Path) -> None:
    torch._dynamo.reset()
    compiled = build(EAGER)
    compiled.configure_model()
    wrapper = compiled.backbone._compiled_call_impl
    compiled.configure_model()  # fit, validate and test each call it: one compilation only
    assert compiled.is_compiled and compiled.backbone._compiled_call_impl is wrapper

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    compiled.train()
    compiled._loss(compiled(compiled.normalize(images)), torch.tensor([0, 1, 2, 3])).backward()
    assert list(compiled.state_dict()) == list(build().state_dict())  # no "_orig_mod." anywhere

    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": compiled.state_dict(), "hyper_parameters": dict(compiled.hparams)}, path)
    loaded = load_classifier(path)
    assert not loaded.is_compiled
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.predict_proba(images), compiled.predict_proba(images), atol=1e-6)


def test_checkpoint_of_a_torch_compile_wrapper_loads(tmp_path: Path) -> None:
    """Weights saved from ``torch.compile(backbone)`` (keys with ``_orig_mod.``) load into the plain model."""
    model = build()
    state = {k.replace("backbone.", "backbone._orig_mod.", 1): v for k, v in model.state_dict().items()}
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, path)
    loaded = load_classifier(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_training_with_compile_leaves_a_loadable_best_checkpoint(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    torch._dynamo.reset()
    overrides = [EAGER, "trainer.max_epochs=1", "finetune.unfreeze_at_epoch=0"]
    cfg = compose_config("train", tiny_train_overrides(tmp_path, synthetic_root, cache_dir) + overrides)
    summary = train(cfg)
    model = load_classifier(summary.best_checkpoint)
    assert not model.is_compiled and model.hparams.compile is False
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["epochs"] == 1
