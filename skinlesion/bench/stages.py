"""Train-step throughput per stage of the recipe, and what a frozen backbone could save in stage 1.

    python -m skinlesion.bench stages [--model efficientnet_lite0] [--size 160] [--batch-size 32] [--steps N]

Stage 1 only needs the frozen backbone's forward pass. Variants, each images/s of a full train step
(forward, loss, backward, optimiser step) on one uint8 batch: ``stage1`` as the project trains it (the
callback's requires_grad and BatchNorm modes), ``stage1_no_grad`` and ``stage1_inference_mode`` with the
backbone's forward under those context managers, ``stage1_cached_features`` the head alone on features
computed once (possible only without augmentation, since each epoch's crops differ), and ``stage2`` /
``all`` with the default share and the whole backbone trainable. It also reports whether stage 1's
forward records an autograd graph through the backbone. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from skinlesion.bench.training import build_classifier
from skinlesion.callbacks.finetune import TwoStageFinetuning


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench stages", description=__doc__)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args, _ = parser.parse_known_args(argv)
    return args


def _rate(step: Callable[[], None], batch_size: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    torch.manual_seed(0)
    module = build_classifier(args.model, image_size=args.size).train()
    images = module.normalize(torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8))
    labels = torch.arange(args.batch_size) % 7
    model = module.backbone
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss = module._loss(forward(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    def frozen(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            with context():
                features = model.forward_features(images)
            return model.forward_head(features.clone() if context is torch.inference_mode else features)

        return forward

    results: dict[str, float | bool | str] = {"model": args.model, "size": args.size, "batch_size": args.batch_size}
    TwoStageFinetuning(unfreeze_at_epoch=1).apply(module, 0)  # stage 1: the head alone
    results["stage1_records_backbone_graph"] = model.forward_features(images).grad_fn is not None
    variants = {
        "stage1": lambda: module(images),
        "stage1_no_grad": frozen(torch.no_grad),
        "stage1_inference_mode": frozen(torch.inference_mode),
    }
    for name, forward in variants.items():
        results[name] = _rate(step(forward), args.batch_size, args.steps, args.warmup)
    with torch.no_grad():
        cached = model.forward_features(images)
    results["stage1_cached_features"] = _rate(
        step(lambda: model.forward_head(cached)), args.batch_size, args.steps * 10, args.warmup
    )
    for name, callback in (("stage2", TwoStageFinetuning(unfreeze_at_epoch=1)), ("all", None)):
        (callback or TwoStageFinetuning(unfreeze_at_epoch=0)).apply(module, 1)
        results[name] = _rate(step(lambda: module(images)), args.batch_size, args.steps, args.warmup)
    for key, value in results.items():
        print(f"{key:32s} {value:.1f} images/s" if isinstance(value, float) else f"{key:32s} {value}")
    return results
