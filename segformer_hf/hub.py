"""Sharing a trained model on the Hugging Face Hub: the model card, and the push in two formats.

A training run's output directory already holds everything a Hub repository needs; this module
describes it (the card, from config.json, all_results.json and train_config.yaml) and uploads it.

Two formats exist because they serve different users. `segformer_hf` uploads this package's own
classes as remote code: exactly the code that trained the model, loaded with `trust_remote_code=True`.
`transformers` converts the weights to transformers' own SegFormer classes, for users who will not run
remote code. Either way the folder to upload is staged in a temporary directory and sent in one
commit, so the output directory is never modified and the repository never holds half a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

try:  # the HTTP client huggingface_hub is built on: httpx2 (exported under this name) from 2.x, httpx before
    from huggingface_hub.utils import httpx as hub_http
except ImportError:
    import httpx as hub_http

from .configuration_segformer_hf import SegformerHFConfig
from .conversion import to_transformers
from .files import write_atomic
from .modeling_segformer_hf import SegformerHFForSemanticSegmentation

logger = logging.getLogger(__name__)

FORMATS = ("segformer_hf", "transformers")
CARD_TAGS = ["image-segmentation", "segformer", "segformer_hf", "vision"]
REMOTE_CODE_FILES = ("configuration_segformer_hf.py", "modeling_segformer_hf.py")
# The image processor's code, which runs models saved with their evaluation protocol (not older ones).
IMAGE_PROCESSOR_CODE_FILE = "image_processing_segformer_hf.py"
# This package's licence (setup.cfg): what applies to weights that owe nothing to NVIDIA's.
PROJECT_LICENSE = "apache-2.0"
NVIDIA_LICENSE_NAME = "nvidia-source-code-license-for-segformer"
NVIDIA_LICENSE_LINK = "https://github.com/NVlabs/SegFormer/blob/master/LICENSE"

# Data sets whose terms are known, recognised in the dataset name, data directory or label file.
_DATA_LICENCES = (
    (
        re.compile(r"camvid"),
        "CamVid",
        "CC BY-NC 4.0 (non-commercial; cite Brostow et al. 2008, "
        '"Segmentation and Recognition Using Structure from Motion Point Clouds")',
    ),
    (
        re.compile(r"cityscapes"),
        "Cityscapes",
        "the Cityscapes licence, non-commercial use only (https://www.cityscapes-dataset.com/license/)",
    ),
    (
        re.compile(r"ade20k|adechallenge|scene_parse_150"),
        "ADE20K",
        "the ADE20K terms of use (non-commercial research and education; images collected from the web)",
    ),
)
# BatchNorm running statistics are saved with the weights but are not parameters.
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# The training settings a reader of the card needs to reproduce or judge the run, in reading order.
_CARD_TRAINING_KEYS = (
    "model_variant",
    "init_from",
    "dataset_name",
    "dataset_config_name",
    "data_dir",
    "train_split",
    "validation_split",
    "img_scale",
    "ratio_range",
    "crop_size",
    "copy_paste_classes",  # set: some classes were pasted from other frames (copy_paste_prob follows it)
    "learning_rate",
    "head_lr_multiplier",
    "weight_decay",
    "warmup_steps",
    "poly_power",
    "max_train_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "mixed_precision",
    "ema_decay",  # set: the saved weights are the moving average, not the last step's
    "eval_mode",
    "seed",
)
_SEGFORMER_CITATION = """@inproceedings{xie2021segformer,
  title     = {SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers},
  author    = {Xie, Enze and Wang, Wenhai and Yu, Zhiding and Anandkumar, Anima and Alvarez, Jose M. and Luo, Ping},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2021}
}"""


class HubPushError(RuntimeError):
    """A push that could not happen, with a message that says what to do about it."""


# The model card ---------------------------------------------------------------------------------------------


def build_model_card(
    output_dir: str | os.PathLike, *, format: str = "segformer_hf", repo_id: str | None = None
) -> ModelCard:
    """The card of the model in `output_dir`, as it should read in a repository of the given format.

    Metadata (licence, base model, data set, the `model-index` results the Hub displays) goes in the
    YAML front matter; the text gives the licence notice, results per class, a usage snippet for the
    format, and the training configuration. `repo_id` is what the usage snippet loads; without it the
    snippet loads `output_dir` itself.

    Raises:
        ValueError: unknown `format`, or an unreadable config.json / all_results.json / train_config.yaml.
        FileNotFoundError: `output_dir` has no config.json.
    """
    _check_format(format)
    output_dir = Path(output_dir)
    model_config = _read_json(output_dir / "config.json", required=True)
    results = _read_json(output_dir / "all_results.json") or {}
    training = _read_yaml(output_dir / "train_config.yaml") or {}
    run = _RunFacts.collect(output_dir, model_config, training, repo_id)
    metadata = ModelCardData(
        model_name=run.model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=list(CARD_TAGS),
        license="other" if run.from_nvidia else PROJECT_LICENSE,
        license_name=NVIDIA_LICENSE_NAME if run.from_nvidia else None,
        license_link=NVIDIA_LICENSE_LINK if run.from_nvidia else None,
        base_model=run.base_model,
        datasets=[training["dataset_name"]] if training.get("dataset_name") else None,
        eval_results=_eval_results(run, results, training) or None,
    )
    sections = [
        _summary_section(run, format),
        _licence_section(run),
        _results_section(run, results, training),
        _usage_section(run, format),
        _training_section(results, training),
        "## Citation\n\n```bibtex\n" + _SEGFORMER_CITATION + "\n```\n",
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(sections))


def write_model_card(output_dir: str | os.PathLike) -> Path:
    """Writes `output_dir/README.md` (the card of a local run) atomically and returns its path."""
    card = build_model_card(output_dir)
    path = Path(output_dir) / "README.md"
    write_atomic(path, card.save)
    return path


@dataclass
class _RunFacts:
    """What the card says about the run, worked out once from the files the run left."""

    model_name: str
    model_location: str
    variant: str | None
    num_parameters: int | None
    id2label: dict[int, str]
    init_from: str | None
    from_nvidia: bool
    base_model: str | None
    dataset: str | None
    data_licence: str

    @classmethod
    def collect(cls, output_dir: Path, model_config: dict, training: dict, repo_id: str | None) -> _RunFacts:
        id2label = {int(index): str(name) for index, name in (model_config.get("id2label") or {}).items()}
        init_from = training.get("init_from")
        return cls(
            model_name=repo_id.split("/")[-1] if repo_id else output_dir.resolve().name,
            model_location=repo_id or str(output_dir),
            variant=_variant_name(model_config, training),
            num_parameters=_count_parameters(output_dir),
            id2label=dict(sorted(id2label.items())),
            init_from=init_from,
            from_nvidia=started_from_nvidia_weights(init_from),
            base_model=hub_model_id(init_from),
            dataset=training.get("dataset_name") or _directory_name(training.get("data_dir")),
            data_licence=_data_licence(training),
        )


def started_from_nvidia_weights(init_from: str | None, _depth: int = 0) -> bool:
    """Whether training started from NVIDIA's released SegFormer weights (non-commercial licence).

    True for `nvidia/...` Hub ids (and their local snapshots), for `.pth`/`.pt` files (the format
    NVlabs released its checkpoints in), and for an earlier segformer_hf run that itself started from them.
    """
    if not init_from:
        return False
    if init_from.startswith("nvidia/") or "models--nvidia--" in init_from:
        return True
    if Path(init_from).suffix.lower() in (".pth", ".pt"):
        return True
    earlier_run = Path(init_from) / "train_config.yaml"
    if _depth < 8 and earlier_run.is_file():
        return started_from_nvidia_weights((_read_yaml(earlier_run) or {}).get("init_from"), _depth + 1)
    return False


def hub_model_id(init_from: str | None) -> str | None:
    """`init_from` when it names a Hub model (not a local path or checkpoint file), else None."""
    if not init_from or not _HUB_REPO_ID.fullmatch(init_from) or Path(init_from).exists():
        return None
    return None if init_from.lower().endswith(_CHECKPOINT_SUFFIXES) else init_from


def _variant_name(model_config: dict, training: dict) -> str | None:
    """The MiT variant: recorded in the config, else recognised from its sizes, else the recipe's."""
    if model_config.get("variant"):
        return str(model_config["variant"])
    recognised = SegformerHFConfig.variant_for_sizes(
        model_config.get("hidden_sizes", ()), model_config.get("depths", ())
    )
    if recognised:
        return recognised
    return training.get("model_variant") if not training.get("init_from") else None


def _count_parameters(output_dir: Path) -> int | None:
    """Parameters in the saved weights, read from the safetensors headers (no tensor is loaded)."""
    files = _weight_files(output_dir)
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                if not name.endswith(_BUFFER_SUFFIXES):
                    total += math.prod(weights.get_slice(name).get_shape())
    return total


def _data_licence(training: dict) -> str:
    where = " ".join(
        str(training.get(key) or "") for key in ("dataset_name", "data_dir", "id2label_file")
    ).lower()
    for pattern, name, terms in _DATA_LICENCES:
        if pattern.search(where):
            return f"The training data ({name}) is under {terms}."
    if training.get("dataset_name"):
        name = training["dataset_name"]
        return f"The training data's terms are on its card: https://huggingface.co/datasets/{name}."
    if training.get("data_dir"):
        return (
            f"The licence of the training data (`{training['data_dir']}`) is not recorded: check its terms."
        )
    return "The training data is not recorded."


def _eval_results(run: _RunFacts, results: dict, training: dict) -> list[EvalResult]:
    """The validation metrics as `model-index` entries, which the Hub shows on the model page."""
    metrics = (
        ("mean_iou", "Mean IoU", "eval_mean_iou"),
        ("mean_accuracy", "Mean accuracy", "eval_mean_accuracy"),
        ("overall_accuracy", "Overall accuracy", "eval_overall_accuracy"),
    )
    dataset = run.dataset or "unknown"
    entries = []
    for metric_type, metric_name, key in metrics:
        value = _finite(results.get(key))
        if value is None:
            continue
        entries.append(
            EvalResult(
                task_type="image-segmentation",
                task_name="Semantic segmentation",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=training.get("dataset_config_name"),
                dataset_split=training.get("validation_split"),
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(value, 4),
            )
        )
    return entries


def _summary_section(run: _RunFacts, format: str) -> str:
    details = [f"MiT-{run.variant.upper()} encoder"] if run.variant else []
    if run.num_parameters:
        details.append(f"{run.num_parameters:,} parameters")
    name = f"SegFormer-{run.variant.upper()}" if run.variant else "SegFormer"
    described = f"{name} ({', '.join(details)})" if details else name
    start = f"starting from `{run.init_from}`" if run.init_from else "from scratch"
    data = f" on {run.dataset}" if run.dataset else ""
    if format == "segformer_hf":
        loading = (
            "The model is stored with segformer_hf's own classes as remote code (the code that trained it): "
            "load it with `trust_remote_code=True`."
        )
    else:
        loading = (
            "The weights are converted to transformers' own `SegformerForSemanticSegmentation`: they load with "
            "stock transformers, no remote code."
        )
    return (
        f"# {run.model_name}\n\n"
        f"{described}: semantic segmentation into {len(run.id2label)} classes, trained with segformer_hf "
        f"{start}{data}. {loading}\n"
    )


def _licence_section(run: _RunFacts) -> str:
    if run.from_nvidia:
        weights = (
            f"Training started from NVIDIA's SegFormer weights (`{run.init_from}`), which are under the "
            f"non-commercial NVIDIA Source Code License for SegFormer ({NVIDIA_LICENSE_LINK}). This model is "
            "derived from them, so the same licence applies: research and evaluation only, no commercial use."
        )
    else:
        weights = (
            "Training started from scratch, not from NVIDIA's SegFormer weights, so NVIDIA's non-commercial "
            f"licence does not apply; the weights are offered under {PROJECT_LICENSE}."
        )
    return f"## Licence\n\n{weights} {run.data_licence}\n"


def _results_section(run: _RunFacts, results: dict, training: dict) -> str:
    if _finite(results.get("eval_mean_iou")) is None:
        return "## Results\n\nNo evaluation results were recorded for this model.\n"
    split = training.get("validation_split")
    lines = [
        f"## Results{f' ({split} split)' if split else ''}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mean IoU | {_number(results.get('eval_mean_iou'))} |",
        f"| mean accuracy | {_number(results.get('eval_mean_accuracy'))} |",
        f"| overall accuracy | {_number(results.get('eval_overall_accuracy'))} |",
    ]
    per_class_iou = results.get("eval_per_category_iou") or []
    per_class_accuracy = results.get("eval_per_category_accuracy") or []
    if per_class_iou:
        with_accuracy = len(per_class_accuracy) == len(per_class_iou)
        lines += [
            "",
            "Per class (n/a: undefined, the class occurs neither in the validation labels nor in the predictions; "
            "for accuracy, not in the labels):",
            "",
        ]
        lines += (
            ["| class | IoU | accuracy |", "|---|---|---|"]
            if with_accuracy
            else ["| class | IoU |", "|---|---|"]
        )
        for index, iou in enumerate(per_class_iou):
            row = f"| {run.id2label.get(index, str(index))} | {_number(iou)} |"
            lines.append(row + (f" {_number(per_class_accuracy[index])} |" if with_accuracy else ""))
    return "\n".join(lines) + "\n"


def _usage_section(run: _RunFacts, format: str) -> str:
    if format == "segformer_hf":
        model_class, remote = "AutoModelForSemanticSegmentation", ", trust_remote_code=True"
        note = (
            "`trust_remote_code=True` runs this repository's `modeling_segformer_hf.py`, "
            "`configuration_segformer_hf.py` and `image_processing_segformer_hf.py`: read them first, "
            "and pin `revision=` to the commit you read."
        )
    else:
        model_class, remote = "SegformerForSemanticSegmentation", ""
        note = "Only transformers' own SegFormer code runs: no remote code is needed."
    snippet = f'''import torch
from PIL import Image
from transformers import AutoImageProcessor, {model_class}, pipeline

model_id = "{run.model_location}"
image = Image.open("image.jpg").convert("RGB")

# The pipeline returns one mask per class present, at the image's size.
segmenter = pipeline("image-segmentation", model=model_id{remote})
for segment in segmenter(image):
    print(segment["label"], segment["mask"].size)

# Step by step: logits at a quarter of the processed size, then a label map at the image's size.
processor = AutoImageProcessor.from_pretrained(model_id{remote})
model = {model_class}.from_pretrained(model_id{remote}).eval()
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
print(label_map.shape, [model.config.id2label[int(index)] for index in label_map.unique()])'''
    return f"## Usage\n\n```python\n{snippet}\n```\n\n{note}\n"


def _training_section(results: dict, training: dict) -> str:
    if not training:
        return "## Training\n\nThe training configuration was not recorded.\n"
    rows = [(key, training[key]) for key in _CARD_TRAINING_KEYS if training.get(key) is not None]
    if training.get("copy_paste_classes"):
        rows.insert(
            [key for key, _ in rows].index("copy_paste_classes") + 1,
            ("copy_paste_prob", training.get("copy_paste_prob")),
        )
    world_size = results.get("world_size")
    if world_size and training.get("per_device_train_batch_size"):
        total = (
            training["per_device_train_batch_size"]
            * world_size
            * training.get("gradient_accumulation_steps", 1)
        )
        rows.append(("total batch size", f"{total} ({world_size} processes)"))
    for key, label, formatter in (
        ("train_steps", "steps run", str),
        ("train_loss", "mean training loss", _number),
        ("train_runtime", "training time", lambda seconds: f"{seconds / 60:.1f} min"),
    ):
        if results.get(key) is not None:
            rows.append((label, formatter(results[key])))
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows)
    full = yaml.safe_dump(training, sort_keys=False).rstrip()
    return (
        "## Training\n\n| setting | value |\n|---|---|\n"
        f"{table}\n\n<details>\n<summary>Full training configuration (train_config.yaml)</summary>\n\n"
        f"```yaml\n{full}\n```\n\n</details>\n"
    )


# Pushing ----------------------------------------------------------------------------------------------------


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    format: str = "segformer_hf",
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Uploads the model in `output_dir` to the Hub repository `repo_id` in one commit; returns its URL.

    The repository is created if needed. `output_dir` is only read. The token is `token`, else the
    one `hf auth login` stored or HF_TOKEN; nothing ever prompts.

    Raises:
        HubPushError: bad repo id, not logged in, token refused, no write access, network failure; the
            message says what to do.
        FileNotFoundError, ValueError: `output_dir` is not a complete segformer_hf output directory.
    """
    _check_format(format)
    _check_repo_id(repo_id)
    token = _token_or_explain(token, repo_id)
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="segformer_hf-push-") as staging:
        uploaded = prepare_upload_folder(output_dir, staging, format=format, repo_id=repo_id)
        logger.info("Pushing %s to %s (%s format): %s", output_dir, repo_id, format, ", ".join(uploaded))
        api = HfApi(token=token)
        retry_command = " ".join(
            ["python scripts/push_to_hub.py", str(output_dir), "--repo_id", repo_id, "--format", format]
            + (["--private"] if private else [])
        )
        commit_message = (
            commit_message or f"Upload {repo_id.split('/')[-1]} ({format} format) with segformer_hf"
        )
        with _explain_hub_errors(repo_id, output_dir, retry_command):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id, repo_type="model", folder_path=staging, commit_message=commit_message
            )
    return str(repo_url)


def prepare_upload_folder(
    output_dir: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    format: str = "segformer_hf",
    repo_id: str | None = None,
) -> list[str]:
    """Fills `destination` with exactly what a repository of `format` holds; returns the file names.

    `segformer_hf`: the safetensors weights, config.json (with its auto_map), the remote-code files
    (the image processor's too when its config names it), the image processor config, the card, all_results.json and train_config.yaml. `transformers`: the
    weights converted to transformers' SegformerForSemanticSegmentation (model_type "segformer", no
    auto_map, no code), an image processor config of transformers' own (`stock_image_processor`), the card
    and all_results.json.

    Raises:
        FileNotFoundError: a file the format needs is missing from `output_dir` (named).
        ValueError: `output_dir` does not hold a segformer_hf model saved with its auto_map.
    """
    _check_format(format)
    output_dir, destination = Path(output_dir), Path(destination)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a directory: pass the output_dir of a training run.")
    model_config = _read_json(output_dir / "config.json", required=True)
    if model_config.get("model_type") != "segformer_hf":
        raise ValueError(
            f"{output_dir / 'config.json'} has model_type {model_config.get('model_type')!r}, not 'segformer_hf': "
            "push the output_dir of a segformer_hf training run."
        )
    weights = _weight_files(output_dir)
    if not weights:
        raise FileNotFoundError(f"{output_dir} holds no safetensors weights (model.safetensors).")
    required = ["preprocessor_config.json"]
    optional = ["all_results.json"]
    if format == "segformer_hf":
        if not model_config.get("auto_map"):
            raise ValueError(
                f"{output_dir / 'config.json'} has no auto_map, so the Hub copy could not load as remote code: "
                "re-save the model with `import segformer_hf` done first (save_pretrained then writes it)."
            )
        required += ["config.json", *REMOTE_CODE_FILES, *(path.name for path in weights)]
        if _image_processor_is_remote_code(output_dir):
            required.append(IMAGE_PROCESSOR_CODE_FILE)
        optional += ["train_config.yaml"]
        index = output_dir / "model.safetensors.index.json"
        if index.exists():
            required.append(index.name)
    missing = [name for name in required if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir} lacks {', '.join(missing)}, needed for the {format} format.")
    destination.mkdir(parents=True, exist_ok=True)
    if format == "transformers":
        model = to_transformers(SegformerHFForSemanticSegmentation.from_pretrained(output_dir))
        model.save_pretrained(destination, safe_serialization=True)
        if _image_processor_is_remote_code(output_dir):
            stock_image_processor(output_dir).save_pretrained(destination)
            required.remove("preprocessor_config.json")
    for name in required + optional:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, destination / name)
        else:
            logger.warning("%s has no %s: the Hub repository will not have it either.", output_dir, name)
    build_model_card(output_dir, format=format, repo_id=repo_id).save(destination / "README.md")
    return sorted(path.name for path in destination.iterdir())


def push_space(
    space_id: str,
    model_id: str,
    *,
    examples: list[str | os.PathLike] | tuple = (),
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Uploads a Gradio Space that serves `segformer-hf demo` for the Hub model `model_id`; returns its URL.

    The Space's files (app.py, requirements.txt, its README with the Space metadata, the package source
    and copies of the `examples` images; see `demo.write_space`) are staged in a temporary directory and
    sent in one commit. The model must be on the Hub for the Space to load it.

    Raises:
        HubPushError: as `push_to_hub`.
        ImportError: gradio is not installed (the Space runs the gradio version the app is built with).
    """
    from .demo import write_space

    for repo_id in (space_id, model_id):
        _check_repo_id(repo_id)
    token = _token_or_explain(token, space_id)
    with tempfile.TemporaryDirectory(prefix="segformer_hf-space-") as staging:
        uploaded = write_space(staging, model_id, examples=examples)
        logger.info("Pushing a demo Space for %s to %s: %d files", model_id, space_id, len(uploaded))
        api = HfApi(token=token)
        retry_command = " ".join(
            ["python scripts/push_to_hub.py", "--repo_id", model_id, "--space", space_id]
            + (["--private"] if private else [])
        )
        commit_message = commit_message or f"Demo of {model_id} (segformer-hf demo)"
        with _explain_hub_errors(space_id, None, retry_command):
            repo_url = api.create_repo(
                space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio"
            )
            api.upload_folder(
                repo_id=space_id, repo_type="space", folder_path=staging, commit_message=commit_message
            )
    return str(repo_url)


@contextmanager
def _explain_hub_errors(repo_id: str, output_dir: Path | None, retry_command: str) -> Iterator[None]:
    """Turns the Hub client's errors into messages that say what to do next."""
    unchanged = f"Nothing was uploaded; {output_dir} is unchanged." if output_dir else "Nothing was uploaded."
    retry = f"then run the push again ({retry_command})."
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            advice = (
                "the Hub rejected the token (401 Unauthorized): it is invalid, expired or lacks write access. "
                f"Log in again with `hf auth login` (or set HF_TOKEN to a write token), {retry}"
            )
        elif status == 403:
            namespace = repo_id.split("/")[0]
            advice = (
                f"the token may not write to {repo_id} (403 Forbidden). Check that {namespace!r} is your user "
                "name or an organisation where you can write, and that the token has the write role "
                f"(https://huggingface.co/settings/tokens); {retry}"
            )
        elif status == 404:
            advice = f"{repo_id} was not found (404): check the repo id (USER/NAME), {retry}"
        elif status is not None and 400 <= status < 500:
            advice = (
                f"the Hub refused the request ({status}): check the repo id {repo_id!r} (USER/NAME). {error}"
            )
        else:
            advice = f"the Hub failed ({status}: {error}); try again later."
        raise HubPushError(f"Could not push to {repo_id}: {advice} {unchanged}") from error
    except OfflineModeIsEnabled as error:
        raise HubPushError(
            f"Could not push to {repo_id}: HF_HUB_OFFLINE is set, so the Hub is not contacted. Unset it, {retry} "
            f"{unchanged}"
        ) from error
    except (hub_http.TransportError, ConnectionError, TimeoutError) as error:
        raise HubPushError(
            f"Could not reach the Hugging Face Hub to push to {repo_id} ({type(error).__name__}: {error}). Check "
            f"the network connection (and HF_ENDPOINT or proxy settings if you use them), {retry} {unchanged}"
        ) from error


def stock_image_processor(output_dir: str | os.PathLike) -> Any:
    """transformers' own `SegformerImageProcessor` closest to the saved `SegformerHFImageProcessor`, for a
    repository without code: the same keep-ratio sizes (shortest edge `short`, longest at most `long` is
    mmseg's rule) and normalisation, but PIL's (antialiased) resampling, so pixel values differ slightly."""
    from transformers import SegformerImageProcessor

    saved = _read_json(Path(output_dir) / "preprocessor_config.json", required=True)
    settings = {
        name: saved[name]
        for name in (
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
            "do_reduce_labels",
        )
        if name in saved
    }
    img_scale = saved.get("img_scale")
    if img_scale and saved.get("do_resize", True):
        settings["size"] = {"shortest_edge": min(img_scale), "longest_edge": max(img_scale)}
        settings["default_to_square"] = False
    else:
        settings["do_resize"] = False
    return SegformerImageProcessor(**settings)


def _image_processor_is_remote_code(output_dir: Path) -> bool:
    saved = _read_json(output_dir / "preprocessor_config.json")
    return "AutoImageProcessor" in (saved or {}).get("auto_map", {})


# Small helpers ----------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"{repo_id!r} is not a valid Hub repo id: {error}") from error
    if repo_id.count("/") != 1:
        raise HubPushError(f"{repo_id!r} is not a valid Hub repo id: use USER/NAME or ORGANISATION/NAME.")


def _token_or_explain(token: str | None, repo_id: str) -> str:
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPushError(
            f"Not logged in to the Hugging Face Hub, so nothing was pushed to {repo_id}. Run `hf auth login` "
            "with a token that has write access, or set HF_TOKEN, or pass --token (token=...)."
        )
    return token


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"Unknown Hub format {format!r}; choose one of {', '.join(FORMATS)}.")


def _weight_files(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*.safetensors"))


def _read_json(path: Path, required: bool = False) -> dict | None:
    """A JSON object from `path` (NaN literals allowed, as Python's json writes them), or None if absent."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found: pass the output_dir of a segformer_hf training run.")
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(payload).__name__}")
    return payload


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if payload is not None and not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a mapping of training settings, found {type(payload).__name__}")
    return payload


def _directory_name(path: str | None) -> str | None:
    return (Path(path).name or Path(path).resolve().name) if path else None


def _finite(value: Any) -> float | None:
    """`value` as a float, or None for missing, null and NaN (a class absent from labels and predictions)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number(value: Any) -> str:
    number = _finite(value)
    return "n/a" if number is None else f"{number:.4f}"


def _cell(value: Any) -> str:
    """A table cell: lists as [a, b], and no character that would break the Markdown table."""
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = [
    "FORMATS",
    "HubPushError",
    "build_model_card",
    "hub_model_id",
    "prepare_upload_folder",
    "push_space",
    "push_to_hub",
    "started_from_nvidia_weights",
    "write_model_card",
]


# The command line ----------------------------------------------------------------------------------------


def parse_push_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segformer-hf push",
        description="Push a trained output directory to the Hub, with its model card, in one commit; "
        "with --space, also a Gradio Space that serves the model's demo (`segformer-hf demo`).",
    )
    parser.add_argument(
        "output_dir",
        nargs="?",
        default=None,
        help="the output directory of a training run (scripts/train.py); leave out with --space to push "
        "only a Space for a model already on the Hub",
    )
    parser.add_argument(
        "--repo_id", required=True, help="USER/NAME or ORGANISATION/NAME of the model; created if missing"
    )
    parser.add_argument("--private", action="store_true", help="create the repositories as private")
    parser.add_argument("--format", choices=FORMATS, default="segformer_hf", help="what the repository holds")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument(
        "--token", default=None, help="a write token (default: the `hf auth login` one, or HF_TOKEN)"
    )
    parser.add_argument(
        "--space",
        default=None,
        metavar="USER/NAME",
        help="also push a Gradio Space running the demo of --repo_id",
    )
    parser.add_argument(
        "--examples",
        default=None,
        help="directory of example images for the Space (default: the bundled CamVid images when "
        "OUTPUT_DIR's model predicts their classes)",
    )
    arguments = parser.parse_args(argv)
    if arguments.output_dir is None and arguments.space is None:
        parser.error("give the OUTPUT_DIR to push, or --space USER/NAME (or both)")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """`segformer-hf push OUTPUT_DIR --repo_id USER/NAME [--space USER/NAME]`: exit 0 and print the URLs, 1
    with the reason."""
    arguments = parse_push_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if arguments.output_dir is not None:
            url = push_to_hub(
                arguments.output_dir,
                arguments.repo_id,
                private=arguments.private,
                format=arguments.format,
                commit_message=arguments.commit_message,
                token=arguments.token,
            )
            print(url)
        if arguments.space is not None:
            url = push_space(
                arguments.space,
                arguments.repo_id,
                examples=_space_examples(arguments),
                private=arguments.private,
                token=arguments.token,
            )
            print(url)
    except (HubPushError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"push_to_hub: {error}", file=sys.stderr)
        return 1
    return 0


def _space_examples(arguments: argparse.Namespace) -> list[str | os.PathLike]:
    """--examples, else the bundled CamVid images for a model of their classes, else none."""
    from .demo import demo_example_images, has_demo_classes

    if arguments.examples is not None:
        return [arguments.examples]
    if arguments.output_dir is not None:
        config = _read_json(Path(arguments.output_dir) / "config.json") or {}
        if has_demo_classes(config.get("id2label") or {}):
            return demo_example_images()
    return []
