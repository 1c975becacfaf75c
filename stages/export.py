"""export stage: backbone(s) + models/head -> models/export (model.keras, model.tflite or a TFLite stack), checked.

Usage (as in dvc.yaml):
    python stages/export.py --features data/features --model models/head \
        --test-predictions metrics/evaluate/test_predictions.csv --images data/raw/images \
        --out models/export --metrics metrics/export.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transferlab import heads
from transferlab.backbones import stack
from transferlab.core import atomic, params
from transferlab.export import build
from transferlab.heads import train_head
from transferlab.core.stage_runner import run_stage

DEFAULT_MAX_IMAGE_PIXELS = params.DownloadParams().max_image_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True, help="folder holding test.npz (to check the blocks)")
    parser.add_argument("--model", type=Path, required=True, help="the train_head stage's head folder")
    parser.add_argument("--test-predictions", type=Path, required=True, help="evaluate's test_predictions.csv")
    parser.add_argument("--images", type=Path, required=True, help="the dataset's image folder (data/raw/images)")
    parser.add_argument("--out", type=Path, required=True, help="the export folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="export report (JSON)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    base = params.load_section("base", arguments.params)
    extract_settings = params.load_section("extract_features", arguments.params)
    settings: params.ExportParams = params.load_section("export", arguments.params)

    members = stack.resolve_members(extract_settings, seed=base.seed)
    head = heads.load_head(arguments.model)
    test = train_head.load_splits(arguments.features, ("test",))["test"]
    build.check_consistency(members=members, head=head, test=test)
    rows = build.select_rows(
        build.read_test_predictions(arguments.test_predictions), count=settings.check_images, seed=base.seed
    )
    with atomic.atomic_directory(arguments.out) as folder:
        manifest = build.write_export(
            folder, members=members, head=head, head_folder=arguments.model, seed=base.seed, tflite=settings.tflite,
            block_engines=test.engine if isinstance(test.engine, list) else [test.engine] * len(members),
        )
        check = build.check_against_evaluate(
            folder, rows=rows, images_directory=arguments.images, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS
        )
    report = {**check, "files": build.file_sizes(manifest), "provenance": build.provenance(manifest, head)}
    atomic.write_json(arguments.metrics, report)
    if report["provenance"]["random_init"]:
        logging.warning("random-init backbone weights: this export classifies nothing real")
    for name, figures in check["formats"].items():
        logging.info(
            "%s: top-1 agreement with evaluate %.2f%% on %d test images, %.1f ms per image",
            name, 100 * figures["top1_agreement"], check["checked_images"], figures["latency_ms"],
        )


if __name__ == "__main__":
    run_stage("export", main)
