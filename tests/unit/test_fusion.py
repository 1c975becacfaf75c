"""The fusion head: member heads on column slices, the combiner as documented, weights from validation only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_heads import LOGISTIC_OPTIONS, make_split

from transferlab import heads
from transferlab.core import params
from transferlab.features import files
from transferlab.heads import base, fusion, train_head


def fusion_options(**overrides):
    options = params.TrainHeadParams(head="fusion", fusion={"finetune": []}).head_options()
    options["logistic_options"] = {**options["logistic_options"], **LOGISTIC_OPTIONS}
    return {**options, **overrides}


def two_block_splits(seed=0, *, classes=3, per_class=(40, 20, 20), widths=(5, 7)):
    rng = np.random.default_rng(seed)
    centers = 1.0 * rng.normal(size=(classes, sum(widths)))
    return [
        make_split(rng, centers, [n] * classes, widths=widths, name=name)
        for n, name in zip(per_class, ("train", "val", "test"))
    ]


def test_combine_is_the_renormalized_weighted_geometric_mean():
    first = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    second = np.array([[0.2, 0.6, 0.2], [0.3, 0.3, 0.4]])
    fused = fusion.combine([first, second], [0.5, 0.5])
    expected = np.sqrt(first * second)
    np.testing.assert_allclose(fused, expected / expected.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(fusion.combine([first, second], [1.0, 0.0]), first)
    # Row 0: first says class 0 (0.7), second class 1 (0.6); 0.3 / 0.7 on the weights lets the second win.
    assert fusion.combine([first, second], [0.3, 0.7])[0].argmax() == 1
    # A member certain of a wrong class (p = 0) lowers the others' answer, never vetoes it (floor 1e-12).
    certain = np.array([[0.0, 1.0, 0.0]])
    assert np.isfinite(fusion.combine([np.array([[0.9, 0.05, 0.05]]), certain], [0.9, 0.1])).all()


def test_weight_grid_covers_the_simplex_once():
    grid = fusion.weight_grid(3, 0.1)
    assert grid.shape == (66, 3) and np.allclose(grid.sum(axis=1), 1.0) and (grid >= 0).all()
    assert len({tuple(np.round(row, 6)) for row in grid}) == 66
    assert fusion.weight_grid(1, 0.1).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="raise train_head.fusion.weight_step"):
        fusion.weight_grid(12, 0.01)


def test_weights_follow_the_better_member_on_validation_and_ties_stay_equal():
    labels = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[labels] * 0.8 + 0.2 / 3
    wrong = np.eye(3)[(labels + 1) % 3] * 0.8 + 0.2 / 3
    weights, report = fusion.choose_weights([right, wrong], labels, step=0.1)
    assert weights.tolist() == [1.0, 0.0] and report["val_log_loss"] < report["equal_weights_val_log_loss"]
    same, _ = fusion.choose_weights([right, right], labels, step=0.1)
    assert same.tolist() == [0.5, 0.5]  # every grid point ties: the most equal weights win
    equal, report = fusion.choose_weights([right, wrong], labels[:0], step=0.1)
    assert equal.tolist() == [0.5, 0.5] and report["grid_points"] == 0


def test_test_never_chooses_the_weights():
    """Block 0 separates the classes on validation, block 1 only on test: the weights follow validation."""
    train, val, test = two_block_splits(3)

    def scramble(split, block, rng):
        # The block's columns are shuffled between rows: it says nothing about the label there.
        columns = slice(split.blocks[block].offset, split.blocks[block].offset + split.blocks[block].width)
        features = split.features.copy()
        features[:, columns] = features[rng.permutation(len(split)), columns]
        return dataclasses.replace(split, features=features)

    rng = np.random.default_rng(0)
    val, test = scramble(val, 1, rng), scramble(test, 0, rng)  # both blocks learn from train
    outcome = fusion.train(train=train, val=val, seed=0, class_weight="none", **fusion_options(frozen="separate"))
    head = outcome.head
    assert [member.key for member in head.members] == ["backbone_0", "backbone_1"]
    assert head.weights[0] > head.weights[1], outcome.report
    members = head.member_probabilities(test)
    second_on_test = np.mean(members["backbone_1"].argmax(axis=1) == test.labels)
    fused_on_test = np.mean(head.predict_split(test).argmax(axis=1) == test.labels)
    assert fused_on_test < second_on_test - 0.2  # the test-only signal of block 1 was not chased


@pytest.mark.parametrize(
    ("frozen", "keys"),
    [("separate", ["backbone_0", "backbone_1"]), ("joint", ["frozen"]), ("auto", ["frozen"])],  # auto: none tuned
)
def test_frozen_fusion_trains_saves_and_loads(tmp_path, frozen, keys):
    train, val, test = two_block_splits(1)
    outcome = train_head.train_head(
        head="fusion", train=train, val=val, seed=0, class_weight="none", options=fusion_options(frozen=frozen)
    )
    head = outcome.head
    assert [member.key for member in head.members] == keys
    assert set(outcome.metrics["weights"]) == set(keys) and outcome.metrics["val"]["accuracy"] > 0.6
    assert head.description.settings["frozen"] == {"auto": "joint"}.get(frozen, frozen)  # the grouping used
    np.testing.assert_allclose(head.predict_proba(test.features), head.predict_split(test))
    train_head.save_head(head, tmp_path / "head")
    loaded = heads.load_head(tmp_path / "head")
    assert loaded.description.head == "fusion" and loaded.description.blocks == train.blocks
    np.testing.assert_allclose(loaded.predict_split(test), head.predict_split(test))
    np.testing.assert_allclose(loaded.weights, head.weights)
    assert sorted(path.name for path in (tmp_path / "head" / "members").iterdir()) == sorted(keys)


def test_member_split_slices_columns_and_restarts_offsets():
    train, _, _ = two_block_splits(2)
    sliced = fusion.member_split(train, (1,))
    assert sliced.features.shape[1] == 7 and sliced.blocks[0].offset == 0 and sliced.blocks[0].spec == "backbone_1"
    np.testing.assert_array_equal(sliced.features, train.features[:, 5:12])
    assert fusion.metric_key("mobilenet_v1_1.0_224_uint8_features") == "mobilenet_v1_1_0_224_uint8_features"


def test_a_member_to_fine_tune_without_taps_says_what_to_rerun():
    train, val, _ = two_block_splits(4)
    renamed = tuple(
        dataclasses.replace(block, spec=spec, name=spec)
        for block, spec in zip(train.blocks, ("mobilenet_v2", "tflite:x"))
    )
    train, val = (dataclasses.replace(split, blocks=renamed) for split in (train, val))
    with pytest.raises(ValueError, match="no tap activations for it; re-run the taps stage"):
        fusion.train(train=train, val=val, seed=0, class_weight="none", **fusion_options(finetune="auto"))


def test_fusion_features_come_from_the_stack_head_json_lists(tmp_path):
    train, val, test = two_block_splits(5)
    head = fusion.train(train=train, val=val, seed=0, class_weight="none", **fusion_options()).head
    other = dataclasses.replace(test, blocks=(test.blocks[0], files.Block("resnet50", "x", 7, 5)))
    with pytest.raises(ValueError, match="re-run train_head"):
        head.description.check_features(other)
    assert base.predict_split(head, test).shape == (len(test), 3)


def test_evaluate_reports_the_fused_model_and_each_member_alone_as_scalars():
    from transferlab.reports import evaluate

    train, val, test = two_block_splits(6)
    head = fusion.train(train=train, val=val, seed=0, class_weight="none", **fusion_options(frozen="separate")).head
    result = evaluate.evaluate(head=head, val=val, test=test, gallery_images=2)
    members = result.metrics["members"]
    assert set(members) == {"backbone_0", "backbone_1"}
    for key, figures in members.items():
        assert set(figures) == {"weight", "test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1"}
        assert all(isinstance(value, float) for value in figures.values())
        alone = head.member_probabilities(test)[key].argmax(axis=1)
        assert figures["test_accuracy"] == pytest.approx(np.mean(alone == test.labels))
    fused = head.predict_split(test).argmax(axis=1)
    assert result.metrics["test"]["accuracy"] == pytest.approx(np.mean(fused == test.labels))
    assert "member backbone_0: accuracy" in evaluate.describe(result.metrics)


def test_frozen_auto_is_separate_when_a_member_is_fine_tuned_and_joint_otherwise():
    from transferlab.backbones import fusion_plan

    assert fusion.frozen_grouping(fusion_plan.Plan(layers={"mobilenet_v2": "block_13_expand"})) == "separate"
    assert fusion.frozen_grouping(fusion_plan.Plan(frozen={"tflite:a.tflite": "a TFLite file"})) == "joint"
    assert params.TrainHeadParams().fusion.frozen == "auto"
