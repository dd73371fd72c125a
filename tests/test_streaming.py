"""Streaming: a parquet copy of the demo data read as a stream must give the map-style run's samples, with the
same augmentation, sharded over processes, and continue where a stopped run left it.

"The same samples" is checked as what can honestly hold for two differently ordered readers: in every
epoch, the multiset of (sample id, augmented crop, label crop) of the streaming loader equals the
map-style loader's (the split is a whole number of batches, so neither drops a sample). The order may
differ: one is a buffer shuffle of the stream, the other a permutation of the rows.
"""

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from conftest import DEMO_DATA
from test_training import SMALL_RUN, _losses

from segformer_hf.arguments import load_config
from segformer_hf.data import (
    load_segmentation_dataset,
    load_training_data,
    restore_train_loader_state,
    train_dataloader_for,
    train_loader_state,
)
from segformer_hf.streaming import StreamingTrainLoader, stream_segmentation_dataset
from segformer_hf.training import main

NUM_LABELS = 11
SHARDS = 3  # 48 training rows in 3 parquet files of 16


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """The demo data as parquet (image and label as Image features), train in 3 files, validation in 1."""
    root = tmp_path_factory.mktemp("parquet")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    for split, name, shards in (("train", "train", SHARDS), ("val", "validation", 1)):
        images = sorted((DEMO_DATA / split / "images").iterdir())
        labels = sorted((DEMO_DATA / split / "labels").iterdir())
        table = datasets.Dataset.from_dict(
            {"image": [str(p) for p in images], "label": [str(p) for p in labels]}, features=features
        )
        # Embed the bytes: the parquet files must not point back at the demo files.
        table = table.cast(features).map(lambda row: row, features=features)
        for shard in range(shards):
            part = table.shard(shards, shard, contiguous=True)
            part.to_parquet(str(root / f"{name}-{shard:05d}-of-{shards:05d}.parquet"))
    return root


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _config(parquet_dir: Path, **overrides):
    values = dict(
        data_dir=str(parquet_dir),
        data_format="parquet",
        id2label_file=str(DEMO_DATA / "classes.json"),
        validation_split="validation",
        crop_size=[32, 32],
        img_scale=[60, 45],
        per_device_train_batch_size=4,
        dataloader_num_workers=0,
        max_train_samples=20,  # rows 0..19: all of shard 0 and the start of shard 1
        shuffle_buffer_size=8,
        seed=3,
    )
    values.update(overrides)
    return load_config("demo", values)


def _fingerprint(batch) -> list[tuple[str, str]]:
    """(sample id, digest of its augmented image and label) per sample of a batch."""
    return [
        (sample_id, hashlib.sha1(pixels.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())
        for sample_id, pixels, labels in zip(batch["sample_ids"], batch["pixel_values"], batch["labels"])
    ]


def _epoch(loader, transform, epoch: int) -> list[list[tuple[str, str]]]:
    if hasattr(loader, "set_epoch"):  # (a bare map-style DataLoader draws a new order each epoch by itself)
        loader.set_epoch(epoch)
    transform.set_epoch(epoch)
    return [_fingerprint(batch) for batch in loader]


def _streaming_loader(config, **kwargs):
    train, _, id2label = load_training_data(config)
    return train_dataloader_for(config, train, id2label, **kwargs)


def test_streamed_rows_carry_the_map_style_sample_ids_and_indices(parquet_dir):
    streams = stream_segmentation_dataset(data_dir=parquet_dir)
    mapped = load_segmentation_dataset(data_dir=parquet_dir)
    streamed = {row["sample_id"]: row for row in streams["train"]}
    assert len(streamed) == len(mapped["train"]) == 48
    for row in mapped["train"]:
        twin = streamed[row["sample_id"]]
        assert twin["sample_index"] == row["sample_index"]
        assert (
            twin["image"]["bytes"] == row["image"]["bytes"]
            and twin["label"]["bytes"] == row["label"]["bytes"]
        )
    assert isinstance(streams["train"], datasets.IterableDataset) and streams["train"].num_shards == SHARDS


def test_a_streaming_run_and_a_map_style_run_see_the_same_augmented_samples_every_epoch(parquet_dir):
    streaming = _config(parquet_dir, streaming=True)
    map_style = _config(parquet_dir, streaming=False)
    stream_loader, stream_transform = _streaming_loader(streaming)
    assert isinstance(stream_loader, StreamingTrainLoader)
    map_train, _, id2label = load_training_data(map_style)
    map_loader, map_transform = train_dataloader_for(map_style, map_train, id2label)
    seen = []
    for epoch in (0, 1):
        streamed = _epoch(stream_loader, stream_transform, epoch)
        mapped = _epoch(map_loader, map_transform, epoch)
        assert len(streamed) == len(mapped) == 5
        assert Counter(s for batch in streamed for s in batch) == Counter(
            s for batch in mapped for s in batch
        )
        assert {sample_id for batch in streamed for sample_id, _ in batch} == {
            f"{parquet_dir} (parquet) train row {row}" for row in range(20)
        }
        seen.append(streamed)
    # The augmentation follows the epoch, and the buffer shuffle reorders the stream from epoch to epoch.
    assert dict(s for batch in seen[0] for s in batch) != dict(s for batch in seen[1] for s in batch)
    assert [s[0] for batch in seen[0] for s in batch] != [s[0] for batch in seen[1] for s in batch]


def test_batches_do_not_depend_on_the_number_of_workers(parquet_dir):
    config = _config(parquet_dir, streaming=True)
    inline, inline_transform = _streaming_loader(config)
    pooled, pooled_transform = _streaming_loader(
        _config(parquet_dir, streaming=True, dataloader_num_workers=2)
    )
    assert _epoch(pooled, pooled_transform, 1) == _epoch(inline, inline_transform, 1)


def test_processes_read_disjoint_parts_that_cover_the_stream(parquet_dir):
    config = _config(parquet_dir, streaming=True, max_train_samples=None, shuffle_buffer_size=0)
    parts = []
    for rank in (0, 1):
        loader, transform = _streaming_loader(config, num_shards=2, shard_index=rank)
        parts.append({sample_id for batch in _epoch(loader, transform, 0) for sample_id, _ in batch})
    assert not parts[0] & parts[1]
    assert len(parts[0] | parts[1]) == 48


def _stop_and_resume(config, stop_after: int):
    """Batches of epochs 0 and 1 of a loader stopped after `stop_after` batches of epoch 0 and restored, as a
    new process would, from its JSON state."""
    loader, transform = _streaming_loader(config)
    loader.set_epoch(0)
    transform.set_epoch(0)
    before = []
    for batch in loader:
        before.append(_fingerprint(batch))
        if len(before) == stop_after:
            break
    saved = json.loads(json.dumps([train_loader_state(loader)]))
    resumed, resumed_transform = _streaming_loader(config)
    epoch = restore_train_loader_state(resumed, saved)
    assert epoch == 0
    after = _epoch(resumed, resumed_transform, epoch)
    return before, after, _epoch(resumed, resumed_transform, 1)


def test_a_stopped_stream_resumes_with_exactly_the_batches_it_had_left(parquet_dir):
    config = _config(parquet_dir, streaming=True, shuffle_buffer_size=0)
    loader, transform = _streaming_loader(config)
    uninterrupted = [_epoch(loader, transform, 0), _epoch(loader, transform, 1)]
    before, after, next_epoch = _stop_and_resume(config, stop_after=2)
    assert before == uninterrupted[0][:2]
    assert after == uninterrupted[0][2:]
    assert next_epoch == uninterrupted[1]


def test_with_a_shuffle_buffer_a_resumed_epoch_repeats_nothing_and_the_next_epoch_is_exact(parquet_dir):
    """`datasets` does not save the shuffle buffer (its documented limit): its samples are lost for that epoch."""
    config = _config(parquet_dir, streaming=True, shuffle_buffer_size=8)
    loader, transform = _streaming_loader(config)
    uninterrupted = [_epoch(loader, transform, 0), _epoch(loader, transform, 1)]
    before, after, next_epoch = _stop_and_resume(config, stop_after=2)
    assert before == uninterrupted[0][:2]
    seen_before = {s for batch in before for s in batch}
    seen_after = [s for batch in after for s in batch]
    assert not seen_before & set(seen_after) and len(set(seen_after)) == len(seen_after)
    assert set(seen_after) <= {s for batch in uninterrupted[0][2:] for s in batch}
    assert len(seen_after) >= 20 - 8 - 8  # at most the buffer is lost (and a partial batch dropped)
    assert next_epoch == uninterrupted[1]


def test_restoring_needs_the_same_kind_of_loader_and_number_of_processes(parquet_dir):
    loader, _ = _streaming_loader(_config(parquet_dir, streaming=True))
    state = train_loader_state(loader)
    with pytest.raises(ValueError, match="as many processes"):
        restore_train_loader_state(loader, [state, state])
    with pytest.raises(ValueError, match="streaming: false"):
        restore_train_loader_state(loader, None)
    map_config = _config(parquet_dir, streaming=False)
    train, _, id2label = load_training_data(map_config)
    map_loader, _ = train_dataloader_for(map_config, train, id2label)
    assert train_loader_state(map_loader) is None and restore_train_loader_state(map_loader, None) is None
    with pytest.raises(ValueError, match="streaming: true"):
        restore_train_loader_state(map_loader, [state])


def test_streaming_refuses_file_layouts_and_a_missing_validation_split(tmp_path, parquet_dir):
    with pytest.raises(ValueError, match="streaming: false"):
        stream_segmentation_dataset(data_dir=DEMO_DATA, data_format="pairs")
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    for file in parquet_dir.glob("train-*.parquet"):
        shutil.copy(file, only_train / file.name)
    with pytest.raises(ValueError, match="validation split"):
        stream_segmentation_dataset(data_dir=only_train)


def test_a_streaming_training_run_resumed_mid_epoch_reproduces_the_uninterrupted_losses(
    tmp_path, parquet_dir
):
    """The real loop: the step-7 checkpoint of a 9-step run (5 steps an epoch) resumed in a fresh run."""
    common = [
        *SMALL_RUN, "--data_dir", str(parquet_dir), "--data_format", "parquet", "--streaming", "true",
        "--validation_split", "validation", "--shuffle_buffer_size", "0", "--max_train_samples", "20",
        "--per_device_train_batch_size", "4", "--max_train_steps", "9", "--eval_steps", "100",
        "--checkpointing_steps", "7", "--checkpoints_total_limit", "3", "--max_eval_samples", "2",
    ]  # fmt: skip
    full = tmp_path / "full"
    assert main([*common, "--output_dir", str(full)]) == 0
    checkpoint = full / "checkpoints" / "step_00000007"
    state = json.loads((checkpoint / "training_state.json").read_text())
    [position] = state["train_data"]
    assert position["epoch"] == 1 and position["dataset"] is not None
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    assert main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [8, 9]
    for step in (8, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    assert torch.isfinite(torch.tensor(list(got.values()))).all()
