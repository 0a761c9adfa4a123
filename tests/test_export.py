"""ONNX export with a dynamic batch, parity with PyTorch, and a JSON that suffices to use it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from skinlesion.data.images import load_resized
from skinlesion.data.layouts import load_records
from skinlesion.data.preprocessing import CV2_INTERPOLATION
from skinlesion.errors import ConfigError
from skinlesion.export import export
from skinlesion.inference.model import InferenceModel

from conftest import compose_config, random_checkpoint

IMAGE_SIZE = 48


def export_cfg(tmp_path: Path, checkpoint: Path, *overrides: str):
    run = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"ckpt_path={checkpoint}"]
    return compose_config("export", [*run, *overrides])


@pytest.mark.parametrize("backbone", [pytest.param("resnet50", marks=pytest.mark.slow), "mobilenetv2"])
def test_onnx_matches_pytorch_for_any_batch_size(
    tmp_path: Path, backbone: str, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = random_checkpoint(tmp_path / "best.ckpt", backbone, IMAGE_SIZE, temperature=1.7)
    caplog.set_level(logging.INFO)
    result = export(export_cfg(tmp_path, checkpoint))
    chatter = [
        r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir")) and r.levelno < logging.WARNING
    ]
    assert not chatter, chatter[:3]  # the exporter's progress stays at debug verbosity

    onnx_path, info_path = Path(result["onnx"]), Path(result["json"])
    assert onnx_path == tmp_path / "run" / f"{backbone}.onnx" and info_path == onnx_path.with_suffix(".json")
    parity = result["parity"]
    assert parity["runtime"].startswith("onnxruntime") and parity["max_abs_diff"] < 1e-4
    assert not list(onnx_path.parent.glob(".*partial*"))  # only the checked model is published

    graph = onnx.load(onnx_path).graph
    (inp,), (out,) = graph.input, graph.output
    in_dims, out_dims = ([d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (inp, out))
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, IMAGE_SIZE, IMAGE_SIZE]  # symbolic batch
    assert isinstance(out_dims[0], str) and out_dims[1:] == [7]

    info = json.loads(info_path.read_text())
    loaded = InferenceModel.load(checkpoint, "cpu")
    pre = loaded.model.preprocessing
    assert info["preprocessing"]["image_size"] == IMAGE_SIZE
    assert info["preprocessing"]["mean"] == pytest.approx(list(pre.mean))
    assert info["preprocessing"]["std"] == pytest.approx(list(pre.std))
    assert info["preprocessing"]["interpolation"] == pre.interpolation
    assert info["class_names"] == list(loaded.classes) and info["temperature"] == pytest.approx(1.7)

    # A user with only the JSON: decode, its transform, its mean/std, softmax(logits / T) on a batch of 5
    # (a size the parity check did not use) gives the probabilities skinlesion itself predicts.
    paths = load_records(synthetic_root)["path"].head(5).tolist()
    transform = A.from_dict(info["transform"])
    mean, std = np.array(info["preprocessing"]["mean"]), np.array(info["preprocessing"]["std"])
    interpolation = CV2_INTERPOLATION[info["preprocessing"]["interpolation"]]
    sources = [load_resized(p, info["source_size"], interpolation) for p in paths]  # the documented first steps
    batch = np.stack([(transform(image=image)["image"] / 255.0 - mean) / std for image in sources])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {info["input"]["name"]: batch.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    probs = torch.from_numpy(logits / info["temperature"]).softmax(1).numpy()
    expected = loaded.predict_proba(torch.stack([loaded.load_input(p) for p in paths])).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_existing_output_and_unsupported_format_are_refused(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "best.ckpt", "mobilenetv2", IMAGE_SIZE, temperature=1.7)
    taken = tmp_path / "model.onnx"
    taken.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export(export_cfg(tmp_path, checkpoint, f"out={taken}"))
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(ConfigError, match="format=torchscript is not supported; supported: onnx"):
        export(export_cfg(tmp_path, checkpoint, "format=torchscript"))
    with pytest.raises(ConfigError, match=r"must end in \.onnx"):
        export(export_cfg(tmp_path, checkpoint, f"out={tmp_path / 'model.bin'}"))


def test_torchscript_exporter_and_the_reference_runtime_without_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    checkpoint = random_checkpoint(tmp_path / "best.ckpt", "mobilenetv2", IMAGE_SIZE, temperature=1.7)
    result = export(export_cfg(tmp_path, checkpoint, "exporter=torchscript", f"out={tmp_path / 'm' / 'model.onnx'}"))
    assert result["parity"]["runtime"].startswith("onnx.reference") and result["parity"]["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "m" / "model.json").read_text())["file"] == "model.onnx"
