"""Augmentation recipes and render_view: seeded, canonical, and the identity path is the plain resize."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from transferlab.data import augment

RANGES = {"flip": True, "zoom": 0.2, "rotation": 15.0, "brightness": 0.1, "contrast": 0.1}


def _rows(count: int, *, prefix: str = "img") -> list[dict[str, str]]:
    return [
        {
            "path": f"c/{prefix}{index:03d}.jpg",
            "label": "c",
            "sha256": hashlib.sha256(f"{prefix}{index}".encode()).hexdigest(),
        }
        for index in range(count)
    ]


def _photo(width: int = 97, height: int = 61, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric test image (gradients plus noise), so any geometric change shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], axis=-1).astype(np.int32)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _recipes(rows, **overrides):
    return augment.make_recipes(rows, **(RANGES | {"copies": 3, "seed": 42} | overrides))


def test_every_row_once_as_original_then_its_views():
    rows = _rows(4)
    out = _recipes(list(reversed(rows)))
    assert len(out) == 4 * (1 + 3)
    assert [item["path"] for item in out] == [row["path"] for row in rows for _ in range(4)]
    assert [item["recipe"] == "" for item in out] == [True, False, False, False] * 4
    assert all(set(item) == {"path", "label", "sha256", "recipe"} for item in out)
    assert len({item["recipe"] for item in out if item["recipe"]}) == 12


def test_copies_zero_lists_only_originals():
    out = _recipes(_rows(5), copies=0)
    assert [item["recipe"] for item in out] == [""] * 5


def test_recipes_are_deterministic_per_seed_and_image():
    rows = _rows(6)
    assert _recipes(rows) == _recipes(rows)
    assert _recipes(rows, seed=1) != _recipes(rows, seed=2)
    # A view depends on (seed, sha256, copy) only: other images being there changes nothing.
    alone = _recipes(rows[2:3])
    among_others = [item for item in _recipes(rows + _rows(10, prefix="extra")) if item["path"] == rows[2]["path"]]
    assert alone == among_others
    renamed = _recipes([rows[2] | {"path": "c/elsewhere.jpg"}])
    assert [item["recipe"] for item in renamed] == [item["recipe"] for item in alone]


def test_changing_one_range_leaves_the_other_draws_alone():
    rows = _rows(3)
    with_rotation = [augment.Recipe.from_string(item["recipe"]) for item in _recipes(rows) if item["recipe"]]
    without = [augment.Recipe.from_string(item["recipe"]) for item in _recipes(rows, rotation=0.0) if item["recipe"]]
    assert all(view.rotation == 0.0 for view in without)
    assert [(v.flip, v.zoom, v.center_x, v.brightness) for v in with_rotation] == [
        (v.flip, v.zoom, v.center_x, v.brightness) for v in without
    ]


def test_drawn_values_stay_within_the_configured_ranges():
    views = [augment.Recipe.from_string(item["recipe"]) for item in _recipes(_rows(50)) if item["recipe"]]
    assert all(0.8 <= view.zoom <= 1.0 and abs(view.rotation) <= 15.0 for view in views)
    assert all(abs(view.brightness) <= 0.1 and 0.9 <= view.contrast <= 1.1 for view in views)
    flips = sum(view.flip for view in views)
    assert 40 < flips < 110  # about half of 150
    assert not any(
        view.flip
        for item in _recipes(_rows(20), flip=False)
        if item["recipe"]
        for view in [augment.Recipe.from_string(item["recipe"])]
    )


def test_canonical_string_round_trip():
    recipe = augment.Recipe(
        flip=True, zoom=0.876543, center_x=0.123456, center_y=1.0, rotation=-7.77777, brightness=-0.00001, contrast=1.05
    )
    text = recipe.to_string()
    values = json.loads(text)
    assert list(values) == sorted(values)
    assert values == {
        "brightness": 0.0,
        "center_x": 0.1235,
        "center_y": 1.0,
        "contrast": 1.05,
        "flip": True,
        "rotation": -7.7778,
        "zoom": 0.8765,
    }
    assert " " not in text and "-0.0" not in text
    assert augment.Recipe.from_string(text).to_string() == text


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[1, 2]",
        '{"flip": true}',
        '{"zoom": 2.0, "flip": false, "center_x": 0.5, "center_y": 0.5, "rotation": 0, "brightness": 0, "contrast": 1}',
    ],
)
def test_malformed_recipes_are_refused(text):
    with pytest.raises(ValueError, match="recipe"):
        augment.render_view(_photo(), text, 16)


def test_original_is_exactly_the_plain_bilinear_resize():
    image = _photo()
    out = augment.render_view(image, "", 48)
    np.testing.assert_array_equal(out, np.asarray(image.resize((48, 48), Image.BILINEAR)))
    assert out.dtype == np.uint8 and out.shape == (48, 48, 3)


def test_views_have_the_right_shape_and_differ_from_the_original():
    image = _photo()
    original = augment.render_view(image, "", 40)
    for item in _recipes(_rows(3)):
        if item["recipe"]:
            view = augment.render_view(image, item["recipe"], 40)
            assert view.shape == (40, 40, 3) and view.dtype == np.uint8
            assert np.abs(view.astype(int) - original).mean() > 2.0
    last = item["recipe"]
    assert np.array_equal(augment.render_view(image, last, 40), augment.render_view(image, last, 40))


def test_flip_mirrors_left_to_right():
    image = _photo()
    flipped = augment.render_view(image, augment.Recipe(flip=True).to_string(), 32)
    np.testing.assert_array_equal(flipped, augment.render_view(image, "", 32)[:, ::-1])


def test_zoom_crops_the_placed_window_in_one_resize():
    image = _photo(width=100, height=60)
    top_left = augment.Recipe(zoom=0.5, center_x=0.0, center_y=0.0).to_string()
    bottom_right = augment.Recipe(zoom=0.5, center_x=1.0, center_y=1.0).to_string()
    np.testing.assert_array_equal(
        augment.render_view(image, top_left, 24), np.asarray(image.resize((24, 24), Image.BILINEAR, box=(0, 0, 50, 30)))
    )
    np.testing.assert_array_equal(
        augment.render_view(image, bottom_right, 24),
        np.asarray(image.resize((24, 24), Image.BILINEAR, box=(50, 30, 100, 60))),
    )


def test_rotation_fills_corners_from_the_image_not_black():
    flat = Image.new("RGB", (50, 50), (200, 120, 40))
    rotated = augment.render_view(flat, augment.Recipe(rotation=45.0).to_string(), 32)
    assert (rotated == np.array([200, 120, 40], dtype=np.uint8)).all()
    image = _photo()
    turned = augment.render_view(image, augment.Recipe(rotation=90.0).to_string(), 32)
    np.testing.assert_allclose(turned, np.rot90(augment.render_view(image, "", 32)), atol=1)


def test_brightness_and_contrast_in_float_then_clipped():
    flat = Image.new("RGB", (20, 20), (100, 250, 0))
    brighter = augment.render_view(flat, augment.Recipe(brightness=0.1).to_string(), 8)
    assert (brighter == np.array([126, 255, 26], dtype=np.uint8)).all()  # 100 + 25.5 rounds to 126; 275.5 clips
    image = _photo()
    flattened = augment.render_view(image, augment.Recipe(contrast=0.0).to_string(), 16)
    mean = augment.render_view(image, "", 16).reshape(-1, 3).mean(axis=0)
    np.testing.assert_array_equal(flattened[0, 0], np.rint(mean))
    assert (flattened == flattened[0, 0]).all()
    both = augment.render_view(image, augment.Recipe(brightness=-0.07, contrast=1.3).to_string(), 16)
    plain = augment.render_view(image, "", 16).astype(np.float64)
    expected = np.clip(np.rint((plain - mean) * 1.3 + mean - 0.07 * 255), 0, 255)
    np.testing.assert_allclose(both, expected, atol=1)  # 1: a mean summed in another order may round .5 apart
    assert (both == expected).mean() > 0.99


def test_render_view_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        augment.render_view(_photo().convert("L"), "", 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"zoom": 1.0}, r"augment\.zoom"),
        ({"rotation": 181.0}, r"augment\.rotation"),
        ({"brightness": -0.1}, r"augment\.brightness"),
        ({"copies": -1}, r"augment\.copies"),
        (
            {"flip": False, "zoom": 0.0, "rotation": 0.0, "brightness": 0.0, "contrast": 0.0},
            r"every augmentation is off",
        ),
    ],
)
def test_bad_ranges_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        _recipes(_rows(2), **overrides)


def test_describe_recipe_is_short_and_readable():
    assert augment.describe_recipe("") == "original"
    text = augment.describe_recipe(augment.Recipe(flip=True, zoom=0.85, rotation=-7.5, brightness=-0.001).to_string())
    assert text == "flip, zoom 0.85, rot -7.5°, bright +0.00"
