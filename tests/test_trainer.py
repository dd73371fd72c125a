"""transformers' Trainer route: a few steps on the demo data, evaluated to the same mean IoU as the package's own
evaluation engine, never holding the split's logits, then saved and loaded back."""

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import seed_worker

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf.arguments import load_config
from segformer_hf.data import (
    SignalSafeForkContext,
    eval_dataloader_for,
    ignore_termination_signals,
    load_training_data,
)
from segformer_hf.evaluation import evaluate_model
from segformer_hf.hf_trainer import (
    AugmentationEpochCallback,
    SignalSafeTrainer,
    data_collator,
    mean_iou_metrics,
    preprocess_logits_for_metrics,
    trainer_datasets,
)

STEPS = 5  # 8 samples in batches of 2: the fifth step is in the second epoch


@pytest.fixture(scope="module")
def config():
    return load_config(
        "demo",
        {
            "crop_size": [64, 64],
            "img_scale": [120, 90],
            "max_train_samples": 8,
            "max_eval_samples": 4,
            "dataloader_num_workers": 0,
            "seed": 0,
        },
    )


def _arguments(output_dir, batch_eval_metrics: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        remove_unused_columns=False,  # the transforms read the raw image/label columns
        batch_eval_metrics=batch_eval_metrics,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )


class Spy:
    """Records the shape and type of what Trainer hands to compute_metrics."""

    def __init__(self, compute_metrics):
        self.compute_metrics, self.calls = compute_metrics, []

    def __call__(self, prediction, compute_result=True):
        predictions = prediction.predictions
        self.calls.append((tuple(predictions.shape), str(predictions.dtype)))
        return self.compute_metrics(prediction, compute_result=compute_result)


@pytest.mark.parametrize("batch_eval_metrics", [True, False])
def test_trainer_trains_evaluates_like_evaluate_model_without_keeping_logits_and_saves(
    tmp_path, config, batch_eval_metrics
):
    data = trainer_datasets(config)
    num_labels = len(data.id2label)
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(
        SegformerHFConfig.from_variant(
            "b0", num_labels=num_labels, semantic_loss_ignore_index=config.ignore_index
        )
    )
    spy = Spy(mean_iou_metrics(num_labels, config.ignore_index))
    trainer = Trainer(
        model=model,
        args=_arguments(tmp_path / "trainer", batch_eval_metrics),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data_collator,
        compute_metrics=spy,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[AugmentationEpochCallback(data.train_transform)],
    )
    trained = trainer.train()
    assert trained.global_step == STEPS and np.isfinite(trained.training_loss)
    assert data.train_transform.epoch == 1  # the callback moved the augmentation to the second epoch

    metrics = trainer.evaluate()
    # Label maps at the labels' resolution (180x240 demo frames), as int16: never (N, K, H, W) logits.
    expected_calls = (
        [((2, 180, 240), "torch.int16")] * 2 if batch_eval_metrics else [((4, 180, 240), "int16")]
    )
    assert spy.calls == expected_calls

    _, validation, _ = load_training_data(config)
    reference = evaluate_model(
        trainer.model,
        eval_dataloader_for(config, validation, num_labels),
        num_labels,
        config.ignore_index,
        config.inference_protocol(),
    )
    assert 0 < reference["mean_iou"] < 1
    assert metrics["eval_mean_iou"] == pytest.approx(reference["mean_iou"], abs=1e-6)
    assert metrics["eval_overall_accuracy"] == pytest.approx(reference["overall_accuracy"], abs=1e-6)
    assert metrics["eval_per_category_iou"] == pytest.approx(
        reference["per_category_iou"], abs=1e-6, nan_ok=True
    )

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = SegformerHFForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    saved_state, trained_state = reloaded.state_dict(), trainer.model.state_dict()
    assert saved_state.keys() == trained_state.keys()
    assert all(torch.equal(saved_state[key], trained_state[key].cpu()) for key in saved_state)
    pixel_values = data_collator([data.validation[0]])["pixel_values"]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixel_values).logits, trainer.model(pixel_values=pixel_values).logits
        )


def test_logits_become_int16_label_maps_at_the_labels_size():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, :, 0] = 5.0  # class 0 on the left half
    logits[0, 2, :, 1] = 5.0  # class 2 on the right half
    labels = torch.zeros(1, 4, 6, dtype=torch.long)
    maps = preprocess_logits_for_metrics((logits,), labels)
    assert maps.dtype == torch.int16 and maps.shape == (1, 4, 6)
    assert (maps[0, :, :2] == 0).all() and (maps[0, :, -2:] == 2).all()


def test_trainer_padding_is_ignored_by_the_metric():
    from transformers import EvalPrediction

    compute = mean_iou_metrics(2, 255)
    predictions = np.array([[[0, 1, -100]]], dtype=np.int16)
    labels = np.array([[[0, 1, -100]]])
    assert compute(EvalPrediction(predictions=predictions, label_ids=labels))["mean_iou"] == 1.0


def test_collator_refuses_samples_of_different_sizes_with_the_fix():
    small = {"pixel_values": torch.zeros(3, 4, 4), "labels": torch.zeros(4, 4)}
    large = {"pixel_values": torch.zeros(3, 8, 8), "labels": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match="per_device_eval_batch_size=1"):
        data_collator([small, large])
    assert set(data_collator([small, small])) == {"pixel_values", "labels"}


def test_the_documented_trainer_snippet_runs(tmp_path, monkeypatch):
    """docs/training.md's snippet, run as written on a smaller demo recipe (the one change: the overrides)."""
    section = (REPO_ROOT / "docs" / "training.md").read_text().split("## With transformers' Trainer", 1)[1]
    [snippet] = re.findall(r"```python\n(.*?)\n```", section.split("\n## ", 1)[0], flags=re.S)
    small = snippet.replace('load_config("demo")', f'load_config("demo", {SMALL_DEMO!r})')
    assert small != snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(small, "docs/training.md", "exec"), {})
    reloaded = SegformerHFForSemanticSegmentation.from_pretrained(tmp_path / "outputs" / "trainer-demo")
    assert reloaded.config.num_labels == 11


SMALL_DEMO = {
    "max_train_steps": 2,
    "eval_steps": 1,
    "crop_size": [64, 64],
    "img_scale": [120, 90],
    "max_train_samples": 4,
    "max_eval_samples": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "dataloader_num_workers": 0,
}


def test_sigterm_to_the_process_group_saves_a_trainer_checkpoint_that_resumes(tmp_path):
    """The documented snippet with 2 DataLoader workers, stopped as Slurm, Kubernetes or `timeout` stop a job
    (SIGTERM to the whole process group): it saves checkpoint-N, exits cleanly, and continues from there."""
    section = (REPO_ROOT / "docs" / "training.md").read_text().split("## With transformers' Trainer", 1)[1]
    [snippet] = re.findall(r"```python\n(.*?)\n```", section.split("\n## ", 1)[0], flags=re.S)
    long_run = {**SMALL_DEMO, "max_train_steps": 60, "eval_steps": 1000, "dataloader_num_workers": 2}
    script = tmp_path / "train_with_trainer.py"
    script.write_text(snippet.replace('load_config("demo")', f'load_config("demo", {long_run!r})'))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,  # its own process group, like a job's
    )
    try:
        _wait_for_children(process.pid, 2, timeout=120)  # the workers exist: training is under way
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-3000:]
    output_dir = tmp_path / "outputs" / "trainer-demo"
    [checkpoint] = output_dir.glob("checkpoint-*")
    saved_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 0 < saved_step < 60 and checkpoint.name == f"checkpoint-{saved_step}"
    assert not (output_dir / "model.safetensors").exists(), "an interrupted run skips the final save"

    script.write_text(
        script.read_text().replace("trainer.train()", "trainer.train(resume_from_checkpoint=True)")
    )
    resumed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**environment, "TRANSFORMERS_VERBOSITY": "info"},  # Trainer tells where it resumes at INFO
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(
        rf"Resuming training from checkpoint with epoch \d+ and global step {saved_step}\b", resumed.stderr
    )
    assert SegformerHFForSemanticSegmentation.from_pretrained(output_dir).config.num_labels == 11


def _wait_for_children(pid: int, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"process {pid} did not start {count} DataLoader workers within {timeout} s")


def test_every_loader_of_the_signal_safe_trainer_gets_the_worker_signal_contract(tmp_path, config):
    """Training, evaluation and prediction loaders: the signals are taken in the loader accelerate iterates,
    after Trainer's own seeding of the training workers; a loader without workers is left alone."""
    data = trainer_datasets(config)
    model = SegformerHFForSemanticSegmentation(SegformerHFConfig.from_variant("b0", num_labels=11))
    arguments = _arguments(tmp_path / "trainer", batch_eval_metrics=True)
    arguments.dataloader_num_workers = 2
    trainer = SignalSafeTrainer(
        model=model, args=arguments, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=data_collator,
    )  # fmt: skip
    forked = multiprocessing.get_start_method(allow_none=True) in (None, "fork")
    loaders = {
        "train": trainer.get_train_dataloader(),
        "eval": trainer.get_eval_dataloader(),
        "test": trainer.get_test_dataloader(data.validation),
    }
    for name, prepared in loaders.items():
        loader = prepared.base_dataloader
        init = loader.worker_init_fn
        if name == "train":  # Trainer seeds its training workers first; that stays
            assert init.args[0].func is seed_worker and init.args[1] is ignore_termination_signals, name
        else:
            assert init is ignore_termination_signals, name
        assert isinstance(loader.multiprocessing_context, SignalSafeForkContext) == forked, name
    assert trainer.stop_on_signal in trainer.callback_handler.callbacks

    arguments.dataloader_num_workers = 0
    without_workers = trainer.get_eval_dataloader().base_dataloader
    assert without_workers.worker_init_fn is None and without_workers.multiprocessing_context is None


def test_signal_handlers_are_restored_when_training_raises(tmp_path, config):
    """Trainer skips on_train_end when train() raises: Ctrl-C must still interrupt afterwards."""
    data = trainer_datasets(config)
    model = SegformerHFForSemanticSegmentation(SegformerHFConfig.from_variant("b0", num_labels=11))

    def broken_collator(samples):
        raise RuntimeError("broken batch")

    trainer = SignalSafeTrainer(
        model=model, args=_arguments(tmp_path / "trainer", batch_eval_metrics=True),
        train_dataset=data.train, data_collator=broken_collator,
    )  # fmt: skip
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="broken batch"):
        trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resume_true_passes_over_a_checkpoint_whose_save_was_cut_off(tmp_path, config, caplog):
    """A job killed while Trainer wrote checkpoint-N leaves it without trainer_state.json (written last):
    resume_from_checkpoint=True must continue from the newest complete one instead of failing on it."""
    data = trainer_datasets(config)
    arguments = _arguments(tmp_path / "trainer", batch_eval_metrics=True)
    arguments.save_strategy, arguments.save_steps, arguments.max_steps = "steps", 1, 2

    class StartingStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.step = state.global_step

    def model() -> SegformerHFForSemanticSegmentation:
        return SegformerHFForSemanticSegmentation(
            SegformerHFConfig.from_variant(
                "b0", num_labels=11, semantic_loss_ignore_index=config.ignore_index
            )
        )

    def trainer() -> SignalSafeTrainer:
        return SignalSafeTrainer(
            model=model(), args=arguments, train_dataset=data.train, data_collator=data_collator
        )

    trainer().train()
    output_dir = tmp_path / "trainer"
    (output_dir / "checkpoint-2" / "trainer_state.json").unlink()  # the save of step 2 was cut off
    with pytest.raises(FileNotFoundError):  # what a plain Trainer does with it
        Trainer(model=model(), args=arguments, train_dataset=data.train, data_collator=data_collator).train(
            resume_from_checkpoint=True
        )

    arguments.max_steps = 3
    resumed, starting = trainer(), StartingStep()
    resumed.add_callback(starting)
    with caplog.at_level(logging.WARNING, logger="segformer_hf.hf_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert starting.step == 1
    assert (
        "Resuming from checkpoint-1: the newer checkpoint-2 lack a readable trainer_state.json" in caplog.text
    )
    assert resumed.state.global_step == 3
