"""``model_card.md``: a training run described from its own files, so it is never out of date.

Everything in it is read back from the run folder (``metrics.json``, ``config.yaml``, ``split.csv`` and
the clinical evaluation's CSV/JSON files) rather than passed in by the trainer: regenerating it from a
copied or older run folder gives the same card, and a number the card shows is the one the files hold.
Missing files (a run without a test split, an older run) leave their section saying so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from skinlesion.clinical.subgroups import AUDIT_METRIC_NAMES, AUDIT_METRICS
from skinlesion.data.datamodule import SKIPPED_FILE, SPLIT_FILE
from skinlesion.data.synthetic import GEOMETRY_FILE
from skinlesion.labels import CLASSES
from skinlesion.runfolder.files import CONFIG_FILE, atomic_write
from skinlesion.runfolder.summary import RunSummary

MODEL_CARD = "model_card.md"


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    text = _number(metrics.get(key))
    return text if low is None or high is None else f"{text} (95% CI {_number(low)}-{_number(high)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def trained_on_synthetic(config: Any) -> bool:
    """``data=synthetic``, or a set the synthetic generator wrote (its geometry file: real data has none)."""
    return config.data.get("synthetic") is not None or (Path(config.data.root) / GEOMETRY_FILE).is_file()


def _data_section(config: Any, run: Path) -> list[str]:
    data = config.data
    synthetic = trained_on_synthetic(config)
    source = "the synthetic HAM10000 look-alike (generated images, not patients)" if synthetic else f"`{data.root}`"
    lines = [
        "## Data and split",
        "",
        f"Trained on {source} (layout `{data.layout}`, split `{data.split.strategy}`, split seed {data.split.seed}).",
    ]
    if data.get("test_set"):
        lines[-1] += f" External test set: `{data.test_set.root}`."
    split_file = run / SPLIT_FILE
    if split_file.is_file():
        split = pd.read_csv(split_file, dtype=str)
        counts = (
            split.groupby(["split", "dx"]).size().unstack(fill_value=0).reindex(columns=list(CLASSES), fill_value=0)
        )
        lesions = split.groupby("split")["lesion_id"].nunique()
        rows = [
            [name, str(int(counts.loc[name].sum())), str(int(lesions[name])), *map(str, counts.loc[name])]
            for name in ("train", "val", "test")
            if name in counts.index
        ]
        lines += ["", *_table(["split", "images", "lesions", *CLASSES], rows)]
        lines += ["", "No lesion has photos in two splits (lesion-grouped split)."] * (
            data.split.strategy == "lesion_grouped"
        )
    return [*lines, ""]


def _recipe_section(config: Any, summary: RunSummary) -> list[str]:
    stages = summary.finetune or {}
    weights = summary.weights or ("ImageNet" if summary.pretrained else "random initialisation")
    lines = [
        "## Recipe",
        "",
        f"- backbone `{summary.backbone}` (timm `{summary.timm_name}`), {summary.params_total or 0:,} parameters, "
        f"input {summary.image_size} px, started from {weights}",
        f"- optimizer `{config.optimizer._target_.rsplit('.', 1)[-1]}` lr {config.optimizer.lr}, loss "
        f"`{config.loss._target_.rsplit('.', 1)[-1]}`, {summary.epochs} epoch(s), seed {summary.seed}",
        f"- checkpoint chosen on `{summary.monitor}` (best epoch {summary.best_epoch})",
    ]
    limit = config.trainer.get("limit_train_batches")
    if limit is not None:
        lines.append(f"- each epoch limited to {limit} training batches (`trainer.limit_train_batches`): a short run")
    if stages.get("stage2_backbone_share") is not None:
        lines.append(f"- stage 2 trained {stages['stage2_backbone_share']:.1%} of the backbone's parameters")
    return [*lines, *_options_lines(config, summary), ""]


def _options_lines(config: Any, summary: RunSummary) -> list[str]:
    """The toolkit options a run trained with (all off by default), so a card says what made its numbers."""
    lines = []
    metadata = config.module.get("metadata")
    if metadata:
        lines.append(f"- patient metadata fused with the image: {', '.join(metadata.fields)} (the model needs them)")
    if config.module.get("colour_constancy"):
        lines.append(f"- Shades of Gray colour constancy, p={config.module.colour_constancy}, applied inside the model")
    if config.finetune.get("layer_decay"):
        lines.append(f"- stage 2 with layer-wise learning-rate decay {config.finetune.layer_decay}")
    augment = config.data.get("augment") or {}
    extra = {
        k: augment[k] for k in ("mixup", "cutmix", "randaugment", "trivial_augment", "erase", "hair") if augment.get(k)
    }
    if extra:
        lines.append("- augmentation beyond the default: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    if summary.ema:
        lines.append(
            f"- the weights are an exponential moving average (decay {summary.ema.get('decay')}, "
            f"{summary.ema.get('updates')} updates), evaluated and shipped instead of the raw weights"
        )
    if summary.early_stopping:
        stopped = summary.early_stopping.get("stopped_epoch")
        when = f"stopped in epoch {stopped}" if stopped is not None else "never stopped the run"
        lines.append(f"- early stopping with patience {summary.early_stopping.get('patience')} from stage 2: {when}")
    return lines


def _split_counts(run: Path, split: str) -> dict[str, int]:
    """Images per class in ``split`` (split.csv), so that an interval over one image is read as such."""
    path = run / SPLIT_FILE
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype=str)
    return frame.loc[frame["split"] == split, "dx"].value_counts().to_dict()


def _headline_section(summary: RunSummary, split: str, counts: dict[str, int]) -> list[str]:
    metrics = summary.metrics
    resampled = summary.interval_method.get(split, {}).get("resampled", "lesion")
    lines = ["## Headline metrics", "", f"On the **{split}** split; 95% intervals resample {resampled}s.", ""]
    names = [
        ("balanced_acc", "balanced accuracy"),
        ("acc", "accuracy"),
        ("f1_macro", "macro F1"),
        ("auroc_macro", "macro AUROC"),
    ]
    lines += _table(["metric", "value"], [[label, _with_interval(metrics, f"{split}/{n}")] for n, label in names])
    recalls = [
        [c, str(counts.get(c, "")), _with_interval(metrics, f"{split}/recall_{c}")]
        for c in CLASSES
        if f"{split}/recall_{c}" in metrics
    ]
    if recalls:
        lines += ["", *_table(["class", f"{split} images", "recall (sensitivity)"], recalls)]
        lines += [
            "",
            "A class with a handful of images gets a degenerate interval (1.000-1.000 over two lesions is "
            "not certainty): read the counts first.",
        ]
    return [*lines, ""]


def _calibration_section(summary: RunSummary) -> list[str]:
    temperature = summary.calibration.get("temperature")
    lines = [
        "## Calibration",
        "",
        f"Temperature {_number(temperature, 2)} fitted on "
        f"{summary.calibration.get('fitted_on') or 'nothing (calibrate=false)'}.",
    ]
    rows = [
        [
            s,
            _number(summary.metrics.get(f"{s}/ece_uncalibrated")),
            _number(summary.metrics.get(f"{s}/ece")),
            _number(summary.metrics.get(f"{s}/nll_uncalibrated")),
            _number(summary.metrics.get(f"{s}/nll")),
        ]
        for s in ("val", "test")
        if f"{s}/ece" in summary.metrics
    ]
    return [*lines, "", *_table(["split", "ECE before", "ECE after", "NLL before", "NLL after"], rows), ""]


def _subgroup_section(run: Path, summary: RunSummary, split: str) -> list[str]:
    info = summary.clinical.get("splits", {}).get(split, {})
    lines = ["## Subgroup audit", ""]
    path = run / f"subgroups_{split}.csv"
    if not path.is_file():
        notes = "; ".join(info.get("notes", [])) or "no audit file"
        return [*lines, f"Not audited on {split}: {notes}.", ""]
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    flagged = table[table["flagged"].astype(str).str.lower() == "true"]
    lines.append(
        f"{len(table) - 1} subgroups of {split} (sex, age band, site, clinic, ground truth) scored with "
        "lesion-bootstrap "
        "intervals; a subgroup is **flagged** when its interval lies wholly below the whole split's figure. With "
        f"this many comparisons a flag can arise by chance: it says where to look. Full table: `{path.name}`"
        + (f", plot `subgroups_{split}.png`." if (run / f"subgroups_{split}.png").is_file() else ".")
    )
    header = ["subgroup", "images", "lesions", *(AUDIT_METRIC_NAMES[m] for m in AUDIT_METRICS)]

    def cells(row: pd.Series) -> list[str]:
        name = "whole split" if row["column"] == "all" else f"{row['column']}={row['subgroup']}"
        out = [name, str(row["n_images"]), str(row["n_lesions"])]
        for m in AUDIT_METRICS:
            mark = " **(flagged)**" if str(row[f"{m}_flagged"]).lower() == "true" else ""
            interval = f" ({_number(row[f'{m}_low'])}-{_number(row[f'{m}_high'])})" if pd.notna(row[m]) else ""
            out.append(f"{_number(row[m])}{interval}{mark}")
        return out

    rows = [cells(table.iloc[0])] + [cells(row) for _, row in flagged.iterrows()]
    lines += ["", *_table(header, rows), ""]
    if flagged.empty:
        lines += [
            "No subgroup is flagged (small splits give wide intervals: absence of a flag is not evidence of parity).",
            "",
        ]
    notes = [n for n in info.get("notes", []) if not n.startswith("thresholds:")]
    return lines + [f"- {note}" for note in notes] + ([""] if notes else [])


def _operating_section(run: Path, summary: RunSummary, split: str) -> list[str]:
    lines = ["## Operating points", ""]
    path = run / f"operating_points_{split}.csv"
    if not path.is_file():
        return [*lines, f"Not computed on {split} (thresholds are chosen on validation and applied to test).", ""]
    points = pd.read_csv(path)
    lines.append(
        "Thresholds chosen on validation for each target specificity, then applied unchanged to "
        f"{split}: the {split} figures are what a clinic would get."
    )
    for task in points["task"].unique():
        lines.append(f"- {task}: AUROC {_with_interval(summary.metrics, f'{split}/{task}_auroc')}")
    rows = [
        [
            r.task,
            f"{r.test_n_positive}/{r.test_n_negative}",
            f"{r.target_specificity:.0%}",
            _number(r.threshold),
            _number(r.val_sensitivity),
            f"{_number(r.test_sensitivity)} ({_number(r.test_sensitivity_low)}-{_number(r.test_sensitivity_high)})",
            f"{_number(r.test_specificity)} ({_number(r.test_specificity_low)}-{_number(r.test_specificity_high)})",
        ]
        for r in points.itertuples()
    ]
    header = [
        "task",
        f"{split} positives/negatives",
        "target spec.",
        "threshold",
        "val sens.",
        f"{split} sensitivity",
        f"{split} specificity",
    ]
    return [*lines, "", *_table(header, rows), ""]


def _conformal_section(run: Path, split: str) -> list[str]:
    found = _read_json(run / f"conformal_{split}.json")
    lines = ["## Conformal prediction sets", ""]
    if found is None:
        return [*lines, f"Not computed on {split}.", ""]
    calibration = found["calibration"]
    lines.append(
        f"Split conformal (APS) calibrated on {calibration['n_calibration']} validation "
        f"{'lesions (one photo each)' if calibration['grouping'] == 'one_per_lesion' else 'images'} for "
        f"alpha {calibration['alpha']}: sets should hold the true class for at least {1 - calibration['alpha']:.0%} "
        f"of new lesions. On {split}: coverage {_number(found['coverage'])} per image, "
        f"{_number(found.get('coverage_lesion'))} per lesion, mean set size {_number(found['mean_set_size'], 2)}."
    )
    per_class = [[c, _number(found[f"coverage_{c}"])] for c in CLASSES if f"coverage_{c}" in found]
    return [*lines, "", *_table(["class", "coverage"], per_class), ""]


def _selective_section(summary: RunSummary, split: str) -> list[str]:
    m, thresholds = summary.metrics, (summary.clinical.get("thresholds") or {})
    lines = ["## Selective prediction and out-of-distribution flags", ""]
    if f"{split}/aurc" in m:
        lines.append(
            f"- risk-coverage on {split} (`risk_coverage_{split}.csv`): AURC {_number(m[f'{split}/aurc'])}, balanced "
            f"accuracy {_number(m.get(f'{split}/balanced_acc_at_80'))} at 80% and "
            f"{_number(m.get(f'{split}/balanced_acc_at_90'))} at 90% coverage"
        )
    if f"{split}/abstain_coverage" in m:
        lines.append(
            f"- abstaining below confidence {_number(thresholds.get('abstain'))} (kept "
            f"{thresholds.get('settings', {}).get('coverage', 0):.0%} of validation) keeps "
            f"{_number(m[f'{split}/abstain_coverage'])} of {split}, at balanced accuracy "
            f"{_number(m[f'{split}/abstain_balanced_acc'])}"
        )
    if f"{split}/ood_flagged" in m:
        ood = thresholds.get("ood", {})
        lines.append(
            f"- out-of-distribution ({ood.get('method')} score above its validation {ood.get('quantile')} quantile): "
            f"{_number(m[f'{split}/ood_flagged'])} of {split} flagged. The flag is calibrated on lesions only: it "
            "says an image looks unlike them, not what it is"
        )
    return [*lines, ""]


def _limitations(config: Any, summary: RunSummary, split: str, run: Path) -> list[str]:
    lines = [
        "## Intended use",
        "",
        "Research and benchmarking of dermoscopy classifiers on the seven HAM10000 classes. Not a medical "
        "device and not validated prospectively; at most a second opinion on dermoscopic images like those "
        "it was trained on, read with its prediction set, flags and abstention, never a diagnosis.",
        "",
        "## Known limitations",
        "",
    ]
    items = []
    if trained_on_synthetic(config):
        items.append("**Trained on synthetic images**: none of its numbers say anything about real lesions.")
    else:
        items.append(
            "Trained on one dataset's clinics (HAM10000: two centres, Vienna and Queensland, four "
            "acquisition set-ups), mostly fair-skinned European and Australian patients."
        )
    items += [
        "No pediatric cohort: HAM10000 holds very few patients under 20, so the model is untested on children.",
        "Seven classes only: other diagnoses (invasive squamous cell carcinoma, for one) are forced into one "
        "of them; the OOD flag catches only images unlike the training lesions.",
        "Labels are partly histopathology and partly follow-up or consensus (see the `dx_type` subgroups).",
    ]
    skipped = run / SKIPPED_FILE
    if skipped.is_file():
        n = len(pd.read_csv(skipped))
        items.append(f"{n} listed images were unusable and left out (`{SKIPPED_FILE}`): the data is not the full set.")
    if split != "test":
        items.append("No test split: the figures are validation figures, on the split the checkpoint was chosen on.")
    if not summary.pretrained:
        items.append("Trained from random weights, not ImageNet: expect far lower scores than a pretrained backbone.")
    return lines + [f"- {item}" for item in items] + [""]


def model_card(run_dir: str | Path) -> str:
    """The card's text for a training run folder."""
    run = Path(run_dir)
    summary = RunSummary.read(run)
    config = OmegaConf.load(run / CONFIG_FILE)
    split = "test" if "test/balanced_acc" in summary.metrics else "val"
    lines = [
        f"# Model card: {summary.backbone} ({run.name})",
        "",
        "Generated from this run folder's own files (metrics.json, config.yaml, split.csv and the clinical "
        "evaluation files); regenerate it with `python -m skinlesion.runfolder.model_card <run>`.",
        "",
    ]
    lines += _data_section(config, run)
    lines += _recipe_section(config, summary)
    lines += _headline_section(summary, split, _split_counts(run, split))
    lines += _calibration_section(summary)
    lines += _subgroup_section(run, summary, split)
    lines += _operating_section(run, summary, split)
    lines += _conformal_section(run, split)
    lines += _selective_section(summary, split)
    lines += _limitations(config, summary, split, run)
    return "\n".join(lines)


def write_model_card(run_dir: str | Path) -> Path:
    path = Path(run_dir) / MODEL_CARD
    text = model_card(run_dir)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


if __name__ == "__main__":
    import sys

    for folder in sys.argv[1:]:
        print(write_model_card(folder))
