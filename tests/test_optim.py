"""archlm/optim.py and `--optim muon`: Muon for the decoder layers' weight matrices, AdamW for the rest.

StackedMuon is checked against torch.optim.Muon itself (2-D matrices, and a stack of experts against one torch Muon
per expert); the split of parameters is checked by name on dense, MoE and LoRA models; train.py's Muon runs resume
to the weights of an uninterrupted run, and setups where Muon cannot see whole matrices are refused.
"""

import shutil

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.optim import MuonWithAdamW, StackedMuon, is_hidden_matrix, orthogonalize
from archlm.training import ArchLMTrainingArguments
from train_helpers import TINY, read_log, train, train_script


def run_steps(optimizer, params, grads):
    for grad in grads:
        for param, g in zip(params, grad):
            param.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_stacked_muon_on_a_matrix_is_torch_muon(shape):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    theirs.data.copy_(ours.data)
    grads = [[torch.randn(shape)] for _ in range(3)]
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    run_steps(StackedMuon([ours], ns_dtype=torch.bfloat16, **kwargs), [ours], grads)  # torch's Muon iterates in bf16
    run_steps(torch.optim.Muon([theirs], **kwargs), [theirs], grads)
    torch.testing.assert_close(ours.data, theirs.data, atol=2e-3, rtol=0)
    assert not torch.equal(ours.data, grads[0][0])  # it moved


def test_stacked_muon_treats_each_expert_as_a_matrix_of_its_own():
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 16, 24))
    slices = [torch.nn.Parameter(stack.data[index].clone()) for index in range(3)]
    grads = [torch.randn(3, 16, 24) for _ in range(3)]
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    run_steps(StackedMuon([stack], ns_dtype=torch.bfloat16, **kwargs), [stack], [[grad] for grad in grads])
    run_steps(torch.optim.Muon(slices, **kwargs), slices, [list(grad.unbind(0)) for grad in grads])
    torch.testing.assert_close(stack.data, torch.stack([param.data for param in slices]), atol=2e-3, rtol=0)


def test_orthogonalize_gives_singular_values_near_one_in_float32():
    torch.manual_seed(0)
    singular_values = torch.linalg.svdvals(orthogonalize(torch.randn(2, 32, 48)))
    # the quintic iteration aims at (0.5, 1.5) rather than exactly 1 (torch.optim.Muon's docstring)
    assert singular_values.min() > 0.4 and singular_values.max() < 1.6


def parameter_kinds(model: torch.nn.Module) -> dict[str, str]:
    optimizer = MuonWithAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    kinds = {}
    for inner in optimizer.optimizers:
        ids = {id(param) for group in inner.param_groups for param in group["params"]}
        kinds.update({name: type(inner).__name__ for name, param in model.named_parameters() if id(param) in ids})
    return kinds


def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw():
    model = ArchLMForCausalLM(ArchLMConfig.from_preset("llama", vocab_size=64, **dict(
        (key, int(value)) for key, value in (item.split("=") for item in TINY_MODEL.split(",")))))
    kinds = parameter_kinds(model)
    muon = {name for name, kind in kinds.items() if kind == "StackedMuon"}
    assert {name.split(".")[-2] for name in muon} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"}
    assert len(muon) == 2 * 7
    assert {name for name, kind in kinds.items() if kind == "AdamW"} == {
        name for name, _ in model.named_parameters()} - muon  # embeddings, head, norms
    assert kinds.keys() == {name for name, _ in model.named_parameters()}


def test_experts_go_to_muon_and_the_router_to_adamw():
    config = ArchLMConfig.from_preset("qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16)
    model = ArchLMForCausalLM(config)
    kinds = parameter_kinds(model)
    expert_weights = [name for name, param in model.named_parameters() if ".experts." in name]
    assert expert_weights and all(kinds[name] == "StackedMuon" for name in expert_weights)
    routers = [name for name in kinds if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(kinds[name] == "AdamW" for name in routers)


def test_is_hidden_matrix_takes_lora_factors_and_leaves_biases():
    matrix, vector = torch.zeros(4, 8), torch.zeros(4)
    assert is_hidden_matrix("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", matrix)
    assert not is_hidden_matrix("model.layers.0.self_attn.q_proj.bias", vector)
    assert not is_hidden_matrix("model.embed_tokens.weight", matrix)
    assert not is_hidden_matrix("lm_head.weight", matrix)


def test_muon_is_refused_under_zero_and_fsdp_and_an_unknown_optimizer_still_is(tmp_path):
    with pytest.raises(SystemExit, match="--optim muon needs whole weight matrices, and DeepSpeed"):
        train_script.main([*TINY, "--optim", "muon", "--deepspeed", '{"zero_optimization": {"stage": 2}}',
                           "--output_dir", str(tmp_path / "zero")])
    assert not (tmp_path / "zero").exists()
    with pytest.raises(ValueError, match="not_an_optimizer"):
        ArchLMTrainingArguments(output_dir=str(tmp_path), optim="not_an_optimizer")
    assert ArchLMTrainingArguments(output_dir=str(tmp_path), optim="muon").optim == "muon"


def test_a_muon_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = ["--config_overrides", TINY_MODEL, "--optim", "muon", "--max_steps", "8", "--save_steps", "4",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "2"]
    uninterrupted = train(*args, "--output_dir", str(tmp_path / "whole"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = train(*args, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest")

    whole, again = load_file(uninterrupted / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=0, msg=name)
    steps = read_log(resumed)["steps"]
    assert [entry["step"] for entry in steps] == list(range(1, 9))
    # the scheduler reaches both optimizers' groups: every group's learning rate is the schedule's
    state = torch.load(uninterrupted / "checkpoint-4" / "optimizer.pt", weights_only=True)
    learning_rates = {group["lr"] for inner in state["optimizers"] for group in inner["param_groups"]}
    assert len(learning_rates) == 1 and 0 < learning_rates.pop() < 3e-3
    assert len(state["optimizers"]) == 2  # torch.optim.Muon's CPU stand-in (StackedMuon) and AdamW
    # it learned: the loss fell over 8 steps with one --learning_rate for both groups
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_lora_fine_tuning_with_muon(tmp_path):
    base = train("--config_overrides", TINY_MODEL, "--max_steps", "2", "--output_dir", str(tmp_path / "base"))
    output = train("--model_name_or_path", str(base), "--lora_r", "4", "--optim", "muon", "--max_steps", "3",
                   "--learning_rate", "2e-2", "--output_dir", str(tmp_path / "lora"))
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    base_weights, merged = load_file(base / "model.safetensors"), load_file(output / "model.safetensors")
    assert any(not torch.equal(base_weights[name], merged[name]) for name in base_weights if "q_proj" in name)
