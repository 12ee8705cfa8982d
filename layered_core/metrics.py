"""How good a decomposition is: fidelity of its composite to the input image, and the LayerD metrics against a
ground-truth stack.

Fidelity compares premultiplied colour, which is the paper's composite C_N = sum of a_i * RGB_i over black,
against the input, so it needs no ground truth and is what "the layers add back up to the image" means.

The LayerD protocol (Suzuki et al., ICCV 2025; the yardstick of the Qwen-Image-Layered paper's table) as its
evaluation code computes it:

1. In each stack, layers that overlap nothing above them are peeled off as a group, repeatedly, and each
   group is flattened into one layer: mutually non-overlapping layers have no defined order, so they are
   not held against a decomposition for ordering them differently. Overlap means both alphas > 0.
2. Predicted and ground-truth groups are aligned by dynamic time warping (monotone, so order-aware) on
   cost = (RGB L1 + (1 - alpha soft IoU)) / 2, and the scores are averaged over the aligned pairs.
   RGB L1 is the mean absolute straight-colour difference over the pixels where the reference has
   alpha > 0; alpha soft IoU is sum(min(a, b)) / sum(max(a, b)).
3. Up to ``max_merges`` times, the one merge of two adjacent layers, in either stack, that most improves
   the similarity (1 - cost) of the layers involved to what they are aligned with is applied, and the
   alignment is redone. The paper reports the scores after 0..5 merges.

Flattening a group and merging two layers composite as LayerD does, with PIL's ``Image.alpha_composite``
(:func:`layerd_composite`): 8-bit integer steps rounded after each layer, and where the upper pixel's alpha is
0 the lower pixel is kept whole, colour under alpha 0 included. That colour counts, because RGB L1 reads the
prediction's colour wherever the ground truth is visible, transparent prediction pixels too; decoded layers
carry colour under alpha 0. The pack's display compositing (:func:`~layered_core.compositing.composite`: float,
rounded once, colour 0 where nothing is drawn) is a different job and is not used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .compositing import composite_premultiplied, render_layer
from .layers import LayerStack, as_rgba, rgba_from_pil

# Fidelity ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fidelity:
    """How closely a stack's composite reproduces an image. Values in 0..1 colour units."""

    psnr: float  # dB over the premultiplied RGB channels; inf when identical
    max_error: float  # largest absolute difference over premultiplied RGB and alpha (1/255 = one 8-bit step)


def _as_image_array(image: np.ndarray | Image.Image, what: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return rgba_from_pil(image)
    return as_rgba(image, what)


def psnr(reference: np.ndarray, candidate: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shaped float arrays; inf when they are equal."""
    if reference.shape != candidate.shape:
        raise ValueError(f"psnr: shapes differ, {reference.shape} against {candidate.shape}")
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def fidelity(stack: LayerStack, image: np.ndarray | Image.Image) -> Fidelity:
    """PSNR and max error of ``stack``'s composite against ``image`` (uint8 RGB(A) array or PIL image).

    Both are compared premultiplied (an RGB image is opaque), so colour under transparent pixels, which
    nobody sees, does not count.
    """
    reference = _as_image_array(image, "fidelity reference image")
    if reference.shape[:2] != (stack.height, stack.width):
        raise ValueError(
            f"fidelity: the image is {reference.shape[1]}x{reference.shape[0]} but the stack's canvas is "
            f"{stack.width}x{stack.height}"
        )
    ours = composite_premultiplied(stack).astype(np.float64)
    theirs = reference.astype(np.float64) / 255
    theirs[..., :3] *= theirs[..., 3:4]
    return Fidelity(
        psnr=psnr(theirs[..., :3], ours[..., :3]),
        max_error=float(np.abs(theirs - ours).max()),
    )


# LayerD's compositing -----------------------------------------------------------------------------------


def layerd_composite(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``upper`` laid over ``lower`` (same-sized uint8 straight RGBA) as LayerD flattens and merges layers:
    PIL's ``Image.alpha_composite(lower, upper)``, bit for bit.

    Where ``upper``'s alpha is 0 the ``lower`` pixel is kept as it is, colour under alpha 0 included; elsewhere
    the result is rounded to 8 bits, so a chain of layers rounds after each one. Not the pack's display
    compositing (:func:`~layered_core.compositing.composite`).
    """
    lower = as_rgba(lower, "LayerD compositing: the lower layer")
    upper = as_rgba(upper, "LayerD compositing: the upper layer")
    if lower.shape != upper.shape:
        raise ValueError(
            f"LayerD compositing: the upper layer is {upper.shape[1]}x{upper.shape[0]} but the lower one "
            f"{lower.shape[1]}x{lower.shape[0]}"
        )
    out = lower.copy()
    drawn = upper[..., 3] > 0
    if not drawn.any():
        return out
    # PIL's fixed-point steps, in the same order, so every rounding falls where PIL's does. int32 holds
    # them all: the largest, 255 * 255 * 255 * 128, is just below 2**31.
    above, below = upper[drawn].astype(np.int32), lower[drawn].astype(np.int32)
    upper_alpha, lower_alpha = above[:, 3:], below[:, 3:]
    alpha_255 = upper_alpha * 255 + lower_alpha * (255 - upper_alpha)  # the result's alpha times 255, exact
    weight = upper_alpha * (255 * 255 * 128) // alpha_255  # the upper colour's share, in 1/128 units of 0..255
    colour = above[:, :3] * weight + below[:, :3] * (255 * 128 - weight)
    out[drawn, :3] = _pil_divide_by_255(colour + (128 << 7)) >> 7
    out[drawn, 3] = _pil_divide_by_255(alpha_255 + 128)[:, 0]
    return out


def _pil_divide_by_255(values: np.ndarray) -> np.ndarray:
    # PIL divides by 255 with two shifts, which is not floor division for every value: the same bits as PIL
    # need the same shifts.
    return ((values >> 8) + values) >> 8


def layerd_flatten(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Canvas-sized uint8 RGBA layers (bottom to top) flattened as LayerD flattens a group: each laid over the
    result so far with :func:`layerd_composite`, starting from the bottom layer itself (not from a transparent
    canvas, so its colour under alpha 0 stays wherever nothing above is drawn)."""
    if not layers:
        raise ValueError("LayerD flattening: expected at least one layer, got none")
    flattened = as_rgba(layers[0], "LayerD flattening: layer 0")
    for layer in layers[1:]:
        flattened = layerd_composite(flattened, layer)
    return flattened


# LayerD's metrics ----------------------------------------------------------------------------------------

# LayerD divides RGB L1's pixel sum by the pixel count plus this; kept, so the scores agree to float precision.
_L1_EPSILON = 1e-8
# LayerD's evaluation leaves out samples with fewer layers than this in the prediction or the ground truth.
LAYERD_MIN_LAYERS = 2


@dataclass(frozen=True)
class LayerDScore:
    """One sample's LayerD scores allowing up to ``merges`` merges (``merges_used`` were useful)."""

    merges: int
    merges_used: int
    rgb_l1: float  # lower is better
    alpha_iou: float  # higher is better
    cost: float  # (rgb_l1 + (1 - alpha_iou)) / 2 averaged over the alignment; lower is better
    layer_counts: tuple[int, int]  # layers compared (prediction, ground truth), before grouping


@dataclass(frozen=True)
class LayerDMean:
    """A row of the paper's table: LayerD scores allowing up to ``merges`` merges, averaged over ``samples``."""

    merges: int
    merges_used: float  # the mean of the samples' merges_used, not rounded (LayerD's avg_edits)
    rgb_l1: float
    alpha_iou: float
    cost: float
    samples: int


class _Canvas:
    """One canvas-sized RGBA layer with the integer views the scores need, computed once."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        flat = pixels.reshape(-1, 4)
        self.colour = flat[:, :3].astype(np.int16)  # signed, so differences do not wrap around
        self.alpha = flat[:, 3]
        self.covered = np.flatnonzero(self.alpha)
        self.alpha_sum = int(self.alpha.sum(dtype=np.int64))


def rgb_l1(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute RGB difference (0..1) over the pixels where ``reference``'s alpha is > 0, read from
    ``prediction`` whatever its alpha there."""
    return _rgb_l1(_Canvas(as_rgba(prediction)), _Canvas(as_rgba(reference)))


def alpha_soft_iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """sum(min(a, b)) / sum(max(a, b)) of the two alphas (0..1); 0 when both are empty."""
    return _alpha_iou(_Canvas(as_rgba(prediction)), _Canvas(as_rgba(reference)))


# Both scores are integer sums, exact, divided once: equal scores are equal floats, so ties stay ties.
def _rgb_l1(prediction: _Canvas, reference: _Canvas) -> float:
    index = reference.covered
    difference = int(np.abs(prediction.colour[index] - reference.colour[index]).sum(dtype=np.int64))
    return difference / (3 * 255) / (index.size + _L1_EPSILON)


def _alpha_iou(prediction: _Canvas, reference: _Canvas) -> float:
    # sum(max(a, b)) = sum(a) + sum(b) - sum(min(a, b)) saves a pass over the canvas.
    overlap = int(np.minimum(prediction.alpha, reference.alpha).sum(dtype=np.int64))
    union = prediction.alpha_sum + reference.alpha_sum - overlap
    return overlap / union if union > 0 else 0.0


class _Scorer:
    """Scores of layer pairs, cached by identity: merges change few layers, so most pairs repeat."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._alive: list[_Canvas] = []  # keeps ids valid for the cache's lifetime

    def scores(self, first: _Canvas, second: _Canvas) -> tuple[float, float]:
        key = (id(first), id(second))
        if key not in self._cache:
            self._alive += [first, second]
            self._cache[key] = (_rgb_l1(first, second), _alpha_iou(first, second))
        return self._cache[key]

    def cost(self, first: _Canvas, second: _Canvas) -> float:
        l1, iou = self.scores(first, second)
        return (l1 + (1 - iou)) / 2


def group_non_overlapping(alphas: Sequence[np.ndarray]) -> list[list[int]]:
    """LayerD's grouping: indices of layers (bottom to top) in groups, bottom group first.

    The top group is every layer whose alpha > 0 region meets no layer above it; it is set aside and the
    rest grouped the same way. Layers in one group never overlap each other.
    """
    masks = [np.asarray(alpha) > 0 for alpha in alphas]
    remaining = list(range(len(masks)))
    groups = []
    while remaining:
        top = [
            index
            for position, index in enumerate(remaining)
            if not any(np.any(masks[index] & masks[above]) for above in remaining[position + 1 :])
        ]
        groups.append(top)
        remaining = [index for index in remaining if index not in top]
    return groups[::-1]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Dynamic time warping through an (n, m) cost matrix: the cheapest monotone path from (0, 0) to
    (n-1, m-1) by steps (1, 0), (0, 1) and (1, 1).

    Ties go to the diagonal step, then to the step along the first axis, the order LayerD's code uses,
    so the alignment (and the averaged scores) match its numbers.
    """
    n, m = cost.shape
    total = np.zeros((n, m))
    total[:, 0] = np.cumsum(cost[:, 0])
    total[0, :] = np.cumsum(cost[0, :])
    for i in range(1, n):
        for j in range(1, m):
            total[i, j] = cost[i, j] + min(total[i - 1, j], total[i, j - 1], total[i - 1, j - 1])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diagonal, up, left = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if diagonal <= up and diagonal <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    return path[::-1]


def _align(
    scorer: _Scorer, prediction: list[_Canvas], reference: list[_Canvas]
) -> tuple[list[tuple[int, int]], float, float, float]:
    cost = np.array([[scorer.cost(p, r) for r in reference] for p in prediction])
    path = dtw_path(cost)
    pairs = [scorer.scores(prediction[i], reference[j]) for i, j in path]
    l1 = float(np.mean([pair[0] for pair in pairs]))
    iou = float(np.mean([pair[1] for pair in pairs]))
    return path, l1, iou, float(np.mean([cost[i, j] for i, j in path]))


def _best_merge(
    scorer: _Scorer,
    edited: list[_Canvas],
    other: list[_Canvas],
    matches: list[tuple[int, int]],
) -> tuple[float, int, _Canvas | None]:
    """The merge of ``edited[i]`` and ``edited[i + 1]`` that gains most, as (gain, i, merged).

    ``matches`` pairs indices of ``edited`` with indices of ``other``. Gain compares the similarity of the
    two layers to what each is aligned with, before and after merging; after merging the merged layer
    either takes both alignments, or keeps the lower one while the layer above the pair takes over one of
    the two. Stacks of two layers or fewer are not merged, as in LayerD.
    """
    best: tuple[float, int, _Canvas | None] = (-math.inf, -1, None)
    if len(edited) <= 2:
        return best

    def similarity(layer: _Canvas, group: list[_Canvas]) -> float:
        return sum(1 - scorer.cost(layer, item) for item in group)

    for i in range(len(edited) - 1):
        lower_group = [other[j] for e, j in matches if e == i]
        upper_group = [other[j] for e, j in matches if e == i + 1]
        before = similarity(edited[i], lower_group) + similarity(edited[i + 1], upper_group)
        merged = _Canvas(layerd_composite(edited[i].pixels, edited[i + 1].pixels))
        merged_lower = similarity(merged, lower_group)
        options = [merged_lower + similarity(merged, upper_group)]
        if i + 2 < len(edited):
            following = edited[i + 2]
            options += [
                merged_lower + similarity(following, lower_group),
                merged_lower + similarity(following, upper_group),
            ]
        gain = max(options) - before
        if gain > 0 and gain > best[0]:
            best = (gain, i, merged)
    return best


def _stack_canvases(layers: LayerStack | Sequence[np.ndarray], what: str) -> tuple[list[np.ndarray], int, int]:
    if isinstance(layers, LayerStack):
        canvases = [render_layer(layer, layers.width, layers.height) for layer in layers.layers]
    else:
        canvases = [as_rgba(np.asarray(layer), f"{what} layer {index}") for index, layer in enumerate(layers)]
    if not canvases:
        raise ValueError(f"LayerD metrics: the {what} stack has no layers")
    height, width = canvases[0].shape[:2]
    for index, canvas in enumerate(canvases):
        if canvas.shape[:2] != (height, width):
            raise ValueError(
                f"LayerD metrics: {what} layer {index} is {canvas.shape[1]}x{canvas.shape[0]}, expected "
                f"{width}x{height} like layer 0"
            )
    return canvases, width, height


def _grouped(canvases: list[np.ndarray]) -> list[_Canvas]:
    groups = group_non_overlapping([canvas[..., 3] for canvas in canvases])
    return [_Canvas(layerd_flatten([canvases[index] for index in group])) for group in groups]


def layerd_scores(
    prediction: LayerStack | Sequence[np.ndarray],
    reference: LayerStack | Sequence[np.ndarray],
    max_merges: int = 5,
) -> list[LayerDScore]:
    """LayerD metrics of ``prediction`` against the ground truth ``reference``, allowing 0..``max_merges``
    merges: one :class:`LayerDScore` per budget, the paper table's columns.

    Each stack is a :class:`LayerStack` (its top-level layers are compared, a split layer as its PNG export
    draws it: the display composite of its sub-layers) or a sequence of canvas-sized uint8 RGBA arrays,
    bottom to top, which are what LayerD's evaluation reads from its folders of PNGs.
    """
    if max_merges < 0:
        raise ValueError(f"LayerD metrics: max_merges must be >= 0, got {max_merges}")
    predicted, width, height = _stack_canvases(prediction, "predicted")
    truth, truth_width, truth_height = _stack_canvases(reference, "ground-truth")
    if (width, height) != (truth_width, truth_height):
        raise ValueError(
            f"LayerD metrics: the prediction is {width}x{height} but the ground truth is {truth_width}x{truth_height}"
        )
    scorer = _Scorer()
    edited_prediction = _grouped(predicted)
    edited_truth = _grouped(truth)
    layer_counts = (len(predicted), len(truth))

    path, l1, iou, cost = _align(scorer, edited_prediction, edited_truth)
    results = [LayerDScore(0, 0, l1, iou, cost, layer_counts)]
    used = 0
    while used < max_merges:
        # The side being merged goes first in the cost, as in LayerD's code (RGB L1 is measured over the
        # second argument's alpha), so the gains, and the merge chosen, are the same as there.
        gain_p, index_p, merged_p = _best_merge(scorer, edited_prediction, edited_truth, path)
        flipped = [(j, i) for i, j in path]
        gain_t, index_t, merged_t = _best_merge(scorer, edited_truth, edited_prediction, flipped)
        if merged_p is None and merged_t is None:
            break
        if gain_p > gain_t:
            edited_prediction[index_p : index_p + 2] = [merged_p]
        else:
            edited_truth[index_t : index_t + 2] = [merged_t]
        used += 1
        path, l1, iou, cost = _align(scorer, edited_prediction, edited_truth)
        results.append(LayerDScore(used, used, l1, iou, cost, layer_counts))
    # A budget larger than the useful merges scores as the last useful one (how LayerD averages them).
    last = results[-1]
    results += [
        LayerDScore(budget, last.merges_used, last.rgb_l1, last.alpha_iou, last.cost, layer_counts)
        for budget in range(len(results), max_merges + 1)
    ]
    return results


def kept_by_layerd_filter(scores: Sequence[LayerDScore]) -> bool:
    """Whether LayerD's evaluation counts a sample: both its stacks have at least :data:`LAYERD_MIN_LAYERS`
    layers (before grouping)."""
    return min(scores[0].layer_counts) >= LAYERD_MIN_LAYERS


def mean_layerd_scores(samples: Sequence[Sequence[LayerDScore]], *, layerd_filter: bool = False) -> list[LayerDMean]:
    """Average per-sample :func:`layerd_scores` lists (same ``max_merges``) into one table row per budget.

    With ``layerd_filter`` the samples :func:`kept_by_layerd_filter` refuses are left out, as LayerD's
    evaluation does: on for the paper's numbers.
    """
    if not samples:
        raise ValueError("mean LayerD scores: expected at least one sample, got none")
    budgets = len(samples[0])
    if any(len(sample) != budgets for sample in samples):
        raise ValueError("mean LayerD scores: every sample must be scored with the same max_merges")
    if layerd_filter:
        samples = [sample for sample in samples if kept_by_layerd_filter(sample)]
        if not samples:
            raise ValueError(
                f"mean LayerD scores: no sample has {LAYERD_MIN_LAYERS} or more layers in both the prediction and "
                "the ground truth, so LayerD's filter leaves none"
            )
    table = []
    for budget in range(budgets):
        rows = [sample[budget] for sample in samples]
        table.append(
            LayerDMean(
                merges=budget,
                merges_used=float(np.mean([row.merges_used for row in rows])),
                rgb_l1=float(np.mean([row.rgb_l1 for row in rows])),
                alpha_iou=float(np.mean([row.alpha_iou for row in rows])),
                cost=float(np.mean([row.cost for row in rows])),
                samples=len(rows),
            )
        )
    return table
