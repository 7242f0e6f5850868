"""examples/train.py and archlm.training: short runs of a tiny model on a slice of the standard library.

A run trains and writes a complete folder that loads in a fresh process with trust_remote_code; a run killed
with SIGKILL and resumed ends with the weights of an uninterrupted one (through a block-size curriculum);
streaming, json/csv/parquet inputs and LoRA train -> save -> merge work; every bad input stops before any
training step with a message and nothing written.
"""

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, load_script
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

import archlm.train
from archlm import ArchLMConfig, ArchLMForCausalLM, parse_config_overrides
from archlm.training import (
    ArchLMTrainer,
    NonFiniteLossError,
    ThroughputCallback,
    TrainingLogCallback,
    measure_peak_tflops,
    planned_steps,
    split_rows,
    write_json_atomically,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train.py"
TINY = [
    "--max_corpus_mb", "0.15", "--tokenizer_vocab_size", "300", "--block_size", "32",
    "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0",
    "--peak_tflops", "0.05", "--disable_tqdm", "true", "--sample_prompt", "", "--report_to", "none",
]
MODEL_FILES = [
    "model.safetensors", "config.json", "configuration_archlm.py", "modeling_archlm.py", "tokenizer.json",
    "tokenizer_config.json", "generation_config.json", "training_log.json", "loss_curve.png",
]


train_script = load_script(TRAIN_SCRIPT, "archlm_train_script")


def train(*args: str, callbacks=None) -> Path:
    return Path(train_script.main([*TINY, *args], callbacks=callbacks))


def tiny(*args: str) -> list[str]:
    return ["--config_overrides", TINY_MODEL, *args]


def subprocess_env() -> dict:
    # One thread: on a shared 2-core machine, two OpenMP threads per process are several times slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def read_log(folder: Path) -> dict:
    return json.loads((folder / "training_log.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Records(logging.Handler):
    """Collects what examples/train.py logs (the startup report, the sample, the folder)."""

    def __init__(self, logger: str = "train"):
        super().__init__(level=logging.INFO)
        self.messages, self.logger_name = [], logger

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger(self.logger_name)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 30-step run with evaluations, shared by the tests that read its folder and log."""
    with Records() as records:
        output = train(*tiny("--max_steps", "30", "--eval_strategy", "steps", "--eval_steps", "15",
                             "--sample_prompt", "def ", "--sample_max_new_tokens", "8",
                             "--output_dir", str(tmp_path_factory.mktemp("run") / "model")))
    return output, records.text


# ------------------------------------------------------------------------------------------------
# The main path
# ------------------------------------------------------------------------------------------------
def test_loss_falls_and_eval_reports_perplexity(trained):
    log = read_log(trained[0])
    losses = [entry["loss"] for entry in log["steps"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    evals = log["evals"]
    assert [entry["step"] for entry in evals][:2] == [15, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(math.isclose(entry["perplexity"], math.exp(entry["eval_loss"]), rel_tol=1e-6) for entry in evals)


def test_output_folder_is_complete(trained):
    folder = trained[0]
    for name in MODEL_FILES:
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_archlm.ArchLMForCausalLM"
    assert config["use_cache"] is True
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    # the model's vocabulary is the trained tokenizer's, its special ids the tokenizer's
    assert config["vocab_size"] == len(tokenizer["model"]["vocab"]) + len(
        [t for t in tokenizer["added_tokens"] if t["content"] not in tokenizer["model"]["vocab"]])
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 1, 0)
    generation = json.loads((folder / "generation_config.json").read_text())
    # generation stops at the end of a document and at the end of a chat turn (<|im_end|>, id 3)
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([1, 3], 0)


def test_generation_stops_at_the_end_of_a_chat_turn(trained):
    """A model that answers with <|im_end|> stops there, through its saved generation config (was: generated
    <|im_end|> until max_new_tokens; transformers serve's chat answered with finish_reason 'length')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    model = AutoModelForCausalLM.from_pretrained(trained[0], trust_remote_code=True).eval()
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1e4  # it always ends the turn
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=8)
    assert tokenizer.decode(output[0, prompt["input_ids"].shape[1]:]) == "<|im_end|>"


def test_training_log_holds_config_steps_metrics_and_summary(trained):
    log = read_log(trained[0])
    assert log["status"] == "finished"
    assert log["architecture_name"] == ArchLMConfig(**log["config"]).architecture_name == "2L-2H-32D-RoPE-RMS-SwiGLU-PreNorm-MQA"
    assert log["config"]["hidden_size"] == 32 and log["parameters"] > 0 and log["flops_per_token"] > 0
    for entry in log["steps"]:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "peak_memory_mb", "block_size"} <= set(entry)
        assert entry["tokens_per_second"] > 0 and 0 < entry["mfu"] and entry["block_size"] == 32
    assert log["steps"][-1]["num_input_tokens_seen"] == 30 * 4 * 32  # no padding in packed blocks
    summary = log["summary"]
    assert summary["global_step"] == 30 and summary["eval_loss"] == log["evals"][-1]["eval_loss"]
    assert summary["perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert summary["tokens_per_second"] > 0 and summary["mfu"] > 0 and summary["peak_memory_mb"] > 0
    assert not list(trained[0].glob(".training_log.json*"))  # no temporary file left behind


def test_startup_report_and_sample(trained):
    report = trained[1]
    for expected in ("architecture  2L-2H-32D-RoPE-RMS-SwiGLU-PreNorm-MQA", "parameters", "FLOPs/token",
                     "standard library", "tokens) /", "steps         30 (--max_steps;", "peak 0.05 TFLOP/s, given",
                     "Sample (prompt 'def '):\ndef ", "Model folder: " + str(trained[0].resolve())):
        assert expected in report, expected


def test_folder_loads_in_a_fresh_process_with_remote_code_and_generates(trained, tmp_path):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert 'archlm' not in sys.modules, 'loaded the installed package instead of the remote code'\n"
        "inputs = tokenizer('def ', return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)\n"
        "print(type(model).__module__, out.shape[1] - inputs['input_ids'].shape[1])\n"
    )
    env = {**subprocess_env(), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code, str(trained[0])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, new_tokens = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and new_tokens == "6"


def test_total_steps_come_from_data_epochs_and_batch(tmp_path):
    with Records() as records:
        train(*tiny("--num_train_epochs", "2", "--max_train_samples", "22", "--gradient_accumulation_steps", "2",
                    "--output_dir", str(tmp_path / "out")))
    # 22 blocks / 4 per batch -> 6 batches -> 3 steps of 2 accumulated batches per epoch; 2 epochs
    assert "steps         6 = 22 blocks x 2 epochs / 8 blocks per step" in records.text
    assert read_log(tmp_path / "out")["summary"]["global_step"] == 6


@pytest.mark.parametrize("entry", [[str(TRAIN_SCRIPT)], ["-m", "archlm.train"]], ids=["examples-script", "module"])
def test_help_works_and_the_script_opens_with_its_command(entry):
    result = subprocess.run([sys.executable, *entry, "--help"], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--preset", "--config_overrides", "--block_size_schedule", "--lora_r", "--peak_tflops",
                 "--streaming", "--resume_from_checkpoint", "--report_to"):
        assert flag in result.stdout
    assert "python examples/train.py --preset llama" in train_script.__doc__.split("\n\n")[1]
    assert "python -m archlm.train --preset llama" in archlm.train.__doc__.split("\n\n")[1]


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
    # the run's mean loss covers all 12 steps, not only the 7 after the resume
    assert resumed_log["summary"]["train_loss"] == pytest.approx(reference_log["summary"]["train_loss"], abs=1e-5)


def test_curriculum_cuts_each_batch_into_rows_of_the_scheduled_size(tmp_path):
    from transformers import TrainingArguments

    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ArchLMTrainer(model=ArchLMForCausalLM(config), args=args, block_size_schedule=[(0, 8), (3, 16)])
    batch = {key: torch.arange(32).view(2, 16) for key in ("input_ids", "labels", "attention_mask")}
    trainer.state.global_step = 2
    samples, items = trainer.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert len(samples) == 2 and samples[0]["input_ids"].shape == (4, 8)
    assert samples[0]["input_ids"][1].tolist() == list(range(8, 16))
    assert int(items) == 2 * 4 * 7  # predicted tokens of rows of 8
    trainer.state.global_step = 3
    samples, items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert samples[0]["input_ids"].shape == (2, 16) and int(items) == 2 * 15


@pytest.mark.parametrize("accumulation", [1, 2])
def test_routing_bias_moves_once_per_optimizer_step_from_every_micro_batch(tmp_path, accumulation):
    """ArchLMTrainer adds RouterBiasCallback by itself for router_bias_update_rate > 0. With biases that send every
    token to expert 2 (one of its top-2) and never to expert 0, each optimizer step lowers expert 2's bias and
    raises expert 0's by exactly the rate: 3 steps, 3 x the rate, with or without gradient accumulation (one
    update per step, from all its micro-batches)."""
    from transformers import TrainingArguments

    rate = 0.01
    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_experts=4,
                          moe_intermediate_size=8, router_bias_update_rate=rate)
    model = ArchLMForCausalLM(config)
    block = model.model.layers[0].mlp
    block.e_score_correction_bias.copy_(torch.tensor([-10.0, 0.0, 10.0, 0.0]))  # beyond any probability
    data = Dataset.from_dict({"input_ids": torch.randint(0, 50, (24, 8)).tolist()}).map(
        lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=0.0,
                             per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation,
                             max_steps=3, save_strategy="no", disable_tqdm=True)
    chosen = []
    block.register_forward_hook(lambda module, inputs, output: chosen.append(module.choose(output[1])[1]))
    ArchLMTrainer(model=model, args=args, train_dataset=data).train()
    picked = torch.cat(chosen).reshape(-1)
    assert (picked == 2).sum() == picked.numel() // 2 and not (picked == 0).any()  # the router's fixed choice
    torch.testing.assert_close(block.e_score_correction_bias[[0, 2]], torch.tensor([-10 + 3 * rate, 10 - 3 * rate]))


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


def test_evaluation_of_a_mixture_reports_the_cross_entropy_alone(tmp_path):
    """Training adds the load-balancing and router z-losses (router logits on); eval_loss (and so perplexity and
    nats/char, compared across architectures) is the cross-entropy alone, as for a dense model."""
    from transformers import TrainingArguments

    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
                          moe_intermediate_size=8, output_router_logits=True, router_aux_loss_coef=0.5,
                          router_z_loss_coef=0.1)
    model = ArchLMForCausalLM(config).eval()
    ids = torch.randint(0, 50, (4, 8))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4,
                             disable_tqdm=True)
    eval_loss = ArchLMTrainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]
    with torch.no_grad():
        with_router_losses = model(input_ids=ids, labels=ids).loss.item()
        cross_entropy = model(input_ids=ids, labels=ids, output_router_logits=False).loss.item()
    assert with_router_losses > cross_entropy + 0.5  # 0.5 x aux (>= 2 for top-2) + the z-loss
    assert eval_loss == pytest.approx(cross_entropy, abs=1e-6)
    assert model.config.output_router_logits is True  # evaluation leaves the model's config as it was


def test_lora_leaves_the_routing_biases_of_its_frozen_base_alone(tmp_path):
    """The routing biases belong to the base model, which LoRA freezes: an adapter saved without them must
    reproduce what was trained, so ArchLMTrainer moves them only when the whole model trains."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_experts=4,
                          moe_intermediate_size=8, router_bias_update_rate=0.01)
    model = ArchLMForCausalLM(config)
    model.model.layers[0].mlp.e_score_correction_bias.copy_(torch.tensor([-10.0, 0.0, 10.0, 0.0]))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    data = Dataset.from_dict({"input_ids": torch.randint(0, 50, (8, 8)).tolist()}).map(
        lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=2, save_strategy="no", disable_tqdm=True)
    ArchLMTrainer(model=peft_model, args=args, train_dataset=data).train()
    torch.testing.assert_close(model.model.layers[0].mlp.e_score_correction_bias, torch.tensor([-10.0, 0.0, 10.0, 0.0]))


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["none", "reentrant", "non-reentrant"])
def test_routed_tokens_are_counted_once_under_gradient_checkpointing(checkpointing):
    """A reentrant checkpoint runs each block's forward again inside the backward pass: not counted twice."""
    from archlm.routing import RouterStatsCallback

    config = ArchLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
                          moe_intermediate_size=8)
    model = ArchLMForCausalLM(config).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    stats = RouterStatsCallback(model)
    stats.on_train_begin(None, None, None)
    ids = torch.randint(0, 50, (3, 8))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    stats.on_train_end(None, None, None)
    assert [sum(layer) for layer in stats.metrics()["expert_tokens"]] == [3 * 8 * 2] * 2  # tokens x top-2


# ------------------------------------------------------------------------------------------------
# Streaming and file formats
# ------------------------------------------------------------------------------------------------
def test_streaming_run_trains_and_writes_the_folder(tmp_path):
    output = train(*tiny("--streaming", "--max_steps", "4", "--max_eval_samples", "4", "--output_dir", str(tmp_path / "out")))
    log = read_log(output)
    assert log["summary"]["global_step"] == 4 and log["train_blocks"] is None and log["evals"]
    for name in MODEL_FILES:
        assert (output / name).is_file(), name


@pytest.mark.parametrize("extension", ["jsonl", "csv", "parquet"])
def test_trains_on_json_csv_and_parquet_files(tmp_path, extension):
    from archlm.data import stdlib_source_files

    rows = [{"source": path.read_text(encoding="utf-8"), "name": path.name} for path in stdlib_source_files(0.05)]
    path = tmp_path / f"train.{extension}"
    dataset = Dataset.from_list(rows)
    {"jsonl": dataset.to_json, "csv": dataset.to_csv, "parquet": dataset.to_parquet}[extension](str(path))
    output = train(*tiny("--train_file", str(path), "--text_column", "source", "--max_steps", "3",
                         "--output_dir", str(tmp_path / "out")))
    log = read_log(output)
    assert log["summary"]["global_step"] == 3 and f"train.{extension}" in log["data"]


def test_trains_on_text_files_with_a_validation_file(tmp_path):
    from archlm.data import stdlib_source_files

    files = stdlib_source_files(0.06)
    train_text, valid_text = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_text.write_text("".join(path.read_text(encoding="utf-8") for path in files[1:]), encoding="utf-8")
    valid_text.write_text(files[0].read_text(encoding="utf-8"), encoding="utf-8")
    output = train(*tiny("--train_file", str(train_text), "--validation_file", str(valid_text), "--max_steps", "3",
                         "--output_dir", str(tmp_path / "out")))
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(output)(valid_text.read_text(encoding="utf-8"))["input_ids"]) + 1  # + EOS
    log = read_log(output)
    assert log["evals"] and log["validation_blocks"] == tokens // 32  # the whole file, not a carved split


# ------------------------------------------------------------------------------------------------
# LoRA: train -> save -> merge
# ------------------------------------------------------------------------------------------------
def assert_merged_model_is_the_adapter_on_its_base(output: Path, base_folder: Path) -> None:
    """The run's merged model equals its saved adapter loaded onto the base and merged, in a fresh load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), output / "adapter")
    rebuilt = rebuilt.merge_and_unload().eval()
    input_ids = torch.randint(4, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, rebuilt(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_fine_tune_saves_an_adapter_and_a_merged_model(trained, tmp_path):
    base_folder = trained[0]
    base_weights = load_file(base_folder / "model.safetensors")
    output = train("--model_name_or_path", str(base_folder), "--lora_r", "4", "--max_steps", "4",
                   "--learning_rate", "2e-2", "--output_dir", str(tmp_path / "lora"))
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    for name in MODEL_FILES:
        assert (output / name).is_file(), name
    log = read_log(output)
    assert 0 < log["trainable_parameters"] < log["parameters"]

    assert_merged_model_is_the_adapter_on_its_base(output, base_folder)
    merged_weights = load_file(output / "model.safetensors")
    changed = [name for name in base_weights if not torch.equal(base_weights[name], merged_weights[name])]
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in changed)
    assert load_file(base_folder / "model.safetensors").keys() == base_weights.keys()  # the base is untouched


def test_lora_on_a_mixtures_experts_adapts_their_stacked_weights(tmp_path):
    """Expert names in --lora_target_modules reach the stacked (E, out, in) weights through PEFT's
    target_parameters: the merged model changes the attention and expert weights asked for and nothing else (the
    routers stay), and equals the saved adapter merged onto the base in a fresh load."""
    base_folder = train("--preset", "mixtral", "--config_overrides", f"{TINY_MODEL},num_experts=4,moe_intermediate_size=16",
                        "--max_steps", "2", "--output_dir", str(tmp_path / "base"))
    targets = ["--lora_r", "4", "--lora_target_modules", "q_proj,gate_up_proj,down_proj"]
    with pytest.raises(SystemExit, match=r"--lora_dropout 0.1: .*experts' stacked weights \(gate_up_proj, down_proj\)"):
        train("--model_name_or_path", str(base_folder), *targets, "--lora_dropout", "0.1", "--output_dir", str(tmp_path / "x"))
    output = train("--model_name_or_path", str(base_folder), *targets, "--max_steps", "3", "--learning_rate", "2e-2",
                   "--output_dir", str(tmp_path / "lora"))
    base_weights, merged_weights = load_file(base_folder / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {name.split(".")[-1] for name in base_weights if not torch.equal(base_weights[name], merged_weights[name])}
    assert changed == {"weight", "gate_up_proj", "down_proj"}  # q_proj.weight and both expert stacks
    assert [name for name in base_weights if name.endswith(".weight") and ".q_proj." not in name
            and not torch.equal(base_weights[name], merged_weights[name])] == []  # routers, norms, k/v/o untouched

    assert_merged_model_is_the_adapter_on_its_base(output, base_folder)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training step, and nothing written
# ------------------------------------------------------------------------------------------------
def write_file(path: Path, content: bytes | str) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


BAD_INPUTS = {
    "missing file": (lambda d: ["--train_file", str(d / "missing.txt")], "does not exist"),
    "folder without text files": (lambda d: ["--train_file", str(d)], "is a folder with no file of a supported type"),
    "missing tokenizer folder": (lambda d: ["--tokenizer_name", str(d / "no_such_tok")], "no_such_tok': no such folder"),
    "non-utf8 file": (lambda d: ["--train_file", write_file(d / "latin1.txt", "caf\u00e9".encode("latin-1"))], "not UTF-8"),
    "unsupported format": (lambda d: ["--train_file", write_file(d / "data.xml", "<a/>")], "unsupported extension '.xml'"),
    "empty dataset": (lambda d: ["--train_file", write_file(d / "empty.jsonl", "")], "empty"),
    "missing text column": (
        lambda d: ["--train_file", write_file(d / "rows.jsonl", '{"body": "x = 1"}\n'), "--text_column", "content"],
        r"--text_column 'content' is not a column.*\['body'\]"),
    "block larger than the model": (
        lambda d: ["--config_overrides", TINY_MODEL + ",max_position_embeddings=16"],
        "--block_size 32 is larger than the model can take \\(max_position_embeddings=16\\)"),
    "schedule larger than the model": (
        lambda d: ["--config_overrides", TINY_MODEL + ",max_position_embeddings=16", "--block_size_schedule", "8:0,32:5"],
        "larger than the model can take"),
    "streaming without max_steps": (lambda d: ["--streaming"], "--streaming .* needs --max_steps"),
    "override without '='": (lambda d: ["--config_overrides", "num_hidden_layers"], "is not 'field=value'"),
    "unknown override": (lambda d: ["--config_overrides", "hiden_size=64"], "'hiden_size' is not an ArchLMConfig field. Did you mean hidden_size"),
    "override of the wrong type": (lambda d: ["--config_overrides", "hidden_size=wide"], "hidden_size"),
    "override breaking a rule": (lambda d: ["--config_overrides", "hidden_size=64,num_attention_heads=5"], "num_attention_heads"),
    "override with bad JSON": (lambda d: ["--config_overrides", "rope_parameters={rope_theta:1}"], "not valid JSON"),
    "malformed schedule": (lambda d: ["--block_size_schedule", "16-0,32-10"], "--block_size_schedule: entry '16-0'"),
    "schedule not from step 0": (lambda d: ["--block_size_schedule", "16:5,32:10"], "must start at step 0"),
    "schedule and block size disagree": (lambda d: ["--block_size_schedule", "16:0,64:10"], "must equal the largest"),
    "unknown preset": (lambda d: ["--preset", "gpt5"], "--preset 'gpt5' is unknown"),
    "lora without a model": (lambda d: ["--lora_r", "8"], "--lora_r adapts a trained model"),
    "resume without checkpoints": (lambda d: ["--resume_from_checkpoint", "latest"], "no checkpoint"),
    "expert parallelism": (lambda d: ["--preset", "mixtral", "--expert_parallel_size", "2"],
                           "--expert_parallel_size 2: expert parallelism .* GPU.* ZeRO-2/3"),
    "fp16 on a CPU": (lambda d: ["--fp16", "--use_cpu", "true"], "--fp16 mixed precision needs a GPU.*--bf16"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_before_training_and_writes_nothing(tmp_path, case):
    make_args, message = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    output = tmp_path / "out"
    args = make_args(inputs)
    if "--config_overrides" not in args:
        args = tiny(*args)
    with pytest.raises(SystemExit) as error:
        train(*args, "--num_train_epochs", "0.01", "--output_dir", str(output))
    assert str(error.value.code).startswith("train.py: error: ")
    assert __import__("re").search(message, str(error.value.code)), error.value.code
    assert not output.exists()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(trained, tmp_path):
    with pytest.raises(SystemExit, match=r"tokenizer has 300 tokens but the model's vocab_size is 100"):
        train("--tokenizer_name", str(trained[0]), "--config_overrides", TINY_MODEL + ",vocab_size=100",
              "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fine_tuning_with_overrides_that_change_weight_shapes_is_refused_by_name(trained, tmp_path):
    with pytest.raises(SystemExit, match=r"hidden_size=128.*change the shapes of the weights"):
        train("--model_name_or_path", str(trained[0]), "--config_overrides", "hidden_size=128",
              "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("num_hidden_layers=1", r"num_hidden_layers.*\(1\).*layer_types"),  # a preset's check, not a crash at a save
    ('rope_parameters={"rope_type":"linear","rope_theta":10000.0}', r"factor"),
    ("attention_bias=True", r"attention_bias=True.*change which tensors make up the weights.*bias"),
    ("norm_eps=0.0", r"norm_eps"),
], ids=["fewer-layers", "rope-without-factor", "new-biases", "zero-eps"])
def test_fine_tuning_overrides_get_every_check_before_training(trained, tmp_path, override, message):
    with pytest.raises(SystemExit, match=message):
        train("--model_name_or_path", str(trained[0]), "--config_overrides", override, "--max_steps", "2",
              "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_native_transformers_folder_to_fine_tune_is_pointed_to_the_converter(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit, match=r"is a LlamaConfig, not an ArchLM model: convert it first.*--from-transformers"):
        train("--model_name_or_path", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "out"))


def test_a_lora_resume_with_other_adapters_is_refused_by_flag_and_leaves_the_finished_log(trained, tmp_path):
    flags = ["--model_name_or_path", str(trained[0]), "--lora_r", "4", "--max_steps", "4", "--save_steps", "2",
             "--output_dir", str(tmp_path / "lora")]
    output = train(*flags)
    finished = (output / "training_log.json").read_bytes()
    for changed, flag in ((["--lora_r", "8"], "--lora_r"), (["--lora_target_modules", "q_proj"], "--lora_target_modules")):
        with pytest.raises(SystemExit, match=f"holds other LoRA adapters than the flags build .*\\({flag}\\)"):
            train(*flags, *changed, "--resume_from_checkpoint", str(output / "checkpoint-2"))
    assert (output / "training_log.json").read_bytes() == finished


def test_a_resume_that_fails_before_training_leaves_the_log_as_it_was(trained, tmp_path):
    """(here: the optimizer state of AdamW does not load into Muon's; the log was overwritten with an empty one)"""
    flags = ["--config_overrides", TINY_MODEL, "--max_steps", "4", "--save_steps", "2",
             "--output_dir", str(tmp_path / "run")]
    output = train(*flags)
    finished = (output / "training_log.json").read_bytes()
    with pytest.raises(BaseException):  # noqa: B017 (whatever the optimizer's loader raises)
        train(*flags, "--optim", "muon", "--resume_from_checkpoint", str(output / "checkpoint-2"))
    assert (output / "training_log.json").read_bytes() == finished


def test_fine_tuning_refuses_to_drop_learned_routing_biases(tmp_path):
    base = train("--preset", "mixtral", "--config_overrides",
                 f"{TINY_MODEL},num_experts=4,moe_intermediate_size=16,router_bias_update_rate=0.01",
                 "--max_steps", "2", "--output_dir", str(tmp_path / "base"))
    with pytest.raises(SystemExit, match=r"router_bias_update_rate=0 would drop the routing biases"):
        train("--model_name_or_path", str(base), "--config_overrides", "router_bias_update_rate=0",
              "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lora_target_that_does_not_exist_lists_the_linear_layers(trained, tmp_path):
    with pytest.raises(SystemExit, match=r"\['nope'\] are not modules.*'q_proj'"):
        train("--model_name_or_path", str(trained[0]), "--lora_r", "4", "--lora_target_modules", "q_proj,nope",
              "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_a_run_is_not_overwritten_by_accident(trained):
    before = (trained[0] / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="already holds a run.*--overwrite_output_dir"):
        train(*tiny("--max_steps", "2", "--output_dir", str(trained[0])))
    assert (trained[0] / "model.safetensors").stat().st_mtime_ns == before


def test_overwrite_output_dir_starts_over(tmp_path):
    output = tmp_path / "out"
    train(*tiny("--max_steps", "2", "--save_steps", "1", "--output_dir", str(output)))
    assert (output / "checkpoint-2").is_dir()
    train(*tiny("--max_steps", "1", "--output_dir", str(output), "--overwrite_output_dir"))
    assert not (output / "checkpoint-2").exists()  # the old run's checkpoints are gone
    assert read_log(output)["summary"]["global_step"] == 1


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def test_config_overrides_parse_typed_values():
    overrides = parse_config_overrides(
        'num_hidden_layers=4, hidden_act=gelu, qk_norm=true, sliding_window=null, norm_eps=1e-6, '
        'rope_parameters={"rope_type": "default", "rope_theta": 10000}'
    )
    assert overrides == {"num_hidden_layers": 4, "hidden_act": "gelu", "qk_norm": True, "sliding_window": None,
                         "norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000}}
    assert parse_config_overrides("") == {} and parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match="sets 'hidden_size' twice"):
        parse_config_overrides("hidden_size=64,hidden_size=32")


def test_split_rows_cuts_blocks_into_consecutive_rows():
    batch = {"input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6), "other": "kept"}
    rows = split_rows(batch, 3)
    assert rows["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]] and rows["other"] == "kept"


def test_planned_steps_match_the_trainer_rule(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3,
                             num_train_epochs=2.5, use_cpu=True, report_to="none")
    assert planned_steps(100, args) == (9, 23)  # 25 batches -> ceil(25 / 3) = 9 steps per epoch
    args.max_steps = 7
    assert planned_steps(100, args) == (9, 7) and planned_steps(None, args) == (None, 7)


def test_peak_tflops_probe_measures_a_positive_rate():
    assert 0 < measure_peak_tflops(torch.device("cpu"), seconds=0.05) < 1000


def test_training_log_is_written_atomically(tmp_path):
    path = tmp_path / "training_log.json"
    write_json_atomically(path, {"loss": float("nan"), "steps": [1, 2]})
    assert json.loads(path.read_text()) == {"loss": None, "steps": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_log.json"]


def test_throughput_and_log_callbacks_report_rates_and_perplexity(tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState()
    throughput = ThroughputCallback(lambda block: 1e6, 1e9, torch.device("cpu"), lambda step: 64)
    throughput.on_train_begin(args, state, None)
    throughput.on_step_begin(args, state, None)
    time.sleep(0.05)
    throughput.on_step_end(args, state, None)
    state.num_input_tokens_seen, state.global_step = 1000, 1
    metrics = throughput.metrics(args, state)
    assert 0 < metrics["tokens_per_second"] <= 1000 / 0.05
    assert metrics["mfu"] == pytest.approx(metrics["tokens_per_second"] * 1e6 / 1e9, rel=1e-3)
    state.log_history = [{"loss": 3.0, "step": 1, **metrics}, {"eval_loss": 2.0, "step": 1}]
    log = TrainingLogCallback(str(tmp_path), {"architecture_name": "x"})
    log.on_log(args, state, None)
    written = read_log(tmp_path)
    assert written["status"] == "running" and written["evals"][0]["perplexity"] == pytest.approx(math.exp(2.0))


def test_a_long_training_log_is_written_at_evaluations_checkpoints_and_the_end_and_less_often_between(tmp_path):
    """Each write is the whole file (4,000 logged steps: ~1 MB, ~50 ms), so right after one the next plain log is
    held back; an evaluation, a checkpoint about to be saved and the end of the run are written at once."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(log_history=[{"loss": 3.0, "learning_rate": 1e-3, "grad_norm": 1.0, "step": step}
                                      for step in range(1, 4001)])
    log, control = TrainingLogCallback(str(tmp_path), {"architecture_name": "x"}), TrainerControl()

    def logged(entry: dict) -> dict:
        state.log_history.append(entry)
        log.on_log(args, state, control, logs=entry)
        return read_log(tmp_path)

    assert len(logged({"loss": 2.9, "step": 4001})["steps"]) == 4001  # the first log is written
    assert len(logged({"loss": 2.8, "step": 4002})["steps"]) == 4001  # held back
    assert len(logged({"eval_loss": 2.0, "step": 4002})["evals"]) == 1  # an evaluation: written
    control.should_save = True
    assert len(logged({"loss": 2.7, "step": 4003})["steps"]) == 4003  # before a checkpoint: written
    control.should_save = False
    assert len(logged({"loss": 2.6, "step": 4004})["steps"]) == 4003
    log.finish(args, state, {"global_step": 4004})
    assert read_log(tmp_path)["status"] == "finished" and len(read_log(tmp_path)["steps"]) == 4004


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


def test_a_peak_probed_on_a_busy_machine_is_probed_again_before_mfu_passes_one(tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState()
    # the start-up probe read 1e6 FLOP/s (the machine was busy); this interval achieves ~1e9 x 1e3 tokens/s
    probes = iter([2e12, 1e12])
    throughput = ThroughputCallback(lambda block: 1e6, 1e6, torch.device("cpu"), lambda step: 64,
                                    reprobe=lambda: next(probes))
    throughput.on_train_begin(args, state, None)
    for step in (1, 2):
        throughput.on_step_begin(args, state, None)
        time.sleep(0.01)
        throughput.on_step_end(args, state, None)
        state.num_input_tokens_seen, state.global_step = 1000 * step, step
        metrics = throughput.metrics(args, state)
        assert 0 < metrics["mfu"] < 1
    assert throughput.probes == [1e6, 2e12]  # probed again once; the second interval was not suspicious
    assert throughput.peak_flops == 2e12
    assert throughput.mean_mfu() == pytest.approx(
        sum(rate for rate, _ in throughput.intervals) / 2 * 1e6 / 2e12, rel=1e-6)


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path):
    """`--report_to tensorboard` goes through transformers' own callback: the event files hold the logged loss and
    ArchLM's throughput figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = train(*tiny("--max_steps", "3", "--report_to", "tensorboard", "--output_dir", str(tmp_path / "out")))
    event_files = list(output.rglob("events.out.tfevents.*"))
    assert event_files, f"no tensorboard event file under {output}"
    accumulator = EventAccumulator(str(event_files[0].parent))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert "train/loss" in scalars
    assert any("tokens_per_second" in tag or "mfu" in tag for tag in scalars), sorted(scalars)


def test_report_to_wandb_logs_the_run_offline(tmp_path, monkeypatch):
    """`--report_to wandb` goes through transformers' own callback; offline mode (no network here) writes the run
    to a local file that `wandb sync` would upload."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    train(*tiny("--max_steps", "3", "--report_to", "wandb", "--output_dir", str(tmp_path / "out")))
    wandb.finish()  # in-process the run stays open (a script's exit closes it); closing flushes the file
    runs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    assert b"train/loss" in runs[0].read_bytes()


class LogsSeen(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_mixture_of_experts_logs_the_aux_loss_and_the_tokens_routed_to_each_expert(tmp_path):
    """The mixtral preset trains with the load-balancing loss on (output_router_logits unless overridden), and every
    logged step records it with the tokens each layer's experts received and the imbalance. The per-expert counts go
    to training_log.json only: the other callbacks (the console, TensorBoard) get the scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = LogsSeen()
    out = train("--preset", "mixtral", "--config_overrides", f"{TINY_MODEL},num_experts=4", "--max_steps", "4",
                "--logging_steps", "2", "--report_to", "tensorboard", "--output_dir", str(tmp_path / "moe"),
                callbacks=[seen])
    step_logs = [logs for logs in seen.logs if "loss" in logs]
    assert len(step_logs) == 2 and all("aux_loss" in logs and "expert_imbalance" in logs for logs in step_logs)
    assert not any("expert_tokens" in logs for logs in seen.logs)
    accumulator = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    accumulator.Reload()
    assert {"train/aux_loss", "train/expert_imbalance"} <= set(accumulator.Tags()["scalars"])
    log = read_log(out)
    assert len(log["steps"]) == 2
    assert log["config"]["output_router_logits"] is True and "MoE4x2" in log["architecture_name"]
    tokens_per_interval = 2 * 4 * 32  # steps x batch x block
    for step in log["steps"]:
        assert step["aux_loss"] >= 2 * 0.99  # top-k (2) when perfectly balanced, more otherwise
        assert [sum(layer) for layer in step["expert_tokens"]] == [tokens_per_interval * 2] * 2  # k = 2 per token
        assert step["expert_imbalance"] >= 1.0
    saved = ArchLMForCausalLM.from_pretrained(out).config
    assert saved.num_experts == 4
    assert saved.output_router_logits is False  # inference (each decoding step) computes no load-balancing loss


@pytest.mark.slow  # inductor compiles the decoder layer: ~a minute on 2 CPU cores
@pytest.mark.parametrize("overrides", ["", ",num_experts=4,moe_intermediate_size=32,router_bias_update_rate=0.01"],
                         ids=["dense", "moe"])
def test_torch_compile_trains_the_same_losses_and_records_the_first_step(tmp_path, overrides):
    """--torch_compile (regional: the decoder layer compiled once for all layers) against the eager run, each in a
    process of its own so that dynamo's caches and settings do not reach the other tests. The mixture's routing
    biases, moved by forward hooks on the compiled layers' blocks, end equal."""
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--torch_compile", "true"])):
        command = [sys.executable, str(TRAIN_SCRIPT), *TINY, "--config_overrides", TINY_MODEL + overrides,
                   "--max_steps", "4", "--output_dir", str(tmp_path / name), *flags]
        result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_log(tmp_path / name)
    losses = {name: [step["loss"] for step in log["steps"]] for name, log in runs.items()}
    assert len(losses["compiled"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    summary = runs["compiled"]["summary"]
    assert summary["first_step_seconds"] > summary["median_step_seconds"] > 0  # the compilation is in the first
    biases = {name: {key: value for key, value in load_file(tmp_path / name / "model.safetensors").items()
                     if key.endswith("e_score_correction_bias")} for name in runs}
    assert len(biases["compiled"]) == (2 if "router_bias" in overrides else 0)
    for key, bias in biases["eager"].items():
        assert bias.abs().max() > 0
        torch.testing.assert_close(biases["compiled"][key], bias)


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
