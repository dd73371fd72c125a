"""Evaluating a saved model on a dataset split: the engine of `scripts/evaluate.py`.

It joins the other modules' pieces: a model and its labels from a directory or the Hub (`inference`),
a split through `datasets` (`data`), one of the paper's inference modes and mean IoU over all processes
(`inference.evaluate_model`, `metrics`), then a printed table and a JSON file. Under `accelerate launch`
every process takes a contiguous shard of the split (no padding duplicates), and the confusion
statistics are summed, so N processes report exactly what one would.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from .inference import (
    INFERENCE_MODES,
    evaluate_model,
    format_metrics_table,
    load_model_for_inference,
    parse_scales,
    write_json_atomic,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Mean IoU of a SegFormer on a dataset split (whole image, sliding window, multi-scale + flip)."
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
        "--reduce_labels", action="store_true", help="labels 0 = other (ADE20K): ignore 0, shift"
    )
    parser.add_argument(
        "--img_scale",
        type=int,
        nargs=2,
        default=None,
        metavar=("LONG", "SHORT"),
        help="keep-ratio resize bound before inference, e.g. 2048 512 (default: images as they are)",
    )
    parser.add_argument("--mode", choices=INFERENCE_MODES, default="whole")
    parser.add_argument("--crop_size", type=int, nargs="+", default=[512], help="slide window: S or H W")
    parser.add_argument(
        "--stride",
        type=int,
        nargs="+",
        default=None,
        help="slide stride: S or H W (default: 2/3 of the crop)",
    )
    parser.add_argument(
        "--scales", type=parse_scales, default=None, help="test-time scales, e.g. 0.5,0.75,1.0"
    )
    parser.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
    parser.add_argument("--size_divisor", type=int, default=None, help="round scaled sides up to a multiple")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--metric_backend", choices=("streaming", "evaluate"), default="streaming")
    parser.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the metrics")
    return parser


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluates `args.model` as `build_parser` describes; prints the table and writes the JSON on rank 0."""
    from accelerate import Accelerator

    from . import data as seg_data

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, _ = load_model_for_inference(
        args.model, trust_remote_code=args.trust_remote_code, device=accelerator.device
    )
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    ignore_index = args.ignore_index
    if ignore_index is None:
        ignore_index = getattr(model.config, "semantic_loss_ignore_index", 255)
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
    total_samples = len(dataset)
    if accelerator.num_processes > 1:
        dataset = dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    transform = seg_data.SegmentationEvalTransform(
        img_scale=tuple(args.img_scale) if args.img_scale else None,
        ignore_index=ignore_index,
        reduce_labels=args.reduce_labels,
        num_labels=len(id2label),
        skip_bad_samples=False,
    )
    loader = torch.utils.data.DataLoader(
        dataset.with_transform(transform),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=seg_data.eval_collate_fn,
    )
    crop_size = _pair(args.crop_size)
    # The paper's windows overlap by a third (512 -> 341, 1024 -> 768 on Cityscapes).
    stride = _pair(args.stride) if args.stride else tuple(round(side * 2 / 3) for side in crop_size)
    started = time.time()
    results = evaluate_model(
        model,
        loader,
        len(id2label),
        ignore_index,
        accelerator=accelerator,
        mode=args.mode,
        crop_size=crop_size,
        stride=stride,
        scales=args.scales,
        flip=args.flip,
        size_divisor=args.size_divisor,
        metric_backend=args.metric_backend,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        show_progress=True,
    )
    results = {key: value.tolist() if hasattr(value, "tolist") else value for key, value in results.items()}
    results.update(
        model=str(args.model),
        split=args.split,
        mode=args.mode,
        scales=args.scales,
        flip=args.flip,
        world_size=accelerator.num_processes,
        eval_runtime=time.time() - started,
        per_category_name=[id2label.get(index, str(index)) for index in range(len(id2label))],
    )
    if results["num_samples"] != total_samples:
        raise RuntimeError(f"evaluated {results['num_samples']} of {total_samples} samples")
    if accelerator.is_main_process:
        title = f"{args.model} on {args.dataset or args.data_dir} [{args.split}], {total_samples} samples"
        print(format_metrics_table(results, id2label, title=title), flush=True)
        if args.output is not None:
            write_json_atomic(args.output, results)
            print(f"Metrics written to {args.output}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    run_evaluation(build_parser().parse_args(argv))
    return 0


def _pair(values: list[int]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])
