"""Loading reference SegFormer weights into segformer_hf, and exporting back to transformers.

`from_reference(source)` builds one of our models from a reference checkpoint; `to_transformers(model)`
returns transformers' own class with our weights. This lives apart from the model files on purpose: they
travel to the Hub as remote code, where conversion is neither needed nor importable.

Three foreign key layouts are understood, each mapped by a table of renames to ours (exporting uses the
same transformers table read backwards):

* transformers' checkpoint files (`segformer.encoder.block.0.0.attention.self.query.weight`, ...): the
  layout of every nvidia/* Hub repo and of what transformers 5.x still writes on save;
* transformers' in-memory module names (`segformer.stages.0.blocks.0.attention.q_proj.weight`, ...),
  for a live `Segformer*` model;
* the original NVlabs/mmseg files (`backbone.block1.0.attn.kv.weight`, ...; MiT ImageNet files
  without the `backbone.` prefix).

Loading is strict: the encoder must be filled completely and every source weight must be used. A
head the source lacks (a decode head when starting from an ImageNet encoder) is newly initialised
and reported; a head the target class lacks is dropped and reported; anything else that does not
fit is an error listing the keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .configuration_segformer_hf import SegformerHFConfig
from .modeling_segformer_hf import (
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
    SegformerHFPreTrainedModel,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# transformers' checkpoint names <-> ours: one (theirs, ours) pair of templates per rename, read in both
# directions. `{stage}` and `{layer}` stand for an index; a template that starts with a dot renames a part
# anywhere in a key, any other renames the key's beginning.
_TRANSFORMERS_FILE_NAMES = [
    (
        "segformer.encoder.patch_embeddings.{stage}.proj.",
        "segformer.stages.{stage}.patch_embeddings.projection.",
    ),
    (
        "segformer.encoder.patch_embeddings.{stage}.layer_norm.",
        "segformer.stages.{stage}.patch_embeddings.layer_norm.",
    ),
    ("segformer.encoder.block.{stage}.{layer}.", "segformer.stages.{stage}.layers.{layer}."),
    ("segformer.encoder.layer_norm.{stage}.", "segformer.stages.{stage}.layer_norm."),
    (".layer_norm_1.", ".attention_norm."),
    (".layer_norm_2.", ".mlp_norm."),
    (".attention.self.query.", ".attention.query."),
    (".attention.self.key.", ".attention.key."),
    (".attention.self.value.", ".attention.value."),
    (".attention.self.sr.", ".attention.reduction.conv."),
    (".attention.self.layer_norm.", ".attention.reduction.layer_norm."),
    (".attention.output.dense.", ".attention.output."),
    (".mlp.dense1.", ".mix_ffn.fc1."),
    (".mlp.dwconv.dwconv.", ".mix_ffn.depthwise_conv."),
    (".mlp.dense2.", ".mix_ffn.fc2."),
    ("decode_head.linear_c.{stage}.proj.", "decode_head.stage_projections.{stage}."),
    ("decode_head.linear_fuse.", "decode_head.fuse."),
]


def _rename_rule(source: str, target: str) -> tuple[str, str]:
    """A template pair as a (pattern, replacement) rule: each `{name}` matches an index and carries it over."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(source))
    anchor = "" if source.startswith(".") else "^"
    return anchor + pattern, re.sub(r"\{(\w+)\}", r"\\g<\1>", target)


_TRANSFORMERS_FILE_TO_OURS = [_rename_rule(theirs, ours) for theirs, ours in _TRANSFORMERS_FILE_NAMES]
# The inverse composes the inverse renames in reverse order.
_OURS_TO_TRANSFORMERS_FILE = [
    _rename_rule(ours, theirs) for theirs, ours in reversed(_TRANSFORMERS_FILE_NAMES)
]

# transformers 5.x module names (a live model's state_dict) -> its checkpoint names.
_TRANSFORMERS_MODULE_TO_FILE = [
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
]

# NVlabs/mmseg names (after stripping `backbone.`, re-prefixed below) -> ours. Stages are 1-based there.
_NVLABS_TO_OURS = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"segformer.stages.{int(m[1]) - 1}.patch_embeddings.projection."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"segformer.stages.{int(m[1]) - 1}.patch_embeddings.layer_norm."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"segformer.stages.{int(m[1]) - 1}.layers.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"segformer.stages.{int(m[1]) - 1}.layer_norm."),
    (r"\.norm1\.", ".attention_norm."),
    (r"\.norm2\.", ".mlp_norm."),
    (r"\.attn\.q\.", ".attention.query."),
    (r"\.attn\.kv\.", ".attention.key_value."),
    (r"\.attn\.sr\.", ".attention.reduction.conv."),
    (r"\.attn\.norm\.", ".attention.reduction.layer_norm."),
    (r"\.attn\.proj\.", ".attention.output."),
    (r"\.mlp\.fc1\.", ".mix_ffn.fc1."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mix_ffn.depthwise_conv."),
    (r"\.mlp\.fc2\.", ".mix_ffn.fc2."),
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"decode_head.stage_projections.{int(m[1]) - 1}."),
    (r"^decode_head\.linear_fuse\.conv\.", "decode_head.fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", "decode_head.batch_norm."),
    (r"^decode_head\.linear_pred\.", "decode_head.classifier."),
    (r"^head\.", "classifier."),
]
# mmseg's BaseDecodeHead always builds `conv_seg`; SegFormer's head never uses it.
_NVLABS_KNOWN_UNUSED = re.compile(r"^decode_head\.conv_seg\.")

# Architecture fields that transformers' SegformerConfig and ours share by name.
_SHARED_CONFIG_FIELDS = (
    "num_channels",
    "depths",
    "hidden_sizes",
    "num_attention_heads",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
    "decoder_hidden_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout_prob",
    "drop_path_rate",
    "initializer_range",
    "semantic_loss_ignore_index",
)


class ReferenceLoadError(ValueError):
    """A reference checkpoint does not fit the requested model; the message lists the offending keys."""


def rename_keys(state_dict: StateDict, table: Iterable[tuple[str, Any]]) -> StateDict:
    """Applies every (pattern, replacement) of `table` to every key, in order."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in table]
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def _fuse_key_value(state_dict: StateDict) -> StateDict:
    """Concatenates separate key/value projections into our single `key_value` projection."""
    fused = {}
    for key, tensor in state_dict.items():
        if ".attention.value." in key:
            continue
        if ".attention.key." in key:
            value_key = key.replace(".attention.key.", ".attention.value.")
            if value_key not in state_dict:
                raise ReferenceLoadError(f"Found {key} without its partner {value_key}.")
            fused[key.replace(".attention.key.", ".attention.key_value.")] = torch.cat(
                [tensor, state_dict[value_key]], dim=0
            )
        else:
            fused[key] = tensor
    orphans = [
        k for k in state_dict if ".attention.value." in k and k.replace(".value.", ".key.") not in state_dict
    ]
    if orphans:
        raise ReferenceLoadError(f"Found value projections without key projections: {orphans}")
    return fused


def _split_key_value(state_dict: StateDict) -> StateDict:
    split = {}
    for key, tensor in state_dict.items():
        if ".attention.key_value." in key:
            key_part, value_part = tensor.chunk(2, dim=0)
            split[key.replace(".key_value.", ".key.")] = key_part
            split[key.replace(".key_value.", ".value.")] = value_part
        else:
            split[key] = tensor
    return split


def _squeeze_fuse_weight(state_dict: StateDict) -> StateDict:
    """The fusion is a 1x1 conv in the references and a plain matrix here: (C, 4C, 1, 1) -> (C, 4C)."""
    weight = state_dict.get("decode_head.fuse.weight")
    if weight is not None and weight.ndim == 4:
        state_dict = {**state_dict, "decode_head.fuse.weight": weight.flatten(1)}
    return state_dict


def _detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("segformer.encoder.") for k in keys):
        return "transformers"
    if any(k.startswith("segformer.stages.") and ".blocks." in k for k in keys):
        return "transformers_module"
    if any(k.startswith("segformer.stages.") and ".layers." in k for k in keys):
        return "segformer_hf"
    if any(re.match(r"^(backbone\.)?(patch_embed\d|block\d)\.", k) for k in keys):
        return "nvlabs"
    raise ReferenceLoadError(
        "Unrecognised checkpoint layout: expected transformers (segformer.encoder.*), NVlabs/mmseg "
        f"(backbone.block1.*, patch_embed1.*) or segformer_hf keys; first keys are {keys[:5]}"
    )


def to_our_state_dict(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """Maps a foreign SegFormer state dict to our key names.

    Returns the mapped state dict and the source keys that are known to be unused (mmseg's
    `decode_head.conv_seg`), so the caller can say what it skipped.
    """
    if not any(k.startswith(("segformer.", "decode_head.", "classifier.", "backbone.")) for k in state_dict):
        # A bare encoder (transformers' SegformerModel, our SegformerHFModel) has no `segformer.` prefix.
        if any(k.startswith(("encoder.", "stages.")) for k in state_dict):
            state_dict = {f"segformer.{k}": v for k, v in state_dict.items()}
    layout = _detect_layout(state_dict)
    skipped: list[str] = []
    if layout == "transformers_module":
        state_dict = rename_keys(state_dict, _TRANSFORMERS_MODULE_TO_FILE)
        layout = "transformers"
    if layout == "transformers":
        mapped = _fuse_key_value(rename_keys(state_dict, _TRANSFORMERS_FILE_TO_OURS))
    elif layout == "nvlabs":
        skipped = [k for k in state_dict if _NVLABS_KNOWN_UNUSED.match(k)]
        stripped = {
            k.removeprefix("backbone."): v for k, v in state_dict.items() if not _NVLABS_KNOWN_UNUSED.match(k)
        }
        mapped = rename_keys(stripped, _NVLABS_TO_OURS)
    else:
        mapped = dict(state_dict)
    return _squeeze_fuse_weight(mapped), skipped


def to_transformers_state_dict(state_dict: StateDict) -> StateDict:
    """Maps our state dict to transformers' checkpoint key names (what nvidia/* repos hold)."""
    renamed = rename_keys(_split_key_value(state_dict), _OURS_TO_TRANSFORMERS_FILE)
    fuse = renamed.get("decode_head.linear_fuse.weight")
    if fuse is not None:
        renamed["decode_head.linear_fuse.weight"] = fuse[:, :, None, None]
    return renamed


def _fields_from_shapes(state_dict: StateDict) -> dict[str, Any]:
    stage_indices = sorted(
        {
            int(m[1])
            for k in state_dict
            if (m := re.match(r"^segformer\.stages\.(\d+)\.patch_embeddings\.", k))
        }
    )
    if not stage_indices:
        raise ReferenceLoadError("Cannot infer the architecture: the checkpoint has no patch embeddings.")
    fields: dict[str, Any] = {
        "depths": [],
        "hidden_sizes": [],
        "patch_sizes": [],
        "sr_ratios": [],
        "mlp_ratios": [],
    }
    for stage in stage_indices:
        prefix = f"segformer.stages.{stage}."
        projection = state_dict[prefix + "patch_embeddings.projection.weight"]
        width = projection.shape[0]
        layer_ids = {
            int(m[1]) for k in state_dict if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))
        }
        reduction = state_dict.get(prefix + "layers.0.attention.reduction.conv.weight")
        fc1 = state_dict.get(prefix + "layers.0.mix_ffn.fc1.weight")
        fields["depths"].append(len(layer_ids))
        fields["hidden_sizes"].append(width)
        fields["patch_sizes"].append(projection.shape[-1])
        fields["sr_ratios"].append(reduction.shape[-1] if reduction is not None else 1)
        fields["mlp_ratios"].append(fc1.shape[0] // width if fc1 is not None else 4)
        if stage == 0:
            fields["num_channels"] = projection.shape[1]
    num_stages = len(stage_indices)
    fields["num_attention_heads"] = [1, 2, 5, 8][:num_stages]
    fields["strides"] = [4, 2, 2, 2][:num_stages]
    if "decode_head.stage_projections.0.weight" in state_dict:
        fields["decoder_hidden_size"] = state_dict["decode_head.stage_projections.0.weight"].shape[0]
    classifier = state_dict.get("decode_head.classifier.weight", state_dict.get("classifier.weight"))
    if classifier is not None:
        fields["num_labels"] = classifier.shape[0]
    fields["variant"] = SegformerHFConfig.variant_for_sizes(fields["hidden_sizes"], fields["depths"])
    return fields


def _fields_from_transformers(values: dict) -> dict[str, Any]:
    fields = {name: values[name] for name in _SHARED_CONFIG_FIELDS if name in values}
    if values.get("id2label"):
        fields["id2label"] = {int(k): v for k, v in values["id2label"].items()}
        fields["label2id"] = {v: int(k) for k, v in values["id2label"].items()}
    fields["variant"] = SegformerHFConfig.variant_for_sizes(
        fields.get("hidden_sizes", ()), fields.get("depths", ())
    )
    return fields


def read_checkpoint_file(path: str | os.PathLike) -> StateDict:
    """Reads weights from safetensors, or from a pickle file with `weights_only=True` (never executes code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ReferenceLoadError(
            f"Could not read {path} as a weights-only PyTorch checkpoint ({error}). Files that need arbitrary "
            "code to unpickle are refused; convert them to safetensors where you trust them."
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ReferenceLoadError(f"{path} does not hold a state dict of tensors.")
    return checkpoint


def _read_directory(directory: Path) -> tuple[StateDict, dict | None]:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors")), config
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict: StateDict = {}
        for shard in shards:
            state_dict.update(load_file(str(directory / shard)))
        return state_dict, config
    for name in ("pytorch_model.bin", "model.pth", "model.pt"):
        if (directory / name).exists():
            return read_checkpoint_file(directory / name), config
    raise ReferenceLoadError(
        f"{directory} holds no model.safetensors, sharded safetensors index or pytorch_model.bin."
    )


def _download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[
                    "config.json",
                    "*.safetensors",
                    "*.safetensors.index.json",
                    "pytorch_model.bin",
                ],
            )
        )
    except Exception as error:
        raise ReferenceLoadError(
            f"Could not fetch {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the repo id and your connection, or pass a local directory or checkpoint file."
        ) from error


def read_reference(source: Any, revision: str | None = None) -> tuple[StateDict, dict | None]:
    """Reads (state dict, config dict or None) from any supported source."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        return dict(source.state_dict()), (config.to_dict() if config is not None else None)
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if path.is_dir():
        return _read_directory(path)
    if path.is_file():
        return read_checkpoint_file(path), None
    if (
        isinstance(source, str)
        and re.fullmatch(r"[\w.-]+/[\w.-]+", source)
        and not source.startswith((".", "/"))
    ):
        return _read_directory(_download(source, revision))
    raise ReferenceLoadError(f"{source!r} is neither an existing file or directory nor a Hub repo id.")


def _component(key: str) -> str:
    if key.startswith("segformer.") or key.startswith("stages."):
        return "encoder"
    if key.startswith("decode_head."):
        return "decode_head"
    if key.startswith("classifier."):
        return "image_classifier"
    return "unknown"


def load_state_dict_strictly(
    model: SegformerHFPreTrainedModel,
    state_dict: StateDict,
    ignore_mismatched_sizes: bool = False,
) -> dict[str, list[str]]:
    """Loads our-named `state_dict` into `model`, refusing anything that would be silently wrong.

    Returns a report: `newly_initialized` (whole heads the source lacks, or resized classifiers with
    `ignore_mismatched_sizes`) and `dropped` (heads that the target class does not have).

    Raises:
        ReferenceLoadError: listing missing, unexpected and mis-shaped keys.
    """
    if isinstance(model, SegformerHFModel):
        state_dict = {k.removeprefix("segformer."): v for k, v in state_dict.items()}
    target = model.state_dict()
    target_components = {_component(k) for k in target}
    source_components = {_component(k) for k in state_dict}

    dropped = [k for k in state_dict if _component(k) not in target_components and _component(k) != "unknown"]
    unexpected = [k for k in state_dict if k not in target and k not in dropped]
    missing = [k for k in target if k not in state_dict]
    # A head that is entirely absent from the source is a fresh head (fine-tuning an encoder); a head
    # that is partly there is a broken checkpoint.
    fresh_heads = target_components - source_components - {"encoder"}
    missing = [k for k in missing if _component(k) not in fresh_heads]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state_dict and state_dict[k].shape != target[k].shape
    ]
    resized = []
    if ignore_mismatched_sizes:
        # Only a classifier may be resized (a new label set); an encoder of another shape is another model.
        resized = [
            m.split(":")[0] for m in mismatched if m.startswith(("decode_head.classifier.", "classifier."))
        ]
        mismatched = [m for m in mismatched if m.split(":")[0] not in resized]
    if missing or unexpected or mismatched:
        raise ReferenceLoadError(
            "The checkpoint does not fit this model; nothing was loaded.\n"
            f"  missing ({len(missing)}): {missing[:20]}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:20]}\n"
            f"  mis-shaped ({len(mismatched)}): {mismatched[:20]}"
            + (
                "\n  A classifier of another size means another label set: pass ignore_mismatched_sizes=True "
                "to start a new head."
                if any(m.startswith(("decode_head.classifier.", "classifier.")) for m in mismatched)
                else ""
            )
        )
    to_load = {k: v for k, v in state_dict.items() if k in target and k not in resized}
    # Strict apart from the keys we decided to initialise fresh.
    incompatible = model.load_state_dict(to_load, strict=False)
    assert not incompatible.unexpected_keys
    newly_initialized = sorted(set(incompatible.missing_keys))
    if newly_initialized:
        logger.warning(
            "Newly initialised (not in the checkpoint): %s. Train the model before using it for predictions.",
            ", ".join(sorted({k.rsplit(".", 1)[0] for k in newly_initialized})),
        )
    if dropped:
        logger.info(
            "Dropped checkpoint heads that %s does not have: %d tensors", type(model).__name__, len(dropped)
        )
    return {"newly_initialized": newly_initialized, "dropped": sorted(dropped)}


def from_reference(
    source: Any,
    model_class: type[SegformerHFPreTrainedModel] = SegformerHFForSemanticSegmentation,
    *,
    ignore_mismatched_sizes: bool = False,
    revision: str | None = None,
    **config_overrides: Any,
) -> SegformerHFPreTrainedModel:
    """Builds `model_class` from a reference SegFormer checkpoint, strictly (see module docstring).

    Args:
        source: Hub repo id, local directory (transformers or segformer_hf format), `.pth`/`.bin`/
            `.safetensors` file (transformers or NVlabs/mmseg layout), a state dict, or a live
            transformers Segformer model.
        model_class: one of our model classes; the semantic-segmentation model unless told otherwise.
        ignore_mismatched_sizes: start a new classifier when the label count differs.
        revision: Hub revision, for repo ids.
        **config_overrides: config fields to set (e.g. `num_labels`, `id2label`, `drop_path_rate`).
    """
    state_dict, reference_config = read_reference(source, revision=revision)
    mapped, skipped = to_our_state_dict(state_dict)
    if skipped:
        logger.info("Skipping weights the reference never uses: %s", skipped)
    if reference_config is not None and reference_config.get("model_type") == "segformer_hf":
        fields = _config_fields(reference_config)
    elif reference_config is not None and reference_config.get("model_type") == "segformer":
        fields = _fields_from_transformers(reference_config)
    else:
        fields = _fields_from_shapes(mapped)
    if "num_labels" in config_overrides and "id2label" not in config_overrides:
        # A new label count replaces the source's label names rather than contradicting them.
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    config = SegformerHFConfig(**{**fields, **config_overrides})
    model = model_class(config)
    load_state_dict_strictly(model, mapped, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return model


def _config_fields(config_dict: dict) -> dict:
    return {
        k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version", "auto_map")
    }


_TRANSFORMERS_CLASS_FOR = {
    SegformerHFForSemanticSegmentation: "SegformerForSemanticSegmentation",
    SegformerHFForImageClassification: "SegformerForImageClassification",
    SegformerHFModel: "SegformerModel",
}


def transformers_config(config: SegformerHFConfig):
    """Our config as transformers' `SegformerConfig` (same architecture, labels and loss index)."""
    from transformers import SegformerConfig

    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    return SegformerConfig(
        **fields,
        num_encoder_blocks=config.num_encoder_blocks,
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
    )


def to_transformers(model: SegformerHFPreTrainedModel):
    """Returns transformers' stock Segformer model with our weights: same outputs, no remote code."""
    import transformers

    class_name = next(name for cls, name in _TRANSFORMERS_CLASS_FOR.items() if isinstance(model, cls))
    reference = getattr(transformers, class_name)(transformers_config(model.config))
    ours = model.state_dict()
    if isinstance(model, SegformerHFModel):
        ours = {f"segformer.{k}": v for k, v in ours.items()}
    file_named = to_transformers_state_dict(ours)
    target_keys = [
        k if k.startswith(("segformer.", "decode_head.", "classifier.")) else f"segformer.{k}"
        for k in reference.state_dict()
    ]
    if _detect_layout(target_keys) == "transformers_module":
        module_named = _invert_module_names(file_named, target_keys)
    else:
        module_named = file_named
    if class_name == "SegformerModel":
        module_named = {k.removeprefix("segformer."): v for k, v in module_named.items()}
    reference.load_state_dict({k: v.clone() for k, v in module_named.items()}, strict=True)
    return reference.to(next(model.parameters()).device).train(model.training)


def _invert_module_names(file_named: StateDict, module_keys: Iterable[str]) -> StateDict:
    """Maps checkpoint names to a live transformers model's module names, via the forward table."""
    module_keys = list(module_keys)
    prefixed = [
        k if k.startswith(("segformer.", "decode_head.", "classifier.")) else f"segformer.{k}"
        for k in module_keys
    ]
    forward = rename_keys(dict.fromkeys(prefixed, None), _TRANSFORMERS_MODULE_TO_FILE)
    file_to_module = {}
    for module_key, file_key in zip(prefixed, forward):
        file_to_module[file_key] = module_key
    unknown = [k for k in file_named if k not in file_to_module]
    if unknown:
        raise ReferenceLoadError(f"Cannot place these weights in transformers' model: {unknown[:10]}")
    return {file_to_module[k]: v for k, v in file_named.items()}


__all__ = [
    "ReferenceLoadError",
    "from_reference",
    "load_state_dict_strictly",
    "read_reference",
    "to_our_state_dict",
    "to_transformers",
    "to_transformers_state_dict",
    "transformers_config",
]


# The command line: convert and verify ---------------------------------------------------------------

CONVERT_DESCRIPTION = """Convert a reference SegFormer checkpoint to segformer_hf's format, optionally proving it equal.

The source is a Hub repo id or local directory in transformers' format (nvidia/segformer-*), or an
original NVlabs/mmseg `.pth` (segmentation checkpoints and MiT ImageNet encoders). The output is what
`save_pretrained` writes (safetensors, config.json with auto_map, the two remote-code files) plus a
SegformerImageProcessor config, so `AutoModelForSemanticSegmentation.from_pretrained(output,
trust_remote_code=True)` and `pipeline("image-segmentation", ...)` work on it directly.

    segformer-hf convert --source nvidia/segformer-b0-finetuned-ade-512-512 \\
        --output converted/segformer-b0-ade --verify
    segformer-hf convert --source mit_b2.pth --output converted/mit-b2-camvid \\
        --id2label_file configs/labels/camvid.json --ignore_mismatched_sizes

The output directory appears complete or not at all: everything is written into a temporary
directory beside it and renamed into place at the end.
"""

TASKS = {
    "semantic-segmentation": (SegformerHFForSemanticSegmentation, "SegformerForSemanticSegmentation"),
    "image-classification": (SegformerHFForImageClassification, "SegformerForImageClassification"),
    "encoder": (SegformerHFModel, "SegformerModel"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segformer-hf convert",
        description=CONVERT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, help="Hub repo id, transformers directory or NVlabs .pth")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--task", choices=sorted(TASKS), default="semantic-segmentation")
    parser.add_argument("--revision", default=None, help="Hub revision of --source")
    parser.add_argument("--num_labels", type=int, default=None, help="label count of a new classifier")
    parser.add_argument(
        "--id2label_file",
        type=Path,
        default=None,
        help='JSON file with {"0": "road", ...} or {"id2label": {...}} (as in configs/labels/)',
    )
    parser.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="start a new classifier when the label count differs from the source's",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run transformers' own SegFormer on the same weights and input and compare the outputs",
    )
    parser.add_argument(
        "--verify_image", type=Path, default=None, help="image for --verify (default: random)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative L2 difference --verify accepts before refusing to write the output",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the output to this repo")
    return parser.parse_args(argv)


def read_id2label(path: Path) -> dict[int, str]:
    """Reads a label file: either a bare {id: name} mapping or one under an "id2label" key."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"Cannot read the label file {path}: {error}") from error
    mapping = payload.get("id2label", payload) if isinstance(payload, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise SystemExit(f'{path} holds no {{"0": "name", ...}} mapping (bare or under "id2label").')
    try:
        id2label = {int(index): str(name) for index, name in mapping.items()}
    except ValueError as error:
        raise SystemExit(f"{path}: label ids must be integers ({error}).") from error
    if sorted(id2label) != list(range(len(id2label))):
        raise SystemExit(
            f"{path}: label ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)}."
        )
    return id2label


def label_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for a new label set, from --num_labels and/or --id2label_file."""
    if args.id2label_file is None:
        return {} if args.num_labels is None else {"num_labels": args.num_labels}
    id2label = read_id2label(args.id2label_file)
    if args.num_labels is not None and args.num_labels != len(id2label):
        raise SystemExit(
            f"--num_labels {args.num_labels} contradicts {args.id2label_file}, which names {len(id2label)} labels."
        )
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def is_local_file(source: str) -> bool:
    return Path(source).is_file()


def source_image_processor(source: str, revision: str | None):
    """The source's own preprocessing settings where it has them, else SegformerImageProcessor's defaults.

    They are re-saved through SegformerImageProcessor rather than copied byte for byte: old Hub files name
    `SegformerFeatureExtractor`, which AutoImageProcessor no longer resolves for a non-`segformer` model type.
    """
    from transformers import SegformerImageProcessor

    if is_local_file(source):
        return SegformerImageProcessor()
    if Path(source).is_dir():
        if (Path(source) / "preprocessor_config.json").is_file():
            return SegformerImageProcessor.from_pretrained(source)
        return SegformerImageProcessor()
    try:
        return SegformerImageProcessor.from_pretrained(source, revision=revision)
    except OSError:
        print(f"{source} has no preprocessor_config.json; writing SegformerImageProcessor defaults.")
        return SegformerImageProcessor()


def transformers_reference(
    args: argparse.Namespace, model: SegformerHFPreTrainedModel
) -> tuple[torch.nn.Module, bool]:
    """transformers' own model for the comparison, and whether its head came from the source.

    A transformers-format source is loaded by transformers itself, independently of our converter; an
    NVlabs file is something transformers cannot read, so our converted weights go through
    `to_transformers` and the comparison checks the implementation rather than the key mapping.
    """
    if is_local_file(args.source):
        return to_transformers(model), True
    config_path = Path(args.source) / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") != "segformer":
        # Already segformer_hf's own format: nothing for transformers to read independently.
        return to_transformers(model), True
    import transformers

    reference_class = getattr(transformers, TASKS[args.task][1])
    reference, loading_info = reference_class.from_pretrained(
        args.source, revision=args.revision, output_loading_info=True
    )
    head_from_source = not loading_info["missing_keys"] and not loading_info["mismatched_keys"]
    return reference, head_from_source


def verification_input(args: argparse.Namespace, processor) -> torch.Tensor:
    if args.verify_image is not None:
        image = Image.open(args.verify_image).convert("RGB")
    else:
        size = processor.size
        height, width = size.get("height", 512), size.get("width", 512)
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    return processor(images=image, return_tensors="pt")["pixel_values"]


def differences(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs, relative L2) difference of `ours` from `reference`, computed in float64."""
    difference = ours.double() - reference.double()
    relative = difference.norm() / reference.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    return difference.abs().max().item(), relative.item()


def verify(args: argparse.Namespace, model: SegformerHFPreTrainedModel, processor) -> bool:
    """Prints how far our outputs are from transformers' on one input; True when within --tolerance."""
    reference, head_from_source = transformers_reference(args, model)
    pixel_values = verification_input(args, processor)
    model.eval()
    reference.eval()
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True)
        theirs = reference(pixel_values, output_hidden_states=True)
    worst = 0.0
    for stage, (our_map, their_map) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        max_abs, relative = differences(our_map, their_map)
        worst = max(worst, relative)
        print(
            f"stage {stage + 1} hidden states: max abs difference {max_abs:.3e}, relative L2 {relative:.3e}"
        )
    if args.task != "encoder":
        if head_from_source and ours.logits.shape == theirs.logits.shape:
            max_abs, relative = differences(ours.logits, theirs.logits)
            worst = max(worst, relative)
            print(f"max abs logit difference: {max_abs:.3e}")
            print(f"relative L2 logit difference: {relative:.3e}")
        else:
            print(
                "logits not compared: the head is newly initialised; only the encoder comes from the source"
            )
    passed = worst <= args.tolerance
    print(f"verification {'passed' if passed else 'FAILED'} (tolerance {args.tolerance:.1e} relative L2)")
    return passed


def save_atomically(model: SegformerHFPreTrainedModel, processor, output: Path, overwrite: bool) -> None:
    """Writes model and processor into a temporary sibling of `output`, then renames it into place."""
    if output.exists() and not overwrite:
        raise SystemExit(f"{output} already exists; pass --overwrite to replace it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    retired = None
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if output.exists():
            # A directory cannot be replaced by rename while it has contents: move it aside first.
            retired = output.with_name(f"{staging.name}.previous")
            os.replace(output, retired)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and retired.exists() and not output.exists():
            os.replace(retired, output)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`segformer-hf convert`: exit 0 when saved, 1 when verification fails, 2 for a source that cannot be
    converted (the reason printed, not a traceback)."""
    args = parse_args(argv)
    model_class = TASKS[args.task][0]
    overrides = label_overrides(args)
    try:
        model = from_reference(
            args.source,
            model_class,
            revision=args.revision,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            **overrides,
        )
    except (ReferenceLoadError, FileNotFoundError) as error:
        print(f"error: cannot convert {args.source}: {error}", file=sys.stderr)
        return 2
    config = model.config
    print(
        f"Converted {args.source} into {type(model).__name__}: variant {config.variant or 'custom'}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {config.num_labels} labels."
    )
    processor = source_image_processor(args.source, args.revision)
    if args.verify and not verify(args, model, processor):
        print(f"Not writing {args.output}: the outputs differ from transformers' beyond the tolerance.")
        return 1
    save_atomically(model, processor, args.output, args.overwrite)
    print(f"Saved to {args.output}")
    if args.push_to_hub:
        from segformer_hf.hub import push_to_hub

        push_to_hub(args.output, args.push_to_hub)
        print(f"Pushed {args.output} to {args.push_to_hub}")
    return 0
