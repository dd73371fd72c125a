"""scripts/benchmark_training.py: a tiny time-to-accuracy run of both models (a budget of seconds), its clock,
its JSON and its plot."""

import importlib.util
import json
import time

import pytest
from conftest import REPO_ROOT
from PIL import Image

BUDGET_MINUTES = 0.05
TINY = [
    "--crop_size", "64", "64", "--img_scale", "120", "90", "--max_train_samples", "8", "--max_eval_samples", "4",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--dataloader_num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "benchmark_training", REPO_ROOT / "scripts" / "benchmark_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_clock_stops_while_evaluating(script):
    clock = script.TrainingClock()
    time.sleep(0.05)
    clock.pause()
    time.sleep(0.3)
    assert clock.seconds() < 0.3
    clock.resume()
    assert 0.3 <= clock.paused_seconds < 0.6
    assert 0.05 <= clock.seconds() < 0.3


@pytest.mark.parametrize(
    ("maximum", "ticks"),
    [
        (10.0071, [0, 2, 4, 6, 8, 10]),  # a 10-minute budget, a few milliseconds over
        (0.4, [0, 0.1, 0.2, 0.3, 0.4]),
        (45.3, [0, 10, 20, 30, 40]),
        (0.05, [0, 0.01, 0.02, 0.03, 0.04, 0.05]),
    ],
)
def test_plot_axes_are_ticked_at_round_values_within_the_data(script, maximum, ticks):
    assert script.axis_ticks(maximum) == pytest.approx(ticks)


def test_both_models_train_for_the_budget_from_the_same_weights_and_write_json_and_png(script, tmp_path):
    output_dir = tmp_path / "bench"
    started = time.perf_counter()
    argv = ["--budget_minutes", str(BUDGET_MINUTES), "--models", "ours", "transformers", "--eval_every_steps", "2",
            "--output_dir", str(output_dir), *TINY]  # fmt: skip
    assert script.main(argv) == 0
    wall = time.perf_counter() - started

    report = json.loads((output_dir / "curve.json").read_text())
    runs = report["runs"]
    assert runs["ours"]["model_class"] == "SegformerHFForSemanticSegmentation"
    assert runs["transformers"]["model_class"] == "SegformerForSemanticSegmentation"
    # Converted from our freshly initialised model: the same weights give the same first evaluation.
    assert runs["ours"]["points"][0]["mean_iou"] == pytest.approx(
        runs["transformers"]["points"][0]["mean_iou"], abs=1e-6
    )
    budget = BUDGET_MINUTES * 60
    for run in runs.values():
        points = run["points"]
        assert points[0]["step"] == 0 and points[0]["train_seconds"] < 0.05  # before the first step
        assert [p["step"] for p in points] == sorted({p["step"] for p in points}) and len(points) >= 3
        assert all(a["train_seconds"] <= b["train_seconds"] for a, b in zip(points, points[1:]))
        assert run["stopped_by"] == "budget" and budget <= run["train_seconds"] == points[-1]["train_seconds"]
        assert run["eval_seconds"] > 0 and all(0 <= p["mean_iou"] <= 1 for p in points)
    # Training and evaluation clocks are disjoint parts of the wall time.
    assert sum(run["train_seconds"] + run["eval_seconds"] for run in runs.values()) < wall

    plot = Image.open(output_dir / "curve.png").convert("RGB")
    assert plot.size == (script.WIDTH, script.HEIGHT)
    colours = {colour for _, colour in plot.getcolors(maxcolors=1 << 16)}
    assert set(script.COLOURS.values()) <= colours
