"""Reference weights load strictly and give transformers' outputs, losses and gradients.

The reference is always transformers' own Segformer implementation, filled with random (not
default-initialised) weights so that a swapped or transposed tensor cannot hide behind symmetric values.
NVlabs/mmseg files are synthesised from those transformers weights by the inverse mapping written out
below, from the original repositories' parameter names.
"""

import importlib.util
import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    SegformerModel,
)

from segformer_hf import (
    SegformerHFConfig,
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
)
from segformer_hf.conversion import (
    ReferenceLoadError,
    from_reference,
    read_checkpoint_file,
    to_our_state_dict,
    to_transformers,
)

# Published MiT sizes (Xie et al. 2021): widths, depths and decoder width; heads 1/2/5/8 etc. are defaults.
VARIANTS = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# Real depths everywhere; the deep variants are compared on small inputs to keep CI fast on 2 cores.
PARITY_SIZES = {
    "b0": [(128, 128), (203, 317)],
    "b1": [(128, 128), (203, 317)],
    "b2": [(128, 128), (203, 317)],
    "b3": [(64, 64), (67, 93)],
    "b4": [(64, 64), (67, 93)],
    "b5": [(64, 64), (67, 93)],
}
# The training step runs in float64 (see assert_same_training_step), where CPU convolutions are slow, so
# it is checked on B3-B5 for the segmentation head only: the other heads' gradient mapping does not depend
# on depth and is checked on B0-B2.
GRADIENT_SIZE = (64, 96)
HEADS = {
    "semantic": (SegformerForSemanticSegmentation, SegformerHFForSemanticSegmentation),
    "classification": (SegformerForImageClassification, SegformerHFForImageClassification),
    "encoder": (SegformerModel, SegformerHFModel),
}
NUM_LABELS = 7
LOGIT_TOLERANCE = {"relative_l2": 1e-5, "max_abs": 1e-4}
GRADIENT_RELATIVE_TOLERANCE = 1e-4


def _id2label(count: int) -> dict[int, str]:
    return {index: f"class_{index}" for index in range(count)}


def _reference_config(variant: str = "b0", **overrides) -> SegformerConfig:
    id2label = _id2label(overrides.pop("num_labels", NUM_LABELS))
    return SegformerConfig(
        **{
            **VARIANTS[variant],
            "id2label": id2label,
            "label2id": {name: index for index, name in id2label.items()},
            **overrides,
        }
    )


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of realistic scale: N(0, 1/fan_in) matrices, norms near 1, random BN statistics.

    Every parameter and buffer is overwritten (checked), so the model may come from `to_empty`.
    """
    generator = torch.Generator().manual_seed(seed)
    written = set()

    def fill(tensor: torch.Tensor, values: torch.Tensor) -> None:
        tensor.copy_(values)
        written.add(id(tensor))

    def normal(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        fill(tensor, mean + std * torch.randn(tensor.shape, generator=generator))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            normal(module.weight, module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                normal(module.bias, 0.1)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            normal(module.weight, 0.1, mean=1.0)
            normal(module.bias, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 0.1)
                fill(module.running_var, 0.5 + torch.rand(module.running_var.shape, generator=generator))
                fill(module.num_batches_tracked, torch.randint(1, 1000, (), generator=generator))
    unwritten = [
        name for name, tensor in model.state_dict(keep_vars=True).items() if id(tensor) not in written
    ]
    assert not unwritten, unwritten
    return model


def _reference_model(head: str, variant: str = "b0", seed: int = 0, **config_overrides) -> nn.Module:
    """transformers' model with random weights, built without paying for its own initialisation."""
    reference_class, _ = HEADS[head]
    with torch.device("meta"):
        model = reference_class(_reference_config(variant, **config_overrides))
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, relative_l2=1e-5, max_abs=1e-4):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    difference = actual.double() - expected.double()
    relative = (difference.norm() / expected.double().norm().clamp_min(1e-30)).item()
    largest = difference.abs().max().item()
    assert relative <= relative_l2 and largest <= max_abs, (
        f"{what}: relative L2 {relative:.2e} (limit {relative_l2:.0e}), max abs {largest:.2e} (limit {max_abs:.0e})"
    )


def _outputs(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
    named = {f"stage {index + 1} hidden states": h for index, h in enumerate(output.hidden_states)}
    if "logits" in output:
        named["logits"] = output.logits
    return named


def assert_same_outputs(ours: nn.Module, reference: nn.Module, pixel_values: torch.Tensor, context: str):
    expected = _outputs(reference, pixel_values)
    actual = _outputs(ours, pixel_values)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        # Guard against a vacuous comparison: random weights must give outputs that vary.
        assert tensor.std() > 1e-3, f"{context} {name} is nearly constant"
        assert_close(actual[name], tensor, f"{context} {name}", **LOGIT_TOLERANCE)


def assert_same_architecture(ours: SegformerHFConfig, reference: SegformerConfig) -> None:
    for name in (
        "hidden_sizes",
        "depths",
        "num_attention_heads",
        "sr_ratios",
        "patch_sizes",
        "strides",
        "mlp_ratios",
    ):
        assert list(getattr(ours, name)) == list(getattr(reference, name)), name
    assert ours.decoder_hidden_size == reference.decoder_hidden_size


def _without_randomness_(model: nn.Module) -> nn.Module:
    """Training mode (BatchNorm on batch statistics) with every dropout and drop path switched off."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def _objective(model: nn.Module, head: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """The head's loss on fixed random labels (some ignored); a fixed random projection for the encoder."""
    batch, _, height, width = pixel_values.shape
    generator = torch.Generator().manual_seed(11)
    if head == "semantic":
        labels = torch.randint(0, NUM_LABELS, (batch, height, width), generator=generator)
        labels[torch.rand(batch, height, width, generator=generator) < 0.1] = 255
        return model(pixel_values, labels=labels).loss
    if head == "classification":
        return model(pixel_values, labels=torch.randint(0, NUM_LABELS, (batch,), generator=generator)).loss
    hidden_states = model(pixel_values, output_hidden_states=True).hidden_states
    return sum((h * torch.randn(h.shape, generator=generator, dtype=h.dtype)).mean() for h in hidden_states)


def _our_names(reference_tensors: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """Reference parameter (or gradient) names -> ours, through the converter's key tables."""
    mapped, _ = to_our_state_dict(reference_tensors)
    if head == "encoder":
        mapped = {name.removeprefix("segformer."): tensor for name, tensor in mapped.items()}
    return mapped


def assert_same_training_step(ours: nn.Module, reference: nn.Module, head: str, pixel_values: torch.Tensor):
    """Loss, gradients and BatchNorm updates of one training step agree (both models become float64).

    Float64 because float32 gradients of a ReLU network are not a stable quantity: a 1e-7 rounding
    difference flips the ReLU mask of a few decoder units. Measured on random B5 weights, our float32
    gradients differ from our own float64 ones by up to 4e-4 relative, and transformers' float32
    gradients from its float64 ones by up to 6e-4 (B2, 203x317, training mode), while the two
    implementations agree to about 1e-14 in float64. So 1e-4 in float64 is a strict test.
    """
    for model in (ours, reference):
        _without_randomness_(model.double())
    pixel_values = pixel_values.double()
    our_loss, reference_loss = _objective(ours, head, pixel_values), _objective(reference, head, pixel_values)
    assert_close(our_loss.detach(), reference_loss.detach(), f"{head} training loss", 1e-10, 1e-10)
    our_loss.backward()
    reference_loss.backward()

    reference_gradients = _our_names({n: p.grad for n, p in reference.named_parameters()}, head)
    our_gradients = {name: parameter.grad for name, parameter in ours.named_parameters()}
    assert our_gradients.keys() == reference_gradients.keys()
    largest = max(gradient.norm() for gradient in reference_gradients.values())
    vanishing = set()
    for name, gradient in reference_gradients.items():
        if gradient.norm() < 1e-9 * largest:
            # Zero up to round-off in both, where relative differences mean nothing.
            assert our_gradients[name].norm() < 1e-9 * largest, name
            vanishing.add(name)
        else:
            assert_close(
                our_gradients[name],
                gradient,
                f"gradient of {name}",
                GRADIENT_RELATIVE_TOLERANCE,
                max_abs=1e-4,
            )
    # In training mode the decoder's BatchNorm subtracts the batch mean of every channel, so a constant
    # added before it (a projection bias, the last stage's final LayerNorm bias) has exactly zero gradient.
    # Nothing else may vanish, or the comparison above would be vacuous.
    assert vanishing <= {"segformer.stages.3.layer_norm.bias"} | {
        f"decode_head.stage_projections.{stage}.bias" for stage in range(4)
    }
    # The training-mode forward also updated BatchNorm's running statistics (same names in both models).
    reference_buffers = dict(reference.named_buffers())
    for name, buffer in ours.named_buffers():
        assert_close(buffer.double(), reference_buffers[name].double(), f"buffer {name}", 1e-10, 1e-10)


# ---------------------------------------------------------------------------------------------------------
# transformers checkpoints: every variant, every head
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_checkpoint_gives_transformers_outputs(variant, head, tmp_path):
    reference = _reference_model(head, variant, seed=VARIANTS[variant]["depths"][2])
    reference.save_pretrained(tmp_path)
    # The file holds transformers' checkpoint names (what every nvidia/* repo has), not its module names.
    assert any(".attention.self.query." in key for key in load_file(tmp_path / "model.safetensors"))

    ours = from_reference(tmp_path, HEADS[head][1]).eval()
    assert_same_architecture(ours.config, reference.config)
    assert ours.config.variant == variant
    assert ours.config.id2label == reference.config.id2label
    assert ours.config.label2id == reference.config.label2id

    torch.manual_seed(0)
    for height, width in PARITY_SIZES[variant]:
        pixel_values = torch.randn(2, 3, height, width)
        assert_same_outputs(ours, reference, pixel_values, f"{variant} {head} {height}x{width}")
    if head != "encoder":
        with torch.no_grad():
            our_loss, reference_loss = (
                _objective(ours, head, pixel_values),
                _objective(reference, head, pixel_values),
            )
        assert_close(our_loss, reference_loss, f"{variant} {head} eval loss", **LOGIT_TOLERANCE)

    if head == "semantic" or variant in ("b0", "b1", "b2"):
        assert_same_training_step(ours, reference, head, torch.randn(2, 3, *GRADIENT_SIZE))


# ---------------------------------------------------------------------------------------------------------
# NVlabs / mmseg layout, synthesised from transformers' checkpoint names
# ---------------------------------------------------------------------------------------------------------

# transformers checkpoint name -> NVlabs SegFormer / mmseg name (stages are 1-based there).
_TRANSFORMERS_FILE_TO_NVLABS = [
    (
        r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.",
        lambda m: f"backbone.patch_embed{int(m[1]) + 1}.proj.",
    ),
    (
        r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.",
        lambda m: f"backbone.patch_embed{int(m[1]) + 1}.norm.",
    ),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.", lambda m: f"backbone.block{int(m[1]) + 1}.{m[2]}."),
    (r"^segformer\.encoder\.layer_norm\.(\d)\.", lambda m: f"backbone.norm{int(m[1]) + 1}."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^decode_head\.linear_c\.(\d)\.proj\.", lambda m: f"decode_head.linear_c{int(m[1]) + 1}.proj."),
    (r"^decode_head\.linear_fuse\.", "decode_head.linear_fuse.conv."),
    (r"^decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", "decode_head.linear_pred."),
    (r"^classifier\.", "head."),
]


def nvlabs_state_dict(transformers_file: dict[str, torch.Tensor], imagenet: bool = False):
    """The state dict NVlabs' code would hold for these weights.

    Keys and values are one fused `attn.kv` projection (keys first). Segmentation files carry the
    `backbone.` prefix and mmseg's unused `decode_head.conv_seg`; MiT ImageNet files have neither.
    """
    renamed = {}
    for key, tensor in transformers_file.items():
        for pattern, replacement in _TRANSFORMERS_FILE_TO_NVLABS:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    converted = {}
    for key, tensor in renamed.items():
        if ".attention.self.value." in key:
            continue
        if ".attention.self.key." in key:
            value = renamed[key.replace(".key.", ".value.")]
            converted[key.replace(".attention.self.key.", ".attn.kv.")] = torch.cat([tensor, value])
        else:
            converted[key] = tensor
    leftovers = [key for key in converted if "attention" in key or "segformer" in key or "layer_norm" in key]
    assert not leftovers, leftovers
    if imagenet:
        return {key.removeprefix("backbone."): tensor for key, tensor in converted.items()}
    num_labels = converted["decode_head.linear_pred.weight"].shape[0]
    converted["decode_head.conv_seg.weight"] = torch.randn(num_labels, 128, 1, 1)
    converted["decode_head.conv_seg.bias"] = torch.randn(num_labels)
    return converted


def _transformers_file(model: nn.Module, directory) -> dict[str, torch.Tensor]:
    model.save_pretrained(directory)
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("variant", ["b0", "b1"])
def test_nvlabs_mmseg_checkpoint_gives_transformers_logits_with_inferred_architecture(
    variant, tmp_path, caplog
):
    reference = _reference_model("semantic", variant, seed=3)
    state_dict = nvlabs_state_dict(_transformers_file(reference, tmp_path / "transformers"))
    assert (
        "backbone.block1.0.attn.kv.weight" in state_dict and "decode_head.linear_fuse.bn.weight" in state_dict
    )
    path = tmp_path / f"segformer.{variant}.512x512.ade.160k.pth"
    torch.save({"meta": {"mmseg_version": "0.11.0", "iter": 160000}, "state_dict": state_dict}, path)

    with caplog.at_level(logging.INFO, logger="segformer_hf.conversion"):
        ours = from_reference(path).eval()
    assert "decode_head.conv_seg" in caplog.text
    # No config in the file: the architecture is read off the tensor shapes.
    assert_same_architecture(ours.config, reference.config)
    assert ours.config.num_labels == NUM_LABELS
    assert ours.config.variant == variant
    torch.manual_seed(0)
    assert_same_outputs(ours, reference, torch.randn(2, 3, 67, 93), f"NVlabs {variant}")


def test_mit_imagenet_checkpoint_loads_into_the_image_classifier(tmp_path):
    reference = _reference_model("classification", "b1", seed=4, num_labels=1000)
    state_dict = nvlabs_state_dict(_transformers_file(reference, tmp_path / "transformers"), imagenet=True)
    assert "block1.0.attn.q.weight" in state_dict and "head.weight" in state_dict
    path = tmp_path / "mit_b1.pth"
    torch.save(state_dict, path)

    ours = from_reference(path, SegformerHFForImageClassification).eval()
    assert ours.config.num_labels == 1000
    torch.manual_seed(0)
    assert_same_outputs(ours, reference, torch.randn(2, 3, 64, 96), "MiT ImageNet classifier")


def test_mit_imagenet_checkpoint_into_segmentation_keeps_the_encoder_and_starts_a_new_decode_head(
    tmp_path, caplog
):
    reference = _reference_model("classification", "b0", seed=5, num_labels=1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(
        nvlabs_state_dict(_transformers_file(reference, tmp_path / "transformers"), imagenet=True), path
    )

    with caplog.at_level(logging.WARNING, logger="segformer_hf.conversion"):
        ours = from_reference(path, num_labels=11).eval()
    assert "Newly initialised" in caplog.text and "decode_head" in caplog.text
    assert ours.config.num_labels == 11 and len(ours.config.id2label) == 11
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference.segformer(pixel_values, output_hidden_states=True).hidden_states
        actual = ours.segformer(pixel_values, output_hidden_states=True).hidden_states
    for stage, (ours_map, reference_map) in enumerate(zip(actual, expected)):
        assert_close(ours_map, reference_map, f"stage {stage + 1}", **LOGIT_TOLERANCE)

    # The decode head is as a fresh model initialises it, not anything from the file.
    head = ours.decode_head
    assert head.classifier.weight.shape == (11, 256, 1, 1)
    assert torch.equal(head.batch_norm.weight, torch.ones(256))
    assert torch.equal(head.batch_norm.running_mean, torch.zeros(256))
    assert torch.equal(head.batch_norm.running_var, torch.ones(256))
    for projection in head.stage_projections:
        assert torch.equal(projection.bias, torch.zeros_like(projection.bias))
        assert abs(projection.weight.std().item() - ours.config.initializer_range) < 0.005


# ---------------------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A one-block-per-stage transformers checkpoint: (reference model, its file's state dict, its config)."""
    reference = _reference_model("semantic", "b0", seed=6, depths=[1, 1, 1, 1])
    directory = tmp_path_factory.mktemp("small")
    state_dict = _transformers_file(reference, directory)
    return reference, state_dict, json.loads((directory / "config.json").read_text())


def _write_checkpoint(directory, state_dict, config):
    directory.mkdir()
    save_file(
        {key: tensor.contiguous() for key, tensor in state_dict.items()}, directory / "model.safetensors"
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_missing_encoder_tensor_is_an_error_naming_it(small_checkpoint, tmp_path):
    _, state_dict, config = small_checkpoint
    broken = {k: v for k, v in state_dict.items() if k != "segformer.encoder.block.1.0.mlp.dense1.weight"}
    with pytest.raises(
        ReferenceLoadError, match=r"missing \(1\).*segformer\.stages\.1\.layers\.0\.mix_ffn\.fc1"
    ):
        from_reference(_write_checkpoint(tmp_path / "c", broken, config))


def test_unknown_extra_tensor_is_an_error_naming_it(small_checkpoint, tmp_path):
    _, state_dict, config = small_checkpoint
    for extra in ("segformer.encoder.block.0.0.attention.self.rogue.weight", "auxiliary_head.conv.weight"):
        broken = {**state_dict, extra: torch.zeros(3)}
        with pytest.raises(
            ReferenceLoadError, match=r"unexpected \(1\).*rogue|unexpected \(1\).*auxiliary_head"
        ):
            from_reference(_write_checkpoint(tmp_path / extra.split(".")[0], broken, config))


def test_mis_shaped_tensor_is_an_error_naming_it_with_both_shapes(small_checkpoint, tmp_path):
    _, state_dict, config = small_checkpoint
    broken = {**state_dict, "segformer.encoder.block.2.0.mlp.dense2.bias": torch.zeros(161)}
    with pytest.raises(
        ReferenceLoadError, match=r"segformer\.stages\.2\.layers\.0\.mix_ffn\.fc2\.bias.*161.*160"
    ):
        from_reference(_write_checkpoint(tmp_path / "c", broken, config))


def test_partial_decode_head_is_an_error(small_checkpoint, tmp_path):
    _, state_dict, config = small_checkpoint
    broken = {k: v for k, v in state_dict.items() if not k.startswith("decode_head.linear_c.2.")}
    with pytest.raises(ReferenceLoadError, match=r"decode_head\.stage_projections\.2\.weight"):
        from_reference(_write_checkpoint(tmp_path / "c", broken, config))


def test_classifier_of_another_size_needs_ignore_mismatched_sizes_and_then_gets_a_new_head(
    small_checkpoint, tmp_path
):
    reference, state_dict, config = small_checkpoint
    directory = _write_checkpoint(tmp_path / "c", state_dict, config)
    with pytest.raises(ReferenceLoadError, match="ignore_mismatched_sizes"):
        from_reference(directory, num_labels=3)

    ours = from_reference(directory, num_labels=3, ignore_mismatched_sizes=True).eval()
    assert ours.config.num_labels == 3 and ours.decode_head.classifier.weight.shape == (3, 256, 1, 1)
    # A fresh classifier (zero bias at initialisation); everything else exactly as in the file.
    assert torch.equal(ours.decode_head.classifier.bias, torch.zeros(3))
    loaded = _our_names(reference.state_dict(), "semantic")
    for name, tensor in ours.state_dict().items():
        if not name.startswith("decode_head.classifier."):
            assert torch.equal(tensor, loaded[name]), name


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pth"
    torch.save({"state_dict": {"weight": torch.zeros(1)}, "payload": _ExecutesOnLoad(str(marker))}, path)

    with pytest.raises(ReferenceLoadError, match="malicious.pth"):
        from_reference(path)
    with pytest.raises(ReferenceLoadError, match="weights-only"):
        read_checkpoint_file(path)
    assert not marker.exists()
    # Control: an unrestricted unpickler would indeed have run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def _record_execution(path: str) -> None:
    with open(path, "w") as file:
        file.write("executed")


class _ExecutesOnLoad:
    """Pickles as a call to `_record_execution`: what a booby-trapped checkpoint does with os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _record_execution, (self.marker,)


# ---------------------------------------------------------------------------------------------------------
# Back to transformers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", sorted(HEADS))
def test_to_transformers_round_trips_bit_exactly_with_equal_outputs_and_labels(head):
    transformers_class, our_class = HEADS[head]
    id2label = {0: "road", 1: "sky", 2: "tree", 3: "car"}
    config = SegformerHFConfig.from_variant(
        "b0", depths=[1, 2, 1, 1], id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    ours = randomize_(our_class(config), seed=8).eval()
    exported = to_transformers(ours)
    assert type(exported) is transformers_class
    assert exported.config.id2label == id2label and exported.config.label2id == ours.config.label2id
    assert not exported.training
    torch.manual_seed(0)
    assert_same_outputs(ours, exported.eval(), torch.randn(2, 3, 67, 93), f"to_transformers {head}")

    back = from_reference(exported, our_class)
    assert back.config.id2label == id2label and back.config.label2id == ours.config.label2id
    original, returned = ours.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name


def test_transformers_labels_carry_over_to_ours(tmp_path):
    reference = _reference_model("semantic", "b0", seed=9, depths=[1, 1, 1, 1])
    reference.config.id2label = {index: name for index, name in enumerate("abcdefg")}
    reference.config.label2id = {name: index for index, name in reference.config.id2label.items()}
    reference.save_pretrained(tmp_path)
    ours = from_reference(tmp_path)
    assert ours.config.id2label == reference.config.id2label
    assert ours.config.label2id == reference.config.label2id


def test_our_saved_model_loads_back_through_from_reference(tmp_path):
    ours = randomize_(SegformerHFForSemanticSegmentation(SegformerHFConfig(depths=[1, 1, 1, 1])), seed=10)
    ours.save_pretrained(tmp_path)
    back = from_reference(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------------------
# scripts/convert_reference_weights.py
# ---------------------------------------------------------------------------------------------------------

SCRIPT = REPO_ROOT / "scripts" / "convert_reference_weights.py"


def _run_script(*arguments, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _reported(stdout: str, quantity: str) -> float:
    match = re.search(rf"{quantity}: ([0-9.e+-]+)", stdout)
    assert match, f"no '{quantity}' in the script's output:\n{stdout}"
    return float(match[1])


def _check_converted_directory(output, reference, expected_processor_size):
    names = {path.name for path in output.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "configuration_segformer_hf.py",
        "modeling_segformer_hf.py",
        "preprocessor_config.json",
    } <= names
    assert json.loads((output / "config.json").read_text())["model_type"] == "segformer_hf"
    processor = SegformerImageProcessor.from_pretrained(output)
    assert processor.size == expected_processor_size
    converted = SegformerHFForSemanticSegmentation.from_pretrained(output).eval()
    assert converted.config.id2label == reference.config.id2label
    torch.manual_seed(0)
    assert_same_outputs(converted, reference, torch.randn(1, 3, 64, 64), "converted by the script")
    assert not [path.name for path in output.parent.iterdir() if path.name.startswith(f".{output.name}")]


def test_conversion_script_on_a_transformers_directory_verifies_and_writes_our_format(tmp_path):
    reference = _reference_model("semantic", "b0", seed=12, depths=[1, 1, 1, 1])
    source = tmp_path / "source"
    reference.save_pretrained(source)
    SegformerImageProcessor(size={"height": 96, "width": 128}, do_reduce_labels=True).save_pretrained(source)
    output = tmp_path / "converted"

    completed = _run_script("--source", source, "--output", output, "--verify", cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert _reported(completed.stdout, "max abs logit difference") <= 1e-4
    assert _reported(completed.stdout, "relative L2 logit difference") <= 1e-5
    _check_converted_directory(output, reference, {"height": 96, "width": 128})
    assert SegformerImageProcessor.from_pretrained(output).do_reduce_labels


def test_conversion_script_on_an_nvlabs_file_verifies_against_transformers(tmp_path):
    reference = _reference_model("semantic", "b0", seed=13, depths=[1, 1, 1, 1])
    state_dict = nvlabs_state_dict(_transformers_file(reference, tmp_path / "transformers"))
    source = tmp_path / "segformer.b0.512x512.ade.160k.pth"
    torch.save({"state_dict": state_dict}, source)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"id2label": {str(k): v for k, v in reference.config.id2label.items()}}))
    output = tmp_path / "converted"

    completed = _run_script(
        "--source", source, "--output", output, "--id2label_file", labels, "--verify", cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert _reported(completed.stdout, "max abs logit difference") <= 1e-4
    assert _reported(completed.stdout, "relative L2 logit difference") <= 1e-5
    _check_converted_directory(output, reference, {"height": 512, "width": 512})


@pytest.fixture(scope="module")
def conversion_script():
    """The script as a module, to exercise its failure paths in-process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location("convert_reference_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conversion_script_leaves_no_output_when_conversion_fails(conversion_script, tmp_path, capsys):
    bad_source = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.block1.0.attn.q.weight": torch.zeros(2, 2)}}, bad_source)
    assert conversion_script.main(["--source", str(bad_source), "--output", str(tmp_path / "converted")]) == 2
    assert f"error: cannot convert {bad_source}" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.pth"]


def test_conversion_script_never_touches_an_existing_output_without_overwrite(conversion_script, tmp_path):
    source = tmp_path / "source"
    _reference_model("semantic", "b0", seed=14, depths=[1, 1, 1, 1]).save_pretrained(source)
    output = tmp_path / "converted"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="--overwrite"):
        conversion_script.main(["--source", str(source), "--output", str(output)])
    assert [path.name for path in output.iterdir()] == ["keep.txt"]

    assert conversion_script.main(["--source", str(source), "--output", str(output), "--overwrite"]) == 0
    assert "model.safetensors" in {path.name for path in output.iterdir()}
    assert not (output / "keep.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "source"]


def test_conversion_script_refuses_contradicting_label_options(conversion_script, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "road", "1": "sky"}))
    with pytest.raises(SystemExit, match="contradicts"):
        conversion_script.main(
            [
                "--source",
                "x",
                "--output",
                str(tmp_path / "o"),
                "--num_labels",
                "3",
                "--id2label_file",
                str(labels),
            ]
        )
    labels.write_text(json.dumps({"0": "road", "2": "sky"}))
    with pytest.raises(SystemExit, match="without gaps"):
        conversion_script.main(
            ["--source", "x", "--output", str(tmp_path / "o"), "--id2label_file", str(labels)]
        )
