"""Evaluate a SegFormer on a dataset split with the paper's inference modes; mean IoU table + JSON.

    python scripts/evaluate.py --model outputs/demo --data_dir data/camvid-demo --split val
    accelerate launch scripts/evaluate.py --model nvidia/segformer-b0-finetuned-ade-512-512 \\
        --data_dir data/ADEChallengeData2016 --reduce_labels --img_scale 2048 512 --output ade.json
    python scripts/evaluate.py --model MODEL --data_dir data/cityscapes --mode slide \\
        --crop_size 1024 --stride 768 --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip

The logic lives in `segformer_hf.evaluation`; this file only hands it the arguments.
"""

import sys
from pathlib import Path

# Python puts this folder first on sys.path, and its evaluate.py would hide the `evaluate` library
# (used by metric_backend: evaluate) from everything imported below.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from segformer_hf.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
