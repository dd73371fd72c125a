"""Export a trained SegFormer to one ONNX file with dynamic batch, height and width, verified with onnxruntime.

    python scripts/export_onnx.py --model outputs/demo --output segformer.onnx
    python scripts/export_onnx.py --model outputs/demo --output segformer-fp16.onnx --dtype fp16 --exporter torchscript

The logic lives in `segformer_hf.onnx_export` (see its docstring); this is its command line.
"""

import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from segformer_hf.onnx_export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
