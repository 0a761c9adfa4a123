"""Reading one image file into an RGB uint8 array, and telling a bad file from a good one cheaply.

Every path that turns a file into pixels (decode-per-epoch loading, the decoded-image cache, `predict`,
`explain`) goes through :func:`load_rgb`, so grayscale, RGBA, palette and 16-bit images become RGB the
same way everywhere, and an oversized image is refused before it is decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; the largest ISIC originals are ~6700x4400
Image.MAX_IMAGE_PIXELS = None  # the limit is ours (max_pixels), with a message that names the file
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"


class ImageReadError(Exception):
    """The file cannot be used as an image; the message says why (without the path).

    Messages start with a short kind ("missing file", "empty file", "not an image", "truncated file",
    "corrupt image", "too large"), then details in parentheses, so reports can count problems by kind.
    """


def _open(path: Path, max_pixels: int) -> Image.Image:
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise ImageReadError("missing file") from err
    if size == 0:
        raise ImageReadError("empty file (0 bytes)")
    try:
        image = Image.open(path)
    except UnidentifiedImageError as err:
        raise ImageReadError("not an image (unrecognised format)") from err
    except OSError as err:
        kind = "truncated file" if "truncated" in str(err).lower() else "unreadable file"
        raise ImageReadError(f"{kind} ({err})") from err
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(
            f"too large ({width}x{height} pixels, over data.max_image_pixels={max_pixels:,}; "
            "refused as a possible decompression bomb)"
        )
    return image


def check_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the file is unusable, from its header and end markers alone, or None if it looks fine."""
    path = Path(path)
    try:
        with _open(path, max_pixels) as image:
            fmt = image.format
            image.verify()
    except ImageReadError as err:
        return str(err)
    except Exception as err:  # PIL raises many types from verify() on corrupt data
        return f"corrupt image ({err})"
    marker = {"JPEG": _JPEG_EOI, "PNG": _PNG_IEND}.get(fmt or "")
    if marker:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64))
            if marker not in handle.read():
                return f"truncated file ({fmt} without its end marker)"
    return None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 from any PIL mode; 16-bit and 32-bit grayscale are scaled, not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> np.ndarray:
    """Decode ``path`` to HxWx3 uint8 RGB; ``draft`` lets JPEG decode at a reduced scale >= that size."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warnings (EXIF, palette) are not actionable here
        image = _open(path, max_pixels)
        try:
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            image.load()
            return to_rgb_array(image)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on corrupt data
            raise ImageReadError(f"corrupt image ({err})") from err
        finally:
            image.close()


def load_resized(
    path: str | Path, size: int, interpolation: int = cv2.INTER_CUBIC, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """``size`` x ``size`` RGB as the decoded-image cache stores it (and the plain path feeds augmentation):
    area averaging when shrinking (antialiased), the backbone's ``interpolation`` when enlarging."""
    image = load_rgb(path, max_pixels=max_pixels, draft=size)
    if image.shape[:2] != (size, size):
        shrinking = image.shape[0] > size and image.shape[1] > size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else interpolation)
    return image
