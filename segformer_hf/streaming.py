"""Training data read as it is used: `datasets`' streaming mode, for sources larger than the disk.

With `streaming: true` a Hub dataset, or a local parquet or imagefolder directory, is opened as a
`datasets.IterableDataset`: nothing is downloaded or copied into the cache up front, rows arrive as
the loop asks for them. Three things the map-style path gets from row numbers are kept:

- every row carries the same `sample_id` and `sample_index` the map-style path gives it (the row
  number in the split: the shards' lengths come from the parquet footers). The training transform
  draws from `(seed, epoch, sample_index)`, so a sample is augmented exactly as in a map-style run.
  Where the shards' lengths are not known up front (an imagefolder), rows are numbered within their
  shard: `shard * SHARD_INDEX_STRIDE + row`, still stable across epochs, processes and restarts;
- each process reads its own part of the stream (`datasets.distributed.split_dataset_by_node`);
- the position in the stream is saved with every checkpoint (`StreamingTrainLoader.state_dict`, JSON:
  the epoch and `datasets`' own `IterableDataset.state_dict()`) and restored on resume.

Shuffling is `datasets`' seeded buffer shuffle (`shuffle(seed, buffer_size)`, re-seeded each epoch by
`set_epoch`). Its one limit is `datasets`' own: the buffer's content is not part of the state, so a run
resumed mid-epoch with a buffer loses the (at most `shuffle_buffer_size`) samples that were in it and
sees the rest of that epoch in another order; the epochs after it are exactly those of the
uninterrupted run. With `shuffle_buffer_size: 0` (no shuffle) a resumed run sees exactly the batches
the uninterrupted one would have seen.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from .data import (
    SegmentationTrainTransform,
    SignalSafeForkContext,
    _find_split,
    _standard_columns,
    detect_data_format,
    ignore_termination_signals,
    train_collate_fn,
)

logger = logging.getLogger(__name__)

STREAMABLE_FORMATS = ("parquet", "imagefolder")
# Rows of a shard whose length is not known up front are numbered shard * stride + row in shard.
SHARD_INDEX_STRIDE = 1 << 32
# Batches being decoded and augmented ahead of the training step, per worker process.
PREFETCH_PER_WORKER = 2

ROW_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "label": datasets.Image(decode=False),
        "sample_id": datasets.Value("string"),
        "sample_index": datasets.Value("int64"),
    }
)


# Opening a stream ------------------------------------------------------------------------------------------


def stream_segmentation_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    data_format: str = "auto",
    train_split: str = "train",
    validation_split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> dict[str, datasets.IterableDataset]:
    """The training and validation splits as streams in the standard columns (see `data.load_segmentation_dataset`).

    `max_train_samples` / `max_eval_samples` keep the first rows of a split, as the map-style path does.

    Raises:
        ValueError: both or neither source given, a layout that is not streamed, a missing split.
    """
    if (dataset_name is None) == (data_dir is None):
        raise ValueError("Give exactly one data source: dataset_name (Hub id or dataset path) or data_dir")
    if dataset_name is not None:
        builder = datasets.load_dataset_builder(dataset_name, dataset_config_name)
        source = dataset_name
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir {root} does not exist or is not a directory")
        if data_format == "auto":
            data_format = detect_data_format(root)
        if data_format not in STREAMABLE_FORMATS:
            raise ValueError(
                f"streaming reads Hub datasets and parquet or imagefolder directories; {root} is a {data_format} "
                "tree, whose images are already read from disk one by one: set streaming: false"
            )
        builder = datasets.load_dataset_builder(data_format, data_dir=str(root))
        source = f"{root} ({data_format})"
    streams = builder.as_streaming_dataset()
    names, limits = {}, {"train": max_train_samples, "validation": max_eval_samples}
    for role, requested in (("train", train_split), ("validation", validation_split)):
        names[role] = _find_split(streams, requested)
        if names[role] is None:
            hint = " (streaming cannot hold out a validation share: give a validation split)" * (
                role == "validation"
            )
            raise ValueError(
                f"{source} has no split {requested!r}; available splits: {sorted(streams)}{hint}"
            )
    return {
        role: indexed_stream(
            _standard_columns(streams[name], source, name, image_column, label_column),
            f"{source} {name}",
            _parquet_shard_lengths(builder, name, streams[name].num_shards),
            limits[role],
        )
        for role, name in names.items()
    }


def indexed_stream(
    stream: datasets.IterableDataset, name: str, shard_lengths: list[int] | None, limit: int | None = None
) -> datasets.IterableDataset:
    """`stream` (columns image, label) with `sample_id` and `sample_index` on every row, and the same shards.

    With `shard_lengths` the index is the row number in the split, as the map-style path numbers it, and
    `limit` keeps the first `limit` rows (`max_train_samples`) without reading the others.
    """
    offsets = None
    shards = list(range(stream.num_shards))
    if shard_lengths is not None:
        offsets = tuple(itertools.accumulate([0, *shard_lengths[:-1]]))
        if limit is not None:
            shards = [shard for shard in shards if offsets[shard] < limit]
    indexed = datasets.IterableDataset.from_generator(
        _indexed_rows,
        features=ROW_FEATURES,
        # Only `shards` is a list: `datasets` makes one shard of the new stream per element.
        gen_kwargs={"shards": shards, "stream": stream, "name": name, "offsets": offsets, "limit": limit},
    )
    if limit is not None and offsets is None:
        indexed = indexed.take(limit)
    return indexed


def _indexed_rows(
    shards: list[int],
    stream: datasets.IterableDataset,
    name: str,
    offsets: tuple[int, ...] | None,
    limit: int | None,
) -> Iterator[dict[str, Any]]:
    for shard in shards:
        rows = stream.shard(num_shards=stream.num_shards, index=shard, contiguous=True)
        for row_in_shard, row in enumerate(rows):
            if offsets is None:
                index, sample_id = (
                    shard * SHARD_INDEX_STRIDE + row_in_shard,
                    f"{name} shard {shard} row {row_in_shard}",
                )
            else:
                index = offsets[shard] + row_in_shard
                if limit is not None and index >= limit:
                    break
                sample_id = f"{name} row {index}"
            yield {
                "image": row["image"],
                "label": row["label"],
                "sample_id": sample_id,
                "sample_index": index,
            }


def _parquet_shard_lengths(builder: datasets.DatasetBuilder, split: str, num_shards: int) -> list[int] | None:
    """Rows per shard from the parquet footers (a few KB each), when the split's shards are its parquet files."""
    files = next(
        (list(files) for key, files in (builder.config.data_files or {}).items() if str(key) == split), None
    )
    if not files or len(files) != num_shards or not all(str(file).endswith(".parquet") for file in files):
        return None
    import fsspec
    import pyarrow.parquet as pq

    lengths = []
    for file in files:
        with fsspec.open(str(file), "rb") as handle:
            lengths.append(pq.ParquetFile(handle).metadata.num_rows)
    return lengths


def read_split(stream: datasets.IterableDataset) -> datasets.Dataset:
    """A (validation) stream read into memory as a map-style split, so evaluation can shard it exactly."""
    rows = list(stream)
    if not rows:
        raise ValueError("The validation split is empty: it has no image/label pairs")
    return datasets.Dataset.from_list(rows, features=ROW_FEATURES)


# The training loader ---------------------------------------------------------------------------------------


class StreamingTrainLoader:
    """Batches of augmented crops from a stream, whose position in the stream survives a restart.

    A `torch` DataLoader over an IterableDataset gives each worker its own copy of the stream, whose
    position the main process then does not know (and the batches depend on the number of workers).
    Here the main process reads the rows, undecoded bytes, which is cheap, so `datasets`' state after
    the last row of every batch is exact; the expensive part, decoding and augmenting, runs in
    `num_workers` processes, in order. Batches are therefore the same for any number of workers.

    Iterating gives one epoch (the rest of it after `load_state_dict`); batches are `train_collate_fn`'s,
    on `device`, with the last partial batch of the process's stream dropped.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: SegmentationTrainTransform,
        *,
        batch_size: int,
        num_workers: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.transform = transform
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        # `datasets`' state after the last row of the last batch given out in this epoch (None: none yet).
        self._position: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The next iteration gives this epoch (from its start, unless a restored state is for it)."""
        if int(epoch) != self.epoch:
            self.epoch, self._position = int(epoch), None

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the epoch and `datasets`' position after the last batch given out."""
        return {"epoch": self.epoch, "dataset": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._position = int(state["epoch"]), state["dataset"]
        if self._position is not None:
            self.dataset.load_state_dict(self._position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        self.transform.set_epoch(self.epoch)
        # The pool is forked before `datasets` starts its reader threads.
        pool = _transform_pool(self.num_workers)
        try:
            pending: deque[tuple[Any, dict[str, Any]]] = deque()
            for rows in _row_batches(iter(self.dataset), self.batch_size):
                columns = {key: [row[key] for row in rows] for key in rows[0]}
                if pool is None:
                    samples = functools.partial(_transform_batch, self.transform, columns)
                else:
                    samples = pool.submit(_transform_batch, self.transform, columns).result
                pending.append((samples, self.dataset.state_dict()))
                if len(pending) > PREFETCH_PER_WORKER * max(self.num_workers, 1) - 1:
                    yield self._deliver(*pending.popleft())
            while pending:
                yield self._deliver(*pending.popleft())
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _deliver(
        self, samples: Callable[[], list[dict[str, Any]]], position: dict[str, Any]
    ) -> dict[str, Any]:
        batch = train_collate_fn(samples())
        self._position = position
        if self.device is not None:
            batch = {
                key: value.to(self.device) if torch.is_tensor(value) else value
                for key, value in batch.items()
            }
        return batch


def _row_batches(rows: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    while len(batch := list(itertools.islice(rows, batch_size))) == batch_size:
        yield batch


def _transform_batch(transform: SegmentationTrainTransform, columns: dict[str, list]) -> list[dict[str, Any]]:
    """Decoded, augmented samples of one batch of rows (runs in a worker process)."""
    output = transform(columns)
    return [dict(zip(output, values)) for values in zip(*output.values())]


def _transform_pool(num_workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for the transform; a worker that dies fails the run (BrokenProcessPool), never hangs it."""
    if num_workers <= 0:
        return None
    import torch.multiprocessing  # noqa: F401 (registers the reductions that hand tensors back through shared memory)

    return ProcessPoolExecutor(
        num_workers, mp_context=SignalSafeForkContext(), initializer=_start_transform_worker
    )


def _start_transform_worker() -> None:
    # One thread per worker, as DataLoader workers: the workers already use the cores in parallel.
    torch.set_num_threads(1)
    ignore_termination_signals(0)


def streaming_train_loader(
    dataset: datasets.IterableDataset,
    transform: SegmentationTrainTransform,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle_buffer_size: int,
    num_shards: int = 1,
    shard_index: int = 0,
    device: torch.device | str | None = None,
) -> StreamingTrainLoader:
    """The process's part of the (shuffled) stream, as batches of augmented crops."""
    if shuffle_buffer_size > 0:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if num_shards > 1:
        dataset = split_dataset_by_node(dataset, rank=shard_index, world_size=num_shards)
    return StreamingTrainLoader(
        dataset, transform, batch_size=batch_size, num_workers=num_workers, device=device
    )
