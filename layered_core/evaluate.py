"""Decompositions scored against ground-truth layer stacks, folder against folder, as the paper's Table 1 is:
the samples paired by name, each scored with :func:`~layered_core.metrics.layerd_scores`, the table of means
for max merges 0..5, and every sample's scores in a JSON file.

A folder holds one sample per entry, named by the entry without its suffix:

- ``<name>/`` holding PNGs: the layers bottom to top in name order, each the whole canvas. This is LayerD's
  layout (its Crello ground truth, ``layers/<name>/<name>_00.png`` ...) and what ``decompose --format png``
  writes (``<name>/layer_01.png`` ...). A folder without PNGs is read from the ``layers.zip`` or
  ``layers.psd`` in it, what ``decompose`` writes by default;
- ``<name>.zip``, the pack's PNG zip (:func:`~layered_core.export.load_png_zip`);
- ``<name>.psd``, its visible layers (a group is a split layer, so the hidden input layer ``decompose`` adds
  is left out).

PSDs and PNG zips store each layer cut to its alpha box, so colour under alpha 0 outside that box reads back
as 0; PNGs keep all of it, which is what LayerD reads. Hidden entries and other files are not samples.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from .atomic import atomic_write_text
from .export import ExportError, load_png_zip
from .layers import Layer, LayerStack, rgba_from_pil
from .metrics import LayerDMean, LayerDScore, kept_by_layerd_filter, layerd_scores, mean_layerd_scores
from .progress import Progress
from .psd_read import PSDReadWarning, load_psd

SAMPLE_SUFFIXES = (".psd", ".zip")
# In a sample folder without PNGs, the files decompose writes (batch.ZIP_NAME, batch.PSD_NAME), zip first: it
# reads faster.
DECOMPOSE_FILES = ("layers.zip", "layers.psd")
JSON_FORMAT = "layered-core/layerd-scores"
# Shown when samples are missing on one side: enough to recognise the pattern, not a wall of names.
_NAMES_SHOWN = 5


class EvaluationError(ValueError):
    """A folder or sample that cannot be evaluated; the message names the file and the problem."""


# Samples ----------------------------------------------------------------------------------------------------


def find_samples(folder: str | os.PathLike) -> dict[str, Path]:
    """The samples in ``folder`` by name (see the module docstring), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    samples: dict[str, Path] = {}
    ignored = 0
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            name = entry.name
        elif entry.suffix.lower() in SAMPLE_SUFFIXES:
            name = entry.stem
        else:
            ignored += 1
            continue
        if name in samples:
            raise EvaluationError(
                f"{folder}: two samples are named {name!r} ({samples[name].name} and {entry.name}); keep one"
            )
        samples[name] = entry
    if not samples:
        raise EvaluationError(
            f"{folder}: no samples (<name>/ folders of PNGs, <name>.psd or <name>.zip)"
            + (f"; {ignored} other files are not samples" if ignored else "")
        )
    return dict(sorted(samples.items()))


def pair_samples(prediction_folder: str | os.PathLike, truth_folder: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, prediction, ground truth)`` for every sample, paired by name; an error when a sample is on one
    side only."""
    predicted, truth = find_samples(prediction_folder), find_samples(truth_folder)
    problems = []
    for names, folder, other in (
        (sorted(set(predicted) - set(truth)), prediction_folder, truth_folder),
        (sorted(set(truth) - set(predicted)), truth_folder, prediction_folder),
    ):
        if names:
            shown = ", ".join(names[:_NAMES_SHOWN])
            if len(names) > _NAMES_SHOWN:
                shown += f" and {len(names) - _NAMES_SHOWN} more"
            count = f"{len(names)} sample{'s' * (len(names) != 1)}"
            problems.append(f"{folder} has {count} with no namesake in {other}: {shown}")
    if problems:
        raise EvaluationError("; ".join(problems))
    return [(name, predicted[name], truth[name]) for name in predicted]


def read_sample(path: str | os.PathLike) -> LayerStack:
    """One sample's layer stack from a folder of PNGs, a PNG zip or a PSD (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        pngs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
        if pngs:
            return _read_pngs(path, pngs)
        for name in DECOMPOSE_FILES:
            if (path / name).is_file():
                return read_sample(path / name)
        raise EvaluationError(f"{path}: holds no PNG layers, and no {' or '.join(DECOMPOSE_FILES)}")
    if path.suffix.lower() == ".zip":
        try:
            return load_png_zip(path)
        except ExportError as error:
            raise EvaluationError(str(error)) from error
        except (OSError, ValueError) as error:  # a PNG in it that PIL cannot read
            raise EvaluationError(f"{path}: not a readable layer ZIP ({error})") from error
    if path.suffix.lower() == ".psd":
        return _read_psd(path)
    raise EvaluationError(f"{path}: not a sample (a folder of PNGs, a .zip or a .psd)")


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_pngs(folder: Path, files: list[Path]) -> LayerStack:
    names = [file.name for file in files]
    natural = sorted(names, key=_natural_key)
    if natural != names:
        first = next(index for index, (a, b) in enumerate(zip(names, natural, strict=True)) if a != b)
        raise EvaluationError(
            f"{folder}: the PNGs are numbered without leading zeros, so name order ({names[first]} before "
            f"{natural[first]}) is not layer order; name them 0000.png, 0001.png, ..."
        )
    layers = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = rgba_from_pil(image)  # PIL's RGBA conversion, as LayerD reads its PNGs
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise EvaluationError(f"{file}: not a readable PNG ({error})") from error
        if layers and pixels.shape != layers[0].pixels.shape:
            raise EvaluationError(
                f"{file}: is {pixels.shape[1]}x{pixels.shape[0]} but {files[0].name} is "
                f"{layers[0].width}x{layers[0].height}; the layers of a sample are whole canvases of one size"
            )
        layers.append(Layer(pixels, file.stem))
    return LayerStack(layers[0].width, layers[0].height, tuple(layers))


def _read_psd(path: Path) -> LayerStack:
    """A PSD's visible layers. What would change the scores unseen (an opacity below 100 %, and whatever
    :func:`~layered_core.psd_read.load_psd` can only warn about: blend modes, clipping, masks, effects) is an
    error here: export such layers as PNGs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PSDReadWarning)
            stack = load_psd(path)
    except (ExportError, PSDReadWarning) as error:
        raise EvaluationError(str(error)) from error

    def visible(layers: tuple[Layer, ...]) -> tuple[Layer, ...]:
        kept = []
        for layer in layers:
            if not layer.visible:
                continue
            if layer.opacity != 255:
                raise EvaluationError(
                    f"{path}: layer {layer.name!r} has an opacity below 100%; only plain layers and groups are "
                    "read here (export the layers as PNGs)"
                )
            kept.append(layer.replace(children=visible(layer.children)) if layer.children else layer)
        return tuple(kept)

    return LayerStack(stack.width, stack.height, visible(stack.layers))


# Scores -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleScores:
    """One sample: where its two stacks came from and its :func:`layerd_scores`."""

    name: str
    prediction: Path
    ground_truth: Path
    scores: list[LayerDScore]


@dataclass(frozen=True)
class Evaluation:
    """A prediction folder scored against a ground-truth folder: every sample, and the table of means."""

    prediction: Path
    ground_truth: Path
    max_merges: int
    layerd_filter: bool
    samples: list[SampleScores]
    table: list[LayerDMean]

    def in_table(self, sample: SampleScores) -> bool:
        """Whether ``sample`` is averaged into the table: always, unless LayerD's filter is on and refuses it."""
        return not self.layerd_filter or kept_by_layerd_filter(sample.scores)

    @property
    def left_out(self) -> list[str]:
        """The samples LayerD's filter left out of the table."""
        return [sample.name for sample in self.samples if not self.in_table(sample)]


def evaluate(
    prediction_folder: str | os.PathLike,
    truth_folder: str | os.PathLike,
    max_merges: int = 5,
    layerd_filter: bool = True,
    progress: Progress | None = None,
) -> Evaluation:
    """Score every sample of ``prediction_folder`` against its namesake in ``truth_folder``.

    ``layerd_filter`` (on: the paper's numbers) leaves samples with fewer than 2 layers on either side out of
    the table, as LayerD's evaluation does; their scores are kept with the others'. An unpaired or unreadable
    sample, or two stacks of different canvas sizes, raise :class:`EvaluationError` naming the files.
    """
    progress = progress or Progress()
    pairs = pair_samples(prediction_folder, truth_folder)
    samples = []
    for number, (name, prediction_path, truth_path) in enumerate(pairs, start=1):
        progress.begin(number, len(pairs), name)
        progress.stage("reading and scoring")
        prediction, truth = read_sample(prediction_path), read_sample(truth_path)
        if prediction.size != truth.size:
            raise EvaluationError(
                f"{prediction_path} is {prediction.width}x{prediction.height} but {truth_path} is "
                f"{truth.width}x{truth.height}; the layers must be at the ground truth's size (decompose "
                "--input-size keeps the input's size)"
            )
        try:
            scores = layerd_scores(prediction, truth, max_merges)
        except ValueError as error:  # a stack with no layers
            raise EvaluationError(f"{prediction_path} against {truth_path}: {error}") from error
        samples.append(SampleScores(name, prediction_path, truth_path, scores))
    try:
        table = mean_layerd_scores([sample.scores for sample in samples], layerd_filter=layerd_filter)
    except ValueError as error:  # LayerD's filter left nothing
        raise EvaluationError(f"{prediction_folder} against {truth_folder}: {error}") from error
    return Evaluation(Path(prediction_folder), Path(truth_folder), max_merges, layerd_filter, samples, table)


# The table and the JSON ---------------------------------------------------------------------------------------


def format_table(evaluation: Evaluation, label: str | None = None) -> str:
    """The table as the paper's Table 1 lays it out: one row (``label``, by default the prediction folder's
    name) of RGB L1 then alpha soft IoU for each max merges; the sample count and the mean merges used below."""
    table = evaluation.table
    label = (label or evaluation.prediction.resolve().name)[:24]
    columns = [
        ("RGB L1 (lower is better)", [f"{row.rgb_l1:.4f}" for row in table]),
        ("Alpha soft IoU (higher is better)", [f"{row.alpha_iou:.4f}" for row in table]),
    ]
    merges = " ".join(f"{row.merges:>6}" for row in table)
    first = max(len(label), len("Max #merges"))
    titles, headers, values = [" " * first], ["Max #merges".ljust(first)], [label.ljust(first)]
    for title, cells in columns:
        width = max(len(title), len(merges))
        titles.append(title.ljust(width))
        headers.append(merges.ljust(width))
        values.append(" ".join(f"{cell:>6}" for cell in cells).ljust(width))
    counted = table[0].samples
    summary = f"{counted} sample{'s' * (counted != 1)}"
    if evaluation.left_out:
        summary += f" ({len(evaluation.left_out)} left out by LayerD's filter: fewer than 2 layers on a side)"
    used = "mean merges used: " + " ".join(f"{row.merges_used:.2f}" for row in table)
    return "\n".join(["  ".join(line).rstrip() for line in (titles, headers, values)] + [summary, used])


def write_json(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """The table and every sample's scores as JSON at ``path``, written whole or not at all."""
    document = {
        "format": JSON_FORMAT,
        "version": 1,
        "prediction": str(evaluation.prediction.resolve()),
        "ground_truth": str(evaluation.ground_truth.resolve()),
        "max_merges": evaluation.max_merges,
        "layerd_filter": evaluation.layerd_filter,
        "left_out": evaluation.left_out,
        "table": [asdict(row) for row in evaluation.table],
        "samples": [
            {
                "name": sample.name,
                "prediction": str(sample.prediction.resolve()),
                "ground_truth": str(sample.ground_truth.resolve()),
                "layers": list(sample.scores[0].layer_counts),
                "in_table": evaluation.in_table(sample),
                "scores": [
                    {key: value for key, value in asdict(score).items() if key != "layer_counts"}
                    for score in sample.scores
                ],
            }
            for sample in evaluation.samples
        ],
    }
    return atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
