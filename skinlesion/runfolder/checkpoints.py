"""Loading the checkpoints this project writes, with a clear message for a wrong or corrupt file.

A checkpoint carries everything needed to rebuild its model without the config that trained it: the
backbone spec, the preprocessing, the class names, the class weights and the fitted temperature.
"""

from __future__ import annotations

from pathlib import Path

import torch

from skinlesion.errors import CheckpointError
from skinlesion.models.module import SkinLesionClassifier

COMPILED_PREFIX = "_orig_mod."


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:  # tensors and plain containers only: loading a checkpoint never runs code from it; memory-mapped,
        # so reading the hyper-parameters of a large resume checkpoint does not read all its tensors
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, pickle garbage, wrong file type, foreign objects
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors, which are not loaded for safety; "
                "it was not written by skinlesion"
            ) from err
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(err).__name__}); the file is corrupt or truncated — "
            "use another one from the run's checkpoints/ folder"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    if "model" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: not a skinlesion checkpoint (no model hyper-parameters)")
    return checkpoint


def checkpoint_backbone(checkpoint: dict) -> str:
    return checkpoint["hyper_parameters"]["model"]["name"]


def check_backbone(checkpoint: dict, expected: str, path: str | Path) -> None:
    found = checkpoint_backbone(checkpoint)
    if found != expected:
        raise CheckpointError(
            f"{path} was trained with backbone {found}, but model={expected} is configured; "
            f"pass model={found} or a checkpoint of {expected}"
        )


def classifier_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> SkinLesionClassifier:
    """The trained model in eval mode, built without downloading anything (its weights are in the file)."""
    hparams = dict(checkpoint["hyper_parameters"])
    hparams["model"] = {**hparams["model"], "pretrained": False, "weights": None}
    hparams["compile"] = False
    model = SkinLesionClassifier(**hparams)
    state = {k.replace(COMPILED_PREFIX, ""): v for k, v in checkpoint["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit {checkpoint_backbone(checkpoint)} ({str(err)[:200]})"
        ) from err
    return model.eval()


def load_classifier(path: str | Path) -> SkinLesionClassifier:
    return classifier_from_checkpoint(read_checkpoint(path), path)
