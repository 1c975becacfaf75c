"""Fine-tuning a backbone's top on cached taps vs from pixels: seconds per epoch, total, peak memory.

Both variants train the same layers (the backbone from ``from_layer`` up, batch norm frozen,
plus Dropout and a softmax) on the same training rows of a features folder that the pipeline
wrote with ``train_head.head=finetune`` (``data/features`` with ``taps/``), each in its own
process so that peak memory is its own:

- ``taps``: transferlab's finetune head, on the cached float16 tap activations (memory-mapped);
- ``pixels``: the usual way: every epoch decodes and resizes the photos (Pillow, two threads,
  random flips), runs the frozen bottom forward, then trains the top.

Run it alone on an otherwise idle machine (timings are noisy on 2 cores), after the pipeline::

    dvc exp run -S train_head.head=finetune ...    # writes data/features/taps
    python benchmarks/finetune_speed.py --features data/features --images data/raw/images

Prints one line per variant: epochs, seconds per epoch (first and median), total seconds,
validation accuracy, peak RSS; and the ratio of the pixel epoch to the tap epoch.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("taps", "pixels")


def run_taps(arguments) -> dict:
    """The finetune head on cached taps, ``--epochs`` epochs, no early stopping."""
    from transferlab.features import files
    from transferlab.heads import base, finetune

    splits = files.load_splits(arguments.features, ("train", "val"))
    started = time.perf_counter()
    outcome = finetune.train(
        train=splits["train"],
        val=splits["val"],
        seed=0,
        class_weight="none",
        from_layer=arguments.from_layer,
        epochs=arguments.epochs,
        learning_rate=3e-4,
        batch_size=32,
        dropout=0.3,
        flip=True,
        patience=arguments.epochs,
    )
    seconds = time.perf_counter() - started
    accuracy = base.accuracy_and_loss(base.predict_split(outcome.head, splits["val"]), splits["val"].labels)["accuracy"]
    return _figures("taps", outcome.report["epoch_seconds"], seconds, accuracy, len(splits["train"]))


def run_pixels(arguments) -> dict:
    """The same layers fine-tuned from decoded pixels, ``--pixel-epochs`` epochs."""
    import keras
    import numpy as np

    from transferlab.backbones import taps
    from transferlab.features import files
    from transferlab.heads import finetune, keras_common

    splits = files.load_splits(arguments.features, ("train", "val"))
    tapped = finetune.check_taps(splits["train"])
    layer = taps.resolve_from_layer(tapped.block, arguments.from_layer)
    keras_common.seed_everything(0)
    backbone = keras.models.load_model(tapped.backbone_file, compile=False)
    bottom = taps.bottom_model(backbone, layer)
    bottom.trainable = False
    head = finetune.build_model(
        backbone=backbone, layer=layer, classes=len(splits["train"].class_names), dropout=0.3, seed=0
    )
    pixels = keras.Input(bottom.input_shape[1:], name="pixels")
    model = keras.Model(pixels, head(bottom(pixels)))
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    size = int(bottom.input_shape[1])
    PixelBatches = _pixel_batches_class()  # noqa: N806 - a class
    timer = finetune._EpochTimer()
    started = time.perf_counter()
    model.fit(
        PixelBatches(splits["train"], arguments.images, size=size, shuffle=True, flip=True),
        validation_data=PixelBatches(splits["val"], arguments.images, size=size),
        epochs=arguments.pixel_epochs,
        verbose=0,
        callbacks=[timer],
    )
    seconds = time.perf_counter() - started
    probabilities = model.predict(PixelBatches(splits["val"], arguments.images, size=size), verbose=0)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == splits["val"].labels))
    return _figures("pixels", timer.seconds, seconds, accuracy, len(splits["train"]))


@functools.cache
def _pixel_batches_class():  # a PyDataset subclass, defined once Keras is imported
    import keras
    import numpy as np

    from transferlab.features import decode

    class PixelBatches(keras.utils.PyDataset):
        """Decodes and resizes each batch's photos (and their augmentation recipes) when asked."""

        def __init__(self, split, images, *, size, shuffle=False, flip=False, batch_size=32):
            super().__init__(workers=2, use_multiprocessing=False)  # two decoding threads, as tf.data would use
            self.split, self.images, self.size, self.flip, self.batch_size = split, Path(images), size, flip, batch_size
            self.rng = np.random.default_rng(0)
            self.order = self.rng.permutation(len(split)) if shuffle else np.arange(len(split))

        def __len__(self):
            return -(-len(self.split) // self.batch_size)

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            split = self.split
            batch = np.stack(
                [
                    decode.render(
                        decode.Item(split.sha256[row], split.recipes[row], split.paths[row]),
                        images_directory=self.images,
                        size=self.size,
                        max_image_pixels=10**9,
                    )
                    for row in rows
                ]
            ).astype(np.float32)
            if self.flip:
                mirrored = np.random.default_rng([index, len(rows)]).random(len(rows)) < 0.5
                batch[mirrored] = batch[mirrored, :, ::-1]
            return batch, split.labels[rows].astype(np.int32)

    return PixelBatches


def _figures(variant: str, epoch_seconds: list[float], seconds: float, accuracy: float, rows: int) -> dict:
    return {
        "variant": variant,
        "rows": rows,
        "epochs": len(epoch_seconds),
        "first_epoch_seconds": epoch_seconds[0],
        "median_epoch_seconds": statistics.median(epoch_seconds),
        "seconds": seconds,
        "val_accuracy": accuracy,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=Path("data/features"), help="features folder with taps/")
    parser.add_argument("--images", type=Path, default=Path("data/raw/images"))
    parser.add_argument("--from-layer", default="auto", help="must be the layer the taps were cut at")
    parser.add_argument("--epochs", type=int, default=8, help="epochs on cached taps")
    parser.add_argument("--pixel-epochs", type=int, default=1, help="epochs from pixels")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        result = run_taps(arguments) if arguments.child == "taps" else run_pixels(arguments)
        print(json.dumps(result))
        return
    results = []
    for variant in arguments.variants.split(","):
        command = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--features",
            str(arguments.features),
            "--images",
            str(arguments.images),
            "--from-layer",
            arguments.from_layer,
            "--epochs",
            str(arguments.epochs),
            "--pixel-epochs",
            str(arguments.pixel_epochs),
        ]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        _print(results)


def _print(results: list[dict]) -> None:
    print(
        f"\n{'variant':<8} {'rows':>5} {'epochs':>6} {'1st epoch s':>11} {'median epoch s':>14} {'total s':>8} "
        f"{'val acc':>7} {'peak RSS GiB':>12}"
    )
    for result in results:
        print(
            f"{result['variant']:<8} {result['rows']:>5} {result['epochs']:>6} {result['first_epoch_seconds']:>11.1f} "
            f"{result['median_epoch_seconds']:>14.1f} {result['seconds']:>8.1f} {result['val_accuracy']:>7.4f} "
            f"{result['peak_rss_gib']:>12.2f}"
        )
    by_name = {result["variant"]: result for result in results}
    if {"taps", "pixels"} <= set(by_name):
        ratio = by_name["pixels"]["median_epoch_seconds"] / by_name["taps"]["median_epoch_seconds"]
        print(f"an epoch from pixels costs {ratio:.1f}x an epoch on cached taps")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
