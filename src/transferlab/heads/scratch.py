"""The course's baseline: the TensorFlow tutorial's small CNN, trained from scratch on pixels.

It is a head like the others, so that it runs on the same split rows, through the same
train_head and evaluate stages, and lands in the same ``dvc exp show`` columns as a transfer
run. It reads each row's image (``paths``, ``recipes``, ``images_directory`` and
``max_image_pixels`` of the :class:`~transferlab.features.files.Features`) and ignores the
feature columns.

The model is the tutorial's (tensorflow.org/tutorials/images/classification)::

    uint8 image -> Rescaling(1/255) -> [RandomFlip, RandomRotation(0.1), RandomZoom(0.1)]
      -> (Conv2D(n, 3x3, relu, same) -> MaxPooling2D) for n = 16, 32, 64 -> [Dropout]
      -> Flatten -> Dense(128, relu) -> Dense(classes, softmax)

with the random layers only when ``augment`` is on (they act during training only) and the
Dropout only when ``dropout`` > 0. The tutorial rescales after its random layers; rescaling
first is the same (scaling commutes with flips and bilinear resampling) and lets the saved
model take uint8 images.

It trains on the training split's originals (recipe ``""``) only: the augmentation it is
compared with is the tutorial's, on the fly, not the augment stage's fixed views. The reported
train figures (train_head.json) still cover every training row. Images are decoded once, in a
thread pool, into uint8 memory at ``image_size`` with the resize every stage uses
(:func:`transferlab.data.augment.render_view`: Pillow bilinear, aspect ratio not kept, as the
tutorial's ``image_dataset_from_directory`` does). Training stops early on validation loss and
restores the best epoch, as the dense head does; same seed and params give the same model.

TensorFlow is imported inside the functions, never at module import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data import augment, images
from transferlab.features import files
from transferlab.heads import base, keras_common

NAME = "scratch"
MODEL_FILE = "model.keras"
PREDICT_BATCH_SIZE = 64
CONV_FILTERS = (16, 32, 64)
HIDDEN_UNITS = 128
ROTATION = 0.1  # a fraction of a full turn: +/- 36 degrees, as in the tutorial
ZOOM = 0.1
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScratchHead:
    """A trained scratch CNN: a Keras model from uint8 images to class probabilities."""

    description: base.HeadDescription
    model: Any  # keras.Model
    # Decoded views, (images folder, path, recipe) -> uint8 pixels: train_head measures the head
    # on the very rows it was trained on, and should not decode them twice.
    views: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return int(self.description.settings["image_size"])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Refuses: this head classifies images; see :meth:`predict_split` and :meth:`predict_pixels`."""
        raise ValueError(
            "the scratch head classifies images, not features: call transferlab.heads.base.predict_split(head, split) "
            "with splits loaded with their images folder (--images data/raw/images), or head.predict_pixels(pixels)"
        )

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C), float64, for uint8 images (N, image_size, image_size, 3)."""
        data = np.asarray(pixels)
        expected = (self.image_size, self.image_size, 3)
        if data.ndim != 4 or data.shape[1:] != expected or data.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images of shape (N, {', '.join(map(str, expected))}), got {data.dtype} {data.shape}"
            )
        if data.shape[0] == 0:
            return np.zeros((0, len(self.description.class_names)))
        probabilities = np.asarray(self.model.predict(data, batch_size=PREDICT_BATCH_SIZE, verbose=0), dtype=np.float64)
        return probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7

    def predict_split(self, split: files.Features) -> np.ndarray:
        """Class probabilities (N, C) for every row of ``split``, from its images and views."""
        return self.predict_pixels(self.pixels(split))

    def pixels(self, split: files.Features, threads: int | None = None) -> np.ndarray:
        """The rows' views as uint8 (N, S, S, 3), decoding only those not decoded before."""
        folder = _images_folder(split)
        keys = [(str(folder), path, recipe) for path, recipe in zip(split.paths, split.recipes)]
        missing = sorted({key for key in keys if key not in self.views})
        if missing:
            decoded = decode_views(
                images_directory=folder,
                paths=[key[1] for key in missing],
                recipes=[key[2] for key in missing],
                size=self.image_size,
                threads=threads or int(self.description.settings.get("decode_threads", 2)),
                max_image_pixels=split.max_image_pixels,
            )
            self.views.update(zip(missing, decoded))
        if not keys:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.stack([self.views[key] for key in keys])

    def save(self, folder: Path) -> None:
        """Writes model.keras and head.json into ``folder``."""
        self.model.save(folder / MODEL_FILE)
        self.description.write(folder)


def train(
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    image_size: int,
    augment: bool,
    dropout: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    decode_threads: int,
    log_step: base.StepLogger | None = None,
) -> base.TrainOutcome:
    """Trains the tutorial CNN on the images of ``train``'s originals, stopping early on ``val`` loss.

    Args:
        train: the training split's rows, with ``images_directory`` set; only its originals
            (recipe ``""``) are trained on.
        val: the validation split's rows (must not be empty: early stopping watches them).
        seed: seeds weights, the random layers, dropout and shuffling.
        class_weight: ``none``, or ``balanced`` to weight classes inversely to their frequency.
        image_size: square input side in pixels.
        augment: add the tutorial's random flip, rotation and zoom layers.
        dropout: dropout rate before the dense layers (0 = none).
        epochs: most epochs.
        batch_size: images per gradient step.
        learning_rate: Adam's learning rate.
        patience: epochs without a better validation loss before stopping.
        decode_threads: threads decoding and resizing images.
        log_step: called after every epoch with train/val loss and accuracy.

    Returns:
        The head with the best epoch's weights, and a report with ``best_epoch`` (1-based),
        ``epochs_run``, ``trained_on`` (original images) and ``parameters``.
    """
    originals = _checked_inputs(train, val, image_size=image_size)
    import keras  # after the checks: a wrong input fails before TensorFlow's 10 s start-up

    settings = {
        "image_size": image_size,
        "augment": augment,
        "dropout": dropout,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "patience": patience,
        "decode_threads": decode_threads,
        "class_weight": class_weight,
        "seed": seed,
    }
    keras_common.seed_everything(seed)
    model = build_model(
        classes=len(train.class_names), image_size=image_size, augment=augment, dropout=dropout, seed=seed
    )
    head = ScratchHead(description=base.description_for(NAME, train, settings, {"model": MODEL_FILE}), model=model)
    started = time.perf_counter()
    train_pixels, val_pixels = head.pixels(originals, decode_threads), head.pixels(val, decode_threads)
    decode_seconds = time.perf_counter() - started
    logger.info(
        "decoded %d images at %dx%d in %.1f s; training %s parameters",
        len(originals) + len(val),
        image_size,
        image_size,
        decode_seconds,
        f"{model.count_params():,}",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    history = model.fit(
        train_pixels,
        originals.labels.astype(np.int32),
        validation_data=(val_pixels, val.labels.astype(np.int32)),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        class_weight=keras_common.keras_class_weight(class_weight, originals),
        callbacks=[stopper, keras_common.epoch_logger(epochs, log_step)],
    )
    epochs_run = len(history.history["loss"])
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    logger.info("best epoch %d of %d run (weights restored from it)", best_epoch, epochs_run)
    report = {
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "trained_on": len(originals),
        "parameters": int(model.count_params()),
    }
    return base.TrainOutcome(head=head, report=report)


def _checked_inputs(train: files.Features, val: files.Features, *, image_size: int) -> files.Features:
    """The training originals; ``ValueError`` when the splits cannot train this head."""
    base.check_trainable(train, val)
    if len(val) == 0:
        raise ValueError(
            "the scratch head stops early on validation loss, but the validation split is empty; "
            "set split.val_fraction > 0"
        )
    if image_size < 2 ** len(CONV_FILTERS):
        raise ValueError(
            f"train_head.scratch.image_size must be at least {2 ** len(CONV_FILTERS)} (three 2x2 poolings), "
            f"got {image_size}"
        )
    _images_folder(train)
    originals = subset(train, np.array([recipe == augment.ORIGINAL for recipe in train.recipes], dtype=bool))
    base.check_trainable(originals, val)  # every class must keep an original image
    return originals


def subset(split: files.Features, keep: np.ndarray) -> files.Features:
    """The rows of ``split`` where the boolean mask ``keep`` is true (every per-row field)."""
    rows = np.flatnonzero(keep)
    return dataclasses.replace(
        split,
        features=split.features[rows],
        labels=split.labels[rows],
        paths=tuple(split.paths[i] for i in rows),
        sha256=tuple(split.sha256[i] for i in rows),
        recipes=tuple(split.recipes[i] for i in rows),
    )


def build_model(*, classes: int, image_size: int, augment: bool, dropout: float, seed: int) -> Any:
    """The tutorial's CNN (see the module docstring), from uint8 images to class probabilities."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    hidden = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if augment:
        hidden = layers.RandomFlip("horizontal", seed=seed, name="random_flip")(hidden)
        hidden = layers.RandomRotation(ROTATION, seed=seed + 1, name="random_rotation")(hidden)
        hidden = layers.RandomZoom(ZOOM, seed=seed + 2, name="random_zoom")(hidden)
    for filters in CONV_FILTERS:
        hidden = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{filters}")(hidden)
        hidden = layers.MaxPooling2D(name=f"pool{filters}")(hidden)
    if dropout > 0:
        hidden = layers.Dropout(dropout, seed=seed + 3, name="dropout")(hidden)
    hidden = layers.Flatten(name="flatten")(hidden)
    hidden = layers.Dense(HIDDEN_UNITS, activation="relu", name="hidden")(hidden)
    outputs = layers.Dense(classes, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs, name="scratch_cnn")


def decode_views(
    *,
    images_directory: str | os.PathLike,
    paths: Sequence[str],
    recipes: Sequence[str],
    size: int,
    threads: int,
    max_image_pixels: int,
) -> np.ndarray:
    """Decodes and renders views in a thread pool, as extract_features does.

    Args:
        images_directory: the folder ``paths`` are relative to.
        paths: image paths, one per view.
        recipes: augmentation recipes (``""`` for an original), one per view.
        size: output side in pixels.
        threads: decoding threads.
        max_image_pixels: decompression-bomb limit (params ``download.max_image_pixels``).

    Returns:
        uint8 array (N, size, size, 3).

    Raises:
        ValueError: an image is missing or cannot be decoded (naming it).
    """
    folder = Path(images_directory)
    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def render(index: int) -> None:
        path = folder / paths[index]
        try:
            image = images.open_rgb(path, max_image_pixels=max_image_pixels)
        except FileNotFoundError:
            raise ValueError(
                f"{path} not found; the features files list it: pass the dataset's image folder "
                "(--images data/raw/images) or re-run download"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(
                f"{path} is too large ({error}); raise download.max_image_pixels or re-run download"
            ) from None
        except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for damaged files
            raise ValueError(f"{path} cannot be decoded ({error}); re-run download") from None
        pixels[index] = augment.render_view(image, recipes[index], size)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        for _ in pool.map(render, range(len(paths))):
            pass
    return pixels


def _images_folder(split: files.Features) -> Path:
    if split.images_directory is None:
        raise ValueError(
            f"{split.source}: the scratch head reads images, but no image folder was given; run the stage "
            "with --images data/raw/images (as dvc.yaml does)"
        )
    if split.max_image_pixels is None:
        raise ValueError(
            f"{split.source}: the scratch head opens images, but no image size limit was given; load the "
            "splits with max_image_pixels (params download.max_image_pixels)"
        )
    folder = Path(split.images_directory)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} not found; run the download stage first (dvc repro download)")
    return folder


def load(folder: Path, description: base.HeadDescription) -> ScratchHead:
    """Loads a head written by :meth:`ScratchHead.save`."""
    import keras

    model_path = base.required_file(folder, MODEL_FILE)
    model = keras.models.load_model(model_path, compile=False)
    size = int(description.settings.get("image_size", 0))
    expected = (None, size, size, 3), (None, len(description.class_names))
    if (tuple(model.input_shape), tuple(model.output_shape)) != expected:
        raise ValueError(
            f"{model_path}: model maps {model.input_shape} -> {model.output_shape}, head.json says "
            f"{expected[0]} -> {expected[1]}; re-run train_head"
        )
    return ScratchHead(description=description, model=model)
