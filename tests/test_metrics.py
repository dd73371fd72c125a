"""Mean IoU: segformer_hf.metrics against an independent per-image reference and evaluate's documentation.

Every comparison is with tests/reference_mean_iou.py (numpy histograms, one image at a time, written
from the definition) or with numbers published in evaluate's documentation, never with our own output
saved earlier. Results are compared exactly: both sides divide the same integer counts in float64.

Run as a script (under `accelerate launch`), this file is the worker of the two-process test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from reference_mean_iou import reference_confusion_matrix, reference_mean_iou

import segformer_hf.metrics as segformer_metrics
from segformer_hf.metrics import (
    EVALUATE_MODULE_PATH,
    MeanIoU,
    MetricBackendUnavailable,
    create_metric,
    mean_iou,
)

RESULT_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


def assert_same_results(actual: dict, expected: dict) -> None:
    assert set(actual) == set(RESULT_KEYS)
    for key in RESULT_KEYS:
        # assert_array_equal treats NaN as equal to NaN, and compares scalars too.
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]), err_msg=key)
    for key in ("per_category_iou", "per_category_accuracy"):
        assert isinstance(actual[key], np.ndarray) and actual[key].dtype == np.float64


def random_maps(
    seed: int,
    sizes: list[tuple[int, int]],
    values: tuple[int, int],
    ignore_index: int | None = 255,
    ignore_fraction: float = 0.1,
    extreme_fraction: float = 0.0,
    dtype: type = np.int64,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps with values in [low, high), some ignore_index labels and, if asked, some +-1e12 values.

    Half of the predictions copy the label (so classes have intersections), the rest are random.
    """
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for height, width in sizes:
        reference = rng.integers(*values, size=(height, width))
        if ignore_index is not None:
            reference[rng.random((height, width)) < ignore_fraction] = ignore_index
        guess = rng.integers(*values, size=(height, width))
        prediction = np.where(rng.random((height, width)) < 0.5, reference, guess)
        for label_map in (reference, prediction):
            extreme = rng.random((height, width)) < extreme_fraction
            label_map[extreme] = rng.choice([-(10**12), 10**12, 2**40 + 1], size=int(extreme.sum()))
        predictions.append(prediction.astype(dtype))
        references.append(reference.astype(dtype))
    return predictions, references


MIXED_SIZES = [(5, 7), (1, 1), (16, 3), (9, 9), (2, 30)]

# (name, map values [low, high), metric options); values reach outside [0, num_labels) on purpose, and
# every case has label pixels of 255 (ignored or, where ignore_index differs, simply out of range).
CASES = [
    ("plain", (0, 6), {"num_labels": 6, "ignore_index": 255}),
    ("out_of_range_both_ways", (-3, 11), {"num_labels": 7, "ignore_index": 255}),
    ("ignore_index_inside_class_range", (0, 8), {"num_labels": 8, "ignore_index": 3}),
    ("ignore_index_none", (-1, 6), {"num_labels": 5, "ignore_index": None}),
    ("reduce_labels", (0, 8), {"num_labels": 6, "ignore_index": 255, "reduce_labels": True}),
    (
        "label_map_reads_original_labels",
        (0, 9),
        {"num_labels": 8, "ignore_index": 255, "label_map": {1: 3, 3: 1, 0: 255, 8: 20, 255: 2}},
    ),
    (
        "label_map_then_reduce_labels",
        (0, 9),
        {"num_labels": 7, "ignore_index": 255, "label_map": {2: 0, 5: 300}, "reduce_labels": True},
    ),
    ("empty_classes_nan", (0, 4), {"num_labels": 12, "ignore_index": 255}),
    ("empty_classes_nan_to_num", (0, 4), {"num_labels": 12, "ignore_index": 255, "nan_to_num": 0}),
    ("nan_to_num_negative", (-2, 4), {"num_labels": 9, "ignore_index": 255, "nan_to_num": -1}),
    ("one_class", (-1, 3), {"num_labels": 1, "ignore_index": 255}),
    (
        "label_map_to_and_from_the_ignore_index",
        (0, 6),
        {"num_labels": 6, "ignore_index": 4, "label_map": {4: 1, 255: 4}},
    ),
]


@pytest.mark.parametrize(("values", "options"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_mean_iou_matches_the_per_image_reference(values, options):
    predictions, references = random_maps(options["num_labels"], MIXED_SIZES, values)
    expected = reference_mean_iou(predictions, references, **options)
    assert_same_results(mean_iou(predictions, references, **options), expected)


def test_values_far_outside_the_class_range_count_as_no_class():
    predictions, references = random_maps(1, MIXED_SIZES, (-2, 6), extreme_fraction=0.2)
    options = {"num_labels": 5, "ignore_index": 255, "label_map": {2: -7}, "reduce_labels": True}
    expected = reference_mean_iou(predictions, references, **options)
    assert_same_results(mean_iou(predictions, references, **options), expected)
    as_int32 = (
        [m.clip(-(2**31), 2**31 - 1).astype(np.int32) for m in maps] for maps in (predictions, references)
    )
    predictions32, references32 = as_int32
    expected32 = reference_mean_iou(predictions32, references32, **options)
    assert_same_results(mean_iou(predictions32, references32, **options), expected32)


def test_documented_example_gives_the_documented_numbers():
    # The example of evaluate's mean_iou metric card (metrics/mean_iou/README.md) and its printed output.
    predictions = [
        np.array([[1, 2], [3, 4], [5, 255]]),
        np.array([[2, 7], [9, 2], [3, 6]]),
        np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
    ]
    references = [
        np.array([[0, 3], [5, 4], [6, 255]]),
        np.array([[1, 7], [9, 2], [3, 6]]),
        np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
    ]
    results = mean_iou(predictions, references, num_labels=10, ignore_index=255, reduce_labels=False)
    assert round(float(results["mean_iou"]), 4) == 0.4775
    assert round(float(results["mean_accuracy"]), 4) == 0.5917
    assert round(float(results["overall_accuracy"]), 4) == 0.5263
    np.testing.assert_allclose(results["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(
        results["per_category_accuracy"], [0, 0, 0.75, 2 / 3, 1, 0, 0.5, 1, 1, 1], rtol=1e-7
    )


@pytest.mark.parametrize("high", [256, 257, 300])
def test_maps_just_past_the_uint8_range_keep_their_values(high):
    # int maps of 0..255 are counted as uint8 on CPU; a single 256 or more must keep them wide.
    predictions, references = random_maps(16, [(40, 40)] * 3, (0, high), ignore_index=None)
    options = {"num_labels": 6, "ignore_index": 250}
    expected = reference_mean_iou(predictions, references, **options)
    assert_same_results(mean_iou(predictions, references, **options), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, bool])
def test_every_integer_dtype_counts_the_same(dtype):
    high = 2 if dtype is bool else 120
    predictions, references = random_maps(3, MIXED_SIZES, (0, high), ignore_index=None, dtype=dtype)
    options = {"num_labels": 100 if high > 2 else 2, "ignore_index": 0 if dtype is bool else 7}
    expected = reference_mean_iou(predictions, references, **options)
    assert_same_results(mean_iou(predictions, references, **options), expected)
    tensors = ([torch.from_numpy(m) for m in predictions], [torch.from_numpy(m) for m in references])
    assert_same_results(mean_iou(*tensors, **options), expected)


def test_numpy_and_torch_inputs_and_batches_give_the_same_result():
    predictions, references = random_maps(4, [(12, 10)] * 6, (-1, 9))
    options = {"num_labels": 7, "ignore_index": 255, "label_map": {4: 1}}
    expected = reference_mean_iou(predictions, references, **options)
    batch_predictions, batch_references = np.stack(predictions), np.stack(references)
    for inputs in [
        (predictions, references),
        (batch_predictions, batch_references),
        (torch.from_numpy(batch_predictions), torch.from_numpy(batch_references)),
        ([torch.from_numpy(m) for m in predictions], references),
        (torch.from_numpy(batch_predictions), list(batch_references)),
        (batch_predictions[:, ::-1], batch_references[:, ::-1]),  # negative strides
    ]:
        assert_same_results(mean_iou(*inputs, **options), expected)
    read_only = [m.copy() for m in predictions]
    for prediction in read_only:
        prediction.flags.writeable = False
    assert_same_results(mean_iou(read_only, references, **options), expected)


def test_streaming_equals_one_shot_for_any_batching():
    predictions, references = random_maps(5, [(8, 8)] * 12 + MIXED_SIZES, (-2, 10))
    options = {"num_labels": 8, "ignore_index": 255, "reduce_labels": True, "nan_to_num": 0.0}
    expected = reference_mean_iou(predictions, references, **options)
    rng = np.random.default_rng(0)
    for _ in range(4):
        metric = MeanIoU(**options)
        start = 0
        while start < len(predictions):
            stop = start + int(rng.integers(1, 6))
            chunk = slice(start, stop)
            sizes = {m.shape for m in predictions[chunk]}
            if len(sizes) == 1 and rng.random() < 0.5:  # same-size chunks also as (B, H, W) tensors
                metric.update(torch.from_numpy(np.stack(predictions[chunk])), np.stack(references[chunk]))
            else:
                metric.update(predictions[chunk], references[chunk])
            start = stop
        assert_same_results(metric.compute(), expected)
        assert_same_results(metric.compute(), expected)  # compute does not consume the counts


def test_updates_after_compute_keep_counting_and_reset_starts_over():
    first = random_maps(6, MIXED_SIZES, (0, 5))
    second = random_maps(8, MIXED_SIZES[:3], (0, 5))
    metric = MeanIoU(num_labels=5, ignore_index=255)
    metric.update(*first)
    assert_same_results(metric.compute(), reference_mean_iou(*first, num_labels=5, ignore_index=255))
    metric.update(*second)
    both = (first[0] + second[0], first[1] + second[1])
    assert_same_results(metric.compute(), reference_mean_iou(*both, num_labels=5, ignore_index=255))
    metric.reset()
    assert_same_results(metric.compute(), reference_mean_iou([], [], num_labels=5, ignore_index=255))
    metric.update(*second)
    assert_same_results(metric.compute(), reference_mean_iou(*second, num_labels=5, ignore_index=255))


def test_nothing_counted_gives_nan_everywhere():
    results = MeanIoU(num_labels=3, ignore_index=255).compute()
    assert np.isnan(results["mean_iou"]) and np.isnan(results["overall_accuracy"])
    assert np.isnan(results["per_category_iou"]).all() and results["per_category_iou"].shape == (3,)


def test_confusion_matrix_matches_the_reference_and_the_state_does_not_grow():
    options = {"num_labels": 6, "ignore_index": 255, "label_map": {5: 2}, "reduce_labels": True}
    metric = MeanIoU(**options)
    first = random_maps(9, MIXED_SIZES, (-2, 9), extreme_fraction=0.05)
    metric.update(*first)
    state = metric._counts
    second = random_maps(10, [(64, 64)] * 8, (0, 9), dtype=np.uint8)
    metric.update(torch.from_numpy(np.stack(second[0])), torch.from_numpy(np.stack(second[1])))
    assert metric._counts is state and state.shape == (len(metric._row_of_label_key), 258)
    both = (first[0] + second[0], first[1] + second[1])
    np.testing.assert_array_equal(
        metric.confusion_matrix().numpy(), reference_confusion_matrix(*both, **options)
    )


def test_a_wide_label_span_is_looked_up_per_pixel():
    # ignore_index 65535 (16-bit label images) makes the span of special values too wide to count directly.
    predictions, references = random_maps(15, MIXED_SIZES, (0, 7), ignore_index=65535)
    options = {"num_labels": 5, "ignore_index": 65535, "label_map": {6: 65535}}
    metric = MeanIoU(**options)
    assert metric._rows_looked_up_per_pixel is not None
    metric.update(predictions, references)
    assert_same_results(metric.compute(), reference_mean_iou(predictions, references, **options))
    np.testing.assert_array_equal(
        metric.confusion_matrix().numpy(), reference_confusion_matrix(predictions, references, **options)
    )


# The CPU kernel (numpy) and the device kernel (torch) ---------------------------------------------------

KERNEL_DTYPES = [np.uint8, np.int16, np.int32, np.int64]


def as_dtype(maps: list[np.ndarray], dtype: type) -> list[np.ndarray]:
    """The maps in `dtype`, values clipped to what it holds (the reference is given the same maps)."""
    limits = np.iinfo(dtype)
    return [m.clip(limits.min, limits.max).astype(dtype) for m in maps]


def maps_past_a_byte(seed: int, dtype: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps of mixed sizes, one pair with values past 0..255 (as far as `dtype` reaches), the others not."""
    predictions, references = random_maps(seed, MIXED_SIZES, (-2, 9))
    wide_predictions, wide_references = random_maps(seed + 1, [(6, 11)], (-400, 70_000))
    return as_dtype(predictions + wide_predictions, dtype), as_dtype(references + wide_references, dtype)


def confusion_counted_by(kernel: str, predictions, references, options) -> np.ndarray:
    """MeanIoU's confusion matrix of CPU maps counted by its numpy kernel or by its torch kernel."""
    metric = MeanIoU(**{key: value for key, value in options.items() if key != "nan_to_num"}, device="cpu")
    if kernel == "numpy":
        metric.update(predictions, references)
    else:
        metric._start(torch.device("cpu"))
        for prediction, reference in zip(predictions, references):
            metric._count_with_torch(
                torch.from_numpy(prediction).reshape(-1), torch.from_numpy(reference).reshape(-1)
            )
    return metric.confusion_matrix().numpy()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda dtype: np.dtype(dtype).name)
@pytest.mark.parametrize(("values", "options"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_cpu_kernel_matches_the_reference_for_each_map_dtype(dtype, values, options):
    predictions, references = random_maps(options["num_labels"] + 20, MIXED_SIZES, values)
    extra_predictions, extra_references = maps_past_a_byte(options["num_labels"], dtype)
    predictions, references = (
        as_dtype(predictions, dtype) + extra_predictions,
        as_dtype(references, dtype) + extra_references,
    )
    expected = reference_mean_iou(predictions, references, **options)
    assert_same_results(mean_iou(predictions, references, **options), expected)
    confusion_options = {key: value for key, value in options.items() if key != "nan_to_num"}
    np.testing.assert_array_equal(
        confusion_counted_by("numpy", predictions, references, options),
        reference_confusion_matrix(predictions, references, **confusion_options),
    )


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda dtype: np.dtype(dtype).name)
@pytest.mark.parametrize(
    "options",
    [
        {"num_labels": 6, "ignore_index": 255},
        {"num_labels": 7, "ignore_index": 3, "label_map": {1: 300, 300: 2, -5: 0}, "reduce_labels": True},
        {"num_labels": 5, "ignore_index": None},
        {"num_labels": 300, "ignore_index": -1},
        {"num_labels": 4, "ignore_index": 65535, "label_map": {2: 65535}},  # wide span: rows per pixel
    ],
    ids=["ade", "label_map_reduce_labels", "no_ignore_index", "more_classes_than_a_byte", "wide_span"],
)
def test_cpu_and_torch_kernels_count_the_same_confusion_matrix(dtype, options):
    predictions, references = maps_past_a_byte(17, dtype)
    numpy_confusion = confusion_counted_by("numpy", predictions, references, options)
    np.testing.assert_array_equal(
        numpy_confusion, confusion_counted_by("torch", predictions, references, options)
    )
    np.testing.assert_array_equal(
        numpy_confusion, reference_confusion_matrix(predictions, references, **options)
    )


def test_chunks_that_fit_a_byte_and_chunks_that_do_not_add_up(monkeypatch):
    # Small chunks, so that one map is counted partly as byte pairs and partly by clamped keys.
    monkeypatch.setattr(segformer_metrics, "_CPU_CHUNK_PIXELS", 64)
    predictions, references = random_maps(18, [(30, 20), (9, 7), (40, 40)], (0, 9), ignore_fraction=0.02)
    references[0][25, 3] = 1000  # past a byte: only the chunk holding it leaves the byte path
    predictions[2][0, 0] = -1
    for options in (
        {"num_labels": 8, "ignore_index": 255, "reduce_labels": True},
        {"num_labels": 5, "ignore_index": 65535, "label_map": {7: 65535}},  # byte rows folded per row
    ):
        metric = MeanIoU(**options)
        metric.update(predictions[:2], references[:2])
        metric.update(torch.from_numpy(predictions[2]), references[2])
        assert_same_results(metric.compute(), reference_mean_iou(predictions, references, **options))
        np.testing.assert_array_equal(
            metric.confusion_matrix().numpy(), reference_confusion_matrix(predictions, references, **options)
        )


def test_pil_images_and_bool_maps_are_counted_on_the_cpu():
    from PIL import Image

    predictions, references = random_maps(19, [(13, 17), (5, 4)], (0, 6), dtype=np.uint8)
    options = {"num_labels": 6, "ignore_index": 255, "label_map": {5: 0}}
    images = ([Image.fromarray(m) for m in predictions], [Image.fromarray(m) for m in references])
    assert_same_results(mean_iou(*images, **options), reference_mean_iou(predictions, references, **options))
    masks = [m > 2 for m in predictions], [m > 3 for m in references]
    expected = reference_mean_iou(*masks, num_labels=2, ignore_index=None)
    assert_same_results(mean_iou(*masks, num_labels=2, ignore_index=None), expected)


# Operations that only relabel a tensor's memory; anything else would be torch computing on the CPU.
TORCH_METADATA_OPERATIONS = {
    "detach", "aten::detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::to",
    "aten::alias", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
}  # fmt: skip


def test_cpu_maps_run_no_torch_kernel_so_busy_cores_cannot_stall_them():
    # torch's CPU kernels share work among threads that wait on each other when other processes hold
    # the cores; the CPU path must not run any, from the first update to reset.
    from torch.profiler import ProfilerActivity, profile

    predictions, references = maps_past_a_byte(20, np.int64)
    metric = MeanIoU(num_labels=6, ignore_index=255, reduce_labels=True)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        metric.update([torch.from_numpy(m) for m in predictions], references)
        metric.update(as_dtype(predictions, np.uint8), as_dtype(references, np.uint8))
        metric.compute()
        metric.confusion_matrix()
        metric.reset()
    operations = {event.name for event in profiler.events()}
    assert operations <= TORCH_METADATA_OPERATIONS, operations - TORCH_METADATA_OPERATIONS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine runs it)")
def test_cuda_maps_are_counted_on_the_gpu():
    predictions, references = random_maps(14, [(32, 48)] * 4 + MIXED_SIZES, (-1, 9), extreme_fraction=0.05)
    options = {"num_labels": 8, "ignore_index": 255, "label_map": {1: 6}, "reduce_labels": True}
    metric = MeanIoU(**options)
    metric.update(
        torch.from_numpy(np.stack(predictions[:4])).cuda(), torch.from_numpy(np.stack(references[:4])).cuda()
    )
    metric.update([torch.from_numpy(m).cuda() for m in predictions[4:]], references[4:])
    assert metric._counts.device.type == "cuda"
    assert_same_results(metric.compute(), reference_mean_iou(predictions, references, **options))
    uint8_maps = [
        [torch.from_numpy(m.clip(0, 255).astype(np.uint8)).cuda() for m in maps]
        for maps in (predictions, references)
    ]
    expected = reference_mean_iou(*[[m.cpu().numpy() for m in maps] for maps in uint8_maps], **options)
    assert_same_results(mean_iou(*uint8_maps, **options), expected)


def test_bad_inputs_are_named():
    maps = random_maps(10, [(4, 4), (3, 5)], (0, 4))
    with pytest.raises(
        ValueError, match=r"sample 1: prediction shape \(3, 5\) differs from reference shape \(5, 3\)"
    ):
        mean_iou(maps[0], [maps[1][0], maps[1][1].T], num_labels=4, ignore_index=255)
    with pytest.raises(TypeError, match=r"sample 0: predictions have dtype float32"):
        mean_iou([maps[0][0].astype(np.float32)], [maps[1][0]], num_labels=4, ignore_index=255)
    with pytest.raises(ValueError, match="2 prediction maps but 1 reference maps"):
        mean_iou(maps[0], maps[1][:1], num_labels=4, ignore_index=255)
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        MeanIoU(num_labels=0, ignore_index=255)
    with pytest.raises(ValueError, match="metric backend must be one of"):
        create_metric("sklearn", num_labels=4, ignore_index=255)


# evaluate --------------------------------------------------------------------------------------------


def test_evaluate_load_of_the_package_module_equals_mean_iou():
    import evaluate

    predictions, references = random_maps(11, MIXED_SIZES, (-2, 9))
    options = {"num_labels": 7, "ignore_index": 255, "label_map": {1: 2, 2: 1}, "reduce_labels": True}
    module = evaluate.load(EVALUATE_MODULE_PATH, keep_in_memory=True)
    module.add_batch(predictions=predictions[:2], references=references[:2])
    module.add_batch(predictions=[torch.from_numpy(m) for m in predictions[2:]], references=references[2:])
    assert_same_results(module.compute(**options), reference_mean_iou(predictions, references, **options))


def test_evaluate_backend_adapter_over_a_local_module_equals_mean_iou():
    predictions, references = random_maps(12, [(6, 6)] * 4, (0, 6))
    options = {"num_labels": 6, "ignore_index": 255, "nan_to_num": 0}
    metric = create_metric("evaluate", evaluate_path=EVALUATE_MODULE_PATH, **options)
    metric.update(torch.from_numpy(np.stack(predictions[:2])), torch.from_numpy(np.stack(references[:2])))
    metric.update(predictions[2:], references[2:])
    assert_same_results(metric.compute(), reference_mean_iou(predictions, references, **options))
    metric.update(predictions[:1], references[:1])
    metric.reset()
    metric.update(predictions[1:], references[1:])
    assert_same_results(metric.compute(), reference_mean_iou(predictions[1:], references[1:], **options))


def test_evaluate_backend_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    import evaluate

    # HF_HUB_OFFLINE=1 (conftest); an empty module cache, so no earlier download can stand in.
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    outcome = {}

    def load() -> None:
        try:
            create_metric("evaluate", num_labels=4, ignore_index=255)
        except Exception as error:  # handed to the test thread below
            outcome["error"] = error

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "loading evaluate's metric offline hung"
    error = outcome.get("error")
    assert isinstance(error, MetricBackendUnavailable), repr(error)
    assert "metric_backend: streaming" in str(error) and "HF_HUB_OFFLINE" in str(error)
    assert error.__cause__ is None and error.__suppress_context__  # no traceback from inside evaluate


def test_a_file_named_evaluate_py_hiding_the_library_is_reported(monkeypatch):
    # `python scripts/x.py` puts scripts/ first on sys.path, where scripts/evaluate.py is a module too.
    monkeypatch.setitem(sys.modules, "evaluate", types.ModuleType("evaluate"))
    with pytest.raises(MetricBackendUnavailable, match="not the evaluate library"):
        create_metric("evaluate", num_labels=4, ignore_index=255)


# The benchmark script ----------------------------------------------------------------------------------


def load_benchmark_script(repo_root: Path) -> types.ModuleType:
    specification = importlib.util.spec_from_file_location(
        "benchmark_metrics", repo_root / "scripts" / "benchmark_metrics.py"
    )
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module


def test_benchmark_reports_only_identical_results(repo_root, capsys, monkeypatch):
    benchmark = load_benchmark_script(repo_root)
    arguments = ["--num_maps", "3", "--size", "24", "--num_labels", "5", "--repeats", "1"]
    quick = [*arguments, "--threads", "1", "2", "--loads", "idle"]
    assert benchmark.main([*quick, "--evaluate_path", EVALUATE_MODULE_PATH]) == 0
    report = capsys.readouterr().out
    for dtype in ("uint8", "int64"):
        assert f"{dtype} maps: results identical to evaluate.load(" in report
        table = report.split(f"{dtype} maps: time in ms (speed-up")[1]
        assert "1 thread, idle" in table and "2 threads, idle" in table
        assert "segformer_hf MeanIoU" in table and "MeanIoU's torch kernel on CPU tensors" in table

    def off_by_one_pixel(predictions, references, **options):
        return mean_iou(
            [*predictions, np.zeros((1, 1), np.uint8)], [*references, np.ones((1, 1), np.uint8)], **options
        )

    monkeypatch.setattr(benchmark, "mean_iou", off_by_one_pixel)
    assert benchmark.main(quick) == 1  # against evaluate's cached module, or offline the reference
    captured = capsys.readouterr()
    assert "REFUSING TO REPORT: segformer_hf mean_iou (one call) differs" in captured.err
    assert "speed-up" not in captured.out


def test_benchmark_busy_load_runs_only_while_measuring_and_stops_by_itself(repo_root, capsys):
    benchmark = load_benchmark_script(repo_root)
    with benchmark.busy_machine(threads=1, seconds=60) as process:
        assert process.poll() is None  # running (it said "busy")
    assert process.poll() is not None  # stopped on leaving the block
    with benchmark.busy_machine(threads=1, seconds=0.5) as process:
        process.wait(timeout=60)  # the time bound ends it even if nobody stops it
    arguments = [
        "--num_maps",
        "2",
        "--size",
        "16",
        "--num_labels",
        "4",
        "--repeats",
        "1",
        "--dtypes",
        "uint8",
    ]
    assert benchmark.main([*arguments, "--threads", "2", "--loads", "busy", "--busy_threads", "1"]) == 0
    assert "2 threads, busy" in capsys.readouterr().out


# Two processes -----------------------------------------------------------------------------------------

DISTRIBUTED_OPTIONS = {"num_labels": 9, "ignore_index": 255, "label_map": {3: 4}, "reduce_labels": True}


def distributed_maps() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return random_maps(13, MIXED_SIZES + [(7, 4), (3, 3)], (-1, 12))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_sum_to_the_one_process_result(tmp_path, repo_root):
    command = [
        *accelerate_launch(2), "--main_process_port", str(free_port()), __file__, str(tmp_path),
    ]  # fmt: skip
    environment = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        command, cwd=repo_root, env=environment, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    expected = reference_mean_iou(*distributed_maps(), **DISTRIBUTED_OPTIONS)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"results_rank{rank}.json").read_text())
        assert results["maps_counted"] < len(distributed_maps()[0])  # each process saw only its part
        for backend in ("streaming", "evaluate"):
            assert_same_results({k: np.asarray(v) for k, v in results[backend].items()}, expected)


def _distributed_worker(output_dir: Path) -> None:
    """One of two processes: counts a disjoint part of the maps, then computes over both."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    predictions, references = distributed_maps()
    mine = slice(state.process_index, None, state.num_processes)
    results = {"maps_counted": len(predictions[mine])}
    for backend, extra in (("streaming", {}), ("evaluate", {"evaluate_path": EVALUATE_MODULE_PATH})):
        metric = create_metric(backend, **DISTRIBUTED_OPTIONS, **extra)
        metric.update(predictions[mine], references[mine])
        results[backend] = {key: np.asarray(value).tolist() for key, value in metric.compute().items()}
    (output_dir / f"results_rank{state.process_index}.json").write_text(json.dumps(results))
    state.wait_for_everyone()
    # Ended here, not by the interpreter's exit, where gloo's threads can abort the process (as the package's
    # own evaluation does: `evaluation.run_evaluation`).
    state.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(Path(sys.argv[1]))
