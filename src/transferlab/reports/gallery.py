"""Galleries of labelled thumbnails: the evaluate stage's mistakes, and any grouped set of images.

Picking the mistakes (:func:`confident_mistakes`) and drawing them (:func:`render_gallery`) are
one concept, apart from the metrics in :mod:`transferlab.reports.evaluate`: a person looks at
this plot to see *what* the model gets wrong (a mislabelled photo, two look-alike classes).

The drawing is shared: :func:`render_tile_groups` lays out thumbnails in titled groups (the
error diff's fixed / newly wrong / wrong in both, the suspected label errors), with the same
tiles, the same unopenable-image tile and the same small palette PNG as the mistakes gallery.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.core import atomic
from transferlab.data import images
from transferlab.features import files

GALLERY_COLUMNS = 4
THUMBNAIL_PIXELS = 256


@dataclass(frozen=True)
class Mistake:
    """A wrong test prediction, for the gallery."""

    path: str
    actual: str
    predicted: str
    confidence: float
    actual_probability: float


def confident_mistakes(*, features: files.Features, probabilities: np.ndarray, limit: int) -> list[Mistake]:
    """The ``limit`` wrong predictions made with the highest confidence, most confident first."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != features.labels)
    confidence = probabilities[wrong, predictions[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    names = features.class_names
    return [
        Mistake(
            path=features.paths[i],
            actual=names[features.labels[i]],
            predicted=names[predictions[i]],
            confidence=float(probabilities[i, predictions[i]]),
            actual_probability=float(probabilities[i, features.labels[i]]),
        )
        for i in order
    ]


def render_gallery(
    mistakes: Sequence[Mistake],
    *,
    images_directory: str | os.PathLike,
    path: str | os.PathLike,
    test_images: int,
    max_image_pixels: int,
) -> None:
    """Draws the mistakes as a grid of labelled thumbnails into a PNG at ``path`` (atomically).

    Each tile shows the image, its true class and the predicted class with its confidence.
    With no mistakes, the PNG says so. An image that cannot be opened gets a tile saying why.

    Args:
        mistakes: the wrong predictions to show (:func:`confident_mistakes`), in tile order.
        images_directory: the folder the mistakes' paths are relative to (data/raw/images).
        path: the PNG to write.
        test_images: how many test images there were (for the title).
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
    """
    tiles = [
        Tile(
            path=mistake.path,
            title=(
                f"predicted {mistake.predicted} ({mistake.confidence:.1%})\n"
                f"true {mistake.actual} ({mistake.actual_probability:.1%})"
            ),
        )
        for mistake in mistakes
    ]
    render_tile_groups(
        [("", tiles)],
        images_directory=images_directory,
        path=path,
        title=(
            f"Most confidently wrong test images: {len(mistakes)} shown, of {test_images}\n"
            "(predicted class and its probability; true class and its probability)"
        ),
        max_image_pixels=max_image_pixels,
        empty_text=f"No misclassified images\namong {test_images} test images",
    )


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a gallery: the image (relative to the images folder) and its caption."""

    path: str
    title: str  # one or two lines above the thumbnail
    colour: str = "#b00020"  # of the title: red for a mistake


def render_tile_groups(
    groups: Sequence[tuple[str, Sequence[Tile]]],
    *,
    images_directory: str | os.PathLike,
    path: str | os.PathLike,
    title: str,
    max_image_pixels: int,
    empty_text: str = "none",
) -> None:
    """Draws titled groups of thumbnails, each group starting a new row, into a PNG (atomically).

    Args:
        groups: (heading, tiles) per group, in order; a group without tiles shows ``empty_text``.
            A single group with an empty heading is drawn as one plain grid.
        images_directory: the folder the tiles' paths are relative to (data/raw/images).
        path: the PNG to write.
        title: the figure's title.
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).
        empty_text: what an empty group says.
    """
    from matplotlib.figure import Figure

    groups = [(heading, list(tiles)) for heading, tiles in groups] or [("", [])]
    columns = max(1, min(GALLERY_COLUMNS, max(len(tiles) for _, tiles in groups)))
    rows = [max(1, math.ceil(len(tiles) / columns)) for _, tiles in groups]
    headed = any(heading for heading, _ in groups)
    height = 3.5 * sum(rows) + (0.5 if headed else 0.0) * len(groups) + 0.5 * (title.count("\n") + 1)
    # At least 7 inches wide: a title of about 70 characters fits above one or two tiles too.
    figure = Figure(figsize=(max(7.0, 3.4 * columns), height), dpi=100, layout="constrained")
    containers = [figure] if len(groups) == 1 else list(figure.subfigures(len(groups), 1, height_ratios=rows))
    for container, (heading, tiles), row_count in zip(containers, groups, rows):
        if heading:
            container.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
        _draw_grid(
            container,
            tiles,
            rows=row_count,
            columns=columns,
            empty_text=empty_text,
            images_directory=Path(images_directory),
            max_image_pixels=max_image_pixels,
        )
    if len(groups) == 1:
        figure.suptitle(title if not groups[0][0] else f"{title}\n{groups[0][0]}", fontsize=12)
    else:
        figure.suptitle(title, fontsize=12)
    _save_png(figure, path)


def _draw_grid(
    container: Any,
    tiles: Sequence[Tile],
    *,
    rows: int,
    columns: int,
    empty_text: str,
    images_directory: Path,
    max_image_pixels: int,
) -> None:
    axes = np.atleast_1d(container.subplots(rows, columns, squeeze=False)).reshape(-1)
    for axis in axes:
        axis.set_axis_off()
    if not tiles:
        axes[0].text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=13, transform=axes[0].transAxes)
    for axis, tile in zip(axes, tiles):
        _draw_tile(axis, tile, images_directory, max_image_pixels)


def _save_png(figure: Any, path: str | os.PathLike) -> None:
    # Photos make a large truecolour PNG (1.6 MB for 12 tiles); a dithered 256-colour palette keeps
    # this plot, which is committed to git beside the metrics, 3x smaller with no visible banding.
    # The fast octree palette and zlib's default level (no optimize pass) cut this step from about
    # 2.7 s to 1 s on the shared 2-core machine (the head loop reruns it), for the same file size.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        colours = rendered.convert("RGB")
    palette = colours.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    indexed = colours.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    with atomic.atomic_path(path) as temporary:
        indexed.save(temporary, format="PNG")


# Pillow raises these for a missing or damaged file, or one above max_image_pixels; its tile says so.
_UNOPENABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def _draw_tile(axis: Any, tile: Tile, images_directory: Path, max_image_pixels: int) -> None:
    try:
        thumbnail = _thumbnail(images_directory / tile.path, max_image_pixels)
        axis.imshow(np.asarray(thumbnail))
    except _UNOPENABLE as error:
        axis.text(
            0.5,
            0.5,
            f"cannot open image\n({type(error).__name__})",
            ha="center",
            va="center",
            fontsize=10,
            transform=axis.transAxes,
        )
    # A tile is about 36 bold characters wide at 10 pt: longer titles (the error diff's) get a smaller font.
    longest = max((len(line) for line in tile.title.splitlines()), default=0)
    axis.set_title(tile.title, fontsize=10 if longest <= 36 else 8, color=tile.colour, fontweight="bold")
    axis.text(
        0.5,
        -0.02,
        _shorten(tile.path, 44),
        ha="center",
        va="top",
        fontsize=7,
        color="#555555",
        transform=axis.transAxes,
    )


def _thumbnail(path: Path, max_image_pixels: int) -> Any:
    image = images.open_rgb(path, max_image_pixels=max_image_pixels)
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
