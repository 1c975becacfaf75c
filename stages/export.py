"""export stage: backbone(s) + models/head -> models/export (model.keras, model.tflite or a TFLite stack), checked."""

import logging

from transferlab import heads
from transferlab.backbones import stack
from transferlab.core import atomic, stage
from transferlab.data import tables
from transferlab.export import build, check, fused
from transferlab.features import embedding_cache, extract_features, files


@stage.define(
    "export",
    paths={
        "features": "folder holding test.npz (to check the blocks)",
        "model": "the train_head stage's head folder",
        "test_predictions": "evaluate's test_predictions.csv",
        "images": "the dataset's image folder (data/raw/images)",
        "out": "the export folder to write",
        "metrics": "export report (JSON)",
    },
    sections={"base": "base", "download": "download", "extract": "extract_features", "settings": "export"},
)
def main(paths, base, download, extract, settings):
    members = stack.resolve_members(extract, seed=base.seed)
    head = heads.load_head(paths.model)
    test = files.load_splits(paths.features, ("test",))["test"]
    build.check_consistency(members=members, head=head, test=test)
    predictions = tables.read_predictions(paths.test_predictions)
    rows = check.select_rows(predictions, count=settings.check_images, seed=base.seed)
    cache_directory = embedding_cache.cache_directory(extract.cache_dir) if extract.cache else None
    # Keras backbones are taken from extract_features' conversion folder, not converted again.
    with (
        atomic.atomic_directory(paths.out) as folder,
        extract_features.conversion_directory(cache_directory) as converted,
    ):
        manifest = (fused.write_fused if fused.is_fused(head) else build.write_export)(
            folder,
            members=members,
            head=head,
            head_folder=paths.model,
            seed=base.seed,
            tflite=settings.tflite,
            max_image_pixels=download.max_image_pixels,
            block_engines=test.block_engines,
            keras=settings.keras,
            conversion_directory=converted,
            sample_pixels=check.photo_sample(
                rows, images_directory=paths.images, max_image_pixels=download.max_image_pixels
            ),
        )
        checked, why = check.sample_first(
            rows, seed=base.seed, backbones_as_embedded=build.backbones_as_embedded(manifest)
        )
        agreement = check.check_against_evaluate(
            folder, rows=checked, images_directory=paths.images, max_image_pixels=download.max_image_pixels
        )
        agreement.update(selected_images=len(rows), checked_because=why)
        # One format that disagrees never costs the user the others: drop it, keep what agrees.
        manifest = build.drop_formats(folder, manifest, check.dropped_reasons(agreement))
    atomic.write_json(paths.metrics, build.export_report(manifest, head, agreement))
    logging.info(check.describe(agreement))


if __name__ == "__main__":
    main()
