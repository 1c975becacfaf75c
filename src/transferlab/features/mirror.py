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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from transferlab.data import augment

Key = tuple[str, str]  # (image sha256, recipe)
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


def averaging(read: Callable[[Sequence[Key]], np.ndarray]) -> Callable[[Sequence[Key]], np.ndarray]:
    """Wraps ``read`` (keys -> their embeddings, in order) to give, for each key, the mean of its
    embedding and its mirror image's (in float64, then float32), a chunk of keys at a time.

    Raises (from ``read``): a key or its mirror image has no embedding.
    """

    def read_averaged(keys: Sequence[Key]) -> np.ndarray:
        mirrored = [(sha256, mirror_recipe(recipe)) for sha256, recipe in keys]
        return ((read(keys).astype(np.float64) + read(mirrored)) / 2).astype(np.float32)

    return read_averaged
