"""Mirror-image averaging: each view's embedding averaged with that of its left-right mirror.

A flower photographed from the other side is the same flower, so the average of an image's
embedding and its mirror image's is a cheap test-time augmentation (``extract_features.
mirror_average``). The mirror image of a view is just another view: its recipe is the view's
recipe with ``flip`` toggled (``augment.render_view`` flips after cropping and rotating, so that
is the exact mirror image), and the original's (``""``) is the canonical flip-only recipe. So
mirrored views are rendered, embedded and cached like any other, and turning the option on and
off again embeds nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from transferlab.data import augment

PLAIN = augment.Recipe()  # a recipe that changes nothing: its canonical form is the original's ""


def mirror_recipe(recipe: str) -> str:
    """The recipe of a view's left-right mirror image (mirroring twice gives the recipe back)."""
    view = PLAIN if recipe == augment.ORIGINAL else augment.Recipe.from_string(recipe)
    mirrored = dataclasses.replace(view, flip=not view.flip)
    return augment.ORIGINAL if mirrored == PLAIN else mirrored.to_string()


def with_mirrors(items: Sequence[Any]) -> list[Any]:
    """The items followed by the mirror image of each one that is not already listed.

    Items are ``extract.Item`` records (``sha256``, ``recipe``, ``path``, ``key``).
    """
    present = {item.key for item in items}
    mirrors = []
    for item in items:
        mirrored = dataclasses.replace(item, recipe=mirror_recipe(item.recipe))
        if mirrored.key not in present:
            present.add(mirrored.key)
            mirrors.append(mirrored)
    return [*items, *mirrors]


def average_mirrors(
    vectors: dict[tuple[str, str], np.ndarray], keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """For each (sha256, recipe) key, the mean of its embedding and its mirror image's (float32).

    Raises:
        KeyError: a key or its mirror image has no embedding.
    """
    averaged = {}
    for sha256, recipe in keys:
        mirrored = vectors[(sha256, mirror_recipe(recipe))]
        averaged[(sha256, recipe)] = ((vectors[(sha256, recipe)].astype(np.float64) + mirrored) / 2).astype(np.float32)
    return averaged
