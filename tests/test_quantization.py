"""int8 weight-only quantization of a saved ArchLM folder on a CPU, through transformers' `TorchAoConfig`
(torchao's `Int8WeightOnlyConfig`): the decoder's Linear weights become int8, the logits stay within int8 rounding
of fp32's, greedy generation follows fp32's, and the quantized model saves (int8 on disk) and loads as remote code
in a fresh process. benchmarks/quantized.py measures its speed and perplexity; its smoke test is the last test.

Why torchao and not optimum-quanto: see benchmarks/quantized.py (faster int8 decoding on CPUs, and it saves).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig
from transformers import AutoModelForCausalLM, TorchAoConfig

from archlm import ArchLMForCausalLM

REPO = Path(__file__).resolve().parents[1]
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Max |int8 logit - fp32 logit| / max |fp32 logit|. Per-row symmetric int8 rounds each weight by at most half a step,
# max|row| / 254; on the tiny model (default init, 2 layers) that measured 0.45%-0.84% over six seeds. 2% leaves
# room for another seed or thread count and still fails a wrong scale, a transposed weight or a dropped layer (~100%).
RELATIVE_LOGIT_TOLERANCE = 0.02


def int8_config() -> TorchAoConfig:
    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    ArchLMForCausalLM(tiny_config(num_key_value_heads=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(folder) -> tuple:
    fp32 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    int8 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, quantization_config=int8_config()).eval()
    return fp32, int8


def input_ids(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(0))


def test_loading_with_int8_config_quantizes_every_decoder_linear_and_keeps_the_head_fp32(models):
    fp32, int8 = models
    linears = {name: module for name, module in int8.named_modules() if name.endswith(DECODER_LINEARS)}
    assert len(linears) == len(DECODER_LINEARS) * fp32.config.num_hidden_layers
    for name, module in linears.items():
        weight = module.weight
        assert isinstance(weight, Int8Tensor), (name, type(weight))
        assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == module.weight.shape, name
        assert weight.scale.shape == (module.out_features, 1), name  # one scale per output row
        reference = fp32.get_submodule(name).weight
        step = reference.abs().amax(dim=1, keepdim=True) / 127
        assert (weight.dequantize() - reference).abs().le(step / 2 + 1e-7).all(), name  # rounded to the nearest step
    assert type(int8.lm_head.weight) is torch.nn.Parameter and int8.lm_head.weight.dtype == torch.float32
    assert int8.config.quantization_config.quant_method == "torchao"


def test_int8_logits_stay_within_int8_rounding_of_fp32(models):
    fp32, int8 = models
    with torch.no_grad():
        expected, logits = fp32(input_ids()).logits, int8(input_ids()).logits
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert 0 < relative < RELATIVE_LOGIT_TOLERANCE, relative  # > 0: the int8 weights are really used


def test_int8_greedy_generation_follows_fp32(models):
    fp32, int8 = models
    prompt = input_ids(1, 8)
    expected = fp32.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 8:]
    generated = int8.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 8:]
    # equal at every step on this model; near-ties of a random model's logits may flip a token with other seeds
    assert (generated == expected).float().mean() >= 0.75, (generated, expected)
    with torch.no_grad():  # the cached steps computed what a full forward computes
        full = int8(torch.cat([prompt[0], generated])[None]).logits[0, 7:-1].argmax(-1)
    assert torch.equal(full, generated)


FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["archlm"] = None  # as on a machine without archlm: the folder's remote code only
    import torch
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForCausalLM

    expected = torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)
    generated = model.generate(expected["input_ids"][:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected["generated"]), (generated, expected["generated"])
    print("INT8 RELOAD OK")
""")


@pytest.fixture(scope="module")
def saved_int8(models, tmp_path_factory) -> Path:
    saved = tmp_path_factory.mktemp("int8")
    models[1].save_pretrained(saved)
    return saved


def test_int8_model_saves_int8_weights_and_reloads_quantized(models, saved_int8):
    assert {"configuration_archlm.py", "modeling_archlm.py", "model.safetensors"} <= {p.name for p in saved_int8.iterdir()}
    assert json.loads((saved_int8 / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    with safe_open(saved_int8 / "model.safetensors", "pt") as tensors:
        assert tensors.get_slice("model.layers.0.self_attn.q_proj._weight_qdata").get_dtype() == "I8"
        assert tensors.get_slice("lm_head.weight").get_dtype() == "F32"
    reloaded = AutoModelForCausalLM.from_pretrained(saved_int8, trust_remote_code=True).eval()  # no config needed
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj.weight, Int8Tensor)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, models[1](input_ids()).logits)


def test_int8_folder_loads_in_a_fresh_process_without_archlm(models, saved_int8, tmp_path):
    ids = input_ids()
    with torch.no_grad():
        logits = models[1](ids).logits
    generated = models[1].generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"input_ids": ids, "logits": logits, "generated": generated}, tmp_path / "expected.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(saved_int8), str(tmp_path / "expected.pt")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "INT8 RELOAD OK" in result.stdout


def test_a_mixtures_expert_stacks_quantize_by_name_and_its_routers_stay_fp32(tmp_path):
    """torchao quantizes nn.Linear weights; a mixture's experts are stacked parameters, reached by name through
    FqnToConfig (`re:.*_proj` names every projection and both stacks, not the routers `gate`). Each stack holds int8
    values with one scale per (expert, output row); the experts that receive tokens are dequantized one at a time."""
    from torchao.quantization import FqnToConfig

    torch.manual_seed(0)
    ArchLMForCausalLM(tiny_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)).save_pretrained(tmp_path / "moe")
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True).eval()
    config = TorchAoConfig(FqnToConfig({r"re:.*_proj": Int8WeightOnlyConfig()}))
    int8 = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True, quantization_config=config).eval()
    for layer, reference in zip(int8.model.layers, fp32.model.layers):
        assert type(layer.mlp.gate.weight) is torch.nn.Parameter  # routing keeps full precision
        assert isinstance(layer.self_attn.q_proj.weight, Int8Tensor)
        for name in ("gate_up_proj", "down_proj"):
            stack, expected = getattr(layer.mlp.experts, name), getattr(reference.mlp.experts, name)
            assert isinstance(stack, Int8Tensor) and stack.qdata.dtype == torch.int8, name
            assert stack.scale.squeeze(-1).shape == expected.shape[:2], name  # per expert and output row
            step = expected.abs().amax(dim=-1, keepdim=True) / 127
            assert (stack.dequantize() - expected).abs().le(step / 2 + 1e-7).all(), name
    ids = input_ids()
    with torch.no_grad():
        expected, logits = fp32(ids).logits, int8(ids).logits
    relative = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert 0 < relative < RELATIVE_LOGIT_TOLERANCE, relative
    generated = int8.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 8:]
    with torch.no_grad():  # the cached steps (one token, two experts) computed what a full forward computes
        full = int8(torch.cat([ids[0, :8], generated])[None]).logits[0, 7:-1].argmax(-1)
    assert torch.equal(full, generated)

    int8.save_pretrained(tmp_path / "int8")
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as tensors:
        assert tensors.get_slice("model.layers.0.mlp.experts._gate_up_proj_qdata").get_dtype() == "I8"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", trust_remote_code=True).eval()
    assert isinstance(reloaded.model.layers[1].mlp.experts.down_proj, Int8Tensor)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


@pytest.mark.slow
def test_quantized_benchmark_trains_a_model_and_reports_every_figure_for_the_four_models(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quantized.py"), "--train_corpus_mb", "0.3", "--train_steps", "4",
         "--train_overrides", "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,num_key_value_heads=1,"
         "intermediate_size=64", "--train_vocab", "384", "--train_block", "32", "--eval_blocks", "4", "--eval_block", "32",
         "--decode_prompt", "8", "--decode_tokens", "4", "--agreement_prompts", "2", "--pairs", "1", "--threads", "1",
         "--output_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads((tmp_path / "quantized.json").read_text())
    models = ["archlm fp32", "archlm int8", "llama fp32", "llama int8"]
    assert [row["measure"] for row in results["rows"]] == ["decode tokens/s", "held-out perplexity", "weights MiB"]
    assert all(row[name] > 0 for row in results["rows"] for name in models)
    assert results["export_max_abs_logit_difference"] <= 1e-4  # the Llama holds the same weights
    assert results["quantized_linears"]["archlm int8"] == [14, 15]  # 2 layers x 7; the LM head stays fp32
    assert results["quantized_linears"]["llama int8"] == [14, 15]
    assert results["quantized_linears"]["archlm fp32"] == [0, 15]
    weights = next(row for row in results["rows"] if row["measure"] == "weights MiB")
    assert weights["archlm int8"] < weights["archlm fp32"]
    assert "| decode tokens/s |" in (tmp_path / "quantized.md").read_text()
    assert (tmp_path / "quantized.png").stat().st_size > 0
