"""What the Keras-trained heads (dense, scratch, finetune) share: seeding, class weights, epoch logs.

One place, so that the three heads seed, weight classes and report their epochs the same way:
same seed and params give the same weights and metrics, and ``dvc plots`` gets the same curves
(train/val loss and accuracy per epoch) whichever of them ran.

TensorFlow is imported inside the functions, never at module import.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from transferlab.features import files
from transferlab.heads import base

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seeds Keras and makes TensorFlow's ops deterministic: same seed, same metrics."""
    import keras
    import tensorflow as tf

    # Keras draws initial weights, dropout masks and shuffles from these seeds; deterministic ops
    # make the floating-point reductions run in the same order every time.
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def steps_per_execution(rows: int, batch_size: int) -> int:
    """One epoch's gradient steps, for ``compile(steps_per_execution=...)``: the epoch runs as one TensorFlow call.

    By default Keras returns to Python after every step. For a small model that per-step overhead
    is most of the epoch: the dense head on flower_photos (81 steps of 32 x 1280 features per
    epoch) went from 0.68 to 0.44 s per epoch, and its whole training from 14.5 to 10.2 s, with
    bitwise the same weights (the same ops in the same order; README, "The head loop"). The heads'
    callbacks act per epoch, so nothing else changes. ``jit_compile`` (XLA) is no option here:
    Keras turns it off while TensorFlow's op determinism is on (:func:`seed_everything`).
    """
    return max(1, math.ceil(rows / batch_size))


def keras_class_weight(class_weight: str, train: files.Features) -> dict[int, float] | None:
    """``train_head.class_weight`` as Keras' class_weight mapping (None for ``none``)."""
    if class_weight not in ("none", "balanced"):
        raise ValueError(f"Unsupported class_weight '{class_weight}'; choose one of: none, balanced")
    if class_weight == "none":
        return None
    from sklearn.utils import class_weight as sklearn_class_weight

    classes = np.arange(len(train.class_names))
    weights = sklearn_class_weight.compute_class_weight("balanced", classes=classes, y=train.labels)
    return {int(index): float(weight) for index, weight in zip(classes, weights)}


def epoch_logger(epochs: int, log_step: base.StepLogger | None) -> Any:
    """A Keras callback: one progress line per epoch, and the curves to ``log_step``."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            values = {
                "train/loss": float(logs["loss"]),
                "train/accuracy": float(logs["accuracy"]),
                "val/loss": float(logs["val_loss"]),
                "val/accuracy": float(logs["val_accuracy"]),
            }
            logger.info(
                "epoch %d/%d: loss %.4f accuracy %.4f | val_loss %.4f val_accuracy %.4f (%.1f s)",
                epoch + 1,
                epochs,
                values["train/loss"],
                values["train/accuracy"],
                values["val/loss"],
                values["val/accuracy"],
                time.perf_counter() - self.started,
            )
            if log_step is not None:
                log_step(values)

    return EpochLogger()
