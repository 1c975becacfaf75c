"""augment stage: data/splits/train.csv -> data/augmented/train.csv (recipes) + a preview grid PNG.

The preview shows, for a few training images (round-robin over the classes, in path order),
the original beside its first augmented views, rendered by the same function extract_features
uses. With ``augment.copies: 0`` augmentation is off; the preview then shows example views
that copies > 0 would draw with the configured ranges, under a heading saying so (or only the
originals when every range is off too).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
from pathlib import Path

from PIL import Image

from transferlab.core import atomic, params, stage_runner
from transferlab.data import augment, images

TRAIN_COLUMNS = ("path", "label", "sha256")
OUT_COLUMNS = ("path", "label", "sha256", "recipe")
PREVIEW_TILE = 160  # pixels per preview tile; the views are rendered at this size
PREVIEW_VIEWS = 5  # at most this many views beside each original
EXAMPLE_VIEWS = 4  # views shown per image when augmentation is off
# Training images passed the download stage's bomb check already; this is the default limit.
DEFAULT_MAX_IMAGE_PIXELS = params.DownloadParams().max_image_pixels


def read_train(path: Path) -> list[dict[str, str]]:
    """Reads the split stage's train.csv; a missing file or column raises ``ValueError``."""
    if not path.is_file():
        raise ValueError(f"training split {path} not found; run the split stage first (dvc repro split)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in TRAIN_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)}; re-run the split stage to rebuild it")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has no training images; check the split stage's metrics/split.json")
    return rows


def write_recipes(rows: list[dict[str, str]], out: Path) -> None:
    with atomic.atomic_path(out) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=OUT_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def open_rgb(path: Path) -> Image.Image:
    """Opens an image exactly as extract_features does (transferlab.data.images.open_rgb)."""
    if not path.is_file():
        raise ValueError(f"image {path} not found; is --images the folder the download stage wrote?")
    try:
        return images.open_rgb(path, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # changed since the download stage checked it
        raise ValueError(f"image {path} cannot be decoded ({error}); re-run the download stage") from None


def preview_sample(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """Up to ``count`` rows, one class after another (round-robin), each class in path order."""
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in sorted(rows, key=lambda item: item["path"]):
        by_label.setdefault(row["label"], []).append(row)
    interleaved = itertools.chain.from_iterable(itertools.zip_longest(*by_label.values()))
    return [row for row in interleaved if row is not None][:count]


def preview_heading(settings: params.AugmentParams, seed: int, shown_views: int) -> str:
    """Three lines above the grid: on or off, the configured ranges, how to read a row."""
    ranges = ", ".join([
        f"flip {'on' if settings.flip else 'off'}",
        f"zoom keeps {1 - settings.zoom:.2f}-1 of each side" if settings.zoom else "zoom off",
        f"rotation ±{settings.rotation:g}°" if settings.rotation else "rotation off",
        f"brightness ±{settings.brightness:g}" if settings.brightness else "brightness off",
        f"contrast 1±{settings.contrast:g}" if settings.contrast else "contrast off",
    ])
    if settings.copies > 0:
        first = f"Augmentation ON: {settings.copies} view(s) per training image; showing the first {shown_views}."
    elif shown_views:
        first = "Augmentation is OFF (augment.copies: 0). These are example views that copies > 0 would draw."
    else:
        first = "Augmentation is OFF (augment.copies: 0, and every range is off): originals only."
    last = "Left: the original as val/test see it; then the views as extract_features renders them."
    return f"{first}\nRanges: {ranges}; seed {seed}." + (f"\n{last}" if shown_views else "")


def build_preview(
    rows: list[dict[str, str]], images_directory: Path, settings: params.AugmentParams, seed: int
) -> Image.Image:
    """Renders the preview grid for the first ``preview_images`` sampled training images."""
    sample = preview_sample(rows, settings.preview_images)
    ranges = dict(flip=settings.flip, zoom=settings.zoom, rotation=settings.rotation,
                  brightness=settings.brightness, contrast=settings.contrast)
    ranges_off = not (settings.flip or settings.zoom or settings.rotation or settings.brightness or settings.contrast)
    copies = 0 if ranges_off else min(settings.copies or EXAMPLE_VIEWS, PREVIEW_VIEWS)
    recipes = augment.make_recipes(sample, copies=copies, seed=seed, **ranges)
    grid_rows = []
    for row in sample:
        image = open_rgb(images_directory / row["path"])
        mine = [item["recipe"] for item in recipes if item["path"] == row["path"]]
        tiles = [(augment.describe_recipe(recipe), augment.render_view(image, recipe, PREVIEW_TILE)) for recipe in mine]
        grid_rows.append(augment.PreviewRow(title=f"{row['path']}  ({image.width}x{image.height})", tiles=tiles))
    return augment.preview_grid(grid_rows, heading=preview_heading(settings, seed, copies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="the split stage's train.csv")
    parser.add_argument("--images", type=Path, required=True, help="the folder the index's paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="recipes CSV to write")
    parser.add_argument("--preview", type=Path, required=True, help="preview grid PNG to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    base = params.load_section("base", arguments.params)
    settings = params.load_section("augment", arguments.params)
    train = read_train(arguments.train)
    recipes = augment.make_recipes(
        train, copies=settings.copies, flip=settings.flip, zoom=settings.zoom, rotation=settings.rotation,
        brightness=settings.brightness, contrast=settings.contrast, seed=base.seed,
    )
    preview = build_preview(train, arguments.images, settings, base.seed)
    write_recipes(recipes, arguments.out)
    with atomic.atomic_path(arguments.preview) as temporary:
        preview.save(temporary, format="PNG", optimize=True)
    logging.info("%d training images, %d rows with recipes (%d views each); preview %s",
                 len(train), len(recipes), settings.copies, arguments.preview)


if __name__ == "__main__":
    stage_runner.run_stage("augment", main)
