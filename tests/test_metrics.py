"""Fidelity numbers and the LayerD metrics, on hand-made cases whose answers are worked out by hand, and
LayerD's compositing against PIL's ``Image.alpha_composite`` (the installed Pillow is the reference).

The LayerD cases use canvases of a few pixels: an opaque black background and small layers of pure colours,
so RGB L1 (mean over RGB, over the reference's alpha > 0 pixels) and alpha soft IoU are simple fractions.
"""

import math

import numpy as np
import pytest
from PIL import Image

from layered_core import edits, metrics
from layered_core.compositing import composite, render, render_layer
from layered_core.layers import Layer, LayerStack
from layered_core.metrics import (
    LayerDMean,
    LayerDScore,
    alpha_soft_iou,
    dtw_path,
    fidelity,
    group_non_overlapping,
    kept_by_layerd_filter,
    layerd_composite,
    layerd_flatten,
    layerd_scores,
    mean_layerd_scores,
    psnr,
    rgb_l1,
)
from layered_core.synthetic import synthetic_design

RED, GREEN, BLUE, BLACK = (255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255), (0, 0, 0, 255)
CLEAR = (0, 0, 0, 0)
HIDDEN_RED, HIDDEN_BLUE = (255, 0, 0, 0), (0, 0, 255, 0)  # colour under alpha 0, as decoded layers have


def row(*pixels):
    """A one-row canvas layer from its RGBA pixels."""
    return np.array([pixels], np.uint8)


BACKGROUND = row(BLACK, BLACK, BLACK, BLACK)


def assert_scores(score, rgb_l1_value, alpha_iou_value, merges_used):
    # LayerD divides RGB L1 by the pixel count plus 1e-8: on these few pixels a part in 1e8 of the value.
    assert score.rgb_l1 == pytest.approx(rgb_l1_value, rel=1e-8, abs=1e-12)
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


def _score(merges, used, l1, iou, counts=(3, 3)):
    return LayerDScore(merges, used, l1, iou, (l1 + (1 - iou)) / 2, counts)


def test_mean_scores_average_each_budget_and_merges_used_is_not_rounded():
    first = [_score(0, 0, 0.2, 0.6), _score(1, 1, 0.0, 1.0)]
    second = [_score(0, 0, 0.4, 0.8), _score(1, 0, 0.4, 0.8)]
    table = mean_layerd_scores([first, second])
    assert table[0] == LayerDMean(0, 0.0, pytest.approx(0.3), pytest.approx(0.7), pytest.approx(0.3), 2)
    assert table[1].rgb_l1 == pytest.approx(0.2) and table[1].alpha_iou == pytest.approx(0.9)
    assert table[1].merges_used == 0.5  # one of two samples merged once: LayerD's avg_edits
    with pytest.raises(ValueError, match="same max_merges"):
        mean_layerd_scores([first, second[:1]])


def test_layerd_filter_leaves_out_samples_with_fewer_than_two_layers_on_either_side():
    both = [_score(0, 0, 0.2, 0.6, (2, 3))]
    one_predicted = [_score(0, 0, 0.6, 0.2, (1, 3))]
    one_true = [_score(0, 0, 0.8, 0.4, (4, 1))]
    assert [kept_by_layerd_filter(sample) for sample in (both, one_predicted, one_true)] == [True, False, False]
    (everything,) = mean_layerd_scores([both, one_predicted, one_true])
    assert (everything.samples, everything.rgb_l1) == (3, pytest.approx(1.6 / 3))
    (filtered,) = mean_layerd_scores([both, one_predicted, one_true], layerd_filter=True)
    assert (filtered.samples, filtered.rgb_l1, filtered.alpha_iou) == (1, 0.2, 0.6)
    with pytest.raises(ValueError, match="LayerD's filter leaves none"):
        mean_layerd_scores([one_predicted, one_true], layerd_filter=True)
    # layerd_scores records the counts before grouping: three layers that form two groups count as three
    apart = row(CLEAR, CLEAR, GREEN, GREEN)
    a = row(RED, RED, CLEAR, CLEAR)
    assert layerd_scores([BACKGROUND, apart, a], [BACKGROUND], max_merges=0)[0].layer_counts == (3, 1)


def test_layerd_rejects_mismatched_canvases():
    with pytest.raises(ValueError, match="the prediction is 4x1 but the ground truth is 2x1"):
        layerd_scores([BACKGROUND], [np.zeros((1, 2, 4), np.uint8)])


# LayerD's compositing: PIL's alpha_composite ---------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 3, 4, 7, 8, 9, 61])
def test_layerd_composite_is_pils_alpha_composite_bit_for_bit(width):
    # Odd and even widths, in case the installed Pillow handles runs of 4 or 8 pixels apart from the rest.
    rng = np.random.default_rng(width)
    lower, upper = (rng.integers(0, 256, (37, width, 4), dtype=np.uint8) for _ in range(2))
    for layer in (lower, upper):  # the edge cases as often as the rest: alpha 0 (colour kept) and 255
        layer[..., 3][rng.random(layer.shape[:2]) < 0.25] = 0
        layer[..., 3][rng.random(layer.shape[:2]) < 0.25] = 255
    expected = np.asarray(Image.alpha_composite(Image.fromarray(lower, "RGBA"), Image.fromarray(upper, "RGBA")))
    assert np.array_equal(layerd_composite(lower, upper), expected)


def test_layerd_composite_of_every_alpha_pair_is_pils():
    upper_alpha, lower_alpha = (axis.astype(np.uint8) for axis in np.meshgrid(np.arange(256), np.arange(256)))
    for upper_colour, lower_colour in ((255, 0), (0, 255), (1, 254), (200, 201)):
        upper = np.stack([np.full_like(upper_alpha, upper_colour)] * 3 + [upper_alpha], axis=-1)
        lower = np.stack([np.full_like(lower_alpha, lower_colour)] * 3 + [lower_alpha], axis=-1)
        expected = Image.alpha_composite(Image.fromarray(lower, "RGBA"), Image.fromarray(upper, "RGBA"))
        assert np.array_equal(layerd_composite(lower, upper), np.asarray(expected))


def test_hidden_colour_under_alpha_0_is_kept_through_a_merge():
    lower = row(HIDDEN_RED, HIDDEN_RED, RED)
    upper = row(HIDDEN_BLUE, (0, 0, 255, 255), CLEAR)
    # Pixel 0: the upper alpha is 0, so the lower pixel stays whole, hidden red included. Pixel 1: opaque
    # blue over alpha 0 is blue. Pixel 2: nothing over red.
    assert layerd_composite(lower, upper).tolist() == [[list(HIDDEN_RED), list(BLUE), list(RED)]]
    # The display compositing draws nothing there: colour 0 where the result's alpha is 0.
    assert render([Layer(lower), Layer(upper)], (0, 0, 3, 1))[0, 0].tolist() == list(CLEAR)
    # Flattening starts from the bottom layer itself, not from a transparent canvas.
    assert layerd_flatten([row(HIDDEN_RED), row(HIDDEN_BLUE), row(CLEAR)]).tolist() == [[list(HIDDEN_RED)]]


def test_layerd_flatten_rounds_to_8_bits_after_each_layer():
    # White at alpha 51 (0.2) three times over opaque black. Rounded after each layer: 51, then
    # 51 + 0.2 * (255 - 51) = 91.8 -> 92, then 92 + 0.2 * (255 - 92) = 124.6 -> 125. Rounded once, as the
    # display compositing does: 255 * (1 - 0.8 ** 3) = 124.44 -> 124.
    white = (255, 255, 255, 51)
    layers = [row(BLACK), row(white), row(white), row(white)]
    assert layerd_flatten(layers).tolist() == [[[125, 125, 125, 255]]]
    assert composite(LayerStack(1, 1, tuple(Layer(layer) for layer in layers))).tolist() == [[[124, 124, 124, 255]]]


def _display_over(lower, upper):
    return render([Layer(lower), Layer(upper)], (0, 0, lower.shape[1], lower.shape[0]))


def test_hidden_colour_changes_which_merge_is_chosen(monkeypatch):
    # Two pixels. Ground truth: black background, T = red on both pixels. Prediction: black background,
    # X = red on pixel 1 with red hidden under alpha 0 on pixel 0, Y = red on pixel 1 with blue hidden on
    # pixel 0. The prediction's layers overlap in turn (three groups); the ground truth's two cannot merge.
    # Costs (L1 over the ground truth's visible pixels, read from the prediction): BG-BG 0, BG-T 1/6,
    # X-BG 5/12, X-T (0 + 1 - 1/2) / 2 = 1/4, Y-BG 5/12, Y-T (1/3 + 1/2) / 2 = 5/12 (hidden blue vs red).
    # DTW path: BG-BG, X-T, Y-T, so RGB L1 (0 + 0 + 1/3) / 3 and IoU (1 + 1/2 + 1/2) / 3.
    # Merging BG and X gives [black, red] (opaque): similarities 11/12 to BG and to T, against 1 + 3/4
    # before: gain 1/12. Merging X and Y keeps X's hidden red on pixel 0 (neither is drawn there) and gives
    # red on pixel 1: similarity 3/4 to T, twice, against 3/4 + 7/12 before: gain 1/6, the better one.
    # Aligned then: BG-BG, XY-T, so RGB L1 0 and IoU (1 + 1/2) / 2.
    prediction = [row(BLACK, BLACK), row(HIDDEN_RED, RED), row(HIDDEN_BLUE, RED)]
    truth = [row(BLACK, BLACK), row(RED, RED)]
    scores = layerd_scores(prediction, truth, max_merges=2)
    assert_scores(scores[0], 1 / 9, 2 / 3, 0)
    for score in scores[1:]:
        assert_scores(score, 0.0, 3 / 4, 1)
    # The display compositing leaves pixel 0 of the merged X and Y black (colour 0), 1/3 from red: similarity
    # 2/3 twice, no gain, so it merged BG and X instead. Aligned then: BGX-BG (L1 1/6), Y-T (L1 1/3).
    monkeypatch.setattr(metrics, "layerd_composite", _display_over)
    for score in layerd_scores(prediction, truth, max_merges=2)[1:]:
        assert_scores(score, 1 / 4, 3 / 4, 1)
