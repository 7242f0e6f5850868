"""ArchLMConfig: validation at construction and on load, legacy kwargs, presets, descriptions, round trips."""

import json
import random

import pytest
import torch
from conftest import HALF_ROPE, TINY, VALIDATION_ERRORS, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from archlm import ArchLMConfig, ArchLMForCausalLM

ROPE = {"rope_theta": 10000.0}
TOKENS = torch.tensor([[3, 4, 5, 6, 7]])


def assert_refused(overrides: dict, *fragments: str):
    """Construction fails, and the message holds every fragment (the field, the value, what is allowed)."""
    with pytest.raises(VALIDATION_ERRORS) as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from the error message:\n{message}"


# ------------------------------------------------------------------------------------------------
# validation rules
# ------------------------------------------------------------------------------------------------
SIZE_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "head_dim"]


@pytest.mark.parametrize("value", [0, -1, -64])
@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_non_positive_size_is_refused_naming_field_and_value(field, value):
    assert_refused({field: value}, field, str(value))


@pytest.mark.parametrize("value", [3.5, 32.0, "32", [32]])
@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_non_int_size_is_refused_naming_field_and_value(field, value):
    assert_refused({field: value}, field, repr(value))


@pytest.mark.parametrize("field", SIZE_FIELDS + ["sliding_window", "pad_token_id", "bos_token_id", "eos_token_id"])
def test_bool_passed_as_int_is_refused(field):
    assert_refused({field: True}, field, "bool")


def test_heads_not_dividing_hidden_is_refused_without_head_dim():
    assert_refused({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size", "30", "num_attention_heads", "4", "head_dim")


def test_heads_not_dividing_hidden_is_accepted_with_head_dim():
    config = tiny_config(hidden_size=30, num_attention_heads=4, head_dim=8)
    model = ArchLMForCausalLM(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 8, 30)
    assert model(input_ids=TOKENS).logits.shape == (1, 5, TINY["vocab_size"])


@pytest.mark.parametrize("heads, kv_heads", [(4, 3), (6, 4), (8, 3)])
def test_heads_not_multiple_of_kv_heads_is_refused(heads, kv_heads):
    assert_refused({"hidden_size": 48 if heads == 6 else 32, "num_attention_heads": heads, "num_key_value_heads": kv_heads},
                   "num_key_value_heads", str(kv_heads), "num_attention_heads", str(heads))


@pytest.mark.parametrize("head_dim", [7, 5, 3])
def test_odd_head_dim_is_refused_with_rope(head_dim):
    # (not blamed on the default partial_rotary_factor of 1.0, as it once was)
    assert_refused({"head_dim": head_dim}, f"`head_dim` must be even, got {head_dim}")


@pytest.mark.parametrize("head_dim", [7, 5, 3])
def test_odd_head_dim_is_accepted_with_alibi(head_dim):
    config = tiny_config(head_dim=head_dim, position_embedding_type="alibi")
    logits = ArchLMForCausalLM(config)(input_ids=TOKENS).logits
    assert logits.isfinite().all()


# --- rope_parameters ---
def test_unknown_rope_type_is_refused_listing_the_valid_ones():
    assert_refused({"rope_parameters": {"rope_type": "xpos", **ROPE}},
                   "rope_type", "'xpos'", "default", "linear", "dynamic", "yarn", "longrope", "llama3")


@pytest.mark.parametrize("rope_type, extra", [
    ("linear", {}),
    ("dynamic", {}),
    ("yarn", {}),
    ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_scaled_rope_without_factor_is_refused(rope_type, extra):
    assert_refused({"rope_parameters": {"rope_type": rope_type, **ROPE, **extra}}, "factor", repr(rope_type))


@pytest.mark.parametrize("factor", [0, 0.0, -2.0])
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_non_positive_rope_factor_is_refused(rope_type, factor):
    assert_refused({"rope_parameters": {"rope_type": rope_type, "factor": factor, **ROPE}}, "factor", repr(factor))


@pytest.mark.parametrize("theta", [0, 0.0, -10000.0])
def test_non_positive_rope_theta_is_refused(theta):
    assert_refused({"rope_parameters": {"rope_type": "default", "rope_theta": theta}}, "rope_theta", repr(theta))


@pytest.mark.parametrize("theta", [1e-100, 0.5, float("inf"), float("nan")])
def test_rope_theta_below_one_or_not_finite_is_refused(theta):
    # below 1 the rope frequencies grow instead of shrink, and overflow float32 (NaN logits)
    assert_refused({"rope_parameters": {"rope_type": "default", "rope_theta": theta}}, "rope_theta", repr(theta))


@pytest.mark.parametrize("factor", [1e-300, 0.5, float("inf"), float("nan")])
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_factor_below_one_or_not_finite_is_refused(rope_type, factor):
    # transformers only warns below 1; a factor near 0 divides the frequencies into inf (NaN logits)
    assert_refused({"rope_parameters": {"rope_type": rope_type, "factor": factor, **ROPE}}, "factor", repr(factor))


@pytest.mark.parametrize("rope_type, extra", [
    ("yarn", {"factor": 2.0}),
    ("longrope", {"short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_original_max_position_embeddings_below_two_is_refused(rope_type, extra):
    # longrope divides by log(original_max_position_embeddings)
    params = {"rope_type": rope_type, "original_max_position_embeddings": 1, **extra, **ROPE}
    assert_refused({"rope_parameters": params}, "original_max_position_embeddings", "1")


@pytest.mark.parametrize("missing", ["low_freq_factor", "high_freq_factor"])
def test_llama3_rope_without_freq_factors_is_refused(missing):
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, **ROPE}
    del params[missing]
    assert_refused({"rope_parameters": params}, missing)


@pytest.mark.parametrize("low, high", [(4.0, 1.0), (2.0, 2.0)])
def test_llama3_rope_with_high_freq_not_above_low_is_refused(low, high):
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high, **ROPE}
    assert_refused({"rope_parameters": params}, "high_freq_factor", str(high), "low_freq_factor", str(low))


@pytest.mark.parametrize("fast, slow", [(1.0, 2.0), (4.0, 4.5)])
def test_yarn_rope_with_beta_fast_below_beta_slow_is_refused(fast, slow):
    params = {"rope_type": "yarn", "factor": 2.0, "beta_fast": fast, "beta_slow": slow, **ROPE}
    assert_refused({"rope_parameters": params}, "beta_fast", str(fast), "beta_slow", str(slow))


def test_yarn_rope_with_equal_betas_is_accepted_as_kimi_k2_releases_it():
    """Kimi K2's YaRN: beta_fast == beta_slow == 1 (transformers widens the empty ramp by 0.001)."""
    params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, **ROPE}
    assert tiny_config(rope_parameters=params, max_position_embeddings=131072).rope_parameters["beta_fast"] == 1.0


def test_a_near_miss_of_a_rope_key_is_refused_naming_the_key():
    params = {"rope_type": "linear", "factor": 2.0, "factr": 4.0, **ROPE}
    assert_refused({"rope_parameters": params}, "'factr', not a rope key: did you mean 'factor'?")
    tiny_config(rope_parameters={"rope_type": "default", "scaling_factor": 1.0, **ROPE})  # another tool's key: kept


def test_null_legacy_rope_keywords_change_nothing_even_with_a_dict_per_layer_type():
    """An old config.json's "rope_scaling": null (or from_pretrained(..., rope_scaling=None))."""
    gemma3 = ArchLMConfig.from_preset("gemma3")
    assert ArchLMConfig(**{**gemma3.to_dict(), "rope_scaling": None, "rope_theta": None}).rope_parameters == gemma3.rope_parameters


@pytest.mark.parametrize("key", ["short_factor", "long_factor"])
@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_longrope_factor_list_of_wrong_length_is_refused(key, length):
    # head_dim 8 rotates 4 channel pairs: each list needs 4 entries
    params = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4, **ROPE}
    params[key] = [1.0] * length
    assert_refused({"rope_parameters": params}, key, "4")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_longrope_factor_list_with_non_positive_entry_is_refused(bad):
    params = {"rope_type": "longrope", "short_factor": [1.0, 1.0, bad, 1.0], "long_factor": [1.0] * 4, **ROPE}
    assert_refused({"rope_parameters": params}, "short_factor")


def test_longrope_factor_lists_of_head_dim_half_are_accepted():
    params = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, **ROPE}
    assert tiny_config(rope_parameters=params).rope_parameters["long_factor"] == [2.0] * 4


@pytest.mark.parametrize("position", ["alibi", "learned", "sinusoidal", "none"])
@pytest.mark.parametrize("rope_type, extra", [("linear", {"factor": 2.0}), ("dynamic", {"factor": 2.0}),
                                              ("yarn", {"factor": 2.0})])
def test_rope_scaling_with_non_rope_position_type_is_refused(position, rope_type, extra):
    assert_refused({"position_embedding_type": position, "rope_parameters": {"rope_type": rope_type, **extra, **ROPE}},
                   "position_embedding_type", repr(position), repr(rope_type))


@pytest.mark.parametrize("rope_type, extra", [("linear", {"factor": 2.0}), ("default", {})])
@pytest.mark.parametrize("factor, rotated", [(0.5, 4), (0.25, 2), (0.3, 2), (1.0, 8)])
def test_partial_rotary_factor_rotates_the_first_channels_of_each_head(rope_type, extra, factor, rotated):
    config = tiny_config(rope_parameters={"rope_type": rope_type, "partial_rotary_factor": factor, **extra, **ROPE})
    assert config.head_dim == 8 and config.rotary_dim() == rotated


@pytest.mark.parametrize("factor", [0.1, 0.375, 1.5, 0, -0.5])
def test_partial_rotary_factor_that_rotates_no_or_an_odd_number_of_channels_is_refused(factor):
    assert_refused({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": factor, **ROPE}},
                   "partial_rotary_factor", repr(factor))


def test_top_level_partial_rotary_factor_moves_into_rope_parameters_as_in_transformers():
    config = tiny_config(partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", **ROPE})
    assert config.rope_parameters["partial_rotary_factor"] == 0.5 and config.rotary_dim() == 4


# --- probabilities, eps, ids, window ---
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("field", ["attention_dropout", "hidden_dropout", "embedding_dropout"])
def test_dropout_outside_unit_interval_is_refused(field, value):
    assert_refused({field: value}, field, str(value))


@pytest.mark.parametrize("value", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("field", ["attention_dropout", "hidden_dropout", "embedding_dropout"])
def test_dropout_inside_unit_interval_is_accepted(field, value):
    assert getattr(tiny_config(**{field: value}), field) == value


@pytest.mark.parametrize("value", [0, 0.0, -1e-5])
def test_non_positive_norm_eps_is_refused(value):
    assert_refused({"norm_eps": value}, "norm_eps", str(value))


@pytest.mark.parametrize("value", [1e-45, 1e-13, float("inf"), float("nan")])
def test_norm_eps_below_1e_12_or_not_finite_is_refused(value):
    # a float32 norm of a near-zero vector (e.g. after dropout) with a vanishing eps gives inf/NaN gradients
    assert_refused({"norm_eps": value}, "norm_eps", repr(value))


@pytest.mark.parametrize("value", [1e-12, 1e-5, 0.5])
def test_norm_eps_from_1e_12_is_accepted(value):
    assert tiny_config(norm_eps=value).norm_eps == value


@pytest.mark.parametrize("value", [0, -0.02, 1.5, 1e30, float("inf"), float("nan")])
def test_initializer_range_outside_0_to_1_is_refused(value):
    assert_refused({"initializer_range": value}, "initializer_range", repr(value))


@pytest.mark.parametrize("field, value", [
    ("pad_token_id", 64), ("pad_token_id", -1), ("bos_token_id", 64), ("bos_token_id", -1),
    ("eos_token_id", 64), ("eos_token_id", -3), ("eos_token_id", [2, 64]), ("eos_token_id", [-1, 2]),
])
def test_special_token_id_outside_vocabulary_is_refused(field, value):
    assert_refused({field: value}, field, str(value), "64")


def test_special_token_ids_inside_vocabulary_are_accepted():
    config = tiny_config(pad_token_id=63, bos_token_id=0, eos_token_id=[2, 63])
    assert config.eos_token_id == [2, 63]


@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sliding_window_is_refused(value):
    assert_refused({"sliding_window": value}, "sliding_window", str(value))


def test_unknown_hidden_act_is_refused_listing_the_valid_ones():
    assert_refused({"hidden_act": "swiglu"}, "hidden_act", "'swiglu'", "silu", "gelu", "relu")


@pytest.mark.parametrize("field, allowed", [
    ("norm_type", ["rmsnorm", "layernorm", "layernorm_nobias"]),
    ("norm_position", ["pre", "post"]),
    ("position_embedding_type", ["rope", "alibi", "learned", "sinusoidal", "none"]),
    ("mlp_type", ["gated", "standard"]),
    ("init_scheme", ["normal", "scaled"]),
])
def test_unknown_option_is_refused_listing_the_allowed_values(field, allowed):
    assert_refused({field: "bogus"}, field, "bogus", *allowed)
    for value in allowed:  # and every listed value is accepted
        overrides = {field: value}
        assert getattr(tiny_config(**overrides), field) == value


@pytest.mark.parametrize("field, value", [
    ("hidden_size", "32"), ("num_hidden_layers", 2.0), ("qk_norm", "yes"), ("qk_norm", 1),
    ("tie_word_embeddings", 0), ("norm_eps", "1e-5"), ("attention_dropout", "0.1"), ("sliding_window", 2.5),
    ("eos_token_id", "2"), ("rope_parameters", "default"), ("hidden_act", 3), ("initializer_range", None),
    ("learned_position_embeddings", "no"), ("attention_bias", None),
])
def test_wrong_type_is_refused_naming_field_and_value(field, value):
    assert_refused({field: value}, field, repr(value) if not isinstance(value, str) else value)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_learned_position_embeddings_on_non_rope_alibi_type_is_refused(position):
    assert_refused({"learned_position_embeddings": True, "position_embedding_type": position},
                   "learned_position_embeddings", repr(position))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_learned_position_embeddings_on_rope_and_alibi_are_accepted(position):
    model = ArchLMForCausalLM(tiny_config(learned_position_embeddings=True, position_embedding_type=position))
    assert model.model.embed_positions.weight.shape == (TINY["max_position_embeddings"], TINY["hidden_size"])


# ------------------------------------------------------------------------------------------------
# legacy kwargs and loading
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"rope_theta": 500000.0},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "rope_theta": 1e6},
])
def test_legacy_rope_kwargs_give_the_same_rope_parameters_as_llama(kwargs):
    assert ArchLMConfig(**kwargs).rope_parameters == LlamaConfig(**kwargs).rope_parameters


@pytest.mark.parametrize("overrides, expected", [
    ({"rope_theta": 10000.0}, {"rope_type": "default", "rope_theta": 10000.0}),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e4}, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    ({"partial_rotary_factor": 0.5}, {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
])
def test_rope_overrides_of_a_preset_change_what_they_name_and_keep_its_base_frequency(overrides, expected):
    """transformers lets a rope dict's keys win over the legacy keywords, and a rope_scaling replace the dict whole:
    from_preset("llama", rope_theta=1e4) kept 500000, and a rope_scaling (as Qwen's model cards turn on YaRN) or a
    new rope dict reset it to 10000."""
    assert ArchLMConfig.from_preset("llama", **overrides).rope_parameters == expected
    if "rope_parameters" not in overrides:  # the constructor's keywords on a given dict alike
        llama = {"rope_type": "default", "rope_theta": 500000.0}
        assert ArchLMConfig(rope_parameters=llama, **overrides).rope_parameters == expected
    with pytest.raises(VALIDATION_ERRORS, match=r"\['rope_theta'\] cannot apply to `rope_parameters` holding one dict per layer type"):
        ArchLMConfig.from_preset("gemma3", rope_theta=1e4)


@pytest.mark.parametrize("other, field", [("rms_norm_eps", "norm_eps"), ("layer_norm_eps", "norm_eps"),
                                          ("num_layers", "num_hidden_layers"), ("use_qk_norm", "qk_norm")])
def test_other_families_names_of_fields_are_refused_naming_archlms(other, field):
    """Kept as unknown keys, they built the default model: ArchLMConfig(rms_norm_eps=1e-5) had norm_eps 1e-6."""
    with pytest.raises(VALIDATION_ERRORS, match=f"'{other}' is `{field}`"):
        ArchLMConfig(**{other: 1})
    with pytest.raises(ValueError, match=f"'{other}' \\(did you mean '{field}'\\?\\)"):
        ArchLMConfig.from_preset("llama", **{other: 1})


def test_a_dtype_that_is_not_torchs_and_a_string_vocabulary_are_refused_naming_the_field():
    with pytest.raises(VALIDATION_ERRORS, match="`dtype`='bf16' is not a torch dtype"):
        ArchLMConfig(dtype="bf16")
    with pytest.raises(VALIDATION_ERRORS, match="vocab_size"):  # (was: a TypeError comparing the special ids with it)
        ArchLMConfig.from_preset("llama", vocab_size="32000")


@pytest.mark.parametrize("loader", [ArchLMConfig.from_pretrained, AutoConfig.from_pretrained, ArchLMForCausalLM.from_pretrained,
                                    AutoModelForCausalLM.from_pretrained])
def test_from_pretrained_keywords_are_checked_as_fields(tmp_path, loader):
    """transformers sets a from_pretrained keyword as an attribute after construction, past every check: norm_eps=-1
    loaded and gave NaN logits; a rope_scaling left a rope dict without rope_theta (a TypeError in the forward)."""
    ArchLMForCausalLM(ArchLMConfig.from_preset("llama", **TINY_PRESET)).save_pretrained(tmp_path)
    with pytest.raises(VALIDATION_ERRORS, match="norm_eps"):
        loader(tmp_path, norm_eps=-1.0, trust_remote_code=True)
    loaded = loader(tmp_path, rope_scaling={"rope_type": "linear", "factor": 4.0}, hidden_dropout=0.1, trust_remote_code=True)
    config = getattr(loaded, "config", loaded)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    assert config.hidden_dropout == 0.1


TINY_PRESET = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                   intermediate_size=64)


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 3), ("norm_type", "batchnorm"), ("attention_dropout", 1.5), ("head_dim", 7),
    ("vocab_size", 0), ("pad_token_id", 1000),
])
@pytest.mark.parametrize("loader", [ArchLMConfig.from_pretrained, AutoConfig.from_pretrained, ArchLMForCausalLM.from_pretrained])
def test_from_pretrained_validates_a_hand_written_config(tmp_path, loader, field, value):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(VALIDATION_ERRORS, match=field):
        loader(tmp_path)


# ------------------------------------------------------------------------------------------------
# presets and descriptions
# ------------------------------------------------------------------------------------------------
PRESET_NAMES = {
    "gpt2": "12L-12H-768D-Learned-LN-GELU-PreNorm-Tied",
    "llama": "12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4",
    "mistral": "12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4-SWA1024",
    "qwen2": "12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4-Tied",
    "qwen3": "12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4-QKNorm-Tied",
    "hybrid": "12L-12H-768D-RoPE-LN-GELU-PreNorm",
}


def test_presets_lists_every_family():
    assert set(PRESET_NAMES) <= set(ArchLMConfig.presets())


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_preset_architecture_name(name):
    assert ArchLMConfig.from_preset(name).architecture_name == PRESET_NAMES[name]


def test_preset_families_differ_where_the_families_do():
    qwen2, qwen3, hybrid = (ArchLMConfig.from_preset(name) for name in ("qwen2", "qwen3", "hybrid"))
    assert qwen2.attention_bias and not qwen2.attention_output_bias  # q/k/v bias only
    assert qwen3.qk_norm and qwen3.head_dim == 64
    assert (hybrid.position_embedding_type, hybrid.norm_type, hybrid.mlp_type, hybrid.hidden_act, hybrid.norm_position) == (
        "rope", "layernorm", "standard", "gelu", "pre")


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_from_preset_applies_overrides(name):
    overrides = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=32)
    if name == "mistral":
        overrides["sliding_window"] = 8
    config = ArchLMConfig.from_preset(name, **overrides)
    for field, value in overrides.items():
        assert getattr(config, field) == value
    default = ArchLMConfig.from_preset(name)
    assert (config.norm_type, config.position_embedding_type, config.mlp_type) == (
        default.norm_type, default.position_embedding_type, default.mlp_type)
    assert config.architecture_name.startswith("2L-4H-64D-")


def test_from_preset_overrides_are_validated():
    with pytest.raises(VALIDATION_ERRORS, match="num_key_value_heads"):
        ArchLMConfig.from_preset("llama", num_key_value_heads=5)


def test_a_key_that_is_nearly_a_field_is_kept_with_a_warning_naming_the_field(tmp_path, caplog):
    """As every transformers config, the constructor keeps unknown keys (other tools write theirs into config.json);
    a typo of a field would build the default model without a word."""
    with caplog.at_level("WARNING"):
        config = ArchLMConfig(hiden_size=64, tool_metadata={"from": "elsewhere"})
    assert config.hidden_size != 64 and config.hiden_size == 64 and config.tool_metadata == {"from": "elsewhere"}
    assert "'hiden_size' is not a field (kept as an attribute); did you mean 'hidden_size'?" in caplog.text
    assert "tool_metadata" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        ArchLMConfig.from_preset("mixtral", num_local_experts=4).save_pretrained(tmp_path)
        ArchLMConfig.from_pretrained(tmp_path)
    assert "is not a field" not in caplog.text


def test_unknown_preset_is_refused_listing_the_presets():
    with pytest.raises(ValueError) as excinfo:
        ArchLMConfig.from_preset("gpt5")
    assert "gpt5" in str(excinfo.value)
    for name in PRESET_NAMES:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_summary_holds_architecture_name_and_parameter_count(name):
    config = ArchLMConfig.from_preset(name)
    summary = config.summary()
    assert config.architecture_name in summary
    assert f"{config.num_parameters_estimate():,}" in summary


def test_preset_parameter_estimate_matches_the_built_model():
    # one real-size build (llama preset, ~100M parameters) to check the estimate beyond tiny widths
    config = ArchLMConfig.from_preset("llama", num_hidden_layers=2, vocab_size=1000)
    assert config.num_parameters_estimate() == ArchLMForCausalLM(config).num_parameters()


PARAMETER_OPTIONS = {
    "norm_type": ["rmsnorm", "layernorm", "layernorm_nobias"],
    "norm_position": ["pre", "post"],
    "mlp_type": ["gated", "standard"],
    "attention_bias": [False, True],
    "attention_output_bias": [None, False, True],
    "mlp_bias": [False, True],
    "tie_word_embeddings": [False, True],
    "qk_norm": [False, True],
    "positions": ["rope", "learned", "rope+learned", "alibi+learned", "sinusoidal", "none"],
    "heads": [(4, 4, None), (4, 2, None), (4, 1, None), (4, 2, 6)],  # (heads, kv_heads, head_dim)
    "hidden_act": ["silu", "gelu", "relu", "prelu", "xielu"],
    "intermediate_size": [None, 48],
}


def _estimate_grid():
    """Every value of every option once (from a base), plus 40 seeded random combinations."""
    base = {name: values[0] for name, values in PARAMETER_OPTIONS.items()}
    grid = [dict(base, **{name: value}) for name, values in PARAMETER_OPTIONS.items() for value in values[1:]]
    rng = random.Random(0)
    grid += [{name: rng.choice(values) for name, values in PARAMETER_OPTIONS.items()} for _ in range(40)]
    return [base] + grid


def _config_from_options(options: dict) -> ArchLMConfig:
    options = dict(options)
    position = options.pop("positions")
    heads, kv_heads, head_dim = options.pop("heads")
    return tiny_config(
        position_embedding_type=position.split("+")[0], learned_position_embeddings=position.endswith("+learned"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **options,
    )


@pytest.mark.parametrize("options", _estimate_grid(), ids=lambda options: "-".join(
    f"{value}" for value in options.values()))
def test_num_parameters_estimate_equals_built_model(options):
    config = _config_from_options(options)
    assert config.num_parameters_estimate() == ArchLMForCausalLM(config).num_parameters()


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
ROUND_TRIP_CONFIGS = [
    dict(),
    dict(norm_type="layernorm_nobias", norm_position="post", position_embedding_type="alibi",
         learned_position_embeddings=True, mlp_type="standard", hidden_act="gelu_new", qk_norm=True,
         sliding_window=8, attention_bias=True, attention_output_bias=False, mlp_bias=True, tie_word_embeddings=True,
         attention_dropout=0.1, hidden_dropout=0.2, embedding_dropout=0.3, initializer_range=0.05,
         init_scheme="scaled", use_cache=False, pad_token_id=5, bos_token_id=None, eos_token_id=[2, 3],
         num_key_value_heads=2, head_dim=6, norm_eps=1e-3),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0, "beta_fast": 16.0, "beta_slow": 2.0}),
    dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
]


@pytest.mark.parametrize("overrides", ROUND_TRIP_CONFIGS)
def test_save_load_round_trip_preserves_every_field(tmp_path, overrides):
    config = tiny_config(**overrides)
    config.save_pretrained(tmp_path)
    loaded = ArchLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    for field, value in overrides.items():
        assert getattr(loaded, field) == (value if field != "rope_parameters" else config.rope_parameters)


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_preset_round_trip_preserves_every_field(tmp_path, name):
    config = ArchLMConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    assert ArchLMConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    auto = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert auto.pop("_name_or_path") == str(tmp_path)
    assert auto == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


def test_derived_defaults():
    gated, standard = tiny_config(intermediate_size=None), tiny_config(intermediate_size=None, mlp_type="standard")
    assert gated.intermediate_size == 128  # 8/3 * 32 rounded up to a multiple of 64
    assert standard.intermediate_size == 4 * 32
    config = tiny_config(attention_bias=True)
    assert (config.head_dim, config.num_key_value_heads, config.attention_output_bias) == (8, 4, True)


def test_callers_rope_dict_is_not_modified():
    params = {"rope_type": "linear", "factor": 2.0}
    tiny_config(rope_parameters=params)
    assert params == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("preset", ["gpt2", "qwen2", "qwen3"])
def test_a_preset_with_a_smaller_vocabulary_drops_the_special_ids_that_do_not_fit(preset):
    config = ArchLMConfig.from_preset(preset, vocab_size=8192, num_hidden_layers=1)
    assert config.vocab_size == 8192
    assert config.bos_token_id is None and config.eos_token_id is None
    kept = ArchLMConfig.from_preset("llama", vocab_size=8192, num_hidden_layers=1)
    assert (kept.bos_token_id, kept.eos_token_id) == (1, 2)  # ids that fit stay


def test_special_ids_given_with_a_preset_are_still_validated():
    config = ArchLMConfig.from_preset("qwen3", vocab_size=8192, num_hidden_layers=1, eos_token_id=5)
    assert config.eos_token_id == 5 and config.bos_token_id is None
    with pytest.raises(VALIDATION_ERRORS, match="eos_token_id"):
        ArchLMConfig.from_preset("qwen3", vocab_size=8192, num_hidden_layers=1, eos_token_id=151645)


# --- the options of the modern families ---
@pytest.mark.parametrize("overrides, fragments", [
    (dict(layer_types=["full_attention", "sliding_attention"]), ["sliding_window", "sliding_attention"]),
    (dict(layer_types=["full_attention"]), ["num_hidden_layers", "layer_types"]),
    (dict(layer_types=["full_attention", "chunked_attention"], sliding_window=4), ["layer_types", "chunked_attention"]),
    (dict(no_rope_layers=[1, 2]), ["no_rope_layers", "[1, 2]"]),
    (dict(no_rope_layers=[1]), ["no_rope_layers", "one 0 (no rope) or 1 (rope) per layer"]),
    (dict(no_rope_layers=[1, 0], position_embedding_type="alibi"), ["no_rope_layers", "alibi"]),
    (dict(rope_interleaved=True, position_embedding_type="learned"), ["rope_interleaved", "learned"]),
    (dict(no_rope_layer_interval=0), ["no_rope_layer_interval", "0"]),
    (dict(attn_logit_softcapping=0.0), ["attn_logit_softcapping", "0.0"]),
    (dict(final_logit_softcapping=-1.0), ["final_logit_softcapping", "-1.0"]),
    (dict(clip_qkv=float("inf")), ["clip_qkv", "inf"]),
    (dict(embedding_multiplier=0.0), ["embedding_multiplier", "0.0"]),
    (dict(residual_multiplier=float("nan")), ["residual_multiplier", "nan"]),
    (dict(logits_scaling=-2.0), ["logits_scaling", "-2.0"]),
    (dict(logits_scaling=1e-105), ["logits_scaling", "1e-105", "[1e-6, 1e6]"]),  # found by the property test
    (dict(embedding_multiplier=1e7), ["embedding_multiplier", "[1e-6, 1e6]"]),
    (dict(attention_multiplier=0.5, query_pre_attn_scalar=16), ["attention_multiplier", "query_pre_attn_scalar"]),
    (dict(init_scheme="magneto", sub_layernorm=False), ["init_scheme", "magneto", "sub_layernorm"]),
    (dict(norm_position="peri"), ["norm_position", "peri"]),
    (dict(num_experts=4, sub_layernorm=True), ["sub_layernorm", "routed experts", "num_experts=4"]),
    (dict(num_experts=4, init_scheme="magneto"), ["sub_layernorm", "magneto", "routed experts"]),
    (dict(mlp_only_layers=[7]), ["mlp_only_layers", "[0, 1]", "[7]"]),  # checked on a dense model too
    (dict(position_embedding_type="learned", learned_position_embeddings=True),
     ["learned_position_embeddings", "'learned' has them already"]),
    (dict(swiglu_limit=0), ["swiglu_limit", "[1e-6, 1e6]", "got 0"]),
    (dict(swiglu_limit=float("inf")), ["swiglu_limit", "inf"]),
    (dict(swiglu_limit=7.0, mlp_type="standard"), ["swiglu_limit", "mlp_type='standard'", "gated"]),
    # the rounding options: each on a model where it has something to round
    (dict(parallel_residual_order="sublayers_first"), ["parallel_residual_order", "use_parallel_residual=True"]),
    (dict(use_parallel_residual=True, parallel_residual_order="attention_first"), ["parallel_residual_order"]),
    (dict(norm_weight_fp32=True, norm_type="layernorm"), ["norm_weight_fp32", "norm_type='layernorm'"]),
    (dict(norm_weight_fp32=True, norm_type="layernorm", qk_norm=True, qk_norm_type="rmsnorm_unit_offset"),
     ["norm_weight_fp32", "qk_norm_type='rmsnorm_unit_offset'"]),
    (dict(attention_sinks_in_softmax=True), ["attention_sinks_in_softmax", "attention_sinks=True"]),
    (dict(qk_norm_position="after_rope"), ["qk_norm_position", "'after_rope'", "qk_norm=False"]),
    (dict(qk_norm=True, qk_norm_position="after_mlp"), ["qk_norm_position", "after_mlp"]),
    (dict(rope_precision="float32", position_embedding_type="alibi"), ["rope_precision", "'float32'", "alibi"]),
    (dict(rope_precision="float64"), ["rope_precision", "float64"]),
    (dict(layernorm_precision="float32"), ["layernorm_precision", "'float32'", "no LayerNorm", "norm_type='rmsnorm'"]),
    (dict(norm_type="layernorm", layernorm_precision="float16"), ["layernorm_precision", "float16"]),
    (dict(qk_norm_scope="token"), ["qk_norm_scope", "token"]),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}, sliding_window=4,
          layer_types=["full_attention", "sliding_attention"]), ["rope_parameters", "sliding_attention"]),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4}}), ["full_attention", "factor"]),
    # multi-head latent attention
    (dict(kv_lora_rank=0), ["kv_lora_rank", "0"]),
    (dict(q_lora_rank=8), ["q_lora_rank", "latent attention", "kv_lora_rank"]),
    (dict(kv_lora_rank=16, v_head_dim=8), ["qk_nope_head_dim"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=2),
     ["num_key_value_heads", "(2)", "num_attention_heads", "(4)"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, qk_norm=True), ["qk_norm", "latent attention"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, position_embedding_type="alibi"),
     ["position_embedding_type", "'alibi'", "'rope'"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, rope_parameters=HALF_ROPE),
     ["partial_rotary_factor", "0.5"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, sliding_window=4), ["layer_types", "full attention"]),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, rope_precision="float32_rotation"),
     ["rope_precision", "latent attention", "'default'"]),
])
def test_bad_values_of_the_new_options_are_refused_naming_the_field(overrides, fragments):
    assert_refused(overrides, *fragments)


def test_derived_per_layer_fields():
    assert tiny_config().layer_types == ["full_attention"] * 2
    assert tiny_config(sliding_window=4).layer_types == ["sliding_attention"] * 2
    config = tiny_config(num_hidden_layers=8, no_rope_layer_interval=4)
    assert config.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]  # SmolLM3's rule: every 4th layer has no rope
    assert not config.layer_uses_rope(3) and config.layer_uses_rope(4)
    assert tiny_config(init_scheme="magneto").sub_layernorm is True
    assert tiny_config(query_pre_attn_scalar=16).attention_scaling == 16**-0.5
    assert tiny_config(attention_multiplier=0.25).attention_scaling == 0.25


@pytest.mark.parametrize("layers, expected", [(12, (["sliding_attention"] * 5 + ["full_attention"]) * 2),
                                              (3, ["sliding_attention"] * 3)])
def test_a_preset_layer_pattern_follows_an_overridden_depth(layers, expected):
    config = ArchLMConfig.from_preset("gemma3", num_hidden_layers=layers, hidden_size=64, num_attention_heads=4,
                                      vocab_size=512)
    assert config.layer_types == expected


@pytest.mark.parametrize("overrides, tag", [
    (dict(use_parallel_residual=True), "-Parallel"),
    (dict(use_parallel_residual=True, parallel_shared_norm=False), "-Parallel2Norm"),
    (dict(norm_position="sandwich"), "-Sandwich"),
    (dict(norm_position="sublayer_output"), "-PostSublayer"),
    (dict(attn_logit_softcapping=50.0), "-Softcap"),
    (dict(final_logit_softcapping=30.0), "-Softcap"),
    (dict(num_hidden_layers=4, sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 2), "-SWA512x1:1"),
    (dict(num_hidden_layers=6, sliding_window=8, layer_types=["sliding_attention"] * 5 + ["full_attention"]), "-SWA8x5:1"),
    (dict(num_hidden_layers=8, no_rope_layer_interval=4), "-NoPE1:4"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}), "-RoPE(25%)-"),
    (dict(rope_interleaved=True), "-RoPE(interleaved)-"),
    (dict(norm_type="rmsnorm_unit_offset"), "-RMS+1-"),
    (dict(norm_type="layernorm_noaffine"), "-LNNoAffine-"),
    (dict(qk_norm=True, qk_norm_scope="full"), "-QKNormFull"),
    (dict(qk_norm=True, qk_norm_position="after_rope"), "-QKNormAfterRope"),
    (dict(clip_qkv=8.0), "-ClipQKV8"),
    (dict(init_scheme="magneto"), "-SubLN"),
    (dict(scale_embeddings_by_sqrt_hidden=True), "-EmbScale"),
    (dict(residual_multiplier=0.22), "-Mult"),
    (dict(lm_head_bias=True), "-HeadBias"),
])
def test_architecture_name_shows_the_new_parts(overrides, tag):
    assert tag in tiny_config(**overrides).architecture_name


def test_summary_has_a_row_for_each_new_part():
    summary = ArchLMConfig.from_preset("gemma3", num_hidden_layers=6).summary()
    for row in ("block", "attention layers", "attention scale", "rope-free layers", "multipliers", "qk norm"):
        assert row in summary, row
    assert "5 sliding (window 512), 1 full" in summary
