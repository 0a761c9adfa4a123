"""Metadata fusion (``metadata=fusion``): the fixed encoding, field dropout, the head's place in the recipe,
old checkpoints, and one model trained, evaluated (with and without metadata), predicted, explained, exported
and (slow) resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_evaluate import make_isic_test_set

from skinlesion.callbacks.finetune import TwoStageFinetuning
from skinlesion.config import CONFIG_DIR
from skinlesion.data.layouts import HAM_LOCALIZATIONS, load_records
from skinlesion.data.metadata import MetadataSpec, warn_if_no_metadata
from skinlesion.errors import ConfigError, DataError
from skinlesion.evaluate import evaluate
from skinlesion.explain import explain
from skinlesion.export import export
from skinlesion.labels import CLASSES
from skinlesion.models.backbone import head_parameters
from skinlesion.models.fusion import MetadataFusionHead
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.models.optim import param_groups
from skinlesion.predict import predict
from skinlesion.runfolder.checkpoints import load_classifier

from conftest import USER_TINY, compose_config, random_checkpoint, run_cli, run_user, tiny_train_overrides

PROBS = [f"prob_{c}" for c in CLASSES]
# metadata=fusion's settings: the option's only defaults
FUSION = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "metadata" / "fusion.yaml"))["module"]["metadata"]


def mobilenet(**kwargs) -> SkinLesionClassifier:
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "mobilenetv2.yaml"))
    return SkinLesionClassifier(model={**spec, "pretrained": False}, image_size=32, **kwargs)


def test_encoding_is_fixed_and_marks_missing_and_unknown_values() -> None:
    spec = MetadataSpec.from_config(FUSION)
    frame = pd.DataFrame(
        {
            "age": ["45.0", "", "abc", "200"],
            "sex": ["male", "", "FEMALE ", "x"],
            "localization": ["face", "lip", "", "back"],
        }
    )
    encoded = spec.encode(frame)
    assert encoded.shape == (4, 2 + 3 + len(HAM_LOCALIZATIONS)) == (4, spec.width)
    np.testing.assert_allclose(encoded[:, :2], [[0.45, 0], [0, 1], [0, 1], [0, 1]], rtol=1e-6)  # /100, missing flag
    sex = encoded[:, 2:5]
    assert [spec.sexes[i] for i in sex.argmax(1)] == ["male", "unknown", "female", "unknown"]
    assert (sex.sum(1) == 1).all()
    site = encoded[:, 5:]
    assert [spec.sites[i] for i in site.argmax(1)] == ["face", "unknown", "unknown", "back"]  # unseen 'lip' too
    # A set without the columns (the ISIC 2018 layout) is all missing, row for row the missing vector.
    bare = spec.encode(pd.DataFrame(index=range(3)))
    assert (bare == spec.missing_row()).all()
    # Only the chosen fields, and the vocabulary travels with the settings (a checkpoint's, not today's).
    ages = MetadataSpec.from_config({**FUSION, "fields": ["age"]})
    assert ages.encode(frame).shape == (4, 2)
    assert MetadataSpec.from_config(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fields": ["age", "height"]}, "fields"),
        ({"fields": []}, "fields"),
        ({"field_dropout": 1.0}, "field_dropout"),
        ({"drop_all": -0.1}, "drop_all"),
        ({"drop_all": 1.0}, "drop_all"),
        ({"hidden": 0}, "hidden"),
        ({"hidden": None}, "module.metadata.hidden is not set"),
        ({"color": 1}, "unknown module.metadata setting"),
    ],
)
def test_bad_metadata_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MetadataSpec.from_config({**FUSION, **values})


def test_field_dropout_drops_whole_fields_in_training_and_never_in_eval() -> None:
    spec = MetadataSpec.from_config({**FUSION, "field_dropout": 0.5, "drop_all": 0})
    head = MetadataFusionHead(spec, num_features=4, num_classes=7)
    seen = []
    head.embed.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    metadata = torch.from_numpy(spec.encode(pd.DataFrame({"age": ["50"] * 400, "sex": "male", "localization": "face"})))
    features = torch.randn(400, 4)
    head.train()(features, metadata)
    head.eval()(features, metadata)
    trained, evaluated = seen
    assert torch.equal(evaluated, metadata)
    missing = torch.from_numpy(spec.missing_row())
    for start, stop in spec.field_slices():
        dropped = (trained[:, start:stop] == missing[start:stop]).all(1)
        kept = (trained[:, start:stop] == metadata[:, start:stop]).all(1)
        assert (dropped | kept).all()  # a field is replaced whole or not at all
        assert 0.35 < dropped.float().mean() < 0.65


def test_drop_all_gives_training_rows_exactly_the_vector_of_an_image_without_metadata() -> None:
    spec = MetadataSpec.from_config({**FUSION, "field_dropout": 0, "drop_all": 0.3})
    head = MetadataFusionHead(spec, num_features=4, num_classes=7).train()
    known = pd.DataFrame({"age": ["50"] * 1000, "sex": "male", "localization": "face"})
    dropped = head.drop_fields(torch.from_numpy(spec.encode(known)))
    absent = torch.from_numpy(spec.encode(pd.DataFrame(index=range(1))))[0]  # the ISIC 2018 layout, no CSV
    whole = (dropped == absent).all(1)
    assert torch.equal(whole | (dropped == torch.from_numpy(spec.encode(known))).all(1), torch.ones(1000, dtype=bool))
    assert 0.25 < whole.float().mean() < 0.35  # rows lose all their fields together, at drop_all's rate


def test_a_metadata_checkpoint_saved_before_drop_all_loads_without_it(tmp_path: Path) -> None:
    model = mobilenet(metadata=FUSION)
    hparams = dict(model.hparams) | {"metadata": {k: v for k, v in model.hparams.metadata.items() if k != "drop_all"}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    loaded = load_classifier(tmp_path / "old.ckpt")
    assert loaded.metadata_spec.drop_all == 0 and loaded.backbone.get_classifier().drop_all == 0  # as it trained
    assert model.metadata_spec.drop_all == FUSION["drop_all"] > 0


def test_a_metadata_model_without_any_metadata_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    spec = MetadataSpec.from_config(FUSION)
    warn_if_no_metadata(spec, spec.encode(pd.DataFrame({"age": ["", "abc"]})), "2 image(s)")
    assert caplog.text.count("temperature and clinical thresholds were fitted") == 1
    caplog.clear()
    warn_if_no_metadata(spec, spec.encode(pd.DataFrame({"age": ["", "60"]})), "2 image(s)")  # one has an age
    warn_if_no_metadata(None, None, "an image-only model")
    assert not caplog.text


def test_the_metadata_mlp_and_fusion_classifier_are_the_head_of_the_two_stage_recipe() -> None:
    model = mobilenet(metadata=FUSION)
    head = model.backbone.get_classifier()
    assert isinstance(head, MetadataFusionHead)
    fusion = {id(p) for p in head.parameters()}
    assert fusion == {id(p) for p in head_parameters(model.backbone)}
    assert any(id(p) in fusion for p in head.embed.parameters())
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model.backbone, 1e-4)}
    assert groups["head"] | groups["head/no_decay"] == fusion
    assert not fusion & (groups["backbone"] | groups["backbone/no_decay"])
    finetune = TwoStageFinetuning(unfreeze_at_epoch=1, num_blocks=1, backbone_lr=1e-4)
    finetune.apply(model.train(), epoch=0)  # stage 1: the head alone
    assert {id(p) for p in model.parameters() if p.requires_grad} == fusion
    # Every image-only path still works: no metadata is the encoding of a set without metadata columns, and
    # metadata that is known reaches the logits.
    images = torch.randn(2, 3, 32, 32)
    spec = model.metadata_spec
    absent = torch.from_numpy(spec.encode(pd.DataFrame(index=range(2))))
    known = torch.from_numpy(spec.encode(pd.DataFrame({"age": ["80", "20"], "sex": "male", "localization": "face"})))
    assert torch.equal(model.eval()(images), model(images, absent))
    assert not torch.equal(model(images), model(images, known))


def test_a_checkpoint_saved_before_metadata_loads_as_an_image_only_model(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "old.ckpt", "mobilenetv2", 32)
    saved = torch.load(checkpoint, weights_only=True)
    del saved["hyper_parameters"]["metadata"]  # as written before the option existed
    torch.save(saved, checkpoint)
    model = load_classifier(checkpoint)
    assert model.metadata_spec is None
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model.predict_proba(images).sum(1), torch.ones(2))


def test_the_synthetic_set_draws_metadata_that_depends_on_the_diagnosis(synthetic_root: Path) -> None:
    records = load_records(synthetic_root)
    age = pd.to_numeric(records["age"], errors="coerce").groupby(records["dx"]).mean()
    assert age["nv"] + 10 < age["akiec"]
    sites = records.groupby("dx")["localization"].agg(lambda s: s.value_counts(normalize=True).index[0])
    assert sites["df"] == "lower extremity"


@pytest.mark.slow  # two minutes on 2 cores; the unit tests above cover each piece
def test_metadata_model_trains_evaluates_predicts_explains_and_exports(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    overrides = [*tiny_train_overrides(tmp_path, synthetic_root, cache_dir), "metadata=fusion"]
    overrides += ["+trainer.limit_train_batches=3", "gallery.enabled=true", "gallery.per_class=1"]
    result = run_cli(tmp_path, "skinlesion.train", *overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "best.ckpt"
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["metadata"]["fields"] == ["age", "sex", "site"]
    assert list((run / "gradcam").glob("gallery_*.png"))  # the training gallery fed the batch's metadata

    base = [f"paths.root_dir={tmp_path}", "clinical.figures=false", f"ckpt_path={checkpoint}"]
    own = evaluate(compose_config("evaluate", [*base, f"paths.output_dir={tmp_path / 'eval'}"]))
    logged = json.loads((run / "metrics.json").read_text())["metrics"]
    assert own.metrics["test/balanced_acc"] == pytest.approx(logged["test/balanced_acc"], abs=1e-6)

    # The ISIC 2018 layout has no metadata: every field missing, still valid probabilities.
    isic = tmp_path / "ISIC2018"
    make_isic_test_set(isic, synthetic_root)
    external = [f"data.test_set.root={isic}", "data.test_set.layout=isic2018", "tta=true", "tta_views=2"]
    evaluate(compose_config("evaluate", [*base, f"paths.output_dir={tmp_path / 'isic'}", *external]))
    probs = pd.read_csv(tmp_path / "isic" / "predictions_test.csv")[PROBS]
    assert probs.notna().all().all() and np.allclose(probs.sum(1), 1, atol=1e-4)

    photos = isic / "ISIC2018_Task3_Test_Input"
    table = tmp_path / "meta.csv"
    names = sorted(p.stem for p in photos.iterdir())
    pd.DataFrame({"image_id": names, "age": 80, "sex": "male", "localization": "face"}).to_csv(table, index=False)
    common = [f"paths.root_dir={tmp_path}", f"ckpt_path={checkpoint}", f"input={photos}", "device=cpu", "tta=true"]
    without = predict(compose_config("predict", [*common, f"paths.output_dir={tmp_path / 'p0'}"]))
    with_table = predict(
        compose_config("predict", [*common, f"metadata_csv={table}", f"paths.output_dir={tmp_path / 'p1'}"])
    )
    assert np.allclose(with_table[PROBS].sum(1), 1, atol=1e-4)
    assert not np.allclose(with_table[PROBS], without[PROBS], atol=1e-6)  # the metadata reached the model
    assert json.loads((tmp_path / "p1" / "predict.json").read_text())["metadata"]["images_listed"] == len(names)

    shown = explain(compose_config("explain", [*common[:2], f"paths.output_dir={tmp_path / 'x'}", "split=test",
                                               "per_class=1", "device=cpu"]))  # fmt: skip
    assert shown["images"] > 0 and shown["figures"]
    images = [f"images={photos}", "n=2", f"metadata_csv={table}", "device=cpu"]
    pictured = explain(compose_config("explain", [*common[:2], f"paths.output_dir={tmp_path / 'y'}", *images]))
    assert pictured["images"] == 2 and pictured["failed"] == 0

    exported = export(compose_config("export", [*common[:2], f"paths.output_dir={tmp_path / 'onnx'}"]))
    assert exported["parity"]["max_abs_diff"] < 1e-4
    sidecar = json.loads(Path(exported["json"]).read_text())
    assert sidecar["metadata"]["shape"] == ["batch", MetadataSpec.from_config(FUSION).width]


def test_metadata_csv_is_refused_for_an_image_only_model_and_must_name_images(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "ckpt" / "best.ckpt", "mobilenetv2", 32)
    table = tmp_path / "meta.csv"
    pd.DataFrame({"age": [50]}).to_csv(table, index=False)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"")
    args = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'p'}", f"ckpt_path={checkpoint}"]
    with pytest.raises(ConfigError, match="trained without metadata"):
        predict(compose_config("predict", [*args, f"input={photo}", f"metadata_csv={table}"]))
    model = mobilenet(metadata=FUSION)
    fused = tmp_path / "fused.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, fused)
    args[-1] = f"ckpt_path={fused}"
    with pytest.raises(DataError, match="no image_id column"):
        predict(compose_config("predict", [*args, f"input={photo}", f"metadata_csv={table}"]))
    # explain reads a split's metadata from its dataset: a metadata_csv there would be ignored, so it is refused
    explained = [*args[:-1], f"paths.output_dir={tmp_path / 'x'}", "split=val", f"metadata_csv={table}"]
    with pytest.raises(ConfigError, match=r"^metadata_csv=.* is for images=\.\.\.; a split is explained"):
        explain(compose_config("explain", [*explained, f"ckpt_path={fused}"]))
    assert not (tmp_path / "x").exists()


def fusion_checkpoint_and_photos(tmp_path: Path, names: list[str]) -> tuple[Path, list[Path]]:
    """An untrained metadata model's checkpoint and random PNG photos in one folder."""
    model = mobilenet(metadata=FUSION)
    fused = tmp_path / "fused.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, fused)
    (tmp_path / "photos").mkdir()
    photos = [tmp_path / "photos" / f"{name}.png" for name in names]
    for photo in photos:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(photo)
    return fused, photos


def test_predict_without_metadata_csv_warns_that_a_metadata_model_sees_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fused, (photo,) = fusion_checkpoint_and_photos(tmp_path, ["photo"])
    args = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'p'}", f"ckpt_path={fused}", f"input={photo}"]
    frame = predict(compose_config("predict", [*args, "device=cpu"]))
    assert len(frame) == 1 and frame["error"].fillna("").eq("").all()
    assert caplog.text.count("no image has metadata") == 1


def test_predict_names_unlisted_files_and_values_the_encoding_cannot_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fused, (photo, *_) = fusion_checkpoint_and_photos(tmp_path, ["a", "b", "c"])
    photos = photo.parent
    table = tmp_path / "meta.csv"
    table.write_text("image_id,age,sex,localization\na,abc,female,back\nb.png,45,femme,bakc\n")
    args = [f"paths.root_dir={tmp_path}", f"ckpt_path={fused}", f"input={photos}", "device=cpu"]
    predict(compose_config("predict", [*args, f"paths.output_dir={tmp_path / 'p1'}", f"metadata_csv={table}"]))
    assert "does not list 1 of 3 image(s) (first: c.png)" in caplog.text
    assert "3 value(s) not understood" in caplog.text and "age='abc', sex='femme', localization='bakc'" in caplog.text
    caplog.clear()
    listed = tmp_path / "listed.csv"
    listed.write_text("image_id,age,sex,localization\na,30,male,back\nb,45,female,UNKNOWN\nc,,,\n")
    predict(compose_config("predict", [*args, f"paths.output_dir={tmp_path / 'p2'}", f"metadata_csv={listed}"]))
    assert "does not list" not in caplog.text and "not understood" not in caplog.text


@pytest.mark.slow
def test_a_metadata_run_resumes_from_its_checkpoint_alone(tmp_path: Path) -> None:
    first = run_user(tmp_path, "python", "-m", "skinlesion.train", *USER_TINY, "metadata=fusion")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    resumed = run_user(tmp_path, "python", "-m", "skinlesion.train", f"ckpt_path={last}", "trainer.max_epochs=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # metadata=fusion replayed: nothing changed
    assert len(pd.read_csv(run / "history.csv")) == 3
    assert torch.load(last, weights_only=True)["hyper_parameters"]["metadata"] is not None
    changed = run_user(tmp_path, "python", "-m", "skinlesion.train", f"ckpt_path={last}", "trainer.max_epochs=4",
                       "module.metadata.hidden=8")  # fmt: skip
    assert changed.returncode == 2 and "module.metadata.hidden" in changed.stderr
