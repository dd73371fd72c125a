"""Losses: class-weighted cross-entropy, OHEM, soft Dice, binary segmentation, samples without labelled pixels.

References are PyTorch's own `F.cross_entropy(weight=...)`, transformers' SegformerForSemanticSegmentation
(same weights, via `to_transformers`), hand-computed cases, an OHEM written here from mmseg's
`OHEMPixelSampler` definition (sort-based, softmax probabilities) and a soft Dice written here from its
definition (a loop over classes and explicit sums), both sharing no code with the package.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_mean_iou import reference_mean_iou

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation, to_transformers
from segformer_hf.evaluation import evaluate_model, format_metrics_table
from segformer_hf.modeling_segformer_hf import weighted_hard_pixel_cross_entropy

IGNORE_INDEX = 255


def _tiny(**overrides) -> SegformerHFConfig:
    """B0 widths with one block per stage; no dropout or stochastic depth, so training mode is deterministic."""
    settings = {
        "depths": [1, 1, 1, 1],
        "hidden_sizes": [16, 32, 40, 64],
        "decoder_hidden_size": 32,
        "classifier_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    }
    return SegformerHFConfig(**{**settings, **overrides})


def _model(seed: int = 0, **overrides) -> SegformerHFForSemanticSegmentation:
    torch.manual_seed(seed)
    return SegformerHFForSemanticSegmentation(_tiny(**overrides))


def _labels(shape, num_labels: int, ignored_fraction: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignored_fraction
    return labels.masked_fill(ignored, IGNORE_INDEX)


def _upsampled(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _loss_and_logit_gradient(model, logits: torch.Tensor, labels: torch.Tensor):
    logits = logits.detach().clone().requires_grad_(True)
    loss = model.segmentation_loss(logits, labels)
    loss.backward()
    return loss.detach(), logits.grad


# Class weights ---------------------------------------------------------------------------------------------


def test_class_weighted_loss_and_gradient_equal_torch_weighted_cross_entropy():
    weights = [0.5, 2.0, 1.0, 4.0, 0.0]
    model = _model(num_labels=5, class_weights=weights)
    logits = torch.randn(2, 5, 9, 13, generator=torch.Generator().manual_seed(1))
    logits[:, 3] += 2.0  # the heavily weighted class is easy: the weighted mean is well below the plain one
    labels = _labels((2, 35, 51), 5, 0.2, seed=2)
    loss, gradient = _loss_and_logit_gradient(model, logits, labels)

    reference_logits = logits.double().requires_grad_(True)
    expected = F.cross_entropy(
        _upsampled(reference_logits, labels.shape[-2:]),
        labels,
        weight=torch.tensor(weights, dtype=torch.float64),
        ignore_index=IGNORE_INDEX,
    )
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient.double(), reference_logits.grad, rtol=1e-4, atol=1e-8)
    # The weighted mean is not the plain mean: the weights do something.
    plain = F.cross_entropy(_upsampled(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX)
    assert not torch.isclose(loss, plain, rtol=1e-2)


def test_class_weights_need_one_non_negative_weight_per_class():
    with pytest.raises(ValueError, match="one weight per class"):
        _tiny(num_labels=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        _tiny(num_labels=2, class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="single-label"):
        _tiny(num_labels=1, class_weights=[1.0])


def test_class_weights_and_ohem_survive_save_and_load(tmp_path):
    _tiny(num_labels=3, class_weights=[1, 2, 3], use_ohem=True, ohem_thresh=0.7).save_pretrained(tmp_path)
    loaded = SegformerHFConfig.from_pretrained(tmp_path)
    assert (loaded.class_weights, loaded.use_ohem, loaded.ohem_thresh, loaded.ohem_min_kept) == (
        [1.0, 2.0, 3.0],
        True,
        0.7,
        100000,
    )


# OHEM ------------------------------------------------------------------------------------------------------


def _reference_ohem(logits, labels, ignore_index, thresh, min_kept, class_weights=None):
    """mmseg's OHEMPixelSampler + cross-entropy, from its definition; returns (loss, kept).

    Per-image budget min_kept counts the images that have a labelled pixel; the loss sums the
    (class-weighted) cross-entropy over kept pixels and divides by the summed weights of all valid
    pixels (mmseg's reduction with avg_non_ignore=True).
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    probability = logits.softmax(dim=1).gather(1, safe[:, None])[:, 0]
    cross_entropy = -logits.log_softmax(dim=1).gather(1, safe[:, None])[:, 0]
    table = (
        torch.ones(logits.shape[1], dtype=logits.dtype)
        if class_weights is None
        else torch.tensor(class_weights, dtype=logits.dtype)
    )
    weight = table[safe] * valid
    budget = min_kept * sum(bool(valid[image].any()) for image in range(len(labels)))
    valid_probability = probability[valid].detach()
    kept_valid = torch.zeros(len(valid_probability), dtype=torch.bool)
    if thresh is not None:
        ascending = valid_probability.sort().values
        floor = ascending[min(budget, len(ascending) - 1)].item() if len(ascending) else 0.0
        kept_valid = valid_probability < max(floor, thresh)
    else:
        order = (weight * cross_entropy)[valid].detach().sort(descending=True).indices
        kept_valid[order[:budget]] = True
    kept = torch.zeros_like(valid)
    kept[valid] = kept_valid
    return (cross_entropy * weight * kept).sum() / weight.sum(), kept


def _two_class_logits_for(probabilities: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose class-1 probability is each given value (labels all 1)."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None, :, None, :]


@pytest.mark.parametrize(
    ("thresh", "min_kept", "kept_probabilities"),
    [
        (0.7, 1, [0.6, 0.5]),  # threshold 0.7 wins over the 2nd smallest probability 0.6
        (0.7, 3, [0.6, 0.5, 0.8]),  # the 4th smallest (0.9) raises the threshold: 3 pixels kept
        (0.7, 10, [0.9, 0.6, 0.5, 0.8]),  # budget past the end: all but the most confident (mmseg)
        (None, 2, [0.6, 0.5]),  # no threshold: the 2 largest losses
    ],
)
def test_ohem_keeps_the_pixels_of_a_hand_computed_case(thresh, min_kept, kept_probabilities):
    probabilities = [0.9, 0.6, 0.95, 0.5, 0.8, 0.99]
    logits = _two_class_logits_for(probabilities)
    labels = torch.tensor([[[1, 1, 1, 1, 1, IGNORE_INDEX]]])
    loss = weighted_hard_pixel_cross_entropy(
        logits, labels, IGNORE_INDEX, ohem_thresh=thresh, ohem_min_kept=min_kept
    )
    expected = -sum(math.log(p) for p in kept_probabilities) / 5  # divided by the 5 valid pixels
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("thresh", [0.7, 0.3, None])
@pytest.mark.parametrize("min_kept", [50, 400, 10000])
@pytest.mark.parametrize("class_weights", [None, [1.0, 3.0, 0.5, 2.0]])
def test_ohem_loss_and_gradient_equal_mmseg_definition(thresh, min_kept, class_weights):
    model = _model(
        num_labels=4, use_ohem=True, ohem_thresh=thresh, ohem_min_kept=min_kept, class_weights=class_weights
    )
    logits = 2.0 * torch.randn(3, 4, 10, 12, generator=torch.Generator().manual_seed(3))
    labels = _labels((3, 40, 48), 4, 0.25, seed=4)
    labels[1] = IGNORE_INDEX  # an image without a labelled pixel is no part of the budget
    loss, gradient = _loss_and_logit_gradient(model, logits, labels)

    reference_logits = logits.double().requires_grad_(True)
    expected, kept = _reference_ohem(
        _upsampled(reference_logits, labels.shape[-2:]), labels, IGNORE_INDEX, thresh, min_kept, class_weights
    )
    expected.backward()
    valid_count = int((labels != IGNORE_INDEX).sum())
    assert 0 < int(kept.sum()) <= valid_count
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient.double(), reference_logits.grad, rtol=1e-4, atol=1e-8)
    assert (gradient[1] == 0).all()


def test_ohem_without_threshold_keeping_every_pixel_is_the_plain_loss():
    model = _model(num_labels=3, use_ohem=True, ohem_min_kept=10**6)
    logits = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(5))
    labels = _labels((2, 24, 28), 3, 0.3, seed=6)
    expected = F.cross_entropy(_upsampled(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model.segmentation_loss(logits, labels), expected)


@pytest.mark.parametrize("thresh", [0.6, None])
def test_weighted_ohem_cross_entropy_passes_gradcheck(thresh):
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    labels = _labels((2, 4, 5), 3, 0.2, seed=8)

    def loss(logits):
        return weighted_hard_pixel_cross_entropy(
            logits, labels, IGNORE_INDEX, class_weights=[1.0, 2.0, 0.5], ohem_thresh=thresh, ohem_min_kept=6
        )

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(True),))


def test_ohem_options_are_checked():
    with pytest.raises(ValueError, match="use_ohem is false"):
        _tiny(num_labels=3, ohem_thresh=0.7)
    with pytest.raises(ValueError, match=r"probability in \(0, 1\]"):
        _tiny(num_labels=3, use_ohem=True, ohem_thresh=1.5)
    with pytest.raises(ValueError, match="positive number"):
        _tiny(num_labels=3, use_ohem=True, ohem_min_kept=0)
    with pytest.raises(ValueError, match="num_labels >= 2"):
        _tiny(num_labels=1, use_ohem=True)


# Soft Dice (cross-entropy + Dice, as nnU-Net) ---------------------------------------------------------------


def _reference_dice_loss(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: list[int]
) -> torch.Tensor:
    """1 - mean over `classes` of (2 sum p y + 1) / (sum p + sum y + 1), over the valid pixels of the batch."""
    valid = (labels != IGNORE_INDEX).flatten()
    scores = []
    for channel, class_id in enumerate(classes):
        p = probabilities[:, channel].flatten()[valid]
        y = (labels.flatten()[valid] == class_id).to(p.dtype)
        scores.append((2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    return 1 - sum(scores) / len(scores)


@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0, 3.0]])
def test_cross_entropy_plus_dice_loss_and_gradient_equal_the_definition(class_weights):
    model = _model(num_labels=4, class_weights=class_weights, dice_weight=0.7)
    logits = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(30))
    labels = _labels((2, 35, 51), 4, 0.2, seed=31)
    labels[labels == 3] = 2  # class 3 absent from the labels: its predicted mass alone lowers its Dice
    loss, gradient = _loss_and_logit_gradient(model, logits, labels)

    reference_logits = logits.double().requires_grad_(True)
    upsampled = _upsampled(reference_logits, labels.shape[-2:])
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)
    cross_entropy = F.cross_entropy(upsampled, labels, weight=weight, ignore_index=IGNORE_INDEX)
    dice = _reference_dice_loss(upsampled.softmax(dim=1), labels, [0, 1, 2, 3])
    expected = cross_entropy + 0.7 * dice
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient.double(), reference_logits.grad, rtol=1e-4, atol=1e-8)
    assert float(dice.detach()) > 0.05  # the term is there to be checked


def test_binary_dice_is_over_the_foreground_probability():
    model = _model(num_labels=1, dice_weight=2.0)
    logits = torch.randn(2, 1, 9, 13, generator=torch.Generator().manual_seed(32))
    labels = _labels((2, 35, 51), 2, 0.2, seed=33)
    loss, gradient = _loss_and_logit_gradient(model, logits, labels)

    reference_logits = logits.double().requires_grad_(True)
    upsampled = _upsampled(reference_logits, labels.shape[-2:])[:, 0]
    valid = labels != IGNORE_INDEX
    binary = F.binary_cross_entropy_with_logits(upsampled[valid], labels[valid].double())
    expected = binary + 2.0 * _reference_dice_loss(torch.sigmoid(upsampled)[:, None], labels, [1])
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient.double(), reference_logits.grad, rtol=1e-4, atol=1e-8)


def test_dice_of_a_confident_right_prediction_is_near_zero_and_of_a_wrong_one_near_one():
    model = _model(num_labels=3, dice_weight=1.0)
    labels = torch.tensor([[[0, 1, 1, 255], [0, 0, 1, 255]]])  # class 2 neither present nor predicted
    right = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 60.0
    wrong = right.roll(1, dims=1)  # class 0's pixels predict class 1, class 1's predict class 2
    ce_right = F.cross_entropy(right, labels, ignore_index=IGNORE_INDEX)
    assert abs(float(model.segmentation_loss(right, labels) - ce_right)) < 1e-6
    dice_wrong = float(model.segmentation_loss(wrong, labels)) - float(
        F.cross_entropy(wrong, labels, ignore_index=IGNORE_INDEX)
    )
    # No overlap anywhere. Class 0: 3 true pixels, none predicted, 1/(0+3+1); class 1: 3 true, 3 predicted,
    # 1/(3+3+1); class 2: absent, predicted on 3 pixels, 1/(3+0+1).
    assert dice_wrong == pytest.approx(1 - (1 / 4 + 1 / 7 + 1 / 4) / 3, abs=1e-5)


def test_dice_weight_is_checked_and_survives_save_and_load(tmp_path):
    with pytest.raises(ValueError, match="dice_weight"):
        _tiny(num_labels=3, dice_weight=-1.0)
    with pytest.raises(ValueError, match="dice_weight"):
        _tiny(num_labels=3, dice_weight=float("nan"))
    _tiny(num_labels=3, dice_weight=0.5).save_pretrained(tmp_path)
    assert SegformerHFConfig.from_pretrained(tmp_path).dice_weight == 0.5


# Binary segmentation ---------------------------------------------------------------------------------------


def _binary_pair(seed: int):
    model = _model(seed, num_labels=1).eval()
    reference = to_transformers(model).eval()
    return model, reference


def test_binary_loss_equals_transformers_segformer_loss_with_the_same_weights():
    model, reference = _binary_pair(seed=9)
    pixel_values = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(10))
    labels = torch.randint(0, 2, (2, 64, 80), generator=torch.Generator().manual_seed(11))
    inputs = {}
    losses = {}
    for name, network in (("ours", model), ("transformers", reference)):
        inputs[name] = pixel_values.clone().requires_grad_(True)
        output = network(pixel_values=inputs[name], labels=labels)
        assert output.logits.shape == (2, 1, 16, 20)
        output.loss.backward()
        losses[name] = output.loss.detach()
    torch.testing.assert_close(losses["ours"], losses["transformers"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inputs["ours"].grad, inputs["transformers"].grad, rtol=1e-4, atol=1e-9)


def test_binary_loss_with_ignored_pixels_is_transformers_loss_over_the_valid_fraction():
    # transformers divides the masked sum by every pixel; ours by the valid ones (as the multi-class loss).
    model, reference = _binary_pair(seed=12)
    pixel_values = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(13))
    labels = _labels((2, 64, 80), 2, 0.3, seed=14)
    valid_fraction = (labels != IGNORE_INDEX).double().mean()
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, labels=labels).loss.double()
        theirs = reference(pixel_values=pixel_values, labels=labels).loss.double()
    torch.testing.assert_close(ours * valid_fraction, theirs, rtol=1e-5, atol=1e-7)


def test_a_few_training_steps_on_a_binary_problem_decrease_the_loss():
    torch.manual_seed(15)
    model = _model(15, num_labels=1).train()
    pixel_values = torch.randn(4, 3, 32, 32)
    labels = (pixel_values[:, 0] > 0.3).long()  # foreground: a pixel-wise function of the image
    labels[:, :2] = IGNORE_INDEX
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_binary_evaluation_scores_background_and_foreground():
    model, _ = _binary_pair(seed=16)
    with torch.no_grad():
        model.decode_head.classifier.bias.fill_(0.05)  # some pixels of each class predicted
    pixel_values = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(17))
    labels = _labels((2, 32, 48), 2, 0.1, seed=18)
    results = evaluate_model(model, [{"pixel_values": pixel_values, "labels": labels}], 1, IGNORE_INDEX)

    with torch.no_grad():
        predictions = (_upsampled(model(pixel_values=pixel_values).logits, (32, 48))[:, 0] > 0).long()
    assert 0 < predictions.float().mean() < 1
    expected = reference_mean_iou(list(predictions.numpy()), list(labels.numpy()), 2, IGNORE_INDEX)
    assert len(results["per_category_iou"]) == 2
    np.testing.assert_allclose(results["per_category_iou"], expected["per_category_iou"])
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"])
    table = format_metrics_table(results, {0: "crack"})
    assert "background" in table and "crack" in table


# Samples without a labelled pixel (issue #13: skip_bad_samples trained an all-NaN model) --------------------


def test_an_all_ignored_zero_image_leaves_every_gradient_finite():
    # The reproduction from the issue: B0 from scratch, one all-zero image whose pixels are all ignored.
    torch.manual_seed(0)
    config = SegformerHFConfig.from_variant("b0", num_labels=11, semantic_loss_ignore_index=11)
    model = SegformerHFForSemanticSegmentation(config).train()
    pixel_values = torch.randn(2, 3, 160, 160)
    pixel_values[0] = 0
    pixel_values.requires_grad_(True)
    labels = torch.randint(0, 11, (2, 160, 160))
    labels[0] = 11
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert sum(int((~torch.isfinite(p.grad)).sum()) for p in model.parameters()) == 0
    assert (pixel_values.grad[0] == 0).all() and (pixel_values.grad[1] != 0).any()


def _gradients_and_statistics(model, pixel_values, labels):
    model.zero_grad()
    norm = model.decode_head.batch_norm
    norm.reset_running_stats()
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), gradients, (norm.running_mean.clone(), norm.running_var.clone())


@pytest.mark.parametrize(
    "loss_options",
    [
        {"num_labels": 4},
        {"num_labels": 4, "class_weights": [1.0, 2.0, 0.5, 1.5]},
        {"num_labels": 4, "use_ohem": True, "ohem_thresh": 0.4, "ohem_min_kept": 30},
        {"num_labels": 4, "dice_weight": 1.0},
        {"num_labels": 1},
        {"num_labels": 1, "dice_weight": 1.0},
    ],
    ids=["cross_entropy", "class_weights", "ohem", "dice", "binary", "binary_dice"],
)
def test_a_placeholder_sample_changes_neither_loss_nor_gradients_nor_batchnorm_statistics(loss_options):
    # The loss is a mean over valid pixels and the placeholder has none, so the batch with it must give the
    # very loss and gradients of the batch without it (no renormalisation by the batch size).
    model = _model(19, **loss_options).train()
    pixel_values = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(20))
    labels = _labels((2, 48, 64), max(loss_options["num_labels"], 2), 0.2, seed=21)
    placeholder_image = torch.zeros(1, 3, 48, 64)
    placeholder_label = torch.full((1, 48, 64), IGNORE_INDEX)
    with_placeholder = (
        torch.cat([pixel_values[:1], placeholder_image, pixel_values[1:]]),
        torch.cat([labels[:1], placeholder_label, labels[1:]]),
    )
    loss, gradients, statistics = _gradients_and_statistics(model, pixel_values, labels)
    loss_with, gradients_with, statistics_with = _gradients_and_statistics(model, *with_placeholder)

    torch.testing.assert_close(loss_with, loss, rtol=1e-6, atol=1e-7)
    # Biases right before a normalisation have a gradient of zero up to rounding: compare to the largest.
    atol = 1e-5 * max(float(gradient.abs().max()) for gradient in gradients.values())
    for name, gradient in gradients.items():
        assert torch.isfinite(gradients_with[name]).all(), name
        torch.testing.assert_close(gradients_with[name], gradient, rtol=1e-4, atol=atol, msg=name)
    torch.testing.assert_close(statistics_with, statistics, rtol=1e-5, atol=1e-7)


def test_a_batch_without_labelled_pixels_has_zero_gradient_and_keeps_the_running_statistics():
    model = _model(22, num_labels=4).train()
    norm = model.decode_head.batch_norm
    norm.running_mean.fill_(0.25)
    norm.running_var.fill_(2.0)
    pixel_values = torch.zeros(2, 3, 48, 64)
    labels = torch.full((2, 48, 64), IGNORE_INDEX)
    output = model(pixel_values=pixel_values, labels=labels)
    assert math.isnan(output.loss.item())  # 0/0, as F.cross_entropy
    output.loss.backward()
    assert all((p.grad == 0).all() for p in model.parameters())
    assert (norm.running_mean == 0.25).all() and (norm.running_var == 2.0).all()
