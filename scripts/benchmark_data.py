"""Does the training data keep up with the model? The real training loader against the training step.

    python scripts/benchmark_data.py                                          # the demo recipe, crop 160
    python scripts/benchmark_data.py --config camvid-b0 --data_dir ../shared/data/camvid --crop 512 \
        --workers 0 2 --batches 4 --model_steps 2

For each worker count and each augmentation path, the loader built by `data.train_dataloader_for` (the one
training uses) is iterated for --batches batches after its first one (which pays the worker start-up, reported
apart), and its samples per second are printed beside the training step's: forward with the loss,
backward and AdamW on the recipe's variant at the same batch and crop, on --device. A ratio loader / model
above 1 means the data keeps up; below 1 the accelerator waits for it.

Paths: `cpu` is `augment_device: cpu` (the workers run the whole numpy augmentation); `cuda` is
`augment_device: cuda` (the workers only decode and draw; `augmentation.DeviceAugmentation` then finishes
the batch on --device, and its time per batch counts against the loader).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from segformer_hf import data as seg_data  # noqa: E402
from segformer_hf.arguments import load_config  # noqa: E402
from segformer_hf.augmentation import DeviceAugmentation  # noqa: E402
from segformer_hf.configuration_segformer_hf import SegformerHFConfig  # noqa: E402
from segformer_hf.modeling_segformer_hf import SegformerHFForSemanticSegmentation  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo", help="recipe whose data and augmentation are measured")
    parser.add_argument("--data_dir", default=None, help="override the recipe's data_dir")
    parser.add_argument("--crop", type=int, default=None, help="square crop side (default: the recipe's)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's per-device batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--paths", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loader")
    parser.add_argument("--model_steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of this process")
    return parser.parse_args(argv)


def recipe_config(args: argparse.Namespace, path: str, workers: int) -> Any:
    overrides: dict[str, Any] = {"dataloader_num_workers": workers, "augment_device": path, "init_from": None}
    if args.data_dir is not None:
        overrides.update(data_dir=args.data_dir, id2label_file=os.path.join(args.data_dir, "classes.json"))
    if args.crop is not None:
        overrides["crop_size"] = [args.crop, args.crop]
    if args.batch_size is not None:
        overrides["per_device_train_batch_size"] = args.batch_size
    return load_config(args.config, overrides)


def loader_rate(
    config: Any, dataset: Any, id2label: dict[int, str], batches: int, device: torch.device
) -> dict[str, float]:
    """Samples per second of the training loader (and, for augment_device cuda, the device half)."""
    loader, transform = seg_data.train_dataloader_for(config, dataset, id2label)
    finish = (
        DeviceAugmentation(config.crop_size, config.ignore_index) if config.augment_device != "cpu" else None
    )
    transform.set_epoch(0)
    started = time.perf_counter()
    iterator = iter(loader)
    seen = 0
    first_batch = None
    while seen < batches + 1:
        try:
            batch = next(iterator)
        except StopIteration:  # a small split: start the next epoch
            iterator = iter(loader)
            continue
        if finish is not None:
            batch = finish({key: _to(value, device) for key, value in batch.items()})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seen += 1
        if first_batch is None:
            first_batch = time.perf_counter() - started
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    return {
        "first_batch_s": first_batch,
        "samples_per_second": batches * config.per_device_train_batch_size / elapsed,
    }


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def model_rate(config: Any, num_labels: int, steps: int, device: torch.device) -> float:
    """Samples per second of eager training steps of the recipe's variant at its batch and crop."""
    model = SegformerHFForSemanticSegmentation(
        SegformerHFConfig.from_variant(config.model_variant, num_labels=num_labels)
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = config.per_device_train_batch_size
    pixel_values = torch.randn(batch, 3, *config.crop_size, device=device)
    labels = torch.randint(0, num_labels, (batch, *config.crop_size), device=device)
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            seconds.append(time.perf_counter() - start)
    return batch / statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = recipe_config(args, "cpu", 0)
    train, _, id2label = seg_data.load_training_data(base)
    crop = "x".join(map(str, base.crop_size))
    print(
        f"{args.config}: {len(train)} training samples, crop {crop}, batch {base.per_device_train_batch_size}"
    )
    step_rate = model_rate(base, len(id2label), args.model_steps, device)
    print(f"model training step ({base.model_variant}, {device}): {step_rate:.2f} samples/s", flush=True)
    header = f"{'path':<6}{'workers':>8}{'first batch s':>15}{'loader samples/s':>18}{'loader / model':>16}"
    lines = [header, "-" * len(header)]
    for path in args.paths:
        for workers in args.workers:
            rate = loader_rate(recipe_config(args, path, workers), train, id2label, args.batches, device)
            lines.append(
                f"{path:<6}{workers:>8}{rate['first_batch_s']:>15.2f}{rate['samples_per_second']:>18.2f}"
                f"{rate['samples_per_second'] / step_rate:>16.2f}"
            )
            print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"path cuda: the device half ran on {device}. loader / model above 1: the data keeps up.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
