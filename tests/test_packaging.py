"""The package as a user installs it (issue #14.3): a non-editable install must carry everything the
commands read at run time (recipes, label files, the demo data, the remote-code files), and must train
the demo recipe from an empty directory with this checkout nowhere on the path.

The wheel is built from a clean copy of the sources, so that nothing left in a build/ folder of the
checkout can hide a file that package_data misses.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "segformer_hf"
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "outputs", "wandb", "*.egg-info", "__pycache__", ".*_cache"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "segformer_hf-src"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    destination = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build requirements (setuptools, wheel) come with the test extra, and no
    # package index is needed.
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(destination),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (built,) = destination.glob("segformer_hf-*.whl")
    return built


def _package_files(*patterns: str) -> set[str]:
    """Files of the source package matching the patterns, as wheel member names."""
    return {
        path.relative_to(REPO_ROOT).as_posix()
        for pattern in patterns
        for path in PACKAGE.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_wheel_holds_the_recipes_label_files_demo_data_and_remote_code(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = _package_files("**/*.py", "recipes/*.yaml", "recipes/labels/*", "recipes/camvid-demo/**/*")
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    # Each kind is really there (the globs above could all be empty if the tree moved).
    for name in (
        "segformer_hf/modeling_segformer_hf.py",
        "segformer_hf/configuration_segformer_hf.py",
        "segformer_hf/evaluate_metric/mean_iou.py",
        "segformer_hf/demo.py",
        "segformer_hf/recipes/demo.yaml",
        "segformer_hf/recipes/labels/ade20k.json",
        "segformer_hf/recipes/camvid-demo/classes.json",
        "segformer_hf/recipes/camvid-demo/LICENSE.md",
    ):
        assert name in names, name
    for split, count in (("train", 48), ("val", 16)):
        for kind in ("images", "labels"):
            prefix = f"segformer_hf/recipes/camvid-demo/{split}/{kind}/"
            assert sum(name.startswith(prefix) for name in names) == count, prefix
    # Only the package: no tests, scripts or docs installed as top-level packages.
    assert {name.split("/")[0] for name in names} == {
        "segformer_hf",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    entry_points = zipfile.ZipFile(wheel).read(wheel.name.split("-py3")[0] + ".dist-info/entry_points.txt")
    assert "segformer-hf = segformer_hf.cli:main" in entry_points.decode()


def test_installed_wheel_trains_the_demo_recipe_from_an_empty_directory(wheel, tmp_path):
    """`segformer-hf train --config demo` as a user runs it after `pip install segformer_hf-*.whl`."""
    target = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    workdir = tmp_path / "empty"
    workdir.mkdir()
    # Only the installed copy is importable first; the dependencies come from this environment.
    environment = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    # The installed copy is the one imported, and gradio (an optional dependency) is not imported with it.
    code = "import sys, segformer_hf, segformer_hf.cli, segformer_hf.demo, segformer_hf.hub; "
    code += "print(segformer_hf.__file__, 'gradio' in sys.modules)"
    where = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, gradio_imported = where.stdout.split()
    assert Path(package_file).is_relative_to(target), where.stdout
    assert gradio_imported == "False", "importing segformer_hf must not import gradio"

    # The console script pip wrote, which runs segformer_hf.cli:main.
    command = [str(target / "bin" / "segformer-hf"), "train", "--config", "demo", "--max_train_steps", "2"]
    command += ["--max_train_samples", "8", "--max_eval_samples", "2", "--crop_size", "64", "64"]
    command += ["--img_scale", "120", "90", "--per_device_train_batch_size", "2"]
    command += ["--dataloader_num_workers", "0", "--report_to", "none", "--output_dir", "out"]
    run = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    output = workdir / "out"
    for name in ("model.safetensors", "config.json", "modeling_segformer_hf.py", "all_results.json"):
        assert (output / name).is_file(), name
    assert "mean IoU" in run.stdout + run.stderr


def test_no_text_tells_users_to_pip_install_the_unpublished_package():
    """segformer_hf is not on PyPI: advice must name things that install (`pip install .`, `".[demo]"`)."""
    unpublished = re.compile(r"pip install\s+[\"']?segformer[_-]hf(?![\w/.-]*\.whl)", re.IGNORECASE)
    texts = [
        *PACKAGE.rglob("*.py"),
        *(REPO_ROOT / "scripts").glob("*.py"),
        *(REPO_ROOT / "docs").glob("*.md"),
    ]
    texts.append(REPO_ROOT / "README.md")
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in texts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if unpublished.search(line)
    ]
    assert not offending, offending
