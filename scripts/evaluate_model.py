"""Evaluate a SegFormer on a dataset split with the paper's inference modes; mean IoU table + JSON.

    python scripts/evaluate_model.py --model outputs/demo --data_dir segformer_hf/recipes/camvid-demo --split val
    accelerate launch scripts/evaluate_model.py --model nvidia/segformer-b0-finetuned-ade-512-512 \\
        --data_dir data/ADEChallengeData2016 --reduce_labels --img_scale 2048 512 --output ade.json
    python scripts/evaluate_model.py --model MODEL --data_dir data/cityscapes --mode slide \\
        --crop_size 1024 --stride 768 --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip

The logic lives in `segformer_hf.evaluation`; `segformer-hf evaluate` is the same. (This file is not called
evaluate.py: that name would hide the `evaluate` library from everything run from this folder.)
"""

import sys

from segformer_hf.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
