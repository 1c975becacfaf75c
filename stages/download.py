"""download stage: download.source -> data/raw/images/, data/raw/index.csv + metrics/download.json."""

import logging

from transferlab.core import atomic, stage
from transferlab.data import download


@stage.define(
    "download",
    paths={
        "images": "folder that receives the class folders",
        "index": "index of every file (CSV)",
        "metrics": "download report (JSON)",
    },
    sections={"base": "base", "download_params": "download"},  # base: validated, though nothing here is random
)
def main(paths, base, download_params):
    # Both outputs are swapped in only after every check passed; on an error both stay as they were.
    # The index is streamed into its temporary file as the images are checked (never held whole).
    with atomic.atomic_path(paths.index) as index, atomic.atomic_directory(paths.images) as images:
        result = download.prepare_dataset(
            source=download_params.source,
            sha256=download_params.sha256,
            destination=images,
            min_image_side=download_params.min_image_side,
            min_images_per_class=download_params.min_images_per_class,
            max_files=download_params.max_files,
            max_total_bytes=download_params.max_total_bytes,
            max_expansion_ratio=download_params.max_expansion_ratio,
            max_image_pixels=download_params.max_image_pixels,
            retries=download_params.retries,
            deadline_seconds=download_params.deadline_seconds,
            index_path=index,
        )
    atomic.write_json(paths.metrics, result.metrics)
    logging.info(download.describe(result.metrics))


if __name__ == "__main__":
    main()
