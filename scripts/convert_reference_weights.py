"""Convert a reference SegFormer checkpoint to segformer_hf's format, optionally proving it equal.

The source is a Hub repo id or local directory in transformers' format (nvidia/segformer-*), or an
original NVlabs/mmseg `.pth` (segmentation checkpoints and MiT ImageNet encoders). The output is what
`save_pretrained` writes (safetensors, config.json with auto_map, the two remote-code files) plus a
SegformerImageProcessor config, so `AutoModelForSemanticSegmentation.from_pretrained(output,
trust_remote_code=True)` and `pipeline("image-segmentation", ...)` work on it directly.

    python scripts/convert_reference_weights.py --source nvidia/segformer-b0-finetuned-ade-512-512 \\
        --output converted/segformer-b0-ade --verify
    python scripts/convert_reference_weights.py --source mit_b2.pth --output converted/mit-b2-camvid \\
        --id2label_file configs/labels/camvid.json --ignore_mismatched_sizes

The output directory appears complete or not at all: everything is written into a temporary
directory beside it and renamed into place at the end.
"""

import sys

from segformer_hf.conversion import main

if __name__ == "__main__":
    sys.exit(main())
