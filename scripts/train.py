"""Train SegFormer with Accelerate; every recipe key is a flag.

    accelerate launch scripts/train.py                                  # configs/demo.yaml, bundled data
    accelerate launch scripts/train.py --config configs/camvid-b0.yaml --max_train_steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --max_train_steps 40 --warmup_steps 5

The logic lives in `segformer_hf.training` (tests reach it there); this file only hands it the arguments.
"""

import sys
from pathlib import Path

# Python puts this folder first on sys.path, and its evaluate.py would hide the `evaluate` library
# (used by metric_backend: evaluate) from everything imported below.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from segformer_hf.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
