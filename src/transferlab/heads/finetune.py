"""Fine-tuning the top of a Keras backbone on cached tap activations.

The head is the backbone's own layers from ``from_layer`` to the pooled embedding (a copy,
with the backbone's weights: see :func:`transferlab.backbones.taps.top_model`) followed by Dropout and a
new Dense softmax layer. It trains on *tap activations*, the input of ``from_layer``, that
the extract_taps stage computed once per image with the frozen bottom and wrote to
``data/taps/<member>/<split>.npy`` (float16). Fine-tuning from pixels would run the whole frozen
bottom again in every epoch; here an epoch costs only the top. In a stack it fine-tunes one
Keras member alone (the one extract_taps tapped; the other members are not used: the ``fusion``
head combines them).

- Batch normalization stays in inference mode: its layers are frozen (``trainable = False``,
  which in Keras 3 also uses the saved statistics while training). The shared MobileNetV2 has
  its batch norm folded into the convolutions (identity plus bias): batch statistics would
  replace that identity with a noisy per-batch rescaling.
- Training data is streamed from the memory-mapped ``.npy`` files by a ``keras.utils.PyDataset``
  (the whole set never sits in memory), shuffled per epoch and, with ``flip``, each cached map
  mirrored left-right with probability 1/2 (the map of a mirrored photo, to a good approximation).
- ``schedule: cosine`` (the default): the learning rate decays from ``learning_rate`` to 0 over
  the epochs along half a cosine; every epoch runs and the last one is kept (stopping midway
  would cut the decay short, and validation picks nothing). ``schedule: constant``: the rate stays
  at ``learning_rate``, and early stopping on validation loss (``patience``) restores the best
  epoch. Why cosine: at a constant 3e-4 the validation loss of MobileNetV2 on flower_photos
  jumps from epoch to epoch (0.15 to 0.33 and back), so the epoch early stopping keeps is partly
  chance; with the decay the last epochs settle, and the fused model is better on held-out halves
  of validation (README "Best accuracy").
- Keras' seeds come from ``seed`` and TensorFlow runs with deterministic ops, as for the dense head.

Saved head: ``head.keras`` (tap in, probabilities out), ``backbone.keras`` (the frozen backbone
the taps came from) and head.json. :func:`full_model` joins them into one model from raw pixels
to probabilities, for export.

This module imports Keras when it is imported; the head registry imports it only for this head.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferlab.backbones import taps
from transferlab.features import engines, files
from transferlab.heads import base, keras_common

NAME = "finetune"
MODEL_FILE = "head.keras"
BACKBONE_FILE = "backbone.keras"
PREDICT_BATCH_SIZE = 128
SCHEDULES = ("constant", "cosine")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneHead:
    """A trained finetune head: the backbone's top plus a softmax, from tap activations to probabilities."""

    description: base.HeadDescription
    model: Any  # keras.Model: tap (H, W, C) -> probabilities (C,)
    backbone_file: Path  # the frozen backbone the taps come from (pixels -> embedding)
    _engine: list = field(default_factory=list, repr=False, compare=False)

    @property
    def layer(self) -> str:
        return str(self.description.settings["from_layer"])

    @property
    def tap_shape(self) -> tuple[int, ...]:
        return tuple(int(dim) for dim in self.description.settings["tap_shape"])

    def predict_proba(self, activations: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C), float64, for tap activations (N, H, W, C), e.g. a memory map."""
        if activations.ndim != 4 or tuple(activations.shape[1:]) != self.tap_shape:
            raise ValueError(
                f"the finetune head classifies tap activations of shape (N, {', '.join(map(str, self.tap_shape))}) "
                f"(the input of {self.layer}), got {activations.shape}; pass a split with base.predict_split"
            )
        if not self._engine:  # one traced function: model.predict costs 0.4 s per call
            self._engine.append(engines.KerasEngine(self.model))
        parts = [
            self._engine[0].run(np.asarray(activations[start : start + PREDICT_BATCH_SIZE], dtype=np.float32))
            for start in range(0, len(activations), PREDICT_BATCH_SIZE)
        ]
        if not parts:
            return np.zeros((0, len(self.description.class_names)))
        probabilities = np.concatenate(parts).astype(np.float64)
        return probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7

    def predict_split(self, split: files.Features) -> np.ndarray:
        """Class probabilities (N, C) for the rows of ``split``, from their tap activations."""
        tapped = check_taps(split, layer=self.layer, block=str(self.description.settings["block"]))
        return self.predict_proba(tapped.activations)

    def save(self, folder: Path) -> None:
        """Writes head.keras, backbone.keras and head.json."""
        self.model.save(folder / MODEL_FILE)
        shutil.copyfile(self.backbone_file, folder / BACKBONE_FILE)
        self.description.write(folder)


def check_taps(split: files.Features, *, layer: str | None = None, block: str | None = None) -> files.Taps:
    """The split's tap activations of member ``block`` (None: the first tapped member, in stack order).

    Raises:
        ValueError: saying what to re-run, when there are none, none of ``block``, or cut at another layer.
    """
    if not split.taps:
        raise ValueError(
            f"{split.source}: the finetune head trains on tap activations, but none were loaded with it; the "
            "extract_taps stage writes them (data/taps) when train_head.head is finetune or fusion: re-run it "
            "(dvc repro, or dvc exp run -S train_head.head=finetune) and pass --taps data/taps"
        )
    if block is None:  # for the finetune head extract_taps taps one member
        block = next((item.name for item in split.blocks if item.name in split.taps), next(iter(split.taps)))
    if block not in split.taps:
        raise ValueError(
            f"{split.source}: there are tap activations of {', '.join(split.taps)}, not of {block}; re-run "
            "extract_taps (dvc repro) so that they follow train_head's params"
        )
    tapped = split.taps[block]
    if layer is not None and tapped.layer != layer:
        raise ValueError(
            f"{split.source}: the tap activations feed {block} layer '{tapped.layer}', but the head "
            f"starts at {block} layer '{layer}'; re-run extract_taps (dvc repro) so that they match"
        )
    return tapped


def train(
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    from_layer: str,
    epochs: int,
    learning_rate: float,
    schedule: str,
    batch_size: int,
    dropout: float,
    flip: bool,
    patience: int,
    log_step: base.StepLogger | None = None,
) -> base.TrainOutcome:
    """Fine-tunes the backbone's top plus a new softmax on cached tap activations.

    Args:
        train: training rows with their taps (augmented views included).
        val: validation rows with their taps (must not be empty: early stopping watches them).
        seed: seeds the new layer's weights, dropout, shuffling and flips.
        class_weight: ``none``, or ``balanced`` to weight classes inversely to their frequency.
        from_layer: the first layer trained, or ``auto``; must be the layer the taps feed.
        epochs: most epochs.
        learning_rate: Adam's learning rate (the first step's, with ``schedule: cosine``).
        schedule: ``cosine`` (the rate decays to 0 over ``epochs`` epochs, half a cosine; every
            epoch runs, the last is kept) or ``constant`` (early stopping keeps the best epoch).
        batch_size: maps per gradient step.
        dropout: dropout rate before the softmax layer.
        flip: mirror each training map left-right with probability 1/2.
        patience: with ``schedule: constant``, epochs without a better validation loss before stopping.
        log_step: called after every epoch with train/val loss and accuracy.

    Returns:
        The head with the last (cosine) or best (constant) epoch's weights, and a report (the kept
        and run epochs, seconds per epoch, the layer, trainable parameters).
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Unsupported train_head.finetune.schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}"
        )
    tapped, layer = _checked_inputs(train, val, from_layer)
    keras_common.seed_everything(seed)
    backbone = keras.models.load_model(tapped.backbone_file, compile=False)
    model = build_model(backbone=backbone, layer=layer, classes=len(train.class_names), dropout=dropout, seed=seed)
    batches = TapBatches(tapped.activations, train.labels, batch_size=batch_size, seed=seed, shuffle=True, flip=flip)
    rate = learning_rate_schedule(schedule, learning_rate, steps=len(batches) * epochs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = _EpochTimer()
    history = model.fit(
        batches,
        validation_data=TapBatches(
            check_taps(val, block=tapped.block).activations, val.labels, batch_size=PREDICT_BATCH_SIZE, seed=seed
        ),
        epochs=epochs,
        verbose=0,
        class_weight=keras_common.keras_class_weight(class_weight, train),
        callbacks=[*_stopping(schedule, patience), keras_common.epoch_logger(epochs, log_step), timer],
    )
    settings = {
        "from_layer": layer,
        "block": tapped.block,
        "tap_shape": list(tapped.activations.shape[1:]),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "schedule": schedule,
        "batch_size": batch_size,
        "dropout": dropout,
        "flip": flip,
        "patience": patience,
        "class_weight": class_weight,
        "seed": seed,
    }
    description = base.description_for(NAME, train, settings, {"model": MODEL_FILE, "backbone": BACKBONE_FILE})
    head = FinetuneHead(description=description, model=model, backbone_file=Path(tapped.backbone_file))
    report = _report(history.history, timer.seconds, model, layer, last=schedule == "cosine")
    return base.TrainOutcome(head=head, report=report)


def _stopping(schedule: str, patience: int) -> list[Any]:
    """Early stopping to the best epoch at a constant rate; none for the cosine decay (its last epoch is kept)."""
    if schedule == "cosine":
        return []
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)]


def learning_rate_schedule(schedule: str, learning_rate: float, *, steps: int) -> Any:
    """Adam's learning rate: ``learning_rate`` throughout, or (``cosine``) decaying to 0 over ``steps`` steps."""
    if schedule == "constant":
        return learning_rate
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))


def _checked_inputs(train: files.Features, val: files.Features, from_layer: str) -> tuple[files.Taps, str]:
    """The training taps and the resolved layer; ``ValueError`` when the splits cannot be fine-tuned.

    The member fine-tuned is the first block of ``train`` with taps: the one extract_taps tapped
    for this head (a stack's other members are not used), or the one block of a member's slice.
    """
    base.check_trainable(train, val)
    if len(val) == 0:
        raise ValueError(
            "the finetune head stops early on validation loss, but the validation split is empty; "
            "set split.val_fraction > 0"
        )
    tapped = check_taps(train)
    layer = taps.resolve_from_layer(tapped.block, from_layer)
    check_taps(train, layer=layer, block=tapped.block)
    check_taps(val, layer=layer, block=tapped.block)
    return tapped, layer


def _report(history: dict, epoch_seconds: list[float], model: Any, layer: str, *, last: bool) -> dict[str, Any]:
    run = len(history["loss"])
    kept = run if last else int(np.argmin(history["val_loss"])) + 1
    why = "the last: cosine decay" if last else "the best on validation"
    logger.info("kept epoch %d of %d run (%s)", kept, run, why)
    return {
        "kept_epoch": kept,
        "epochs_run": run,
        "from_layer": layer,
        "epoch_seconds": [round(seconds, 2) for seconds in epoch_seconds],
        "trainable_parameters": int(sum(np.prod(weight.shape) for weight in model.trainable_weights)),
        "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # the process's, so far
    }


def build_model(*, backbone: Any, layer: str, classes: int, dropout: float, seed: int) -> Any:
    """Tap -> the backbone's top (a copy, batch norm frozen) -> Dropout -> Dense(classes, softmax)."""
    top = taps.top_model(backbone, layer)
    hidden = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(top.output)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head_probabilities")(hidden)
    return keras.Model(top.input, outputs, name="finetune_head")


class TapBatches(keras.utils.PyDataset):
    """Batches of tap activations (float32) and labels, read from an (N, H, W, C) array or memory map.

    Only one batch is read at a time. With ``shuffle`` the order changes every epoch; with
    ``flip`` each map is mirrored left-right with probability 1/2. Both are drawn from
    ``(seed, epoch, batch)``, so a run is the same however Keras schedules the batches.
    """

    def __init__(
        self,
        activations: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = False,
        flip: bool = False,
    ):
        super().__init__()
        self.activations, self.labels = activations, np.asarray(labels, dtype=np.int32)
        self.batch_size, self.seed, self.shuffle, self.flip = int(batch_size), int(seed), shuffle, flip
        self.epoch = 0
        self.order = self._arrange()

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])  # file order reads faster
        maps = np.asarray(self.activations[rows], dtype=np.float32)
        if self.flip:
            mirrored = np.random.default_rng([self.seed, self.epoch, index]).random(len(rows)) < 0.5
            maps[mirrored] = maps[mirrored, :, ::-1, :]
        return maps, self.labels[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._arrange()

    def _arrange(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.labels))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def load(folder: Path, description: base.HeadDescription) -> FinetuneHead:
    """Loads a head written by :meth:`FinetuneHead.save`."""
    model_path = base.required_file(folder, MODEL_FILE)
    backbone_file = base.required_file(folder, BACKBONE_FILE)
    model = keras.models.load_model(model_path, compile=False)
    expected = ((None, *description.settings["tap_shape"]), (None, len(description.class_names)))
    if (tuple(model.input_shape), tuple(model.output_shape)) != expected:
        raise ValueError(
            f"{model_path}: model maps {model.input_shape} -> {model.output_shape}, head.json says "
            f"{expected[0]} -> {expected[1]}; re-run train_head"
        )
    return FinetuneHead(description=description, model=model, backbone_file=backbone_file)


def full_model(head_folder: str | Path) -> Any:
    """One Keras model from raw pixels to class probabilities: frozen bottom, trained top, softmax.

    Takes float32 RGB images (N, S, S, 3) with raw 0..255 values (preprocessing is inside, as for
    every backbone) at the backbone's input size.

    Args:
        head_folder: a folder saved by the train_head stage with the finetune head (models/head).
    """
    folder = Path(head_folder)
    description = base.read_description(folder)
    if description.head != NAME:
        raise ValueError(f"{folder} holds a {description.head} head, not a {NAME} head")
    head = load(folder, description)
    backbone = keras.models.load_model(head.backbone_file, compile=False)
    bottom = taps.bottom_model(backbone, head.layer)
    bottom.trainable = False
    pixels = keras.Input(shape=tuple(bottom.input_shape[1:]), dtype="float32", name="pixels")
    return keras.Model(pixels, head.model(bottom(pixels)), name=f"{backbone.name}_finetuned")
