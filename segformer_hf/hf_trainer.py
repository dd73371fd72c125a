"""Training with transformers' `Trainer`: the package's data and metric, shaped for it.

`segformer-hf train` is this package's own loop (exact resume, the paper's schedule, sliding-window
evaluation); the model is a plain `PreTrainedModel`, so transformers' `Trainer` trains it too. What
that route needs from the package:

- `trainer_datasets(config)`: the recipe's splits with the paper's augmentation and the evaluation
  preprocessing attached by `with_transform` (decoded lazily, in the DataLoader workers), and
  `data_collator` to batch them. Pass `remove_unused_columns=False`: the transforms read the raw
  columns, which the model's signature does not name;
- `AugmentationEpochCallback`: gives the training transform the epoch, so that a sample's crop changes
  from epoch to epoch (the draws come from `(seed, epoch, sample_index)`, see `data`);
- `preprocess_logits_for_metrics`: reduces each batch's logits (B, K, h/4, w/4) to predicted label maps
  (B, H, W) int16 at the labels' resolution (bilinear upsampling, then arg-max, as `evaluate_model`),
  so evaluation never holds the (N, K, H, W) logits of the split;
- `mean_iou_metrics(num_labels, ignore_index)`: a `compute_metrics` backed by the streaming
  `metrics.MeanIoU`. With `batch_eval_metrics=True` it is fed batch by batch and nothing is accumulated
  at all; without it, Trainer concatenates the label maps (padding with -100, which is ignored here);
- `SignalSafeTrainer`: a `Trainer` that stops as `segformer-hf train` does when SIGTERM or Ctrl-C reaches
  the process group (Slurm, Kubernetes, `timeout`): it saves a checkpoint at the end of the step and
  returns from `train()`, while its DataLoader workers ignore the group's signal. A plain Trainer dies at
  once (its workers too) and loses everything since its last save. `train(resume_from_checkpoint=True)`
  continues from the newest checkpoint whose save was complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from . import data as seg_data
from .checkpointing import InterruptFlag
from .inference import scores_to_labels
from .metrics import MeanIoU, _results_from_confusion

if TYPE_CHECKING:
    from .arguments import TrainingConfig

logger = logging.getLogger(__name__)

# What Trainer pads label maps and predictions with when it concatenates or gathers them.
TRAINER_PAD_INDEX = -100


@dataclass
class TrainerDatasets:
    """The recipe's splits with their transforms attached, ready for `Trainer(train_dataset=..., eval_dataset=...)`."""

    train: datasets.Dataset
    validation: datasets.Dataset
    id2label: dict[int, str]
    train_transform: seg_data.SegmentationTrainTransform


def trainer_datasets(config: TrainingConfig) -> TrainerDatasets:
    """The splits of a recipe (`arguments.load_config`) with the paper's augmentation and evaluation transforms.

    The validation images are resized to the recipe's `img_scale` and their labels kept at full
    resolution, as `segformer-hf train` evaluates (whole-image inference).
    """
    if config.streaming:
        raise ValueError("trainer_datasets takes map-style data: set streaming: false")
    train, validation, id2label = seg_data.load_training_data(config)
    train_transform = seg_data.train_transform_for(config, train, id2label)
    eval_transform = seg_data.eval_transform_for(config, len(id2label))
    return TrainerDatasets(
        train=train.with_transform(train_transform),
        validation=validation.with_transform(eval_transform),
        id2label=id2label,
        train_transform=train_transform,
    )


def data_collator(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{"pixel_values": (B, 3, h, w), "labels": (B, H, W)}: what the model's forward takes, nothing else.

    Evaluation samples keep their labels at full resolution, so images of different sizes cannot share a
    batch: use `per_device_eval_batch_size=1` for such data. Samples a transform skipped are left out.

    Raises:
        ValueError: samples of different sizes in one batch, or a batch of skipped samples only.
    """
    kept = [sample for sample in samples if sample["pixel_values"] is not None]
    if not kept:
        raise ValueError("Every sample of this batch was skipped as unreadable (skip_bad_samples)")
    shapes = {(tuple(s["pixel_values"].shape), tuple(s["labels"].shape)) for s in kept}
    if len(shapes) > 1:
        raise ValueError(
            f"Samples of different sizes cannot share a batch: {sorted(shapes)}. "
            "Evaluate with per_device_eval_batch_size=1 (labels stay at each image's own resolution)."
        )
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in kept]),
        "labels": torch.stack([sample["labels"] for sample in kept]),
    }


class AugmentationEpochCallback(TrainerCallback):
    """Sets the training transform's epoch at the start of each epoch, before the workers copy it."""

    def __init__(self, transform: seg_data.SegmentationTrainTransform) -> None:
        self.transform = transform

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.transform.set_epoch(int(state.epoch or 0))


class SignalSafeTrainer(Trainer):
    """`Trainer` that saves a checkpoint and stops on SIGTERM or Ctrl-C instead of dying mid-step.

    Signals usually reach the whole process group. The main process turns them into a stop at the end of
    the step, with a checkpoint (`stop_on_signal`, a `SaveAndStopOnSignalCallback`); the DataLoader
    workers (training and evaluation) ignore them, as `segformer-hf train`'s do (`data.worker_process_options`):
    a worker killed by the signal would crash the main process before it could save. After `train()`,
    `stop_on_signal.interrupted_by` names the signal, or is None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_signal = SaveAndStopOnSignalCallback()
        self.add_callback(self.stop_on_signal)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest *complete* checkpoint.

        Trainer writes a checkpoint's files in place, `trainer_state.json` last: a job killed while saving
        (SIGKILL after the grace period) leaves a newest `checkpoint-N` that Trainer would pick and fail to
        load. Such a folder is passed over, with a warning naming it.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            # Trainer skips on_train_end when training raises: the usual handlers come back here anyway, or
            # the next Ctrl-C (in a notebook, say) would only raise a flag nobody reads.
            self.stop_on_signal.stop_listening()

    def get_train_dataloader(self) -> DataLoader:
        return with_signal_safe_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        return with_signal_safe_workers(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset: Any) -> DataLoader:
        return with_signal_safe_workers(super().get_test_dataloader(test_dataset))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` whose `trainer_state.json` (written last) reads back.

    Newer folders without it are named in a warning: a save that was cut off. None when there is no complete
    checkpoint (Trainer then raises its own error).
    """
    incomplete = []
    for path in map(Path, reversed(sort_checkpoints(str(output_dir)))):  # Trainer's own order, by step
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())["global_step"]
        except (OSError, ValueError, KeyError, TypeError):
            incomplete.append(path.name)
            continue
        if incomplete:
            logger.warning(
                "Resuming from %s: the newer %s lack a readable %s (a save that was cut off)",
                path.name,
                ", ".join(incomplete),
                TRAINER_STATE_NAME,
            )
        return str(path)
    return None


def with_signal_safe_workers(loader: DataLoader) -> DataLoader:
    """Gives a DataLoader (not yet iterated) the package's worker signal contract; returns it."""
    # accelerate's prepared loaders iterate the DataLoader they wrap: the settings must go there.
    workers_loader = getattr(loader, "base_dataloader", loader)
    if workers_loader.num_workers == 0 or getattr(workers_loader, "_signal_safe_workers", False):
        return loader
    options = seg_data.worker_process_options(workers_loader.num_workers)
    if workers_loader.worker_init_fn is None:
        workers_loader.worker_init_fn = options["worker_init_fn"]
    else:  # Trainer seeds its training workers: keep that, then take the signals
        workers_loader.worker_init_fn = partial(
            _both_worker_inits, workers_loader.worker_init_fn, options["worker_init_fn"]
        )
    if "multiprocessing_context" in options and workers_loader.multiprocessing_context is None:
        workers_loader.multiprocessing_context = options["multiprocessing_context"]
    workers_loader._signal_safe_workers = True
    return loader


def _both_worker_inits(first: Callable[[int], None], second: Callable[[int], None], worker_id: int) -> None:
    first(worker_id)
    second(worker_id)


class SaveAndStopOnSignalCallback(TrainerCallback):
    """SIGINT/SIGTERM during `trainer.train()`: save a checkpoint at the end of the current step, then stop.

    `SignalSafeTrainer` adds it (with DataLoader workers that survive the signal; a plain Trainer with
    `dataloader_num_workers` > 0 would lose its workers to it). In a distributed run the processes agree
    after every step, so that all of them save the same step. Afterwards `interrupted_by` names the signal:
    skip the final evaluation, and continue later with `trainer.train(resume_from_checkpoint=True)`. A
    second Ctrl-C stops at once. Alone, with a plain Trainer, the signal handlers stay installed after a
    `train()` that raised (Trainer then skips `on_train_end`); `SignalSafeTrainer` removes them either way.
    """

    def __init__(self) -> None:
        self.interrupted_by: str | None = None
        self._flag: InterruptFlag | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.interrupted_by = None
        self._flag = InterruptFlag().__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._flag is not None and self._flag.raised_on_any_process(args.device):
            self.interrupted_by = self._flag.reason
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop_listening()

    def stop_listening(self) -> None:
        """Puts the signal handlers from before `train()` back (nothing if they are back already)."""
        if self._flag is not None:
            self._flag.__exit__(None, None, None)
            self._flag = None


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor
) -> torch.Tensor:
    """Logits (B, K, h, w) -> predicted label maps (B, H, W) int16 at the labels' size (bilinear, then arg-max).

    int16 holds every class id and Trainer's -100 padding; the arg-max of K scores per pixel is all the
    metric needs, so evaluation memory no longer grows with K.
    """
    if isinstance(logits, tuple | list):
        logits = logits[0]
    # (B, K, h, w) -> (B, K, H, W), as inference.predict_whole upsamples
    scores = F.interpolate(
        logits.float(), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False
    )
    return scores_to_labels(scores).to(torch.int16)


def mean_iou_metrics(
    num_labels: int, ignore_index: int, *, reduce_labels: bool = False
) -> Callable[..., dict[str, Any]]:
    """A `compute_metrics` for Trainer: mean IoU, mean and overall accuracy, and per-class IoU of label maps.

    Works with `batch_eval_metrics=True` (called once per batch, `compute_result` on the last one: the
    counts are summed as batches come and reset after the result) and without it (called once with the
    whole split). Takes the maps of `preprocess_logits_for_metrics`; Trainer's -100 padding is ignored.
    A single-label (binary) model is scored over two classes, as `evaluation.evaluate_model` does.
    """
    metric_classes = 2 if num_labels == 1 else num_labels
    metric = MeanIoU(metric_classes, ignore_index, reduce_labels=reduce_labels)

    def compute_metrics(prediction: EvalPrediction, compute_result: bool = True) -> dict[str, Any]:
        labels = torch.as_tensor(prediction.label_ids)
        labels = labels.masked_fill(labels == TRAINER_PAD_INDEX, ignore_index)
        metric.update(torch.as_tensor(prediction.predictions), labels)
        if not compute_result:
            return {}
        # Trainer already gathered every process's maps: the counts here are the whole split's.
        results = _results_from_confusion(metric.confusion_matrix(), metric_classes, None)
        metric.reset()
        return {
            "mean_iou": float(results["mean_iou"]),
            "mean_accuracy": float(results["mean_accuracy"]),
            "overall_accuracy": float(results["overall_accuracy"]),
            "per_category_iou": [float(value) for value in results["per_category_iou"]],
        }

    return compute_metrics
