"""extract_features stage: embeds train (with augmented views), val and test with the stack.

With ``train_head.head: finetune`` it also writes the tap activations that head trains on
(``<out>/taps/``: the input of ``train_head.finetune.from_layer``), so it reads those two
train_head keys too (they are listed as this stage's params in dvc.yaml).

Usage (as in dvc.yaml):
    python stages/extract_features.py --images data/raw/images --splits data/splits \
        --augmented data/augmented/train.csv --out data/features --metrics metrics/extract_features.json
"""

import argparse
import logging
from pathlib import Path

from transferlab.backbones import stack
from transferlab.core import atomic, params
from transferlab.features import embedding_cache, extract_features, files
from transferlab.core.stage_runner import run_stage

DEFAULT_MAX_IMAGE_PIXELS = params.DownloadParams().max_image_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    arguments = parser.parse_args()

    base = params.load_section("base")
    settings = params.load_section("extract_features")
    members = stack.resolve_members(settings, seed=base.seed)
    if any(member.random_init for member in members):
        logging.warning("weights: none -> RANDOM-INIT backbone(s): for tests only; every output says random_init")
    rows_by_split = {
        "train": extract_features.read_rows(arguments.augmented),
        "val": extract_features.read_rows(arguments.splits / "val.csv"),
        "test": extract_features.read_rows(arguments.splits / "test.csv"),
    }
    cache_directory = embedding_cache.cache_directory(settings.cache_dir) if settings.cache else None
    head: params.TrainHeadParams = params.load_section("train_head")
    if head.head == "finetune":
        extract_features.tap_member(members)  # a stack or a TFLite backbone fails before any work
    with atomic.atomic_directory(arguments.out) as temporary:
        taps = extract_features.TapRequest(head.finetune.from_layer, temporary / "taps") if head.head == "finetune" else None
        feature_sets, report = extract_features.extract_features(
            members=members,
            rows_by_split=rows_by_split,
            images_directory=arguments.images,
            cache_directory=cache_directory,
            engine=settings.engine,
            batch_size=settings.batch_size,
            threads=settings.decode_threads,
            seed=base.seed,
            max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
            tap_request=taps,
            mirror_average=settings.mirror_average,
        )
        files.write_feature_files(temporary, feature_sets)
    atomic.write_json(arguments.metrics, report)
    logging.info(
        "%s: %d embedded, %d cache hits, %.1f s (%s images/s)",
        report["stack"], report["embedded"], report["cache_hits"], report["seconds"], report["images_per_second"],
    )
    if "taps" in report:
        taps_report = report["taps"]
        logging.info(
            "taps at %s %s: %d computed, %d cache hits, %.1f MB in files",
            taps_report["layer"], taps_report["shape"], taps_report["computed"], taps_report["cache_hits"],
            taps_report["file_bytes"] / 1e6,
        )


if __name__ == "__main__":
    run_stage("extract_features", main)
