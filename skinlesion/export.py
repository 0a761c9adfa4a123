"""Export a trained checkpoint to ONNX, with its preprocessing recorded beside it and a parity check.

    python -m skinlesion.export ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
    python -m skinlesion.export ckpt_path=... out=models/resnet50.onnx

The ONNX graph is the backbone alone. Input ``image``: float32 NCHW ``[batch, 3, S, S]`` (dynamic batch, ``S``
= the checkpoint's image size), RGB already resized (and centre-cropped if the model was trained so) and
normalised as ``(pixel / 255 - mean) / std``. A model trained with colour constancy
(``module.colour_constancy``) takes the same input: its graph undoes the normalisation, applies the Shades of
Gray correction exactly as training did, and normalises again before the backbone. A model trained with
metadata (``metadata=fusion``) has a second input ``metadata``: float32 ``[batch, width]``, encoded as the
JSON's ``metadata`` entry says (a row of the all-missing vector where nothing is known). Output ``logits``:
``[batch, classes]``; calibrated probabilities are ``softmax(logits / temperature)``. The JSON beside the
model (same name, ``.json``) records all of it: size, mean, std, interpolation, crop, class names,
temperature and the metadata encoding.

Before the model is published it is compared with the PyTorch model on random images of several batch
sizes, through onnxruntime when it is installed (else onnx's reference evaluator); a maximum absolute
logit difference above ``check.atol`` (1e-4 for fp32) is an error. The exporter is torch's
``torch.export``-based one (``dynamo=True``, the default since torch 2.9), which exports all five
backbones with a dynamic batch; ``exporter=torchscript`` selects the deprecated tracing exporter.
:func:`export` is the plain function; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import albumentations as A
import numpy as np
import onnx
import torch
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.errors import ConfigError, SkinLesionError
from skinlesion.inference.model import InferenceModel, required_path
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.runfolder.files import check_writable, write_json
from skinlesion.settings import ExportSettings, check_settings

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME, METADATA_NAME, OUTPUT_NAME = "image", "metadata", "logits"
USAGE = "python -m skinlesion.export ckpt_path=<run>/checkpoints/best.ckpt [out=model.onnx]"


class ParityError(SkinLesionError):
    """The exported model does not reproduce the PyTorch model's outputs."""


# The exporter's own progress messages (dozens of INFO lines of graph rewrites) are shown only at debug
# verbosity: hydra.verbose=onnxscript.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextmanager
def _quiet_below_debug(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if not logger.isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class ImageGraph(torch.nn.Module):
    """What the ONNX file holds for an image-only model: plainly normalised images -> logits. A model trained with
    colour constancy applies it inside (from the de-normalised pixels), so the input contract is one whatever
    the model was trained with."""

    def __init__(self, model: SkinLesionClassifier) -> None:
        super().__init__()
        self.model = model

    def corrected(self, images: torch.Tensor) -> torch.Tensor:
        if not self.model.preprocessing.colour_constancy:
            return images
        return self.model.standardize(images * self.model.std + self.model.mean)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.corrected(images))


class ImageAndMetadataGraph(ImageGraph):
    """The same for a metadata model: (images, encoded metadata) -> logits, two ONNX inputs."""

    def forward(self, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.model(self.corrected(images), metadata)


def plainly_normalized(model: SkinLesionClassifier, images: torch.Tensor) -> torch.Tensor:
    """The ONNX input of uint8 ``images``: ``(pixel / 255 - mean) / std``, no colour constancy."""
    return (images.float() - model.mean) / model.std


def export_onnx(model: SkinLesionClassifier, path: Path, exporter: str = "dynamo", opset: int = 18) -> None:
    """Write the model's graph (with a metadata model's second input) as ONNX with a dynamic batch dimension."""
    size = model.preprocessing.image_size
    model = model.eval().cpu()
    network: torch.nn.Module = ImageGraph(model)
    examples: tuple = (torch.zeros(2, 3, size, size),)  # batch 2: a batch of 1 would be specialised away
    inputs = [INPUT_NAME]
    if model.metadata_spec is not None:
        network = ImageAndMetadataGraph(model)
        examples += (model.missing_metadata(2).clone(),)
        inputs.append(METADATA_NAME)
    options: dict = {"input_names": inputs, "output_names": [OUTPUT_NAME], "opset_version": opset}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in examples)
        options |= {"dynamo": True, "dynamic_shapes": dynamic, "external_data": False, "verbose": False}
    else:
        options |= {"dynamo": False, "dynamic_axes": {name: {0: "batch"} for name in [*inputs, OUTPUT_NAME]}}
    with torch.no_grad(), warnings.catch_warnings(), _quiet_below_debug(*EXPORTER_LOGGERS):
        warnings.simplefilter("ignore", DeprecationWarning)  # the torchscript exporter's notice
        # image and metadata share the one batch dimension on purpose; the dynamo exporter says so
        warnings.filterwarnings("ignore", message="The axis name: batch will not be used")
        torch.onnx.export(network.eval(), examples, str(path), **options)


def onnx_runner(path: Path) -> tuple[str, Callable[[dict[str, np.ndarray]], np.ndarray]]:
    """(runtime name, function: inputs by name (normalised images, metadata) -> logits) for the ONNX file."""
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        return f"onnx.reference {onnx.__version__}", lambda feeds: evaluator.run(None, feeds)[0]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return f"onnxruntime {onnxruntime.__version__}", lambda feeds: session.run(None, feeds)[0]


@torch.no_grad()
def check_parity(
    model: SkinLesionClassifier, path: Path, batch_sizes: Sequence[int] = (1, 3), atol: float = 1e-4, seed: int = 0
) -> dict:
    """Maximum absolute logit difference between the ONNX file (fed the plainly normalised images, and random
    metadata vectors for a metadata model) and ``model`` (fed the uint8 images, normalised by the model
    itself); raises ParityError above ``atol``."""
    onnx.checker.check_model(str(path))
    runtime, run = onnx_runner(path)
    generator = torch.Generator().manual_seed(seed)
    size = model.preprocessing.image_size
    model = model.eval().cpu()
    diffs = []
    for batch in batch_sizes:
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
        feeds = {INPUT_NAME: plainly_normalized(model, images)}
        if model.metadata_spec is not None:
            feeds[METADATA_NAME] = torch.rand(batch, model.metadata_spec.width, generator=generator)
        expected = model(model.normalize(images), *list(feeds.values())[1:]).float().numpy()
        diffs.append(float(np.abs(run({k: v.numpy() for k, v in feeds.items()}) - expected).max()))
    result = {"runtime": runtime, "batch_sizes": list(batch_sizes), "max_abs_diff": max(diffs), "atol": atol}
    if not result["max_abs_diff"] < atol:
        raise ParityError(
            f"{path.name}: ONNX logits differ from PyTorch by up to {result['max_abs_diff']:.2e} (limit {atol:.0e}, "
            f"{runtime}); the model was not published — try exporter=torchscript or another opset"
        )
    return result


def _metadata_input(model: SkinLesionClassifier) -> dict | None:
    """The second input of a metadata model: its shape and encoding (skinlesion.data.metadata), else None."""
    spec = model.metadata_spec
    if spec is None:
        return None
    return {
        "name": METADATA_NAME,
        "shape": ["batch", spec.width],
        "dtype": "float32",
        "encoding": spec.to_dict(),
        "layout": "per field in 'fields' order: age -> [age / age_scale, 1 if missing] (missing: [0, 1]); sex -> "
        "one-hot over 'sexes'; site (localization) -> one-hot over 'sites'; a missing or unseen value -> 'unknown'",
        "all_missing": [float(v) for v in spec.missing_row()],
    }


def describe(loaded: InferenceModel, onnx_file: Path, exporter: str, opset: int, parity: dict) -> dict:
    """What a user of the ONNX file needs to feed it and read its output, without this package."""
    model, pre = loaded.model, loaded.model.preprocessing
    size = pre.image_size
    crop = f", then centre-crop to {size}x{size}" if loaded.center_crop else ""
    resize_to = pre.resize_size if loaded.center_crop else size
    return {
        "format": "onnx",
        "file": onnx_file.name,
        "checkpoint": str(loaded.path),
        "backbone": model.spec.name,
        "timm_name": model.spec.timm_name,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW RGB"},
        "metadata": _metadata_input(model),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(model.class_names)], "dtype": "float32"},
        "preprocessing": pre.to_dict() | {"center_crop": loaded.center_crop, "resize_size": pre.resize_size},
        "source_size": loaded.source_size,
        "steps": [
            "decode to RGB uint8 (grayscale repeated to 3 channels, alpha composited on white); a JPEG at least "
            "twice source_size on both sides is decoded at a reduced scale (PIL Image.draft) as in training",
            f"resize to source_size x source_size ({loaded.source_size}), area averaging when shrinking, as the "
            "training images were before caching",
            f"resize to {resize_to}x{resize_to}, aspect ratio not kept{crop}: exactly 'transform' "
            "(albumentations.from_dict(...) rebuilds it)",
            "x = (pixel / 255 - mean) / std per channel, float32",
            "HWC -> CHW, stack into a batch",
            *(
                [f"nothing more: the graph applies the Shades of Gray colour constancy (p={pre.colour_constancy:g})"]
                if pre.colour_constancy
                else []
            ),
        ],
        "transform": A.to_dict(loaded.transform),
        "class_names": list(model.class_names),
        "temperature": float(model.temperature),
        "probabilities": "softmax(logits / temperature) over class_names; softmax(logits) uncalibrated",
        "exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'}) torch {torch.__version__}",
        "opset": opset,
        "parity": parity,
    }


def export(cfg: DictConfig) -> dict:
    """Export, check and publish the model and its JSON; returns their paths and the parity check."""
    check_settings(cfg, ExportSettings)
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not supported; supported: {', '.join(FORMATS)}")
    if cfg.exporter not in EXPORTERS:
        raise ConfigError(f"exporter={cfg.exporter} is not valid; choose one of {', '.join(EXPORTERS)}")
    if cfg.exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ConfigError(
            "exporter=dynamo needs onnxscript: pip install 'skinlesion[onnx]', or use exporter=torchscript"
        )
    ckpt_path = required_path(cfg.ckpt_path, "ckpt_path", USAGE)
    if cfg.out:
        check_writable(Path(cfg.out).expanduser().parent, f"out={cfg.out}")
    loaded = InferenceModel.load(ckpt_path, "cpu")
    target = Path(cfg.out).expanduser() if cfg.out else Path(cfg.paths.output_dir) / f"{loaded.model.spec.name}.onnx"
    if target.suffix != ".onnx":
        raise ConfigError(f"out={target}: the file name must end in .onnx")
    sidecar = target.with_suffix(".json")
    for path in (target, sidecar):
        if path.exists():
            raise ConfigError(f"{path} already exists; export never overwrites: give another out=")

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial{os.getpid()}.onnx")
    try:
        export_onnx(loaded.model, partial, cfg.exporter, int(cfg.opset))
        parity = check_parity(loaded.model, partial, list(cfg.check.batch_sizes), float(cfg.check.atol))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    write_json(sidecar, describe(loaded, target, cfg.exporter, int(cfg.opset), parity))
    log.info("ONNX model in %s, preprocessing in %s", target, sidecar)
    return {"onnx": str(target), "json": str(sidecar), "parity": parity}


def _show(result: dict, cfg: DictConfig) -> None:
    parity = result["parity"]
    print(
        f"{result['onnx']}\n{result['json']}\nparity ({parity['runtime']}, batch sizes {parity['batch_sizes']}): "
        f"max |ONNX - PyTorch| = {parity['max_abs_diff']:.2e} (limit {parity['atol']:.0e})"
    )


main = cli.hydra_command(export, "export", _show)

if __name__ == "__main__":
    main()
