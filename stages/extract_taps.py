"""extract_taps stage: tap activations of the members a head fine-tunes -> data/taps/, metrics/extract_taps.json.

Its params (dvc.yaml) are only what taps depend on: the stack and engine keys of
extract_features, ``train_head.head``, ``train_head.finetune.from_layer`` and
``train_head.fusion.finetune`` / ``from_layer``. When the head trains on no taps (logistic,
dense, scratch) it writes only ``taps.json`` (always the same bytes) and imports no TensorFlow.
"""

from transferlab.backbones import stack
from transferlab.core import atomic, stage
from transferlab.data import tables
from transferlab.features import embedding_cache, extract_taps


@stage.define(
    "extract_taps",
    paths={
        "images": "the folder the splits' paths are relative to",
        "splits": "the split stage's folder (val.csv and test.csv are read)",
        "augmented": "the augment stage's train.csv (every training view)",
        "out": "taps folder to write: taps.json and <member>/{train,val,test}.npy",
        "metrics": "extract_taps report (JSON)",
    },
    sections={"base": "base", "settings": "extract_features", "head": "train_head", "download": "download"},
)
def main(paths, base, settings, head, download):
    plans = []
    if head.head in extract_taps.TAP_HEADS:  # other heads: no member resolved, nothing read
        plans = extract_taps.plan_taps(
            stack.resolve_members(settings, seed=base.seed),
            head=head.head,
            finetune_from_layer=head.finetune.from_layer,
            fusion_finetune=head.fusion.finetune,
            fusion_from_layer=head.fusion.from_layer,
        )
    rows_by_split = {}
    if plans:
        rows_by_split = {"train": tables.read_views(paths.augmented)}
        rows_by_split.update({split: tables.read_views(paths.splits / f"{split}.csv") for split in ("val", "test")})
    with atomic.atomic_directory(paths.out) as temporary:
        report = extract_taps.extract_taps(
            plans=plans,
            rows_by_split=rows_by_split,
            images_directory=paths.images,
            cache_directory=embedding_cache.cache_directory(settings.cache_dir) if settings.cache else None,
            engine=settings.engine,
            batch_size=settings.batch_size,
            threads=settings.decode_threads,
            seed=base.seed,
            max_image_pixels=download.max_image_pixels,
            directory=temporary,
        )
    atomic.write_json(paths.metrics, report)
    extract_taps.log_report(report)


if __name__ == "__main__":
    main()
