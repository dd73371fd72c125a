"""SegFormer (Xie et al. 2021), written from the paper: the MiT encoder and the all-MLP decoder.

This file is self-contained (it imports only torch, transformers' generic base classes and the
configuration file beside it) because `save_pretrained` ships it to the Hub as remote code.

Speed without changing the math: the decoder's per-stage projections, the bilinear upsampling and
the 1x1 fusion are all linear, so each stage's projection is composed with its slice of the fusion
weights and applied at the stage's own (coarse) resolution; only the fused C-channel maps are
upsampled and summed. This is exactly the published computation reordered, in training and in
inference alike, and it removes the 4C -> C convolution at 1/4 resolution that dominates the
decoder's cost. The rest, each measured with scripts/benchmark.py:

* feature maps are channels-last from the first convolution on, so the (B, N, C) tokens and the
  (B, C, H, W) maps that the convolutions see are views of one another, never transposing copies;
* the loss (`UpsampledCrossEntropy`) writes its gradient over the upsampled logits during the forward
  pass instead of filling three more tensors of the labels' size;
* in evaluation the frozen BatchNorm is folded into the composed decoder weights;
* on CPU the decoder's dropout draws random numbers only for the elements it drops;
* under torch.compile on CPU, the bilinear upsampling and that dropout noise are custom operators the
  compiler calls as they are, where inductor's own CPU code for them is slower.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput, SemanticSegmenterOutput

from .configuration_segformer_hf import SegformerHFConfig


class SegformerHFOverlapPatchEmbeddings(nn.Module):
    """Turns an image or feature map into tokens with a strided convolution whose kernel overlaps.

    Overlap (kernel 7 stride 4, then 3 stride 2) keeps local continuity between patches, which the
    paper found matters once positional encodings are gone.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, stride: int, eps: float):
        super().__init__()
        self.projection = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # Channels-last in, channels-last out: the tokens below are then a view, not a transposing copy, and
        # oneDNN's strided convolution on a 3-channel image runs twice as fast in this layout. Feature maps
        # from the previous stage already are channels-last, so only the image is copied.
        embeddings = self.projection(pixel_values.contiguous(memory_format=torch.channels_last))
        height, width = embeddings.shape[-2:]
        # (B, C, H, W) -> (B, H*W, C)
        embeddings = embeddings.flatten(2).transpose(1, 2)
        return self.layer_norm(embeddings), height, width


class SegformerHFSequenceReduction(nn.Module):
    """Shrinks the key/value token grid by R in each direction (strided conv + LayerNorm).

    Attention then costs O(N * N / R^2) instead of O(N^2), which is what makes a transformer affordable
    on 1/4-resolution feature maps.
    """

    def __init__(self, hidden_size: int, reduction_ratio: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=reduction_ratio, stride=reduction_ratio)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch_size, _, channels = tokens.shape
        # (B, N, C) -> (B, C, H, W), a view in channels-last memory order
        grid = tokens.view(batch_size, height, width, channels).permute(0, 3, 1, 2)
        # (B, C, H/R, W/R) -> (B, H*W/R^2, C)
        reduced = self.conv(grid).flatten(2).transpose(1, 2)
        return self.layer_norm(reduced)


class SegformerHFEfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a spatially reduced token grid.

    Queries keep full resolution so every token gets its own output; keys and values are computed
    in one matmul from the reduced grid. The attention itself is PyTorch's fused
    `scaled_dot_product_attention`.
    """

    def __init__(self, config: SegformerHFConfig, hidden_size: int, num_heads: int, reduction_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key_value = nn.Linear(hidden_size, 2 * hidden_size)
        self.reduction = (
            SegformerHFSequenceReduction(hidden_size, reduction_ratio, config.layer_norm_eps)
            if reduction_ratio > 1
            else None
        )
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch_size, num_tokens, channels = tokens.shape
        # (B, N, C) -> (B, heads, N, head_dim)
        query = self.query(tokens).view(batch_size, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        context = self.reduction(tokens, height, width) if self.reduction is not None else tokens
        # (B, M, 2C) -> 2 x (B, heads, M, head_dim)
        key, value = (
            self.key_value(context)
            .view(batch_size, -1, 2, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout_prob if self.training else 0.0
        )
        # (B, heads, N, head_dim) -> (B, N, C)
        attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, channels)
        return self.output(attended)


class SegformerHFMixFFN(nn.Module):
    """Feed-forward block with a 3x3 depthwise convolution between its two linear layers.

    The convolution leaks enough zero-padding position information for the model to need no
    positional encoding, so any input size works at full accuracy.
    """

    def __init__(self, config: SegformerHFConfig, hidden_size: int, mlp_ratio: int):
        super().__init__()
        expanded = hidden_size * mlp_ratio
        self.fc1 = nn.Linear(hidden_size, expanded)
        self.depthwise_conv = nn.Conv2d(expanded, expanded, kernel_size=3, padding=1, groups=expanded)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(expanded, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        expanded = self.fc1(tokens)
        # (B, N, 4C) -> (B, 4C, H, W), a channels-last view: no copy before the convolution
        grid = expanded.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        # (B, 4C, H, W) -> (B, N, 4C)
        mixed = self.depthwise_conv(grid).flatten(2).transpose(1, 2)
        mixed = self.dropout(self.activation(mixed))
        return self.dropout(self.fc2(mixed))


class SegformerHFDropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples during training.

    The surviving samples are scaled by 1/keep_prob so the expected output is unchanged.
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return branch
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        keep = torch.empty(mask_shape, dtype=branch.dtype, device=branch.device).bernoulli_(keep_prob)
        return branch * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SegformerHFLayer(GradientCheckpointingLayer):
    """One pre-norm transformer block: efficient attention then Mix-FFN, each in a residual branch."""

    def __init__(
        self,
        config: SegformerHFConfig,
        hidden_size: int,
        num_heads: int,
        reduction_ratio: int,
        mlp_ratio: int,
        drop_path: float,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = SegformerHFEfficientSelfAttention(config, hidden_size, num_heads, reduction_ratio)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mix_ffn = SegformerHFMixFFN(config, hidden_size, mlp_ratio)
        self.drop_path = SegformerHFDropPath(drop_path)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        attended = self.attention_dropout(self.attention(self.attention_norm(tokens), height, width))
        tokens = tokens + self.drop_path(attended)
        return tokens + self.drop_path(self.mix_ffn(self.mlp_norm(tokens), height, width))


class SegformerHFStage(nn.Module):
    """One encoder stage: patch embedding (downsampling), transformer blocks, final LayerNorm."""

    def __init__(self, config: SegformerHFConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        hidden_size = config.hidden_sizes[stage]
        self.patch_embeddings = SegformerHFOverlapPatchEmbeddings(
            in_channels=config.num_channels if stage == 0 else config.hidden_sizes[stage - 1],
            hidden_size=hidden_size,
            patch_size=config.patch_sizes[stage],
            stride=config.strides[stage],
            eps=config.layer_norm_eps,
        )
        self.layers = nn.ModuleList(
            SegformerHFLayer(
                config,
                hidden_size=hidden_size,
                num_heads=config.num_attention_heads[stage],
                reduction_ratio=config.sr_ratios[stage],
                mlp_ratio=config.mlp_ratios[stage],
                drop_path=rate,
            )
            for rate in drop_path_rates
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.patch_embeddings(features)
        for layer in self.layers:
            tokens = layer(tokens, height, width)
        tokens = self.layer_norm(tokens)
        # (B, H*W, C) -> (B, C, H, W), left in channels-last memory order (a view, no copy). `view`, not
        # `unflatten`: the TorchScript ONNX exporter gives unflatten's output the traced sizes, and the next
        # stage's reshapes then read them as constants, so the graph only ran at the traced size.
        return tokens.view(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)


class SegformerHFPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by every SegFormer head."""

    config_class = SegformerHFConfig
    config: SegformerHFConfig
    base_model_prefix = "segformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SegformerHFStage"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal linear layers, fan-out normal convolutions, unit norms (as the paper's code)."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=(2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Saves as transformers does, with every SegFormer class in config.json's `auto_map`.

        transformers lists only the saved class there, so a segmentation checkpoint shared as remote code
        would not load through `AutoModel` (its encoder) or `AutoModelForImageClassification`. The other
        entries are only added when transformers ships the code files along (a class registered for an
        Auto class), so the map never points at files that are not there.
        """
        if self.is_remote_code():
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_auto_map()}
        super().save_pretrained(save_directory, *args, **kwargs)


class SegformerHFModel(SegformerHFPreTrainedModel):
    """The Mix Transformer (MiT) encoder: four stages at 1/4, 1/8, 1/16 and 1/32 resolution.

    `last_hidden_state` is the 1/32 map; `hidden_states` holds all four stage maps (B, C_i, H_i, W_i),
    which is what the decoder consumes.
    """

    def __init__(self, config: SegformerHFConfig):
        super().__init__(config)
        total_layers = sum(config.depths)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [config.drop_path_rate * index / max(total_layers - 1, 1) for index in range(total_layers)]
        starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.stages = nn.ModuleList(
            SegformerHFStage(config, stage, rates[start : start + depth])
            for stage, (start, depth) in enumerate(zip(starts, config.depths))
        )
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Returns the four stage feature maps, (B, C_i, H_i, W_i) each."""
        features = []
        hidden = pixel_values
        for stage in self.stages:
            hidden = stage(hidden)
            features.append(hidden)
        return features

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        return_dict = _resolve(return_dict, self.config.return_dict)
        features = self.forward_features(pixel_values)
        hidden_states = tuple(features) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (features[-1], hidden_states) if value is not None)
        return BaseModelOutput(last_hidden_state=features[-1], hidden_states=hidden_states)


class SegformerHFForImageClassification(SegformerHFPreTrainedModel):
    """MiT encoder + global average pooling + linear classifier: the ImageNet head of mit-b* checkpoints."""

    def __init__(self, config: SegformerHFConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.segformer = SegformerHFModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        return_dict = _resolve(return_dict, self.config.return_dict)
        features = self.segformer.forward_features(pixel_values)
        # (B, C, H, W) -> (B, C): global average pooling over all tokens
        logits = self.classifier(features[-1].mean(dim=(2, 3)))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        hidden_states = tuple(features) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (loss, logits, hidden_states) if value is not None)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class SegformerHFSparseDrawDropout(nn.Dropout):
    """Dropout that, on CPU, draws a random number only for each dropped element instead of every element.

    The output is the same random function as `nn.Dropout`'s: `hidden * noise`, with the noise i.i.d. 0
    (probability p) or 1 / (1 - p) (`sparse_dropout_noise`). PyTorch's CPU generator produces random
    numbers one at a time on one thread, so for the decoder's (B, C, H/4, W/4) map `nn.Dropout` spends
    longer drawing its mask than the convolution after it computes, and inductor's generated dropout
    (a random number per element too) no less. Under torch.compile the noise comes from the opaque
    `segformer_hf::sparse_dropout_noise` operator and the product stays in the graph. Elsewhere (CUDA, p
    of 0 or 1, in place) this is `nn.Dropout` itself.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sparse = self.training and 0.0 < self.p < 1.0 and not self.inplace and hidden.device.type == "cpu"
        if not sparse:
            return super().forward(hidden)
        if torch.compiler.is_compiling():
            if not _COMPILER_KERNELS or torch.compiler.is_exporting():
                return super().forward(hidden)  # an exported graph keeps standard operators only
            # The noise takes only the map's shape and layout from it, and no gradient.
            return hidden * torch.ops.segformer_hf.sparse_dropout_noise(hidden.detach(), self.p)
        return hidden * sparse_dropout_noise(hidden, self.p)


def sparse_dropout_noise(hidden: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's noise for `hidden` (same shape and memory layout): 0 with probability p, else 1 / (1 - p).

    The dropped positions of a Bernoulli(p) sequence are the running sums of i.i.d. Geometric(p) gaps,
    so drawing the gaps takes about p * numel random numbers instead of numel.
    """
    numel = hidden.numel()
    # Same memory layout as `hidden`; the drops index it in memory order (the noise is i.i.d., so any
    # order draws the same distribution).
    noise = torch.empty_like(hidden).fill_(1.0 / (1.0 - p))
    flat_noise = noise.as_strided((numel,), (1,))
    expected_drops = p * numel
    draws_per_round = int(expected_drops + 8.0 * math.sqrt(expected_drops) + 16)
    rounds = []
    last_position = -1
    while last_position < numel - 1:
        gaps = torch.empty(draws_per_round, dtype=torch.long).geometric_(p)
        positions = gaps.cumsum(0).add_(last_position)
        rounds.append(positions)
        last_position = int(positions[-1])
    positions = torch.cat(rounds)
    flat_noise.index_fill_(0, positions[positions < numel], 0.0)
    return noise


class SegformerHFDecodeHead(nn.Module):
    """The all-MLP decoder: project each stage to C channels, upsample to 1/4, fuse, classify.

    Parameters keep the published layout (per-stage projections, a 4C -> C fusion whose input blocks
    are ordered from the coarsest stage to the finest, BatchNorm, ReLU, classifier), so checkpoints map
    one to one; `forward` applies projection and fusion as one composed linear map per stage, at that
    stage's resolution (see the module docstring).
    """

    def __init__(self, config: SegformerHFConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.stage_projections = nn.ModuleList(nn.Linear(size, width) for size in config.hidden_sizes)
        # A 1x1 convolution without bias, stored as the matrix it is.
        self.fuse = nn.Linear(width * len(config.hidden_sizes), width, bias=False)
        self.batch_norm = nn.BatchNorm2d(width)
        self.activation = nn.ReLU(inplace=True)
        self.dropout = SegformerHFSparseDrawDropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(width, config.num_labels, kernel_size=1)

    def composed_stage_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns, per stage, (weight (C, C_i), bias (C,)) of fuse-slice @ projection."""
        width = self.fuse.out_features
        num_stages = len(self.stage_projections)
        composed = []
        for stage, projection in enumerate(self.stage_projections):
            # The fusion input is concatenated coarsest stage first, as in the original implementation.
            block = num_stages - 1 - stage
            fuse_slice = self.fuse.weight[:, block * width : (block + 1) * width]
            composed.append((fuse_slice @ projection.weight, fuse_slice @ projection.bias))
        return composed

    def batch_norm_as_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) with BatchNorm(x) = scale * x + shift per channel, once its statistics are frozen.

        None while BatchNorm normalises by batch statistics (training mode, or no running statistics).
        """
        norm = self.batch_norm
        if norm.training or norm.running_mean is None:
            return None
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale

    def normalize(self, fused: torch.Tensor, statistics_samples: torch.Tensor | None) -> torch.Tensor:
        """BatchNorm of the fused map (B, C, H/4, W/4) whose batch statistics skip the samples not listed.

        In training, BatchNorm couples the samples of a batch: a sample without a single labelled pixel
        (the placeholder of a skipped sample, a crop of only ignored pixels) still moves the batch
        mean and variance, so it changes the other samples' outputs and receives gradient through
        them. That gradient is not harmless: an all-zero image with zero-initialised biases makes every
        token of the encoder exactly zero, every LayerNorm then multiplies the gradient by
        1/sqrt(eps) (316), and after some thirty of them float32 overflows to inf and NaN. Normalising
        such samples by the statistics of the others (detached) gives them exactly zero gradient, keeps
        their influence out of the running statistics, and leaves every other sample's loss and
        gradient exactly those of the batch without them. A batch where every sample has labels is
        normalised by `batch_norm` as before.
        """
        norm = self.batch_norm
        if statistics_samples is not None and torch.compiler.is_compiling():
            # The branches and boolean indexing below sync with the host and change shapes with the data,
            # which breaks the compiled graph in two; the masked form computes the same without either.
            return self.normalize_masked(fused, statistics_samples)
        if statistics_samples is None or bool(statistics_samples.all()):
            return norm(fused)
        if not statistics_samples.any():
            # Nothing to learn from: normalise by the batch itself, but teach the running statistics nothing.
            return F.batch_norm(fused, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
        supervised = fused[statistics_samples]
        hidden = torch.empty_like(fused)  # the same (channels-last) layout as the batch-normalised map
        hidden[statistics_samples] = norm(supervised)
        with torch.no_grad():
            # float32 like BatchNorm's own statistics (the map may be half precision under autocast).
            variance, mean = torch.var_mean(supervised.float(), dim=(0, 2, 3), unbiased=False)
        hidden[~statistics_samples] = F.batch_norm(
            fused[~statistics_samples], mean, variance, norm.weight, norm.bias, False, 0.0, norm.eps
        )
        return hidden

    def normalize_masked(self, fused: torch.Tensor, statistics_samples: torch.Tensor) -> torch.Tensor:
        """`normalize` as one static graph: statistics weighted by the 0/1 mask, no host sync.

        The listed samples are normalised by their own (differentiable) batch statistics, the others by
        the same statistics detached, and the running statistics move only when some sample is listed;
        with none listed the batch normalises itself, as in `normalize`. Only the summation order
        differs from `normalize`, so results agree to float rounding.
        """
        norm = self.batch_norm
        # (B,) -> (B, 1, 1, 1) sample weights; with no listed sample every sample counts.
        listed = statistics_samples[:, None, None, None]
        any_listed = statistics_samples.any()
        counted = (listed | ~any_listed).to(torch.float32)
        pixels = counted.sum() * fused[0, 0].numel()
        values = fused.float()  # float32 like BatchNorm's own statistics under autocast
        mean = (values * counted).sum(dim=(0, 2, 3)) / pixels
        variance = (counted * (values - mean[:, None, None]).square()).sum(dim=(0, 2, 3)) / pixels

        def affine(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
            scale = norm.weight * torch.rsqrt(variance + norm.eps)
            return values * scale[:, None, None] + (norm.bias - mean * scale)[:, None, None]

        live = listed | ~any_listed
        hidden = torch.where(live, affine(mean, variance), affine(mean.detach(), variance.detach()))
        if norm.track_running_stats and norm.running_mean is not None:
            with torch.no_grad():
                norm.num_batches_tracked.add_(any_listed.long())
                momentum = norm.momentum
                if momentum is None:  # cumulative average, as nn.BatchNorm
                    momentum = 1.0 / norm.num_batches_tracked.clamp(min=1).float()
                unbiased = variance * pixels / (pixels - 1).clamp(min=1)
                for running, batch in ((norm.running_mean, mean), (norm.running_var, unbiased)):
                    running.copy_(torch.where(any_listed, running + momentum * (batch - running), running))
        return hidden.to(fused.dtype)

    def forward(
        self,
        stage_features: list[torch.Tensor] | tuple[torch.Tensor, ...],
        statistics_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_labels, H/4, W/4) from the four stage maps.

        `statistics_samples` (B,) bool, in training: the samples BatchNorm's batch statistics come from
        (None: all), see `normalize`.
        """
        target_size = stage_features[0].shape[-2:]
        stage_weights = self.composed_stage_weights()
        frozen_norm = self.batch_norm_as_affine()
        if frozen_norm is not None:
            # Evaluation: the frozen BatchNorm is one more per-channel affine map, folded into the composed
            # weights; its shift joins the first stage's bias (upsampling keeps a constant map constant).
            scale, shift = frozen_norm
            stage_weights = [(scale[:, None] * weight, scale * bias) for weight, bias in stage_weights]
            stage_weights[0] = (stage_weights[0][0], stage_weights[0][1] + shift)
        # Without autograd (inference) every stage is upsampled into one reused buffer: on a CPU a fresh
        # (B, C, H/4, W/4) tensor costs about as much in page faults as the upsampling that fills it. Not
        # when tracing: the TorchScript (ONNX) tracer would record the buffer's size as a constant.
        reuse_buffer = (
            not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        )
        fused = upsampled = None
        for features, (weight, bias) in zip(stage_features, stage_weights):
            # (B, C_i, H_i, W_i) -> (B, C, H_i, W_i): a 1x1 convolution by the composed weights. The stage
            # maps are channels-last, and so is the output, which CPU bilinear upsampling handles several
            # times faster than NCHW.
            projected = F.conv2d(features, weight[:, :, None, None], bias)
            # Bilinear weights sum to one, so upsampling after the affine map equals upsampling before it.
            # The first (finest) stage sets the target size, so `fused` exists before any upsampling.
            if projected.shape[-2:] != target_size and reuse_buffer:
                upsampled = torch.empty_like(fused) if upsampled is None else upsampled
                projected = torch.ops.aten.upsample_bilinear2d.out(
                    projected, list(target_size), False, None, None, out=upsampled
                )
            elif projected.shape[-2:] != target_size:
                projected = upsample_bilinear(projected, target_size)
            # In place is safe for autograd: neither conv2d nor interpolate needs its output for backward.
            fused = projected if fused is None else fused.add_(projected)
        hidden = fused if frozen_norm is not None else self.normalize(fused, statistics_samples)
        # The ReLU works in place (BatchNorm's backward does not need its output either).
        hidden = self.dropout(self.activation(hidden))
        # (B, C, H/4, W/4) -> (B, num_labels, H/4, W/4)
        return self.classifier(hidden)


class SegformerHFForSemanticSegmentation(SegformerHFPreTrainedModel):
    """SegFormer for semantic segmentation: MiT encoder + all-MLP decoder, logits at 1/4 resolution.

    With `labels` (B, H, W), the loss is computed on logits bilinearly upsampled to the labels' size:
    cross-entropy ignoring `semantic_loss_ignore_index` (optionally class-weighted and/or over hard
    pixels only, see the config's `class_weights` and `use_ohem`), or, when `num_labels == 1`, binary
    cross-entropy averaged over the valid (non-ignored, non-negative) pixels only (transformers divides
    the same sum by every pixel, ignored ones included); plus, with the config's `dice_weight`, that
    times a soft Dice loss (`soft_dice_loss`).
    """

    def __init__(self, config: SegformerHFConfig):
        super().__init__(config)
        self.segformer = SegformerHFModel(config)
        self.decode_head = SegformerHFDecodeHead(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        return_dict = _resolve(return_dict, self.config.return_dict)
        features = self.segformer.forward_features(pixel_values)
        # Samples without a labelled pixel stay out of the decoder's BatchNorm statistics (see
        # `SegformerHFDecodeHead.normalize`): they must not change the loss or the gradient.
        labelled = None
        if labels is not None and self.decode_head.batch_norm.training:
            valid = (labels >= 0) & (labels != self.config.semantic_loss_ignore_index)
            labelled = valid.flatten(1).any(dim=1)
        logits = self.decode_head(features, labelled)
        loss = self.segmentation_loss(logits, labels) if labels is not None else None
        hidden_states = tuple(features) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (loss, logits, hidden_states) if value is not None)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of 1/4-resolution `logits` (B, K, h, w) against full-resolution `labels` (B, H, W).

        Cross-entropy (class-weighted and/or restricted to hard pixels when the config asks, see
        `SegformerHFConfig`), or binary cross-entropy for a single-label model; plus `dice_weight` times
        the soft Dice loss when asked.
        """
        ignore_index = self.config.semantic_loss_ignore_index
        if logits.dtype in (torch.float16, torch.bfloat16):
            # A softmax over a hundred classes loses too much in 8 mantissa bits (autocast upcasts it too).
            logits = logits.float()
        config = self.config
        if (
            config.num_labels > 1
            and config.class_weights is None
            and not config.use_ohem
            and not config.dice_weight
        ):
            return upsampled_cross_entropy(logits, labels, ignore_index)
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if config.num_labels > 1:
            loss = weighted_hard_pixel_cross_entropy(
                upsampled,
                labels,
                ignore_index,
                class_weights=config.class_weights,
                ohem_thresh=config.ohem_thresh if config.use_ohem else None,
                ohem_min_kept=config.ohem_min_kept if config.use_ohem else None,
            )
        else:
            valid = (labels >= 0) & (labels != ignore_index)
            per_pixel = F.binary_cross_entropy_with_logits(
                upsampled.squeeze(1), labels.to(upsampled.dtype), reduction="none"
            )
            # Average over valid pixels only; an all-ignored batch contributes a zero (but differentiable) loss.
            loss = (per_pixel * valid).sum() / valid.sum().clamp(min=1)
        if config.dice_weight:
            loss = loss + config.dice_weight * soft_dice_loss(upsampled, labels, ignore_index)
        return loss


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice of `logits` (B, K, H, W) against `labels` (B, H, W).

    Per class c, over the valid pixels of the whole batch (nnU-Net's "batch Dice"): (2 sum p_c y_c + 1) /
    (sum p_c + sum y_c + 1), p the softmax probabilities (with K == 1, the sigmoid one of the foreground,
    label 1) and y the one-hot labels. The 1 keeps a class that is neither present nor predicted at a Dice
    of 1 and the ratio defined on an empty batch. Each class weighs the same in the mean, however few its
    pixels: what cross-entropy's mean over pixels cannot do for thin classes.
    """
    labels = labels.long()
    valid = (labels >= 0) & (labels != ignore_index)
    if logits.shape[1] == 1:
        probabilities = torch.sigmoid(logits)
        truth = ((labels == 1) & valid)[:, None]
    else:
        probabilities = logits.softmax(dim=1)
        # Ignored pixels look up class 0 (any valid index) and are then zeroed by `valid`.
        truth = F.one_hot(labels.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2) & valid[:, None]
    probabilities = probabilities * valid[:, None]
    truth = truth.to(probabilities.dtype)
    dims = (0, 2, 3)
    intersection = (probabilities * truth).sum(dims)
    dice = (2 * intersection + 1) / (probabilities.sum(dims) + truth.sum(dims) + 1)
    return 1 - dice.mean()


def weighted_hard_pixel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    class_weights: list[float] | None = None,
    ohem_thresh: float | None = None,
    ohem_min_kept: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `logits` (B, K, H, W) at the labels' resolution, class-weighted, over hard pixels.

    The sum over kept pixels of w[y] * -log p(y) divided by the sum of w[y] over all valid pixels:
    with every pixel kept this is `F.cross_entropy(logits, labels, weight=w, ignore_index=...)`.
    `ohem_min_kept` (per image) switches online hard example mining on, with mmseg's
    `OHEMPixelSampler` selection (see `ohem_kept_pixels`). When the denominator is zero (every pixel
    ignored) the loss is NaN, as `F.cross_entropy`'s, and the gradient zero.
    """
    labels = labels.long()
    valid = labels != ignore_index
    # Unweighted per-pixel loss: OHEM's threshold needs the true-class probability exp(-loss) itself.
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if class_weights is None:
        pixel_weights = valid.to(per_pixel.dtype)
    else:
        # Ignored pixels look up class 0 (any valid index) and are then zeroed by `valid`.
        weight_table = torch.tensor(class_weights, dtype=per_pixel.dtype, device=per_pixel.device)
        pixel_weights = weight_table[labels.masked_fill(~valid, 0)] * valid
    denominator = pixel_weights.sum()
    weighted = per_pixel * pixel_weights
    if ohem_min_kept is not None:
        kept = ohem_kept_pixels(per_pixel.detach(), weighted.detach(), valid, ohem_thresh, ohem_min_kept)
        weighted = weighted * kept
    # `where`, not a plain division: with nothing valid the loss is NaN but its gradient stays zero.
    return torch.where(
        denominator > 0, weighted.sum() / denominator.clamp(min=torch.finfo(denominator.dtype).tiny), math.nan
    )


@torch.no_grad()
def ohem_kept_pixels(
    loss: torch.Tensor,
    ranked_loss: torch.Tensor,
    valid: torch.Tensor,
    thresh: float | None,
    min_kept: int,
) -> torch.Tensor:
    """The hard pixels (B, H, W) bool, selected as mmseg's `OHEMPixelSampler` does.

    With `thresh`: the valid pixels whose true-class probability exp(-loss) is below max(thresh, p_k),
    p_k being the (k+1)-th smallest probability with k = min(min_kept * B, valid pixels - 1); so
    about min_kept pixels per image are kept however confident the model is. (As in mmseg the
    comparison is strict: when k reaches the last valid pixel and the threshold is lower, the most
    confident pixel is dropped.) Without `thresh`: the min_kept * B valid pixels with the largest
    `ranked_loss` (the class-weighted loss, which is what mmseg ranks by). B counts the images that
    have a labelled pixel.
    """
    # mmseg counts every image; one without a labelled pixel has nothing to keep, and counting it would
    # let a skipped sample's placeholder change which pixels of the others are kept.
    batch_kept = min_kept * int(valid.flatten(1).any(dim=1).sum())
    valid_count = int(valid.sum())
    if thresh is not None:
        probability = torch.exp(-loss)
        threshold = thresh
        if valid_count > 0:
            # kthvalue is 1-based: the (k+1)-th smallest is sorted[k].
            kth = torch.kthvalue(probability[valid], min(batch_kept, valid_count - 1) + 1).values
            threshold = max(float(kth), thresh)
        return valid & (probability < threshold)
    kept = torch.zeros_like(valid)
    hardest = ranked_loss[valid].topk(min(batch_kept, valid_count)).indices
    kept[valid] = torch.zeros(valid_count, dtype=torch.bool, device=valid.device).index_fill_(
        0, hardest, True
    )
    return kept


@torch.compiler.disable
def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`UpsampledCrossEntropy`, kept out of torch.compile's graph (a graph break at the very end).

    Compiled, the plain `F.cross_entropy(F.interpolate(logits, ...))` costs inductor's CPU code about
    330 ms of log-softmax and its backward for a 256x256 batch of one with 150 classes (B0's whole eager
    training step is 340 ms), more than the rest of the model; the hand-written function is not
    traceable, and run eager it costs what it costs without the compiler.
    """
    with_gradient = torch.is_grad_enabled() and logits.requires_grad
    return UpsampledCrossEntropy.apply(logits, labels, ignore_index, with_gradient)


class UpsampledCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits bilinearly upsampled to the labels' size, averaged over non-ignored pixels.

    The same quantity as `F.cross_entropy(F.interpolate(logits, labels.shape[-2:]), labels)`, computed
    with fewer passes over full-resolution memory. Autograd's composition fills four tensors of the full
    label size (B*H*W*K values: upsampled logits, log-probabilities, a zero-filled gradient, the
    log-softmax gradient); on a CPU each fresh tensor that size costs about as much in page faults as the
    arithmetic on it. Here the upsampled logits are the only one: the forward pass overwrites them, a
    cache-sized block of pixels at a time, with the gradient softmax - one_hot(label) (zero at ignored
    pixels), and the backward pass applies the adjoint of the upsampling to it and scales by
    1 / (number of valid pixels) at the logits' coarse resolution. Ignored pixels
    (`labels == ignore_index`) get no gradient; when every pixel is ignored the loss is NaN and the
    gradient zero, as with `F.cross_entropy`.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_gradient: bool
    ) -> torch.Tensor:
        num_classes = logits.shape[1]
        output_size = tuple(labels.shape[-2:])
        upsampled = F.interpolate(
            logits.contiguous(memory_format=torch.channels_last),
            size=output_size,
            mode="bilinear",
            align_corners=False,
        )
        # (B, K, H, W) in channels-last memory -> (B*H*W, K), a view: each pixel's K logits side by side
        per_pixel = upsampled.permute(0, 2, 3, 1).view(-1, num_classes)
        flat_labels = labels.reshape(-1).long()
        valid = flat_labels != ignore_index
        # Ignored pixels look up class 0 (any valid index) and are masked out of the sum and the gradient.
        safe_labels = flat_labels.masked_fill(~valid, 0)[:, None]
        if logits.device.type == "cpu":
            block_bytes = 2**21  # each block is read from memory once and stays in cache for every step
        else:
            block_bytes = 2**26  # a few blocks: the temporary log-probabilities stay small, launches few
        block = max(1, block_bytes // (num_classes * per_pixel.element_size()))
        picked_sums = []
        for first in range(0, per_pixel.shape[0], block):
            rows = slice(first, first + block)
            log_probabilities = torch.log_softmax(per_pixel[rows], dim=1)
            picked = log_probabilities.gather(1, safe_labels[rows])[:, 0]
            picked_sums.append(torch.where(valid[rows], picked, 0.0).sum())
            if with_gradient:
                gradient = torch.exp(log_probabilities, out=per_pixel[rows])
                gradient.scatter_add_(
                    1, safe_labels[rows], gradient.new_full((1, 1), -1.0).expand(len(gradient), 1)
                )
                gradient.mul_(valid[rows, None])
        valid_count = valid.sum()
        if with_gradient:
            ctx.save_for_backward(upsampled, valid_count)
            ctx.logits_shape = tuple(logits.shape)
        return -torch.stack(picked_sums).sum() / valid_count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        gradient, valid_count = ctx.saved_tensors
        coarse = torch.ops.aten.upsample_bilinear2d_backward(
            gradient, list(gradient.shape[-2:]), list(ctx.logits_shape), False, None, None
        )
        return coarse.mul_(grad_loss / valid_count.clamp(min=1)), None, None, None


def upsample_bilinear(features: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`F.interpolate(features, size, mode="bilinear", align_corners=False)`, and the same kernel compiled.

    Under torch.compile on the CPU the resize is the opaque `segformer_hf::upsample_bilinear` operator:
    inductor's own CPU code for it (and for its backward) is a gather (and a scatter) that runs 2-3x slower
    than ATen's channels-last kernel, which the operator calls. Elsewhere (eager, CUDA, torch.export) it is
    `F.interpolate` itself.
    """
    height, width = size
    if (
        features.device.type == "cpu"
        and _COMPILER_KERNELS
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    ):
        return torch.ops.segformer_hf.upsample_bilinear(features, height, width)
    return _interpolate_bilinear(features, height, width)


def _interpolate_bilinear(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The resize itself: eager, and the body (and shape function) of the compiled operator."""
    return F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)


def _layout_of(tensor: torch.Tensor) -> torch.memory_format:
    """Channels-last when `tensor` is stored so (and not also plainly contiguous), else contiguous."""
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _define_compiler_kernels() -> bool:
    """Registers the `segformer_hf::` operators that torch.compile calls as they are (see their users).

    A custom operator is opaque to the compiler: the graph calls it, with its registered gradient, instead
    of tracing into it. Returns whether they exist; a second copy of this file (the package and the same
    code loaded from the Hub as remote code) finds them registered by the first.
    """
    namespace = torch.ops.segformer_hf
    if hasattr(namespace, "upsample_bilinear") and hasattr(namespace, "sparse_dropout_noise"):
        return True
    if not (hasattr(torch.library, "custom_op") and hasattr(torch.compiler, "is_exporting")):
        return False  # an older torch: compiled models take inductor's own kernels

    def resize_backward(gradient: torch.Tensor, height: int, width: int) -> torch.Tensor:
        input_size = [*gradient.shape[:2], height, width]
        return torch.ops.aten.upsample_bilinear2d_backward(
            gradient, list(gradient.shape[-2:]), input_size, False, None, None
        ).contiguous(memory_format=_layout_of(gradient))

    def resize_backward_shape(gradient: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # By hand: ATen's shape function for this backward takes no symbolic sizes.
        size = (*gradient.shape[:2], height, width)
        return gradient.new_empty(size).contiguous(memory_format=_layout_of(gradient))

    upsample = torch.library.custom_op(
        "segformer_hf::upsample_bilinear", _interpolate_bilinear, mutates_args=()
    )
    upsample_backward = torch.library.custom_op(
        "segformer_hf::upsample_bilinear_backward", resize_backward, mutates_args=()
    )
    # The compiler reads the results' shapes and memory layouts from these, on its fake tensors.
    upsample.register_fake(_interpolate_bilinear)
    upsample_backward.register_fake(resize_backward_shape)

    def remember_input_size(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.input_size = tuple(inputs[0].shape[-2:])

    def upsample_gradient(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return torch.ops.segformer_hf.upsample_bilinear_backward(gradient, *ctx.input_size), None, None

    upsample.register_autograd(upsample_gradient, setup_context=remember_input_size)

    # Seeded and nondeterministic: the compiler must neither merge two calls nor recompute one in the backward.
    seeded = {"tags": (torch.Tag.nondeterministic_seeded,)}
    if "tags" not in inspect.signature(torch.library.custom_op).parameters:
        seeded = {}

    noise = torch.library.custom_op(
        "segformer_hf::sparse_dropout_noise", sparse_dropout_noise, mutates_args=(), **seeded
    )
    noise.register_fake(lambda hidden, p: torch.empty_like(hidden))

    return True


_COMPILER_KERNELS = _define_compiler_kernels()


def _resolve(value: bool | None, default: bool) -> bool:
    return default if value is None else value


# The Auto class each model answers to: segformer_hf/__init__.py registers the classes from this table,
# and `save_pretrained` lists them all in `auto_map`.
AUTO_CLASSES: dict[str, type[SegformerHFPreTrainedModel]] = {
    "AutoModel": SegformerHFModel,
    "AutoModelForSemanticSegmentation": SegformerHFForSemanticSegmentation,
    "AutoModelForImageClassification": SegformerHFForImageClassification,
}


def _declare_to_segmentation_pipelines() -> None:
    """Lets transformers' image-segmentation pipeline recognise SegformerHFForSemanticSegmentation.

    The pipeline checks a model's class name against a merged copy of transformers' name tables
    (`MODEL_FOR_*_SEGMENTATION_MAPPING_NAMES`). The copy loses the tables' link to the models registered
    with `AutoModelForSemanticSegmentation.register` (what importing segformer_hf and loading it as remote
    code both do), so the pipeline would log "not supported for image-segmentation" for a model it runs
    fine. Naming the model type in the semantic-segmentation table, as transformers' own models are, is
    what the check reads; the Auto classes never look a model type up there without a built-in config
    of that type, so nothing else changes.
    """
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
    except ImportError:  # a transformers without the table has no such check either
        return
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(
        SegformerHFConfig.model_type, SegformerHFForSemanticSegmentation.__name__
    )


_declare_to_segmentation_pipelines()


def _auto_map() -> dict[str, str]:
    """`auto_map` entries naming the classes by file and class name, as remote code looks them up.

    The file names come from the modules themselves, which keep their names when transformers loads
    them as remote code (`transformers_modules.<hash>.modeling_segformer_hf`).
    """
    config_file = SegformerHFConfig.__module__.rsplit(".", 1)[-1]
    model_file = __name__.rsplit(".", 1)[-1]
    return {
        "AutoConfig": f"{config_file}.{SegformerHFConfig.__name__}",
        **{auto_class: f"{model_file}.{cls.__name__}" for auto_class, cls in AUTO_CLASSES.items()},
    }


__all__ = [
    "AUTO_CLASSES",
    "SegformerHFDecodeHead",
    "SegformerHFForImageClassification",
    "SegformerHFForSemanticSegmentation",
    "SegformerHFModel",
    "SegformerHFPreTrainedModel",
]
