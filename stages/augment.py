"""augment stage: data/splits/train.csv -> data/augmented/train.csv (recipes) + a preview grid PNG.

The preview (see transferlab.data.augment_preview) shows a few training images beside their
first augmented views, rendered by the same function extract_features uses.
"""

import logging

from transferlab.core import atomic, stage
from transferlab.data import augment, augment_preview, tables


@stage.define(
    "augment",
    paths={
        "train": "the split stage's train.csv",
        "images": "the folder the index's paths are relative to",
        "out": "recipes CSV to write",
        "preview": "preview grid PNG to write",
    },
    # download: the image size limit (max_image_pixels) for opening the preview's images
    sections={"base": "base", "augment_params": "augment", "download_params": "download"},
)
def main(paths, base, augment_params, download_params):
    train = tables.read_split(paths.train)
    augmentation = augment_params.recipe_options()
    recipes = augment.make_recipes(train, seed=base.seed, **augmentation)
    preview = augment_preview.build_preview(
        train,
        images_directory=paths.images,
        preview_images=augment_params.preview_images,
        seed=base.seed,
        max_image_pixels=download_params.max_image_pixels,
        **augmentation,
    )
    tables.write_recipes(recipes, paths.out)
    with atomic.atomic_path(paths.preview) as temporary:
        preview.save(temporary, format="PNG", optimize=True)
    logging.info("%d training images, %d rows with recipes; preview %s", len(train), len(recipes), paths.preview)


if __name__ == "__main__":
    main()
