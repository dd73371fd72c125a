"""Configuration of segformer_hf's SegFormer.

This file is self-contained on purpose: `save_pretrained` copies it next to the weights so that
`AutoConfig.from_pretrained(..., trust_remote_code=True)` works where segformer_hf is not installed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

# The published MiT encoder sizes (Xie et al. 2021, table 6). Variants are data, not classes:
# everything not listed here is shared by all six (heads 1/2/5/8, reduction 8/4/2/1, MLP ratio 4,
# patch 7/3/3/3, stride 4/2/2/2).
_MIT_B1_WIDTHS = (64, 128, 320, 512)
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": _MIT_B1_WIDTHS, "depths": (2, 2, 2, 2), "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": _MIT_B1_WIDTHS, "depths": (3, 4, 6, 3), "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": _MIT_B1_WIDTHS, "depths": (3, 4, 18, 3), "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": _MIT_B1_WIDTHS, "depths": (3, 8, 27, 3), "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": _MIT_B1_WIDTHS, "depths": (3, 6, 40, 3), "decoder_hidden_size": 768},
}

_PER_STAGE_FIELDS = (
    "depths",
    "hidden_sizes",
    "num_attention_heads",
    "sr_ratios",
    "patch_sizes",
    "strides",
    "mlp_ratios",
)


class SegformerHFConfig(PretrainedConfig):
    """Every hyper-parameter of a SegFormer: the MiT encoder, the all-MLP decoder and the loss.

    The modules read all their sizes from here, so a config fully describes an architecture and
    `from_variant("b0".."b5")` is just a table lookup. Per-stage fields are lists with one entry per
    encoder stage.

    Args:
        num_channels: channels of the input image.
        depths: transformer blocks per stage.
        hidden_sizes: channel width of each stage.
        num_attention_heads: attention heads per stage.
        sr_ratios: spatial-reduction ratio R of keys/values per stage (attention costs N*N/R^2).
        patch_sizes: kernel size of each stage's overlapping patch embedding.
        strides: stride of each stage's overlapping patch embedding (4, 2, 2, 2 gives 1/4..1/32).
        mlp_ratios: expansion ratio of each stage's Mix-FFN.
        decoder_hidden_size: channel width C of the all-MLP decoder.
        hidden_act: activation of the Mix-FFN.
        hidden_dropout_prob: dropout after attention and inside the Mix-FFN.
        attention_probs_dropout_prob: dropout on attention probabilities.
        classifier_dropout_prob: dropout before the decoder's classifier.
        drop_path_rate: stochastic-depth rate of the last block; earlier blocks decay linearly to 0.
        layer_norm_eps: epsilon of every LayerNorm. 1e-5 matches what transformers' SegFormer computes
            (its modules use PyTorch's default whatever its config says).
        initializer_range: std of the truncated-normal init of linear layers.
        semantic_loss_ignore_index: label value that the segmentation loss ignores.
        variant: the MiT variant name this config was built from, if any (for model cards).
    """

    model_type = "segformer_hf"
    attribute_map: ClassVar[dict[str, str]] = {"num_hidden_layers": "num_encoder_blocks"}

    num_channels: int = 3
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 160, 256)
    num_attention_heads: list[int] | tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: list[int] | tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: list[int] | tuple[int, ...] = (7, 3, 3, 3)
    strides: list[int] | tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratios: list[int] | tuple[int, ...] = (4, 4, 4, 4)
    decoder_hidden_size: int = 256
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    semantic_loss_ignore_index: int = 255
    variant: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for name in _PER_STAGE_FIELDS:
            setattr(self, name, [int(value) for value in getattr(self, name)])
        num_stages = len(self.depths)
        wrong_lengths = {
            name: len(getattr(self, name))
            for name in _PER_STAGE_FIELDS
            if len(getattr(self, name)) != num_stages
        }
        if wrong_lengths:
            raise ValueError(
                f"Every per-stage field needs one entry per stage ({num_stages}, from depths), got lengths {wrong_lengths}."
            )
        indivisible = [
            (stage, width, heads)
            for stage, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads))
            if width % heads
        ]
        if indivisible:
            raise ValueError(
                f"hidden_sizes must be divisible by num_attention_heads; (stage, width, heads): {indivisible}"
            )
        # `num_encoder_blocks` is what transformers' SegFormer config calls the number of stages.
        kwargs.pop("num_encoder_blocks", None)
        super().__post_init__(**kwargs)

    @property
    def num_encoder_blocks(self) -> int:
        """Number of encoder stages (transformers' SegFormer name for it)."""
        return len(self.depths)

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> SegformerHFConfig:
        """Builds the config of a published MiT variant ("b0".."b5"), with any field overridden.

        Raises:
            ValueError: if `name` is not one of the published variants.
        """
        key = name.lower().removeprefix("mit-").removeprefix("segformer-")
        if key not in VARIANTS:
            raise ValueError(f"Unknown SegFormer variant {name!r}; valid variants are {', '.join(VARIANTS)}.")
        return cls(**{**VARIANTS[key], "variant": key, **overrides})

    @staticmethod
    def variant_for_sizes(
        hidden_sizes: list[int] | tuple[int, ...], depths: list[int] | tuple[int, ...]
    ) -> str | None:
        """The published MiT variant with these stage widths and depths, or None for a custom encoder.

        Widths and depths are what tell the six encoders apart, and both can be read off a checkpoint's
        tensors, so this names checkpoints that come without a config as well as those that have one.
        """
        for name, sizes in VARIANTS.items():
            if list(sizes["hidden_sizes"]) == list(hidden_sizes) and list(sizes["depths"]) == list(depths):
                return name
        return None


__all__ = ["SegformerHFConfig", "VARIANTS"]
