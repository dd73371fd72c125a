"""Opt-in: the official nvidia/* checkpoints, loaded by our converter, give their published logits.

The expected values (`../shared/data/reference/expected_logits.json`) are `logits[0, :3, :3, :3]` on
the two-cats COCO image after SegformerImageProcessor's defaults, as published in transformers' tests
and conversion script. The weights live on the Hugging Face Hub, so these tests need the network and
run only when asked for:

    SEGFORMER_HF_HUB_TESTS=1 HF_HUB_OFFLINE=0 python -m pytest tests/test_reference_logits.py

Without that, or when the Hub does not answer within seconds, every test is skipped with the reason.
"""

import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from transformers import SegformerImageProcessor

from segformer_hf import from_reference

OPT_IN_VARIABLE = "SEGFORMER_HF_HUB_TESTS"
REFERENCE = SHARED_DATA / "reference"
PROBE_REPO = "nvidia/segformer-b0-finetuned-ade-512-512"
PROBE_SECONDS = 5.0
# The file's "_tolerance" note: transformers' integration tests use atol 1e-4 (ADE B0) and 1e-1
# (Cityscapes B1); every other value comes from its conversion script, which checked atol 1e-2.
TEST_TOLERANCES = {
    "nvidia/segformer-b0-finetuned-ade-512-512": 1e-4,
    "nvidia/segformer-b1-finetuned-cityscapes-1024-1024": 1e-1,
}
CONVERSION_SCRIPT_TOLERANCE = 1e-2
DATASET_NAMES = {"ade": "ade", "city": "cityscapes"}


def hub_repo_for(key: str) -> str:
    """Hub repo of an expected_logits.json entry.

    Entries name the repo ("nvidia/segformer-b0-finetuned-ade-512-512 (segformer.b0...)") or only the
    original NVlabs checkpoint ("segformer.b2.1024x1024.city.160k"), which nvidia published on the Hub
    as nvidia/segformer-b2-finetuned-cityscapes-1024-1024.
    """
    if key.startswith("nvidia/"):
        return key.split()[0]
    match = re.fullmatch(r"segformer\.(b\d)\.(\d+)x(\d+)\.(ade|city)\.160k", key)
    assert match, f"unrecognised entry {key!r} in expected_logits.json"
    variant, height, width, dataset = match.groups()
    return f"nvidia/segformer-{variant}-finetuned-{DATASET_NAMES[dataset]}-{height}-{width}"


def _expected_entries() -> list[tuple[str, list]]:
    path = REFERENCE / "expected_logits.json"
    if not path.is_file():
        return []
    return [(key, values) for key, values in json.loads(path.read_text()).items() if not key.startswith("_")]


def _probe_hub() -> str | None:
    """None when the Hub answers within PROBE_SECONDS, else why not. Never blocks longer than that."""
    from huggingface_hub import model_info

    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            model_info(PROBE_REPO, timeout=PROBE_SECONDS)
            outcome["error"] = None
        except Exception as error:  # any failure means: not reachable from here
            outcome["error"] = f"{type(error).__name__}: {error}"

    # A daemon thread, because a name lookup can outlast any socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 2)
    if thread.is_alive():
        return f"no answer from the Hub within {PROBE_SECONDS + 2:.0f} s"
    return outcome["error"]


@pytest.fixture(scope="module")
def hub_available():
    if os.environ.get(OPT_IN_VARIABLE) != "1":
        pytest.skip(
            f"downloads the official checkpoints from the Hugging Face Hub; set {OPT_IN_VARIABLE}=1 "
            "(and HF_HUB_OFFLINE=0) on a machine with internet access to run it"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("HF_HUB_OFFLINE is set (tests/conftest.py sets it unless HF_HUB_OFFLINE=0 is exported)")
    problem = _probe_hub()
    if problem is not None:
        pytest.skip(f"the Hugging Face Hub is unreachable ({problem})")


@pytest.fixture(scope="module")
def cats_pixel_values(shared_data: Path) -> torch.Tensor:
    image = Image.open(shared_data / "reference" / "000000039769.png").convert("RGB")
    return SegformerImageProcessor()(images=image, return_tensors="pt")["pixel_values"]


def test_expected_logits_entries_map_to_hub_repos():
    """Runs offline: every entry of the reference file resolves to a well-formed nvidia/* repo id."""
    entries = _expected_entries()
    if not entries:
        pytest.skip(
            f"{REFERENCE / 'expected_logits.json'} not found (CI places ../shared beside the checkout)"
        )
    repos = [hub_repo_for(key) for key, _ in entries]
    assert len(set(repos)) == len(repos)
    assert set(TEST_TOLERANCES) <= set(repos)
    assert hub_repo_for("segformer.b5.640x640.ade.160k") == "nvidia/segformer-b5-finetuned-ade-640-640"
    assert (
        hub_repo_for("segformer.b0.512x1024.city.160k") == "nvidia/segformer-b0-finetuned-cityscapes-512-1024"
    )
    for _, values in entries:
        assert torch.tensor(values).shape == (3, 3, 3)


@pytest.mark.parametrize(
    ("key", "expected"),
    _expected_entries(),
    ids=[hub_repo_for(key) for key, _ in _expected_entries()],
)
def test_official_checkpoint_gives_the_published_logits(key, expected, hub_available, cats_pixel_values):
    repo = hub_repo_for(key)
    model = from_reference(repo).eval()
    with torch.no_grad():
        logits = model(cats_pixel_values).logits
    assert logits.shape == (1, model.config.num_labels, 128, 128)
    tolerance = TEST_TOLERANCES.get(repo, CONVERSION_SCRIPT_TOLERANCE)
    torch.testing.assert_close(logits[0, :3, :3, :3], torch.tensor(expected), rtol=0, atol=tolerance)
