"""Push a trained model to the Hugging Face Hub, with its model card, in one commit.

    hf auth login                                                   # once, with a write token
    python scripts/push_to_hub.py outputs/demo --repo_id USER/segformer-b0-camvid-demo
    python scripts/push_to_hub.py outputs/demo --repo_id USER/segformer-b0-camvid-demo-hf --format transformers

--format segformer_hf (default) uploads segformer_hf's own classes as remote code (load with
trust_remote_code=True); --format transformers uploads the weights converted to transformers' own
SegformerForSemanticSegmentation (no remote code). The logic is `segformer_hf.hub` (`segformer-hf push` is the
same), the code `scripts/train.py --push_to_hub` runs; the output directory is only read.
"""

import sys

from segformer_hf.hub import main

if __name__ == "__main__":
    sys.exit(main())
