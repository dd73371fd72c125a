"""Train SegFormer with Accelerate; every recipe key is a flag.

    accelerate launch scripts/train.py                                  # configs/demo.yaml, bundled data
    accelerate launch scripts/train.py --config configs/camvid-b0.yaml --max_train_steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --max_train_steps 40 --warmup_steps 5

The logic lives in `segformer_hf.training` (tests reach it there); this file only hands it the arguments.
"""

import sys

from segformer_hf.training import main

if __name__ == "__main__":
    sys.exit(main())
