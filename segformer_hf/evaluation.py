"""The one evaluation engine: mean IoU of a model over a data loader, on one or many processes.

Training's periodic and final evaluations, `segformer-hf evaluate` (`scripts/evaluate_model.py`) and the
tests all call `evaluate_model`, with an `inference.InferenceProtocol` saying how images are predicted.
Under `accelerate launch` every process takes a contiguous shard of the split (no padding duplicates)
and the confusion statistics are summed, so N processes report exactly what one would.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import data as seg_data
from .arguments import parse_args
from .files import write_json_atomic
from .inference import (
    InferenceProtocol,
    _eval_mode,
    add_inference_arguments,
    load_model_for_inference,
    predict_scores,
    scores_to_labels,
    warn_if_bf16_is_emulated,
)
from .metrics import create_metric
from .modeling_segformer_hf import SegformerHFForSemanticSegmentation


def evaluate_model(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, Any]],
    num_labels: int,
    ignore_index: int,
    protocol: InferenceProtocol | None = None,
    *,
    accelerator: Accelerator | None = None,
    metric_backend: str = "streaming",
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Mean IoU (and accuracies) of `model` over `dataloader`, reduced over all processes.

    Each batch holds normalised "pixel_values" (a (B, 3, h, w) tensor, or a list of (3, h, w) tensors
    when sizes differ) and "labels" at the original resolution. Predictions are made at each label's
    size with `protocol` (see `inference.predict_scores`), so the metric is computed at full
    resolution, as the paper reports it. Each image is predicted on its own, so the numbers do not
    depend on the batch size nor on the number of processes. A single-label model (`num_labels` 1) is
    scored over two classes, background (0) and foreground (1). In a distributed run every process must
    hold a disjoint part of the data (see `data.build_eval_dataloader`). Returns evaluate's mean_iou
    keys, with per-class values as lists (JSON-ready), plus "num_samples". The model's training mode is
    restored on return.
    """
    # A single-label (binary) model predicts 0 (background) or 1 (foreground): two classes to score.
    metric_classes = 2 if num_labels == 1 else num_labels
    metric = create_metric(metric_backend, num_labels=metric_classes, ignore_index=ignore_index)
    network = model
    if accelerator is not None:
        share_batchnorm_statistics(accelerator, model)
        network = accelerator.unwrap_model(model)
    is_main_process = accelerator is None or accelerator.is_main_process
    num_samples = 0
    with _eval_mode(network):
        for batch in tqdm(dataloader, desc="Evaluating", disable=not (show_progress and is_main_process)):
            for pixel_values, labels in same_size_groups(batch):
                # One image per forward pass: batched matrix products round differently for each batch
                # size, so batching would make the numbers depend on the batch size and process count.
                for image, label in zip(pixel_values.split(1), labels.split(1)):
                    scores, are_probabilities = predict_scores(
                        network,
                        image,
                        tuple(label.shape[-2:]),
                        protocol,
                        window_batch_size=window_batch_size,
                        autocast_dtype=autocast_dtype,
                    )
                    metric.update(*_compact(scores_to_labels(scores, are_probabilities), label))
                num_samples += len(labels)
    results = {
        key: value.tolist() if hasattr(value, "tolist") else value for key, value in metric.compute().items()
    }
    results["num_samples"] = _sum_over_processes(num_samples, accelerator)
    return results


def _compact(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps as uint8 on the CPU when their values fit: 8x less to copy from a GPU, and the metric's
    fastest counting path (byte pairs). Values that do not fit stay as they are."""

    def compact(maps: torch.Tensor) -> torch.Tensor:
        fits = maps.numel() == 0 or (int(maps.min()) >= 0 and int(maps.max()) <= 255)
        return (maps.to(torch.uint8) if fits else maps).cpu()

    return compact(predictions), compact(labels)


def same_size_groups(batch: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values (b, 3, h, w), labels (b, H, W)) groups that can be predicted in one call."""
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    if isinstance(pixel_values, torch.Tensor) and isinstance(labels, torch.Tensor):
        yield pixel_values, labels
        return
    for image, label in zip(pixel_values, labels):
        image = torch.as_tensor(image)
        # (3, h, w) -> (1, 3, h, w); (H, W) -> (1, H, W)
        yield (
            (image if image.ndim == 4 else image.unsqueeze(0)),
            torch.as_tensor(label).reshape(1, *label.shape[-2:]),
        )


def share_batchnorm_statistics(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Gives every process the main process's BatchNorm running statistics (what the saved model holds).

    Without SyncBatchNorm each process updates its running mean/variance from its own batches, so after
    the last step they differ; DDP only re-broadcasts them at the next forward. Evaluating each shard
    with other statistics would make an N-process evaluation disagree with the saved model's.
    """
    if accelerator.num_processes == 1:
        return
    for module in accelerator.unwrap_model(model).modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer.data, src=0)


def _sum_over_processes(count: int, accelerator: Accelerator | None) -> int:
    if accelerator is None or accelerator.num_processes == 1:
        return count
    total = accelerator.reduce(torch.tensor([count], device=accelerator.device), reduction="sum")
    return int(total.item())


def format_metrics_table(results: dict[str, Any], id2label: dict[int, str], title: str = "Evaluation") -> str:
    """The overall metrics, then IoU and accuracy per class by name ("n/a": class absent from the labels)."""
    names = class_names(id2label, len(results["per_category_iou"]))
    name_width = max([len("class"), *map(len, names)])
    lines = [
        title,
        f"  mean IoU          {_number(results['mean_iou'])}",
        f"  mean accuracy     {_number(results['mean_accuracy'])}",
        f"  overall accuracy  {_number(results['overall_accuracy'])}",
        "",
        f"  {'class':<{name_width}}     IoU  accuracy",
    ]
    for name, iou, accuracy in zip(names, results["per_category_iou"], results["per_category_accuracy"]):
        lines.append(f"  {name:<{name_width}}  {_number(iou)}    {_number(accuracy)}")
    return "\n".join(lines)


def class_names(id2label: dict[int, str], num_classes: int) -> list[str]:
    """The names of the metric's classes; a single-label (binary) model's one class is class 1 of two."""
    if len(id2label) == 1 and num_classes == 2:
        return ["background", str(next(iter(id2label.values())))]
    return [str(id2label.get(index, index)) for index in range(num_classes)]


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "   n/a"
    return f"{float(value):6.4f}"


def evaluate_saved_model(output_dir: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluates a finished run's saved model in this one process, with the run's own validation settings.

    `overrides` are command-line style flags (`["--max_eval_samples", "5"]`) applied on top of the run's
    train_config.yaml. This is the single-process twin of the evaluation at the end of training.
    """
    config = parse_args(["--config", str(Path(output_dir) / "train_config.yaml"), *(overrides or [])])
    _, eval_dataset, id2label = seg_data.load_training_data(config)
    model = SegformerHFForSemanticSegmentation.from_pretrained(output_dir)
    eval_loader = seg_data.eval_dataloader_for(config, eval_dataset, len(id2label))
    return evaluate_model(
        model,
        eval_loader,
        len(id2label),
        config.ignore_index,
        config.inference_protocol(),
        metric_backend=config.metric_backend,
    )


# The command line ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segformer-hf evaluate",
        description="Mean IoU of a SegFormer on a dataset split (whole image, sliding window, multi-scale + flip).",
    )
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code to run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", help="Hub dataset id (or a local dataset script/folder load_dataset takes)"
    )
    source.add_argument(
        "--data_dir", help="a data directory (pairs, ade20k, cityscapes, imagefolder, parquet)"
    )
    parser.add_argument("--dataset_config", default=None, help="the Hub dataset's configuration name")
    parser.add_argument("--data_format", default="auto", help="layout of --data_dir (default: detect)")
    parser.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument(
        "--ignore_index", type=int, default=None, help="default: the model's loss ignore index"
    )
    parser.add_argument(
        "--reduce_labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="labels 0 = other (ADE20K): ignore 0, shift (default: as the model's image processor says)",
    )
    add_inference_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--metric_backend", choices=("streaming", "evaluate"), default="streaming")
    parser.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the metrics")
    return parser


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluates `args.model` as `build_parser` describes; prints the table and writes the JSON on rank 0."""
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {args.output} is a directory; give a JSON file path")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        return _evaluate_with(accelerator, args)
    finally:
        # The process group ends here, while the interpreter is whole: left to the exit, gloo's threads can
        # still hold the last collective's tensors, and freeing them while Python finalises aborts the
        # process (SIGABRT on one rank of a 2-process CPU run, seen in CI; pytorch/pytorch#179291).
        accelerator.end_training()


def _evaluate_with(accelerator: Accelerator, args: argparse.Namespace) -> dict[str, Any]:
    """`run_evaluation`'s work, within the accelerator's lifetime."""
    if args.bf16:
        warn_if_bf16_is_emulated(accelerator.device, "leave --bf16 out")
    model, image_processor = load_model_for_inference(
        args.model, trust_remote_code=args.trust_remote_code, device=accelerator.device
    )
    # The protocol the model was validated with, saved with it, unless flags say otherwise.
    protocol = InferenceProtocol.from_args(args, InferenceProtocol.from_image_processor(image_processor))
    protocol.validate()
    reduce_labels = args.reduce_labels
    if reduce_labels is None:
        reduce_labels = bool(getattr(image_processor, "do_reduce_labels", False))
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    ignore_index = args.ignore_index
    if ignore_index is None:
        ignore_index = getattr(model.config, "semantic_loss_ignore_index", 255)
    dataset = _evaluation_split(args, accelerator)
    transform = seg_data.SegmentationEvalTransform(
        img_scale=protocol.img_scale,
        ignore_index=ignore_index,
        reduce_labels=reduce_labels,
        num_labels=len(id2label),
    )
    loader = seg_data.build_eval_dataloader(
        dataset,
        transform,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        num_shards=accelerator.num_processes,
        shard_index=accelerator.process_index,
    )
    started = time.time()
    results = evaluate_model(
        model,
        loader,
        len(id2label),
        ignore_index,
        protocol,
        accelerator=accelerator,
        metric_backend=args.metric_backend,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        show_progress=True,
    )
    if results["num_samples"] != len(dataset):
        raise RuntimeError(f"evaluated {results['num_samples']} of {len(dataset)} samples")
    results.update(
        model=str(args.model),
        split=args.split,
        protocol=protocol.to_dict(),
        world_size=accelerator.num_processes,
        eval_runtime=time.time() - started,
        per_category_name=class_names(id2label, len(results["per_category_iou"])),
    )
    if accelerator.is_main_process:
        title = f"{args.model} on {args.dataset or args.data_dir} [{args.split}], {len(dataset)} samples"
        print(format_metrics_table(results, id2label, title=title), flush=True)
        if args.output is not None:
            write_json_atomic(args.output, results)
            print(f"Metrics written to {args.output}", flush=True)
    return results


def _evaluation_split(args: argparse.Namespace, accelerator: Accelerator) -> Any:
    """The split to evaluate (the main process first, so only it fills the datasets cache), capped."""
    with accelerator.main_process_first():
        dataset = seg_data.load_evaluation_split(
            dataset_name=args.dataset,
            dataset_config_name=args.dataset_config,
            data_dir=args.data_dir,
            data_format=args.data_format,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
        )
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    return dataset


def main(argv: list[str] | None = None) -> int:
    """`segformer-hf evaluate`: exit 0 with the table printed, 2 for arguments that cannot work."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        run_evaluation(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
