"""Fidelity numbers and the LayerD metrics, on hand-made cases whose answers are worked out by hand.

The LayerD cases use a 1x4-pixel canvas: an opaque black background and small layers of pure colours, so
RGB L1 (mean over RGB, over the reference's alpha > 0 pixels) and alpha soft IoU are simple fractions.
"""

import math

import numpy as np
import pytest

from layered_core import edits
from layered_core.layers import Layer, LayerStack, composite, render_layer
from layered_core.metrics import (
    LayerDScore,
    alpha_soft_iou,
    dtw_path,
    fidelity,
    group_non_overlapping,
    layerd_scores,
    mean_layerd_scores,
    psnr,
    rgb_l1,
)
from layered_core.synthetic import synthetic_design

RED, GREEN, BLUE, BLACK = (255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255), (0, 0, 0, 255)
CLEAR = (0, 0, 0, 0)


def row(*pixels):
    """A 1x4 canvas layer from four RGBA pixels."""
    return np.array([pixels], np.uint8)


BACKGROUND = row(BLACK, BLACK, BLACK, BLACK)


def assert_scores(score, rgb_l1_value, alpha_iou_value, merges_used):
    assert score.rgb_l1 == pytest.approx(rgb_l1_value, abs=1e-9)
    assert score.alpha_iou == pytest.approx(alpha_iou_value, abs=1e-9)
    assert score.merges_used == merges_used


def test_psnr_known_values():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:2])


def test_fidelity_of_a_stack_against_its_own_composite_and_a_broken_one():
    stack = synthetic_design(96, 80, layer_count=6, seed=1)
    image = composite(stack)
    exact = fidelity(stack, image)
    assert exact.max_error <= 0.5 / 255 + 1e-6  # only the final 8-bit rounding of the image
    assert exact.psnr > 55
    rgb_only = fidelity(stack, image[..., :3])  # the background is opaque, so RGB input reads the same
    assert rgb_only.psnr == pytest.approx(exact.psnr)
    broken = fidelity(edits.remove(stack, 3), image)
    assert broken.psnr < exact.psnr - 20 and broken.max_error > 0.1
    with pytest.raises(ValueError, match="the image is 4x4 but the stack's canvas is 96x80"):
        fidelity(stack, np.zeros((4, 4, 3), np.uint8))


def test_fidelity_of_one_grey_layer_is_analytic():
    # One layer of grey 100 at alpha 128 against an opaque grey-100 image: premultiplied the layer is
    # 100 * 128 / 255^2, the image 100 / 255, everywhere.
    stack = LayerStack(8, 8, (Layer(np.full((8, 8, 4), (100, 100, 100, 128), np.uint8)),))
    result = fidelity(stack, np.full((8, 8, 3), 100, np.uint8))
    colour_error = 100 / 255 * (1 - 128 / 255)
    assert result.psnr == pytest.approx(-20 * math.log10(colour_error), rel=1e-5)
    assert result.max_error == pytest.approx(1 - 128 / 255, rel=1e-5)  # the alpha channel's error


def test_rgb_l1_and_soft_iou_by_hand():
    red_left = row(RED, RED, CLEAR, CLEAR)
    green_middle = row(CLEAR, GREEN, GREEN, CLEAR)
    # Over green's two pixels: transparent (colour 0) vs green = 1/3, red vs green = 2/3.
    assert rgb_l1(red_left, green_middle) == pytest.approx(0.5)
    assert alpha_soft_iou(red_left, green_middle) == pytest.approx(1 / 3)
    half = row((255, 0, 0, 51), RED, CLEAR, CLEAR)
    assert alpha_soft_iou(half, red_left) == pytest.approx((0.2 + 1) / 2)
    assert alpha_soft_iou(row(CLEAR, CLEAR, CLEAR, CLEAR), row(CLEAR, CLEAR, CLEAR, CLEAR)) == 0.0


def test_grouping_peels_off_layers_that_nothing_above_overlaps():
    masks = [np.array(m, bool) for m in ([1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0])]
    # Top group: layer 3 (nothing above). Then 1 and 2 (each only under 3, now gone), then 0.
    assert group_non_overlapping(masks) == [[0], [1, 2], [3]]
    assert group_non_overlapping([np.array([1, 0]), np.array([0, 1])]) == [[0, 1]]


def test_dtw_path_by_hand():
    cost = np.array([[0, 1.0], [1, 0], [1, 0]])
    assert dtw_path(cost) == [(0, 0), (1, 1), (2, 1)]
    assert dtw_path(np.array([[0.5]])) == [(0, 0)]
    # Ties prefer the diagonal: all-equal costs give the straight diagonal.
    assert dtw_path(np.ones((3, 3))) == [(0, 0), (1, 1), (2, 2)]


def test_identical_stacks_score_perfectly():
    stack = synthetic_design(64, 48, layer_count=6, seed=3)
    scores = layerd_scores(stack, stack)
    assert [score.merges for score in scores] == [0, 1, 2, 3, 4, 5]
    for score in scores:
        assert (score.rgb_l1, score.alpha_iou, score.cost, score.merges_used) == (0.0, 1.0, 0.0, 0)


def test_a_layer_split_into_non_overlapping_halves_is_grouped_back():
    whole = row(RED, BLUE, CLEAR, CLEAR)
    left, right = row(RED, CLEAR, CLEAR, CLEAR), row(CLEAR, BLUE, CLEAR, CLEAR)
    scores = layerd_scores([BACKGROUND, left, right], [BACKGROUND, whole], max_merges=2)
    for score in scores:
        assert_scores(score, 0.0, 1.0, 0)


def test_two_layers_merged_in_the_prediction():
    # Ground truth: red on pixels 0-1, green over it on pixels 1-2. The prediction has them as one layer.
    # Alignment (bg-bg, merged-red, merged-green): RGB L1 (0 + 1/3 + 0) / 3, IoU (1 + 2/3 + 2/3) / 3.
    # One merge (of the two ground-truth layers, the only stack with more than two) makes them equal.
    red = row(RED, RED, CLEAR, CLEAR)
    green = row(CLEAR, GREEN, GREEN, CLEAR)
    merged = row(RED, GREEN, GREEN, CLEAR)
    scores = layerd_scores([BACKGROUND, merged], [BACKGROUND, red, green])
    assert_scores(scores[0], 1 / 9, 7 / 9, 0)
    assert scores[0].cost == pytest.approx((0 + 1 / 3 + 1 / 6) / 3)
    for score in scores[1:]:
        assert_scores(score, 0.0, 1.0, 1)


def test_two_layers_swapped():
    # Ground truth: A (red, pixels 0-1) under B (red on pixel 1, blue on pixel 2); the prediction has B
    # under A. Alignment (bg-bg, B-bg, A-A, A-B): RGB L1 (0 + 1/6 + 0 + 1/6) / 4, IoU (1 + 1/2 + 1 + 1/3) / 4.
    # Merge 1 joins background and A in the ground truth (gain 2/3), merge 2 joins B and A in the
    # prediction (gain 1/12); then each side has two layers and merging stops.
    a = row(RED, RED, CLEAR, CLEAR)
    b = row(CLEAR, RED, BLUE, CLEAR)
    scores = layerd_scores([BACKGROUND, b, a], [BACKGROUND, a, b], max_merges=4)
    assert_scores(scores[0], 1 / 12, 17 / 24, 0)
    assert scores[0].cost == pytest.approx(3 / 16)
    assert_scores(scores[1], 1 / 9, 7 / 9, 1)
    for score in scores[2:]:
        assert_scores(score, 1 / 12, 5 / 6, 2)
    # Swapping two layers that do not overlap changes nothing: they form one group.
    apart = row(CLEAR, CLEAR, GREEN, GREEN)
    for score in layerd_scores([BACKGROUND, apart, a], [BACKGROUND, a, apart], max_merges=1):
        assert_scores(score, 0.0, 1.0, 0)


def test_stacks_and_arrays_give_the_same_scores():
    truth = synthetic_design(64, 48, layer_count=6, seed=8)
    prediction = edits.merge(edits.recolor(truth, 2, hue_shift=40), 3)
    from_stacks = layerd_scores(prediction, truth, max_merges=3)
    from_arrays = layerd_scores(_canvases(prediction), _canvases(truth), max_merges=3)
    assert from_stacks == from_arrays
    assert from_stacks[0].rgb_l1 > 0 and from_stacks[0].alpha_iou < 1
    costs = [score.cost for score in from_stacks]
    assert costs[-1] <= costs[0]


def _canvases(stack):
    return [render_layer(layer, stack.width, stack.height) for layer in stack]


def test_mean_scores_average_each_budget():
    first = [LayerDScore(0, 0, 0.2, 0.6, 0.3), LayerDScore(1, 1, 0.0, 1.0, 0.0)]
    second = [LayerDScore(0, 0, 0.4, 0.8, 0.3), LayerDScore(1, 0, 0.4, 0.8, 0.3)]
    table = mean_layerd_scores([first, second])
    assert table[0] == LayerDScore(0, 0, pytest.approx(0.3), pytest.approx(0.7), pytest.approx(0.3))
    assert table[1].rgb_l1 == pytest.approx(0.2) and table[1].alpha_iou == pytest.approx(0.9)
    with pytest.raises(ValueError, match="same max_merges"):
        mean_layerd_scores([first, second[:1]])


def test_layerd_rejects_mismatched_canvases():
    with pytest.raises(ValueError, match="the prediction is 4x1 but the ground truth is 2x1"):
        layerd_scores([BACKGROUND], [np.zeros((1, 2, 4), np.uint8)])
