"""Probabilities of one model or several on a split of a run's data, matched to the run's ``split.csv``.

``evaluate`` scores them and ``explain`` draws them; both read a split the same way: the checkpoint's own
preprocessing, a synthetic set never regenerated, and the split checked against what the run recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from skinlesion.data.datamodule import SPLIT_FILE, SkinLesionDataModule
from skinlesion.data.metadata import MetadataSpec, warn_if_no_metadata
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.splits import check_disjoint, check_same_split, read_run_split
from skinlesion.errors import ConfigError, DataError
from skinlesion.inference.model import InferenceModel
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.inference.tta import ViewPlan, predict_proba_tta
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.runfolder.files import CHECKPOINT_DIR

log = logging.getLogger(__name__)

SCORED_SPLITS = ("val", "test")  # the splits a trained run can be scored on (train is what it learned from)


def datamodule_for(
    settings: dict,
    preprocessing: Preprocessing,
    split: str,
    split_file: Path | None = None,
    metadata: MetadataSpec | None = None,
) -> SkinLesionDataModule:
    """The data of ``split`` as the model sees it (``metadata``: a metadata model's encoding, from the dataset's
    own metadata); ``split_file``: that run's recorded split, not a rebuilt one. A synthetic set is never
    generated here: a moved one must not be replaced by a new set."""
    settings = {**settings, "image_size": preprocessing.image_size}  # the model decides, not the training data config
    # An external test set is read on its own: evaluating a downloaded checkpoint on the ISIC 2018 test
    # set must not need the data it was trained on (nor spend minutes checking and caching it).
    external = split == "test" and bool(settings.get("test_set"))
    datamodule = SkinLesionDataModule(
        **settings,
        preprocessing=preprocessing,
        test_set_only=external,
        generate_synthetic=False,
        split_file=str(split_file) if split_file else None,
        metadata=metadata,
    )
    datamodule.setup("test")
    if split not in datamodule.datasets:
        hint = "data.split.test was 0 in training; use split=val or an external set (data.test_set.root=...)"
        raise ConfigError(f"there is no '{split}' split in this data{'; ' + hint if split == 'test' else ''}")
    source = settings["test_set"]["root"] if external else settings.get("root")
    warn_if_no_metadata(metadata, datamodule.datasets[split].metadata, f"{split} images of {source}")
    return datamodule


@torch.no_grad()
def predict_split(
    model: SkinLesionClassifier,
    datamodule: SkinLesionDataModule,
    split: str,
    device: torch.device,
    views: ViewPlan,
    calibrated: bool,
) -> SplitPredictions:
    """Probabilities of one model on one split (averaged over ``views``: test-time augmentation), in record order."""
    model.to(device)
    probs, labels, indices = [], [], []
    for batch in datamodule.eval_dataloader(split):
        metadata = batch["metadata"].to(device) if "metadata" in batch else None
        probs.append(predict_proba_tta(model, batch["image"].to(device), views, calibrated, metadata).float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    return SplitPredictions.in_record_order(torch.cat(probs), torch.cat(labels), torch.cat(indices))


def run_split_file(member: InferenceModel) -> Path | None:
    """The ``split.csv`` of the run folder the checkpoint sits in (None, with a warning, when it was moved)."""
    split_file = member.path.parent.parent / SPLIT_FILE
    if member.path.parent.name != CHECKPOINT_DIR or not split_file.is_file():
        log.warning("%s: no %s beside the checkpoint; its split was not checked", member.path, SPLIT_FILE)
        return None
    return split_file


def check_external_unseen(members: dict[str, InferenceModel], external: pd.DataFrame, source: str) -> list[str]:
    """An external test set must hold no image or lesion a member learned from (its run's split.csv says which);
    the ``split.csv`` files it was checked against (a moved checkpoint has none)."""
    checked = []
    for member in members.values():
        if (split_file := run_split_file(member)) is not None:
            seen = read_run_split(split_file)
            check_disjoint(seen[seen["split"] != "test"], external, f"{source} (against {split_file})")
            checked.append(str(split_file))
    return checked


def listed_split_file(members: dict[str, InferenceModel], split: str) -> Path:
    """split_from=file: the one ``split.csv`` whose ``split`` images every member was scored on in training."""
    files = {}
    for name, member in members.items():
        if (split_file := run_split_file(member)) is None:
            raise DataError(f"split_from=file needs the run's {SPLIT_FILE} beside {name}'s checkpoints/ folder")
        files[split_file] = set(read_run_split(split_file).query("split == @split")["image_id"])
    first, *others = files
    if any(files[other] != files[first] for other in others):
        raise DataError(f"the members' {SPLIT_FILE} files list different {split} images; evaluate them one by one")
    return first


def _data_key(member: InferenceModel) -> tuple[Preprocessing, MetadataSpec | None]:
    """What decides the batches a member needs: its preprocessing and its metadata encoding."""
    return member.model.preprocessing, member.model.metadata_spec


def predict_members(
    members: dict[str, InferenceModel],
    settings: dict,
    split: str,
    device: torch.device,
    views: ViewPlan,
    calibrated: bool,
    split_from: str = "data",
) -> tuple[dict[str, SplitPredictions], pd.DataFrame, dict]:
    """Each member's predictions on the same records (one DataModule per distinct preprocessing), and how
    the records were checked against the runs' ``split.csv``."""
    external = split == "test" and bool(settings.get("test_set"))
    listed = listed_split_file(members, split) if split_from == "file" and not external else None
    datamodules: dict[tuple, SkinLesionDataModule] = {}  # one per (preprocessing, metadata encoding)
    for member in members.values():
        key = pre, metadata = _data_key(member)
        if key not in datamodules:
            datamodules[key] = datamodule_for(settings, pre, split, listed, metadata)
    first_datamodule = next(iter(datamodules.values()))
    records = first_datamodule.records
    if external:  # checked before minutes of predicting
        disjoint_from = check_external_unseen(members, records, str(settings["test_set"]["root"]))
        split_check = {"split_from": "external set", "disjoint_from": disjoint_from}
    elif listed is not None:
        split_check = first_datamodule.split_check
        log.info("%s: %d of the %d listed images found, %d not listed left out", listed, split_check["found"],
                 split_check["listed"], split_check["not_listed"])  # fmt: skip
    else:  # the run's own val/test: the data folder must still give the split each member was tested on
        checked = []
        for member in members.values():
            if (split_file := run_split_file(member)) is not None:
                check_same_split(datamodules[_data_key(member)].records, split_file)
                checked.append(str(split_file))
        split_check = {"split_from": "data", "same_as": checked}
    results = {}
    for name, member in members.items():
        datamodule = datamodules[_data_key(member)]
        results[name] = predict_split(member.model, datamodule, split, device, views, calibrated)
        log.info("%s: %d %s images", name, len(results[name].indices), split)
    first_name, first = next(iter(results.items()))
    for name, result in results.items():
        theirs = datamodules[_data_key(members[name])].records
        same_images = list(result.records_of(theirs)["image_id"]) == list(first.records_of(records)["image_id"])
        if not (same_images and torch.equal(result.labels, first.labels)):
            raise DataError(f"ensemble member {name} saw other {split} images than {first_name}")
    return results, records, split_check
