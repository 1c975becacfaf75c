"""extract_features stage: embeds train (with augmented views), val and test with the stack.

With ``train_head.head: finetune`` it also writes the tap activations that head trains on
(``<out>/taps/``: the input of ``train_head.finetune.from_layer``), so it reads those two
train_head keys too, and ``download.max_image_pixels`` for decoding (all listed in dvc.yaml).
"""

from transferlab.backbones import stack
from transferlab.core import atomic, stage
from transferlab.data import tables
from transferlab.features import embedding_cache, extract_features, files, tap_jobs


@stage.define(
    "extract_features",
    paths={
        "images": "the folder the splits' paths are relative to",
        "splits": "the split stage's folder (val.csv and test.csv are read)",
        "augmented": "the augment stage's train.csv (every training view)",
        "out": "features folder to write: {train,val,test}.npz (and taps/ for the finetune head)",
        "metrics": "extract_features report (JSON)",
    },
    sections={"base": "base", "settings": "extract_features", "head": "train_head", "download": "download"},
)
def main(paths, base, settings, head, download):
    members = stack.resolve_members(settings, seed=base.seed)
    rows_by_split = {"train": tables.read_views(paths.augmented)}
    rows_by_split.update({split: tables.read_views(paths.splits / f"{split}.csv") for split in ("val", "test")})
    cache_directory = embedding_cache.cache_directory(settings.cache_dir) if settings.cache else None
    finetune = head.head == "finetune"
    if finetune:
        tap_jobs.tap_member(members)  # a stack or a TFLite backbone fails before any work
    with atomic.atomic_directory(paths.out) as temporary:
        feature_sets, report = extract_features.extract_features(
            members=members,
            rows_by_split=rows_by_split,
            images_directory=paths.images,
            cache_directory=cache_directory,
            engine=settings.engine,
            batch_size=settings.batch_size,
            threads=settings.decode_threads,
            seed=base.seed,
            max_image_pixels=download.max_image_pixels,
            tap_request=tap_jobs.TapRequest(head.finetune.from_layer, temporary / "taps") if finetune else None,
            mirror_average=settings.mirror_average,
        )
        files.write_feature_files(temporary, feature_sets)
    atomic.write_json(paths.metrics, report)
    extract_features.log_report(report)


if __name__ == "__main__":
    main()
