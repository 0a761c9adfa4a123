"""The DataModule's sub-settings as typed values: ``data.split``, ``data.cache``, ``data.test_set``, ``data.augment``.

Each is read by ``from_config`` from the YAML, from Python, or from a checkpoint's saved settings (plain
dicts, written before these types, possibly missing keys; ``cache: false``), and checked once, when it
is built. The dataclass fields below are the only defaults: a key left out or set to null takes them, so
``conf/data/*.yaml`` may spell them out for its readers without being a second source of them.
``to_dict`` gives the YAML's shape back, which is what the DataModule saves in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from skinlesion.errors import ConfigError

if TYPE_CHECKING:
    from skinlesion.data.preprocessing import Preprocessing

# strategy -> (val, test) fractions used when data.split.val / data.split.test are null.
STRATEGY_DEFAULTS = {"lesion_grouped": (0.15, 0.15), "image_stratified": (0.20, 0.0)}
STRATEGIES = tuple(STRATEGY_DEFAULTS)


def _given(spec: type, values: Mapping | None, section: str) -> dict[str, Any]:
    """The non-null entries of ``values`` (null means the default); a ConfigError names keys ``spec`` lacks,
    so a misspelt setting is refused instead of silently left at its default."""
    values = dict(values or {})
    known = {f.name for f in fields(spec)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"unknown data.{section} key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    return {key: value for key, value in values.items() if value is not None}


AnySpec = TypeVar("AnySpec", bound="_Spec")


class _Spec:
    """What every spec does the same way: read from the config, written back in its shape."""

    _section = ""  # the key under data: its name in error messages

    @classmethod
    def from_config(cls: type[AnySpec], values: Mapping | AnySpec | None) -> AnySpec:
        """The spec of a ``data.<section>`` mapping (YAML, Python or a checkpoint); a spec is returned as it is."""
        if isinstance(values, cls):
            return values
        return cls(**_given(cls, values, cls._section))

    def to_dict(self) -> dict[str, Any]:
        """The YAML's keys and plain values, every default filled in: for a checkpoint or a JSON summary."""
        return asdict(self)


@dataclass(frozen=True)
class SplitSpec(_Spec):
    """``data.split``: how the main dataset is cut into train/val/test (:func:`skinlesion.data.splits.assign_splits`).

    ``val`` and ``test`` are numbers once built: null takes the strategy's fractions (:data:`STRATEGY_DEFAULTS`),
    and the resolved values are what checkpoints keep, so they rebuild this split even if the defaults change.
    """

    _section = "split"

    strategy: str = "lesion_grouped"
    val: float | None = None  # null = the strategy's
    test: float | None = None  # null = the strategy's; 0 = no internal test split
    seed: int = 42
    num_folds: int | None = None  # k-fold cross-validation: fold (0..num_folds-1) is the validation split
    fold: int | None = None

    def __post_init__(self) -> None:
        """Settings no data could satisfy fail here, before any file is read."""
        if self.strategy not in STRATEGY_DEFAULTS:
            raise ConfigError(f"unknown data.split.strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        default_val, default_test = STRATEGY_DEFAULTS[self.strategy]
        val = default_val if self.val is None else float(self.val)
        test = default_test if self.test is None else float(self.test)
        num_folds, fold = self.num_folds, self.fold
        if num_folds is not None:
            if int(num_folds) < 2:
                raise ConfigError(f"data.split.num_folds={num_folds} must be at least 2")
            if fold is None or not 0 <= int(fold) < int(num_folds):
                raise ConfigError(
                    f"data.split.fold={fold} must be in 0..{int(num_folds) - 1} for num_folds={num_folds}"
                )
        else:
            if fold is not None:
                raise ConfigError(f"data.split.fold={fold} needs data.split.num_folds (k-fold cross-validation)")
            if val + test >= 1:
                raise ConfigError(f"data.split.val + data.split.test = {val + test:g} leaves nothing to train on")
        if test < 0:
            raise ConfigError(f"data.split.test={test} must be 0 (no test split) or a fraction between 0 and 1")
        resolved = {"val": val, "test": test, "seed": int(self.seed)}
        resolved |= {"num_folds": int(num_folds), "fold": int(fold)} if num_folds is not None else {}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class CacheSpec(_Spec):
    """``data.cache``: every image decoded once, at :meth:`source_size`, into a memory-mapped uint8 array."""

    _section = "cache"

    enabled: bool = True  # false: decode every image every epoch
    dir: str = "data/cache"
    size: int | None = None  # null = the backbone's resize size (image_size / crop_pct)

    @classmethod
    def from_config(cls, values: Mapping | bool | CacheSpec | None) -> CacheSpec:
        """``data.cache=false`` is short for ``data.cache.enabled=false``."""
        return super().from_config({"enabled": values} if isinstance(values, bool) else values)

    def source_size(self, preprocessing: Preprocessing) -> int:
        """The side every image is resized to first, cached or not (augmentation and the eval transform start
        from it): a little above the input size, so that rotations and crops keep detail. Training, evaluation
        and the tools for new images all take it from here, so they see the same pixels."""
        return int(self.size or preprocessing.resize_size)


@dataclass(frozen=True)
class TestSetSpec(_Spec):
    """``data.test_set``: an external labelled set that replaces the internal test split (null = none)."""

    __test__ = False  # not a test class, whatever pytest makes of its name
    _section = "test_set"

    root: str = ""  # required: the folder of the external test set
    layout: str = "auto"  # auto | ham10000 | isic2018
    subset: str = "Test"

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("data.test_set needs a root (the folder of the external test set)")
        object.__setattr__(self, "root", str(self.root))

    @classmethod
    def from_config(cls, values: Mapping | TestSetSpec | None) -> TestSetSpec | None:
        """None when there is no external set (``test_set: null``)."""
        return None if values is None else super().from_config(values)


@dataclass(frozen=True)
class AugmentSpec(_Spec):
    """``data.augment``, training only (:func:`skinlesion.data.transforms.train_transform`). Every augmentation
    is off unless set: a key left out, null, 0 or false switches it off, and ``augment: null`` trains on
    plainly resized images; the recipe the project trains with is the one in ``conf/data/ham10000.yaml``."""

    _section = "augment"

    rotate: float = 0.0  # degrees, +-
    zoom: float = 0.0  # x and y each scaled by 1+-zoom
    shift: float = 0.0  # +- this fraction of the side
    brightness: float = 0.0  # factor 1+-x
    contrast: float = 0.0  # factor 1+-x about the image's mean luma
    hflip: bool = False
    vflip: bool = False
    hue: float = 0.0  # +- this fraction of a full turn
    saturation: float = 0.0  # factor 1+-x
    # The ISIC leaders' augmentations (left out of conf/data/*.yaml: off unless set on the command line).
    randaugment: float = 0.0  # magnitude, a whole number (1-30; 9 = torchvision's default), of RandAugment, 2 ops
    trivial_augment: bool = False  # TrivialAugmentWide: one op per image at a random magnitude
    hair: float = 0.0  # probability of drawing 1-6 thin dark hair-like curves on an image
    erase: float = 0.0  # probability of erasing one random rectangle with noise (timm's RandomErasing)
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha), batches mixed on the device (timm's Mixup)
    cutmix: float = 0.0  # alpha of CutMix's Beta(alpha, alpha)
    mix_prob: float = 1.0  # with mixup or cutmix on: the share of batches mixed
    mix_switch_prob: float = 0.5  # with both on: the share of mixed batches that get CutMix rather than mixup

    def __post_init__(self) -> None:
        """Switches as booleans and amounts as floats, whatever the YAML or an old checkpoint wrote (false = 0);
        null is off only where off is the default (not for ``mix_prob``: leave the key out for its default)."""
        for switch in fields(self):
            value = getattr(self, switch.name)
            if value is None and switch.default:
                raise ConfigError(
                    f"data.augment.{switch.name}=null is not allowed: give a number, or leave it out for "
                    f"{switch.default}"
                )
            typed = bool(value) if isinstance(switch.default, bool) else float(value or 0)
            object.__setattr__(self, switch.name, typed)
        if self.randaugment and self.trivial_augment:  # the ranges are checked by skinlesion.settings
            raise ConfigError("data.augment: randaugment and trivial_augment are alternatives; set only one of them")

    @classmethod
    def from_config(cls, values: Mapping | bool | AugmentSpec | None) -> AugmentSpec:
        """``data.augment=false`` (or null) is every augmentation off."""
        return super().from_config(values or None)
