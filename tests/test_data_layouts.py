"""The Kaggle HAM10000 and ISIC 2018 Task 3 layouts load from tiny fixtures; table errors are one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.data.layouts import METADATA_COLUMNS, load_records
from skinlesion.errors import ConfigError, DataError
from skinlesion.labels import CLASS_TO_INDEX

HAM_ROWS = [  # lesion_id, image_id, dx (as in the real metadata, with extra columns)
    ("HAM_0000001", "ISIC_0000001", "nv"),
    ("HAM_0000001", "ISIC_0000002", "nv"),
    ("HAM_0000002", "ISIC_0000003", "mel"),
    ("HAM_0000003", "ISIC_0000004", "bkl"),
]


def write_image(path: Path, colour: tuple[int, int, int] = (180, 120, 90), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path


def write_metadata(root: Path, rows: list[tuple[str, str, str]], columns=("lesion_id", "image_id", "dx")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=list(columns))
    frame["dx_type"], frame["age"], frame["sex"], frame["localization"] = "histo", 45.0, "male", "back"
    path = root / "HAM10000_metadata.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("folders", [("HAM10000_images_part_1", "HAM10000_images_part_2"), ("images",), ("",)])
def test_ham10000_reads_the_metadata_and_finds_images_in_any_folder(tmp_path: Path, folders: tuple[str, ...]) -> None:
    write_metadata(tmp_path, HAM_ROWS)
    for i, (_, image_id, _) in enumerate(HAM_ROWS):
        write_image(tmp_path / folders[i % len(folders)] / f"{image_id}.jpg")
    records = load_records(tmp_path)  # layout detected from the metadata file
    assert records["image_id"].tolist() == [r[1] for r in HAM_ROWS]
    assert records["lesion_id"].tolist() == [r[0] for r in HAM_ROWS]
    assert records["label"].tolist() == [CLASS_TO_INDEX[r[2]] for r in HAM_ROWS]
    assert all(Path(p).is_file() for p in records["path"])
    assert records["source_row"].tolist() == [2, 3, 4, 5]
    # the subgroup audit's columns the metadata has come along as text (this file has no "dataset")
    assert [c for c in METADATA_COLUMNS if c in records] == ["sex", "age", "localization", "dx_type"]
    assert records["age"].tolist() == ["45.0"] * 4 and records["localization"].eq("back").all()


def write_isic(root: Path, subset: str, labels: dict[str, str], columns: list[str], groupings: dict | None = None):
    """An ISIC 2018 Task 3 subset: images, one-hot ground truth in ``columns`` order, optional groupings."""
    stem = f"ISIC2018_Task3_{subset}"
    for image_id in labels:
        write_image(root / f"{stem}_Input" / f"{image_id}.jpg")
    (root / f"{stem}_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    truth = pd.DataFrame([{c: float(c == labels[i].upper()) for c in columns[1:]} for i in labels])
    truth.insert(0, "image", list(labels))
    (root / f"{stem}_GroundTruth").mkdir(parents=True, exist_ok=True)
    truth[columns].to_csv(root / f"{stem}_GroundTruth" / f"{stem}_GroundTruth.csv", index=False)
    if groupings:
        pd.DataFrame({"image": list(groupings), "lesion_id": list(groupings.values())}).assign(
            diagnosis_confirm_type="histopathology"
        ).to_csv(root / f"{stem}_LesionGroupings.csv", index=False)


ISIC_LABELS = {
    "ISIC_0024306": "nv",
    "ISIC_0024307": "mel",
    "ISIC_0024308": "vasc",
    "ISIC_0024309": "akiec",
    "ISIC_0024310": "mel",
}


def test_isic2018_one_hot_columns_are_mapped_by_name_not_position(tmp_path: Path) -> None:
    shuffled = ["image", "VASC", "DF", "NV", "MEL", "AKIEC", "BKL", "BCC"]  # not the official order
    groups = {"ISIC_0024307": "HAM_0000550", "ISIC_0024310": "HAM_0000550", "ISIC_0024308": "HAM_0000118"}
    write_isic(tmp_path, "Training", ISIC_LABELS, shuffled, groups)
    records = load_records(tmp_path)  # layout detected from the _Input folder
    assert dict(zip(records["image_id"], records["dx"])) == ISIC_LABELS
    assert records["label"].tolist() == [CLASS_TO_INDEX[d] for d in ISIC_LABELS.values()]
    # Lesion groupings where the CSV lists the image; an image it does not list is its own lesion.
    assert records["lesion_id"].tolist() == [
        "ISIC_0024306",
        "HAM_0000550",
        "HAM_0000118",
        "ISIC_0024309",
        "HAM_0000550",
    ]


def test_isic2018_subsets_and_missing_groupings(tmp_path: Path) -> None:
    official = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    write_isic(tmp_path, "Test", {"ISIC_0034524": "df", "ISIC_0034525": "bcc"}, official)
    records = load_records(tmp_path, "isic2018", "Test")
    assert records["dx"].tolist() == ["df", "bcc"]
    assert records["lesion_id"].tolist() == records["image_id"].tolist()
    assert not set(METADATA_COLUMNS) & set(records.columns)  # ISIC 2018 has no patient metadata
    with pytest.raises(DataError, match=r"ground-truth file not found: .*ISIC2018_Task3_Validation_GroundTruth.csv"):
        load_records(tmp_path, "isic2018", "Validation")
    with pytest.raises(ConfigError, match="unknown ISIC 2018 subset 'Testing'"):
        load_records(tmp_path, "isic2018", "Testing")


def _ham(rows, columns=("lesion_id", "image_id", "dx")):
    return lambda root: write_metadata(root, rows, columns)


def _isic_truth(text: str):
    def make(root: Path) -> None:
        folder = root / "ISIC2018_Task3_Training_GroundTruth"
        folder.mkdir(parents=True)
        (root / "ISIC2018_Task3_Training_Input").mkdir()
        (folder / "ISIC2018_Task3_Training_GroundTruth.csv").write_text(text)

    return make


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, r"no dataset found: expected HAM10000_metadata.csv .* or ISIC2018_Task3_\*_Input"),
        (_ham(HAM_ROWS, ("lesion_id", "image_id", "diagnosis")), r"missing required column\(s\) dx; found"),
        (_ham([*HAM_ROWS[:2], ("HAM_9", "ISIC_0000009", "melanoma")]), r"line 4: unknown dx 'melanoma'"),
        (_ham([*HAM_ROWS, HAM_ROWS[1]]), r"line 6: duplicate image_id 'ISIC_0000002' \(first at line 3\)"),
        (_ham([("HAM_1", "../../etc/passwd", "nv")]), r"line 2: image_id '../../etc/passwd' would resolve outside"),
        (_ham([("HAM_1", "/etc/passwd", "nv")]), r"would resolve outside the data root"),
        (_ham([("", "ISIC_0000001", "nv")]), r"line 2: empty lesion_id"),
        (
            _ham([*HAM_ROWS[:2], ("HAM_0000001", "ISIC_0000005", "mel")]),
            r"lesion_id 'HAM_0000001' is listed with different diagnoses \(line 2 nv, line 3 nv, line 4 mel\)",
        ),
        (_ham([]), r"HAM10000_metadata.csv: the dataset is empty \(no image is listed\)"),
        (lambda root: (root / "HAM10000_metadata.csv").write_bytes(b""), r"cannot be read as CSV"),
        (_isic_truth("image,MEL,NV,BCC,AKIEC,BKL,DF\nISIC_1,1,0,0,0,0,0\n"), r"missing required column\(s\) VASC"),
        (_isic_truth("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,1,0,0,0,0,0\n"), r"line 2: image ISIC_1 must have"),
        (_isic_truth("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,x,0,0,0,0,0,0\n"), r"must hold 0/1 values"),
    ],
    ids=[
        "no-metadata",
        "missing-column",
        "unknown-dx",
        "duplicate-id",
        "id-escapes-root",
        "absolute-id",
        "empty-lesion-id",
        "lesion-two-dx",
        "empty-dataset",
        "empty-csv",
        "isic-missing-column",
        "isic-two-classes",
        "isic-not-numeric",
    ],
)
def test_table_errors_are_one_line_and_name_the_file_line_and_problem(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DataError, match=message) as err:
        load_records(root)
    assert "\n" not in str(err.value)
    assert str(root) in str(err.value)  # names the file (or folder) to fix


def test_missing_folder_metadata_and_bad_layout_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset folder not found: .*nowhere\. Download HAM10000"):
        load_records(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"metadata file not found: .*HAM10000_metadata.csv"):
        load_records(tmp_path, layout="ham10000")
    with pytest.raises(ConfigError, match=r"unknown data.layout 'kaggle'"):
        load_records(tmp_path, layout="kaggle")
