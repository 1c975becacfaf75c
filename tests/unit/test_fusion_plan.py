"""fusion_plan: which stack members the fusion head fine-tunes, and why the others stay frozen."""

from __future__ import annotations

import pytest

from transferlab.backbones import fusion_plan

STACK = [
    ("mobilenet_v2", "mobilenet_v2"),
    ("lite0", "tflite:../shared/weights/lite0.tflite"),
    ("mobilenet", "mobilenet"),
]


def test_auto_fine_tunes_every_keras_member_with_a_cut_point_and_says_why_the_others_are_frozen():
    plan = fusion_plan.finetune_plan(STACK, finetune="auto", from_layer="auto")
    assert plan.layers == {"mobilenet_v2": "block_13_expand", "mobilenet": "conv_dw_12"}
    assert list(plan.frozen) == ["lite0"] and "TFLite" in plan.frozen["lite0"]


def test_a_list_and_per_member_layers():
    plan = fusion_plan.finetune_plan(STACK, finetune=["mobilenet", "lite0"], from_layer={"mobilenet": "conv_dw_13"})
    assert plan.layers == {"mobilenet": "conv_dw_13"}
    assert set(plan.frozen) == {"mobilenet_v2", "lite0"}  # lite0 was listed but cannot be fine-tuned
    assert fusion_plan.finetune_plan(STACK, finetune=[], from_layer="auto").layers == {}


@pytest.mark.parametrize(
    ("finetune", "from_layer", "message"),
    [
        (["resnet50"], "auto", "finetune names resnet50, which is not in the stack; members: mobilenet_v2, lite0"),
        ([], {"mobilenet_v2": "block_14_expand"}, "from_layer names mobilenet_v2, which the fusion head does not"),
        ("all", "auto", "must be auto or a list"),
    ],
)
def test_names_outside_the_plan_are_refused(finetune, from_layer, message):
    with pytest.raises(ValueError, match=message):
        fusion_plan.finetune_plan(STACK, finetune=finetune, from_layer=from_layer)
