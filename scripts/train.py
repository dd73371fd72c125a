"""Train SegFormer with Accelerate; every recipe argument is a flag (`--help` lists them).

    accelerate launch scripts/train.py                                  # the demo recipe, bundled data
    accelerate launch scripts/train.py --config camvid-b0 --data_dir ../shared/data/camvid --init_from null --max_train_steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --max_train_steps 40

The logic lives in `segformer_hf.training` (tests reach it there); `segformer-hf train` is the same.
"""

import sys

from segformer_hf.training import main

if __name__ == "__main__":
    sys.exit(main())
