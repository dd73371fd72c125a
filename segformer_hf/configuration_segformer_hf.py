"""Configuration of segformer_hf's SegFormer.

This file is self-contained on purpose: `save_pretrained` copies it next to the weights so that
`AutoConfig.from_pretrained(..., trust_remote_code=True)` works where segformer_hf is not installed.
"""

from __future__ import annotations

import math
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
        class_weights: one weight per class for the cross-entropy, or None for all ones. The loss is then
            the weighted mean of PyTorch's `F.cross_entropy(weight=...)`: sum of w[y] * loss over valid
            pixels divided by the sum of w[y] (not mmseg's mean over all pixels). Rare classes get more
            weight; common ones less.
        use_ohem: online hard example mining as mmseg's `OHEMPixelSampler`: the cross-entropy sums
            only over the hard pixels and is divided by the number of valid pixels (mmseg's reduction
            with `avg_non_ignore=True`, which the plain loss here also follows), so a batch whose
            pixels are all kept gets exactly the plain loss.
        ohem_thresh: with use_ohem, a pixel is hard when the predicted probability of its true class
            is below this threshold; the threshold is raised, if needed, to the probability of the
            (ohem_min_kept * images)-th least confident pixel, so that about that many are kept however
            confident the model is (mmseg's `thresh`, e.g. 0.7). None: the ohem_min_kept * images
            valid pixels with the largest loss are kept.
        ohem_min_kept: with use_ohem, the number of hard pixels kept at least, per image (mmseg's
            `min_kept`, 100000 by default). Images count only if they have a labelled pixel.
        dice_weight: weight of a soft Dice term added to the (cross-)entropy, as nnU-Net's CE + Dice: 1 - the
            mean over classes of the batch's soft Dice (2|P*Y| + 1) / (|P| + |Y| + 1), with P the softmax (or,
            with one label, sigmoid) probabilities over valid pixels. Every class counts the same whatever its
            pixel share, and false positives cost, so thin and rare classes get a say that pixel-averaged
            cross-entropy does not give them. 0 (the default) leaves it out.
        variant: the MiT variant name this config was built from, if any (for model cards).
        palette: one [R, G, B] colour (0..255) per class, the data set's own, or None; masks and legends
            are drawn with it, so a class looks the same wherever the model is used.
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
    class_weights: list[float] | None = None
    use_ohem: bool = False
    ohem_thresh: float | None = None
    ohem_min_kept: int = 100000
    dice_weight: float = 0.0
    variant: str | None = None
    palette: list[list[int]] | None = None

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
        self._check_loss_options()
        self._check_palette()

    def _check_loss_options(self) -> None:
        """Rejects loss options that would silently do nothing or something else than asked."""
        self.dice_weight = float(self.dice_weight)
        if not math.isfinite(self.dice_weight) or self.dice_weight < 0:
            raise ValueError(f"dice_weight must be a finite number >= 0, got {self.dice_weight}")
        if self.class_weights is not None:
            self.class_weights = [float(weight) for weight in self.class_weights]
            if len(self.class_weights) != self.num_labels or self.num_labels == 1:
                raise ValueError(
                    f"class_weights needs one weight per class ({self.num_labels} classes; a single-label "
                    f"binary model has no class weights), got {len(self.class_weights)}"
                )
            if min(self.class_weights) < 0:
                raise ValueError(f"class_weights must be non-negative, got {self.class_weights}")
        if not self.use_ohem:
            if self.ohem_thresh is not None:
                raise ValueError(
                    "ohem_thresh is set but use_ohem is false: set use_ohem: true to mine pixels"
                )
            return
        if self.num_labels == 1:
            raise ValueError(
                "use_ohem needs a softmax model (num_labels >= 2); a single-label model has none"
            )
        if self.ohem_thresh is not None and not 0.0 < self.ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh is a probability in (0, 1], got {self.ohem_thresh}")
        if self.ohem_min_kept < 1:
            raise ValueError(f"ohem_min_kept must be a positive number of pixels, got {self.ohem_min_kept}")

    def _check_palette(self) -> None:
        if self.palette is None:
            return
        self.palette = [[int(value) for value in colour] for colour in self.palette]
        if any(len(colour) != 3 or min(colour) < 0 or max(colour) > 255 for colour in self.palette):
            raise ValueError("palette must hold [R, G, B] colours with values in 0..255")
        if len(self.palette) < self.num_labels:
            raise ValueError(f"palette has {len(self.palette)} colours for {self.num_labels} classes")

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
