"""The conformance checker: passes conforming architectures, catches a broken one, and its command's exit status."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import new_option_configs, tiny_config

import archlm
from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.check import CONTRACTS, check_model, tiny_version


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(position_embedding_type="alibi", num_key_value_heads=2, norm_type="layernorm"),
    dict(position_embedding_type="learned", mlp_type="standard", hidden_act="gelu_new", tie_word_embeddings=True),
    dict(position_embedding_type="sinusoidal", norm_position="post", qk_norm=True, num_key_value_heads=1),
    dict(sliding_window=4, attention_bias=True, attention_output_bias=False, hidden_dropout=0.1, attention_dropout=0.1),
], ids=["rope", "alibi-gqa-layernorm", "learned-gpt2like", "sinusoidal-postnorm-qknorm-mqa", "swa-bias-dropout"])
def test_conforming_architectures_pass_every_contract(overrides):
    report = check_model(tiny_config(**overrides), verbose=False)
    assert [result.name for result in report.results] == list(CONTRACTS)
    assert report.passed, report.table()


@pytest.mark.parametrize("overrides", list(new_option_configs().values()), ids=list(new_option_configs()))
def test_every_new_architecture_option_passes_every_contract(overrides):
    """cache == full forward, static == dynamic generation, eager == sdpa, checkpointing, save/load, left padding
    == each prompt alone (logits and generated tokens), fully masked rows: for each option over a base."""
    report = check_model(tiny_config(**overrides), verbose=False)
    assert [result.name for result in report.results] == list(CONTRACTS)
    assert report.passed, report.table()


class CacheIgnoringModel(ArchLMForCausalLM):
    """A deliberately broken model: it drops the cache it is given, so cached decoding loses the context."""

    def forward(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            past_key_values = None
            kwargs.pop("position_ids", None)
            kwargs.pop("attention_mask", None)
        return super().forward(*args, past_key_values=past_key_values, **kwargs)


def test_a_model_that_breaks_the_cache_fails_the_cache_contract():
    torch.manual_seed(0)
    report = check_model(CacheIgnoringModel(tiny_config()), verbose=False)
    results = {result.name: result for result in report.results}
    assert not report.passed
    assert not results["cache == full forward"].passed
    assert results["eager == sdpa"].passed  # a full forward is still right
    assert "FAIL" in report.table() and "failed" in report.table()


def test_checking_a_model_leaves_it_untouched():
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config()).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    check_model(model, verbose=False)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert not model.is_activation_checkpointing
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_check_model_rejects_what_it_cannot_check():
    with pytest.raises(TypeError, match="ArchLMConfig or an ArchLMForCausalLM"):
        check_model("llama")
    with pytest.raises(ValueError, match="Unknown contract"):
        check_model(tiny_config(), contracts=["cache == nothing"])
    with pytest.raises(ValueError, match="too short to check"):
        check_model(tiny_config(position_embedding_type="learned", max_position_embeddings=8))


def test_tiny_version_keeps_every_architecture_choice():
    for preset in ArchLMConfig.presets():
        config = ArchLMConfig.from_preset(preset)
        small = tiny_version(config)
        assert small.hidden_size == 64 and small.num_hidden_layers == 2
        for field in ("norm_type", "norm_position", "position_embedding_type", "mlp_type", "hidden_act", "qk_norm",
                      "attention_bias", "attention_output_bias", "mlp_bias", "tie_word_embeddings", "init_scheme"):
            assert getattr(small, field) == getattr(config, field), (preset, field)
        assert (small.num_key_value_heads < small.num_attention_heads) == (config.num_key_value_heads < config.num_attention_heads)


def test_package_exports_check_model():
    assert archlm.check_model is check_model


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "archlm.check", *args], capture_output=True, text=True, timeout=300)


def test_command_on_a_tiny_preset_prints_the_table_and_exits_zero():
    result = run_check("--preset", "mistral", "--tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed, 0 failed" in result.stdout
    assert "SWA8" in result.stdout  # the sliding window survived --tiny
    assert "RuntimeWarning" not in result.stderr  # (runpy's, when the package had imported archlm.check itself)


def test_command_on_a_saved_folder(tmp_path):
    torch.manual_seed(0)
    ArchLMForCausalLM(tiny_config(position_embedding_type="alibi")).save_pretrained(tmp_path)
    result = run_check("--model", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALiBi" in result.stdout and "7 passed" in result.stdout


def test_command_exits_nonzero_when_a_contract_fails():
    """Dynamic NTK rope rescales its frequencies once inputs outgrow max_position_embeddings and keeps the new
    ones: the model's output then depends on what it saw before, which the checker must report."""
    rope = json.dumps({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    result = run_check("--preset", "llama", "--tiny", "--seq_len", "24",
                       "--config_overrides", f"max_position_embeddings=8,rope_parameters={rope}")
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_command_rejects_overrides_on_a_trained_model(tmp_path):
    ArchLMForCausalLM(tiny_config()).save_pretrained(tmp_path)
    result = run_check("--model", str(tmp_path), "--config_overrides", "hidden_size=8")
    assert result.returncode == 2 and "config_overrides" in result.stderr


def test_command_names_a_missing_local_folder_at_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "archlm.check", "--model", str(tmp_path / "no_such_run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no_such_run': no such folder" in result.stderr
