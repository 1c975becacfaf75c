"""Augmentation as data: seeded recipes and the one function that renders them.

The augment stage does not write pixels. It writes *recipes*: small canonical JSON strings that
say how to make one view of one training image. extract_features turns (image, recipe) into
pixels with :func:`render_view`, so a view is keyed by (image sha256, recipe) in the embedding
cache exactly like an original (whose recipe is the empty string).

A view's recipe is drawn from a generator seeded by (seed, image sha256, copy index): it does
not change when other images are added or removed, or when the split moves. All seven random
numbers of a view are drawn whether or not their augmentation is on, so turning one
augmentation off or changing its range leaves the others' draws as they were.

Rendering a view: crop a window of ``zoom`` times each side, placed by ``center_x`` /
``center_y`` (0 = left/top edge, 1 = right/bottom edge), and resize it to the output size with
Pillow's bilinear filter in one step; rotate by ``rotation`` degrees counter-clockwise
(bilinear; the corners are filled by mirroring the image, not with black); mirror left-right if
``flip``; then shift brightness by ``brightness`` of the full range and scale contrast by
``contrast`` around each channel's mean (computed in float64 per level, rounded, clipped to
uint8 and applied as a per-channel lookup table).

The augment stage's preview grid is drawn by :mod:`transferlab.data.augment_preview`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageStat

ORIGINAL = ""  # the recipe of an original image: the plain resize, nothing else
RECIPE_DECIMALS = 4


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to make one augmented view of an image (see the module docstring for the order)."""

    flip: bool = False
    zoom: float = 1.0  # share of each side kept, in (0, 1]
    center_x: float = 0.5  # where the kept window sits, 0 = left edge .. 1 = right edge
    center_y: float = 0.5  # 0 = top edge .. 1 = bottom edge
    rotation: float = 0.0  # degrees, counter-clockwise
    brightness: float = 0.0  # added, as a share of the full range (0.1 = +25.5 levels)
    contrast: float = 1.0  # factor around each channel's mean

    def __post_init__(self) -> None:
        checks = {
            "zoom": 0.0 < self.zoom <= 1.0,
            "center_x": 0.0 <= self.center_x <= 1.0,
            "center_y": 0.0 <= self.center_y <= 1.0,
            "rotation": -180.0 <= self.rotation <= 180.0,
            "brightness": -1.0 <= self.brightness <= 1.0,
            "contrast": 0.0 <= self.contrast <= 2.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad or not isinstance(self.flip, bool):
            raise ValueError(f"invalid recipe values for {', '.join(bad) or 'flip'}: {self!r}")

    def to_string(self) -> str:
        """The canonical JSON form: sorted keys, floats rounded to 4 decimals, no spaces."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = value if isinstance(value, bool) else round(float(value), RECIPE_DECIMALS) + 0.0
        return json.dumps(values, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_string(cls, text: str) -> Recipe:
        """Parses a canonical recipe string (not the original's ``""``)."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"recipe {text!r} is not JSON: {error}") from None
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise ValueError(f"recipe {text!r} must be a JSON object with exactly the keys {', '.join(sorted(names))}")
        try:
            return cls(**values)
        except TypeError as error:  # a value of the wrong type, e.g. a string for zoom
            raise ValueError(f"recipe {text!r} has a value of the wrong type: {error}") from None


def check_ranges(*, copies: int, flip: bool, zoom: float, rotation: float, brightness: float, contrast: float) -> None:
    """Raises ``ValueError`` naming the ``augment.*`` key that is out of range."""
    limits = {
        "zoom": (zoom, 0.0, 1.0, False),
        "rotation": (rotation, 0.0, 180.0, True),
        "brightness": (brightness, 0.0, 1.0, True),
        "contrast": (contrast, 0.0, 1.0, True),
    }
    for name, (value, low, high, closed) in limits.items():
        if not (low <= value <= high if closed else low <= value < high):
            raise ValueError(f"augment.{name} must be in [{low}, {high}{']' if closed else ')'}, got {value}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ValueError(f"augment.copies must be an integer >= 0 (0 = off), got {copies!r}")
    if copies > 0 and not flip and zoom == rotation == brightness == contrast == 0:
        raise ValueError(
            f"augment.copies is {copies} but every augmentation is off (flip false; zoom, rotation, brightness, "
            "contrast 0), so each view would equal the original; set augment.copies: 0 or turn one on"
        )


def view_generator(seed: int, sha256: str, copy_index: int) -> np.random.Generator:
    """The generator of one view: seeded by (seed, image sha256, copy index) only."""
    digest = hashlib.sha256(f"{seed}:{sha256}:{copy_index}".encode("ascii")).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def draw_recipe(
    rng: np.random.Generator, *, flip: bool, zoom: float, rotation: float, brightness: float, contrast: float
) -> Recipe:
    """Draws one view's recipe; all seven numbers are drawn whatever is switched off."""
    u = rng.random(7)
    return Recipe(
        flip=bool(flip and u[0] < 0.5),
        zoom=float(max(1.0 - zoom * u[1], 0.01)),  # never rounds to 0 in the canonical string
        center_x=float(u[2]),
        center_y=float(u[3]),
        rotation=float(rotation * (2.0 * u[4] - 1.0)),
        brightness=float(brightness * (2.0 * u[5] - 1.0)),
        contrast=float(1.0 + contrast * (2.0 * u[6] - 1.0)),
    )


def make_recipes(
    rows: Iterable[Mapping[str, Any]],
    *,
    copies: int,
    flip: bool,
    zoom: float,
    rotation: float,
    brightness: float,
    contrast: float,
    seed: int,
) -> list[dict[str, str]]:
    """Lists every training row with recipe ``""``, each followed by ``copies`` augmented views.

    Holds every row; the augment stage streams them instead (:func:`iter_recipes`).

    Args:
        rows: training rows with ``path``, ``label`` and ``sha256``; output is sorted by path.
        copies: augmented views per image (0 = originals only).
        flip: allow random left-right mirroring (half of the views).
        zoom: each view keeps between ``1 - zoom`` and all of each side, in [0, 1).
        rotation: rotation range in degrees, +/-, in [0, 180].
        brightness: brightness shift range as a share of the full range, +/-, in [0, 1].
        contrast: contrast factor range, ``1 +/- contrast``, in [0, 1].
        seed: with the image's sha256 and the copy index, seeds each view.

    Returns:
        Rows with ``path``, ``label``, ``sha256`` and ``recipe``.
    """
    ranges = dict(copies=copies, flip=flip, zoom=zoom, rotation=rotation, brightness=brightness, contrast=contrast)
    return list(iter_recipes(sorted(rows, key=lambda item: str(item["path"])), seed=seed, **ranges))  # checks them


def iter_recipes(
    rows: Iterable[Mapping[str, Any]],
    *,
    copies: int,
    flip: bool,
    zoom: float,
    rotation: float,
    brightness: float,
    contrast: float,
    seed: int,
) -> Iterator[dict[str, str]]:
    """:func:`make_recipes`' rows, one at a time, in the order of ``rows`` (give them sorted by path).

    The ranges are checked now (a ``ValueError`` is raised by this call, not by the first row);
    then each input row is read only when its recipes are wanted, so writing the result to a CSV
    holds one row at a time however many there are.

    Args:
        rows: training rows with ``path``, ``label`` and ``sha256``, in the output's order
            (:func:`transferlab.data.tables.in_path_order` gives them sorted by path).
        copies, flip, zoom, rotation, brightness, contrast, seed: as for :func:`make_recipes`.
    """
    ranges = dict(flip=flip, zoom=zoom, rotation=rotation, brightness=brightness, contrast=contrast)
    check_ranges(copies=copies, **ranges)
    return _recipes(rows, copies=copies, seed=seed, ranges=ranges)


def _recipes(
    rows: Iterable[Mapping[str, Any]], *, copies: int, seed: int, ranges: dict[str, Any]
) -> Iterator[dict[str, str]]:
    for row in rows:
        base = {"path": str(row["path"]), "label": str(row["label"]), "sha256": str(row["sha256"])}
        yield base | {"recipe": ORIGINAL}
        for copy_index in range(copies):
            recipe = draw_recipe(view_generator(seed, base["sha256"], copy_index), **ranges)
            yield base | {"recipe": recipe.to_string()}


def render_view(image: Image.Image, recipe: str, size: int) -> np.ndarray:
    """Makes the pixels of one view: THE function every stage uses, so features match.

    Args:
        image: an RGB image, opened the way training opens images (EXIF orientation applied).
        recipe: ``""`` for the original, else a canonical recipe string.
        size: output side in pixels.

    Returns:
        uint8 array of shape (size, size, 3). For ``""`` it is exactly
        ``np.asarray(image.resize((size, size), Image.BILINEAR))``.
    """
    if image.mode != "RGB":
        raise ValueError(f"render_view needs an RGB image, got mode {image.mode}; open it with convert('RGB')")
    if recipe == ORIGINAL:
        return np.asarray(image.resize((size, size), Image.BILINEAR))
    view = Recipe.from_string(recipe)
    width, height = image.size
    kept_width, kept_height = width * view.zoom, height * view.zoom
    left, top = view.center_x * (width - kept_width), view.center_y * (height - kept_height)
    box = (left, top, left + kept_width, top + kept_height)
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))  # crop and resize in one step
    if view.rotation:
        pixels = _rotate_mirrored(pixels, view.rotation)
    if view.flip:
        pixels = pixels[:, ::-1]
    if view.brightness or view.contrast != 1.0:
        pixels = _adjust_colour(pixels, brightness=view.brightness, contrast=view.contrast)
    return np.ascontiguousarray(pixels)


def _rotate_mirrored(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates about the centre; corners that would be empty are filled by a mirror of the image."""
    height, width = pixels.shape[:2]
    radians = math.radians(degrees)
    spread = abs(math.cos(radians)) + abs(math.sin(radians)) - 1.0
    pad = int(math.ceil(max(height, width) * spread / 2.0)) + 2
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    rotated = Image.fromarray(padded).rotate(degrees, resample=Image.BILINEAR)
    return np.asarray(rotated)[pad : pad + height, pad : pad + width]


def _adjust_colour(pixels: np.ndarray, *, brightness: float, contrast: float) -> np.ndarray:
    """``(v - mean) * contrast + mean + brightness * 255`` per channel, rounded and clipped.

    The map is affine in each channel's 256 levels, so it is computed once per level in float64
    and applied as a lookup table (Pillow's ``point``): exact, and about ten times faster than
    float arithmetic per pixel. The means come from exact histograms.
    """
    image = Image.fromarray(pixels)
    mean = np.array(ImageStat.Stat(image).mean, dtype=np.float64)
    levels = np.arange(256, dtype=np.float64)[:, None]
    table = np.clip(np.rint((levels - mean) * contrast + mean + brightness * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(image.point(table.T.ravel().tolist()))


def describe_recipe(recipe: str) -> str:
    """A short human caption for a recipe, e.g. ``flip, zoom 0.87, rot -7.5, bright +0.04``."""
    if recipe == ORIGINAL:
        return "original"
    view = Recipe.from_string(recipe)
    parts = ["flip"] if view.flip else []
    if view.zoom < 1.0:
        parts.append(f"zoom {view.zoom:.2f}")
    if view.rotation:
        parts.append(f"rot {view.rotation:+.1f}°")
    if view.brightness:
        parts.append(f"bright {round(view.brightness, 2) + 0.0:+.2f}")  # + 0.0: no "-0.00"
    if view.contrast != 1.0:
        parts.append(f"contr {view.contrast:.2f}")
    return ", ".join(parts) or "no change"
