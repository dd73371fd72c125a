"""segformer_hf: a from-scratch SegFormer that is a first-class Hugging Face model.

Importing the package registers the config, models and image processor with transformers' Auto
classes, and marks them for remote code, so `save_pretrained` writes an `auto_map` and the source files
that let `AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)` (or
`AutoModel`, `AutoModelForImageClassification`, `AutoImageProcessor`) work anywhere. Reference weights
come in through `from_reference` and go back to transformers' own classes through `to_transformers`
(both in `segformer_hf.conversion`).
"""

import transformers
from transformers import AutoConfig, AutoImageProcessor

from .configuration_segformer_hf import VARIANTS, SegformerHFConfig
from .conversion import from_reference, to_transformers
from .image_processing_segformer_hf import SegformerHFImageProcessor
from .modeling_segformer_hf import (
    AUTO_CLASSES,
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
    SegformerHFPreTrainedModel,
)
from .onnx_export import export_onnx  # onnx and onnxruntime are imported only when an export runs

__version__ = "0.1.0"


def _register_with_auto_classes() -> None:
    AutoConfig.register(SegformerHFConfig.model_type, SegformerHFConfig, exist_ok=True)
    SegformerHFConfig.register_for_auto_class()
    for auto_class, model_class in AUTO_CLASSES.items():
        getattr(transformers, auto_class).register(SegformerHFConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class)
    # One class for both backends: its resize is torch's, whichever backend transformers prefers.
    AutoImageProcessor.register(
        SegformerHFConfig,
        image_processor_classes={"torchvision": SegformerHFImageProcessor, "pil": SegformerHFImageProcessor},
        exist_ok=True,
    )
    SegformerHFImageProcessor.register_for_auto_class()


_register_with_auto_classes()

__all__ = [
    "VARIANTS",
    "SegformerHFConfig",
    "SegformerHFForImageClassification",
    "SegformerHFForSemanticSegmentation",
    "SegformerHFImageProcessor",
    "SegformerHFModel",
    "SegformerHFPreTrainedModel",
    "export_onnx",
    "from_reference",
    "to_transformers",
]
