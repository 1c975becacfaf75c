"""Opening an image the way training does, and checking a file before it enters the index.

:func:`open_rgb` is the one way every stage turns a file into pixels (download checks it,
extract_features and predict use it), so an image that passes :func:`inspect_image` is an image
that training can read, with the same orientation and colours:

- EXIF orientation is applied (a phone photo stored sideways comes out upright).
- Every mode becomes 8-bit RGB: grayscale and 1-bit are replicated to three channels, CMYK and
  YCbCr are converted, transparency (RGBA, LA, PA, a palette or grayscale with a transparent
  colour) is composited over white, and 16-bit and 32-bit images are *scaled* to 0..255, not
  clipped (a 16-bit value v becomes round(v / 257): 65535 -> 255, 32768 -> 128).
- Animated GIF and WebP: the first frame.
- Decompression bombs (more than ``max_image_pixels`` pixels) are refused from the header alone,
  before any pixel is decoded, with a message that names the configured limit and its param
  (``download.max_image_pixels``), not Pillow's own (which raises only at twice its setting).

The module needs only Pillow and numpy, so it stays cheap to import in worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OK = "ok"
CORRUPT = "corrupt"
NOT_AN_IMAGE = "not-an-image"
TOO_SMALL = "too-small"
TOO_LARGE = "too-large"
STATUSES = (OK, CORRUPT, NOT_AN_IMAGE, TOO_SMALL, TOO_LARGE)

_HASH_CHUNK_BYTES = 1 << 20
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MAX = 65535
# Pillow reads its bomb limit from a module global; this lock keeps our temporary override of it
# (held only while a header is parsed, never while pixels are decoded) from racing other threads.
_PILLOW_LIMIT_LOCK = threading.Lock()
MAX_IMAGE_PIXELS_PARAM = "download.max_image_pixels"  # where every caller's limit comes from


@dataclasses.dataclass(frozen=True)
class ImageCheck:
    """What :func:`inspect_image` found out about one file.

    Attributes:
        sha256: hex digest of the file's bytes ("" when the file could not be read).
        width: width after EXIF orientation, or ``None`` when the pixels were not decoded.
        height: height after EXIF orientation, or ``None``.
        status: one of :data:`STATUSES`.
        detail: why the file is not ok ("" when it is).
    """

    sha256: str
    width: int | None
    height: int | None
    status: str
    detail: str


def sha256_file(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_rgb(path: str | os.PathLike, *, max_image_pixels: int) -> Image.Image:
    """Opens an image the way training does: upright, 8-bit RGB, fully decoded.

    Args:
        path: the image file.
        max_image_pixels: images with more pixels than this are refused before decoding.

    Returns:
        A loaded ``RGB`` image, independent of the file (the file is closed).

    Raises:
        PIL.UnidentifiedImageError: the file is not an image format Pillow can read.
        PIL.Image.DecompressionBombError: the image has more than ``max_image_pixels`` pixels.
        OSError, SyntaxError, ValueError: the file is truncated or damaged.
    """
    with open_header(path, max_image_pixels=max_image_pixels) as image:
        rgb = to_rgb(image)
        # Closing the file also frees the pixels of the object it opened, so keep a copy of those.
        return rgb.copy() if rgb is image else rgb


@contextlib.contextmanager
def open_header(path: str | os.PathLike, *, max_image_pixels: int) -> Iterator[Image.Image]:
    """Opens an image lazily (header only) with the bomb check done; closes it on exit.

    Raises:
        PIL.UnidentifiedImageError: not an image format Pillow can read.
        PIL.Image.DecompressionBombError: more than ``max_image_pixels`` pixels.
    """
    with _pillow_limit_off():
        image = Image.open(path)
    try:
        pixels = image.width * image.height
        if pixels > max_image_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} = {pixels} pixels, more than {MAX_IMAGE_PIXELS_PARAM}="
                f"{max_image_pixels} (a possible decompression bomb); raise {MAX_IMAGE_PIXELS_PARAM} "
                "if such images are genuine"
            )
        yield image
    finally:
        image.close()


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    # Pillow's own check warns above its limit and raises only above twice it, with its own
    # numbers in the message; :func:`open_header` checks the header against ours instead, right
    # after Pillow has read it. Pillow's global is restored afterwards.
    with _PILLOW_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Decodes ``image`` (its first frame), applies EXIF orientation, returns 8-bit RGB.

    ``image`` itself is oriented in place and is returned as it is when already plain RGB.
    """
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _scale_to_rgb(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return "transparency" in image.info or any(band in ("A", "a") for band in image.getbands())


def _scale_to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit data keeps its full range: round(v / 257) maps 0..65535 onto 0..255 exactly.
    # 32-bit integer and float images have no fixed range; those inside 0..65535 (integers) or
    # 0..1 (floats) use that range, anything else is stretched from its own minimum to maximum.
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, float(_SIXTEEN_BIT_MAX)
    else:
        low, high = _value_range(values, image.mode)
    scaled = np.rint((values - low) * (255.0 / max(high - low, 1e-12)))
    gray = np.clip(scaled, 0, 255).astype(np.uint8)  # only guards rounding; the range already fits
    return Image.fromarray(gray).convert("RGB")


def _value_range(values: np.ndarray, mode: str) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if mode == "I" and low >= 0 and high <= _SIXTEEN_BIT_MAX:
        return 0.0, float(_SIXTEEN_BIT_MAX)
    if mode == "F" and low >= 0 and high <= 1.0:
        return 0.0, 1.0
    return low, high


def inspect_image(path: str | os.PathLike, *, min_image_side: int, max_image_pixels: int) -> ImageCheck:
    """Checks one file by decoding it exactly as :func:`open_rgb` does; never raises for bad files.

    Args:
        path: the file.
        min_image_side: a decoded image whose shorter side is below this is ``too-small``.
        max_image_pixels: an image with more pixels than this is ``too-large`` (not decoded).

    Returns:
        The file's sha256, its size after EXIF orientation and a status from :data:`STATUSES`:
        ``not-an-image`` (not a format Pillow reads), ``corrupt`` (truncated or damaged, or an
        image file extension on unreadable content), ``too-large``, ``too-small`` or ``ok``.
    """
    try:
        digest = sha256_file(path)
    except OSError as error:
        return ImageCheck("", None, None, CORRUPT, f"cannot read the file: {error}")
    try:
        with open_header(path, max_image_pixels=max_image_pixels) as image:
            width, height = to_rgb(image).size
    except UnidentifiedImageError:
        return _unidentified(path, digest)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return ImageCheck(digest, None, None, TOO_LARGE, str(error))
    except Exception as error:  # noqa: BLE001 - any decoder failure means a damaged file
        return ImageCheck(digest, None, None, CORRUPT, f"cannot decode: {_describe(error)}")
    if min(width, height) < min_image_side:
        detail = f"{width}x{height} pixels: the shorter side is below download.min_image_side={min_image_side}"
        return ImageCheck(digest, width, height, TOO_SMALL, detail)
    return ImageCheck(digest, width, height, OK, "")


def _unidentified(path: str | os.PathLike, digest: str) -> ImageCheck:
    suffix = Path(path).suffix.lower()
    if suffix and suffix in Image.registered_extensions():
        detail = f"named like an image ({suffix}) but its content is not a readable image"
        return ImageCheck(digest, None, None, CORRUPT, detail)
    return ImageCheck(digest, None, None, NOT_AN_IMAGE, "not an image format that Pillow can read")


def _describe(error: Exception) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
