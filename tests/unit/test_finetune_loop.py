"""The finetune head's training loop: the same seed gives the same model (train_head.seeds relies on it)."""

from __future__ import annotations

import numpy as np
import pytest
from test_finetune import CUT, split_with_taps, tiny_backbone

pytestmark = pytest.mark.slow  # trains three tiny Keras models (about 10 s)

keras = pytest.importorskip("keras")


def train(splits, seed: int, **options):
    from transferlab.heads import finetune

    settings = dict(
        train=splits["train"],
        val=splits["val"],
        seed=seed,
        class_weight="none",
        from_layer=CUT,
        epochs=3,
        learning_rate=0.03,
        schedule="constant",
        batch_size=8,
        dropout=0.1,
        flip=True,
        patience=3,
        keep="best",
        average_from=1,
    )
    return finetune.train(**{**settings, **options})


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    backbone = tiny_backbone()
    backbone_file = tmp_path_factory.mktemp("loop") / "backbone.keras"
    backbone.save(backbone_file)
    return {
        "train": split_with_taps(backbone, backbone_file, per_class=12, seed=1),
        "val": split_with_taps(backbone, backbone_file, per_class=4, seed=2),
    }


def test_the_same_seed_gives_bitwise_the_same_model_and_another_seed_another(splits):
    """Seeded Keras plus deterministic ops: reruns of a seed are bitwise equal, so a seed's model is reproducible."""
    first, again, other = train(splits, 5), train(splits, 5), train(splits, 6)
    weights = [outcome.head.model.get_weights() for outcome in (first, again, other)]
    assert all(np.array_equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(weights[0], weights[2]))


def test_keep_average_is_the_mean_of_the_epochs_weights_from_average_from_on(splits):
    """keep: average runs every epoch (no early stopping) and keeps the mean of epochs 2..4's weights.

    The same seed with keep: best and no early stopping follows the same trajectory, so its
    weights after epochs 2, 3 and 4 (recorded by a callback) are the ones averaged.
    """
    recorded = []
    original_fit = keras.Model.fit

    def recording_fit(model, *args, callbacks=(), **kwargs):
        class Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                recorded.append([np.array(variable.numpy()) for variable in self.model.trainable_weights])

        return original_fit(model, *args, callbacks=[*callbacks, Record()], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", recording_fit)
        trajectory = train(splits, 5, epochs=4, patience=4)
    averaged = train(splits, 5, epochs=4, patience=0, keep="average", average_from=2)
    assert len(recorded) == 4 and averaged.report["epochs_run"] == 4  # patience 0 stops nothing
    assert averaged.report["averaged_epochs"] == [2, 4] and "best_epoch" not in averaged.report
    expected = [np.mean([epoch[i] for epoch in recorded[1:]], axis=0) for i in range(len(recorded[0]))]
    kept = [np.array(variable.numpy()) for variable in averaged.head.model.trainable_weights]
    for got, want in zip(kept, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(got, last) for got, last in zip(kept, recorded[-1]))  # not the last epoch's
    assert averaged.head.description.settings["keep"] == "average"
    # keep: best restores one epoch's weights exactly.
    best = trajectory.report["best_epoch"]
    for got, want in zip(trajectory.head.model.trainable_weights, recorded[best - 1]):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep": "last"}, "choose one of: average, best"),
        ({"keep": "average", "average_from": 4}, "only epochs 1..3"),
        ({"schedule": "step"}, "choose one of: constant, cosine"),
    ],
)
def test_bad_keep_settings_are_refused(splits, options, message):
    with pytest.raises(ValueError, match=message):
        train(splits, 5, **options)


def test_the_cosine_schedule_decays_from_the_learning_rate_to_zero_over_the_epochs(splits):
    from transferlab.heads import finetune

    assert finetune.learning_rate_schedule("constant", 0.1, steps=10) == 0.1
    rate = finetune.learning_rate_schedule("cosine", 0.1, steps=10)
    assert [round(float(rate(step)), 6) for step in (0, 5, 10, 12)] == [0.1, 0.05, 0.0, 0.0]
    constant, cosine = train(splits, 5), train(splits, 5, schedule="cosine")
    assert cosine.head.description.settings["schedule"] == "cosine"
    assert any(
        not np.array_equal(a, b) for a, b in zip(constant.head.model.get_weights(), cosine.head.model.get_weights())
    )
