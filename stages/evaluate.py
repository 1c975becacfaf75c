"""evaluate stage: models/head + data/features/{val,test}.npz -> metrics/evaluate.json and plots."""

import logging

from transferlab import heads
from transferlab.core import atomic, stage
from transferlab.data import tables
from transferlab.features import files
from transferlab.heads import seeds
from transferlab.reports import evaluate, gallery


@stage.define(
    "evaluate",
    paths={
        "features": "folder holding val.npz and test.npz",
        "model": "the train_head stage's head folder",
        "images": "the dataset's image folder (for the gallery, and the pixels of a scratch head)",
        "metrics": "evaluation report (JSON)",
        "plots": "folder for confusion.json, test_predictions.csv and gallery.png",
    },
    optional={
        "extract_metrics": "metrics/extract_features.json, for the engine and image size in the provenance",
        "taps": "the extract_taps stage's folder (data/taps): what the heads that fine-tune classify",
    },
    sections={"base": "base", "download": "download", "settings": "evaluate"},
)
def main(paths, base, download, settings):
    limit = download.max_image_pixels
    head = heads.load_head(paths.model)
    seed_record = seeds.read_record(paths.model)  # None unless train_head.seeds > 1
    splits = files.load_splits(
        paths.features,
        ("val", "test"),
        images_directory=paths.images,
        max_image_pixels=limit,
        taps_directory=paths.taps,
    )
    result = evaluate.evaluate(
        head=head,
        val=splits["val"],
        test=splits["test"],
        gallery_images=settings.gallery_images,
        extract_report=evaluate.read_extract_report(paths.extract_metrics),
        seed_record=seed_record,
        other_seeds=seeds.other_heads(paths.model, seed_record, heads.load_head) if seed_record else (),
    )
    with atomic.atomic_directory(paths.plots) as folder:
        atomic.write_json(folder / "confusion.json", result.confusion)
        tables.write_predictions(result.predictions, folder / "test_predictions.csv")
        gallery.render_gallery(
            result.mistakes,
            images_directory=paths.images,
            path=folder / "gallery.png",
            test_images=len(splits["test"]),
            max_image_pixels=limit,
        )
    atomic.write_json(paths.metrics, result.metrics)
    logging.info(evaluate.describe(result.metrics))


if __name__ == "__main__":
    main()
