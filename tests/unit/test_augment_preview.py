"""The augment stage's preview: the sample, the heading, the grid, and images opened within the size limit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data import augment, augment_preview

RANGES = {"flip": True, "zoom": 0.2, "rotation": 15.0, "brightness": 0.1, "contrast": 0.1}
OFF = {"flip": False, "zoom": 0.0, "rotation": 0.0, "brightness": 0.0, "contrast": 0.0}


def _photo(width: int = 97, height: int = 61, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric test image (gradients plus noise), so any geometric change shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], axis=-1).astype(np.int32)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _dataset(root: Path, counts: dict[str, int]) -> list[dict[str, str]]:
    """Writes counts[label] PNGs per class under ``root`` and returns their training rows."""
    rows = []
    for class_index, (label, count) in enumerate(counts.items()):
        for index in range(count):
            path = root / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            _photo(seed=10 * class_index + index).save(path)
            rows.append(
                {
                    "path": f"{label}/{index}.png",
                    "label": label,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
    return rows


def _preview(rows, root, *, copies=2, preview_images=3, max_image_pixels=10**7, **ranges):
    return augment_preview.build_preview(
        rows,
        images_directory=root,
        preview_images=preview_images,
        copies=copies,
        seed=7,
        max_image_pixels=max_image_pixels,
        **(RANGES | ranges),
    )


def test_preview_grid_lays_out_one_row_per_image():
    image = _photo()
    recipes = augment.make_recipes([{"path": "c/a.jpg", "label": "c", "sha256": "ab"}], copies=2, seed=42, **RANGES)
    tiles = [
        (augment.describe_recipe(item["recipe"]), augment.render_view(image, item["recipe"], 40)) for item in recipes
    ]
    rows = [augment_preview.PreviewRow(title=f"c/img{index}.jpg", tiles=tiles) for index in range(3)]
    grid = augment_preview.preview_grid(rows, heading="two lines\nof heading")
    assert grid.mode == "RGB"
    assert grid.width >= 3 * 40 and grid.height >= 3 * 40
    pixels = np.asarray(grid)
    assert (pixels != 255).any(axis=-1).sum() > 3 * 3 * 40 * 40 * 0.9  # the tiles are there
    with pytest.raises(ValueError, match="at least one row"):
        augment_preview.preview_grid([])


def test_sample_goes_round_robin_over_classes_in_path_order():
    rows = [{"path": p, "label": p.split("/")[0]} for p in ["b/2", "a/2", "a/1", "b/1", "a/3", "c/1"]]
    assert [row["path"] for row in augment_preview.preview_sample(rows, 5)] == ["a/1", "b/1", "c/1", "a/2", "b/2"]
    assert len(augment_preview.preview_sample(rows, 50)) == 6


def test_heading_says_whether_augmentation_is_on():
    on = augment_preview.preview_heading(copies=3, seed=7, shown_views=3, **RANGES)
    assert on.startswith("Augmentation ON: 3 view(s) per training image; showing the first 3.")
    assert "flip on, zoom keeps 0.80-1 of each side, rotation ±15°, brightness ±0.1, contrast 1±0.1; seed 7." in on
    example = augment_preview.preview_heading(copies=0, seed=7, shown_views=4, **RANGES)
    assert example.startswith("Augmentation is OFF (augment.copies: 0). These are example views")
    originals = augment_preview.preview_heading(copies=0, seed=7, shown_views=0, **OFF)
    assert originals.splitlines() == [
        "Augmentation is OFF (augment.copies: 0, and every range is off): originals only.",
        "Ranges: flip off, zoom off, rotation off, brightness off, contrast off; seed 7.",
    ]


def test_build_preview_has_a_row_per_sampled_image_and_is_deterministic(tmp_path):
    rows = _dataset(tmp_path, {"a": 2, "b": 2})
    grid = _preview(rows, tmp_path, copies=2, preview_images=3)
    tile = augment_preview.PREVIEW_TILE
    assert grid.mode == "RGB" and grid.width >= 3 * tile and grid.height >= 3 * tile  # original + 2 views, 3 rows
    assert np.array_equal(np.asarray(grid), np.asarray(_preview(rows, tmp_path, copies=2, preview_images=3)))
    assert not np.array_equal(np.asarray(grid), np.asarray(_preview(rows, tmp_path, copies=2, preview_images=2)))


def test_build_preview_shows_example_views_when_copies_is_zero_and_originals_when_all_is_off(tmp_path, monkeypatch):
    rows = _dataset(tmp_path, {"a": 1, "b": 1})
    drawn = []  # (captions per row, heading) of every grid drawn
    real_grid = augment_preview.preview_grid

    def recording_grid(grid_rows, heading):
        drawn.append(([[caption for caption, _ in row.tiles] for row in grid_rows], heading))
        return real_grid(grid_rows, heading=heading)

    monkeypatch.setattr(augment_preview, "preview_grid", recording_grid)
    _preview(rows, tmp_path, copies=0, preview_images=2)
    _preview(rows, tmp_path, copies=0, preview_images=1, **OFF)
    _preview(rows, tmp_path, copies=20, preview_images=1)
    (examples, example_heading), (originals, original_heading), (many, _) = drawn
    assert [len(captions) for captions in examples] == [1 + augment_preview.EXAMPLE_VIEWS] * 2
    assert all(captions[0] == "original" for captions in examples) and "example views" in example_heading
    assert originals == [["original"]] and "originals only" in original_heading
    assert [len(captions) for captions in many] == [1 + augment_preview.PREVIEW_VIEWS]


def test_build_preview_opens_images_within_the_size_limit(tmp_path):
    rows = _dataset(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"a/0\.png cannot be decoded .*re-run the download stage"):
        _preview(rows, tmp_path, max_image_pixels=97 * 61 // 4)  # far under the image's pixels: a "bomb"
    (tmp_path / "a" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"a/0\.png not found; is --images the folder the download stage wrote"):
        _preview(rows, tmp_path)
