"""split stage: data/raw/index.csv -> data/splits/{train,val,test}.csv + metrics/split.json.

The index is streamed: read row by row in three passes (transferlab.data.split.split_index), never held whole.
"""

import logging

from transferlab.core import atomic, stage
from transferlab.data import split, tables


@stage.define(
    "split",
    paths={
        "index": "the download stage's index.csv",
        "out": "folder for train.csv, val.csv, test.csv",
        "metrics": "split report (JSON)",
    },
    sections={"base": "base", "split_params": "split"},
)
def main(paths, base, split_params):
    result = split.split_index(
        tables.stream_index(paths.index),
        val_fraction=split_params.val_fraction,
        test_fraction=split_params.test_fraction,
        seed=base.seed,
        max_images_per_class=split_params.max_images_per_class,
        exclude=split_params.exclude,
    )
    tables.write_routed_splits(result.stream_splits(), split.SPLIT_NAMES, paths.out)
    atomic.write_json(paths.metrics, result.report)
    logging.info(split.describe(result.report))


if __name__ == "__main__":
    main()
