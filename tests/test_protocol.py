"""One preprocessing and inference protocol from training to every door: the saved image processor.

A model is evaluated during training with its run's protocol (keep-ratio resize to img_scale, mode, window,
scales, flip). That protocol is saved with the model in a `SegformerHFImageProcessor`, and
`segformer-hf evaluate`, `segformer-hf predict` and transformers' pipeline use it by default: the same
images give the same numbers and the same masks through each of them.
"""

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, REPO_ROOT
from PIL import Image
from transformers import AutoImageProcessor, SegformerImageProcessor, pipeline

from segformer_hf import SegformerHFForSemanticSegmentation, SegformerHFImageProcessor
from segformer_hf.data import SegmentationEvalTransform, load_evaluation_split
from segformer_hf.inference import InferenceProtocol, load_model_for_inference

pytestmark = pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="bundled demo data missing")

NUM_EVAL_SAMPLES = 4
TINY_RUN = [
    "--max_train_samples", "8",
    "--max_eval_samples", str(NUM_EVAL_SAMPLES),
    "--crop_size", "64", "64",
    "--img_scale", "120", "90",
    "--per_device_train_batch_size", "2",
    # Two same-size images per evaluation batch: a batched forward pass would round differently.
    "--per_device_eval_batch_size", "2",
    "--dataloader_num_workers", "0",
    "--warmup_steps", "1",
    "--max_train_steps", "3",
    "--eval_steps", "100",
    "--checkpointing_steps", "100",
    "--num_log_images", "0",
    "--report_to", "none",
]  # fmt: skip
VAL_IMAGES = sorted((DEMO_DATA / "val" / "images").iterdir())[:2] if DEMO_DATA.is_dir() else []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny demo run, trained in this process: its output directory and final results."""
    from segformer_hf.training import main

    output_dir = tmp_path_factory.mktemp("protocol") / "run"
    assert main([*TINY_RUN, "--output_dir", str(output_dir)]) == 0
    return output_dir, json.loads((output_dir / "all_results.json").read_text())


@pytest.fixture(scope="module")
def contrasted_model(trained_run, tmp_path_factory):
    """The trained run's model with spread-out decoder statistics, so that its masks hold several classes
    (three steps of training predict nearly one class everywhere, which would make mask comparisons weak)."""
    output_dir, _ = trained_run
    directory = tmp_path_factory.mktemp("contrasted") / "model"
    shutil.copytree(output_dir, directory, ignore=shutil.ignore_patterns("checkpoint*", "logs", "best"))
    model = SegformerHFForSemanticSegmentation.from_pretrained(directory)
    torch.manual_seed(0)
    with torch.no_grad():
        model.decode_head.batch_norm.running_mean.normal_(0, 2.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def predicted(contrasted_model, tmp_path_factory):
    """scripts/predict.py on two validation images with the contrasted model, no protocol flags."""
    output = tmp_path_factory.mktemp("predicted")
    _run_script("predict.py", "--model", contrasted_model, *VAL_IMAGES, "--output", output)
    return output


def _run_script(script, *arguments, timeout=300):
    result = subprocess.run(
        [sys.executable, f"scripts/{script}", *map(str, arguments)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# The protocol is saved with the model ----------------------------------------------------------------------


def test_training_saves_its_evaluation_protocol_in_the_image_processor(trained_run):
    output_dir, _ = trained_run
    saved = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SegformerHFImageProcessor"
    assert saved["auto_map"] == {
        "AutoImageProcessor": "image_processing_segformer_hf.SegformerHFImageProcessor"
    }
    assert (output_dir / "image_processing_segformer_hf.py").is_file()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert InferenceProtocol.from_image_processor(processor) == InferenceProtocol(
        mode="whole", img_scale=(120, 90), crop_size=(64, 64)
    )


def test_the_processor_feeds_the_network_exactly_what_evaluation_does(trained_run):
    """Bit-identical pixel values: the pipeline and predict see what the reported metrics were computed on."""
    output_dir, _ = trained_run
    processor = AutoImageProcessor.from_pretrained(output_dir)
    dataset = load_evaluation_split(data_dir=str(DEMO_DATA), split="val").select(range(2))
    transform = SegmentationEvalTransform(img_scale=(120, 90), ignore_index=11, num_labels=11)
    for index, path in enumerate(VAL_IMAGES):
        evaluated = dataset.with_transform(transform)[index]["pixel_values"]
        processed = processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
        assert processed.shape == (3, 90, 120)  # 240x180 kept its 4:3 ratio, not squashed to the crop
        assert torch.equal(processed, evaluated)


def test_keep_ratio_sizes_follow_mmsegs_rule_for_any_aspect_ratio():
    processor = SegformerHFImageProcessor(img_scale=[2048, 512])
    # min(2048 / long, 512 / short), sides rounded half up; values worked out by hand.
    for (height, width), expected in {
        (512, 683): (512, 683),
        (1024, 2048): (512, 1024),
        (300, 2400): (256, 2048),
        (640, 480): (683, 512),
    }.items():
        image = np.zeros((height, width, 3), dtype=np.uint8)
        assert processor(images=image)["pixel_values"][0].shape[-2:] == expected


# Every door uses it --------------------------------------------------------------------------------------


def test_evaluate_without_flags_reports_exactly_the_metrics_training_reported(trained_run, tmp_path):
    output_dir, results = trained_run
    _run_script(
        "evaluate_model.py",
        "--model", output_dir, "--data_dir", DEMO_DATA, "--split", "val",
        "--max_samples", NUM_EVAL_SAMPLES, "--num_workers", "0", "--output", tmp_path / "metrics.json",
    )  # fmt: skip
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["protocol"]["img_scale"] == [120, 90] and evaluated["protocol"]["mode"] == "whole"
    assert evaluated["num_samples"] == results["eval_samples"] == NUM_EVAL_SAMPLES
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"):
        assert evaluated[key] == results[f"eval_{key}"], key


def test_evaluate_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(trained_run, monkeypatch, caplog):
    from segformer_hf import evaluation, inference

    output_dir, _ = trained_run
    monkeypatch.setattr(inference, "cpu_lacks_bf16", lambda: True)
    arguments = ["--model", str(output_dir), "--data_dir", str(DEMO_DATA), "--split", "val"]
    arguments += ["--max_samples", "2", "--num_workers", "0"]
    with caplog.at_level(logging.WARNING, logger="segformer_hf.inference"):
        evaluation.run_evaluation(evaluation.build_parser().parse_args(arguments))
        assert "without bf16 instructions" not in caplog.text  # float32 asked for: nothing to say
        results = evaluation.run_evaluation(evaluation.build_parser().parse_args([*arguments, "--bf16"]))
    assert "without bf16 instructions" in caplog.text
    assert results["num_samples"] == 2  # a warning, not a refusal


def test_flags_override_the_saved_protocol_one_by_one():
    from segformer_hf.evaluation import build_parser

    saved = InferenceProtocol(mode="whole", img_scale=(120, 90), crop_size=(64, 64), flip=True)
    arguments = ["--model", "m", "--data_dir", "d"]
    parse = build_parser().parse_args
    assert InferenceProtocol.from_args(parse(arguments), saved) == saved
    overridden = InferenceProtocol.from_args(parse([*arguments, "--mode", "slide", "--no-flip"]), saved)
    assert overridden == InferenceProtocol(mode="slide", img_scale=(120, 90), crop_size=(64, 64), flip=False)
    native = InferenceProtocol.from_args(parse([*arguments, "--no_resize", "--img_scale", "60", "40"]), saved)
    assert native.img_scale is None
    rescaled = InferenceProtocol.from_args(parse([*arguments, "--img_scale", "60", "40"]), saved)
    assert rescaled.img_scale == (60, 40) and rescaled.crop_size == (64, 64)
    # A model that records no protocol: whole images at their own size, as before.
    assert InferenceProtocol.from_args(parse(arguments), None) == InferenceProtocol()


def _pipeline_label_map(segmenter, model, image):
    """The label map the pipeline's one-mask-per-class answer describes."""
    label_map = np.full(image.size[::-1], -1)
    for segment in segmenter(image):
        label_map[np.asarray(segment["mask"]) > 0] = model.config.label2id[segment["label"]]
    assert (label_map >= 0).all(), "the pipeline's masks must cover every pixel"
    return label_map


def test_pipeline_masks_equal_predict_masks_pixel_for_pixel(contrasted_model, predicted):
    segmenter = pipeline("image-segmentation", model=str(contrasted_model), trust_remote_code=True)
    for path in VAL_IMAGES:
        image = Image.open(path).convert("RGB")
        mask = np.asarray(Image.open(predicted / f"{path.stem}_mask.png"))
        assert len(np.unique(mask)) > 2, "a near-uniform mask would make the comparison weak"
        np.testing.assert_array_equal(_pipeline_label_map(segmenter, segmenter.model, image), mask)


def test_predict_uses_the_saved_resize_not_the_crop_square(contrasted_model, predicted):
    """The masks predict.py writes are the network's answer on the keep-ratio 120x90 image, upsampled."""
    model = SegformerHFForSemanticSegmentation.from_pretrained(contrasted_model).eval()
    image = Image.open(VAL_IMAGES[0]).convert("RGB")
    # Built by hand from the definition: keep-ratio bilinear resize to 120x90, ImageNet normalisation.
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(pixels, size=(90, 120), mode="bilinear", align_corners=False)
    resized = resized.round().clamp(0, 255) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(pixel_values=(resized - mean) / std).logits
    expected = torch.nn.functional.interpolate(
        logits, size=image.size[::-1], mode="bilinear", align_corners=False
    ).argmax(1)[0]
    mask = np.asarray(Image.open(predicted / f"{VAL_IMAGES[0].stem}_mask.png"))
    # Float rounding of the normalisation may flip a handful of near-tied pixels.
    assert (mask == expected.numpy()).mean() > 0.999


def test_pipeline_logs_no_unsupported_model_error(contrasted_model):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        pipeline("image-segmentation", model=str(contrasted_model), trust_remote_code=True)
    finally:
        transformers_logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert not [message for message in messages if "is not supported" in message], messages


# Old checkpoints and the palette ---------------------------------------------------------------------------


def test_a_model_saved_with_a_plain_segformer_image_processor_still_evaluates_and_predicts(
    contrasted_model, tmp_path, capsys
):
    from segformer_hf import evaluation, prediction

    old = tmp_path / "old"
    shutil.copytree(contrasted_model, old)
    (old / "image_processing_segformer_hf.py").unlink()
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(old)
    _, processor = load_model_for_inference(old)
    assert InferenceProtocol.from_image_processor(processor) is None
    arguments = ["--model", str(old), "--data_dir", str(DEMO_DATA), "--split", "val", "--max_samples", "1"]
    assert evaluation.main([*arguments, "--num_workers", "0", "--output", str(tmp_path / "old.json")]) == 0
    protocol = json.loads((tmp_path / "old.json").read_text())["protocol"]
    assert protocol["img_scale"] is None and protocol["mode"] == "whole"  # as before: each image's own size
    assert prediction.main(["--model", str(old), str(VAL_IMAGES[0]), "--output", str(tmp_path / "out")]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / f"{VAL_IMAGES[0].stem}_mask.png"))
    assert mask.shape == Image.open(VAL_IMAGES[0]).size[::-1]


def test_the_data_sets_palette_travels_with_the_model_to_predict(trained_run, predicted):
    output_dir, _ = trained_run
    classes = json.loads((DEMO_DATA / "classes.json").read_text())
    expected = classes["palette_rgb"][:11]
    assert json.loads((output_dir / "config.json").read_text())["palette"] == expected
    # predict.py ran on a copy of this model, without --classes_file.
    mask = Image.open(predicted / f"{VAL_IMAGES[0].stem}_mask.png")
    assert mask.getpalette()[: 3 * 11] == [value for colour in expected for value in colour]
    legend = np.asarray(Image.open(predicted / "legend.png").convert("RGB"))
    # Row i's swatch (8 px padding, 16 px swatches, 8 px between rows) is filled with colour i.
    for index, colour in enumerate(expected):
        assert legend[8 + index * 24 + 8, 16].tolist() == colour, index


# Remote code ----------------------------------------------------------------------------------------------

# A fresh interpreter (-I) where segformer_hf cannot be imported, as on a machine without it.
_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class RefuseSegformerHF:
        def find_spec(self, name, path=None, target=None):
            if name == "segformer_hf" or name.startswith("segformer_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, RefuseSegformerHF())
    model_dir, image_path, output_path, repo_root = sys.argv[1:5]
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", repo_root)]
    try:
        import segformer_hf  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, pipeline

    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    image = Image.open(image_path).convert("RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    segmenter = pipeline("image-segmentation", model=model_dir, trust_remote_code=True)
    label_map = np.full(image.size[::-1], -1)
    for segment in segmenter(image):
        label_map[np.asarray(segment["mask"]) > 0] = segmenter.model.config.label2id[segment["label"]]
    import torch
    save_file({"pixel_values": pixel_values, "label_map": torch.from_numpy(label_map)}, output_path)
    print(json.dumps({
        "blocked": blocked,
        "imported": sorted(m for m in sys.modules if m.split(".")[0] == "segformer_hf"),
        "processor_module": type(processor).__module__,
        "processor_class": type(processor).__name__,
    }))
    """
)


def test_remote_code_processor_and_pipeline_work_in_a_fresh_process_without_segformer_hf(
    contrasted_model, tmp_path
):
    from safetensors.torch import load_file

    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    output = tmp_path / "output.safetensors"
    completed = subprocess.run(
        [sys.executable, "-I", "-c", _FRESH_PROCESS_SCRIPT, str(contrasted_model), str(VAL_IMAGES[0]),
         str(output), str(REPO_ROOT)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["blocked"] and report["imported"] == [], report
    assert report["processor_module"].startswith("transformers_modules."), report
    assert report["processor_class"] == "SegformerHFImageProcessor"
    assert "is not supported" not in completed.stderr, completed.stderr[-2000:]
    remote = load_file(output)
    processor = AutoImageProcessor.from_pretrained(contrasted_model)
    image = Image.open(VAL_IMAGES[0]).convert("RGB")
    assert torch.equal(remote["pixel_values"], processor(images=image, return_tensors="pt")["pixel_values"])
    segmenter = pipeline("image-segmentation", model=str(contrasted_model))
    np.testing.assert_array_equal(
        remote["label_map"].numpy(), _pipeline_label_map(segmenter, segmenter.model, image)
    )
