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


def test_a_bad_schedule_is_refused(splits):
    with pytest.raises(ValueError, match="schedule 'step'; choose one of: constant, cosine"):
        train(splits, 5, schedule="step")


def test_the_cosine_schedule_decays_to_zero_over_every_epoch_and_keeps_the_last(splits):
    from transferlab.heads import finetune

    assert finetune.learning_rate_schedule("constant", 0.1, steps=10) == 0.1
    rate = finetune.learning_rate_schedule("cosine", 0.1, steps=10)
    assert [round(float(rate(step)), 6) for step in (0, 5, 10, 12)] == [0.1, 0.05, 0.0, 0.0]
    constant, cosine = train(splits, 5), train(splits, 5, schedule="cosine", patience=0)
    assert cosine.head.description.settings["schedule"] == "cosine"
    # The decay runs to its end whatever validation says, and the last epoch is kept.
    assert cosine.report["epochs_run"] == cosine.report["kept_epoch"] == 3
    assert any(
        not np.array_equal(a, b) for a, b in zip(constant.head.model.get_weights(), cosine.head.model.get_weights())
    )
