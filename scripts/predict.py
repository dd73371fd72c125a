"""Segment images with a trained model: a colour mask and an overlay per image, plus one legend.

    python scripts/predict.py --model outputs/demo segformer_hf/recipes/camvid-demo/val/images --output predictions
    python scripts/predict.py --model nvidia/segformer-b0-finetuned-cityscapes-1024-1024 street.png \\
        --output predictions --mode slide --crop_size 1024 --stride 768 --no_resize

The logic lives in `segformer_hf.prediction`; `segformer-hf predict` is the same.
"""

import sys

from segformer_hf.prediction import main

if __name__ == "__main__":
    sys.exit(main())
