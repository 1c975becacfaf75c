"""train_head stage: data/features/{train,val}.npz (+ data/raw/images) -> models/head/, metrics/train_head.json, dvclive curves."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transferlab.core import atomic, params, stage_runner
from transferlab.heads import train_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, required=True, help="folder holding train.npz and val.npz")
    parser.add_argument("--model", type=Path, required=True, help="folder to save the head into")
    parser.add_argument("--metrics", type=Path, required=True, help="training report (JSON)")
    parser.add_argument("--live", type=Path, required=True, help="folder for the dvclive per-step curves")
    parser.add_argument("--images", type=Path, default=None,
                        help="the dataset's image folder (data/raw/images): the scratch head trains on its pixels")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    base = params.load_section("base", arguments.params)
    settings: params.TrainHeadParams = params.load_section("train_head", arguments.params)
    splits = train_head.load_splits(arguments.features, ("train", "val"), images_directory=arguments.images)
    logging.info(
        "training the %s head on %d rows, validating on %d (%d features, %d classes)",
        settings.head, len(splits["train"]), len(splits["val"]), splits["train"].features.shape[1],
        len(splits["train"].class_names),
    )
    with train_head.live_curves(arguments.live) as log_step:
        result = train_head.train_head(
            head=settings.head, train=splits["train"], val=splits["val"], seed=base.seed,
            class_weight=settings.class_weight, options=settings.head_options(), log_step=log_step,
        )
        train_head.save_head(result.head, arguments.model)
    atomic.write_json(arguments.metrics, result.metrics)
    figures = result.metrics
    val_accuracy = f"{figures['val']['accuracy']:.4f}" if "accuracy" in figures["val"] else "n/a (no validation rows)"
    logging.info(
        "%s head: train accuracy %.4f, val accuracy %s, %.1f s",
        settings.head, figures["train"]["accuracy"], val_accuracy, figures["seconds"],
    )


if __name__ == "__main__":
    stage_runner.run_stage("train_head", main)
