"""Push a trained model to the Hugging Face Hub, with its model card, in one commit.

    hf auth login                                                   # once, with a write token
    python scripts/push_to_hub.py outputs/demo --repo_id USER/segformer-b0-camvid-demo
    python scripts/push_to_hub.py outputs/demo --repo_id USER/segformer-b0-camvid-demo-hf --format transformers

--format segformer_hf (default) uploads segformer_hf's own classes as remote code (load with
trust_remote_code=True); --format transformers uploads the weights converted to transformers' own
SegformerForSemanticSegmentation (no remote code). The logic is `segformer_hf.hub.push_to_hub`, the
same code `scripts/train.py --push_to_hub` runs; the output directory is only read.
"""

from __future__ import annotations

import argparse
import logging
import sys

from segformer_hf.hub import FORMATS, HubPushError, push_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", help="the output directory of a training run (scripts/train.py)")
    parser.add_argument("--repo_id", required=True, help="USER/NAME or ORGANISATION/NAME; created if missing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--format", choices=FORMATS, default="segformer_hf", help="what the repository holds")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument(
        "--token", default=None, help="a write token (default: the `hf auth login` one, or HF_TOKEN)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        url = push_to_hub(
            arguments.output_dir,
            arguments.repo_id,
            private=arguments.private,
            format=arguments.format,
            commit_message=arguments.commit_message,
            token=arguments.token,
        )
    except (HubPushError, FileNotFoundError, ValueError) as error:
        print(f"push_to_hub: {error}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
