"""Lightning overhead: the project's LightningModule + Trainer against a plain PyTorch loop.

    python -m skinlesion.bench overhead [--model mobilenetv2] [--size 64] [--batch-size 32] [--steps 60]

Both paths train the same freshly seeded :class:`SkinLesionClassifier` (every parameter trainable,
BatchNorm training) for the same steps over the same in-memory uint8 batches and DataLoader, with the
optimiser from ``configure_optimizers``. The plain loop does only normalise, forward, loss, backward and
step; the Lightning path runs ``training_step`` (which also logs the loss and updates the training
metrics) under a Trainer configured as ``conf/trainer/default.yaml`` (CSV logger every 10 steps,
progress bar) with the project's finetuning and history callbacks. The steady-state time of the steps
after ``--warmup`` is compared; the paths alternate ``--repeats`` times and the fastest repeat of each
counts, which discounts other processes on a shared machine. The process's CPU time is reported too:
with ``--threads 1`` it is the most stable figure where other jobs compete for the cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from skinlesion.bench.training import build_classifier
from skinlesion.callbacks.finetune import TwoStageFinetuning
from skinlesion.callbacks.history import TrainingHistory
from skinlesion.inference.model import resolve_device
from skinlesion.models.module import SkinLesionClassifier


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench overhead", description=__doc__)
    parser.add_argument("--model", default="mobilenetv2", help="a conf/model name")
    parser.add_argument("--size", type=int, default=64, help="image size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path, alternating")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    parser.add_argument("--no-progress-bar", action="store_true", help="Lightning without its progress bar")
    args, _ = parser.parse_known_args(argv)
    return args


def _loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    items = [{"image": images[i], "label": i % 7, "index": i} for i in range(n)]
    return DataLoader(items, batch_size=args.batch_size, shuffle=False, num_workers=0)


def _model(args: argparse.Namespace) -> SkinLesionClassifier:
    torch.manual_seed(0)
    return build_classifier(args.model, args.size)


def _clock() -> tuple[float, float]:
    """Wall and CPU time of this process: the CPU time does not count other processes' turns on a shared machine."""
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def plain_loop(args: argparse.Namespace, loader: DataLoader, device: torch.device, amp: bool) -> tuple[float, float]:
    """(wall, CPU) seconds for the steps after the warm-up, in a loop with nothing but the training step."""
    module = _model(args).to(device).train()
    module.configure_model()  # the same weight layout (channels_last on a GPU) as the Trainer gives it
    optimizer = module.configure_optimizers()
    start = _clock()
    for step, batch in enumerate(loader):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = _clock()
        images = module.normalize(batch["image"].to(device, non_blocking=True))
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = module._loss(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _elapsed(start)


class _StepTimer(Callback):
    """Wall time from the first step after the warm-up to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = _clock()
        self.elapsed = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.start = _clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.elapsed = _elapsed(self.start)


def lightning_loop(
    args: argparse.Namespace, loader: DataLoader, device: torch.device, amp: bool
) -> tuple[float, float]:
    timer = _StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision="bf16-mixed" if amp else "32-true",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=CSVLogger(out, name="logs", version=""),
            log_every_n_steps=10,
            enable_progress_bar=not args.no_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[
                TwoStageFinetuning(unfreeze_at_epoch=0, num_blocks="all", bn="train"),
                TrainingHistory(out),
                timer,
            ],
            default_root_dir=out,
        )
        trainer.fit(_model(args), train_dataloaders=loader)
    return timer.elapsed


def run(args: argparse.Namespace, device: torch.device) -> dict:
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    loader = _loader(args)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "lightning": []}
    for _ in range(args.repeats):
        times["plain"].append(plain_loop(args, loader, device, amp))
        times["lightning"].append(lightning_loop(args, loader, device, amp))
    timed_steps = args.steps - args.warmup

    def overhead(clock: int, pick) -> float:
        plain, lightning = (pick([t[clock] for t in times[k]]) for k in ("plain", "lightning"))
        return round(100 * (lightning / plain - 1), 2)

    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "timed_steps": timed_steps,
        "precision": "bf16-mixed" if amp else "32-true",
        "progress_bar": not args.no_progress_bar,
        "wall_s": {k: [round(t[0], 3) for t in v] for k, v in times.items()},
        "cpu_s": {k: [round(t[1], 3) for t in v] for k, v in times.items()},
        "step_ms": {k: round(1000 * min(t[0] for t in v) / timed_steps, 2) for k, v in times.items()},
        "overhead_pct": overhead(0, min),  # fastest repeat of each path
        "overhead_pct_median": overhead(0, statistics.median),
        "overhead_pct_cpu_time": overhead(1, min),  # CPU time: robust to other processes
    }
    print(
        f"{args.model} {args.size}px batch {args.batch_size}, {timed_steps} timed steps on {device} "
        f"({result['threads']} threads): plain {result['step_ms']['plain']} ms/step, Lightning "
        f"{result['step_ms']['lightning']} ms/step -> overhead {result['overhead_pct']}% (median of repeats "
        f"{result['overhead_pct_median']}%, CPU time {result['overhead_pct_cpu_time']}%)",
        flush=True,
    )
    return result


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args, resolve_device("auto"))
