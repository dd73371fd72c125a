"""Inference modes against references written here from their definitions (mmseg's slide/TTA semantics)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf.files import write_atomic, write_json_atomic
from segformer_hf.inference import (
    InferenceProtocol,
    predict_multiscale,
    predict_scores,
    predict_slide,
    predict_whole,
    scaled_image_size,
    segment,
)
from segformer_hf.visualization import colorize, default_palette, overlay, render_legend, resolve_palette

NUM_LABELS = 5


def tiny_segformer(num_labels: int = NUM_LABELS, seed: int = 0) -> SegformerHFForSemanticSegmentation:
    torch.manual_seed(seed)
    config = SegformerHFConfig(
        hidden_sizes=(8, 16, 24, 32),
        num_attention_heads=(1, 1, 1, 1),
        depths=(1, 1, 1, 1),
        decoder_hidden_size=16,
        num_labels=num_labels,
    )
    return SegformerHFForSemanticSegmentation(config).eval()


class PointwiseSegmenter(nn.Module):
    """Logits are a 1x1 convolution of (optionally average-pooled) pixels.

    Without pooling the logits are exactly translation-equivariant; with pooling by p they are exactly
    mirror-equivariant for widths divisible by p. SegFormer is neither, so these properties of the
    inference machinery need this stand-in.
    """

    def __init__(self, num_labels: int = NUM_LABELS, pool: int = 1):
        super().__init__()
        torch.manual_seed(1)
        self.config = SimpleNamespace(num_labels=num_labels)
        self.pool = pool
        self.classifier = nn.Conv2d(3, num_labels, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> SemanticSegmenterOutput:
        pooled = F.avg_pool2d(pixel_values, self.pool) if self.pool > 1 else pixel_values
        return SemanticSegmenterOutput(logits=self.classifier(pooled))


def upsample(tensor: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)


def reference_slide(model, pixel_values, crop, stride):
    """Sliding window from its definition, one image and one window at a time."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    batch, _, height, width = pixel_values.shape
    padded = F.pad(pixel_values, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    padded_h, padded_w = padded.shape[-2:]
    # Window origins: every stride strictly before the last possible origin, plus that last origin.
    tops = sorted(set(range(0, padded_h - crop_h, stride_h)) | {padded_h - crop_h})
    lefts = sorted(set(range(0, padded_w - crop_w, stride_w)) | {padded_w - crop_w})
    results = []
    for index in range(batch):
        total = torch.zeros(1, NUM_LABELS, padded_h, padded_w)
        count = torch.zeros(1, 1, padded_h, padded_w)
        for top in tops:
            for left in lefts:
                window = padded[index : index + 1, :, top : top + crop_h, left : left + crop_w]
                with torch.no_grad():
                    logits = upsample(model(pixel_values=window).logits, (crop_h, crop_w))
                total[:, :, top : top + crop_h, left : left + crop_w] += logits
                count[:, :, top : top + crop_h, left : left + crop_w] += 1
        results.append(total[:, :, :height, :width] / count[:, :, :height, :width])
    return torch.cat(results)


@pytest.fixture(scope="module")
def model():
    return tiny_segformer()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(2, 3, 64, 96)


def test_whole_inference_is_the_logits_upsampled_to_the_output_size(model, images):
    with torch.no_grad():
        expected = upsample(model(pixel_values=images).logits, (50, 70))
    torch.testing.assert_close(predict_whole(model, images, (50, 70)), expected, rtol=0, atol=0)


def test_slide_with_one_window_covering_the_image_equals_whole_inference(model, images):
    slide = predict_slide(model, images, NUM_LABELS, crop_size=(64, 96), stride=(32, 48))
    torch.testing.assert_close(slide, predict_whole(model, images), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("crop", "stride", "window_batch_size"),
    [
        ((32, 32), (32, 32), 1),  # windows tile the image exactly
        ((32, 48), (32, 24), 3),  # overlapping windows, a batch that splits the windows unevenly
        ((40, 56), (24, 20), 100),  # strides that do not divide: last windows flush with the border
    ],
)
def test_slide_equals_an_independent_window_loop(model, images, crop, stride, window_batch_size):
    expected = reference_slide(model, images, crop, stride)
    actual = predict_slide(model, images, NUM_LABELS, crop, stride, window_batch_size=window_batch_size)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_slide_zero_pads_an_image_smaller_than_the_crop(model):
    torch.manual_seed(3)
    small = torch.randn(1, 3, 40, 100)
    expected = reference_slide(model, small, (64, 64), (48, 48))
    actual = predict_slide(model, small, NUM_LABELS, (64, 64), (48, 48))
    assert actual.shape == (1, NUM_LABELS, 40, 100)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_slide_of_a_translation_equivariant_model_equals_whole_inference_for_any_windows(images):
    pointwise = PointwiseSegmenter(pool=1)
    whole = predict_whole(pointwise, images)
    for crop, stride in [((32, 32), (32, 32)), ((24, 40), (7, 13)), ((64, 96), (1, 1))]:
        torch.testing.assert_close(predict_slide(pointwise, images, None, crop, stride), whole)


def test_slide_rejects_a_stride_that_would_leave_gaps(model, images):
    with pytest.raises(ValueError, match="stride"):
        predict_slide(model, images, NUM_LABELS, crop_size=32, stride=40)


def test_flip_on_a_mirror_symmetric_input_equals_no_flip():
    mirror_equivariant = PointwiseSegmenter(pool=4)
    torch.manual_seed(4)
    half = torch.randn(1, 3, 32, 24)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    flipped = predict_multiscale(mirror_equivariant, symmetric, [1.0], flip=True)
    plain = predict_multiscale(mirror_equivariant, symmetric, [1.0], flip=False)
    torch.testing.assert_close(flipped, plain)


def test_flip_averages_softmax_of_the_view_and_of_the_mirrored_view_mirrored_back(model, images):
    with torch.no_grad():
        logits = upsample(model(pixel_values=images).logits, images.shape[-2:])
        mirrored = upsample(model(pixel_values=images.flip(-1)).logits, images.shape[-2:]).flip(-1)
    expected_probabilities = (logits.softmax(1) + mirrored.softmax(1)) / 2
    torch.testing.assert_close(predict_multiscale(model, images, [1.0], flip=True), expected_probabilities)


def test_multiscale_with_scale_one_and_no_flip_equals_whole(model, images):
    whole = predict_whole(model, images, (50, 70))
    torch.testing.assert_close(
        predict_multiscale(model, images, [1.0], output_size=(50, 70)), whole.softmax(1)
    )


def test_multiscale_resizes_each_view_and_resizes_its_scores_back(model, images):
    output_size = (64, 96)
    expected = 0
    for size in [(32, 48), (96, 144)]:
        with torch.no_grad():
            logits = model(pixel_values=upsample(images, size)).logits
        expected = expected + upsample(logits, output_size).softmax(1)
    actual = predict_multiscale(model, images, [0.5, 1.5], output_size=output_size)
    torch.testing.assert_close(actual, expected / 2)


def test_multiscale_slide_runs_the_sliding_window_on_each_scaled_view(model, images):
    expected = upsample(reference_slide(model, upsample(images, (96, 144)), (48, 48), (32, 32)), (64, 96))
    actual = predict_multiscale(
        model, images, [1.5], mode="slide", crop_size=48, stride=32, window_batch_size=5
    )
    expected = expected.softmax(1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_aligned_resize_rounds_each_scaled_side_up_to_the_divisor():
    assert scaled_image_size((100, 150), 0.5) == (50, 75)
    assert scaled_image_size((100, 150), 0.5, size_divisor=32) == (64, 96)
    assert scaled_image_size((512, 683), 1.0, size_divisor=32) == (512, 704)
    assert scaled_image_size((360, 480), 0.75) == (270, 360)


@pytest.mark.parametrize("input_size", [(64, 96), (37, 53)])
@pytest.mark.parametrize("output_size", [(64, 96), (41, 59), (120, 7)])
@pytest.mark.parametrize(
    "options",
    [
        {"mode": "whole"},
        {"mode": "slide", "crop_size": 48, "stride": 32},
        {"mode": "whole", "scales": [0.5, 1.25], "flip": True, "size_divisor": 32},
        {"mode": "slide", "crop_size": 32, "stride": 16, "scales": [0.75], "flip": True},
    ],
)
def test_scores_always_have_the_requested_output_size(model, input_size, output_size, options):
    pixel_values = torch.randn(2, 3, *input_size)
    scores, _ = predict_scores(model, pixel_values, output_size, InferenceProtocol(**options))
    assert scores.shape == (2, NUM_LABELS, *output_size)
    assert scores.dtype == torch.float32


def test_lower_precision_models_and_autocast_return_float32_scores_close_to_full_precision(images):
    full = predict_whole(tiny_segformer(), images)
    half_model = tiny_segformer().to(torch.bfloat16)
    for scores in (
        predict_whole(half_model, images),
        predict_whole(tiny_segformer(), images, autocast_dtype=torch.bfloat16),
    ):
        assert scores.dtype == torch.float32
        assert (scores.argmax(1) == full.argmax(1)).float().mean() > 0.9


def test_segment_returns_the_argmax_label_map_at_each_image_size(model):
    rng = np.random.default_rng(5)
    arrays = [
        rng.integers(0, 256, (30, 45, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 32, 3), dtype=np.uint8),
    ]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model.train()
    label_maps = segment(model, [arrays[0], Image.fromarray(arrays[1])], (mean, std))
    assert model.training, "segment must restore the model's training mode"
    model.eval()
    for array, label_map in zip(arrays, label_maps):
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
        normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = upsample(model(pixel_values=normalised).logits, array.shape[:2]).argmax(1)[0]
        assert label_map.shape == array.shape[:2]
        np.testing.assert_array_equal(label_map, expected.numpy())


def test_segment_with_an_image_processor_predicts_at_the_original_size(model):
    from transformers import SegformerImageProcessor

    processor = SegformerImageProcessor(size={"height": 64, "width": 64})
    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = upsample(model(pixel_values=pixel_values).logits, (30, 50)).argmax(1)[0].numpy()
    (label_map,) = segment(model, image, processor)
    np.testing.assert_array_equal(label_map, expected)


def test_a_single_label_model_predicts_foreground_where_the_logit_is_positive():
    binary = tiny_segformer(num_labels=1)
    pixel_values = torch.randn(1, 3, 32, 32)
    logits = predict_whole(binary, pixel_values)
    (label_map,) = segment(binary, (pixel_values[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())
    assert set(np.unique(label_map)) <= {0, 1}
    probabilities, are_probabilities = predict_scores(
        binary, pixel_values, protocol=InferenceProtocol(flip=True)
    )
    assert are_probabilities and probabilities.min() >= 0 and probabilities.max() <= 1
    assert logits.shape == (1, 1, 32, 32)


# Visualisation and files ----------------------------------------------------------------------------------


def test_default_palette_is_deterministic_and_distinct_for_256_classes():
    palette = default_palette(256)
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert len({tuple(colour) for colour in palette}) == 256
    np.testing.assert_array_equal(palette[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]])
    np.testing.assert_array_equal(default_palette(256), palette)


def test_palette_comes_from_a_classes_file_then_the_config_then_the_default(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"palette_rgb": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}))
    np.testing.assert_array_equal(resolve_palette(2, classes_file=classes), [[1, 2, 3], [4, 5, 6]])
    config = SimpleNamespace(palette=[[9, 9, 9], [8, 8, 8]])
    np.testing.assert_array_equal(resolve_palette(2, config=config), [[9, 9, 9], [8, 8, 8]])
    np.testing.assert_array_equal(resolve_palette(4, config=SimpleNamespace()), default_palette(4))
    with pytest.raises(ValueError, match="2 colours for 3 classes"):
        resolve_palette(3, config=config)
    classes.write_text(json.dumps({"palette": [[0, 0, 300]]}))
    with pytest.raises(ValueError, match="outside 0..255"):
        resolve_palette(1, classes_file=classes)


def test_colour_mask_and_overlay_keep_the_class_ids_and_blend_with_alpha():
    palette = default_palette(4)
    label_map = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    mask = colorize(label_map, palette)
    np.testing.assert_array_equal(np.asarray(mask), label_map)
    np.testing.assert_array_equal(np.asarray(mask.convert("RGB")), palette[label_map])
    image = Image.fromarray(np.full((2, 4, 3), 200, dtype=np.uint8))
    blended = np.asarray(overlay(image, label_map, palette, alpha=0.25)).astype(float)
    expected = 0.75 * 200 + 0.25 * palette[label_map].astype(float)
    assert np.abs(blended - expected).max() <= 1
    with pytest.raises(ValueError, match="palette has 4 colours"):
        colorize(np.array([[4]]), palette)


def test_legend_has_one_swatch_row_per_class_in_its_colour():
    palette = default_palette(3) + 10
    legend = np.asarray(render_legend({0: "road", 1: "sky", 2: "a rather long class name"}, palette))
    for colour in palette:
        assert (legend == colour).all(axis=-1).sum() >= 10 * 10
    assert np.asarray(render_legend({0: "a"}, palette[:1])).shape[0] < legend.shape[0]


def test_atomic_writes_leave_nothing_behind_on_failure_and_write_nan_as_null(tmp_path):
    target = tmp_path / "result.json"

    def failing_writer(path):
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, failing_writer)
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"iou": [0.5, float("nan")], "mean": np.float32(0.25)})
    assert json.loads(target.read_text()) == {"iou": [0.5, None], "mean": 0.25}
