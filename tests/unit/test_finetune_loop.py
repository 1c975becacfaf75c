"""The finetune head's training loop: the same seed gives the same model (train_head.seeds relies on it)."""

from __future__ import annotations

import numpy as np
import pytest
from test_finetune import CUT, split_with_taps, tiny_backbone

pytestmark = pytest.mark.slow  # trains three tiny Keras models (about 10 s)

keras = pytest.importorskip("keras")


def train(splits, seed: int):
    from transferlab.heads import finetune

    return finetune.train(
        train=splits["train"],
        val=splits["val"],
        seed=seed,
        class_weight="none",
        from_layer=CUT,
        epochs=3,
        learning_rate=0.03,
        batch_size=8,
        dropout=0.1,
        flip=True,
        patience=3,
    )


def test_the_same_seed_gives_bitwise_the_same_model_and_another_seed_another(tmp_path):
    """Seeded Keras plus deterministic ops: reruns of a seed are bitwise equal, so a seed's model is reproducible."""
    backbone = tiny_backbone()
    backbone_file = tmp_path / "backbone.keras"
    backbone.save(backbone_file)
    splits = {
        "train": split_with_taps(backbone, backbone_file, per_class=12, seed=1),
        "val": split_with_taps(backbone, backbone_file, per_class=4, seed=2),
    }
    first, again, other = train(splits, 5), train(splits, 5), train(splits, 6)
    weights = [outcome.head.model.get_weights() for outcome in (first, again, other)]
    assert all(np.array_equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(weights[0], weights[2]))
