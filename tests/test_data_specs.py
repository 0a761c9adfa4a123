"""The data sub-settings (split, cache, test_set, augment) are typed, with each default in one place,
checked once, read from checkpoints written before the types, and saved as the YAML's shape."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.specs import AugmentSpec, CacheSpec, SplitSpec, TestSetSpec
from skinlesion.data.transforms import train_transform
from skinlesion.errors import ConfigError
from skinlesion.inference.model import InferenceModel

from conftest import compose_config

PRE = Preprocessing(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.8)  # resize_size 80
SPECS = (SplitSpec, CacheSpec, AugmentSpec)  # TestSetSpec has no default root: tested on its own


@pytest.mark.parametrize("spec", SPECS)
def test_an_absent_or_null_setting_takes_the_specs_own_default(spec: type) -> None:
    every_key_null = dict.fromkeys((f.name for f in fields(spec)), None)
    assert spec.from_config(None) == spec.from_config({}) == spec.from_config(every_key_null) == spec()


def test_an_external_test_set_is_auto_detected_and_read_as_its_test_subset_unless_set() -> None:
    default = TestSetSpec.from_config({"root": "isic", "layout": None})
    assert default == TestSetSpec.from_config({"root": "isic"}) == TestSetSpec("isic", layout="auto", subset="Test")


def test_the_yaml_spells_out_the_specs_defaults_and_no_others(tmp_path: Path) -> None:
    """conf/data documents the defaults for its readers; a value there that differs would be a second default."""
    data = compose_config("train", [f"paths.root_dir={tmp_path}"]).data
    assert SplitSpec.from_config(data.split) == SplitSpec()
    assert CacheSpec.from_config(data.cache) == CacheSpec(dir=data.cache.dir)


def test_a_null_split_fraction_is_the_strategys_and_is_saved_as_a_number() -> None:
    assert SplitSpec().to_dict() == {
        "strategy": "lesion_grouped",
        "val": 0.15,
        "test": 0.15,
        "seed": 42,
        "num_folds": None,
        "fold": None,
    }
    original = SplitSpec.from_config({"strategy": "image_stratified"})
    assert (original.val, original.test) == (0.2, 0.0)  # the notebook's 80/20 split, no internal test split


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"strategy": "by_patient"}, "unknown data.split.strategy 'by_patient'; choose one of lesion_grouped, "
         "image_stratified"),
        ({"val": 0.5, "test": 0.5}, "data.split.val + data.split.test = 1 leaves nothing to train on"),
        ({"fold": 1}, "data.split.fold=1 needs data.split.num_folds (k-fold cross-validation)"),
        ({"num_folds": 5, "fold": 5}, "data.split.fold=5 must be in 0..4 for num_folds=5"),
        ({"num_folds": 1, "fold": 0}, "data.split.num_folds=1 must be at least 2"),
        ({"test": -0.1}, "data.split.test=-0.1 must be 0 (no test split) or a fraction between 0 and 1"),
    ],
)  # fmt: skip
def test_impossible_split_settings_are_refused_with_the_setting_named(split: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SplitSpec.from_config(split)
    assert str(info.value) == message
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        SplitSpec(**split)  # built directly, it is checked just the same


@pytest.mark.parametrize(
    ("spec", "values", "message"),
    [
        (AugmentSpec, {"rotation": 90, "blur": 3}, "unknown data.augment key(s) blur, rotation; known: brightness, "
         "contrast, cutmix, erase, hair, hflip, hue, mix_prob, mix_switch_prob, mixup, randaugment, rotate, "
         "saturation, shift, trivial_augment, vflip, zoom"),
        (SplitSpec, {"seeds": 1}, "unknown data.split key(s) seeds; known: fold, num_folds, seed, strategy, test, val"),
        (CacheSpec, {"path": "x"}, "unknown data.cache key(s) path; known: dir, enabled, size"),
        (TestSetSpec, {"root": "x", "split": "Test"}, "unknown data.test_set key(s) split; known: layout, root, "
         "subset"),
    ],
)  # fmt: skip
def test_a_misspelt_key_is_refused_naming_the_known_ones(spec: type, values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec.from_config(values)
    assert str(info.value) == message


@pytest.mark.parametrize("test_set", [{}, {"layout": "isic2018"}, {"root": None, "subset": "Test"}])
def test_an_external_test_set_needs_a_root_and_null_means_none(test_set: dict) -> None:
    with pytest.raises(ConfigError) as info:
        TestSetSpec.from_config(test_set)
    assert str(info.value) == "data.test_set needs a root (the folder of the external test set)"
    assert TestSetSpec.from_config(None) is None


def test_cache_false_is_short_for_cache_disabled() -> None:
    assert CacheSpec.from_config(False) == CacheSpec(enabled=False)
    assert CacheSpec.from_config(True) == CacheSpec()


def test_augmentation_is_off_unless_set_and_false_or_null_is_off() -> None:
    off = AugmentSpec()
    mixing_shares = {"mix_prob", "mix_switch_prob"}  # how mixup/CutMix mix, once one of them is on
    assert not any(getattr(off, f.name) for f in fields(AugmentSpec) if f.name not in mixing_shares)
    assert AugmentSpec.from_config(False) == AugmentSpec.from_config({"rotate": False, "hflip": None}) == off
    typed = AugmentSpec.from_config({"rotate": 90, "hflip": 1})  # as a YAML or an old checkpoint may write them
    assert typed.rotate == 90.0 and isinstance(typed.rotate, float) and typed.hflip is True
    as_dict, as_spec = train_transform(PRE, typed.to_dict()), train_transform(PRE, typed)
    assert repr(as_dict) == repr(as_spec)


SET = {
    SplitSpec: {"strategy": "image_stratified", "val": 0.1, "test": 0.2, "seed": 7, "num_folds": 4, "fold": 3},
    CacheSpec: {"enabled": False, "dir": "/tmp/cache", "size": 300},
    AugmentSpec: {"rotate": 45.0, "zoom": 0.2, "shift": 0.0, "brightness": 0.1, "contrast": 0.0, "hflip": True,
                  "vflip": False, "hue": 0.02, "saturation": 0.3, "randaugment": 9.0, "trivial_augment": False,
                  "hair": 0.5, "erase": 0.25, "mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.8, "mix_switch_prob": 0.5},
    TestSetSpec: {"root": "/data/ISIC2018", "layout": "isic2018", "subset": "Validation"},
}  # fmt: skip


@pytest.mark.parametrize("spec", SET)
def test_to_dict_is_the_yamls_shape_and_reads_back_to_the_same_spec(spec: type) -> None:
    built = spec.from_config(SET[spec])
    assert built.to_dict() == SET[spec]
    assert json.loads(json.dumps(built.to_dict())) == SET[spec]  # plain values: a checkpoint loads weights_only
    assert spec.from_config(built.to_dict()) == built and spec.from_config(built) is built


def test_the_datamodule_saves_every_sub_setting_filled_in_and_rebuilds_the_same_from_it(tmp_path: Path) -> None:
    dm = SkinLesionDataModule(str(tmp_path), split={"seed": 7}, cache=False, augment={"rotate": 90})
    saved = dict(dm.hparams)
    assert saved["split"] == SplitSpec(seed=7).to_dict()
    assert saved["cache"] == {"enabled": False, "dir": "data/cache", "size": None}
    assert saved["augment"] == AugmentSpec(rotate=90).to_dict() and saved["test_set"] is None
    again = SkinLesionDataModule(**saved)
    assert dict(again.hparams) == saved
    assert (again.split_spec, again.cache_spec, again.augment_spec) == (dm.split_spec, dm.cache_spec, dm.augment_spec)


def test_with_an_external_test_set_the_main_data_gets_no_test_split(tmp_path: Path) -> None:
    dm = SkinLesionDataModule(str(tmp_path), test_set={"root": str(tmp_path / "isic")})
    assert dm.split_spec.test == 0.15 and dm.split_settings.test == 0.0  # saved as configured, drawn without test
    assert dm.hparams.test_set == {"root": str(tmp_path / "isic"), "layout": "auto", "subset": "Test"}


# What the DataModule saved before the typed settings: the split filled in, the rest as the config gave them.
OLD_CHECKPOINT_SETTINGS = [
    {"cache": False, "augment": None, "test_set": None},
    {"cache": {"dir": "data/cache"}, "augment": {"rotate": 90, "hflip": True}, "test_set": {"root": "isic"}},
    {"cache": {"enabled": True, "dir": "data/cache", "size": 96}, "augment": {"zoom": 0, "vflip": False}},
    {"cache": None},  # keys missing altogether
]


@pytest.mark.parametrize("old", OLD_CHECKPOINT_SETTINGS)
def test_settings_saved_before_the_typed_specs_are_accepted(tmp_path: Path, old: dict) -> None:
    split = {"strategy": "lesion_grouped", "val": 0.15, "test": 0.15, "seed": 42}  # an older version: no folds
    saved = {"root": str(tmp_path), "layout": "auto", "subset": "Training", "split": split, **old}
    dm = SkinLesionDataModule(**saved, preprocessing=PRE)
    assert dm.split_spec == SplitSpec()
    assert dm.cache_spec == CacheSpec.from_config(old.get("cache"))
    assert dm.augment_spec == AugmentSpec.from_config(old.get("augment"))
    assert dm.test_set_spec == TestSetSpec.from_config(old.get("test_set"))


@pytest.mark.parametrize(
    ("cache", "side"), [(None, 80), (False, 80), ({"dir": "x"}, 80), ({"enabled": False, "size": 96}, 96)]
)
def test_new_images_are_resized_first_to_the_side_the_datamodule_cached_them_at(
    tmp_path: Path, cache: dict | bool | None, side: int
) -> None:
    """``InferenceModel.source_size`` (predict, explain, export) and the DataModule ask the one CacheSpec."""
    dm = SkinLesionDataModule(str(tmp_path), cache=cache, preprocessing=PRE)
    model = SimpleNamespace(preprocessing=PRE)
    from_checkpoint = InferenceModel(model, tmp_path / "best.ckpt", dict(dm.hparams))
    written_before = InferenceModel(model, tmp_path / "old.ckpt", {} if cache is None else {"cache": cache})
    assert dm.image_cache_size == from_checkpoint.source_size == written_before.source_size == side
