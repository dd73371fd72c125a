"""Speed features keep the results: torch.compile, the DDP gradient layout, augmentation on the device.

Nothing here is timed (scripts/benchmark.py and scripts/benchmark_data.py measure); each test checks that
a faster path computes what the plain one does. Compilation on a CPU is slow, so the compiled models are
tiny configurations at small sizes.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import DEMO_DATA, REPO_ROOT, accelerate_launch
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf import data as seg_data
from segformer_hf.augmentation import DeviceAugmentation
from segformer_hf.inference import imagenet_normalization

TINY = dict(
    hidden_sizes=[8, 16, 24, 32],
    depths=[1, 1, 1, 1],
    num_attention_heads=[1, 1, 2, 2],
    decoder_hidden_size=16,
    num_labels=5,
    semantic_loss_ignore_index=255,
)


def _tiny_model(**overrides) -> SegformerHFForSemanticSegmentation:
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(SegformerHFConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # a BatchNorm that is not the identity, so folding it is checked too
        model.decode_head.batch_norm.running_mean.uniform_(-0.5, 0.5)
        model.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
    return model


# torch.compile --------------------------------------------------------------------------------------------


def test_compiled_inference_equals_eager_at_two_sizes_without_recompiling():
    model = _tiny_model().eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    # Sizes dynamic from the start: a new image size reuses the graph (batch 1, as benchmark.py --compile).
    # Both sizes stay on one side of the size threshold PyTorch's convolution tracing guards on (with these
    # widths it lies between 256 and 288 pixels: crossing it compiles the graph once more).
    compiled = torch.compile(model, backend=counter, dynamic=True)
    compiled_after = []
    with torch.inference_mode():
        for size in ((224, 224), (256, 256)):
            pixel_values = torch.randn(1, 3, *size)
            torch.testing.assert_close(
                compiled(pixel_values=pixel_values).logits,
                model(pixel_values=pixel_values).logits,
                rtol=1e-4,
                atol=1e-4,
            )
            compiled_after.append(counter.frame_count)
    assert compiled_after[0] >= 1 and compiled_after[1] == compiled_after[0], compiled_after


def test_compiled_inference_with_frozen_weights_equals_eager():
    # The CPU inference setting of docs/performance.md: inductor's freezing folds the weights (and the folded
    # BatchNorm of the decoder) into the graph as constants and pre-packs them for oneDNN.
    import torch._inductor.config as inductor_config

    model = _tiny_model().eval()
    torch._dynamo.reset()
    counters.clear()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        compiled = torch.compile(model, backend="inductor", dynamic=False)
        compiled_logits = compiled(pixel_values=pixel_values).logits
        eager_logits = model(pixel_values=pixel_values).logits
    # Freezing really ran: the convolution and linear weights were pre-packed as constants.
    packed = counters["inductor"]
    assert packed["mkldnn_conv_weight_pack_matcher_count"] > 0, dict(packed)
    assert packed["mkldnn_linear_weight_pack_matcher_count"] > 0, dict(packed)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)


def test_compiled_training_step_is_one_graph_with_eager_loss_gradients_and_statistics():
    # A batch with a sample without labels exercises the masked BatchNorm statistics (`normalize`), whose
    # eager form syncs with the host. The only break allowed is the loss, kept out of the graph on purpose.
    # The decoder's dropout stays on: compiled, its noise comes from the same sparse draws (the opaque
    # `segformer_hf::sparse_dropout_noise`), so with the same seed it drops the same elements as eager.
    pixel_values = torch.randn(3, 3, 64, 64)
    labels = torch.randint(0, 5, (3, 64, 64))
    labels[1] = 255
    results = []
    for compile_model in (False, True):
        model = _tiny_model(classifier_dropout_prob=0.3, drop_path_rate=0.0).train()
        torch._dynamo.reset()
        counters["graph_break"].clear()
        counter = CompileCounterWithBackend("aot_eager")
        forward = torch.compile(model, backend=counter) if compile_model else model
        torch.manual_seed(5)
        loss = forward(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        norm = model.decode_head.batch_norm
        results.append(
            (
                loss.detach(),
                {name: p.grad.clone() for name, p in model.named_parameters()},
                (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()),
            )
        )
    assert counter.frame_count == 1
    assert all("upsampled_cross_entropy" in reason for reason in counters["graph_break"]), counters[
        "graph_break"
    ]
    (eager_loss, eager_grads, eager_stats), (compiled_loss, compiled_grads, compiled_stats) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, gradient in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    for compiled_value, eager_value in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-6)


def test_compiled_cpu_graph_calls_atens_upsampling_and_the_sparse_dropout_noise():
    # On the CPU inductor's own bilinear resize (a gather, and a scatter backward) and its dropout (a random
    # number per element) are slower than the eager kernels, so the compiled graph calls those instead.
    model = _tiny_model(classifier_dropout_prob=0.3, drop_path_rate=0.0).train()
    called = set()

    def recording_backend(graph_module, example_inputs):
        called.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend)
    compiled(pixel_values=torch.randn(2, 3, 64, 64), labels=torch.randint(0, 5, (2, 64, 64))).loss.backward()
    assert {"segformer_hf.upsample_bilinear", "segformer_hf.sparse_dropout_noise"} <= called, called
    # (The encoder's dropouts of probability 0 stay plain `F.dropout` calls.)
    assert not any("interpolate" in target for target in called), called


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_upsampling_operator_equals_interpolate_and_its_gradient_compiled(channels_last):
    from segformer_hf.modeling_segformer_hf import upsample_bilinear

    torch.manual_seed(0)
    features = torch.randn(2, 6, 5, 7)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    # The compiler's view of the operators (fake shapes and layouts, the registered gradient, symbolic
    # sizes) agrees with what they compute.
    torch.library.opcheck(torch.ops.segformer_hf.upsample_bilinear.default, (features, 20, 28))
    gradient = torch.randn(2, 6, 20, 28)
    torch.library.opcheck(torch.ops.segformer_hf.upsample_bilinear_backward.default, (gradient, 5, 7))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: upsample_bilinear(x, (20, 28)), backend="inductor", fullgraph=True)
    results = []
    for resize in (compiled, lambda x: F.interpolate(x, size=(20, 28), mode="bilinear", align_corners=False)):
        inputs = features.clone().requires_grad_()
        output = resize(inputs)
        output.backward(gradient)
        results.append((output, inputs.grad))
    (compiled_output, compiled_gradient), (output, expected_gradient) = results
    torch.testing.assert_close(compiled_output, output, rtol=0, atol=0)
    assert compiled_output.stride() == output.stride()
    torch.testing.assert_close(compiled_gradient, expected_gradient, rtol=1e-6, atol=1e-6)


def test_torch_compile_training_saves_weights_without_the_compile_prefix(tmp_path):
    # aot_eager: the same dynamo capture and module wrapping as inductor, without minutes of C++ code
    # generation for the backward graph on a CPU (the inductor graph itself is checked above).
    init = tmp_path / "tiny"
    _tiny_model(num_labels=11, semantic_loss_ignore_index=11).save_pretrained(init)
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--init_from", str(init), "--torch_compile", "true",
         "--torch_compile_backend", "aot_eager", "--max_train_steps", "2", "--max_train_samples", "4",
         "--max_eval_samples", "2",
         "--crop_size", "64", "64", "--img_scale", "96", "64", "--per_device_train_batch_size", "2",
         "--per_device_eval_batch_size", "2", "--dataloader_num_workers", "0", "--warmup_steps", "1",
         "--eval_steps", "1", "--checkpointing_steps", "2", "--report_to", "none", "--output_dir", str(output_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    saved = load_file(output_dir / "model.safetensors")
    (checkpoint,) = (output_dir / "checkpoints").glob("step_*")
    checkpointed = load_file(checkpoint / "model.safetensors")
    expected = set(load_file(init / "model.safetensors"))  # the names of a model that was never compiled
    assert set(saved) == expected
    assert set(checkpointed) == expected
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 2


# DDP ------------------------------------------------------------------------------------------------------


def test_two_process_training_has_no_gradient_stride_warning(tmp_path):
    command = [
        *accelerate_launch(2), "scripts/train.py",
        "--max_train_steps", "1", "--max_train_samples", "4", "--max_eval_samples", "2",
        "--crop_size", "64", "64", "--img_scale", "96", "64", "--per_device_train_batch_size", "2",
        "--dataloader_num_workers", "0", "--warmup_steps", "0", "--report_to", "none",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2" in result.stderr
    assert "Grad strides do not match" not in result.stderr


# Augmentation on the device -------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_device_augmentation_equals_the_numpy_path(epoch):
    """Same draws (crop box, flip, photometric parameters) and labels; images within one 8-bit level.

    The device path resizes only the crop window, with PyTorch's bilinear source coordinates; float
    rounding puts a pixel on the other side of a .5 now and then (measured: 1e-5 of the values, never
    more than one level apart after the photometric steps; the bounds below leave some room).
    """
    dataset = seg_data.load_segmentation_dataset(data_dir=DEMO_DATA)["train"].select(range(8))
    settings = dict(
        crop_size=(160, 200),  # wider than some resized images: padding on both paths
        img_scale=(240, 180),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric_distortion=True,
        ignore_index=11,
        num_labels=11,
        seed=3,
    )
    numpy_path = seg_data.SegmentationTrainTransform(**settings)
    decode_only = seg_data.SegmentationDecodeTransform(**settings)
    numpy_path.set_epoch(epoch), decode_only.set_epoch(epoch)
    reference = seg_data.train_collate_fn(list(dataset.with_transform(numpy_path)))
    decoded = seg_data.decoded_collate_fn(list(dataset.with_transform(decode_only)))

    for index in range(len(dataset)):  # the draws: the same generator in the same order
        rng = numpy_path.rng(dataset[index]["sample_index"])
        image, label = numpy_path.decode(dataset[index]["image"], dataset[index]["label"], "", index)
        draws, _ = numpy_path.draw(label, rng)
        assert tuple(decoded["draws"]["crop_box"][index].tolist()) == draws.crop_box
        assert tuple(decoded["draws"]["resized_size"][index].tolist()) == draws.resized_size
        assert bool(decoded["draws"]["flip"][index]) == draws.flip
    assert decoded["draws"]["flip"].any() and not decoded["draws"]["flip"].all()

    augmented = DeviceAugmentation(settings["crop_size"], settings["ignore_index"])(decoded)
    assert torch.equal(augmented["labels"], reference["labels"])
    assert augmented["pixel_values"].shape == reference["pixel_values"].shape
    std = torch.tensor(imagenet_normalization()[1]).view(1, 3, 1, 1) * 255
    levels = ((augmented["pixel_values"] - reference["pixel_values"]) * std).abs()
    assert levels.max() <= 3.0 + 1e-3
    assert (levels > 0.5).float().mean() < 1e-3


def test_device_augmentation_turns_a_skipped_sample_into_the_placeholder():
    transform = seg_data.SegmentationDecodeTransform(
        crop_size=(32, 32), img_scale=(64, 48), num_labels=11, ignore_index=11, skip_bad_samples=True
    )
    good = seg_data.load_segmentation_dataset(data_dir=DEMO_DATA)["train"][0]
    bad = {**good, "label": {"bytes": b"not an image", "path": None}}
    rows = {key: [good[key], bad[key]] for key in ("image", "label", "sample_id")} | {"sample_index": [0, 1]}
    outputs = transform(rows)
    samples = [{key: values[index] for key, values in outputs.items()} for index in range(2)]
    batch = DeviceAugmentation((32, 32), 11)(seg_data.decoded_collate_fn(samples))
    expected_image, expected_labels = seg_data.SegmentationTrainTransform(
        crop_size=(32, 32), img_scale=(64, 48), num_labels=11, ignore_index=11
    ).placeholder()
    assert batch["num_skipped"] == 1
    assert torch.equal(batch["pixel_values"][1], expected_image)
    assert torch.equal(batch["labels"][1], expected_labels)
    assert (batch["labels"][0] != 11).any()


def test_weights_laid_out_as_gradients_keep_their_values_and_outputs():
    from segformer_hf.training import lay_out_weights_as_gradients

    model = _tiny_model().train()
    relaid = copy.deepcopy(model)
    lay_out_weights_as_gradients(relaid)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    torch.manual_seed(1)
    expected = model(pixel_values=pixel_values, labels=labels).loss
    torch.manual_seed(1)
    loss = relaid(pixel_values=pixel_values, labels=labels).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, parameter in relaid.named_parameters():
        torch.testing.assert_close(parameter, model.state_dict()[name], rtol=0, atol=0)
        if parameter.ndim == 4:  # the gradient has the weight's exact strides: nothing to copy, no warning
            assert parameter.grad.stride() == parameter.stride(), name
