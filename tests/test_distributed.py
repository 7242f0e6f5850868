"""examples/train.py launched on 2 processes: DeepSpeed ZeRO-2/3/3-offload through torchrun and accelerate, DDP
through accelerate (FSDP through accelerate where a GPU is present; accelerate has no FSDP on CPU).

Each run trains a tiny model for a few steps, records its world size and wrapper in training_log.json (a launcher
misconfigured fails silently, as independent single processes), saves, and reloads in a fresh process with every
parameter present. A ZeRO-2 run killed with SIGKILL (torchrun and both ranks) while saving a checkpoint resumes with
--resume_from_checkpoint latest from the newest complete one to the weights of an uninterrupted run. On CPU
DeepSpeed runs with DS_ACCELERATOR=cpu over gloo; its JIT-built ops land in TORCH_EXTENSIONS_DIR (default
build/torch_extensions), so only the first run of a machine builds them.

    .venv/bin/python -m pytest tests/test_distributed.py -q -m distributed
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
# one at a time under pytest-xdist: two 2-process runs at once would put 4 processes on the 2 cores they assume
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_SCRIPT = str(REPO / "examples" / "train.py")
DEEPSPEED = REPO / "examples" / "deepspeed"
ACCELERATE = REPO / "examples" / "accelerate"
TINY = [
    "--max_corpus_mb", "0.15", "--tokenizer_vocab_size", "300", "--block_size", "32",
    "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0",
    "--peak_tflops", "0.05", "--disable_tqdm", "true", "--sample_prompt", "", "--report_to", "none",
    "--ddp_find_unused_parameters", "false", "--save_strategy", "no",
]
HAS_GPU = torch.cuda.device_count() >= 2
WALL_TIMES: dict[str, float] = {}


def env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # 2 processes on 2 cores
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if HAS_GPU else "cpu"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions")),
    }


def run(launcher: list[str], *args: str, name: str, timeout: int = 300) -> str:
    """Runs examples/train.py under `launcher`; fails with the end of its output unless it exits 0."""
    start = time.perf_counter()
    result = subprocess.run([*launcher, TRAIN_SCRIPT, *TINY, *args], cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=timeout)
    WALL_TIMES[name] = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    print(f"{name}: {WALL_TIMES[name]:.1f} s")
    return output


def torchrun(processes: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(29500 + os.getpid() % 1000)]


def accelerate(config: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE / config),
            "--main_process_port", str(29500 + os.getpid() % 1000)]


def read_log(folder: Path) -> dict:
    return json.loads((folder / "training_log.json").read_text())


def check_distributed(folder: Path, distributed_type: str, wrapped_model: str) -> dict:
    summary = read_log(folder)["summary"]
    assert summary["world_size"] == 2, summary
    assert summary["distributed_type"] == distributed_type, summary
    assert wrapped_model in summary["wrapped_model"], summary
    return summary


RELOAD = """
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tensors = load_file(folder + "/model.safetensors")
logits = model(torch.arange(16).unsqueeze(0)).logits
stds = {name: tensor.float().std().item() for name, tensor in tensors.items() if tensor.dim() == 2}
print(json.dumps({
    "parameters": model.num_parameters(),
    "estimate": model.config.num_parameters_estimate(),
    "saved": sum(tensor.numel() for name, tensor in tensors.items() if name in dict(model.named_parameters())),
    "routing_biases": {name: buffer.tolist() for name, buffer in model.named_buffers() if name.endswith("correction_bias")},
    "empty": [name for name, tensor in tensors.items() if tensor.numel() == 0],
    "missing": sorted(set(n for n, _ in model.named_parameters()) - set(tensors)),
    "finite": bool(torch.isfinite(logits).all()),
    "stds": stds,
}))
"""


def reload(folder: Path) -> dict:
    """Loads the folder in a fresh process (no DeepSpeed, no process group): every parameter, none empty,
    finite logits."""
    result = subprocess.run([sys.executable, "-c", RELOAD, str(folder)], env={**env(), "PYTHONPATH": ""},
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["parameters"] == loaded["estimate"] == loaded["saved"] > 0, loaded
    assert loaded["empty"] == [] and loaded["missing"] == [], loaded
    assert loaded["finite"]
    return loaded


def losses(folder: Path) -> list[float]:
    return [entry["loss"] for entry in read_log(folder)["steps"]]


# ------------------------------------------------------------------------------------------------
# DeepSpeed through torchrun
# ------------------------------------------------------------------------------------------------
def test_zero2_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "zero2"
    run(torchrun(), "--config_overrides", TINY_MODEL, "--max_steps", "4", "--output_dir", str(out),
        "--deepspeed", str(DEEPSPEED / "zero2.json"), name="torchrun + zero2.json")
    check_distributed(out, "DEEPSPEED", "DeepSpeedEngine")
    assert len(losses(out)) == 4 and all(math.isfinite(loss) for loss in losses(out))
    reload(out)


def test_zero3_saves_every_parameter_generates_synced_and_resumes(tmp_path):
    """ZeRO-3: the consolidated 16-bit gather on save writes every parameter; the end-of-run sample runs on both
    processes with synced_gpus (one process generating alone would hang on the sharded weights); a run resumed
    from the step-2 ZeRO checkpoint ends with the same losses as the uninterrupted one."""
    out = tmp_path / "zero3"
    common = ["--config_overrides", TINY_MODEL, "--max_steps", "4", "--output_dir", str(out),
              "--deepspeed", str(DEEPSPEED / "zero3.json"), "--save_strategy", "steps", "--save_steps", "2"]
    output = run(torchrun(), *common, "--sample_prompt", "def ", "--sample_max_new_tokens", "4",
                 name="torchrun + zero3.json")
    summary = check_distributed(out, "DEEPSPEED", "DeepSpeedEngine")
    assert "Sample (prompt 'def ')" in output
    assert read_log(out)["parameters"] > 0  # counted from ds_numel, not the empty local shards
    reload(out)
    assert sorted(p.name for p in (out / "checkpoint-2" / "global_step2").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]

    uninterrupted = losses(out)
    run(torchrun(), *common, "--resume_from_checkpoint", str(out / "checkpoint-2"), name="torchrun + zero3.json resume")
    resumed = losses(out)
    assert len(resumed) == 4 and resumed[:2] == uninterrupted[:2]
    assert resumed[2:] == pytest.approx(uninterrupted[2:], rel=1e-5)
    assert read_log(out)["summary"]["global_step"] == summary["global_step"] == 4


def test_zero3_applies_scaled_init_to_the_partitioned_weights(tmp_path):
    """Under zero.Init the model is partitioned as it is built; transformers then gathers each module and runs
    `_init_weights` on rank 0. One step at learning rate 0 saves those initial weights: o_proj/down_proj must have
    std = initializer_range / sqrt(2 * layers) x 0.880 (a normal truncated at 2 std), the other matrices
    initializer_range x 0.880."""
    out = tmp_path / "init"
    layers, std = 4, 0.02
    run(torchrun(), "--config_overrides",
        f"num_hidden_layers={layers},hidden_size=128,num_attention_heads=4,intermediate_size=256,init_scheme=scaled",
        "--max_steps", "1", "--learning_rate", "0", "--output_dir", str(out),
        "--deepspeed", str(DEEPSPEED / "zero3.json"), name="torchrun + zero3.json init")
    stds = reload(out)["stds"]
    truncation = 0.8796  # std of N(0, 1) truncated to [-2, 2]
    for name, value in stds.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert value == pytest.approx(std / math.sqrt(2 * layers) * truncation, rel=0.05), name
        elif "layers" in name:
            assert value == pytest.approx(std * truncation, rel=0.05), name


def test_zero3_on_two_processes_matches_one_process_at_the_same_global_batch(tmp_path):
    """2 processes x batch 2 and 1 process x batch 4 see the same 4 blocks per step (accelerate's batch sampler
    hands process i the i-th slice of each global batch of the same seeded permutation) from the same initial
    weights (ZeRO-3 init runs on rank 0 in both), so their losses agree to float32 reduction-order noise:
    relative tolerance 1e-4 over 4 steps. (A run without DeepSpeed is not compared: zero.Init initialises the
    modules one by one, drawing the seeded random numbers in another order, so its initial weights differ.)"""
    common = ["--config_overrides", f"{TINY_MODEL},init_scheme=scaled", "--max_steps", "4",
              "--deepspeed", str(DEEPSPEED / "zero3.json")]
    two, one = tmp_path / "two", tmp_path / "one"
    run(torchrun(2), *common, "--output_dir", str(two), name="torchrun + zero3.json, 2 x 2")
    run(torchrun(1), *common, "--output_dir", str(one), "--per_device_train_batch_size", "4",
        name="torchrun + zero3.json, 1 x 4")
    assert read_log(one)["summary"]["world_size"] == 1
    check_distributed(two, "DEEPSPEED", "DeepSpeedEngine")
    assert len(losses(two)) == len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_zero3_offload_trains_saves_and_reloads(tmp_path):
    """Optimizer state and parameters offloaded to CPU; the optimizer is DeepSpeed's CPU Adam (JIT-built once)."""
    out = tmp_path / "offload"
    run(torchrun(), "--config_overrides", TINY_MODEL, "--max_steps", "4", "--output_dir", str(out),
        "--deepspeed", str(DEEPSPEED / "zero3_offload.json"), name="torchrun + zero3_offload.json", timeout=600)
    check_distributed(out, "DEEPSPEED", "DeepSpeedEngine")
    assert losses(out)[-1] < losses(out)[0]
    reload(out)


def test_a_budgeted_ddp_run_plans_the_same_steps_on_both_processes(tmp_path):
    """Each process measures its own pace: the plan is agreed (the fewest steps), or one process would stop
    early and the other hang in its next collective."""
    out = tmp_path / "budget"
    run(torchrun(), "--config_overrides", TINY_MODEL, "--max_train_seconds", "12", "--lr_scheduler_type", "cosine",
        "--output_dir", str(out), name="ddp-budget", timeout=240)
    log = read_log(out)
    summary = check_distributed(out, "MULTI_CPU", "DistributedDataParallel")
    budget = summary["budget"]
    assert budget["planned_steps"] == budget["done_steps"] == summary["global_step"] > 1
    assert [entry["step"] for entry in log["steps"]] == list(range(1, budget["done_steps"] + 1))


# ------------------------------------------------------------------------------------------------
# accelerate launch
# ------------------------------------------------------------------------------------------------
def test_accelerate_ddp_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "ddp"
    run(accelerate("ddp.yaml"), "--config_overrides", TINY_MODEL, "--max_steps", "4", "--output_dir", str(out),
        name="accelerate ddp.yaml")
    check_distributed(out, "MULTI_GPU" if HAS_GPU else "MULTI_CPU", "DistributedDataParallel")
    reload(out)


def test_accelerate_deepspeed_zero3_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "accelerate-zero3"
    run(accelerate("deepspeed_zero3.yaml"), "--config_overrides", TINY_MODEL, "--max_steps", "4",
        "--output_dir", str(out), name="accelerate deepspeed_zero3.yaml")
    check_distributed(out, "DEEPSPEED", "DeepSpeedEngine")
    reload(out)


@pytest.mark.skipif(not HAS_GPU, reason="accelerate 1.15 has no FSDP on CPU (MULTI_CPU); needs 2 GPUs")
def test_accelerate_fsdp_saves_a_full_state_dict(tmp_path):
    out = tmp_path / "fsdp"
    run(accelerate("fsdp.yaml"), "--config_overrides", TINY_MODEL, "--max_steps", "4", "--output_dir", str(out),
        name="accelerate fsdp.yaml")
    check_distributed(out, "FSDP", "FSDP")
    reload(out)


def test_fsdp_on_cpu_is_refused_not_silently_ddp(tmp_path):
    """accelerate turns an FSDP launch on CPU into DDP without a word; train.py stops with a message instead."""
    if HAS_GPU:
        pytest.skip("on GPUs FSDP runs (test_accelerate_fsdp_saves_a_full_state_dict)")
    result = subprocess.run([*accelerate("fsdp.yaml"), TRAIN_SCRIPT, *TINY, "--config_overrides", TINY_MODEL,
                             "--max_steps", "1", "--output_dir", str(tmp_path / "fsdp")],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "The launcher asked for FSDP but the Trainer runs MULTI_CPU" in result.stdout + result.stderr


def test_no_split_modules_names_the_decoder_layer():
    """FSDP's auto-wrap (fsdp.yaml) and accelerate's device maps shard at the decoder layer."""
    from archlm import ArchLMConfig, ArchLMForCausalLM, parse_config_overrides

    model = ArchLMForCausalLM(ArchLMConfig.from_preset("llama", vocab_size=64, **parse_config_overrides(TINY_MODEL)))
    layer_classes = {type(layer).__name__ for layer in model.model.layers}
    assert set(model._no_split_modules) == layer_classes == {"ArchLMDecoderLayer"}
    assert "fsdp_transformer_layer_cls_to_wrap: ArchLMDecoderLayer" in (ACCELERATE / "fsdp.yaml").read_text()


# ------------------------------------------------------------------------------------------------
# FSDP2 without accelerate: tests/fsdp_cpu_worker.py shards by hand what fsdp.yaml asks for
# ------------------------------------------------------------------------------------------------
FSDP_WORKER = str(REPO / "tests" / "fsdp_cpu_worker.py")


def run_fsdp_worker(processes: int, out: Path, *args: str) -> dict:
    """Runs tests/fsdp_cpu_worker.py on `processes` processes; returns its fsdp_log.json."""
    name = f"torchrun + fsdp_cpu_worker.py, {processes} process(es) {' '.join(args)}".rstrip()
    start = time.perf_counter()
    result = subprocess.run([*torchrun(processes), FSDP_WORKER, "--output_dir", str(out), *args], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=300)
    WALL_TIMES[name] = time.perf_counter() - start
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    print(f"{name}: {WALL_TIMES[name]:.1f} s")
    return json.loads((out / "fsdp_log.json").read_text())


def check_full_state_dict(folder: Path, log: dict) -> None:
    """The folder holds one whole model: every parameter at its full shape (not a rank's shard), each once, and it
    loads with trust_remote_code in a fresh process."""
    from safetensors import safe_open

    from archlm import ArchLMConfig, ArchLMForCausalLM

    config = json.loads((folder / "config.json").read_text())
    # fully_shard swaps the model's class for a `FSDPArchLMForCausalLM` defined in torch; the auto_map must still
    # name ours, and the folder carry our code, or trust_remote_code cannot load it.
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_archlm.ArchLMForCausalLM", config["auto_map"]
    assert config["architectures"] == ["ArchLMForCausalLM"]
    assert (folder / "modeling_archlm.py").exists(), sorted(p.name for p in folder.iterdir())
    with torch.device("meta"):
        model = ArchLMForCausalLM(ArchLMConfig.from_pretrained(folder))
    expected = {name: list(parameter.shape) for name, parameter in model.named_parameters()}  # a tied matrix once
    with safe_open(folder / "model.safetensors", "pt") as saved:
        shapes = {name: saved.get_slice(name).get_shape() for name in saved.keys()}
    assert shapes == expected
    loaded = reload(folder)
    assert loaded["parameters"] == log["parameters"] == model.num_parameters()


def test_fsdp2_on_two_cpu_processes_saves_a_full_state_dict(tmp_path):
    """PyTorch's FSDP2 on 2 CPU processes over gloo, sharded at `_no_split_modules` (one unit per decoder layer,
    then the root) as fsdp.yaml's TRANSFORMER_BASED_WRAP does: each process holds half of every parameter while it
    trains, the gathered FULL state dict saves as one model.safetensors that reloads in a fresh process, and the
    losses equal those of 1 process on the same global batch. Measured: 2 and 1 processes differ by at most 4.8e-7
    (one float32 ulp at 4.35, the reduction order of the gradient average); the tolerance, 5e-5, is 100x that and
    well below the loss change per step (> 0.1)."""
    two = run_fsdp_worker(2, tmp_path / "two")
    one = run_fsdp_worker(1, tmp_path / "one")

    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["fsdp_units"] == ["model.layers.0", "model.layers.1", ""]
    # every dim 0 of the tiny model is even, so the halves are exact (fully_shard pads an odd one)
    assert two["local_elements"] == [two["parameters"] // 2] * 2 and one["local_elements"] == [one["parameters"]]
    assert len(two["losses"]) == 4 and all(math.isfinite(loss) for loss in two["losses"])
    assert min(a - b for a, b in zip(two["losses"], two["losses"][1:])) > 0.1
    assert two["losses"] == pytest.approx(one["losses"], rel=0, abs=5e-5)
    check_full_state_dict(tmp_path / "two", two)


def test_fsdp2_on_two_cpu_processes_saves_tied_embeddings_once(tmp_path):
    """With a tied head, lm_head and the embedding are one parameter of the root unit; the full state dict gathers
    them as two equal tensors, and the folder must hold the matrix once (as a model saved without FSDP does)."""
    out = tmp_path / "tied"
    log = run_fsdp_worker(2, out, "--steps", "1", "--tie_word_embeddings")
    assert log["tied"] and log["world_size"] == 2
    assert log["local_elements"] == [log["parameters"] // 2] * 2
    check_full_state_dict(out, log)


# dots1: a sigmoid router in float32 (its own forward, which ZeRO-3 must gather for), an ungated shared expert, the
# first of 3 layers dense
MOE_RUNS = {"mixtral": TINY_MODEL, "dots1": TINY_MODEL.replace("num_hidden_layers=2", "num_hidden_layers=3")
            + ",num_experts_per_tok=2,moe_intermediate_size=16,shared_expert_intermediate_size=32"}


@pytest.mark.parametrize("preset, zero", [("mixtral", "zero2"), ("mixtral", "zero3"), ("dots1", "zero3")])
def test_mixture_of_experts_trains_under_zero_and_reloads_every_expert(tmp_path, preset, zero):
    """The mixtral preset (stacked 3-D expert weights, a router per layer) under ZeRO-2 and ZeRO-3 on 2 processes:
    the load-balancing loss and the tokens per expert are logged at every step, and the saved folder reloads in a
    fresh process with every parameter (ZeRO-3 gathers the partitioned expert tensors on save). The routing bias
    (router_bias_update_rate) moves at every step from both processes' counts (summed across them) and is saved."""
    out = tmp_path / zero
    rate = 0.01
    run(torchrun(), "--preset", preset, "--config_overrides", f"{MOE_RUNS[preset]},num_experts=4,router_bias_update_rate={rate}",
        "--max_steps", "3", "--output_dir", str(out), "--deepspeed", str(DEEPSPEED / f"{zero}.json"),
        name=f"torchrun + {zero}.json, MoE")
    check_distributed(out, "DEEPSPEED", "DeepSpeedEngine")
    steps = read_log(out)["steps"]
    assert len(steps) == 3 and all(math.isfinite(step["aux_loss"]) for step in steps)
    assert all(len(step["expert_tokens"]) == 2 and len(step["expert_tokens"][0]) == 4 for step in steps)
    loaded = reload(out)
    assert loaded["parameters"] > 0
    biases = [torch.tensor(value) for value in loaded["routing_biases"].values()]
    assert len(biases) == 2
    for bias in biases:  # 3 updates of +-rate (or 0, at the mean load) each
        steps_moved = bias / rate
        torch.testing.assert_close(steps_moved, steps_moved.round(), atol=1e-4, rtol=0)
        assert bias.abs().max() <= 3 * rate + 1e-6 and bias.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# ZeRO-2 on 2 processes: kill -9 of the whole job, then --resume_from_checkpoint latest
# ------------------------------------------------------------------------------------------------
# examples/train.py, except that rank 0 stops for good right before it writes trainer_state.json (the file the
# Trainer writes last) into checkpoint-{step}: the weights, both ranks' ZeRO optimizer shards, the RNG states and
# DeepSpeed's own `latest` file (naming global_step{step}) are on disk, the checkpoint is not complete. Rank 1
# goes on and waits for rank 0 in the next step's collectives.
PAUSING_IN_SAVE = """
import os, sys, time
from transformers import TrainerState
from archlm.train import main

save_to_json = TrainerState.save_to_json

def pause_before_the_last_file(self, json_path):
    if os.path.basename(os.path.dirname(json_path)) == "checkpoint-{step}":
        open({marker!r}, "w").close()
        time.sleep(600)  # killed here with SIGKILL
    save_to_json(self, json_path)

TrainerState.save_to_json = pause_before_the_last_file
main(sys.argv[1:])
"""


def kill_job(launcher: subprocess.Popen) -> int:
    """SIGKILL to torchrun and every process under it, as a scheduler or the OOM killer ends a job; returns
    torchrun's exit status. torchrun starts each rank in a session (process group) of its own, so one killpg of
    torchrun's group would leave the ranks running: each group is killed."""
    import psutil

    job = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    assert len(job) >= 3, job  # torchrun and its 2 ranks
    for group in {os.getpgid(process.pid) for process in job}:
        os.killpg(group, signal.SIGKILL)
    _, alive = psutil.wait_procs(job, timeout=60)  # reaps torchrun, our child: Popen.wait would see no status
    assert not alive, alive
    launcher.returncode = job[0].returncode
    return launcher.returncode


def test_zero2_killed_with_sigkill_resumes_from_the_latest_complete_checkpoint_to_the_same_weights(tmp_path):
    """ZeRO-2 on 2 processes, 12 steps, a checkpoint every 5. The interrupted run trains past checkpoint-5 and is
    killed with SIGKILL (torchrun and both ranks) while it saves checkpoint-10: after DeepSpeed wrote that folder's
    shards and `latest` file, before trainer_state.json. `--resume_from_checkpoint latest` skips the cut-off
    checkpoint-10 and resumes both ranks from checkpoint-5 (weights, ZeRO-partitioned Adam states, scheduler, RNG,
    data position); it ends with the weights of an uninterrupted run with the same flags, and its
    training_log.json holds steps 1-12 once each, with the uninterrupted run's losses."""
    common = ["--config_overrides", TINY_MODEL, "--max_steps", "12", "--deepspeed", str(DEEPSPEED / "zero2.json"),
              "--save_strategy", "steps", "--save_steps", "5", "--data_seed", "3"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run(torchrun(), *common, "--output_dir", str(uninterrupted), name="torchrun + zero2.json, 12 steps")

    marker = tmp_path / "saving-checkpoint-10"
    wrapper = tmp_path / "pausing_train.py"
    wrapper.write_text(PAUSING_IN_SAVE.format(step=10, marker=str(marker)))
    start = time.perf_counter()
    launcher = subprocess.Popen([*torchrun(), str(wrapper), *TINY, *common, "--output_dir", str(interrupted)],
                                cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if launcher.poll() is not None:
                pytest.fail(f"the run ended before saving checkpoint-10:\n{launcher.stdout.read()[-6000:]}")
            assert time.monotonic() < deadline, "the run never reached the save of checkpoint-10"
            time.sleep(0.2)
        assert kill_job(launcher) == -signal.SIGKILL
    finally:
        if launcher.returncode is None and launcher.poll() is None:
            kill_job(launcher)
        launcher.stdout.close()
    WALL_TIMES["torchrun + zero2.json, killed at the save of step 10"] = time.perf_counter() - start
    print(f"torchrun + zero2.json, killed at the save of step 10: {time.perf_counter() - start:.1f} s")

    # checkpoint-5 complete; checkpoint-10 cut off: DeepSpeed's `latest` names its global_step10, but no
    # trainer_state.json, so it must not be taken for the latest checkpoint
    for step in (5, 10):
        checkpoint = interrupted / f"checkpoint-{step}"
        assert (checkpoint / "latest").read_text().strip() == f"global_step{step}"
        assert sorted(p.name for p in (checkpoint / f"global_step{step}").glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (interrupted / "checkpoint-5" / "trainer_state.json").is_file()
    assert not (interrupted / "checkpoint-10" / "trainer_state.json").exists()
    assert not (interrupted / "model.safetensors").exists()
    assert read_log(interrupted)["status"] == "running" and len(read_log(interrupted)["steps"]) == 10

    output = run(torchrun(), *common, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest",
                 name="torchrun + zero2.json, resumed from latest")
    assert re.search(rf"Skipping incomplete checkpoint\(s\) {re.escape(str(interrupted / 'checkpoint-10'))} .*; "
                     rf"resuming from {re.escape(str(interrupted / 'checkpoint-5'))}\.", output), output[-6000:]
    check_distributed(interrupted, "DEEPSPEED", "DeepSpeedEngine")
    check_distributed(uninterrupted, "DEEPSPEED", "DeepSpeedEngine")

    # Measured: equal to the bit (same reduction order on both runs); the tolerance only allows float32 noise
    # and is far below what steps 6-12 change (checked below, so the comparison cannot pass vacuously).
    resumed_weights = load_file(interrupted / "model.safetensors")
    reference_weights = load_file(uninterrupted / "model.safetensors")
    at_step_5 = load_file(interrupted / "checkpoint-5" / "model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys() == at_step_5.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert max((reference_weights[name] - at_step_5[name]).abs().max() for name in at_step_5) > 1e-3
    resumed_log, reference_log = read_log(interrupted), read_log(uninterrupted)
    assert resumed_log["status"] == "finished" and resumed_log["summary"]["global_step"] == 12
    assert [entry["step"] for entry in resumed_log["steps"]] == list(range(1, 13))
    assert [entry["step"] for entry in reference_log["steps"]] == list(range(1, 13))
    for resumed, reference in zip(resumed_log["steps"], reference_log["steps"]):
        assert resumed["loss"] == pytest.approx(reference["loss"], abs=1e-5), resumed["step"]
        assert resumed["num_input_tokens_seen"] == reference["num_input_tokens_seen"], resumed["step"]
    assert (interrupted / "checkpoint-10" / "trainer_state.json").is_file()  # saved again, completely
