"""Train-step throughput (forward + backward + optimiser step) of the five backbones at their default size.

    python -m skinlesion.bench train [--models resnet50,...] [--batch-size N] [--steps N] [--warmup N]

Each backbone is the project's :class:`SkinLesionClassifier` (random weights: speed does not depend on
them) with every parameter trainable, i.e. stage 2 of the recipe at its most expensive, fed uint8
batches already on the device and normalised there, as in training. Variants: ``channels_last`` on and
off, and bf16 autocast (what ``trainer.precision=bf16-mixed`` does) on CUDA; on a CPU only fp32 is run,
since bf16 autocast there is an emulation on most processors. ``--compile`` compiles each model in
place first (``module.compile=true``; the warm-up steps absorb the compilation). CPU defaults are a few
steps of a small batch, enough for a figure, not a precise one.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from omegaconf import OmegaConf

from skinlesion.config import CONFIG_DIR
from skinlesion.inference.model import resolve_device
from skinlesion.models.module import SkinLesionClassifier

BACKBONES = ("resnet50", "densenet121", "mobilenetv2", "efficientnet_b0", "inception_v3")


def build_classifier(
    name: str, image_size: int | None = None, channels_last: bool = False, compile: bool = False
) -> SkinLesionClassifier:
    """The classifier for ``conf/model/<name>.yaml`` with random weights (nothing is downloaded)."""
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"))
    spec |= {"pretrained": False, "weights": None}
    return SkinLesionClassifier(model=spec, image_size=image_size, channels_last=channels_last, compile=compile)


def _parse(argv: list[str], cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench train", description=__doc__)
    parser.add_argument("--models", default=",".join(BACKBONES), help="comma-separated conf/model names")
    parser.add_argument("--batch-size", type=int, default=128 if cuda else 8)
    parser.add_argument("--steps", type=int, default=30 if cuda else 3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10 if cuda else 1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile each model (minutes on a CPU)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: each backbone's own)")
    args, _ = parser.parse_known_args(argv)
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_rate(
    module: SkinLesionClassifier, device: torch.device, batch_size: int, steps: int, warmup: int, amp: bool
) -> float:
    """Images per second of full training steps on one fixed uint8 batch already on the device."""
    module.to(device).train()
    module.configure_model()
    optimizer = module.configure_optimizers()
    size = module.preprocessing.image_size
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(module.class_names), (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = module._loss(module(module.normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda:  # as training does: cuDNN autotuning for the fixed size (trainer=gpu), TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    amp_options = (False, True) if cuda and torch.cuda.is_bf16_supported() else (False,)
    results = []
    for name in args.models.split(","):
        for channels_last, amp in itertools.product((False, True), amp_options):
            torch.manual_seed(0)
            module = build_classifier(name, args.size, channels_last, args.compile)
            rate = train_step_rate(module, device, args.batch_size, args.steps, args.warmup, amp)
            row = {
                "model": name,
                "image_size": module.preprocessing.image_size,
                "channels_last": channels_last,
                "precision": "bf16-mixed" if amp else "32-true",
                "compile": args.compile,
                "images_per_s": round(rate, 1),
            }
            results.append(row)
            print(
                f"{name:16s} {row['image_size']:4d}px  channels_last={channels_last!s:5s}  "
                f"{row['precision']:10s}  {rate:9.1f} images/s",
                flush=True,
            )
            del module
            if cuda:
                torch.cuda.empty_cache()
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "trainable": "all parameters (stage 2, full fine-tuning)",
        "results": results,
    }


def main(argv: list[str]) -> dict:
    device = resolve_device("auto")
    args = _parse(argv, device.type == "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args, device)
