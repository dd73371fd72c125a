"""Test-wide settings: never touch the network, never prompt, keep runs small and deterministic."""

import os
import sys
from pathlib import Path

# Set before transformers/huggingface_hub/wandb are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2`, the README's command) each worker, and every training subprocess it starts,
# gets one compute thread: two workers with two OpenMP threads each on a 2-core machine fight for the cores
# and small torch ops slow down many times over.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# The longest tests (about 20-140 s each on a 2-core machine; pytest's --durations lists them). They are
# collected first, so that pytest-xdist hands them out at the start and the two workers finish together
# instead of one waiting on a long test collected last.
LONG_TESTS = (
    "test_speed.py::test_compiled_inference_equals_eager_at_two_sizes_without_recompiling",
    "test_training.py::test_a_handful_of_images_is_overfitted",
    "test_training.py::test_resume_after_stop_reproduces_the_uninterrupted_losses",
    "test_speed.py::test_torch_compile_training_saves_weights_without_the_compile_prefix",
    "test_training.py::test_resume_mid_epoch_reproduces_the_uninterrupted_losses",
    "test_evaluation.py::test_two_process_evaluation_equals_one_process",
    "test_training.py::test_kill_9_leaves_the_last_checkpoint_intact_and_resume_latest_continues",
    "test_packaging.py::test_installed_wheel_trains_the_demo_recipe_from_an_empty_directory",
)
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEMO_DATA = REPO_ROOT / "segformer_hf" / "recipes" / "camvid-demo"


def accelerate_launch(num_processes: int = 1) -> list[str]:
    """`accelerate launch` as the tests run it, up to the script: CPU processes, no mixed precision, no dynamo.

    Two or more processes make a real (gloo) process group (`--multi_gpu` is accelerate's name for it).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        command.append("--multi_gpu")
    return command + [
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (CI places ../shared beside the checkout)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest tests first (see LONG_TESTS); every other test keeps its place."""
    rank = {name: index for index, name in enumerate(LONG_TESTS)}

    def position(item: pytest.Item) -> int:
        return rank.get(f"{item.path.name}::{item.name}", len(rank))

    items.sort(key=position)  # stable: the rest stay in collection order
