"""Mirror-image averaging: mirrored recipes render exact mirror images; averaging pairs them up."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transferlab.data import augment
from transferlab.features import mirror
from transferlab.features.decode import Item

SHA = "a" * 64


@pytest.fixture()
def image():
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_original_mirrors_to_the_canonical_flip_only_recipe_and_back():
    flipped = mirror.mirror_recipe(augment.ORIGINAL)
    assert flipped == augment.Recipe(flip=True).to_string()
    assert mirror.mirror_recipe(flipped) == augment.ORIGINAL


def test_an_augmented_view_mirrors_to_its_exact_mirror_image(image):
    recipe = augment.Recipe(
        flip=False, zoom=0.8, center_x=0.3, center_y=0.7, rotation=12.0, brightness=0.05, contrast=1.1
    ).to_string()
    mirrored = mirror.mirror_recipe(recipe)
    assert augment.Recipe.from_string(mirrored).flip and mirror.mirror_recipe(mirrored) == recipe
    for original in (recipe, augment.ORIGINAL):
        view = augment.render_view(image, original, 24)
        np.testing.assert_array_equal(augment.render_view(image, mirror.mirror_recipe(original), 24), view[:, ::-1])


def test_with_mirrors_lists_each_view_once():
    flipped = mirror.mirror_recipe(augment.ORIGINAL)
    items = [
        Item(SHA, augment.ORIGINAL, "a.jpg"),
        Item(SHA, flipped, "a.jpg"),
        Item("b" * 64, augment.ORIGINAL, "b.jpg"),
    ]
    views = mirror.with_mirrors(items)
    assert views[:3] == items
    assert [view.key for view in views[3:]] == [("b" * 64, flipped)]


def test_averaging_pairs_each_view_with_its_mirror_image():
    flipped = mirror.mirror_recipe(augment.ORIGINAL)
    vectors = {
        (SHA, augment.ORIGINAL): np.array([1.0, 3.0], np.float32),
        (SHA, flipped): np.array([3.0, 5.0], np.float32),
    }
    read = mirror.averaging(lambda keys: np.stack([vectors[key] for key in keys]))
    averaged = read([(SHA, augment.ORIGINAL), (SHA, flipped)])
    np.testing.assert_array_equal(averaged, [[2.0, 4.0], [2.0, 4.0]])  # a view and its mirror image agree
    assert averaged.dtype == np.float32
    with pytest.raises(KeyError):
        read([("c" * 64, augment.ORIGINAL)])
