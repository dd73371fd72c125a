"""The from-scratch SegFormer: published sizes, shapes on odd inputs, losses, transformers plumbing.

Every expectation here is computed in the test from the paper's definitions or by transformers' own
implementation, never read back from our model's output.
"""

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    SegformerModel,
    pipeline,
)

from segformer_hf import (
    SegformerHFConfig,
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
    to_transformers,
)

# Xie et al. 2021, "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
# section 3 and appendix table 6: per-stage widths C_i and depths L_i of MiT-B0..B5, and the decoder width C.
PAPER_VARIANTS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# Shared by all six: heads N_i, reduction ratios R_i, MLP expansion E_i, patch kernels K_i and strides S_i.
PAPER_SHARED = {
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1],
    "mlp_ratios": [4, 4, 4, 4],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
}
ODD_SIZES = [(65, 97), (203, 317)]
IGNORE_INDEX = 255


def _stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes after each overlapping patch embedding (kernel K, stride S, padding K//2)."""
    sizes = []
    for kernel, stride in zip(PAPER_SHARED["patch_sizes"], PAPER_SHARED["strides"]):
        height = (height + 2 * (kernel // 2) - kernel) // stride + 1
        width = (width + 2 * (kernel // 2) - kernel) // stride + 1
        sizes.append((height, width))
    return sizes


def _b0(**overrides) -> SegformerHFConfig:
    return SegformerHFConfig.from_variant("b0", **overrides)


def _tiny(**overrides) -> SegformerHFConfig:
    """B0 widths with one block per stage: the cheapest config that still has all four stages."""
    return SegformerHFConfig(
        **{"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 40, 64], "decoder_hidden_size": 32, **overrides}
    )


def _labels(batch: int, height: int, width: int, num_labels: int, ignored_fraction: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (batch, height, width), generator=generator)
    ignored = torch.rand(batch, height, width, generator=generator) < ignored_fraction
    return labels.masked_fill(ignored, IGNORE_INDEX), ignored


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(PAPER_VARIANTS))
def test_variant_builds_with_the_published_sizes(variant):
    config = SegformerHFConfig.from_variant(variant, num_labels=150)
    expected = {**PAPER_VARIANTS[variant], **PAPER_SHARED}
    assert {name: list(getattr(config, name)) for name in expected if name != "decoder_hidden_size"} == {
        name: value for name, value in expected.items() if name != "decoder_hidden_size"
    }
    assert config.decoder_hidden_size == expected["decoder_hidden_size"]

    with torch.device("meta"):
        model = SegformerHFForSemanticSegmentation(config)
    previous_width = 3
    for stage, module in enumerate(model.segformer.stages):
        width = expected["hidden_sizes"][stage]
        embedding = module.patch_embeddings.projection
        assert (embedding.in_channels, embedding.out_channels) == (previous_width, width)
        assert embedding.kernel_size == (expected["patch_sizes"][stage],) * 2
        assert embedding.stride == (expected["strides"][stage],) * 2
        assert len(module.layers) == expected["depths"][stage]
        for layer in module.layers:
            assert layer.attention.num_heads == expected["num_attention_heads"][stage]
            ratio = expected["sr_ratios"][stage]
            if ratio == 1:
                assert layer.attention.reduction is None
            else:
                assert layer.attention.reduction.conv.kernel_size == (ratio, ratio)
                assert layer.attention.reduction.conv.stride == (ratio, ratio)
            assert layer.mix_ffn.fc1.out_features == expected["mlp_ratios"][stage] * width
        previous_width = width
    for stage, projection in enumerate(model.decode_head.stage_projections):
        assert (projection.in_features, projection.out_features) == (
            expected["hidden_sizes"][stage],
            expected["decoder_hidden_size"],
        )
    assert model.decode_head.classifier.out_channels == 150


@pytest.mark.parametrize("variant", sorted(PAPER_VARIANTS))
def test_variant_parameter_counts_equal_transformers_segformer(variant):
    sizes = {**PAPER_VARIANTS[variant], **PAPER_SHARED}
    reference_config = SegformerConfig(**sizes, num_labels=150)
    ours_config = SegformerHFConfig.from_variant(variant, num_labels=150)
    pairs = [
        (SegformerHFForSemanticSegmentation, SegformerForSemanticSegmentation),
        (SegformerHFForImageClassification, SegformerForImageClassification),
        (SegformerHFModel, SegformerModel),
    ]
    # Meta tensors have shapes but no storage: building B5 this way takes milliseconds.
    with torch.device("meta"):
        for ours_class, reference_class in pairs:
            ours, reference = ours_class(ours_config), reference_class(reference_config)
            assert _count(ours) == _count(reference), ours_class.__name__
            ours_buffers = sum(buffer.numel() for buffer in ours.buffers())
            assert ours_buffers == sum(buffer.numel() for buffer in reference.buffers()), ours_class.__name__


def test_unknown_variant_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="b6") as error:
        SegformerHFConfig.from_variant("b6")
    for valid in PAPER_VARIANTS:
        assert valid in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Shapes, gradients, hidden states, tuples
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_forward_backward_on_odd_sizes_gives_quarter_resolution_logits_and_finite_gradients(height, width):
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(_b0(num_labels=5)).train()
    pixel_values = torch.randn(2, 3, height, width)
    labels, _ = _labels(2, height, width, num_labels=5, ignored_fraction=0.2, seed=1)

    output = model(pixel_values, labels=labels, output_hidden_states=True)
    assert output.logits.shape == (2, 5, math.ceil(height / 4), math.ceil(width / 4))
    assert [tuple(h.shape[-2:]) for h in output.hidden_states] == _stage_sizes(height, width)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize(
    ("model_class", "labels"),
    [
        (SegformerHFForSemanticSegmentation, torch.zeros(2, 65, 97, dtype=torch.long)),
        (SegformerHFForImageClassification, torch.tensor([0, 2])),
        (SegformerHFModel, None),
    ],
)
def test_output_hidden_states_are_the_four_stage_maps(model_class, labels):
    torch.manual_seed(0)
    config = _tiny(num_labels=3)
    model = model_class(config).eval()
    pixel_values = torch.randn(2, 3, 65, 97)
    kwargs = {} if labels is None else {"labels": labels}
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True, **kwargs)
        without = model(pixel_values, **kwargs)
    expected = [
        (2, channels, *size) for channels, size in zip(config.hidden_sizes, _stage_sizes(65, 97), strict=True)
    ]
    assert [tuple(h.shape) for h in output.hidden_states] == expected
    assert without.hidden_states is None
    if model_class is SegformerHFModel:
        assert torch.equal(output.last_hidden_state, output.hidden_states[-1])


@pytest.mark.parametrize(
    "model_class",
    [SegformerHFForSemanticSegmentation, SegformerHFForImageClassification, SegformerHFModel],
)
def test_return_dict_false_returns_the_tuple_transformers_returns(model_class):
    torch.manual_seed(0)
    model = model_class(_tiny(num_labels=3)).eval()
    reference = to_transformers(model).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = {
        SegformerHFForSemanticSegmentation: {"labels": torch.randint(0, 3, (2, 64, 96))},
        SegformerHFForImageClassification: {"labels": torch.tensor([1, 2])},
        SegformerHFModel: {},
    }[model_class]
    for kwargs in ({}, labels, {**labels, "output_hidden_states": True}):
        with torch.no_grad():
            ours = model(pixel_values, return_dict=False, **kwargs)
            expected = reference(pixel_values, return_dict=False, **kwargs)
        assert isinstance(ours, tuple) and len(ours) == len(expected), kwargs
        for position, (ours_item, expected_item) in enumerate(zip(ours, expected)):
            if isinstance(expected_item, tuple):
                assert isinstance(ours_item, tuple) and len(ours_item) == len(expected_item)
                for ours_map, expected_map in zip(ours_item, expected_item):
                    torch.testing.assert_close(ours_map, expected_map, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(ours_item, expected_item, rtol=1e-4, atol=1e-5, msg=str(position))


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def _upsampled(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def test_cross_entropy_averages_over_valid_pixels_only():
    torch.manual_seed(0)
    num_labels = 4
    model = SegformerHFForSemanticSegmentation(_tiny(num_labels=num_labels)).eval()
    pixel_values = torch.randn(2, 3, 65, 97)
    labels, ignored = _labels(2, 65, 97, num_labels, ignored_fraction=0.3, seed=2)
    assert ignored.any() and (~ignored).any()
    with torch.no_grad():
        output = model(pixel_values, labels=labels)

    # Independent: log-softmax by logsumexp, the true class picked by a one-hot mask, mean over valid pixels.
    upsampled = _upsampled(output.logits, labels.shape[-2:]).double()
    log_probabilities = upsampled - upsampled.logsumexp(dim=1, keepdim=True)
    one_hot = F.one_hot(labels.clamp(max=num_labels - 1), num_labels).permute(0, 3, 1, 2)
    per_pixel = -(log_probabilities * one_hot).sum(dim=1)
    expected = per_pixel[~ignored].mean()
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The same quantity over every pixel differs, so the comparison above can tell the two apart.
    assert not torch.isclose(per_pixel.mean(), expected, rtol=1e-3)


def test_logits_at_ignored_pixels_neither_change_the_loss_nor_get_gradient():
    model = SegformerHFForSemanticSegmentation(_tiny(num_labels=4))
    labels, ignored = _labels(2, 24, 36, num_labels=4, ignored_fraction=0.3, seed=3)
    # Logits already at the labels' size, so the loss's upsampling is the identity and pixels map one to one.
    logits = torch.randn(2, 4, 24, 36, requires_grad=True)
    loss = model.segmentation_loss(logits, labels)
    loss.backward()
    ignored_per_class = ignored[:, None].expand_as(logits)
    assert (logits.grad[ignored_per_class] == 0).all()
    assert (logits.grad[~ignored_per_class] != 0).any()

    perturbed = logits.detach().clone()
    perturbed[ignored_per_class] += 100.0 * torch.randn(int(ignored_per_class.sum()))
    assert torch.equal(model.segmentation_loss(perturbed, labels), loss.detach())


def test_custom_ignore_index_is_respected():
    model = SegformerHFForSemanticSegmentation(_tiny(num_labels=3, semantic_loss_ignore_index=0))
    logits = torch.randn(1, 3, 8, 8)
    labels = torch.randint(0, 3, (1, 8, 8))
    valid = labels != 0
    log_probabilities = logits.double().log_softmax(dim=1)
    expected = -log_probabilities.gather(1, labels[:, None])[:, 0][valid].mean()
    torch.testing.assert_close(model.segmentation_loss(logits, labels).double(), expected)


def test_binary_loss_averages_over_valid_pixels_only():
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(_tiny(num_labels=1)).eval()
    pixel_values = torch.randn(2, 3, 65, 97)
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 2, (2, 65, 97), generator=generator)
    draw = torch.rand(2, 65, 97, generator=generator)
    labels[draw < 0.2] = IGNORE_INDEX
    labels[draw > 0.9] = -1  # negative labels are invalid too
    valid = (labels == 0) | (labels == 1)
    with torch.no_grad():
        output = model(pixel_values, labels=labels)
    assert output.logits.shape == (2, 1, 17, 25)

    # Independent: BCE from its definition, -[y log s(x) + (1 - y) log(1 - s(x))], averaged over valid pixels.
    logit = _upsampled(output.logits, labels.shape[-2:])[:, 0].double()
    target = labels.double()
    per_pixel = -(target * F.logsigmoid(logit) + (1 - target) * F.logsigmoid(-logit))
    expected = per_pixel[valid].mean()
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose((per_pixel * valid).mean(), expected, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Training machinery
# ---------------------------------------------------------------------------------------------------------


def _loss_and_gradients(model, pixel_values, labels, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(pixel_values, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(enable):
    """Both spellings: Trainer and older scripts call the first, transformers 5.x prefers the second."""
    torch.manual_seed(0)
    # Dropout and drop path on: checkpointing must replay the same random masks when it recomputes.
    config = _b0(num_labels=4, drop_path_rate=0.2, hidden_dropout_prob=0.1, classifier_dropout_prob=0.1)
    model = SegformerHFForSemanticSegmentation(config).train()
    pixel_values = torch.randn(2, 3, 65, 97)
    labels, _ = _labels(2, 65, 97, 4, ignored_fraction=0.1, seed=5)
    plain_loss, plain_gradients = _loss_and_gradients(model, pixel_values, labels, seed=7)

    getattr(model, enable)()
    block = model.segformer.stages[0].layers[0].mix_ffn
    calls = []
    # A pre-hook: PyTorch stops recomputing as soon as the saved tensors are back, before forward hooks run.
    handle = block.register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed_loss, checkpointed_gradients = _loss_and_gradients(model, pixel_values, labels, seed=7)
    handle.remove()
    # The block runs again during backward: proof that activations were recomputed, not stored.
    assert len(calls) == 2

    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_drop_path_is_deterministic_in_eval_and_stochastic_in_training():
    pixel_values = torch.randn(2, 3, 64, 64)

    def two_runs(drop_path_rate: float, training: bool):
        torch.manual_seed(0)
        model = SegformerHFForSemanticSegmentation(
            _tiny(num_labels=3, drop_path_rate=drop_path_rate, classifier_dropout_prob=0.0)
        ).train(training)
        with torch.no_grad():
            return model(pixel_values).logits, model(pixel_values).logits

    first, second = two_runs(0.5, training=False)
    assert torch.equal(first, second)
    first, second = two_runs(0.5, training=True)
    assert not torch.allclose(first, second)
    # Control: with no drop path and no dropout, training mode is deterministic too, so the
    # difference above comes from drop path alone.
    first, second = two_runs(0.0, training=True)
    assert torch.equal(first, second)


@pytest.mark.parametrize("variant", ["b0", "b3"])
def test_drop_path_rates_grow_linearly_from_zero_to_the_configured_rate(variant):
    rate = 0.3
    with torch.device("meta"):
        model = SegformerHFModel(SegformerHFConfig.from_variant(variant, drop_path_rate=rate))
    rates = [layer.drop_path.drop_prob for stage in model.stages for layer in stage.layers]
    total = sum(PAPER_VARIANTS[variant]["depths"])
    assert len(rates) == total
    expected = np.linspace(0.0, rate, total)
    np.testing.assert_allclose(rates, expected, rtol=0, atol=1e-12)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    with torch.device("meta"):
        drop_path = SegformerHFModel(_tiny(drop_path_rate=0.5)).stages[-1].layers[-1].drop_path
    drop_path = drop_path.to_empty(device="cpu").train()
    torch.manual_seed(0)
    branch = torch.ones(4000, 3, 5)
    dropped = drop_path(branch)
    per_sample = dropped.flatten(1)
    # Each sample is either entirely dropped or entirely kept and scaled by 1 / keep probability.
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample.min(dim=1).values == per_sample.max(dim=1).values).all()
    assert abs(dropped.mean().item() - 1.0) < 0.05


# ---------------------------------------------------------------------------------------------------------
# Hugging Face plumbing: save/load, Auto classes, remote code, pipeline
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small trained-looking model saved with save_pretrained, with three named labels."""
    torch.manual_seed(0)
    id2label = {0: "road", 1: "sky", 2: "tree"}
    config = _tiny(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = SegformerHFForSemanticSegmentation(config).eval()
    with torch.no_grad():
        # Non-default BatchNorm statistics, so that loading them is actually checked.
        model.decode_head.batch_norm.running_mean.normal_()
        model.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
    directory = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(directory)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return model, directory


# What config.json must list so that every Auto class finds its segformer_hf class as remote code.
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_segformer_hf.SegformerHFConfig",
    "AutoModel": "modeling_segformer_hf.SegformerHFModel",
    "AutoModelForSemanticSegmentation": "modeling_segformer_hf.SegformerHFForSemanticSegmentation",
    "AutoModelForImageClassification": "modeling_segformer_hf.SegformerHFForImageClassification",
}


def test_save_pretrained_writes_weights_config_with_auto_map_and_the_source_files(saved_model):
    _, directory = saved_model
    names = {path.name for path in directory.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "configuration_segformer_hf.py",
        "modeling_segformer_hf.py",
    } <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "segformer_hf"
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    package = REPO_ROOT / "segformer_hf"
    for name in ("configuration_segformer_hf.py", "modeling_segformer_hf.py"):
        assert (directory / name).read_text() == (package / name).read_text()


@pytest.mark.parametrize("model_class", [SegformerHFModel, SegformerHFForImageClassification])
def test_every_saved_class_lists_all_classes_in_auto_map(model_class, tmp_path):
    model_class(_tiny()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == EXPECTED_AUTO_MAP


def test_from_pretrained_with_another_label_count_needs_ignore_mismatched_sizes(saved_model):
    model, directory = saved_model
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        SegformerHFForSemanticSegmentation.from_pretrained(directory, num_labels=5)
    resized = SegformerHFForSemanticSegmentation.from_pretrained(
        directory, num_labels=5, ignore_mismatched_sizes=True
    )
    assert resized.config.num_labels == 5 and len(resized.config.id2label) == 5
    assert resized.decode_head.classifier.weight.shape == (5, 32, 1, 1)
    loaded = resized.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("decode_head.classifier."):
            assert torch.equal(loaded[name], tensor), name


def test_auto_classes_are_registered_after_import():
    config = AutoConfig.for_model("segformer_hf", depths=[1, 1, 1, 1], decoder_hidden_size=32)
    assert type(config) is SegformerHFConfig
    assert type(AutoModel.from_config(config)) is SegformerHFModel
    assert type(AutoModelForSemanticSegmentation.from_config(config)) is SegformerHFForSemanticSegmentation
    assert type(AutoModelForImageClassification.from_config(config)) is SegformerHFForImageClassification


def test_auto_model_loads_a_saved_model_in_process(saved_model):
    model, directory = saved_model
    loaded = AutoModelForSemanticSegmentation.from_pretrained(directory).eval()
    assert isinstance(loaded, SegformerHFForSemanticSegmentation)
    assert loaded.config.id2label == model.config.id2label
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


# Runs in a fresh interpreter (-I: no user site, no PYTHON* variables, no script directory on sys.path)
# with a meta-path finder that refuses segformer_hf exactly as a machine without it would ("No module
# named ..."), because the editable install would otherwise make it importable from anywhere.
_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class RefuseSegformerHF:
        def find_spec(self, name, path=None, target=None):
            if name == "segformer_hf" or name.startswith("segformer_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, RefuseSegformerHF())
    repo_root = sys.argv[4]
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", repo_root)]
    try:
        import segformer_hf  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True

    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    auto_class = getattr(transformers, sys.argv[5])
    model = auto_class.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        output = model(load_file(sys.argv[2])["pixel_values"], output_hidden_states=True)
    tensors = {f"hidden_states.{i}": h.contiguous() for i, h in enumerate(output.hidden_states)}
    if getattr(output, "logits", None) is not None:
        tensors["logits"] = output.logits.contiguous()
    tensors.update({f"weights.{name}": t.clone() for name, t in model.state_dict().items()})
    save_file(tensors, sys.argv[3])
    print(json.dumps({
        "blocked": blocked,
        "imported": sorted(m for m in sys.modules if m.split(".")[0] == "segformer_hf"),
        "model_module": type(model).__module__,
        "model_class": type(model).__name__,
        "labels": model.config.id2label,
    }))
    """
)


def _load_without_segformer_hf(directory, auto_class: str, pixel_values: torch.Tensor, tmp_path):
    """Loads `directory` through `auto_class` as remote code in a fresh process without segformer_hf.

    Returns the process' report and its tensors: `hidden_states.<i>`, `logits` where the model has
    them, and the loaded `weights.<name>`.
    """
    save_file({"pixel_values": pixel_values}, tmp_path / "input.safetensors")
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            _REMOTE_CODE_SCRIPT,
            str(directory),
            str(tmp_path / "input.safetensors"),
            str(tmp_path / "output.safetensors"),
            str(REPO_ROOT),
            auto_class,
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["blocked"], "the subprocess could import segformer_hf, so the test proves nothing"
    assert report["imported"] == []
    assert report["model_module"].startswith("transformers_modules."), report["model_module"]
    return report, load_file(tmp_path / "output.safetensors")


def test_remote_code_loads_in_a_fresh_process_without_segformer_hf(saved_model, tmp_path):
    model, directory = saved_model
    pixel_values = torch.randn(2, 3, 65, 97)
    report, remote = _load_without_segformer_hf(
        directory, "AutoModelForSemanticSegmentation", pixel_values, tmp_path
    )
    assert report["model_class"] == "SegformerHFForSemanticSegmentation"
    assert report["labels"] == {str(k): v for k, v in model.config.id2label.items()}
    with torch.no_grad():
        expected = model(pixel_values).logits
    # Same code, same weights, same input, another process: equal up to thread-scheduling rounding.
    torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "auto_class, model_class",
    [
        ("AutoModel", "SegformerHFModel"),
        ("AutoModelForImageClassification", "SegformerHFForImageClassification"),
    ],
)
def test_saved_segmentation_model_loads_its_encoder_through_other_auto_classes_as_remote_code(
    saved_model, auto_class, model_class, tmp_path
):
    model, directory = saved_model
    pixel_values = torch.randn(2, 3, 65, 97)
    report, remote = _load_without_segformer_hf(directory, auto_class, pixel_values, tmp_path)
    assert report["model_class"] == model_class
    prefix = "" if auto_class == "AutoModel" else "segformer."
    for name, tensor in model.segformer.state_dict().items():
        assert torch.equal(remote[f"weights.{prefix}{name}"], tensor), name
    if auto_class == "AutoModelForImageClassification":
        # The classifier is not in a segmentation checkpoint: a new one of the configured size.
        assert remote["weights.classifier.weight"].shape == (len(model.config.id2label), 64)
    with torch.no_grad():
        expected = model.segformer(pixel_values, output_hidden_states=True).hidden_states
    assert len(expected) == 4
    for stage, stage_map in enumerate(expected):
        torch.testing.assert_close(remote[f"hidden_states.{stage}"], stage_map, rtol=0, atol=1e-6)


def test_remote_code_never_runs_without_trust_remote_code(saved_model, tmp_path):
    """A shared segformer_hf checkpoint is code: loading it without consent must refuse before executing it."""
    _, directory = saved_model
    untrusted = tmp_path / "untrusted"
    shutil.copytree(directory, untrusted)
    marker = tmp_path / "code_ran"
    modeling = untrusted / "modeling_segformer_hf.py"
    modeling.write_text(f"open({str(marker)!r}, 'w').close()\n" + modeling.read_text())
    script = (
        "import sys\n"
        "from transformers import AutoModelForSemanticSegmentation\n"
        "try:\n"
        "    AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1])\n"
        "except ValueError as error:\n"
        "    print('refused:', error)\n"
    )
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
                   "HF_HUB_OFFLINE": "1"}  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-I", "-c", script, str(untrusted)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "refused:" in completed.stdout and "trust_remote_code" in completed.stdout, completed.stderr[
        -2000:
    ]
    assert not marker.exists(), "the checkpoint's code ran without trust_remote_code"


def test_image_segmentation_pipeline_returns_masks_at_the_input_size(saved_model):
    model, directory = saved_model
    segmenter = pipeline("image-segmentation", model=str(directory), trust_remote_code=True)
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, (50, 70, 3), dtype=np.uint8))  # 70 wide, 50 high
    segments = segmenter(image)
    assert segments, "the pipeline found no segment at all"
    coverage = np.zeros((50, 70), dtype=int)
    for segment in segments:
        assert segment["mask"].size == image.size
        assert segment["label"] in model.config.id2label.values()
        coverage += np.asarray(segment["mask"]) > 0
    # Semantic segmentation partitions the image: every pixel belongs to exactly one class mask.
    assert (coverage == 1).all()
