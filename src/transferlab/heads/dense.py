"""The course's head in Keras: Dense(units, relu), Dropout, Dense(classes, softmax).

The per-block standardization (statistics from the training split) is the model's first layer,
a frozen ``Normalization``, so head.keras maps raw features to probabilities on its own and the
export stage can put it straight behind the backbone. Training stops early on validation loss
and restores the weights of the best epoch. Same seed and params give the same weights and
metrics: Keras' seeds are set from ``seed`` and TensorFlow runs with deterministic ops.

TensorFlow is imported inside the functions, never at module import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.features import files
from transferlab.heads import base, keras_common

NAME = "dense"
MODEL_FILE = "head.keras"
PREDICT_BATCH_SIZE = 1024
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseHead:
    """A trained dense head: a Keras model from raw features to class probabilities."""

    description: base.HeadDescription
    standardizer: base.BlockStandardizer
    model: Any  # keras.Model

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C), float64, for raw features (N, D)."""
        data = np.asarray(features, dtype=np.float32)
        width = self.description.feature_dim
        if data.ndim != 2 or data.shape[1] != width:
            raise ValueError(f"expected features of shape (N, {width}), got {data.shape}")
        if data.shape[0] == 0:
            return np.zeros((0, len(self.description.class_names)))
        # A direct call per chunk, not model.predict: predict costs 0.4-0.5 s per call on 2 cores, which made
        # the export check's single-image latency runs of a dense head take 0.76 s each (issue 15).
        chunks = [
            np.asarray(self.model(data[start : start + PREDICT_BATCH_SIZE], training=False), dtype=np.float64)
            for start in range(0, len(data), PREDICT_BATCH_SIZE)
        ]
        probabilities = np.concatenate(chunks)
        return probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7

    def save(self, folder: Path) -> None:
        """Writes head.keras, standardizer.npz (the same statistics, for reference) and head.json."""
        self.model.save(folder / MODEL_FILE)
        self.standardizer.save(folder / base.STANDARDIZER_FILE)
        self.description.write(folder)


def train(
    *,
    train: files.Features,
    val: files.Features,
    seed: int,
    class_weight: str,
    units: int,
    dropout: float,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    patience: int,
    log_step: base.StepLogger | None = None,
) -> base.TrainOutcome:
    """Trains the dense head on ``train`` with early stopping on ``val`` loss.

    Args:
        train: training features (augmented views included).
        val: validation features (must not be empty: early stopping watches them).
        seed: seeds weights, dropout and shuffling.
        class_weight: ``none``, or ``balanced`` to weight classes inversely to their frequency.
        units: width of the hidden layer.
        dropout: dropout rate after the hidden layer.
        learning_rate: Adam's learning rate.
        epochs: most epochs.
        batch_size: examples per gradient step.
        patience: epochs without a better validation loss before stopping.
        log_step: called after every epoch with train/val loss and accuracy.

    Returns:
        The head with the best epoch's weights, and a report with ``best_epoch`` (1-based) and
        ``epochs_run``.
    """
    import keras

    base.check_trainable(train, val)
    if len(val) == 0:
        raise ValueError(
            "the dense head stops early on validation loss, but the validation split is empty; "
            "set split.val_fraction > 0 or use train_head.head=logistic"
        )
    keras_common.seed_everything(seed)
    standardizer = base.BlockStandardizer(widths=train.widths).fit(train.features)
    model = build_model(
        standardizer=standardizer, classes=len(train.class_names), units=units, dropout=dropout, seed=seed
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    history = model.fit(
        train.features.astype(np.float32),
        train.labels.astype(np.int32),
        validation_data=(val.features.astype(np.float32), val.labels.astype(np.int32)),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        class_weight=keras_common.keras_class_weight(class_weight, train),
        callbacks=[stopper, keras_common.epoch_logger(epochs, log_step)],
    )
    settings = {
        "units": units,
        "dropout": dropout,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "batch_size": batch_size,
        "patience": patience,
        "class_weight": class_weight,
        "seed": seed,
    }
    description = base.description_for(
        NAME, train, settings, {"model": MODEL_FILE, "standardizer": base.STANDARDIZER_FILE}
    )
    epochs_run = len(history.history["loss"])
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    logger.info("best epoch %d of %d run (weights restored from it)", best_epoch, epochs_run)
    head = DenseHead(description=description, standardizer=standardizer, model=model)
    return base.TrainOutcome(head=head, report={"best_epoch": best_epoch, "epochs_run": epochs_run})


def build_model(*, standardizer: base.BlockStandardizer, classes: int, units: int, dropout: float, seed: int) -> Any:
    """Raw features -> frozen per-block standardization -> Dense(relu) -> Dropout -> Dense(softmax)."""
    import keras

    width = int(standardizer.mean_.shape[0])
    inputs = keras.Input(shape=(width,), name="features")
    scaled = keras.layers.Normalization(
        mean=standardizer.mean_.astype(np.float32),
        variance=np.square(standardizer.scale_).astype(np.float32),
        name="block_standardize",
    )(inputs)
    hidden = keras.layers.Dense(units, activation="relu", name="hidden")(scaled)
    hidden = keras.layers.Dropout(dropout, seed=seed, name="dropout")(hidden)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs, name="dense_head")


def load(folder: Path, description: base.HeadDescription) -> DenseHead:
    """Loads a head written by :meth:`DenseHead.save`."""
    import keras

    model_path = base.required_file(folder, MODEL_FILE)
    standardizer = base.BlockStandardizer.load(base.required_file(folder, base.STANDARDIZER_FILE))
    model = keras.models.load_model(model_path, compile=False)
    expected = (None, description.feature_dim), (None, len(description.class_names))
    if (tuple(model.input_shape), tuple(model.output_shape)) != expected:
        raise ValueError(
            f"{model_path}: model maps {model.input_shape} -> {model.output_shape}, head.json says "
            f"{expected[0]} -> {expected[1]}; re-run train_head"
        )
    return DenseHead(description=description, standardizer=standardizer, model=model)
