"""Fine-tuning a backbone's top on cached taps: the training loop's options, and taps vs pixels.

**Loop variants** (issue 15 item 6), each in its own process on the same cached taps, same seed,
same epochs (no early stopping), side by side with the CPU's flags:

- ``plain``: a ``keras.utils.PyDataset`` of float32 batches (each float16 batch converted in
  Python), no XLA: the finetune head before this benchmark;
- ``xla``: the same, compiled with ``jit_compile=True`` (XLA on the CPU);
- ``tfdata``: the same batches through ``tf.data`` (``from_generator``) with ``prefetch``, so the
  next batch is read and flipped while the current one trains;
- ``float16``: the float16 maps fed as they are, cast to float32 inside the model;
- combinations joined by ``+`` (``tfdata+float16``).

Each prints seconds per epoch (the first, which traces or compiles, and the median of the rest)
and validation accuracy after the last epoch: a faster loop must not change it beyond noise.
Under load, compare the CPU seconds per epoch (this process, all threads): wall time then
mostly measures the other processes.

**taps vs pixels** (``--variants taps,pixels``): both train the same layers (the backbone from
``from_layer`` up, batch norm frozen, plus Dropout and a softmax) on the same training rows,
each in its own process so that peak memory is its own:

- ``taps``: transferlab's finetune head, on the cached float16 tap activations (memory-mapped);
- ``pixels``: the usual way: every epoch decodes and resizes the photos (Pillow, two threads,
  random flips), runs the frozen bottom forward, then trains the top.

Run it after the pipeline has written taps (timings are noisy on 2 cores; say whether the
machine was loaded)::

    dvc exp run -S train_head.head=finetune ...    # writes data/taps/<member>/
    python benchmarks/finetune_speed.py --taps data/taps/mobilenet_v2 --epochs 5
    python benchmarks/finetune_speed.py --variants taps,pixels --images data/raw/images

Prints one line per variant: rows, epochs, seconds per epoch (first and median), total seconds,
validation accuracy, peak RSS; and the ratio of each variant's median epoch to the first one's.
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
LOOP_OPTIONS = ("xla", "tfdata", "float16")
LOOP_VARIANTS = ("plain", "xla", "tfdata", "float16", "tfdata+float16")
SEED = 0


def run_taps(arguments) -> dict:
    """The finetune head as shipped (heads/finetune.py) on cached taps, ``--epochs`` epochs, no early stopping."""
    from transferlab.heads import base, finetune

    splits = _splits_with_taps(arguments)
    started = time.perf_counter()
    outcome = finetune.train(
        train=splits["train"],
        val=splits["val"],
        seed=SEED,
        class_weight="none",
        from_layer=arguments.from_layer,
        epochs=arguments.epochs,
        learning_rate=3e-4,
        schedule="constant",
        batch_size=32,
        dropout=0.3,
        flip=True,
        patience=arguments.epochs,
    )
    seconds = time.perf_counter() - started
    accuracy = base.accuracy_and_loss(base.predict_split(outcome.head, splits["val"]), splits["val"].labels)["accuracy"]
    return _figures("taps", outcome.report["epoch_seconds"], seconds, accuracy, len(splits["train"]))


def _splits_with_taps(arguments) -> dict:
    """train and val features with their taps (data/taps/ as extract_taps writes it)."""
    import inspect

    from transferlab.features import files

    if "taps_directory" in inspect.signature(files.load_splits).parameters:
        return files.load_splits(arguments.features, ("train", "val"), taps_directory=arguments.taps.parent)
    return files.load_splits(arguments.features, ("train", "val"))  # taps beside the features (before extract_taps)


def run_loop(arguments, variant: str) -> dict:
    """One training-loop variant (see the module docstring) on the member's cached taps."""
    import keras
    import numpy as np

    from transferlab.features import files
    from transferlab.heads import finetune, keras_common

    options = set(variant.split("+")) - {"plain"}
    if options - set(LOOP_OPTIONS):
        raise ValueError(f"unknown loop option(s) {sorted(options - set(LOOP_OPTIONS))}; choose from {LOOP_OPTIONS}")
    folder = Path(arguments.taps)
    layer = json.loads((folder / "taps.json").read_text())["layer"]
    maps = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("train", "val")}
    labels = {name: files.load_features(Path(arguments.features) / f"{name}.npz").labels for name in maps}
    keras_common.seed_everything(SEED)
    backbone = keras.models.load_model(folder / "backbone.keras", compile=False)
    model = finetune.build_model(
        backbone=backbone, layer=layer, classes=int(labels["train"].max()) + 1, dropout=0.3, seed=SEED
    )
    if "float16" in options:  # the maps go in as stored; the model casts them
        inputs = keras.Input(shape=maps["train"].shape[1:], dtype="float16", name="tap_float16")
        model = keras.Model(inputs, model(keras.ops.cast(inputs, "float32")))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=3e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile="xla" in options,
    )
    dtype = np.float16 if "float16" in options else np.float32
    batches = {
        "train": _Batches(
            maps["train"], labels["train"], batch_size=32, seed=SEED, shuffle=True, flip=True, dtype=dtype
        ),
        "val": _Batches(maps["val"], labels["val"], batch_size=128, seed=SEED, dtype=dtype),
    }
    feeds = {name: _tf_data(batch) if "tfdata" in options else batch for name, batch in batches.items()}
    timer, cpu = finetune._EpochTimer(), _cpu_timer()
    started = time.perf_counter()
    history = model.fit(
        feeds["train"], validation_data=feeds["val"], epochs=arguments.epochs, verbose=0, callbacks=[timer, cpu]
    )
    seconds = time.perf_counter() - started
    accuracy = float(history.history["val_accuracy"][-1])
    return _figures(variant, timer.seconds, seconds, accuracy, len(labels["train"]), cpu.seconds)


def _cpu_timer():
    """A callback measuring each epoch's CPU seconds (this process, all threads): steadier than wall time under load."""
    import keras

    class CpuTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.process_time() - self.started)

    return CpuTimer()


def _Batches(*args, dtype, **kwargs):  # noqa: N802 - builds a class instance
    import numpy as np

    from transferlab.heads import finetune

    if dtype == np.float32:
        return finetune.TapBatches(*args, **kwargs)  # what the head uses
    return _Float16Batches()(*args, **kwargs)


@functools.cache
def _Float16Batches():  # noqa: N802 - a class
    import numpy as np

    from transferlab.heads import finetune

    class Float16Batches(finetune.TapBatches):
        """TapBatches without the float32 conversion: the rows as stored (float16), flipped the same way."""

        def __getitem__(self, index):
            rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
            maps = np.array(self.activations[rows])
            if self.flip:
                mirrored = np.random.default_rng([self.seed, self.epoch, index]).random(len(rows)) < 0.5
                maps[mirrored] = maps[mirrored, :, ::-1, :]
            return maps, self.labels[rows]

    return Float16Batches


def _tf_data(batches):
    """The same batches as a ``tf.data`` pipeline that prefetches (one pass per epoch, then reshuffled)."""
    import tensorflow as tf

    maps, labels = batches[0]

    def generate():
        for index in range(len(batches)):
            yield batches[index]
        batches.on_epoch_end()

    signature = (
        tf.TensorSpec((None, *maps.shape[1:]), tf.as_dtype(maps.dtype)),
        tf.TensorSpec((None,), tf.as_dtype(labels.dtype)),
    )
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(tf.data.AUTOTUNE)


def run_pixels(arguments) -> dict:
    """The same layers fine-tuned from decoded pixels, ``--pixel-epochs`` epochs."""
    import keras
    import numpy as np

    from transferlab.backbones import taps
    from transferlab.heads import finetune, keras_common

    splits = _splits_with_taps(arguments)
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


def _figures(
    variant: str, epoch_seconds: list[float], seconds: float, accuracy: float, rows: int, cpu_seconds=()
) -> dict:
    return {
        "median_epoch_cpu_seconds": statistics.median(cpu_seconds[1:] or cpu_seconds) if cpu_seconds else None,
        "variant": variant,
        "rows": rows,
        "epochs": len(epoch_seconds),
        "first_epoch_seconds": epoch_seconds[0],
        "median_epoch_seconds": statistics.median(epoch_seconds[1:] or epoch_seconds),  # after tracing/compiling
        "seconds": seconds,
        "val_accuracy": accuracy,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=Path("data/features"), help="features folder (labels)")
    parser.add_argument(
        "--taps",
        type=Path,
        default=Path("data/taps/mobilenet_v2"),
        help="one member's taps folder (data/taps/<member>)",
    )
    parser.add_argument("--images", type=Path, default=Path("data/raw/images"))
    parser.add_argument("--from-layer", default="auto", help="must be the layer the taps were cut at")
    parser.add_argument("--epochs", type=int, default=5, help="epochs on cached taps (the first traces or compiles)")
    parser.add_argument("--pixel-epochs", type=int, default=1, help="epochs from pixels")
    parser.add_argument(
        "--variants",
        default=",".join(LOOP_VARIANTS),
        help=f"comma-separated: taps, pixels, or loop variants ({', '.join(LOOP_OPTIONS)} joined by +, or plain)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        runners = {"taps": run_taps, "pixels": run_pixels}
        result = (
            runners[arguments.child](arguments) if arguments.child in runners else run_loop(arguments, arguments.child)
        )
        print(json.dumps(result))
        return
    print(f"CPU: {_cpu_description()}; load average {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    results = []
    for variant in arguments.variants.split(","):
        command = [sys.executable, __file__, "--child", variant.strip()]
        for flag in ("features", "taps", "images", "from_layer", "epochs", "pixel_epochs"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(arguments, flag))]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        _print(results)
    print(f"load average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")


def _cpu_description() -> str:
    """The CPU's model, CPU count and the flags that move kernel choices (transferlab.features.cpu)."""
    try:
        from transferlab.features import cpu
    except ImportError:  # an older checkout
        return f"{os.cpu_count()} CPUs"
    return cpu.current().description


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print(results: list[dict]) -> None:
    print(
        f"\n{'variant':<20} {'rows':>5} {'epochs':>6} {'1st epoch s':>11} {'median epoch s':>14} {'total s':>8} "
        f"{'val acc':>7} {'peak RSS GiB':>12} {'vs 1st variant':>14} {'median epoch CPU s':>18}"
    )
    reference = results[0]["median_epoch_seconds"]
    for result in results:
        print(
            f"{result['variant']:<20} {result['rows']:>5} {result['epochs']:>6} {result['first_epoch_seconds']:>11.2f} "
            f"{result['median_epoch_seconds']:>14.2f} {result['seconds']:>8.1f} {result['val_accuracy']:>7.4f} "
            f"{result['peak_rss_gib']:>12.2f} {result['median_epoch_seconds'] / reference:>13.2f}x "
            f"{_number(result.get('median_epoch_cpu_seconds')):>18}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
