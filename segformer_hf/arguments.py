"""Training arguments: dataclasses grouped by concern, recipe YAML files, and the command-line parser.

A run is configured by a recipe (a flat YAML mapping of argument names to values, which may inherit
from another recipe through a `base:` key) and `--key value` flags on top. Every argument is a field
of one of the groups below with a `help` text, so `segformer-hf train --help` documents them all, and
transformers' `HfArgumentParser` turns them into flags. `TrainingConfig` is the flat union of the
groups that the rest of the package reads (`config.learning_rate`, `config.crop_size`, ...).

Names follow transformers' `TrainingArguments` where the meaning is the same (`warmup_steps`,
`warmup_ratio`, `max_grad_norm`, `dataloader_num_workers`, `push_to_hub`, `hub_private_repo`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transformers import HfArgumentParser

from .configuration_segformer_hf import VARIANTS
from .inference import InferenceProtocol

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "demo"
RECIPE_SUFFIXES = (".yaml", ".yml")
# Relative paths in a recipe are looked up beside the recipe first (shipped recipes find their bundled data
# and label files from any directory), then in the current directory.
RECIPE_PATH_KEYS = ("data_dir", "id2label_file")


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field with `--help` text; `default_factory` for lists."""
    if "default" in kwargs and isinstance(kwargs["default"], list):
        value = kwargs.pop("default")
        kwargs["default_factory"] = lambda: list(value)
    return field(metadata={"help": text}, **kwargs)


class LabelMap(dict):
    """`id2label` from YAML (`{0: road, 1: sky}`) or the command line (`--id2label '{0: road, 1: sky}'`)."""

    def __init__(self, value: Any = None) -> None:
        if not isinstance(value, str | list):
            value = list(value)  # dataclasses.asdict rebuilds it from a generator
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"id2label must be a mapping of class ids to names, got {value!r}")
        super().__init__({int(index): str(name) for index, name in (value or {}).items()})


class ClassWeights:
    """`class_weights`: one weight per class (`[1.0, 2.5, ...]`, a YAML list or a flow list on the command line),
    or `auto`: computed from the training labels' class frequencies (see `data.frequency_class_weights`)."""

    def __init__(self, value: Any) -> None:
        if isinstance(value, ClassWeights):
            value = value.to_yaml()
        if isinstance(value, str):
            value = value if value.strip() == "auto" else yaml.safe_load(value)
        self.auto = value == "auto"
        if not self.auto and not (isinstance(value, list) and all(isinstance(v, int | float) for v in value)):
            raise ValueError(f"class_weights must be a list of numbers or auto, got {value!r}")
        self.values = None if self.auto else [float(v) for v in value]

    def to_yaml(self) -> str | list[float]:
        return "auto" if self.auto else list(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassWeights) and self.to_yaml() == other.to_yaml()

    def __repr__(self) -> str:
        return f"ClassWeights({self.to_yaml()!r})"


@dataclass
class ModelArguments:
    """Which network to train. The architecture is decided in one place: `model_variant` for a model
    trained from scratch, or the checkpoint named by `init_from` (its variant must then agree with
    `model_variant` when both are given)."""

    _argument_group_name: ClassVar[str] = "model"

    model_variant: str | None = _help(
        "MiT variant b0..b5 to train from scratch, or the expected variant of init_from", default=None
    )
    init_from: str | None = _help(
        "start from these weights: a Hub id (nvidia/mit-b0, nvidia/segformer-b0-finetuned-ade-512-512), "
        "a local directory or an NVlabs .pth file; null trains from scratch",
        default=None,
    )
    ignore_mismatched_sizes: bool = _help(
        "allow init_from's classifier to have another number of classes (it is then re-initialised)",
        default=False,
    )
    drop_path_rate: float = _help("stochastic depth rate of the last encoder block", default=0.1)
    classifier_dropout_prob: float = _help("dropout before the decoder's classifier", default=0.1)
    class_weights: ClassWeights | None = _help(
        "cross-entropy weight per class ([w0, w1, ...]), or auto: from the training labels' class frequencies",
        default=None,
    )
    class_weights_power: float = _help(
        "with class_weights auto: the frequency weights raised to this power; 1 is ENet's weighting, 0.5 damps it "
        "(rare classes still weighted up, with fewer false positives than at 1)",
        default=1.0,
    )
    use_ohem: bool = _help("online hard example mining (mmseg's OHEMPixelSampler) in the loss", default=False)
    ohem_thresh: float | None = _help(
        "with use_ohem: pixels whose true-class probability is below this are hard (e.g. 0.7); null: the "
        "ohem_min_kept hardest",
        default=None,
    )
    ohem_min_kept: int = _help("with use_ohem: hard pixels kept at least, per image", default=100000)
    dice_weight: float = _help(
        "weight of a soft Dice loss added to the cross-entropy (nnU-Net's CE + Dice; each class counts the "
        "same whatever its pixel share); 0: off",
        default=0.0,
    )


@dataclass
class DataArguments:
    """Where the images and label maps come from and how labels are read."""

    _argument_group_name: ClassVar[str] = "data"

    dataset_name: str | None = _help(
        "a Hub dataset id or a local dataset folder for datasets.load_dataset", default=None
    )
    dataset_config_name: str | None = _help("the Hub dataset's configuration name", default=None)
    data_dir: str | None = _help(
        "a local data directory (pairs, ade20k, cityscapes, imagefolder or parquet layout)", default=None
    )
    data_format: str = _help("layout of data_dir; auto detects it", default="auto")
    train_split: str = _help("name of the training split", default="train")
    validation_split: str = _help(
        "name of the validation split; if missing, validation_fraction of train is held out",
        default="validation",
    )
    image_column: str = _help("image column of a Hub dataset", default="image")
    label_column: str = _help("label-map column of a Hub dataset", default="label")
    validation_fraction: float = _help(
        "share of train held out (seeded) when there is no validation split", default=0.1
    )
    id2label: LabelMap | None = _help(
        "class names {id: name}; else id2label_file or the dataset's", default=None
    )
    id2label_file: str | None = _help("JSON file with {id: name} or {id2label: {...}}", default=None)
    ignore_index: int = _help("label value that is ignored by the loss and the metric", default=255)
    reduce_labels: bool = _help(
        "labels where 0 means 'other' (ADE20K): 0 becomes ignore_index and the others shift down by one",
        default=False,
    )
    skip_bad_samples: bool = _help(
        "replace unreadable or invalid training samples by an ignored placeholder instead of stopping",
        default=False,
    )
    max_train_samples: int | None = _help("use only the first N training samples", default=None)
    max_eval_samples: int | None = _help("use only the first N validation samples", default=None)
    dataloader_num_workers: int = _help("DataLoader worker processes per training process", default=2)
    streaming: bool = _help(
        "read the training split as it is used (datasets' streaming: nothing downloaded or cached first) "
        "from a Hub dataset or a parquet/imagefolder data_dir; needs a validation split, which is read into "
        "memory. Checkpoints keep the position in the stream",
        default=False,
    )
    shuffle_buffer_size: int = _help(
        "streaming only: samples in the seeded shuffle buffer (0: stream order). A run resumed mid-epoch "
        "with a buffer loses the samples that were in it for that epoch; with 0 it resumes exactly",
        default=1000,
    )


@dataclass
class AugmentationArguments:
    """The paper's (mmseg's) training augmentation: keep-ratio resize x a random ratio, random crop,
    flip, photometric distortion."""

    _argument_group_name: ClassVar[str] = "augmentation"

    img_scale: list[int] = _help(
        "keep-ratio resize bound (long side, short side) before the random ratio", default=[2048, 512]
    )
    ratio_range: list[float] = _help("random resize ratio range (low, high)", default=[0.5, 2.0])
    crop_size: list[int] = _help("training crop (height, width); also the sliding window", default=[512, 512])
    cat_max_ratio: float = _help(
        "re-draw a crop (up to 10 times) while one class covers more than this share of it", default=0.75
    )
    flip_prob: float = _help("probability of a horizontal flip", default=0.5)
    photometric_distortion: bool = _help(
        "brightness, contrast, saturation and hue jitter as in mmseg", default=True
    )
    copy_paste_classes: list[str] | None = _help(
        "classes (names or ids) whose pixels are copied from another training frame that holds them onto a "
        "frame, at the same place, before the resize and crop (ClassMix-style copy-paste: thin rare classes "
        "such as poles and signs seen in front of many backgrounds); map-style data only",
        default=None,
    )
    copy_paste_prob: float = _help(
        "with copy_paste_classes: probability that a training frame gets a donor frame's pixels", default=0.5
    )
    augment_device: str = _help(
        "cpu: DataLoader workers run the whole augmentation (numpy); cuda: workers only decode and draw, "
        "and the batch is resized, cropped, flipped, distorted and normalised on the GPU in torch "
        "(same draws, same labels, images equal up to rounding)",
        default="cpu",
    )


@dataclass
class EvaluationArguments:
    """How validation images are predicted: the inference protocol (see `inference.InferenceProtocol`)."""

    _argument_group_name: ClassVar[str] = "evaluation protocol"

    eval_img_scale: list[int] | None = _help(
        "keep-ratio resize bound of validation images; default: img_scale", default=None
    )
    eval_mode: str = _help("whole (one forward pass) or slide (windows of crop_size)", default="whole")
    eval_stride: list[int] | None = _help(
        "sliding-window stride (height, width); default: 2/3 of crop_size", default=None
    )
    eval_steps: int = _help("evaluate every N optimisation steps (and always at the end)", default=500)
    metric_backend: str = _help(
        "streaming (our confusion matrix) or evaluate (evaluate.load('mean_iou'), needs the Hub)",
        default="streaming",
    )
    num_log_images: int = _help(
        "validation images sent to the trackers as image | truth | prediction panels", default=4
    )


@dataclass
class OptimizationArguments:
    """AdamW with a 10x decoder learning rate, linear warm-up, then polynomial decay (the paper's recipe)."""

    _argument_group_name: ClassVar[str] = "optimisation"

    learning_rate: float = _help("peak learning rate of the encoder", default=6e-5)
    head_lr_multiplier: float = _help("decoder learning rate = this x learning_rate", default=10.0)
    weight_decay: float = _help("AdamW weight decay (not applied to norms and biases)", default=0.01)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    warmup_steps: int = _help("linear warm-up steps; 0 uses warmup_ratio", default=0)
    warmup_ratio: float = _help(
        "warm-up as a fraction of max_train_steps, used when warmup_steps is 0", default=0.0
    )
    warmup_start_factor: float = _help(
        "learning-rate factor at the first warm-up step (mmseg's warmup_ratio)", default=1e-6
    )
    poly_power: float = _help("power of the polynomial decay", default=1.0)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.0)
    max_train_steps: int = _help("optimisation steps of the run", default=1000)
    per_device_train_batch_size: int = _help("training batch per process", default=8)
    per_device_eval_batch_size: int = _help("validation batch per process", default=1)
    gradient_accumulation_steps: int = _help("micro-batches per optimisation step", default=1)
    max_grad_norm: float | None = _help("clip the gradient norm to this; null: no clipping", default=None)
    ema_decay: float | None = _help(
        "keep an exponential moving average of the weights with this decay (e.g. 0.999); validation, best/ "
        "and the saved model then use the average; null: off",
        default=None,
    )
    mixed_precision: str = _help("no, fp16 or bf16", default="no")
    torch_compile: bool = _help(
        "compile the model with torch.compile before training; saved weights keep their names",
        default=False,
    )
    torch_compile_backend: str = _help(
        "torch.compile backend when torch_compile is on (inductor; aot_eager to debug a graph quickly)",
        default="inductor",
    )
    torch_compile_mode: str | None = _help(
        "torch.compile mode when torch_compile is on (default, reduce-overhead, max-autotune); null: default",
        default=None,
    )
    seed: int = _help("seed of the model initialisation, the data order and the augmentation", default=42)
    nan_policy: str = _help(
        "stop: a non-finite loss or gradient ends the run; skip: that update is skipped and counted",
        default="stop",
    )


@dataclass
class RunArguments:
    """Where the run writes, how it logs and checkpoints, and where it is shared."""

    _argument_group_name: ClassVar[str] = "run, logging and Hub"

    output_dir: str = _help("directory of the model, logs and checkpoints", default="outputs/run")
    overwrite_output_dir: bool = _help("start afresh in a non-empty output_dir", default=False)
    resume_from_checkpoint: str | None = _help("a checkpoint directory, or latest", default=None)
    ddp_timeout: int = _help(
        "seconds a process waits for its peers in a collective before the run stops with an error",
        default=1800,
    )
    checkpointing_steps: int = _help("save a resumable checkpoint every N steps", default=500)
    checkpoints_total_limit: int | None = _help("keep the N newest checkpoints; null keeps all", default=2)
    logging_steps: int = _help("send the loss to the trackers every N steps", default=10)
    report_to: str = _help("none, tensorboard, wandb, or a comma list", default="none")
    project_name: str = _help("tracker project name", default="segformer_hf")
    push_to_hub: bool = _help(
        "push the final model to the Hub (needs hub_model_id and a token)", default=False
    )
    hub_model_id: str | None = _help("Hub repository USER/NAME to push to", default=None)
    hub_private_repo: bool = _help("create the Hub repository as private", default=False)
    hub_format: str = _help(
        "segformer_hf (our files + remote code) or transformers (loads with transformers' Segformer)",
        default="segformer_hf",
    )


ARGUMENT_GROUPS = (
    ModelArguments,
    DataArguments,
    AugmentationArguments,
    EvaluationArguments,
    OptimizationArguments,
    RunArguments,
)


@dataclass
class TrainingConfig(
    RunArguments,
    OptimizationArguments,
    EvaluationArguments,
    AugmentationArguments,
    DataArguments,
    ModelArguments,
):
    """Every argument of a training run, flat: what recipes, `train_config.yaml` and checkpoints store."""

    def __post_init__(self) -> None:
        # Recipes for several variants name their weights and outputs after it: `nvidia/mit-{model_variant}`.
        for name in ("init_from", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, str) and "{model_variant}" in value and self.model_variant:
                setattr(self, name, value.replace("{model_variant}", self.model_variant))
        if self.class_weights is not None and not isinstance(self.class_weights, ClassWeights):
            self.class_weights = ClassWeights(self.class_weights)
        if self.id2label is not None and not isinstance(self.id2label, LabelMap):
            self.id2label = LabelMap(self.id2label)
        if self.warmup_steps == 0 and self.warmup_ratio > 0:
            self.warmup_steps = math.ceil(self.warmup_ratio * self.max_train_steps)
        if self.warmup_steps >= self.max_train_steps > 0:
            logger.warning(
                "warmup_steps (%d) is not shorter than max_train_steps (%d): warm-up shortened to %d steps",
                self.warmup_steps,
                self.max_train_steps,
                self.max_train_steps - 1,
            )
            self.warmup_steps = self.max_train_steps - 1

    def inference_protocol(self) -> InferenceProtocol:
        """How validation images are predicted during training; saved with the model for every later caller."""
        return InferenceProtocol(
            mode=self.eval_mode,
            img_scale=tuple(self.eval_img_scale or self.img_scale),
            crop_size=tuple(self.crop_size),
            stride=tuple(self.eval_stride) if self.eval_stride else None,
        )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.id2label is not None:
            values["id2label"] = dict(self.id2label)
        if self.class_weights is not None:
            values["class_weights"] = self.class_weights.to_yaml()
        return values

    def validate(self) -> None:
        """Rejects wrong types and impossible settings before any work starts, naming each key."""
        problems = _type_problems(self) or _value_problems(self)
        if problems:
            raise ValueError("Invalid training config:\n  - " + "\n  - ".join(problems))


def _type_problems(config: TrainingConfig) -> list[str]:
    """YAML values bypass argparse's types: check them against the field annotations."""
    problems = []
    hints = typing.get_type_hints(TrainingConfig)
    for name in (config_field.name for config_field in dataclasses.fields(TrainingConfig)):
        hint = hints[name]
        value = getattr(config, name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        if value is None:
            if type(None) not in allowed:
                problems.append(f"{name} cannot be null")
            continue
        if not any(_is_instance(value, option) for option in allowed if option is not type(None)):
            problems.append(f"{name} expects {_type_name(hint)}, got {value!r}")
    return problems


_UnionType = type(int | None)


def _is_instance(value: Any, hint: Any) -> bool:
    base = typing.get_origin(hint) or hint
    if isinstance(value, bool) and base in (int, float):
        return False
    if base is float:
        return isinstance(value, int | float)
    if base is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(element, item) for element in value)
    return isinstance(value, base)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("segformer_hf.arguments.", "")


def _value_problems(config: TrainingConfig) -> list[str]:
    checks = [
        (config.max_train_steps > 0, f"max_train_steps must be > 0, got {config.max_train_steps}"),
        (config.per_device_train_batch_size > 0, "per_device_train_batch_size must be > 0"),
        (config.per_device_eval_batch_size > 0, "per_device_eval_batch_size must be > 0"),
        (config.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be > 0"),
        (config.eval_steps > 0, f"eval_steps must be > 0, got {config.eval_steps}"),
        (
            config.checkpointing_steps > 0,
            f"checkpointing_steps must be > 0, got {config.checkpointing_steps}",
        ),
        (config.logging_steps > 0, "logging_steps must be > 0"),
        (
            math.isfinite(config.learning_rate) and config.learning_rate > 0,
            f"learning_rate must be a finite number > 0, got {config.learning_rate}",
        ),
        (
            math.isfinite(config.class_weights_power) and config.class_weights_power >= 0,
            f"class_weights_power must be a finite number >= 0, got {config.class_weights_power}",
        ),
        (
            math.isfinite(config.dice_weight) and config.dice_weight >= 0,
            f"dice_weight must be a finite number >= 0, got {config.dice_weight}",
        ),
        (config.warmup_steps >= 0, f"warmup_steps must be >= 0, got {config.warmup_steps}"),
        (0 <= config.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}"),
        (
            config.model_variant is None or config.model_variant in VARIANTS,
            f"model_variant must be one of {', '.join(VARIANTS)}, got {config.model_variant!r}",
        ),
        (
            config.model_variant is not None or config.init_from is not None,
            "set model_variant (b0..b5) to train from scratch, or init_from to start from weights",
        ),
        (
            len(config.crop_size) == 2 and min(config.crop_size) > 0,
            f"crop_size must be [h, w] > 0: {config.crop_size}",
        ),
        (
            len(config.img_scale) == 2 and min(config.img_scale) > 0,
            f"img_scale must be [long, short] > 0: {config.img_scale}",
        ),
        (
            len(config.ratio_range) == 2 and 0 < config.ratio_range[0] <= config.ratio_range[1],
            f"ratio_range must be [low, high] with 0 < low <= high: {config.ratio_range}",
        ),
        (0 < config.cat_max_ratio <= 1, f"cat_max_ratio must be in (0, 1]: {config.cat_max_ratio}"),
        (0 <= config.flip_prob <= 1, f"flip_prob must be in [0, 1]: {config.flip_prob}"),
        (0 < config.copy_paste_prob <= 1, f"copy_paste_prob must be in (0, 1]: {config.copy_paste_prob}"),
        (
            not (config.copy_paste_classes and config.streaming),
            "copy_paste_classes draws donor frames by index, which a stream cannot give: use map-style data",
        ),
        (
            config.mixed_precision in ("no", "fp16", "bf16"),
            f"mixed_precision must be no|fp16|bf16: {config.mixed_precision}",
        ),
        (config.nan_policy in ("stop", "skip"), f"nan_policy must be stop|skip: {config.nan_policy}"),
        (
            config.ema_decay is None or 0 < config.ema_decay < 1,
            f"ema_decay must be in (0, 1) or null, got {config.ema_decay}",
        ),
        (
            config.augment_device in ("cpu", "cuda"),
            f"augment_device must be cpu|cuda: {config.augment_device}",
        ),
        (config.metric_backend in ("streaming", "evaluate"), "metric_backend must be streaming|evaluate"),
        (
            config.hub_format in ("segformer_hf", "transformers"),
            "hub_format must be segformer_hf|transformers",
        ),
        (
            set(config.report_to.split(",")) <= {"none", "wandb", "tensorboard"},
            f"report_to must be none, wandb, tensorboard or a comma list: {config.report_to}",
        ),
        (config.dataset_name is not None or config.data_dir is not None, "set dataset_name or data_dir"),
        (
            config.shuffle_buffer_size >= 0,
            f"shuffle_buffer_size must be >= 0, got {config.shuffle_buffer_size}",
        ),
        (not (config.push_to_hub and not config.hub_model_id), "push_to_hub needs hub_model_id (USER/NAME)"),
        (
            config.checkpoints_total_limit is None or config.checkpoints_total_limit >= 1,
            "checkpoints_total_limit must be >= 1 or null",
        ),
        (
            config.max_train_samples is None or config.max_train_samples >= 1,
            f"max_train_samples must be >= 1 or null, got {config.max_train_samples}",
        ),
        (
            config.max_eval_samples is None or config.max_eval_samples >= 1,
            f"max_eval_samples must be >= 1 or null, got {config.max_eval_samples}",
        ),
        (config.ddp_timeout > 0, f"ddp_timeout must be > 0 seconds, got {config.ddp_timeout}"),
    ]
    problems = [message for holds, message in checks if not holds]
    if config.eval_img_scale is not None and (
        len(config.eval_img_scale) != 2 or min(config.eval_img_scale) <= 0
    ):
        problems.append(f"eval_img_scale must be [long, short] > 0: {config.eval_img_scale}")
    try:
        config.inference_protocol().validate()
    except ValueError as error:
        problems.append(f"evaluation protocol: {error} (eval_mode, eval_stride, crop_size)")
    return problems


# Recipes ------------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """The recipes that ship with the package, by name (`--config camvid-b0`)."""
    return sorted(
        Path(entry.name).stem
        for entry in resources.files("segformer_hf.recipes").iterdir()
        if entry.name.endswith(RECIPE_SUFFIXES)
    )


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: an existing path, else a recipe shipped with the package under that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"{path} is a directory, not a recipe YAML file")
    shipped = resources.files("segformer_hf.recipes")
    for suffix in ("", *RECIPE_SUFFIXES):
        candidate = shipped / f"{path.name}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    raise FileNotFoundError(
        f"No recipe {str(name_or_path)!r}: not a file, nor a shipped recipe ({', '.join(recipe_names())})"
    )


def load_recipe(name_or_path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's keys, with those of its `base:` recipe (a path relative to it, or a name) underneath."""
    path = find_recipe(name_or_path).resolve()
    if path in _seen:
        raise ValueError(f"Recipe {path} inherits from itself through base:")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of argument names to values")
    for name in RECIPE_PATH_KEYS:
        beside_recipe = path.parent / str(values.get(name))
        if (
            isinstance(values.get(name), str)
            and not Path(values[name]).is_absolute()
            and beside_recipe.exists()
        ):
            values[name] = str(beside_recipe)
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = path.parent / base
    inherited = load_recipe(base_path if base_path.is_file() else base, (*_seen, path))
    return {**inherited, **values}


def _check_known(values: dict[str, Any], source: str) -> None:
    known = {config_field.name for config_field in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown training arguments {unknown} (in {source}); valid ones: {', '.join(sorted(known))}"
        )


def load_config(recipe: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """A validated config from a recipe and a mapping of overrides. Unknown keys are errors, never ignored."""
    values = load_recipe(recipe) if recipe is not None else {}
    values.update(overrides or {})
    _check_known(values, str(recipe or "overrides"))
    config = TrainingConfig(**values)
    config.validate()
    return config


# The command line ---------------------------------------------------------------------------------------


def build_parser() -> HfArgumentParser:
    """`--config RECIPE` plus one flag per argument, grouped and documented (`--help`)."""
    parser = HfArgumentParser(
        ARGUMENT_GROUPS,
        description="Train a SegFormer with Accelerate. A recipe sets the arguments; flags override them.",
    )
    optional = {
        config_field.name
        for config_field in dataclasses.fields(TrainingConfig)
        if type(None) in typing.get_args(typing.get_type_hints(TrainingConfig)[config_field.name])
    }
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _nullable(action.type)
    parser.add_argument(
        "--config",
        default=None,
        help=f"recipe: a YAML file or the name of a shipped one ({', '.join(recipe_names())}); "
        f"default: {DEFAULT_RECIPE}",
    )
    return parser


def _nullable(convert: Any) -> Any:
    """An argparse type that also reads `null` (as YAML does) as None, for arguments that may be unset."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("null", "none", "~") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """The recipe named by `--config` (default: the demo), then every `--key value` flag on top of it."""
    parser = build_parser()
    arguments, _ = parser.parse_known_args(argv)
    recipe_values = load_recipe(arguments.config or DEFAULT_RECIPE)
    _check_known(recipe_values, str(arguments.config or DEFAULT_RECIPE))
    parser.set_defaults(**recipe_values)
    # argparse itself rejects unknown flags (exit 2 with the usage), as users of any CLI expect.
    values = {name: value for name, value in vars(parser.parse_args(argv)).items() if name != "config"}
    config = TrainingConfig(**values)
    config.validate()
    return config
