"""The course's head in Keras: Dense(units, relu), Dropout, Dense(classes, softmax).

The per-block standardization (statistics from the training split) is the model's first layer,
a frozen ``Normalization``, so head.keras maps raw features to probabilities on its own and the
export stage can put it straight behind the backbone. Training stops early on validation loss
and restores the weights of the best epoch. Same seed and params give the same weights and
metrics: Keras' seeds are set from ``seed`` and TensorFlow runs with deterministic ops.

Loading and predicting need no TensorFlow: the saved head carries its weights as NumPy arrays too
(``weights.npz``: the Normalization's mean and variance and the two Dense layers' kernels and biases,
as Keras holds them), and :class:`DenseWeights` computes standardize -> relu(x W1 + b1) ->
softmax(h W2 + b2) in float64. On a 2-core machine TensorFlow's import alone costs 5-6 s, and
evaluate and export paid it only for these two matrix products (issue 15's head loop). head.keras
stays beside it for Keras users, and the ``export.keras`` classifier loads it (:attr:`DenseHead.model`).
A head folder from before weights.npz is still read: its weights are taken from head.keras, with
a warning (importing TensorFlow), so that exports made before keep working without retraining.

TensorFlow is imported inside the functions, never at module import.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.features import files
from transferlab.heads import base, keras_common

NAME = "dense"
MODEL_FILE = "head.keras"
WEIGHTS_FILE = "weights.npz"
# Layer names in build_model: the weights are read from (and checked against) these.
STANDARDIZE_LAYER, HIDDEN_LAYER, OUTPUT_LAYER = "block_standardize", "hidden", "probabilities"
NORMALIZATION_EPSILON = 1e-7  # keras.layers.Normalization divides by max(sqrt(variance), this)
PREDICT_BATCH_SIZE = 1024  # rows per NumPy chunk: bounds the float64 activations
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseWeights:
    """The trained network as NumPy arrays (float32, as Keras holds them): what prediction needs.

    Shapes: ``mean`` and ``variance`` (D,) of the frozen Normalization layer, ``hidden_kernel``
    (D, U), ``hidden_bias`` (U,), ``output_kernel`` (U, C), ``output_bias`` (C,).
    """

    mean: np.ndarray
    variance: np.ndarray
    hidden_kernel: np.ndarray
    hidden_bias: np.ndarray
    output_kernel: np.ndarray
    output_bias: np.ndarray

    @classmethod
    def from_model(cls, model: Any) -> DenseWeights:
        """The arrays of a model made by :func:`build_model` (trained or loaded from head.keras)."""
        import keras

        normalization = model.get_layer(STANDARDIZE_LAYER)
        hidden_kernel, hidden_bias = model.get_layer(HIDDEN_LAYER).get_weights()
        output_kernel, output_bias = model.get_layer(OUTPUT_LAYER).get_weights()
        return cls(
            mean=keras.ops.convert_to_numpy(normalization.mean).astype(np.float32).reshape(-1),
            variance=keras.ops.convert_to_numpy(normalization.variance).astype(np.float32).reshape(-1),
            hidden_kernel=hidden_kernel.astype(np.float32),
            hidden_bias=hidden_bias.astype(np.float32),
            output_kernel=output_kernel.astype(np.float32),
            output_bias=output_bias.astype(np.float32),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(feature width D, classes C)."""
        return int(self.hidden_kernel.shape[0]), int(self.output_kernel.shape[1])

    def check(self, source: str) -> None:
        """Raises ``ValueError`` unless the arrays chain: (D,) (D,) (D, U) (U,) (U, C) (C,)."""
        width, units = self.hidden_kernel.shape if self.hidden_kernel.ndim == 2 else (-1, -1)
        classes = self.output_kernel.shape[1] if self.output_kernel.ndim == 2 else -1
        expected = ((width,), (width,), (width, units), (units,), (units, classes), (classes,))
        actual = tuple(np.shape(getattr(self, name)) for name in self.__dataclass_fields__)
        if min(width, units, classes) < 1 or actual != expected:
            raise ValueError(
                f"{source}: the dense head's arrays have shapes {actual}, which do not chain; re-run train_head"
            )

    def save(self, path: Path) -> None:
        base.save_arrays(path, **{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> DenseWeights:
        with np.load(path, allow_pickle=False) as arrays:
            missing = sorted(set(cls.__dataclass_fields__) - set(arrays.files))
            if missing:
                raise ValueError(f"{path} lacks {', '.join(missing)}; re-run train_head")
            weights = cls(**{name: arrays[name] for name in cls.__dataclass_fields__})
        weights.check(str(path))
        return weights

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C), float64, of raw features (N, D): what the Keras model computes."""
        scale = np.maximum(np.sqrt(self.variance.astype(np.float64)), NORMALIZATION_EPSILON)
        scaled = (np.asarray(features, dtype=np.float64) - self.mean) / scale
        hidden = np.maximum(scaled @ self.hidden_kernel.astype(np.float64) + self.hidden_bias, 0.0)
        return base.softmax(hidden @ self.output_kernel.astype(np.float64) + self.output_bias)


@dataclass(frozen=True)
class DenseHead:
    """A trained dense head: NumPy weights from raw features to class probabilities, and its Keras model.

    ``trained_model`` is the Keras model in the process that trained the head (or the one read
    from head.keras for a folder without weights.npz); a loaded head has None there and
    ``folder``, where :attr:`model` finds head.keras when it is asked for (``export.keras``).
    """

    description: base.HeadDescription
    standardizer: base.BlockStandardizer
    weights: DenseWeights
    trained_model: Any = None  # keras.Model
    folder: Path | None = None

    @classmethod
    def from_model(
        cls, *, description: base.HeadDescription, standardizer: base.BlockStandardizer, model: Any
    ) -> DenseHead:
        """The head of a Keras model made by :func:`build_model`."""
        return cls(
            description=description,
            standardizer=standardizer,
            weights=DenseWeights.from_model(model),
            trained_model=model,
        )

    @functools.cached_property
    def model(self) -> Any:
        """The Keras model (imports TensorFlow): the trained one, or head.keras of the folder loaded from."""
        if self.trained_model is not None:
            return self.trained_model
        if self.folder is None:
            raise ValueError("this dense head has no Keras model and no folder to load head.keras from")
        return load_keras_model(self.folder, self.description)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C), float64, for raw features (N, D); NumPy only, no TensorFlow."""
        data = np.asarray(features, dtype=np.float32)
        width = self.description.feature_dim
        if data.ndim != 2 or data.shape[1] != width:
            raise ValueError(f"expected features of shape (N, {width}), got {data.shape}")
        if data.shape[0] == 0:
            return np.zeros((0, len(self.description.class_names)))
        return np.concatenate(
            [
                self.weights.probabilities(data[start : start + PREDICT_BATCH_SIZE])
                for start in range(0, len(data), PREDICT_BATCH_SIZE)
            ]
        )

    def save(self, folder: Path) -> None:
        """Writes head.keras, weights.npz, standardizer.npz (the same statistics, for reference) and head.json."""
        self.model.save(folder / MODEL_FILE)
        self.weights.save(folder / WEIGHTS_FILE)
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
        steps_per_execution=keras_common.steps_per_execution(len(train), batch_size),
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
        NAME,
        train,
        settings,
        {"model": MODEL_FILE, "weights": WEIGHTS_FILE, "standardizer": base.STANDARDIZER_FILE},
    )
    epochs_run = len(history.history["loss"])
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    logger.info("best epoch %d of %d run (weights restored from it)", best_epoch, epochs_run)
    head = DenseHead.from_model(description=description, standardizer=standardizer, model=model)
    return base.TrainOutcome(head=head, report={"best_epoch": best_epoch, "epochs_run": epochs_run})


def build_model(*, standardizer: base.BlockStandardizer, classes: int, units: int, dropout: float, seed: int) -> Any:
    """Raw features -> frozen per-block standardization -> Dense(relu) -> Dropout -> Dense(softmax)."""
    import keras

    width = int(standardizer.mean_.shape[0])
    inputs = keras.Input(shape=(width,), name="features")
    scaled = keras.layers.Normalization(
        mean=standardizer.mean_.astype(np.float32),
        variance=np.square(standardizer.scale_).astype(np.float32),
        name=STANDARDIZE_LAYER,
    )(inputs)
    hidden = keras.layers.Dense(units, activation="relu", name=HIDDEN_LAYER)(scaled)
    hidden = keras.layers.Dropout(dropout, seed=seed, name="dropout")(hidden)
    outputs = keras.layers.Dense(classes, activation="softmax", name=OUTPUT_LAYER)(hidden)
    return keras.Model(inputs, outputs, name="dense_head")


def load(folder: Path, description: base.HeadDescription) -> DenseHead:
    """Loads a head written by :meth:`DenseHead.save`, without TensorFlow (weights.npz).

    A folder saved before weights.npz existed is read from head.keras instead (TensorFlow is
    imported, with a warning): exports made then still run, and re-running train_head writes it.
    """
    folder = Path(folder)
    standardizer = base.BlockStandardizer.load(base.required_file(folder, base.STANDARDIZER_FILE))
    if (folder / WEIGHTS_FILE).is_file():
        weights, model = DenseWeights.load(folder / WEIGHTS_FILE), None
    else:
        logger.warning(
            "%s has no %s: reading %s with TensorFlow; re-run train_head to load it without",
            folder,
            WEIGHTS_FILE,
            MODEL_FILE,
        )
        model = load_keras_model(folder, description)
        weights = DenseWeights.from_model(model)
    expected = (description.feature_dim, len(description.class_names))
    if weights.shape != expected:
        raise ValueError(
            f"{folder}: the dense head maps {weights.shape[0]} features to {weights.shape[1]} classes, head.json says "
            f"{expected[0]} -> {expected[1]}; re-run train_head"
        )
    return DenseHead(
        description=description, standardizer=standardizer, weights=weights, trained_model=model, folder=folder
    )


def load_keras_model(folder: Path, description: base.HeadDescription) -> Any:
    """head.keras of a saved dense head, checked against head.json (imports TensorFlow)."""
    import keras

    model_path = base.required_file(folder, MODEL_FILE)
    model = keras.models.load_model(model_path, compile=False)
    expected = (None, description.feature_dim), (None, len(description.class_names))
    if (tuple(model.input_shape), tuple(model.output_shape)) != expected:
        raise ValueError(
            f"{model_path}: model maps {model.input_shape} -> {model.output_shape}, head.json says "
            f"{expected[0]} -> {expected[1]}; re-run train_head"
        )
    return model
