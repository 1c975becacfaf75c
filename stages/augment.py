"""augment stage: data/splits/train.csv -> data/augmented/train.csv (recipes) + a preview grid PNG.

The preview (see transferlab.data.augment_preview) shows a few training images beside their
first augmented views, rendered by the same function extract_features uses. train.csv is streamed
(read row by row for the preview's sample, then again into the recipes file), never held whole.
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
    train = tables.stream_split(paths.train)
    augmentation = augment_params.recipe_options()
    recipes = augment.iter_recipes(tables.in_path_order(train), seed=base.seed, **augmentation)
    preview = augment_preview.build_preview(
        train,
        images_directory=paths.images,
        preview_images=augment_params.preview_images,
        seed=base.seed,
        max_image_pixels=download_params.max_image_pixels,
        **augmentation,
    )
    written = tables.write_recipes(recipes, paths.out)
    with atomic.atomic_path(paths.preview) as temporary:
        preview.save(temporary, format="PNG", optimize=True)
    images = written // (augmentation["copies"] + 1)  # each image: its original, then its copies
    logging.info("%d training images, %d rows with recipes; preview %s", images, written, paths.preview)


if __name__ == "__main__":
    main()
