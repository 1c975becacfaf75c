"""evaluate stage: models/head + data/features/{val,test}.npz -> metrics/evaluate.json and plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transferlab import heads
from transferlab.core import atomic, params, stage_runner
from transferlab.heads import train_head
from transferlab.reports import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, required=True, help="folder holding val.npz and test.npz")
    parser.add_argument("--model", type=Path, required=True, help="the train_head stage's head folder")
    parser.add_argument("--images", type=Path, required=True,
                        help="the dataset's image folder (for the gallery, and the pixels of a scratch head)")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluation report (JSON)")
    parser.add_argument("--plots", type=Path, required=True,
                        help="folder for confusion.json, test_predictions.csv and gallery.png")
    parser.add_argument("--extract-metrics", type=Path, default=None,
                        help="metrics/extract_features.json, for the engine and image size in the provenance")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    params.load_section("base", arguments.params)
    settings: params.EvaluateParams = params.load_section("evaluate", arguments.params)
    head = heads.load_head(arguments.model)
    splits = train_head.load_splits(arguments.features, ("val", "test"), images_directory=arguments.images)
    result = evaluate.evaluate(
        head=head, val=splits["val"], test=splits["test"], gallery_images=settings.gallery_images,
        extract_report=evaluate.read_extract_report(arguments.extract_metrics),
    )
    with atomic.atomic_directory(arguments.plots) as folder:
        atomic.write_json(folder / "confusion.json", result.confusion)
        evaluate.write_predictions(result.predictions, folder / "test_predictions.csv")
        evaluate.render_gallery(result.mistakes, images_directory=arguments.images, path=folder / "gallery.png",
                                  test_images=len(splits["test"]))
    atomic.write_json(arguments.metrics, result.metrics)
    test, origin = result.metrics["test"], result.metrics["provenance"]
    if origin["random_init"]:
        logging.warning("random-init backbone weights: these figures say nothing about real accuracy")
    logging.info(
        "%s + %s head on %d test images: accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, top-2 %.4f",
        origin["backbone"], origin["head"], test["examples"], test["accuracy"], test["balanced_accuracy"],
        test["macro_f1"], test["top2_accuracy"],
    )


if __name__ == "__main__":
    stage_runner.run_stage("evaluate", main)
