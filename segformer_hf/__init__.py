"""segformer_hf: a from-scratch SegFormer that is a first-class Hugging Face model.

Importing the package registers the config and models with transformers' Auto classes, and marks
them for remote code, so `save_pretrained` writes an `auto_map` and the two source files that let
`AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)` work anywhere.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_segformer_hf import VARIANTS, SegformerHFConfig
from .modeling_segformer_hf import (
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
    SegformerHFPreTrainedModel,
)
from .onnx_export import export_onnx  # onnx and onnxruntime are imported only when an export runs

__version__ = "0.1.0"

AutoConfig.register(SegformerHFConfig.model_type, SegformerHFConfig, exist_ok=True)
AutoModel.register(SegformerHFConfig, SegformerHFModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(
    SegformerHFConfig, SegformerHFForSemanticSegmentation, exist_ok=True
)
AutoModelForImageClassification.register(SegformerHFConfig, SegformerHFForImageClassification, exist_ok=True)

SegformerHFConfig.register_for_auto_class()
SegformerHFModel.register_for_auto_class("AutoModel")
SegformerHFForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
SegformerHFForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "VARIANTS",
    "SegformerHFConfig",
    "SegformerHFForImageClassification",
    "SegformerHFForSemanticSegmentation",
    "SegformerHFModel",
    "SegformerHFPreTrainedModel",
    "export_onnx",
]
