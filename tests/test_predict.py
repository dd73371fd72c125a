"""scripts/predict.py: colour masks whose pixel values are the predicted classes, overlays and a legend."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, REPO_ROOT
from PIL import Image
from transformers import SegformerImageProcessor

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation

pytestmark = pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="bundled demo data missing")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(SegformerHFConfig.from_variant("b0", num_labels=11)).eval()
    model.decode_head.batch_norm.running_mean.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    processor = SegformerImageProcessor(size={"height": 96, "width": 128})
    processor.save_pretrained(directory)
    return directory, model, processor


def _predict(*arguments):
    return subprocess.run(
        [sys.executable, "scripts/predict.py", *map(str, arguments)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_masks_hold_the_classes_predicted_through_transformers_image_processor(saved_model, tmp_path):
    directory, model, processor = saved_model
    images = sorted((DEMO_DATA / "val" / "images").iterdir())[:2]
    result = _predict("--model", directory, *images, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "legend.png").is_file()
    for path in images:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            logits = model(processor(image, return_tensors="pt")["pixel_values"]).logits
        expected = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False).argmax(
            1
        )[0]
        mask = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_mask.png"))
        assert mask.shape == image.size[::-1]
        # Ties between near-equal logits may flip a handful of pixels across implementations.
        assert (mask == expected.numpy()).mean() > 0.999
        assert Image.open(tmp_path / "out" / f"{path.stem}_overlay.png").size == image.size


def test_a_file_that_is_not_an_image_stops_before_anything_is_written(saved_model, tmp_path):
    directory, _, _ = saved_model
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    good = sorted((DEMO_DATA / "val" / "images").iterdir())[0]
    result = _predict("--model", directory, good, bogus, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert "notes.png" in result.stderr and "not a readable image" in result.stderr
    assert not (tmp_path / "out").exists()
