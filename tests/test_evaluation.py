"""scripts/evaluate_model.py: a saved model on a dataset split, checked against predictions made by hand."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, REPO_ROOT, accelerate_launch
from PIL import Image
from reference_mean_iou import reference_mean_iou

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation

pytestmark = pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="bundled demo data missing")

NUM_SAMPLES = 5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A randomly initialised B0 with the demo's 11 classes; random BatchNorm statistics make it less uniform."""
    torch.manual_seed(0)
    id2label = json.loads((DEMO_DATA / "classes.json").read_text())["id2label"]
    config = SegformerHFConfig.from_variant(
        "b0", num_labels=11, id2label=id2label, semantic_loss_ignore_index=11
    )
    model = SegformerHFForSemanticSegmentation(config).eval()
    model.decode_head.batch_norm.running_mean.normal_(0, 0.5)
    model.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory, model


def _evaluate(model_dir, output, *extra, launcher=(sys.executable,)):
    command = [
        *launcher,
        "scripts/evaluate_model.py",
        "--model", str(model_dir),
        "--data_dir", str(DEMO_DATA),
        "--split", "val",
        "--max_samples", str(NUM_SAMPLES),
        "--num_workers", "0",
        "--output", str(output),
        *extra,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result


def _by_hand(model, scale=None):
    """Predictions made without the package's data or inference code: PIL resize, normalise, upsample, argmax."""
    predictions, labels = [], []
    for image_path in sorted((DEMO_DATA / "val" / "images").iterdir())[:NUM_SAMPLES]:
        image = Image.open(image_path).convert("RGB")
        label = np.asarray(Image.open(DEMO_DATA / "val" / "labels" / f"{image_path.stem}.png"))
        if scale is not None:
            long_side, short_side = scale
            factor = min(long_side / max(image.size), short_side / min(image.size))
            image = image.resize(
                (int(image.width * factor + 0.5), int(image.height * factor + 0.5)), Image.BILINEAR
            )
        pixels = (np.asarray(image, dtype=np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        pixel_values = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            logits = model(pixel_values).logits
        upsampled = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        predictions.append(upsampled.argmax(1)[0].numpy())
        labels.append(label)
    return predictions, labels


def test_whole_image_evaluation_equals_mean_iou_of_predictions_made_by_hand(saved_model, tmp_path):
    model_dir, model = saved_model
    results, run = _evaluate(model_dir, tmp_path / "whole.json")
    expected = reference_mean_iou(*_by_hand(model), num_labels=11, ignore_index=11)
    assert results["num_samples"] == NUM_SAMPLES and results["world_size"] == 1
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-9)
    assert results["overall_accuracy"] == pytest.approx(expected["overall_accuracy"], abs=1e-9)
    np.testing.assert_allclose(
        np.array(results["per_category_iou"], dtype=float), expected["per_category_iou"], atol=1e-9
    )
    assert "mean IoU" in run.stdout and "Road" in run.stdout


def test_sliding_window_with_one_window_over_the_image_equals_whole_image(saved_model, tmp_path):
    model_dir, _ = saved_model
    whole, _ = _evaluate(model_dir, tmp_path / "whole.json")
    # The demo images are 180x240: a window of exactly that size is one window per image (default stride).
    slide, _ = _evaluate(model_dir, tmp_path / "slide.json", "--mode", "slide", "--crop_size", "180", "240")
    assert slide["mean_iou"] == pytest.approx(whole["mean_iou"], abs=1e-9)
    assert slide["per_category_iou"] == pytest.approx(whole["per_category_iou"], nan_ok=True, abs=1e-9)


TWO_PROCESSES = tuple(accelerate_launch(2))


def test_two_process_evaluation_equals_one_process(saved_model, tmp_path):
    model_dir, _ = saved_model
    single, _ = _evaluate(model_dir, tmp_path / "one.json", "--img_scale", "160", "120")
    double, _ = _evaluate(
        model_dir, tmp_path / "two.json", "--img_scale", "160", "120", launcher=TWO_PROCESSES
    )
    assert double["world_size"] == 2 and double["num_samples"] == NUM_SAMPLES
    assert double["mean_iou"] == pytest.approx(single["mean_iou"], abs=1e-9)
    assert double["per_category_iou"] == pytest.approx(single["per_category_iou"], nan_ok=True, abs=1e-9)


def test_two_process_evaluation_ends_its_process_group_before_the_interpreter_exits(saved_model, tmp_path):
    """Left to the interpreter's exit, gloo's threads may free the last collective's tensors while Python
    finalises, which aborts the process (one rank died of SIGABRT in CI)."""
    model_dir, _ = saved_model
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import atexit, sys\n"
        "import torch.distributed\n"
        "from segformer_hf import evaluation\n"
        "atexit.register(lambda: print(f'group alive at exit: {torch.distributed.is_initialized()}', flush=True))\n"
        "sys.exit(evaluation.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [*TWO_PROCESSES, str(probe), "--model", str(model_dir), "--data_dir", str(DEMO_DATA), "--split", "val",
         "--max_samples", "2", "--num_workers", "0", "--img_scale", "80", "60"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("group alive at exit: False") == 2, result.stdout[-3000:]


def test_a_missing_split_is_a_clear_error(saved_model, tmp_path):
    model_dir, _ = saved_model
    result = subprocess.run(
        [sys.executable, "scripts/evaluate_model.py", "--model", str(model_dir), "--data_dir", str(DEMO_DATA),
         "--split", "test"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no split 'test'" in result.stderr and "val" in result.stderr


class _BatchSensitiveModel(torch.nn.Module):
    """Two classes; the class-1 logit shifts a little with the batch size, as batched matrix products' rounding
    does (exaggerated), so that a prediction made in a batch could differ from the same image's alone."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 2})()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, return_dict=True):
        class_one = pixel_values.mean(1) + 0.01 * (len(pixel_values) - 1)
        return type("Output", (), {"logits": torch.stack([torch.zeros_like(class_one), class_one], 1)})()


def test_evaluation_numbers_do_not_depend_on_the_batch_size():
    from segformer_hf.evaluation import evaluate_model

    generator = torch.Generator().manual_seed(0)
    # Pixel means within 0.01 below zero: class 0 alone, class 1 whenever a batch shift is added.
    images = -0.01 * torch.rand(4, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 2, (4, 8, 8), generator=generator)
    model = _BatchSensitiveModel()
    one_by_one = [{"pixel_values": images[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]
    batched = [{"pixel_values": images[i : i + 2], "labels": labels[i : i + 2]} for i in (0, 2)]
    alone = evaluate_model(model, one_by_one, num_labels=2, ignore_index=255)
    together = evaluate_model(model, batched, num_labels=2, ignore_index=255)
    assert alone["per_category_accuracy"][0] == 1.0  # every pixel predicted 0: the shift never applied
    assert together == alone
