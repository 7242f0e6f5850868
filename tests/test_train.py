"""examples/train.py and archlm.training: short runs of a tiny model on a slice of the standard library.

A run trains and writes a complete folder that loads in a fresh process with trust_remote_code; streaming,
json/csv/parquet inputs and LoRA train -> save -> merge work; every bad input stops before any training step with a
message and nothing written. Interrupted and failing runs: test_train_faults.py.
"""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback
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

import archlm.train
from archlm import ArchLMConfig, ArchLMForCausalLM, parse_config_overrides
from archlm.training import (
    ArchLMTrainer,
    ThroughputCallback,
    TrainingLogCallback,
    measure_peak_tflops,
    planned_steps,
    split_rows,
    write_json_atomically,
)

MODEL_FILES = [
    "model.safetensors", "config.json", "configuration_archlm.py", "modeling_archlm.py", "tokenizer.json",
    "tokenizer_config.json", "generation_config.json", "training_log.json", "loss_curve.png",
]


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


def test_a_run_shorter_than_the_default_logging_interval_logs_its_last_step(tmp_path):
    """--max_steps 8 under the default --logging_steps 10 logged nothing: no loss, tokens/s or MFU
    (compare_architectures showed "-")."""
    args = archlm.train.parse_args(["--max_steps", "8", "--output_dir", str(tmp_path)])[-1]
    assert args.logging_steps == 8
    for given in (["--logging_steps", "10"], ["--logging_steps=10"]):
        assert archlm.train.parse_args(["--max_steps", "8", *given, "--output_dir", str(tmp_path)])[-1].logging_steps == 10
    assert archlm.train.parse_args(["--max_steps", "80", "--output_dir", str(tmp_path)])[-1].logging_steps == 10


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
    # the model's own parameters, the adapters apart (PEFT puts them inside its modules: they were counted in)
    assert 0 < log["trainable_parameters"] < log["parameters"] == read_log(base_folder)["parameters"]

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
    "evaluations without validation data": (
        lambda d: ["--validation_split_percentage", "0", "--eval_strategy", "steps", "--load_best_model_at_end", "true"],
        "--eval_strategy steps and --load_best_model_at_end need validation data, and there is none"),
    "unknown weight dtype": (lambda d: ["--dtype", "bf16"], "--dtype 'bf16' is not one of float32, bfloat16"),
    "float16 weights": (lambda d: ["--dtype", "float16"], "without loss scaling: use --fp16 mixed precision"),
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


def test_a_chat_fine_tune_writes_out_the_conversations_with_the_models_own_chat_template(trained, tmp_path):
    """Conversations ({"messages": [...]}, TRL's format) fine-tuning a model folder are written out by that folder's
    tokenizer's template, not ArchLM's default, and train."""
    base = tmp_path / "base"
    shutil.copytree(trained[0], base)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (base / "chat_template.jinja").write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                              "{% if add_generation_prompt %}### assistant:{% endif %}")
    conversation = [{"role": "user", "content": "def f():"}, {"role": "assistant", "content": "    return 1"}]
    chats = write_file(tmp_path / "chats.jsonl", "".join(json.dumps({"messages": conversation}) + "\n" for _ in range(40)))
    flags = ["--model_name_or_path", str(base), "--train_file", chats, "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    run = archlm.train.setup(*archlm.train.parse_args([*TINY, *flags]))
    assert set(run.raw.train["text"]) == {"### user: def f():\n### assistant:     return 1\n"}
    assert read_log(train(*flags))["status"] == "finished"
    # the assistant's turns alone in the loss: the user's turn and the header of the assistant's are masked
    flags += ["--assistant_only_loss", "true", "--output_dir", str(tmp_path / "assistant")]  # (the last one counts)
    run = archlm.train.setup(*archlm.train.parse_args([*TINY, *flags]))
    trained = run.tokenizer.decode([token for block in run.data.train for token, label in zip(block["input_ids"], block["labels"])
                                    if label != -100])
    assert "    return 1\n" in trained and "def f" not in trained and "###" not in trained
    log = read_log(train(*flags))
    assert log["status"] == "finished" and math.isfinite(log["summary"]["eval_loss"])


@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), ("auto", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_a_bfloat16_folder_is_fine_tuned_in_float32_unless_asked(trained, tmp_path, dtype, expected):
    """transformers loads a checkpoint in its own dtype: a bfloat16 folder fine-tuned in pure bfloat16, where the
    optimizer's small updates round away (a norm's weights did not move in 10 steps), without a word."""
    base = tmp_path / "bf16"
    shutil.copytree(trained[0], base)
    ArchLMForCausalLM.from_pretrained(trained[0], dtype=torch.bfloat16).save_pretrained(base)
    flags = ["--model_name_or_path", str(base), "--max_steps", "1", "--output_dir", str(tmp_path / "out")]
    run = archlm.train.setup(*archlm.train.parse_args([*TINY, *flags, *(["--dtype", dtype] if dtype else [])]))
    assert {parameter.dtype for parameter in run.model.parameters()} == {expected}
    if dtype is None:  # LoRA: the frozen weights as the checkpoint holds them, the adapters in float32 (PEFT's)
        run = archlm.train.setup(*archlm.train.parse_args([*TINY, *flags, "--lora_r", "4"]))
        assert {p.dtype for p in run.model.parameters() if not p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in run.model.parameters() if p.requires_grad} == {torch.float32}


def test_load_best_model_at_end_reports_and_saves_the_best_checkpoints_model(tmp_path):
    """The Trainer loads the best checkpoint at the end; the final evaluation was skipped when the last step had
    one, so the summary, the log and the model card gave the last step's loss for the best step's weights. Here the
    "best" is the highest loss (greater_is_better): an early checkpoint."""
    output = train(*tiny("--max_steps", "12", "--eval_strategy", "steps", "--eval_steps", "4", "--save_steps", "4",
                         "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                         "--greater_is_better", "true", "--learning_rate", "3e-3", "--output_dir", str(tmp_path / "run")))
    log = read_log(output)
    losses = {entry["step"]: entry["eval_loss"] for entry in log["evals"][:3]}
    best = max(losses, key=losses.get)
    assert best < 12 and log["summary"]["eval_loss"] == pytest.approx(losses[best], rel=1e-5)
    assert log["summary"]["eval_loss"] != pytest.approx(losses[12], rel=1e-5)


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
    # kept fixed, as ERNIE 4.5 MoE's are (router_choice_bias): they route as learned and no longer move
    fixed = train("--model_name_or_path", str(base), "--config_overrides",
                  "router_bias_update_rate=0,router_choice_bias=true", "--max_steps", "1",
                  "--output_dir", str(tmp_path / "fixed"))
    biases = [{name: buffer for name, buffer in ArchLMForCausalLM.from_pretrained(folder).named_buffers()
               if name.endswith("e_score_correction_bias")} for folder in (base, fixed)]
    assert biases[0].keys() == biases[1].keys() and biases[0]
    assert all(torch.equal(biases[0][name], biases[1][name]) for name in biases[0])


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
    # wandb's own service process writes the file: on a loaded machine its last records may land after finish()
    deadline = time.monotonic() + 60
    while b"train/loss" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
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

