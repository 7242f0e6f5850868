"""examples/train.py when a run is interrupted or fails: a SIGTERM ends it with its log saying so; a run killed with
SIGKILL and resumed ends with the weights of an uninterrupted one (through a block-size curriculum); a non-finite
loss or gradient stops it before the update; a checkpoint save that fails half-way leaves the previous one to resume
from; a DeepSpeed checkpoint is not resumed without DeepSpeed."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from datasets import Dataset
from safetensors.torch import load_file
from train_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    TINY,
    TRAIN_SCRIPT,
    Records,
    one_thread,
    read_log,
    subprocess_env,
    tiny,
    train,
    train_script,
)
from transformers import TrainerCallback

import archlm.train
from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.training import ArchLMTrainer, NonFiniteLossError


# ------------------------------------------------------------------------------------------------
# Resume after SIGKILL, through a curriculum
# ------------------------------------------------------------------------------------------------
PAUSING_WRAPPER = """
import importlib.util, sys, time
from transformers import TrainerCallback

class PauseAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            open({marker!r}, "w").close()
            time.sleep(600)  # killed here with SIGKILL

spec = importlib.util.spec_from_file_location("train", {script!r})
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.main(sys.argv[1:], callbacks=[PauseAtStep()])
"""


def signal_a_paused_run(tmp_path, step: int, args: list[str], signum: int) -> subprocess.Popen:
    """Runs train.py with `args` in a subprocess paused at the end of `step` (PAUSING_WRAPPER), sends it `signum`
    there and waits for it to end; the finished process (its returncode and output) is returned."""
    marker, wrapper = tmp_path / "paused", tmp_path / "pausing_train.py"
    wrapper.write_text(PAUSING_WRAPPER.format(step=step, marker=str(marker), script=str(TRAIN_SCRIPT)))
    process = subprocess.Popen([sys.executable, str(wrapper), *args], env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"the run never reached step {step}"
            time.sleep(0.1)
        os.kill(process.pid, signum)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process


def test_sigterm_stops_the_run_with_its_log_saying_so(tmp_path):
    """A scheduler's preemption (SIGTERM) ends the run as Ctrl+C does: the log says "stopped" and where (it said
    "running" for ever), the exit status is 143."""
    output = tmp_path / "run"
    process = signal_a_paused_run(tmp_path, 3, [*TINY, *tiny("--max_steps", "8", "--output_dir", str(output))],
                                  signal.SIGTERM)
    assert process.returncode == 143, process.stdout.read()[-3000:]
    log = read_log(output)
    assert log["status"] == "stopped" and log["stopped"] == "interrupted at step 3: Terminated SIGTERM"
    # (paused in on_step_end, before step 3 is logged)
    assert [entry["step"] for entry in log["steps"]] == [1, 2] and (output / "loss_curve.png").is_file()


def test_resume_after_sigkill_equals_an_uninterrupted_run_through_a_curriculum(tmp_path):
    args = [*TINY, *tiny("--max_steps", "12", "--save_steps", "5", "--block_size_schedule", "16:0,32:7",
                         "--data_seed", "3")]
    interrupted = tmp_path / "interrupted"
    process = signal_a_paused_run(tmp_path, 8, [*args, "--output_dir", str(interrupted)], signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert (interrupted / "checkpoint-5").is_dir() and not (interrupted / "checkpoint-10").exists()
    assert not (interrupted / "model.safetensors").exists()

    # a run killed while saving leaves a newer checkpoint without trainer_state.json (written last): skipped; one
    # killed while writing its log, the log's temporary file: removed
    (interrupted / ".training_log.json.12345.tmp").write_text("{")
    (interrupted / "checkpoint-10").mkdir()
    (interrupted / "checkpoint-10" / "config.json").write_text((interrupted / "checkpoint-5" / "config.json").read_text())
    # resuming with flags that build another architecture (a forgotten override) is refused, nothing trained
    with pytest.raises(SystemExit, match="another architecture.*sliding_window: checkpoint None, these flags 8"):
        train_script.main([*args, "--config_overrides", TINY_MODEL + ",sliding_window=8", "--output_dir",
                           str(interrupted), "--resume_from_checkpoint", "latest"])
    with Records("archlm.training") as records:
        Path(train_script.main([*args, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"]))
    assert "Skipping incomplete checkpoint(s)" in records.text and "checkpoint-10" in records.text
    assert not list(interrupted.glob(".training_log.json.*"))
    uninterrupted = Path(train_script.main([*args, "--output_dir", str(tmp_path / "uninterrupted")]))

    resumed_weights, reference_weights = load_file(interrupted / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    resumed_log, reference_log = read_log(interrupted), read_log(uninterrupted)
    assert [entry["step"] for entry in resumed_log["steps"]] == list(range(1, 13))
    assert [entry["block_size"] for entry in resumed_log["steps"]] == [16] * 7 + [32] * 5
    assert [entry["block_size"] for entry in reference_log["steps"]] == [16] * 7 + [32] * 5
    for resumed, reference in zip(resumed_log["steps"], reference_log["steps"]):
        assert resumed["loss"] == pytest.approx(reference["loss"], abs=1e-5)
        assert resumed["num_input_tokens_seen"] == reference["num_input_tokens_seen"]
    assert "the checkpoint" in resumed_log["tokenizer"]
    # the run's clock goes on from the checkpoint (loss-vs-time plots): it restarted at 0
    elapsed = [entry["elapsed_seconds"] for entry in resumed_log["steps"]]
    assert elapsed == sorted(elapsed), elapsed
    # the run's mean loss covers all 12 steps, not only the 7 after the resume
    assert resumed_log["summary"]["train_loss"] == pytest.approx(reference_log["summary"]["train_loss"], abs=1e-5)


def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_update(tmp_path):
    """A gradient that overflows in the first micro-batch of step 2 (of 2 accumulated): the loss stays finite, the
    accumulated gradient does not, and the run stops naming step 2 before its optimizer step moves a weight."""
    from transformers import TrainingArguments

    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = ArchLMForCausalLM(config)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 50, (16, 8)).tolist()}).map(
        lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=4, save_strategy="no", disable_tqdm=True)
    backwards = []

    def overflow_the_third(grad):  # micro-batches 1-2 make step 1; the third is step 2's first
        backwards.append(1)
        return torch.full_like(grad, float("inf")) if len(backwards) == 3 else grad

    model.model.norm.weight.register_hook(overflow_the_third)
    trainer = ArchLMTrainer(model=model, args=args, train_dataset=data)
    before = {}
    trainer.add_callback(type("Keep", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: before.update(
        {name: param.detach().clone() for name, param in model.named_parameters()})})())
    with pytest.raises(NonFiniteLossError, match="the gradient norm of step 2 is inf"):
        trainer.train()
    assert len(backwards) == 4 and trainer.state.global_step == 1
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # step 2 changed nothing


def test_a_run_that_dies_of_an_exception_leaves_every_logged_step_in_its_log(tmp_path):
    """Between checkpoints the log may lag the run by a few logs: an exception (Ctrl+C here) writes it first, saying
    the run stopped and why. The file is removed just before the interrupt, so only that last write can hold the 4
    steps."""
    from transformers import TrainerCallback

    class InterruptAtStep4(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 4 and "loss" in (logs or {}):
                (tmp_path / "run" / "training_log.json").unlink()
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("--config_overrides", TINY_MODEL, "--max_steps", "8", "--output_dir", str(tmp_path / "run"),
              callbacks=[InterruptAtStep4()])
    log = read_log(tmp_path / "run")
    assert [entry["step"] for entry in log["steps"]] == [1, 2, 3, 4]
    assert log["status"] == "stopped" and log["stopped"] == "interrupted at step 4: KeyboardInterrupt"


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_checkpoint_resumes(tmp_path):
    """A learning rate far too high (1e30, after a warm-up from 0): the loss turns NaN at step 3. The run stops
    before that step's update, writes no final model, marks its log, and every checkpoint holds finite weights."""
    output = tmp_path / "model"
    flags = [*tiny("--learning_rate", "1e30", "--warmup_steps", "2", "--save_steps", "1", "--max_steps", "8",
                   "--output_dir", str(output))]
    with pytest.raises(SystemExit, match=r"training stopped: the loss of step 3 is nan .*the model was not saved; "
                                         r"the last checkpoint, checkpoint-2,"):
        train(*flags)
    assert not (output / "model.safetensors").exists()
    log = read_log(output)
    assert log["status"] == "stopped" and "step 3" in log["stopped"] and len(log["steps"]) == 2
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the curve up to the divergence
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        weights = load_file(output / checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint
    # the last good checkpoint resumes: from step 2 (its log and weights), to the same divergence at step 3
    with pytest.raises(SystemExit, match=r"the loss of step 3 is nan .*the last checkpoint, checkpoint-2,"):
        train(*flags[:-1], str(output), "--resume_from_checkpoint", "latest")
    log = read_log(output)
    assert [step["step"] for step in log["steps"]] == [1, 2] and log["status"] == "stopped"


FAILING_SAVE_RUN = """
import resource, signal, sys
from transformers import TrainerCallback
from archlm.train import main

class DiskFullAfter(TrainerCallback):
    # from the end of step 3 on, no file may grow past 1 KiB (the kernel answers EFBIG, as a full disk answers
    # ENOSPC): the checkpoint of step 4 fails half-way
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

main(sys.argv[1:], callbacks=[DiskFullAfter()])
"""


def test_a_deepspeed_checkpoint_resumed_without_deepspeed_is_refused(tmp_path):
    """Its optimizer state is in global_stepN/, where the Trainer does not look without DeepSpeed: it went on with
    fresh AdamW moments, silently."""
    checkpoint = tmp_path / "run" / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    for resume in ("latest", str(checkpoint)):
        with pytest.raises(ValueError, match=r"was saved by DeepSpeed .*global_step4/.*--deepspeed config"):
            archlm.train.resolve_checkpoint(argparse.Namespace(resume_from_checkpoint=resume,
                                                               output_dir=str(tmp_path / "run")))
    assert archlm.train.resolve_checkpoint(argparse.Namespace(
        resume_from_checkpoint="latest", output_dir=str(tmp_path / "run"), deepspeed="zero2.json")) == str(checkpoint)


def test_a_checkpoint_save_that_fails_half_way_leaves_the_previous_one_latest_and_resumable(tmp_path):
    output, flags = tmp_path / "model", tiny("--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1")
    result = subprocess.run([sys.executable, "-c", FAILING_SAVE_RUN, *TINY, *flags, "--output_dir", str(output)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "File too large" in result.stderr, result.stderr[-2000:]
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()  # kept: the rotation comes after a save
    latest = archlm.train.resolve_checkpoint(argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(output)))
    assert latest == str(output / "checkpoint-2")
    resumed = train(*flags, "--output_dir", str(output), "--resume_from_checkpoint", "latest")
    uninterrupted = train(*flags, "--output_dir", str(tmp_path / "uninterrupted"))
    for name, tensor in load_file(uninterrupted / "model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "model.safetensors")[name], tensor, msg=name)
