"""The augment stage's preview: a grid of training images, each beside its first augmented views.

The preview shows a few training images (round-robin over the classes, in path order), each
original beside its first views, rendered by :func:`transferlab.data.augment.render_view`, the
function extract_features uses, from the image opened as extract_features opens it. With
``copies: 0`` augmentation is off; the preview then shows example views that copies > 0 would
draw with the configured ranges, under a heading saying so (or only the originals when every
range is off too).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transferlab.data import augment, images

PREVIEW_TILE = 160  # pixels per preview tile; the views are rendered at this size
PREVIEW_VIEWS = 5  # at most this many views beside each original
EXAMPLE_VIEWS = 4  # views shown per image when augmentation is off


def build_preview(
    rows: Iterable[Mapping[str, str]],
    *,
    images_directory: str | os.PathLike,
    preview_images: int,
    copies: int,
    flip: bool,
    zoom: float,
    rotation: float,
    brightness: float,
    contrast: float,
    seed: int,
    max_image_pixels: int,
) -> Image.Image:
    """Renders the preview grid for the first ``preview_images`` sampled training rows.

    Args:
        rows: training rows with ``path``, ``label`` and ``sha256``, in any order; read once,
            holding only the sampled few (:func:`preview_sample`).
        images_directory: the folder the rows' paths are relative to.
        preview_images: how many images the grid shows (one row each).
        copies: augmented views per image (``augment.copies``); 0 shows example views.
        flip, zoom, rotation, brightness, contrast: the ranges, as for
            :func:`transferlab.data.augment.make_recipes`.
        seed: seeds the views, as for the recipes.
        max_image_pixels: larger images are refused (``download.max_image_pixels``).

    Returns:
        The grid as an RGB image.

    Raises:
        ValueError: an image is missing or cannot be decoded (re-run the download stage).
    """
    sample = preview_sample(rows, preview_images)
    ranges = dict(flip=flip, zoom=zoom, rotation=rotation, brightness=brightness, contrast=contrast)
    ranges_off = not (flip or zoom or rotation or brightness or contrast)
    shown = 0 if ranges_off else min(copies or EXAMPLE_VIEWS, PREVIEW_VIEWS)
    recipes = augment.make_recipes(sample, copies=shown, seed=seed, **ranges)
    grid_rows = []
    for row in sample:
        image = open_rgb(Path(images_directory) / row["path"], max_image_pixels=max_image_pixels)
        mine = [item["recipe"] for item in recipes if item["path"] == row["path"]]
        tiles = [(augment.describe_recipe(recipe), augment.render_view(image, recipe, PREVIEW_TILE)) for recipe in mine]
        grid_rows.append(PreviewRow(title=f"{row['path']}  ({image.width}x{image.height})", tiles=tiles))
    heading = preview_heading(copies=copies, seed=seed, shown_views=shown, **ranges)
    return preview_grid(grid_rows, heading=heading)


def open_rgb(path: Path, *, max_image_pixels: int) -> Image.Image:
    """Opens an image exactly as extract_features does (:func:`transferlab.data.images.open_rgb`).

    Raises:
        ValueError: the file is missing or no longer decodes (it changed since the download stage checked it).
    """
    if not path.is_file():
        raise ValueError(f"image {path} not found; is --images the folder the download stage wrote?")
    try:
        return images.open_rgb(path, max_image_pixels=max_image_pixels)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"image {path} cannot be decoded ({error}); re-run the download stage") from None


def preview_sample(rows: Iterable[Mapping[str, str]], count: int) -> list[Mapping[str, str]]:
    """Up to ``count`` rows, one class after another (round-robin), each class in path order.

    The classes take turns in the order of their first path. ``rows`` may come in any order and
    is read once, holding at most ``count`` rows per class (the round-robin never reaches a
    class's row beyond its first ``count``), so a training split of any size streams through.
    """
    if count < 1:
        return []
    kept: dict[str, list[tuple[str, int, Mapping[str, str]]]] = {}  # per class, its smallest (path, arrival)
    for arrival, row in enumerate(rows):
        smallest = kept.setdefault(row["label"], [])
        key = (row["path"], arrival, row)
        if len(smallest) < count:
            bisect.insort(smallest, key, key=_path_and_arrival)
        elif key[:2] < smallest[-1][:2]:
            bisect.insort(smallest, key, key=_path_and_arrival)
            del smallest[-1]
    by_label = sorted(kept.values(), key=lambda smallest: smallest[0][:2])  # a class's turn: its first path
    interleaved = itertools.chain.from_iterable(itertools.zip_longest(*by_label))
    return [item[2] for item in interleaved if item is not None][:count]


def _path_and_arrival(item: tuple[str, int, Mapping[str, str]]) -> tuple[str, int]:
    return item[0], item[1]


def preview_heading(
    *,
    copies: int,
    flip: bool,
    zoom: float,
    rotation: float,
    brightness: float,
    contrast: float,
    seed: int,
    shown_views: int,
) -> str:
    """Three lines above the grid: on or off, the configured ranges, how to read a row."""
    ranges = ", ".join(
        [
            f"flip {'on' if flip else 'off'}",
            f"zoom keeps {1 - zoom:.2f}-1 of each side" if zoom else "zoom off",
            f"rotation ±{rotation:g}°" if rotation else "rotation off",
            f"brightness ±{brightness:g}" if brightness else "brightness off",
            f"contrast 1±{contrast:g}" if contrast else "contrast off",
        ]
    )
    if copies > 0:
        first = f"Augmentation ON: {copies} view(s) per training image; showing the first {shown_views}."
    elif shown_views:
        first = "Augmentation is OFF (augment.copies: 0). These are example views that copies > 0 would draw."
    else:
        first = "Augmentation is OFF (augment.copies: 0, and every range is off): originals only."
    last = "Left: the original as val/test see it; then the views as extract_features renders them."
    return f"{first}\nRanges: {ranges}; seed {seed}." + (f"\n{last}" if shown_views else "")


@dataclasses.dataclass(frozen=True)
class PreviewRow:
    """One row of the preview grid: a title (image path and label) and its captioned tiles."""

    title: str
    tiles: Sequence[tuple[str, np.ndarray]]  # (caption, uint8 (size, size, 3)); the original first


def preview_grid(
    rows: Sequence[PreviewRow], *, heading: str = "", font_size: int = 13, min_width: int = 640
) -> Image.Image:
    """Lays the rows out as one image: a heading, then per row a title line and its tiles.

    Args:
        rows: the grid's rows; every tile has the same square size.
        heading: text above the grid (may hold several lines).
        font_size: caption text size in pixels.
        min_width: the image is at least this wide, so the heading stays readable beside few tiles.
    """
    if not rows or not all(row.tiles for row in rows):
        raise ValueError("preview_grid needs at least one row, each with at least one tile")
    tile = rows[0].tiles[0][1].shape[0]
    if any(pixels.shape != (tile, tile, 3) for row in rows for _, pixels in row.tiles):
        raise ValueError(f"preview_grid needs every tile of shape ({tile}, {tile}, 3), like the first one")
    font = ImageFont.load_default(size=font_size)
    gap, line = 8, font_size + 6
    columns = max(len(row.tiles) for row in rows)
    caption_lines = max(len(_wrap(caption, font, tile)) for row in rows for caption, _ in row.tiles)
    row_height = line + tile + caption_lines * line + gap
    width = max(gap + columns * (tile + gap), min_width)
    heading_lines = [part for text in heading.splitlines() for part in _wrap(text, font, width - 2 * gap)]
    top = gap + len(heading_lines) * line + (gap if heading_lines else 0)
    canvas = Image.new("RGB", (width, top + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, text in enumerate(heading_lines):
        draw.text((gap, gap + index * line), text, fill="black", font=font)
    for row_index, row in enumerate(rows):
        y = top + row_index * row_height
        draw.text((gap, y), _fit(row.title, font, width - 2 * gap), fill="black", font=font)
        for column, (caption, pixels) in enumerate(row.tiles):
            x = gap + column * (tile + gap)
            canvas.paste(Image.fromarray(pixels), (x, y + line))
            for line_index, text in enumerate(_wrap(caption, font, tile)):
                draw.text((x, y + line + tile + 2 + line_index * line), text, fill=(60, 60, 60), font=font)
    return canvas


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap at spaces so each line fits ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """Shortens ``text`` from the left with an ellipsis until it fits ``width`` pixels."""
    while font.getlength(text) > width and len(text) > 1:
        text = "…" + text[2:]
    return text
