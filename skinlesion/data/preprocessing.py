"""The input a backbone expects (size, mean, std, interpolation), taken from timm, never from constants.

It travels with the model: stored in the checkpoint's hyper-parameters, written beside an ONNX export,
and reused by `predict` and `explain`, so nobody has to repeat a model's preprocessing by hand. That includes
the optional colour constancy (``colour_constancy``: Shades of Gray's p-norm, applied on the device before
mean/std, :mod:`skinlesion.data.colour_constancy`); a checkpoint saved before it existed has it off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import torch
from timm.data import resolve_model_data_config

from skinlesion.data.colour_constancy import check_power
from skinlesion.errors import ConfigError

CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    colour_constancy: float | None = None  # Shades of Gray p-norm (6 = the ISIC winners'); None = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "colour_constancy", check_power(self.colour_constancy))

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, image_size: int | None = None, colour_constancy: float | None = None
    ) -> Preprocessing:
        """The model's timm data config, with ``image_size`` (e.g. small sizes for CPU) overriding its size."""
        config = resolve_model_data_config(model)
        size = int(image_size) if image_size else int(config["input_size"][-1])
        return cls(
            image_size=size,
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
            interpolation=str(config.get("interpolation", "bicubic")),
            crop_pct=float(config.get("crop_pct", 0.875)),
            colour_constancy=colour_constancy,
        )

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=values.get("interpolation", "bicubic"),
            crop_pct=float(values.get("crop_pct", 0.875)),
            colour_constancy=values.get("colour_constancy"),
        )

    def to_dict(self) -> dict:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    @property
    def cv2_interpolation(self) -> int:
        if self.interpolation not in CV2_INTERPOLATION:
            raise ConfigError(
                f"interpolation '{self.interpolation}' is not supported; choose one of {', '.join(CV2_INTERPOLATION)}"
            )
        return CV2_INTERPOLATION[self.interpolation]

    @property
    def resize_size(self) -> int:
        """Side of the image before a centre crop to ``image_size`` (timm's crop_pct convention)."""
        return round(self.image_size / self.crop_pct)
