"""Training arguments: grouped and documented flags, recipes by name with `base:` inheritance, one architecture rule."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DEMO_DATA, REPO_ROOT

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf.arguments import (
    ARGUMENT_GROUPS,
    ClassWeights,
    TrainingConfig,
    build_parser,
    find_recipe,
    load_config,
    load_recipe,
    parse_args,
    recipe_names,
)
from segformer_hf.data import (
    class_frequencies,
    class_weights_for,
    frequency_class_weights,
    load_training_data,
    resolve_id2label,
)
from segformer_hf.training import build_model


def test_every_argument_has_help_text_and_appears_in_help_grouped():
    help_text = build_parser().format_help()
    for group in ARGUMENT_GROUPS:
        assert f"\n{group._argument_group_name}:" in help_text, group
        for config_field in dataclasses.fields(group):
            assert config_field.metadata.get("help"), f"{config_field.name} has no help text"
            assert f"--{config_field.name}" in help_text
    # The groups together are exactly the flat config: nothing is hidden from --help.
    grouped = {config_field.name for group in ARGUMENT_GROUPS for config_field in dataclasses.fields(group)}
    assert grouped == {config_field.name for config_field in dataclasses.fields(TrainingConfig)}


def test_help_runs_from_the_script_and_exits_zero():
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--warmup_ratio" in result.stdout and "fraction" in result.stdout


def test_shipped_recipes_are_found_by_name_and_all_load():
    names = recipe_names()
    assert {"demo", "camvid-b0", "ade20k", "ade20k-b5", "cityscapes", "sidewalk-b0"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.model_variant in ("b0", "b5"), name
    assert find_recipe("demo") == find_recipe("demo.yaml")


def test_shipped_recipes_read_no_file_outside_the_package(tmp_path, monkeypatch):
    """A user's own data directory must be enough: the class names and colours a recipe names are shipped
    with it (camvid-b0 once pointed at this repository's ../shared/data, which no installed package has)."""
    import segformer_hf

    package = Path(segformer_hf.__file__).resolve().parent
    monkeypatch.chdir(tmp_path)  # relative paths must not resolve against a checkout
    for name in recipe_names():
        config = load_config(name)
        if config.id2label_file is not None:
            path = Path(config.id2label_file).resolve()
            assert path.is_file() and package in path.parents, (name, config.id2label_file)
            assert resolve_id2label(id2label_file=path), name
        if config.data_dir is not None:  # bundled, or a conventional place under the user's directory
            data_dir = Path(config.data_dir)
            bundled = package in data_dir.resolve().parents
            assert bundled or (not data_dir.is_absolute() and ".." not in data_dir.parts), (name, data_dir)
    camvid = load_config("camvid-b0-scratch", {"data_dir": str(tmp_path)})
    assert list(resolve_id2label(id2label_file=camvid.id2label_file).values())[:3] == [
        "Sky",
        "Building",
        "Pole",
    ]


def test_a_recipe_inherits_from_its_base_and_overrides_it(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model_variant: b0\ndata_dir: d\nlearning_rate: 0.1\ncrop_size: [64, 64]\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nlearning_rate: 0.2\n")
    assert load_recipe(tmp_path / "child.yaml") == {"model_variant": "b0", "data_dir": "d", "learning_rate": 0.2,
                                                     "crop_size": [64, 64]}  # fmt: skip
    b5 = load_config("ade20k-b5")
    ade = load_config("ade20k")
    assert (b5.model_variant, b5.crop_size, b5.init_from) == ("b5", [640, 640], "nvidia/mit-b5")
    assert (ade.model_variant, ade.crop_size, ade.init_from) == ("b0", [512, 512], "nvidia/mit-b0")
    assert b5.learning_rate == ade.learning_rate and b5.max_train_steps == ade.max_train_steps
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="inherits from itself"):
        load_recipe(tmp_path / "loop.yaml")


def test_the_variant_flag_names_the_weights_of_multi_variant_recipes():
    config = parse_args(["--config", "cityscapes", "--model_variant", "b3"])
    assert config.init_from == "nvidia/mit-b3" and config.output_dir == "outputs/segformer-b3-cityscapes-1024"


def test_relative_recipe_paths_resolve_beside_the_recipe_from_any_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from segformer_hf.arguments import load_config; print(load_config('demo').data_dir)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(DEMO_DATA.resolve())


def test_malformed_yaml_and_a_directory_as_config_are_clear_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="demo"):
        load_config("no-such-recipe")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"model_variant": "b9"}, "model_variant"),
        ({"model_variant": None}, "model_variant"),
        ({"eval_mode": "slide", "eval_stride": [64]}, "stride"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ],
)
def test_more_impossible_values_are_rejected_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {"data_dir": "somewhere", "model_variant": "b0", **override})


def test_warmup_ratio_means_what_it_means_in_transformers():
    config = load_config(
        None, {"data_dir": "d", "model_variant": "b0", "max_train_steps": 200, "warmup_ratio": 0.1}
    )
    assert config.warmup_steps == 20


def test_null_on_the_command_line_unsets_optional_arguments_of_any_type():
    config = parse_args(
        ["--max_grad_norm", "null", "--init_from", "null", "--checkpoints_total_limit", "none"]
    )
    assert (
        config.max_grad_norm is None and config.init_from is None and config.checkpoints_total_limit is None
    )


def test_class_weights_are_a_list_or_auto_from_yaml_and_the_command_line(tmp_path):
    assert parse_args(["--class_weights", "[1, 2.5]"]).class_weights.values == [1.0, 2.5]
    assert parse_args(["--class_weights", "auto"]).class_weights.auto
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {find_recipe('demo')}\nclass_weights: [1, 2]\n")
    config = load_config(recipe)
    assert config.class_weights == ClassWeights([1.0, 2.0])
    # The saved train_config.yaml reads back the same.
    assert yaml.safe_load(yaml.safe_dump(config.to_dict()))["class_weights"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="class_weights"):
        ClassWeights("often")


def test_auto_class_weights_follow_enet_from_the_label_frequencies():
    config = load_config("demo", {"max_train_samples": 6})
    train, _, id2label = load_training_data(config)
    frequencies = class_frequencies(train, len(id2label), ignore_index=config.ignore_index)
    # Independent count: every label PNG read with PIL, void (11) left out.
    from PIL import Image

    counts = np.zeros(len(id2label))
    for sample_id in train["sample_id"]:
        label = np.asarray(
            Image.open(DEMO_DATA / "train" / "labels" / (sample_id.split("/")[-1].rsplit(".", 1)[0] + ".png"))
        )
        counts += np.bincount(label[label != 11].ravel(), minlength=len(id2label))[: len(id2label)]
    np.testing.assert_allclose(frequencies, counts / counts.sum())
    weights = frequency_class_weights(frequencies)
    np.testing.assert_allclose(weights, 1 / np.log(1.02 + counts / counts.sum()))
    assert weights[int(np.argmin(frequencies))] == max(weights)


def test_class_weights_power_damps_the_auto_weights_that_reach_the_loss():
    """`class_weights_power` raises ENet's weights to a power: 0.5 gives their square roots, in the model."""
    config = load_config(
        "demo", {"max_train_samples": 6, "class_weights": "auto", "class_weights_power": 0.5}
    )
    train, _, id2label = load_training_data(config)
    enet = 1 / np.log(1.02 + class_frequencies(train, len(id2label), ignore_index=config.ignore_index))
    model = build_model(config, id2label, class_weights_for(config, train, len(id2label)))
    np.testing.assert_allclose(model.config.class_weights, np.sqrt(enet), rtol=1e-6)
    assert frequency_class_weights(np.array([0.5, 0.25]), power=0.0) == [1.0, 1.0]
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="class_weights_power must be a finite number >= 0"):
            load_config("demo", {"class_weights_power": bad})


def test_switching_off_a_recipes_ohem_on_the_command_line_trains_plain_cross_entropy():
    """camvid-b0-scratch sets ohem_thresh; `--use_ohem false` (benchmark_training's comparison) must just work."""
    config = parse_args(["--config", "camvid-b0-scratch", "--use_ohem", "false"])
    assert config.ohem_thresh == 0.7
    model = build_model(config, {0: "background", 1: "thing"})
    assert model.config.use_ohem is False and model.config.ohem_thresh is None
    assert (
        build_model(parse_args(["--config", "camvid-b0-scratch"]), {0: "a", 1: "b"}).config.ohem_thresh == 0.7
    )


def test_dice_weight_reaches_the_model_and_bad_values_are_refused():
    config = parse_args(["--dice_weight", "0.5"])
    assert config.dice_weight == 0.5
    assert build_model(config, {0: "background", 1: "thing"}).config.dice_weight == 0.5
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="dice_weight must be a finite number >= 0"):
            load_config("demo", {"dice_weight": bad})


def test_model_variant_and_init_from_must_agree(tmp_path):
    SegformerHFForSemanticSegmentation(SegformerHFConfig.from_variant("b1", num_labels=3)).save_pretrained(
        tmp_path
    )
    id2label = {0: "a", 1: "b", 2: "c"}
    agreeing = load_config(None, {"data_dir": "d", "model_variant": "b1", "init_from": str(tmp_path)})
    assert (
        build_model(agreeing, id2label).config.hidden_sizes
        == SegformerHFConfig.from_variant("b1").hidden_sizes
    )
    unset = load_config(None, {"data_dir": "d", "init_from": str(tmp_path)})
    assert build_model(unset, id2label).config.variant == "b1"
    disagreeing = load_config(None, {"data_dir": "d", "model_variant": "b0", "init_from": str(tmp_path)})
    with pytest.raises(ValueError, match="model_variant is b0 but init_from .* is a MiT-b1"):
        build_model(disagreeing, id2label)
