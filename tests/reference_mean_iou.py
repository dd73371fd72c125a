"""An independent mean IoU, written as plainly as possible from the definition, to test segformer_hf.metrics.

It follows the definition of evaluate's `mean_iou` one image at a time with numpy only: remap the
labels, drop ignored pixels, take three histograms of num_labels unit bins, sum them over images,
then divide. It shares no code with the package: a bug would have to be made twice, differently,
to go unnoticed.
"""

from __future__ import annotations

import numpy as np


def remapped_labels(label: np.ndarray, label_map: dict | None, reduce_labels: bool) -> np.ndarray:
    """label_map (each rule reading the original values), then reduce_labels, in int64 (no overflow)."""
    original = np.array(label, dtype=np.int64)
    label = original.copy()
    for old, new in (label_map or {}).items():
        label[original == old] = new
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


def class_histogram(values: np.ndarray, num_labels: int) -> np.ndarray:
    """Pixels per class 0..num_labels-1; other values fall in no bin (np.histogram drops them)."""
    return np.histogram(values, bins=num_labels, range=(0, num_labels - 1))[0]


def image_areas(
    prediction: np.ndarray,
    label: np.ndarray,
    num_labels: int,
    ignore_index: int,
    label_map: dict | None = None,
    reduce_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, predicted, labelled) pixel counts per class for one image."""
    prediction = np.array(prediction, dtype=np.int64)
    label = remapped_labels(label, label_map, reduce_labels)
    kept = label != ignore_index
    prediction, label = prediction[kept], label[kept]
    agreeing = prediction[prediction == label]
    return (
        class_histogram(agreeing, num_labels),
        class_histogram(prediction, num_labels),
        class_histogram(label, num_labels),
    )


def reference_confusion_matrix(
    predictions,
    references,
    num_labels: int,
    ignore_index: int,
    label_map: dict | None = None,
    reduce_labels: bool = False,
) -> np.ndarray:
    """(num_labels + 1)^2 pixel counts, rows labels, columns predictions; index num_labels: no class."""
    matrix = np.zeros((num_labels + 1, num_labels + 1), dtype=np.int64)
    for prediction, label in zip(predictions, references):
        prediction = np.array(prediction, dtype=np.int64).ravel()
        label = remapped_labels(label, label_map, reduce_labels).ravel()
        kept = label != ignore_index
        prediction, label = prediction[kept], label[kept]
        prediction[(prediction < 0) | (prediction >= num_labels)] = num_labels
        label[(label < 0) | (label >= num_labels)] = num_labels
        np.add.at(matrix, (label, prediction), 1)
    return matrix


def reference_mean_iou(
    predictions,
    references,
    num_labels: int,
    ignore_index: int,
    nan_to_num: float | None = None,
    label_map: dict | None = None,
    reduce_labels: bool = False,
) -> dict:
    """evaluate's mean_iou result dict, image by image."""
    intersection = np.zeros(num_labels)
    predicted = np.zeros(num_labels)
    labelled = np.zeros(num_labels)
    for prediction, label in zip(predictions, references):
        image_intersection, image_predicted, image_labelled = image_areas(
            np.asarray(prediction), np.asarray(label), num_labels, ignore_index, label_map, reduce_labels
        )
        intersection += image_intersection
        predicted += image_predicted
        labelled += image_labelled
    union = predicted + labelled - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / labelled
        overall = intersection.sum() / labelled.sum()
    results = {
        "mean_iou": np.nanmean(iou) if not np.isnan(iou).all() else np.nan,
        "mean_accuracy": np.nanmean(accuracy) if not np.isnan(accuracy).all() else np.nan,
        "overall_accuracy": overall,
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if nan_to_num is not None:
        results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
    return results
