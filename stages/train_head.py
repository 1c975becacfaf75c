"""train_head stage: data/features/{train,val}.npz (+ images) -> models/head, metrics/train_head.json, live curves."""

import logging

from transferlab.core import atomic, stage
from transferlab.features import files
from transferlab.heads import train_head


@stage.define(
    "train_head",
    paths={
        "features": "folder holding train.npz and val.npz",
        "model": "folder to save the head into",
        "metrics": "training report (JSON)",
        "live": "folder for the dvclive per-step curves",
    },
    optional={
        "images": "the dataset's image folder (data/raw/images): the scratch head trains on its pixels",
        "taps": "the extract_taps stage's folder (data/taps): the heads that fine-tune train on its activations",
    },
    sections={"base": "base", "download": "download", "settings": "train_head"},
)
def main(paths, base, download, settings):
    splits = files.load_splits(
        paths.features,
        ("train", "val"),
        images_directory=paths.images,
        max_image_pixels=download.max_image_pixels,
        taps_directory=paths.taps,
    )
    with train_head.live_curves(paths.live) as log_step:
        result = train_head.train_head(
            head=settings.head,
            train=splits["train"],
            val=splits["val"],
            seed=base.seed,
            class_weight=settings.class_weight,
            options=settings.head_options(),
            log_step=log_step,
            seed_count=settings.seeds,
        )
        train_head.save_result(result, paths.model)
    atomic.write_json(paths.metrics, result.metrics)
    logging.info(train_head.describe(result.metrics))


if __name__ == "__main__":
    main()
