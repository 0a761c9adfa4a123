"""What only a CUDA device can show: channels_last and bf16 on the GPU path, a fit with trainer=gpu, and a
GPU-trained checkpoint that predicts like itself on the CPU. Skipped on machines without CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from skinlesion.runfolder.checkpoints import load_classifier
from skinlesion.train import train

from conftest import random_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is present)"),
]


def test_channels_last_and_bf16_on_the_gpu(tmp_path: Path) -> None:
    model = load_classifier(random_checkpoint(tmp_path / "model.ckpt", "resnet50", 64)).cuda().eval()
    assert model.uses_channels_last  # channels_last=auto turns it on for CUDA
    model.configure_model()
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")
    inputs = model.normalize(images)
    assert inputs.dtype == torch.float32 and inputs.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(inputs)
    assert logits.shape == (4, 7) and torch.isfinite(logits.float()).all()


def test_a_fit_with_trainer_gpu_and_its_checkpoint_on_the_cpu(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg("trainer=gpu", "data.image_size=64", "+trainer.limit_train_batches=4")
    train(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["epochs"] == 2
    assert all(math.isfinite(v) for v in saved["metrics"].values())

    # The GPU-trained weights predict on the CPU in fp32 what the GPU (bf16) predicted, within bf16 rounding.
    model = load_classifier(run / "checkpoints" / "best.ckpt").eval()
    assert next(model.parameters()).device.type == "cpu"
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        on_cpu = model(model.normalize(images)).softmax(1)
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            on_gpu = gpu(gpu.normalize(images.cuda())).float().softmax(1).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=0.05)
