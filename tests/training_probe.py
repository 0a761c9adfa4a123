"""A callback that records what a real ``python -m skinlesion.train`` run was wired with.

A test copies this file into the folder it runs the command in (``python -m`` imports from there) and adds
``+callbacks.probe._target_=training_probe.WiringProbe +callbacks.probe.output=<file>``: the command's own
module and DataModule are inspected, at no extra training.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
from lightning.pytorch.callbacks import Callback

from skinlesion.data.transforms import train_transform

NEW_IN_LOADER = {"hair": 0.0, "randaugment": 0, "trivial_augment": False, "erase": 0.0}  # each one off


class WiringProbe(Callback):
    def __init__(self, output: str) -> None:
        self.output = output
        self.found: dict = {"mixed_batches": 0, "soft_target_batches": 0}

    def on_train_start(self, trainer, pl_module) -> None:
        mixer = pl_module.mixer
        self.found["mixer"] = None if mixer is None else [mixer.mixup.mixup_alpha, mixer.mixup.cutmix_alpha]
        # The loader's transform against the same recipe without the new augmentations, on one seed.
        datamodule = trainer.datamodule
        dataset = datamodule.datasets["train"]
        loader_transform = copy.deepcopy(dataset.transform)  # its own random stream is left as training had it
        base = train_transform(
            datamodule.preprocessing, replace(datamodule.augment_spec, **NEW_IN_LOADER), datamodule.hparams.center_crop
        )
        image = dataset.load(0)
        differ = []
        for seed in range(4):
            loader_transform.set_random_seed(seed)
            base.set_random_seed(seed)
            differ.append(not np.array_equal(loader_transform(image=image)["image"], base(image=image)["image"]))
        self.found["loader_differs_from_base"] = differ
        if mixer is not None:
            pl_module.mixer = self._counting(mixer)

    def _counting(self, mixer):
        def mix(images, labels):
            images, targets = mixer(images, labels)
            self.found["mixed_batches"] += 1
            self.found["soft_target_batches"] += int((targets.max(dim=1).values < 1).any())
            return images, targets

        return mix

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.output, "w") as file:
            json.dump(self.found, file)
