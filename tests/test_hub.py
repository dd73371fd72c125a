"""Sharing on the Hub: the model card, the exact files each format uploads, the errors, and that what
would be uploaded loads back in a fresh Python where segformer_hf does not exist.

The Hub is never contacted: HfApi's methods are replaced by recorders that keep a copy of what one
commit would have sent (whether it comes as a folder or as commit operations).
"""

import json
import math
import runpy
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import hf_raise_for_status
from huggingface_hub.utils import httpx as hub_http
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf.arguments import TrainingConfig
from segformer_hf.hub import HubPushError, build_model_card, push_to_hub, write_model_card
from segformer_hf.training import save_model_files

REPO_ID = "someone/segformer-b0-test"
ID2LABEL = {0: "road", 1: "sky", 2: "tree"}
SEGFORMER_HF_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "configuration_segformer_hf.py",
    "image_processing_segformer_hf.py",
    "model.safetensors",
    "modeling_segformer_hf.py",
    "preprocessor_config.json",
    "train_config.yaml",
}
TRANSFORMERS_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
}
NVIDIA_LICENCE_LINK = "https://github.com/NVlabs/SegFormer/blob/master/LICENSE"


@dataclass
class Run:
    model: SegformerHFForSemanticSegmentation
    directory: Path
    results: dict


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of realistic scale everywhere (norms, biases and BatchNorm statistics too), so that logits
    vary and a misplaced tensor would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.ndim > 1:
                tensor.copy_(noise * tensor[0].numel() ** -0.5)
            elif name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """An output directory as a finished training run leaves it (B0, three classes, 64x64 processor)."""
    config = SegformerHFConfig.from_variant(
        "b0", num_labels=3, id2label=ID2LABEL, label2id={name: index for index, name in ID2LABEL.items()}
    )
    model = SegformerHFForSemanticSegmentation(config).eval()
    _randomize(model, seed=0)
    training_config = TrainingConfig(
        data_dir="data/camvid-demo",
        crop_size=[64, 64],
        max_train_steps=20,
        warmup_steps=2,
        seed=7,
        per_device_train_batch_size=2,
    )
    directory = tmp_path_factory.mktemp("run") / "segformer-b0-demo"
    save_model_files(model, directory, training_config)
    results = {
        "eval_mean_iou": 0.41234,
        "eval_mean_accuracy": 0.55555,
        "eval_overall_accuracy": 0.87654,
        "eval_per_category_iou": [0.25, float("nan"), 0.57468],
        "eval_per_category_accuracy": [0.5, float("nan"), 0.61111],
        "train_loss": 1.2345,
        "train_steps": 20,
        "train_runtime": 66.0,
        "world_size": 2,
    }
    # Written as training.py writes it: Python's json, NaN as a bare NaN literal.
    (directory / "all_results.json").write_text(json.dumps(results, indent=2))
    (directory / "train_config.yaml").write_text(yaml.safe_dump(training_config.to_dict(), sort_keys=False))
    write_model_card(directory)
    return Run(model=model, directory=directory, results=results)


def _copy_run(run: Run, destination: Path, **training_overrides) -> Path:
    """A copy of the run directory with some training settings changed (the card reads them from disk)."""
    directory = destination / run.directory.name
    shutil.copytree(run.directory, directory)
    training = yaml.safe_load((directory / "train_config.yaml").read_text())
    training.update(training_overrides)
    (directory / "train_config.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    return directory


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `directory`, to prove nothing was touched."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def _front_matter(readme: str) -> dict:
    """The YAML metadata block exactly as the Hub parses it, read without huggingface_hub."""
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def _python_snippet(readme: str) -> str:
    blocks = readme.split("```python\n")[1:]
    assert len(blocks) == 1, "the card should hold exactly one Python snippet"
    return blocks[0].split("\n```", 1)[0]


# Intercepting the Hub -----------------------------------------------------------------------------------------


class HubRecorder:
    """Stands in for HfApi: records repo creation and keeps each commit's files in a folder of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.failure: Exception | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self

        def create_repo(api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
            recorder.created.append(
                {
                    "repo_id": repo_id,
                    "private": private,
                    "repo_type": repo_type,
                    "exist_ok": exist_ok,
                    "token": token or api.token,
                    **kwargs,
                }
            )
            if recorder.failure is not None:
                raise recorder.failure
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, commit_message=None, **kwargs):
            folder = recorder._new_commit(repo_id, commit_message, api.token, kwargs)
            shutil.copytree(folder_path, folder / (path_in_repo or ""), dirs_exist_ok=True)

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            folder = recorder._new_commit(repo_id, commit_message, api.token, kwargs)
            for operation in operations:
                assert isinstance(operation, CommitOperationAdd), f"unexpected operation {operation}"
                target = folder / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                source = operation.path_or_fileobj
                if isinstance(source, (str, Path)):
                    shutil.copyfile(source, target)
                else:
                    target.write_bytes(source if isinstance(source, bytes) else source.read())

        def unexpected(name):
            def call(*args, **kwargs):
                raise AssertionError(f"push_to_hub should not call HfApi.{name}")

            return call

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        for name in ("upload_file", "delete_repo", "delete_file", "delete_files", "delete_folder"):
            monkeypatch.setattr(HfApi, name, unexpected(name))

    def _new_commit(self, repo_id, commit_message, token, kwargs) -> Path:
        folder = self.root / f"commit-{len(self.commits)}"
        folder.mkdir(parents=True)
        self.commits.append(
            {"repo_id": repo_id, "message": commit_message, "token": token, "folder": folder, **kwargs}
        )
        return folder

    @property
    def only_commit(self) -> dict:
        assert len(self.commits) == 1, f"expected one commit with every file, got {len(self.commits)}"
        return self.commits[0]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubRecorder:
    monkeypatch.setenv("HF_TOKEN", "hf_token_for_tests")
    recorder = HubRecorder(tmp_path / "hub")
    recorder.install(monkeypatch)
    return recorder


def _http_error(status: int):
    """The exception huggingface_hub itself raises for a response with this status."""
    url = "https://huggingface.co/api/repos/create"
    response = hub_http.Response(status, request=hub_http.Request("POST", url), json={"error": "refused"})
    try:
        hf_raise_for_status(response)
    except Exception as error:  # the library picks the subclass; we only need what it raises
        return error
    raise AssertionError(f"hf_raise_for_status accepted status {status}")


# The two formats: exactly which files, in one commit ----------------------------------------------------------


def test_segformer_hf_format_uploads_the_run_files_with_remote_code_in_one_commit(run, hub):
    before = _snapshot(run.directory)
    url = push_to_hub(run.directory, REPO_ID)
    assert _snapshot(run.directory) == before, "pushing must only read the output directory"

    assert url == f"https://huggingface.co/{REPO_ID}"
    assert [(c["repo_id"], c["exist_ok"], c["private"]) for c in hub.created] == [(REPO_ID, True, False)]
    commit = hub.only_commit
    assert commit["repo_id"] == REPO_ID and commit["token"] == "hf_token_for_tests"
    folder = commit["folder"]
    assert {path.name for path in folder.iterdir()} == SEGFORMER_HF_FILES
    for name in SEGFORMER_HF_FILES - {"README.md"}:
        assert (folder / name).read_bytes() == (run.directory / name).read_bytes(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "segformer_hf"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == (
        "modeling_segformer_hf.SegformerHFForSemanticSegmentation"
    )
    # The pushed card loads the repo, not the local directory.
    assert f'model_id = "{REPO_ID}"' in (folder / "README.md").read_text()


def test_transformers_format_uploads_a_stock_checkpoint_without_code(run, hub):
    before = _snapshot(run.directory)
    push_to_hub(run.directory, REPO_ID, format="transformers", private=True, commit_message="native export")
    assert _snapshot(run.directory) == before, "pushing must only read the output directory"

    assert [(c["repo_id"], c["exist_ok"], c["private"]) for c in hub.created] == [(REPO_ID, True, True)]
    commit = hub.only_commit
    assert commit["message"] == "native export"
    folder = commit["folder"]
    assert {path.name for path in folder.iterdir()} == TRANSFORMERS_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "segformer" and "auto_map" not in config
    assert config["id2label"] == {str(index): name for index, name in ID2LABEL.items()}
    # transformers loads every weight it expects and nothing else is in the file.
    loaded, info = SegformerForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.float32, torch.int64}  # int64: BatchNorm's num_batches_tracked
    assert (folder / "all_results.json").read_bytes() == (run.directory / "all_results.json").read_bytes()
    # No code in this format: transformers' own processor, resizing to the same keep-ratio sizes.
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SegformerImageProcessor" and "auto_map" not in processor
    saved = json.loads((run.directory / "preprocessor_config.json").read_text())
    assert processor["size"] == {
        "shortest_edge": min(saved["img_scale"]),
        "longest_edge": max(saved["img_scale"]),
    }


# The card -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["segformer_hf", "transformers"])
def test_pushed_card_metadata_and_results_parse_back(run, hub, format):
    push_to_hub(run.directory, REPO_ID, format=format)
    readme = (hub.only_commit["folder"] / "README.md").read_text()

    metadata = _front_matter(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert {"image-segmentation", "segformer", "segformer_hf", "vision"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"  # from scratch: nothing of NVIDIA's
    assert "base_model" not in metadata and "datasets" not in metadata
    (entry,) = metadata["model-index"]
    assert entry["name"] == REPO_ID.split("/")[1]
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-segmentation"
    assert result["dataset"]["split"] == "validation" and result["dataset"]["type"] == "camvid-demo"
    reported = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert reported == pytest.approx(
        {
            "mean_iou": run.results["eval_mean_iou"],
            "mean_accuracy": run.results["eval_mean_accuracy"],
            "overall_accuracy": run.results["eval_overall_accuracy"],
        },
        abs=5e-5,
    )
    # huggingface_hub reads the same metadata back (what the Hub's widgets use).
    card = ModelCard(readme)
    assert [r.metric_type for r in card.data.eval_results] == [
        "mean_iou",
        "mean_accuracy",
        "overall_accuracy",
    ]

    text = card.text
    assert "| road | 0.2500 | 0.5000 |" in text
    assert "| sky | n/a | n/a |" in text  # NaN: the class never occurred
    assert "| tree | 0.5747 | 0.6111 |" in text
    assert "SegFormer-B0 (MiT-B0 encoder, " in text
    assert "| crop_size | [64, 64] |" in text and "| total batch size | 4 (2 processes) |" in text
    assert "CC BY-NC 4.0" in text  # the bundled demo data is CamVid
    assert "NVIDIA Source Code License" not in text

    snippet = _python_snippet(readme)
    if format == "segformer_hf":
        assert "AutoModelForSemanticSegmentation.from_pretrained(model_id, trust_remote_code=True)" in snippet
        assert 'pipeline("image-segmentation", model=model_id, trust_remote_code=True)' in snippet
    else:
        assert "SegformerForSemanticSegmentation.from_pretrained(model_id)" in snippet
        assert "trust_remote_code" not in snippet and "segformer_hf" not in snippet


def test_local_card_written_by_training_describes_the_directory(run):
    readme = (run.directory / "README.md").read_text()
    assert _front_matter(readme)["model-index"][0]["name"] == run.directory.name
    assert f'model_id = "{run.directory}"' in _python_snippet(readme)


@pytest.mark.parametrize(
    "init_from, base_model",
    [
        ("nvidia/mit-b0", "nvidia/mit-b0"),
        ("/checkpoints/mit_b0.pth", None),  # an NVlabs release file
    ],
)
def test_card_of_a_model_started_from_nvidia_weights_carries_the_non_commercial_licence(
    run, tmp_path, init_from, base_model
):
    directory = _copy_run(
        run, tmp_path, init_from=init_from, dataset_name="segments/sidewalk-semantic", data_dir=None
    )
    card = build_model_card(directory, repo_id=REPO_ID)

    metadata = _front_matter(card.content)
    assert metadata["license"] == "other"
    assert metadata["license_link"] == NVIDIA_LICENCE_LINK
    assert "nvidia" in metadata["license_name"]
    assert metadata.get("base_model") == base_model
    assert metadata["datasets"] == ["segments/sidewalk-semantic"]
    assert "NVIDIA Source Code License for SegFormer" in card.text and "non-commercial" in card.text
    assert f"starting from `{init_from}`" in card.text
    assert "https://huggingface.co/datasets/segments/sidewalk-semantic" in card.text


def test_a_run_that_started_from_an_nvidia_derived_run_keeps_the_licence(run, tmp_path):
    first = _copy_run(run, tmp_path / "first", init_from="nvidia/segformer-b0-finetuned-ade-512-512")
    second = _copy_run(run, tmp_path / "second", init_from=str(first))
    metadata = _front_matter(build_model_card(second).content)
    assert metadata["license"] == "other" and "base_model" not in metadata


def test_card_without_results_or_training_config_says_so_and_has_no_model_index(run, tmp_path):
    directory = tmp_path / "bare"
    shutil.copytree(run.directory, directory)
    (directory / "all_results.json").unlink()
    (directory / "train_config.yaml").unlink()
    card = build_model_card(directory)
    assert "model-index" not in _front_matter(card.content)
    assert "No evaluation results were recorded" in card.text
    assert "training configuration was not recorded" in card.text


def test_null_per_class_iou_reads_as_not_available(run, tmp_path):
    """inference.py writes NaN as null (strict JSON); training.py as NaN: both mean "undefined"."""
    directory = _copy_run(run, tmp_path)
    results = json.loads((directory / "all_results.json").read_text())
    results["eval_per_category_iou"] = [None, 0.5, None]
    (directory / "all_results.json").write_text(json.dumps(results))
    text = build_model_card(directory).text
    assert "| road | n/a | 0.5000 |" in text and "| sky | 0.5000 | n/a |" in text


def test_card_says_when_the_weights_are_a_moving_average(run, tmp_path):
    assert "| ema_decay |" not in build_model_card(run.directory).text
    averaged = build_model_card(_copy_run(run, tmp_path, ema_decay=0.995)).text
    assert "| ema_decay | 0.995 |" in averaged.split("<details>")[0], "in the table, not only in the YAML"


def test_card_says_which_classes_were_pasted_and_how_often(run, tmp_path):
    assert "copy_paste" not in build_model_card(run.directory).text.split("<details>")[0]
    card = build_model_card(
        _copy_run(run, tmp_path, copy_paste_classes=["Pole", "SignSymbol"], copy_paste_prob=0.25)
    ).text.split("<details>")[0]
    assert '| copy_paste_classes | ["Pole", "SignSymbol"] |\n| copy_paste_prob | 0.25 |' in card


def test_write_model_card_replaces_readme_in_one_step(run, tmp_path, monkeypatch):
    directory = _copy_run(run, tmp_path)
    (directory / "README.md").write_text("previous card")

    def save_half_then_fail(card, path):
        Path(path).write_text("---\nhalf a card")
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(directory)
    assert (directory / "README.md").read_text() == "previous card"
    assert sorted(path.name for path in directory.iterdir() if path.name.startswith(".")) == []


# Failures: a clear message, nothing uploaded, the output directory untouched ----------------------------------


@pytest.mark.parametrize(
    "failure, expected",
    [
        (lambda: _http_error(401), ["hf auth login", "HF_TOKEN", "401"]),
        (lambda: _http_error(403), ["403", "write", "someone"]),
        (
            lambda: hub_http.ConnectError("[Errno -3] Temporary failure in name resolution"),
            ["network connection"],
        ),
    ],
    ids=["401-unauthorized", "403-forbidden", "network-down"],
)
def test_hub_failure_gives_a_clear_message_and_leaves_output_dir_byte_identical(run, hub, failure, expected):
    before = _snapshot(run.directory)
    hub.failure = failure()
    with pytest.raises(HubPushError) as raised:
        push_to_hub(run.directory, REPO_ID)
    message = str(raised.value)
    for fragment in expected:
        assert fragment in message, message
    assert REPO_ID in message and f"{run.directory} is unchanged" in message
    assert hub.commits == []
    assert _snapshot(run.directory) == before


@pytest.mark.parametrize("repo_id", ["not a repo id!", "a/b/c", "someone/" + "x" * 200, "-bad/name"])
def test_bad_repo_id_is_refused_before_any_network_call(run, hub, repo_id):
    with pytest.raises(HubPushError, match="not a valid Hub repo id"):
        push_to_hub(run.directory, repo_id)
    assert hub.created == [] and hub.commits == []


def test_without_any_token_nothing_is_sent_and_the_message_says_how_to_log_in(
    run, hub, monkeypatch, tmp_path
):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = _snapshot(run.directory)
    with pytest.raises(HubPushError, match="hf auth login") as raised:
        push_to_hub(run.directory, REPO_ID)
    assert "HF_TOKEN" in str(raised.value)
    assert hub.created == [] and hub.commits == []
    assert _snapshot(run.directory) == before


def test_directory_that_is_not_a_run_is_named_in_the_error(tmp_path, hub):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json"):
        push_to_hub(tmp_path / "empty", REPO_ID)
    assert hub.created == []


def test_unknown_format_is_refused(run, hub):
    with pytest.raises(ValueError, match="segformer_hf, transformers"):
        push_to_hub(run.directory, REPO_ID, format="onnx")


# The script ---------------------------------------------------------------------------------------------------


def _run_script(monkeypatch, *arguments: str) -> int:
    monkeypatch.setattr(sys, "argv", ["push_to_hub.py", *arguments])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / "scripts" / "push_to_hub.py"), run_name="__main__")
    return exited.value.code


def test_push_script_runs_the_same_push_end_to_end(run, hub, monkeypatch, capsys):
    code = _run_script(
        monkeypatch,
        str(run.directory),
        "--repo_id",
        REPO_ID,
        "--private",
        "--format",
        "transformers",
        "--commit_message",
        "from the script",
        "--token",
        "hf_script_token",
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == f"https://huggingface.co/{REPO_ID}"
    assert [(c["private"], c["token"]) for c in hub.created] == [(True, "hf_script_token")]
    commit = hub.only_commit
    assert (commit["message"], commit["token"]) == ("from the script", "hf_script_token")
    assert {path.name for path in commit["folder"].iterdir()} == TRANSFORMERS_FILES


def test_push_script_reports_a_refused_token_without_a_traceback(run, hub, monkeypatch, capsys):
    hub.failure = _http_error(401)
    code = _run_script(monkeypatch, str(run.directory), "--repo_id", REPO_ID)
    assert code == 1
    error = capsys.readouterr().err
    assert "hf auth login" in error and "Traceback" not in error


# What was uploaded loads back in a fresh Python without segformer_hf ------------------------------------------

# -I: no user site, no PYTHON* variables, no script directory on sys.path. The meta-path finder refuses
# segformer_hf as a machine without it would, since the editable install makes it importable everywhere.
_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, re, sys

    class RefuseSegformerHF:
        def find_spec(self, name, path=None, target=None):
            if name == "segformer_hf" or name.startswith("segformer_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, RefuseSegformerHF())
    remote_dir, native_dir, input_path, output_path, repo_id, repo_root = sys.argv[1:7]
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", repo_root)]
    try:
        import segformer_hf  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSemanticSegmentation, SegformerForSemanticSegmentation, pipeline

    pixel_values = load_file(input_path)["pixel_values"]
    remote = AutoModelForSemanticSegmentation.from_pretrained(remote_dir, trust_remote_code=True).eval()
    native = SegformerForSemanticSegmentation.from_pretrained(native_dir).eval()
    with torch.no_grad():
        logits = {"remote": remote(pixel_values).logits, "native": native(pixel_values).logits}
    save_file({name: value.contiguous() for name, value in logits.items()}, output_path)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pipelines = {}
    for name, directory, remote_code in (("remote", remote_dir, True), ("native", native_dir, False)):
        segments = pipeline("image-segmentation", model=directory, trust_remote_code=remote_code)(image)
        coverage = sum((np.asarray(segment["mask"]) > 0).astype(int) for segment in segments)
        pipelines[name] = {
            "labels": [segment["label"] for segment in segments],
            "sizes": sorted({segment["mask"].size for segment in segments}),
            "partition": bool((coverage == 1).all()),
        }

    snippets = {}
    for name, directory in (("remote", remote_dir), ("native", native_dir)):
        readme = open(f"{directory}/README.md").read()
        code = re.search(r"```python\\n(.*?)\\n```", readme, flags=re.S)[1]
        assert f'"{repo_id}"' in code, "the snippet does not load the repo"
        code = code.replace(f'"{repo_id}"', repr(directory))
        image_name = re.search(r'Image\\.open\\("([^"]+)"\\)', code)[1]
        Image.fromarray(np.full((40, 48, 3), 90, dtype=np.uint8)).save(image_name)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{name} card snippet", "exec"), {"__name__": "snippet"})
        snippets[name] = printed.getvalue()

    assert "segformer_hf" not in sys.modules
    print(json.dumps({
        "blocked": blocked,
        "imported": sorted(m for m in sys.modules if m.split(".")[0] == "segformer_hf"),
        "remote_module": type(remote).__module__,
        "native_module": type(native).__module__,
        "pipelines": pipelines,
        "snippets": snippets,
    }))
    """
)


@pytest.fixture(scope="module")
def uploaded_folders(run, tmp_path_factory) -> dict[str, Path]:
    """The folders exactly as each format's push would have uploaded them."""
    folders = {}
    for format in ("segformer_hf", "transformers"):
        recorder = HubRecorder(tmp_path_factory.mktemp(f"hub-{format}"))
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("HF_TOKEN", "hf_token_for_tests")
            recorder.install(monkeypatch)
            push_to_hub(run.directory, REPO_ID, format=format)
        folders[format] = recorder.only_commit["folder"]
    return folders


@pytest.fixture(scope="module")
def fresh_process(run, uploaded_folders, tmp_path_factory):
    """Loads both uploaded folders, runs both pipelines and both card snippets in one fresh interpreter."""
    workdir = tmp_path_factory.mktemp("fresh-process")
    assert REPO_ROOT not in workdir.parents
    pixel_values = torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(1))
    save_file({"pixel_values": pixel_values}, workdir / "input.safetensors")
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "HF_HOME": str(workdir / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": "",
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            _FRESH_PROCESS_SCRIPT,
            str(uploaded_folders["segformer_hf"]),
            str(uploaded_folders["transformers"]),
            str(workdir / "input.safetensors"),
            str(workdir / "output.safetensors"),
            REPO_ID,
            str(REPO_ROOT),
        ],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = run.model(pixel_values).logits
    return report, load_file(workdir / "output.safetensors"), expected


def test_fresh_process_really_lacked_segformer_hf(fresh_process):
    report, _, _ = fresh_process
    assert report["blocked"], "the subprocess could import segformer_hf, so the test proves nothing"
    assert report["imported"] == []
    assert report["remote_module"].startswith("transformers_modules."), report["remote_module"]
    assert report["native_module"].startswith("transformers.models.segformer"), report["native_module"]


@pytest.mark.parametrize("format, key", [("segformer_hf", "remote"), ("transformers", "native")])
def test_uploaded_model_gives_the_original_logits(fresh_process, format, key):
    _, logits, expected = fresh_process
    assert expected.std() > 1e-2, "logits nearly constant: the comparison would prove little"
    assert logits[key].dtype == torch.float32
    torch.testing.assert_close(logits[key], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["remote", "native"])
def test_uploaded_model_runs_in_the_segmentation_pipeline_at_the_image_size(fresh_process, key):
    report, _, _ = fresh_process
    result = report["pipelines"][key]
    assert result["labels"] and set(result["labels"]) <= set(ID2LABEL.values())
    assert result["sizes"] == [[70, 50]]  # PIL size: width, height of the 70x50 input
    assert result["partition"], "semantic masks must cover every pixel exactly once"


@pytest.mark.parametrize("key", ["remote", "native"])
def test_card_usage_snippet_runs_against_the_uploaded_folder(fresh_process, key):
    report, _, _ = fresh_process
    printed = report["snippets"][key]
    assert "(48, 40)" in printed  # pipeline masks at the 48x40 image's size
    assert "torch.Size([40, 48])" in printed  # the post-processed label map, (height, width)
    assert any(name in printed for name in ID2LABEL.values())


def test_card_parameter_count_is_the_models_not_the_files_tensor_count(run):
    """BatchNorm statistics are stored with the weights but are not parameters; transformers' own
    SegFormer of the same size is the independent count."""
    reference_config = SegformerConfig(
        hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256, depths=[2, 2, 2, 2], num_labels=3
    )
    with torch.device("meta"):
        reference = SegformerForSemanticSegmentation(reference_config)
    parameters = sum(parameter.numel() for parameter in reference.parameters())
    with safe_open(str(run.directory / "model.safetensors"), framework="pt") as weights:
        in_file = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert in_file > parameters == sum(parameter.numel() for parameter in run.model.parameters())
    assert f"{parameters:,} parameters" in build_model_card(run.directory).text
