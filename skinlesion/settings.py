"""The numeric settings of every entry point, checked once before any work.

Hydra types a value but not its range: ``data.image_size=0`` would be read as "unset" (224 px),
``trainer.max_epochs=0`` would test random weights, and a zero batch size or a negative learning rate
would end in a traceback from inside torch, minutes into the run. Each entry function validates its
config against one of the schemas below (pydantic dataclasses over the composed config) before it reads
data or builds a model; a refusal is one line naming the setting, its value and what is allowed. Keys a
schema does not list are left to the code that uses them (Lightning, torch, the DataModule).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Annotated, Any, Literal, TypeVar

from omegaconf import DictConfig
from pydantic import ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from skinlesion.config import to_plain
from skinlesion.data.colour_constancy import check_power
from skinlesion.data.specs import AugmentSpec, SplitSpec
from skinlesion.errors import ConfigError, SettingError
from skinlesion.inference.tta import view_plan
from skinlesion.models.backbone import BackboneSpec
from skinlesion.models.fusion import fusion_spec
from skinlesion.models.optim import check_layer_blocks
from skinlesion.runfolder.files import check_writable

SCHEMA = ConfigDict(extra="ignore")  # other keys of a section belong to Lightning, torch or the DataModule
Whole = Annotated[int, Strict()]  # no floats (2.5), strings or booleans where a count is meant
Number = Annotated[float, Strict()]  # an int is a number too
Fraction = Annotated[Number, Field(gt=0, lt=1)]
Schema = TypeVar("Schema")
MIX_SHARE = "a probability; null is not off: leave the key out for its default"


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class CacheSettings:
    size: Annotated[Whole | None, Field(ge=1, description="null = image_size / crop_pct")] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class SplitSettings:
    strategy: str
    val: Annotated[Fraction | None, Field(description="null = the strategy's default")] = None
    test: Annotated[Number | None, Field(ge=0, lt=1, description="0 = no test split")] = None
    seed: Whole
    num_folds: Annotated[Whole | None, Field(ge=2)] = None
    fold: Annotated[Whole | None, Field(ge=0)] = None

    @model_validator(mode="after")
    def _consistent(self) -> SplitSettings:
        """Together (val + test < 1, the fold within num_folds), as the DataModule will check them."""
        SplitSpec.from_config(asdict(self))
        return self


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class AugmentSettings:
    """An absent or null key is off, as in :func:`skinlesion.data.transforms.train_transform`; so is ``false``."""

    rotate: Annotated[Number | None, Field(ge=0, le=180, description="degrees, +-")] = None
    zoom: Annotated[Number | None, Field(ge=0, lt=1)] = None
    shift: Annotated[Number | None, Field(ge=0, lt=1, description="a fraction of the side")] = None
    brightness: Annotated[Number | None, Field(ge=0, le=1)] = None
    contrast: Annotated[Number | None, Field(ge=0, le=1)] = None
    saturation: Annotated[Number | None, Field(ge=0, le=1)] = None
    hue: Annotated[Number | None, Field(ge=0, le=0.5, description="a fraction of a full turn")] = None
    hflip: Annotated[bool | None, Strict()] = None
    vflip: Annotated[bool | None, Strict()] = None
    randaugment: Annotated[Whole | None, Field(ge=0, le=30, description="RandAugment's magnitude, a whole number")] = (
        None
    )
    trivial_augment: Annotated[bool | None, Strict()] = None
    hair: Annotated[Number | None, Field(ge=0, le=1, description="a probability")] = None
    erase: Annotated[Number | None, Field(ge=0, le=1, description="a probability")] = None
    mixup: Annotated[Number | None, Field(ge=0, description="Beta's alpha")] = None
    cutmix: Annotated[Number | None, Field(ge=0, description="Beta's alpha")] = None
    # Not null: unlike the switches above, null is not "off" for these (leave the key out for the default).
    mix_prob: Annotated[Number, Field(ge=0, le=1, description=MIX_SHARE)] = AugmentSpec.mix_prob
    mix_switch_prob: Annotated[Number, Field(ge=0, le=1, description=MIX_SHARE)] = AugmentSpec.mix_switch_prob

    @field_validator(
        "rotate", "zoom", "shift", "brightness", "contrast", "saturation", "hue", "randaugment", "hair", "erase",
        "mixup", "cutmix", mode="before",
    )  # fmt: skip
    @classmethod
    def _false_is_off(cls, value: Any) -> Any:
        return 0 if value is False else value

    @model_validator(mode="after")
    def _consistent(self) -> AugmentSettings:
        """Together, as the DataModule will check them (RandAugment and TrivialAugment are alternatives)."""
        AugmentSpec.from_config({k: v for k, v in asdict(self).items() if v is not None})
        return self


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class LoaderSettings:
    """What evaluation may override of a checkpoint's data settings (null = the checkpoint's)."""

    eval_batch_size: Annotated[Whole | None, Field(ge=1, description="null = 2 x batch_size")] = None
    num_workers: Annotated[Whole | None, Field(ge=0, description="0 = in the main process, null = automatic")] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class DataSettings(LoaderSettings):
    image_size: Annotated[Whole | None, Field(ge=1, description="null = the backbone's own size")]
    batch_size: Annotated[Whole, Field(ge=1, description="images per step and process")]
    max_image_pixels: Annotated[Whole, Field(ge=1)]
    cache: CacheSettings
    split: SplitSettings
    augment: AugmentSettings

    @field_validator("cache", "augment", mode="before")
    @classmethod
    def _switch_is_empty(cls, value: Any) -> Any:
        """``data.cache=false`` and ``data.augment=null`` carry no numbers to check."""
        return {} if value is None or isinstance(value, bool) else value


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class TrainerSettings:
    max_epochs: Annotated[Whole, Field(ge=1)]
    accumulate_grad_batches: Annotated[Whole, Field(ge=1)]
    gradient_clip_val: Annotated[Number | None, Field(gt=0, description="null = no clipping")] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class OptimizerSettings:
    lr: Annotated[Number, Field(gt=0, description="the head's learning rate")]
    weight_decay: Annotated[Number | None, Field(ge=0)] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class FinetuneSettings:
    backbone_lr: Annotated[Number, Field(gt=0, description="the backbone's learning rate in stage 2")]
    layer_decay: Annotated[
        Number | None, Field(gt=0, le=1, description="per earlier block; null = one backbone rate")
    ] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class EmaSettings:
    enabled: Annotated[bool, Strict()]
    decay: Annotated[Fraction, Field(description="the weight the average keeps at each step")]
    warmup: Annotated[bool, Strict()]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class EarlyStoppingSettings:
    patience: Annotated[Whole | None, Field(ge=1, description="stage-2 validations; null = never stop early")]
    min_delta: Annotated[Number, Field(ge=0, description="the smallest improvement of the monitored metric")]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class SchedulerSettings:
    """The keys of every scheduler choice (cosine: warm-up and floor; plateau: factor, patience, floor)."""

    warmup_epochs: Annotated[Number | None, Field(ge=0)] = None
    min_lr_ratio: Annotated[Number | None, Field(ge=0, le=1)] = None
    factor: Fraction | None = None
    patience: Annotated[Whole | None, Field(ge=0)] = None
    min_lr: Annotated[Number | None, Field(ge=0)] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class LossSettings:
    label_smoothing: Annotated[Number | None, Field(ge=0, lt=1)] = None
    gamma: Annotated[Number | None, Field(ge=0, description="focal loss focusing")] = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class GallerySettings:
    per_class: Annotated[Whole, Field(ge=1)]


Alpha = Annotated[Fraction, Field(description="the share of images whose conformal set may miss the true class")]
Specificity = Annotated[Fraction, Field(description="the validation specificity of the melanoma/malignant flags")]
Coverage = Annotated[Number, Field(gt=0, le=1, description="the share of validation images kept (not abstained on)")]
OODQuantile = Annotated[Fraction, Field(description="the share of validation images under the OOD threshold")]
OODMethod = Literal["energy", "max_logit"]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ClinicalSettings:
    """``clinical.*`` of training: what the thresholds fitted on validation aim for (defaults: conf/train.yaml)."""

    alpha: Alpha
    specificity: Specificity
    coverage: Coverage
    ood_quantile: OODQuantile
    ood_method: OODMethod
    figures: Annotated[bool, Strict()] = True


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ClinicalOverrides:
    """``clinical.*`` of predict and evaluate: null keeps the value the checkpoint was trained with."""

    alpha: Alpha | None = None
    specificity: Specificity | None = None
    coverage: Coverage | None = None
    ood_quantile: OODQuantile | None = None
    ood_method: OODMethod | None = None


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ModuleSettings:
    colour_constancy: Annotated[Number | None, Field(description="Shades of Gray's p-norm, null = off")] = None
    metadata: Annotated[dict | None, Field(description="metadata=fusion's settings, null = off")] = None
    compile: Any = False
    model: dict | None = None  # ${model}: its block list, for layer_decay
    layer_decay: Any = None  # ${finetune.layer_decay}, whose range FinetuneSettings checks

    @field_validator("colour_constancy")
    @classmethod
    def _power(cls, value: float | None) -> float | None:
        return check_power(value)

    @model_validator(mode="after")
    def _model(self) -> ModuleSettings:
        """The model's own checks, run now rather than once it is built: the metadata option (with compile)
        and the blocks layer-wise decay gives a rate each."""
        fusion_spec(self.metadata, self.compile)
        if self.layer_decay is not None and self.model is not None:
            check_layer_blocks(BackboneSpec.from_config(self.model))
        return self


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class TrainSettings:
    data: DataSettings
    module: ModuleSettings
    trainer: TrainerSettings
    optimizer: OptimizerSettings
    finetune: FinetuneSettings
    scheduler: SchedulerSettings | None = None  # scheduler=constant has no keys
    loss: LossSettings | None = None
    gallery: GallerySettings
    clinical: ClinicalSettings
    seed: Annotated[Whole, Field(ge=0, le=2**32 - 1, description="numpy's seed range")]
    ema: EmaSettings
    early_stopping: EarlyStoppingSettings


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class EnsembleSelectionSettings:
    rounds: Annotated[Whole, Field(ge=1, description="greedy: members added, repetition allowed")]
    metric: Literal["balanced_acc", "nll"]
    folds: Annotated[Whole, Field(ge=2, description="stacking: cross-validation folds on the validation split")]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class TtaSettings:
    """Test-time views of evaluate and predict, checked by the function that builds them (``view_plan``)."""

    tta: Annotated[bool, Strict()]
    tta_views: Whole
    tta_crops: Whole
    tta_scales: list[Number]

    @model_validator(mode="after")
    def _views(self) -> TtaSettings:
        view_plan(self.tta, self.tta_views, self.tta_crops, self.tta_scales)
        return self


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class EvaluateSettings(TtaSettings):
    data: LoaderSettings
    ensemble_method: Literal["mean", "greedy", "stacking"]
    ensemble_selection: EnsembleSelectionSettings
    split_from: Literal["data", "file"]
    clinical: ClinicalOverrides


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class PredictSettings(TtaSettings):
    batch_size: Annotated[Whole, Field(ge=1)]
    clinical: ClinicalOverrides


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ExplainSettings:
    batch_size: Annotated[Whole, Field(ge=1)]
    per_class: Annotated[Whole, Field(ge=1)]
    n: Annotated[Whole | None, Field(ge=1, description="null = every image")]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ParityCheckSettings:
    batch_sizes: Annotated[list[Annotated[Whole, Field(ge=1)]], Field(min_length=1)]
    atol: Annotated[Number, Field(gt=0, description="the largest logit difference allowed")]


@dataclass(frozen=True, kw_only=True, config=SCHEMA)
class ExportSettings:
    opset: Annotated[Whole, Field(ge=7, description="an ONNX opset version")]
    check: ParityCheckSettings


def check_settings(cfg: DictConfig, schema: type[Schema]) -> Schema:
    """``cfg``'s values of ``schema``'s fields, validated, and its run folder checked for writing.

    A SettingError names every bad setting in one line; a FileSystemError says why the folder cannot be written.
    """
    values = {name: to_plain(cfg[name]) for name in schema.__pydantic_fields__ if name in cfg}
    try:
        settings = schema(**values)
    except ValidationError as err:
        raise SettingError("; ".join(_describe(problem, schema) for problem in err.errors())) from None
    except ConfigError as err:  # settings that contradict each other (SplitSettings)
        raise SettingError(str(err)) from None
    check_writable(cfg.paths.output_dir, "paths.output_dir")
    return settings


def _describe(problem: dict, schema: type) -> str:
    """``data.batch_size=0 is not allowed: it must be greater than or equal to 1 (images per step ...)``."""
    setting = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]).lstrip(".")
    if problem["type"] == "missing":
        return f"{setting} is not set"
    rule = re.sub(r"^\w+ should\b", "it must", problem["msg"])  # "Input should be greater than 0"
    hint = _description(schema, problem["loc"])
    return f"{setting}={_shown(problem['input'])} is not allowed: {rule}" + (f" ({hint})" if hint else "")


def _description(schema: type, loc: tuple) -> str | None:
    """The ``description`` of the field at ``loc``, following nested schemas."""
    info = None
    for part in loc:
        fields = getattr(schema, "__pydantic_fields__", {})
        if part not in fields:
            return None
        info = fields[part]
        schema = info.annotation
    return info.description if info is not None else None


def _shown(value: Any) -> str:
    """As the user typed it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
