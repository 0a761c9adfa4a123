"""A synthetic HAM10000 look-alike that a new user can train on without downloading anything.

It writes the exact on-disk layout of the Kaggle download (``HAM10000_metadata.csv`` with the real
columns, ``sex, age, localization, dataset, dx_type`` drawn per lesion with plausible shares that depend on
the diagnosis as in HAM10000 (:data:`CLASS_PATIENTS`), so the subgroup audit has something to split by and
the metadata fusion model something to learn, ``ISIC_XXXXXXX.jpg`` split over ``HAM10000_images_part_1/``
and ``_part_2/``, 600x450 RGB JPEGs),
with HAM10000's class proportions, several photos of some lesions, and class-dependent lesion colour,
shape, border, texture and size on a skin-like background, so that a model can genuinely learn it.
Beside the metadata it writes ``lesion_geometry.csv`` (centre and radii of each lesion in pixels), which
real data does not have and which tests use to check where Grad-CAM looks.

    python -m skinlesion.data.synthetic out=DIR n_images=N seed=S
"""

from __future__ import annotations

import logging
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from skinlesion import cli
from skinlesion.data.layouts import HAM_LOCALIZATIONS, HAM_METADATA
from skinlesion.labels import CLASSES

log = logging.getLogger(__name__)

GEOMETRY_FILE = "lesion_geometry.csv"
PART_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
FIRST_IMAGE_NUMBER = 24306  # HAM10000's first ISIC id

# HAM10000 image counts per class (10,015 images) and images per lesion (10,015 / 7,470 overall).
HAM_IMAGE_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
HAM_IMAGES_PER_LESION = {
    "akiec": 1.43,
    "bcc": 1.57,
    "bkl": 1.51,
    "df": 1.58,
    "mel": 1.81,
    "nv": 1.24,
    "vasc": 1.45,
}
# HAM10000's source clinics and devices, with their shares of its images.
DATASETS = {"vidir_molemax": 0.395, "vidir_modern": 0.336, "rosendahl": 0.225, "vienna_dias": 0.044}
# Per class, as in HAM10000 (roughly): mean age, share of men, and the sites it is most often found on
# (weight 1 each besides a small weight for every site), so that the metadata model has something to learn.
CLASS_PATIENTS = {
    "akiec": (67, 0.68, ("face", "upper extremity", "scalp", "hand")),
    "bcc": (66, 0.60, ("back", "face", "trunk", "chest")),
    "bkl": (63, 0.55, ("face", "back", "trunk", "upper extremity")),
    "df": (52, 0.48, ("lower extremity",)),
    "mel": (60, 0.61, ("back", "upper extremity", "lower extremity", "trunk")),
    "nv": (44, 0.51, ("back", "lower extremity", "trunk", "abdomen")),
    "vasc": (50, 0.45, ("trunk", "lower extremity", "face")),
}
OTHER_SITE_WEIGHT = 0.04


@dataclass(frozen=True)
class LesionStyle:
    """What makes a class look like itself: colours in RGB, relative radius, border and texture."""

    colour: tuple[int, int, int]
    colour_jitter: int
    radius: tuple[float, float]  # fraction of the image height
    irregularity: float  # 0 = circle, larger = more jagged border
    elongation: tuple[float, float]
    blur: int  # border softness in pixels (odd)
    texture: str


STYLES: dict[str, LesionStyle] = {
    "akiec": LesionStyle((200, 80, 60), 12, (0.16, 0.26), 0.30, (1.0, 1.5), 31, "scaly"),
    "bcc": LesionStyle((235, 190, 195), 10, (0.14, 0.24), 0.12, (1.0, 1.3), 9, "vessels"),
    "bkl": LesionStyle((165, 120, 70), 12, (0.18, 0.28), 0.10, (1.0, 1.6), 5, "cracks"),
    "df": LesionStyle((125, 80, 60), 10, (0.10, 0.15), 0.05, (1.0, 1.15), 15, "ring"),
    "mel": LesionStyle((45, 30, 30), 10, (0.22, 0.34), 0.45, (1.1, 1.7), 7, "blue_veil"),
    "nv": LesionStyle((115, 70, 40), 12, (0.10, 0.18), 0.04, (1.0, 1.25), 11, "network"),
    "vasc": LesionStyle((175, 25, 70), 10, (0.09, 0.16), 0.08, (1.0, 1.3), 5, "lacunae"),
}


@dataclass(frozen=True)
class Lesion:
    """One lesion: every photo of it shares these parameters."""

    lesion_id: str
    dx: str
    seed: int


def class_counts(n_images: int, min_lesions_per_class: int) -> dict[str, int]:
    """Images per class in HAM10000 proportions, at least one per required lesion, summing to ``n_images``."""
    total = sum(HAM_IMAGE_COUNTS.values())
    if n_images < min_lesions_per_class * len(CLASSES):
        raise ValueError(
            f"n_images={n_images} is too small: need at least {min_lesions_per_class * len(CLASSES)} "
            f"for min_lesions_per_class={min_lesions_per_class} over {len(CLASSES)} classes"
        )
    counts = {c: max(min_lesions_per_class, round(n_images * HAM_IMAGE_COUNTS[c] / total)) for c in CLASSES}
    counts["nv"] += n_images - sum(counts.values())  # the majority class absorbs rounding
    return counts


def plan_lesions(n_images: int, seed: int, min_lesions_per_class: int) -> list[tuple[Lesion, int]]:
    """(lesion, number of photos) pairs; some lesions get several photos, as in HAM10000."""
    rng = np.random.default_rng(seed)
    plan: list[tuple[Lesion, int]] = []
    lesion_number = 0
    for dx, n_class in class_counts(n_images, min_lesions_per_class).items():
        # Geometric photos-per-lesion with HAM10000's mean, but at least min_lesions_per_class lesions so
        # that a grouped split can still stratify a small dataset.
        p = 1.0 / HAM_IMAGES_PER_LESION[dx]
        remaining = n_class
        lesions_left = min_lesions_per_class
        while remaining > 0:
            lesions_left = max(lesions_left - 1, 0)
            take = int(min(rng.geometric(p), remaining - lesions_left, 4))
            take = max(take, 1)
            plan.append((Lesion(f"HAM_{lesion_number:07d}", dx, int(rng.integers(2**31))), take))
            lesion_number += 1
            remaining -= take
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def _skin_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    tone = np.array([225, 180, 150], dtype=np.float32) * rng.uniform(0.8, 1.05) + rng.normal(0, 5, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (xx / width - 0.5) * rng.normal(0, 20) + (yy / height - 0.5) * rng.normal(0, 20)
    image = np.empty((height, width, 3), np.float32)
    image[:] = tone
    image += gradient[..., None]
    noise = cv2.GaussianBlur(rng.normal(0, 9, (height, width)).astype(np.float32), (0, 0), 3)
    image += noise[..., None]
    # Dermoscopy vignette: a dark rim around the lens field.
    r = np.hypot((xx - width / 2) / (width / 2), (yy - height / 2) / (height / 2))
    image *= np.clip(1.25 - 0.45 * r**3, 0.25, 1.0)[..., None]
    return image


def _lesion_mask(
    rng: np.random.Generator, style: LesionStyle, height: int, width: int, centre, radius, angle
) -> np.ndarray:
    elong = rng.uniform(*style.elongation)
    n = 48
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = (
        1
        + style.irregularity * np.convolve(np.r_[rng.normal(0, 1, n), rng.normal(0, 1, 4)], np.ones(5) / 5, "valid")[:n]
    )
    rx, ry = radius * elong * wobble, radius * wobble
    pts = np.stack(
        [
            centre[0] + rx * np.cos(theta) * np.cos(angle) - ry * np.sin(theta) * np.sin(angle),
            centre[1] + rx * np.cos(theta) * np.sin(angle) + ry * np.sin(theta) * np.cos(angle),
        ],
        axis=1,
    )
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (style.blur, style.blur), 0)
    return soft


def _texture(rng: np.random.Generator, style: LesionStyle, mask: np.ndarray, centre, radius) -> np.ndarray:
    """An RGB offset image painting the class's characteristic pattern inside the lesion."""
    h, w = mask.shape
    tex = np.zeros((h, w, 3), np.float32)
    cx, cy = centre
    if style.texture == "network":  # pigment network: a brown grid
        step = max(4, int(radius / 6))
        grid = np.zeros((h, w), np.float32)
        grid[::step, :] = 1
        grid[:, ::step] = 1
        tex -= 25 * cv2.GaussianBlur(grid, (3, 3), 0)[..., None]
    elif style.texture == "blue_veil":  # blue-white veil and several colours
        for _ in range(4):
            c = (int(cx + rng.normal(0, radius / 2)), int(cy + rng.normal(0, radius / 2)))
            blob = np.zeros((h, w), np.float32)
            cv2.circle(blob, c, int(radius * rng.uniform(0.2, 0.45)), 1.0, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), radius / 8)
            tex += blob[..., None] * np.array([40, 70, 120], np.float32) * rng.uniform(0.5, 1.0)
    elif style.texture == "vessels":  # arborising red vessels
        lines = np.zeros((h, w), np.float32)
        for _ in range(7):
            p0 = (int(cx + rng.normal(0, radius / 2)), int(cy + rng.normal(0, radius / 2)))
            p1 = (int(p0[0] + rng.normal(0, radius / 1.5)), int(p0[1] + rng.normal(0, radius / 1.5)))
            cv2.line(lines, p0, p1, 1.0, max(2, int(radius / 12)))
        tex += lines[..., None] * np.array([-20, -150, -140], np.float32)
    elif style.texture == "cracks":  # cerebriform fissures
        lines = np.zeros((h, w), np.float32)
        for _ in range(12):
            p0 = (int(cx + rng.normal(0, radius / 2)), int(cy + rng.normal(0, radius / 2)))
            p1 = (int(p0[0] + rng.normal(0, radius / 3)), int(p0[1] + rng.normal(0, radius / 3)))
            cv2.line(lines, p0, p1, 1.0, max(3, int(radius / 10)))
        tex -= lines[..., None] * 70
    elif style.texture == "scaly":  # rough, scaly surface
        noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2)
        tex += (noise * 30)[..., None] + np.array([60, 70, 70], np.float32) * (noise > 0.5)[..., None]
    elif style.texture == "ring":  # dermatofibroma: central white patch
        centre_patch = np.zeros((h, w), np.float32)
        cv2.circle(centre_patch, (int(cx), int(cy)), int(radius * 0.55), 1.0, -1)
        centre_patch = cv2.GaussianBlur(centre_patch, (0, 0), radius / 6)
        tex += centre_patch[..., None] * np.array([110, 140, 150], np.float32)
    elif style.texture == "lacunae":  # red-purple lagoons
        for _ in range(6):
            c = (int(cx + rng.normal(0, radius / 2.5)), int(cy + rng.normal(0, radius / 2.5)))
            blob = np.zeros((h, w), np.float32)
            cv2.circle(blob, c, int(radius * rng.uniform(0.15, 0.3)), 1.0, -1)
            tex += cv2.GaussianBlur(blob, (0, 0), 2)[..., None] * np.array([-90, -10, 40], np.float32)
    return tex * mask[..., None]


def render_lesion(lesion: Lesion, photo: int, width: int = 600, height: int = 450) -> tuple[np.ndarray, tuple]:
    """One RGB photo of a lesion and its geometry (cx, cy, rx, ry); photos of one lesion differ by pose."""
    style = STYLES[lesion.dx]
    base = np.random.default_rng(lesion.seed)  # shared by every photo of the lesion
    radius0 = base.uniform(*style.radius) * height
    colour = np.array(style.colour, np.float32) * base.uniform(0.9, 1.1)
    colour += base.normal(0, style.colour_jitter / 3, 3)
    rng = np.random.default_rng([lesion.seed, photo])  # this photo: pose, zoom, lighting
    radius = radius0 * rng.uniform(0.9, 1.1)
    centre = (width / 2 + rng.normal(0, width * 0.06), height / 2 + rng.normal(0, height * 0.06))
    angle = rng.uniform(0, np.pi)

    image = _skin_background(rng, height, width)
    shape_rng = np.random.default_rng([lesion.seed, 7])  # the border belongs to the lesion, not the photo
    mask = _lesion_mask(shape_rng, style, height, width, centre, radius, angle)
    lesion_rgb = colour + _texture(rng, style, mask, centre, radius) / np.maximum(mask[..., None], 1e-3)
    lesion_rgb = np.where(mask[..., None] > 1e-3, lesion_rgb, 0)
    image = image * (1 - mask[..., None]) + lesion_rgb * mask[..., None]
    image *= rng.uniform(0.9, 1.1)  # exposure
    image += rng.normal(0, 3, image.shape)
    extent_x = radius * max(style.elongation) * (1 + style.irregularity)
    extent_y = radius * (1 + style.irregularity)
    r = max(extent_x, extent_y)
    return np.clip(image, 0, 255).astype(np.uint8), (centre[0], centre[1], r, r)


def _metadata_row(lesion: Lesion, image_id: str) -> dict:
    """Patient and site belong to the lesion, so every photo of it shares them, as in HAM10000."""
    rng = np.random.default_rng([lesion.seed, 99])
    dx_type = (
        "histo"
        if lesion.dx in ("mel", "bcc", "akiec", "df")
        else rng.choice(["histo", "follow_up", "consensus", "confocal"], p=[0.45, 0.35, 0.17, 0.03])
    )
    mean_age, men, sites = CLASS_PATIENTS[lesion.dx]
    age = "" if rng.random() < 0.006 else float(5 * int(np.clip(rng.normal(mean_age, 14) // 5, 0, 17)))
    site_weights = np.array([1.0 if site in sites else OTHER_SITE_WEIGHT for site in HAM_LOCALIZATIONS])
    return {
        "lesion_id": lesion.lesion_id,
        "image_id": image_id,
        "dx": lesion.dx,
        "dx_type": dx_type,
        "age": age,
        "sex": rng.choice(["male", "female", "unknown"], p=[0.995 * men, 0.995 * (1 - men), 0.005]),
        "localization": rng.choice(HAM_LOCALIZATIONS, p=site_weights / site_weights.sum()),
        # Sets made before metadata fusion drew age, sex and site without CLASS_PATIENTS, so their metadata
        # columns differ from today's (the row's rng is the lesion's own: images and lesions are unchanged).
        "dataset": rng.choice(list(DATASETS), p=np.array(list(DATASETS.values())) / sum(DATASETS.values())),
    }


def generate(
    out: str | Path,
    n_images: int = 1500,
    seed: int = 0,
    width: int = 600,
    height: int = 450,
    min_lesions_per_class: int = 8,
    jpeg_quality: int = 90,
    num_workers: int = 4,
) -> Path:
    """Write the dataset into ``out`` (created, or an empty folder) and return it.

    It is built in ``<out>.partial`` and renamed when complete, so a failure leaves nothing behind."""
    out = Path(out)
    require_empty(out)
    plan = plan_lesions(n_images, seed, min_lesions_per_class)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():  # left by an interrupted run that could not clean up (killed)
        shutil.rmtree(tmp)
    try:
        _write_dataset(tmp, plan, width, height, jpeg_quality, num_workers)
        if out.exists():  # empty, checked above
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d synthetic images of %d lesions to %s", sum(n for _, n in plan), len(plan), out)
    return out


def require_empty(out: Path) -> None:
    """Synthetic images never go next to files a user put there."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a missing or empty folder for the synthetic dataset")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} already holds files; synthetic data is only generated into a missing or empty folder: "
            "choose another one (data.root=... when training)"
        )


def _write_dataset(tmp: Path, plan, width: int, height: int, jpeg_quality: int, num_workers: int) -> None:
    for part in PART_DIRS:
        (tmp / part).mkdir(parents=True, exist_ok=True)

    jobs = []
    number = FIRST_IMAGE_NUMBER
    for lesion, n_photos in plan:
        for photo in range(n_photos):
            jobs.append((lesion, photo, f"ISIC_{number:07d}"))
            number += 1
    half = (len(jobs) + 1) // 2

    def write(i_job: int) -> tuple:
        lesion, photo, image_id = jobs[i_job]
        image, geometry = render_lesion(lesion, photo, width, height)
        path = tmp / PART_DIRS[i_job >= half] / f"{image_id}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        return geometry

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        geometries = list(pool.map(write, range(len(jobs))))

    rows = [_metadata_row(lesion, image_id) for lesion, _, image_id in jobs]
    pd.DataFrame(rows).to_csv(tmp / HAM_METADATA, index=False)
    geometry = pd.DataFrame(geometries, columns=["cx", "cy", "rx", "ry"]).round(1)
    geometry.insert(0, "image_id", [image_id for _, _, image_id in jobs])
    geometry.to_csv(tmp / GEOMETRY_FILE, index=False)


def ensure_dataset(root: str | Path, **params) -> Path:
    """Generate the dataset at ``root`` unless it is already there (first training with ``data=synthetic``)."""
    root = Path(root)
    if (root / HAM_METADATA).is_file():
        return root
    log.info("generating the synthetic dataset into %s (first use)", root)
    return generate(root, **params)


def require_dataset(root: str | Path, params: dict) -> None:
    """Commands other than training read a synthetic set and never make one: a moved ``data.root`` must not be
    replaced by a new set scored as if it were the run's."""
    root = Path(root)
    if not (root / HAM_METADATA).is_file():
        options = " ".join(f"{k}={v}" for k, v in params.items() if k in OPTIONS)
        raise FileNotFoundError(
            f"no synthetic dataset at data.root={root} (no {HAM_METADATA}); only training generates one. Point "
            f"data.root=... to where it is now, or make it again: python -m skinlesion.data.synthetic out={root} "
            f"{options}".rstrip()
        )


OPTIONS = {"out", "n_images", "seed", "width", "height", "min_lesions_per_class", "jpeg_quality", "num_workers"}
USAGE = (
    "usage: python -m skinlesion.data.synthetic out=DIR [n_images=1500] [seed=0] [width=600] [height=450] "
    "[min_lesions_per_class=8] [jpeg_quality=90] [num_workers=4]"
)


def main(argv: list[str] | None = None) -> int:
    options = cli.key_value_arguments(sys.argv[1:] if argv is None else argv, OPTIONS, USAGE, required={"out"})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = generate(**options)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"synthetic HAM10000 dataset written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
