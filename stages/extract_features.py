"""extract_features stage: embeds train (with augmented views), val and test with the stack.

It reads ``download.max_image_pixels`` for decoding (listed in dvc.yaml) and no train_head key:
the finetune head's tap activations are the extract_taps stage's, so changing the head never
reruns this stage.
"""

from transferlab.backbones import stack
from transferlab.core import atomic, stage
from transferlab.data import tables
from transferlab.features import embedding_cache, extract_features


@stage.define(
    "extract_features",
    paths={
        "images": "the folder the splits' paths are relative to",
        "splits": "the split stage's folder (val.csv and test.csv are read)",
        "augmented": "the augment stage's train.csv (every training view)",
        "out": "features folder to write: {train,val,test}.npz",
        "metrics": "extract_features report (JSON)",
    },
    sections={"base": "base", "settings": "extract_features", "download": "download"},
)
def main(paths, base, settings, download):
    members = stack.resolve_members(settings, seed=base.seed)
    # Columns read a row at a time: a dict per row would cost ~0.5 KB per image at 10^5-10^6 images.
    files = {"train": paths.augmented, "val": paths.splits / "val.csv", "test": paths.splits / "test.csv"}
    rows_by_split = {split: extract_features.SplitRows.of(tables.stream_views(path)) for split, path in files.items()}
    cache_directory = embedding_cache.cache_directory(settings.cache_dir) if settings.cache else None
    with atomic.atomic_directory(paths.out) as temporary:
        _, report = extract_features.extract_features(
            members=members,
            rows_by_split=rows_by_split,
            images_directory=paths.images,
            cache_directory=cache_directory,
            engine=settings.engine,
            batch_size=settings.batch_size,
            threads=settings.decode_threads,
            seed=base.seed,
            max_image_pixels=download.max_image_pixels,
            mirror_average=settings.mirror_average,
            cache_remote_url=settings.cache_remote,
            executor=settings.executor,
            ray_workers=settings.ray_workers,
            storage_dtype=settings.storage_dtype,
            write_to=temporary,  # written from the embedding cache a chunk at a time
        )
    atomic.write_json(paths.metrics, report)
    extract_features.log_report(report)


if __name__ == "__main__":
    main()
