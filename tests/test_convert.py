"""Parity of `archlm.convert` with transformers' own GPT-2, Llama, Mistral, Qwen2, Qwen3, both ways (the other
families: test_convert_families.py), and the converter's refusals and command line.

Each reference is a tiny, seeded model with every parameter randomised (norm weights around 1, biases non-zero),
so a swapped, missing or mis-split weight shows in the logits. `from_transformers` must give the transformers
model's logits, and `to_transformers` (the native export) the ArchLM model's, and back again (rtol 1e-4), under
eager and sdpa attention, with and without left padding. Exported folders must load with plain
`AutoModelForCausalLM` in a process where archlm cannot be imported.

    .venv/bin/python -m pytest tests/test_convert.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VALIDATION_ERRORS
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3ForCausalLM,
    Starcoder2ForCausalLM,
)

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.convert import export_folder, from_transformers, to_transformers
from archlm.convert import main as convert_main

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
SEQ_LEN = 12  # longer than Mistral's / Qwen2's sliding windows below
LEFT_PADDING = [0, 3, 7]  # pad tokens before each row's text
PAD = 0

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)

# id -> (transformers class, config). The id names the family and the features the case proves.
CASES = {
    "llama-llama3rope-gqa": (LlamaForCausalLM, lambda: LlamaConfig(
        **TINY, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-yarnrope-headdim32-bias": (LlamaForCausalLM, lambda: LlamaConfig(
        **TINY, head_dim=32, rope_parameters=YARN_ROPE, attention_bias=True, mlp_bias=True)),
    "mistral-slidingwindow4-gqa": (MistralForCausalLM, lambda: MistralConfig(
        **TINY, num_key_value_heads=2, sliding_window=4)),
    "qwen2-qkvbias-tied": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-allsliding5": (Qwen2ForCausalLM, lambda: Qwen2Config(  # max_window_layers=0: every layer slides
        **TINY, num_key_value_heads=4, use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    "qwen3-qknorm-headdim32-gqa": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **TINY, num_key_value_heads=2, head_dim=32)),
    "qwen2-fullthensliding4": (Qwen2ForCausalLM, lambda: Qwen2Config(  # layer 0 full, layer 1 sliding
        **TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-slidingthenfull4": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    "gpt2-learnedpos-layernorm-gelunew-tied": (GPT2LMHeadModel, lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu_new",
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2)),
}

PARITY_ERRORS: dict[str, float] = {}  # test id -> max relative logit error, printed at the end of the module


def randomised(model: PreTrainedModel) -> PreTrainedModel:
    """Every parameter drawn at random: matrices and biases N(0, 0.1), norm weights 1 + N(0, 0.3)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.1)
            if parameter.ndim == 1 and name.endswith("weight"):  # a norm's scale
                parameter.normal_(1.0, 0.3)
    return model.eval()


def build_reference(case: str, attn_implementation: str = "sdpa") -> PreTrainedModel:
    model_class, make_config = CASES[case]
    torch.manual_seed(0)
    model = randomised(model_class(make_config()))
    model.set_attn_implementation(attn_implementation)
    return model


def batch(left_padding: bool) -> dict[str, torch.Tensor]:
    """Random tokens; with left padding, the mask and the `position_ids` that `generate` passes."""
    generator = torch.Generator(torch.get_default_device()).manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (len(LEFT_PADDING), SEQ_LEN), generator=generator)
    if not left_padding:
        return {"input_ids": input_ids, "labels": input_ids}
    attention_mask = torch.ones_like(input_ids)
    for row, pads in enumerate(LEFT_PADDING):
        attention_mask[row, :pads] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def report_parity_errors(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not PARITY_ERRORS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\nmax relative logit error, converted ArchLM vs transformers (export-*: native export vs ArchLM):")
        for test_id, error in PARITY_ERRORS.items():
            reporter.write_line(f"  {test_id:<62} {error:.2e}")
    PARITY_ERRORS.clear()  # each module that uses this fixture prints its own


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("left_padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_and_loss_match_transformers(case, attn_implementation, left_padding):
    reference = build_reference(case, attn_implementation)
    ours = from_transformers(reference)
    assert isinstance(ours, ArchLMForCausalLM)
    assert ours.config._attn_implementation == attn_implementation
    assert not ours.training

    inputs = batch(left_padding)
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
    real_tokens = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    # only positions holding text: what a fully masked (padding) query row attends to is implementation-defined
    ours_logits, reference_logits = actual.logits[real_tokens], expected.logits[real_tokens]
    PARITY_ERRORS[f"{case}-{attn_implementation}-{'leftpad' if left_padding else 'nopad'}"] = max_relative_error(
        ours_logits, reference_logits
    )
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["mistral-slidingwindow4-gqa", "gpt2-learnedpos-layernorm-gelunew-tied"])
def test_greedy_generation_matches_transformers(case):
    """Left-padded batch, KV cache, generating past Mistral's window: the same tokens come out."""
    reference = build_reference(case)
    assert_same_greedy_generation(from_transformers(reference), reference)


def assert_same_greedy_generation(actual_model, expected_model):
    """Greedy generation of a left-padded batch with the KV cache: the same tokens and scores."""
    inputs = batch(left_padding=True)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=10,
                  do_sample=False, pad_token_id=PAD, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    expected, actual = expected_model.generate(**kwargs), actual_model.generate(**kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-5)


def test_conversion_keeps_tied_embeddings_tied():
    for case in ("qwen2-qkvbias-tied", "gpt2-learnedpos-layernorm-gelunew-tied"):
        ours = from_transformers(build_reference(case))
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours = from_transformers(build_reference("llama-llama3rope-gqa"))
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight


def test_conversion_keeps_dtype_and_copies_the_rope_parameters():
    reference = build_reference("llama-llama3rope-gqa").to(torch.bfloat16)
    ours = from_transformers(reference)
    assert ours.dtype == torch.bfloat16
    assert ours.config.rope_parameters == reference.config.rope_parameters
    assert ours.config.rope_parameters is not reference.config.rope_parameters


def test_llama_pretraining_tp_converts_because_transformers_ignores_it():
    """transformers 5 no longer slices Llama's matmuls by `pretraining_tp`: the math is unchanged, so it converts."""
    torch.manual_seed(0)
    reference = randomised(LlamaForCausalLM(LlamaConfig(**TINY, pretraining_tp=2)))
    inputs = batch(left_padding=False)
    with torch.no_grad():
        torch.testing.assert_close(from_transformers(reference)(**inputs).logits, reference(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# What cannot be converted
# ------------------------------------------------------------------------------------------------
def test_unsupported_model_class_lists_the_supported_ones():
    with pytest.raises(ValueError, match="LlamaModel") as error:
        from_transformers(LlamaModel(LlamaConfig(**TINY)))
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(error.value)


UNSUPPORTED = {
    "gpt2-scale_attn_by_inverse_layer_idx": (GPT2LMHeadModel, GPT2Config, dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2-reorder_and_upcast_attn": (GPT2LMHeadModel, GPT2Config, dict(reorder_and_upcast_attn=True)),
    "llama-partial_rotary_factor": (LlamaForCausalLM, LlamaConfig, dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_config_field_is_refused_by_name(case):
    model_class, config_class, fields = UNSUPPORTED[case]
    field = case.split("-", 1)[1]
    tiny = dict(TINY, n_embd=64, n_layer=2, n_head=4) if config_class is GPT2Config else TINY
    model = model_class(config_class(**tiny, **fields))
    with pytest.raises(ValueError, match=f"`{field}`="):
        from_transformers(model)


def test_a_native_config_archlm_cannot_hold_is_refused_with_a_value_error_naming_the_field():
    """transformers builds a Qwen2-MoE whose sparse step skips every layer (a dense model with expert settings);
    ArchLM's config refuses that, and the conversion says so as a ValueError (what the CLI reports), not as
    huggingface_hub's validation error."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY, num_key_value_heads=4, num_experts=4, decoder_sparse_step=3))
    with pytest.raises(ValueError, match=r"(?s)Cannot convert this qwen2_moe model.*`num_experts`=4 but no layer is sparse"):
        from_transformers(model)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_cli_converts_a_saved_llama_folder_with_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    in_dir, out_dir = tmp_path / "llama", tmp_path / "archlm"
    reference = build_reference("llama-llama3rope-gqa")
    reference.save_pretrained(in_dir)
    word_level = Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<pad>"))
    word_level.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>").save_pretrained(in_dir)

    subprocess.run(
        [sys.executable, "-m", "archlm.convert", "--from-transformers", str(in_dir), str(out_dir)],
        check=True, cwd=REPO_ROOT, capture_output=True, timeout=300,
    )

    assert (out_dir / "tokenizer.json").exists()
    assert (out_dir / "modeling_archlm.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    assert loaded.config.model_type == "archlm"
    inputs = batch(left_padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=1e-4, atol=1e-5)


# ================================================================================================
# The way back: `to_transformers` exports an ArchLM model to the native family that computes it
# ================================================================================================
ARCHLM_TINY = dict(TINY, tie_word_embeddings=False)  # the same sizes as the reference models above

# id -> (the class it must export to, config). The id names the family and the features the case proves.
EXPORT_CASES = {
    "llama-llama3rope-gqa": (LlamaForCausalLM, lambda: ArchLMConfig.from_preset(
        "llama", **ARCHLM_TINY, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-yarnrope-headdim32-allbias": (LlamaForCausalLM, lambda: ArchLMConfig.from_preset(
        "llama", **ARCHLM_TINY, head_dim=32, rope_parameters=YARN_ROPE, attention_bias=True, mlp_bias=True)),
    "llama-outputbiasonly-zerofilled": (LlamaForCausalLM, lambda: ArchLMConfig.from_preset(
        "llama", **ARCHLM_TINY, attention_output_bias=True)),
    "mistral-slidingwindow4-gqa": (MistralForCausalLM, lambda: ArchLMConfig.from_preset(
        "mistral", **ARCHLM_TINY, num_key_value_heads=2, sliding_window=4)),
    "qwen2-qkvbias-tied": (Qwen2ForCausalLM, lambda: ArchLMConfig.from_preset(
        "qwen2", **dict(TINY, tie_word_embeddings=True), num_key_value_heads=2)),
    "qwen2-qkvbias-slidingwindow5": (Qwen2ForCausalLM, lambda: ArchLMConfig.from_preset(
        "qwen2", **ARCHLM_TINY, sliding_window=5)),
    "qwen3-qknorm-headdim32-gqa": (Qwen3ForCausalLM, lambda: ArchLMConfig.from_preset(
        "qwen3", **ARCHLM_TINY, num_key_value_heads=2, head_dim=32)),
    "qwen3-qknorm-allbias-slidingwindow4": (Qwen3ForCausalLM, lambda: ArchLMConfig.from_preset(
        "qwen3", **ARCHLM_TINY, head_dim=16, attention_bias=True, sliding_window=4)),
    "gpt2-preset-tied": (GPT2LMHeadModel, lambda: ArchLMConfig.from_preset(
        "gpt2", **dict(TINY, tie_word_embeddings=True))),
    "starcoder2-hybrid-preset": (Starcoder2ForCausalLM, lambda: ArchLMConfig.from_preset("hybrid", **ARCHLM_TINY)),
    "smollm3-slidingwindow-biases": (SmolLM3ForCausalLM, lambda: ArchLMConfig.from_preset(
        "mistral", **ARCHLM_TINY, sliding_window=4, attention_bias=True, mlp_bias=True)),
    "gpt2-nobias-layernormnobias-untied-zerofilled": (GPT2LMHeadModel, lambda: ArchLMConfig.from_preset(
        "gpt2", **ARCHLM_TINY, attention_bias=False, mlp_bias=False, norm_type="layernorm_nobias")),
    # every layer slides: the partial rotary factor is the sliding layers' (there are no full ones to read it from)
    "phi3-partialrope50-everylayerslides": (Phi3ForCausalLM, lambda: ArchLMConfig.from_preset(
        "mistral", **ARCHLM_TINY, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
}


def build_archlm(case: str, attn_implementation: str = "sdpa") -> ArchLMForCausalLM:
    torch.manual_seed(0)
    model = randomised(ArchLMForCausalLM(EXPORT_CASES[case][1]()))
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.mark.parametrize("left_padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_exported_logits_match_and_the_round_trip_returns_them(case, attn_implementation, left_padding):
    ours = build_archlm(case, attn_implementation)
    native = to_transformers(ours)
    assert type(native) is EXPORT_CASES[case][0]
    assert native.config._attn_implementation == attn_implementation
    assert not native.training
    back = from_transformers(native)  # and home again

    inputs = batch(left_padding)
    with torch.no_grad():
        expected, exported, round_trip = ours(**inputs), native(**inputs), back(**inputs)
    real_tokens = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    reference_logits = expected.logits[real_tokens]
    PARITY_ERRORS[f"export-{case}-{attn_implementation}-{'leftpad' if left_padding else 'nopad'}"] = (
        max_relative_error(exported.logits[real_tokens], reference_logits)
    )
    for actual in (exported, round_trip):
        torch.testing.assert_close(actual.logits[real_tokens], reference_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["mistral-slidingwindow4-gqa", "gpt2-preset-tied"])
def test_exported_greedy_generation_matches_archlm(case):
    """Left-padded batch, KV cache, generating past Mistral's window: the same tokens come out."""
    ours = build_archlm(case)
    assert_same_greedy_generation(to_transformers(ours), ours)


def test_export_keeps_tying_dtype_and_copies_the_rope_parameters():
    for case, tied in (("qwen2-qkvbias-tied", True), ("gpt2-preset-tied", True), ("llama-llama3rope-gqa", False)):
        native = to_transformers(build_archlm(case))
        assert (native.lm_head.weight is native.get_input_embeddings().weight) is tied, case
    ours = build_archlm("llama-llama3rope-gqa").to(torch.bfloat16)
    native = to_transformers(ours)
    assert native.dtype == torch.bfloat16
    assert native.config.rope_parameters == ours.config.rope_parameters
    assert native.config.rope_parameters is not ours.config.rope_parameters


def test_export_drops_hidden_and_embedding_dropout_with_a_warning(caplog):
    """Llama has neither: dropout is off at inference, so the logits stay equal, and the user is told."""
    torch.manual_seed(0)
    ours = randomised(ArchLMForCausalLM(ArchLMConfig.from_preset(
        "llama", **ARCHLM_TINY, hidden_dropout=0.1, embedding_dropout=0.2, attention_dropout=0.1)))
    with caplog.at_level("WARNING", logger="archlm.convert"):
        native = to_transformers(ours)
    assert "`hidden_dropout`" in caplog.text and "`embedding_dropout`" in caplog.text
    assert native.config.attention_dropout == 0.1  # this one has an equivalent
    inputs = batch(left_padding=False)
    with torch.no_grad():
        torch.testing.assert_close(native(**inputs).logits, ours(**inputs).logits, rtol=1e-4, atol=1e-5)


# id -> (preset, overrides, the class named as nearest, every field that must be named)
NON_EXPORTABLE = {
    "alibi-postnorm-geglu": ("llama", dict(position_embedding_type="alibi", norm_position="post", hidden_act="gelu"),
                             "LlamaForCausalLM", ["position_embedding_type", "norm_position", "hidden_act"]),
    "rope-plus-learned-positions": ("llama", dict(learned_position_embeddings=True), "LlamaForCausalLM",
                                    ["learned_position_embeddings"]),
    "learned-positions-llama-blocks": ("llama", dict(position_embedding_type="learned", num_key_value_heads=2),
                                       "LlamaForCausalLM", ["position_embedding_type"]),
    "post-norms-on-plain-rmsnorm": ("llama", dict(norm_position="post"), "LlamaForCausalLM", ["norm_position"]),
    "parallel-softcap-subln": ("llama", dict(use_parallel_residual=True, attn_logit_softcapping=30.0, init_scheme="magneto"),
                               "LlamaForCausalLM", ["use_parallel_residual", "sub_layernorm", "attn_logit_softcapping"]),
    "qk-norm-with-layernorm-and-mlp-bias": ("qwen3", dict(norm_type="layernorm", mlp_bias=True), "Qwen3ForCausalLM",
                                            ["norm_type", "mlp_bias"]),
    # the routing bias changes which experts run; none of the MoE families has one
    "moe-with-routing-bias": ("mixtral", dict(num_experts=4, router_bias_update_rate=1e-3), "MixtralForCausalLM",
                              ["router_bias_update_rate"]),
    # one mismatch for Mixtral and for Llama (num_experts): the mixture is named after a mixture family
    "moe-with-mlp-bias": ("mixtral", dict(num_experts=4, mlp_bias=True), "MixtralForCausalLM", ["mlp_bias"]),
}


@pytest.mark.parametrize("case", list(NON_EXPORTABLE))
def test_non_exportable_config_is_refused_naming_every_field(case):
    preset, overrides, nearest, fields = NON_EXPORTABLE[case]
    model = ArchLMForCausalLM(ArchLMConfig.from_preset(preset, **{**ARCHLM_TINY, **overrides}))
    with pytest.raises(ValueError, match=nearest) as error:
        to_transformers(model)
    for field in fields:
        assert f"`{field}`=" in str(error.value), field
    assert str(error.value).count("\n  - ") == len(fields)  # those, and nothing else


@pytest.mark.parametrize("dtype, width", [(torch.float64, 32), (torch.bfloat16, 12)], ids=["fp64", "bf16-unaligned-width"])
def test_exported_mixture_runs_where_torchs_grouped_mm_cannot(dtype, width):
    """torch's grouped_mm (transformers' default for experts) takes fp32/bf16/fp16 rows of 16-byte multiples; an
    export outside that gets transformers' eager experts, so the native model runs and computes the same logits."""
    torch.manual_seed(0)
    model = ArchLMForCausalLM(ArchLMConfig.from_preset("mixtral", **{**ARCHLM_TINY, "num_experts": 4,
                                                                     "moe_intermediate_size": width})).to(dtype).eval()
    native = to_transformers(model)
    assert native.config._experts_implementation == "eager"
    input_ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        expected, logits = model(input_ids).logits.float(), native(input_ids).logits.float()
    # float64: transformers computes rope in float32 there (~1e-8); bf16: the eager experts sum in another order
    tolerance = 1e-6 if dtype == torch.float64 else 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(logits, expected, rtol=0, atol=tolerance)
    fp32 = to_transformers(model.float())  # where grouped_mm works, it stays transformers' default
    assert fp32.config._experts_implementation == "grouped_mm"


def test_export_refuses_what_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="ArchLMModel"):
        to_transformers(build_archlm("llama-llama3rope-gqa").model)


def test_cli_refuses_a_non_exportable_folder_naming_the_fields(tmp_path, capsys):
    config = ArchLMConfig.from_preset("llama", **ARCHLM_TINY, norm_position="post")
    ArchLMForCausalLM(config).save_pretrained(tmp_path / "postnorm")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to-native", str(tmp_path / "postnorm"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "`norm_position`='post'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was written, deleted or changed."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# id -> (direction, OUT_DIR relative to tmp_path, extra flags). IN_DIR is tmp_path / "run", a trained-run folder.
OVERLAPPING_OUTPUTS = {
    "to-native-into-itself": ("--to-native", "run", []),
    "to-native-into-itself-through-dotdot": ("--to-native", "run/../run", []),
    "to-native-into-itself-with-overwrite": ("--to-native", "run", ["--overwrite"]),
    "to-native-inside-it": ("--to-native", "run/native", []),
    "to-native-into-its-parent-with-overwrite": ("--to-native", ".", ["--overwrite"]),  # would delete IN_DIR
    "from-transformers-into-itself": ("--from-transformers", "run", []),
    "from-transformers-inside-it": ("--from-transformers", "run/archlm", ["--overwrite"]),
}


@pytest.mark.parametrize("case", list(OVERLAPPING_OUTPUTS))
def test_cli_refuses_an_output_folder_that_is_inside_or_holds_the_input_before_loading_it(tmp_path, capsys, case):
    """A trained run converted into itself became a mix of Llama config and weights and ArchLM leftovers. The input
    here is not even exportable (hybrid): the refusal names the folders, not `norm_type`, so it came first."""
    direction, out_dir, flags = OVERLAPPING_OUTPUTS[case]
    run = tmp_path / "run"
    ArchLMForCausalLM(ArchLMConfig.from_preset("hybrid", **ARCHLM_TINY)).save_pretrained(run)
    (run / "training_log.json").write_text("{}")
    before = folder_snapshot(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        convert_main([direction, str(run), str(tmp_path / out_dir), *flags])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"OUT_DIR {str(tmp_path / out_dir)!r}" in error and f"IN_DIR {str(run)!r}" in error
    assert "Choose an empty or new folder" in error and "norm_type" not in error
    assert folder_snapshot(tmp_path) == before


def test_cli_refuses_a_non_empty_output_folder_and_overwrite_replaces_its_contents(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "native"
    build_archlm("llama-llama3rope-gqa").save_pretrained(run)
    out.mkdir()
    convert_main(["--to-native", str(run), str(out)])  # an existing empty folder is fine (hub_upload uses one)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    exported = sorted(path.name for path in out.iterdir())

    (out / "training_log.json").write_text("{}")  # what an earlier, different model left there
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    before = folder_snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to-native", str(run), str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"OUT_DIR {str(out)!r} is not empty" in error and "checkpoint-5" in error and "training_log.json" in error
    assert "Choose an empty or new folder" in error and "--overwrite" in error
    assert folder_snapshot(out) == before

    convert_main(["--to-native", str(run), str(out), "--overwrite"])
    assert sorted(path.name for path in out.iterdir()) == exported  # the leftovers are gone
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        convert_main(["--to-native", str(run), str(tmp_path / "a-file"), "--overwrite"])
    assert "is a file, not a folder" in capsys.readouterr().err


# Run in a fresh interpreter where archlm cannot be imported, as on a serving machine: each exported folder
# must load with plain AutoModelForCausalLM (no trust_remote_code) and give the logits saved next to it.
FRESH_PROCESS_LOAD = r"""
import sys
sys.modules["archlm"] = None  # importing archlm now raises ImportError
try:
    import archlm
except ImportError:
    pass
else:
    raise SystemExit("archlm was importable")
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
inputs, probe = torch.load(sys.argv[1]), sys.argv[2]
loaded = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(**inputs).logits, folder + ".logits.pt")
    tokenizers = [AutoTokenizer.from_pretrained(folder), PreTrainedTokenizerFast.from_pretrained(folder)]
    loaded[folder] = [type(model).__name__] + [tokenizer(probe)["input_ids"] for tokenizer in tokenizers]
print(json.dumps(loaded))
"""


def test_exported_folders_load_with_plain_auto_classes_in_a_process_without_archlm(tmp_path, caplog):
    """One folder per family; the GPT-2 one through the real `python -m archlm.convert --to-native` command."""
    from archlm.convert import TOKENIZER_PROBE
    from archlm.tokenization_archlm import train_tokenizer

    tokenizer = train_tokenizer([Path(__file__).read_text(encoding="utf-8")], vocab_size=300)  # only encodes a probe
    cases = ["llama-yarnrope-headdim32-allbias", "mistral-slidingwindow4-gqa", "qwen2-qkvbias-tied",
             "qwen3-qknorm-headdim32-gqa", "gpt2-preset-tied"]
    inputs = batch(left_padding=True)
    inputs.pop("labels")
    torch.save({key: value.cpu() for key, value in inputs.items()}, tmp_path / "inputs.pt")  # (a fresh CPU process)
    expected = {}
    for case in cases:
        ours = build_archlm(case)
        ours.save_pretrained(tmp_path / f"{case}-archlm")
        tokenizer.save_pretrained(tmp_path / f"{case}-archlm")
        with torch.no_grad():
            expected[case] = ours(**inputs).logits
        if not case.startswith("gpt2"):
            with caplog.at_level("WARNING", logger="archlm.convert"):
                export_folder(tmp_path / f"{case}-archlm", tmp_path / case)
    subprocess.run(
        [sys.executable, "-m", "archlm.convert", "--to-native", str(tmp_path / "gpt2-preset-tied-archlm"),
         str(tmp_path / "gpt2-preset-tied")],
        check=True, cwd=REPO_ROOT, capture_output=True, timeout=300,
    )

    folders = [str(tmp_path / case) for case in cases]
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path / "inputs.pt"), TOKENIZER_PROBE, *folders],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    real_tokens = inputs["attention_mask"].bool()
    probe_ids = tokenizer(TOKENIZER_PROBE)["input_ids"]
    for case, folder in zip(cases, folders):
        model_class, auto_ids, exact_ids = loaded[folder]
        assert model_class == EXPORT_CASES[case][0].__name__
        assert exact_ids == probe_ids, case  # the saved tokenizer.json is the training tokenizer
        # AutoTokenizer gives the same ids, except where transformers 5 swaps in its own pipeline (Qwen2Tokenizer for
        # model_type qwen2): then, and only then, the export has warned
        warned = case.startswith("qwen2") and "loads this qwen2 folder as" in caplog.text
        assert (auto_ids == probe_ids) is not warned, case
        assert not list(Path(folder).glob("*.py"))
        assert "auto_map" not in json.loads((Path(folder) / "config.json").read_text())
        logits = torch.load(folder + ".logits.pt").to(expected[case].device)
        torch.testing.assert_close(logits[real_tokens], expected[case][real_tokens], rtol=1e-4, atol=1e-5)


def test_cli_names_a_missing_input_folder_at_once(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to-native", str(tmp_path / "no_such_run"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)  # a bare name: a GGUF is written from a local folder only (was: "holds no tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to-gguf", "no_such_run", "out.gguf"])
    assert exit_info.value.code == 2 and "IN_DIR 'no_such_run': no such folder" in capsys.readouterr().err


def test_a_model_transformers_accepts_converts_with_out_of_vocabulary_special_ids_dropped(caplog):
    source = GPT2LMHeadModel(GPT2Config(vocab_size=311, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    with caplog.at_level("WARNING", logger="archlm.convert"):
        converted = from_transformers(source)
    assert converted.config.bos_token_id is None and converted.config.eos_token_id is None
    assert "bos_token_id=50256" in caplog.text and "eos_token_id=50256" in caplog.text
    input_ids = torch.randint(0, 311, (1, 6))
    torch.testing.assert_close(converted(input_ids).logits, source(input_ids).logits, rtol=1e-4, atol=1e-5)


def test_attention_sinks_export_to_granite_swa_and_are_refused_where_a_family_has_none():
    from transformers import GraniteSWAForCausalLM

    torch.manual_seed(0)
    model = randomised(ArchLMForCausalLM(ArchLMConfig.from_preset(
        "mistral", **ARCHLM_TINY, num_key_value_heads=2, sliding_window=4, attention_sinks=True))).eval()
    native = to_transformers(model).eval()
    assert isinstance(native, GraniteSWAForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM.*\n  - `attention_sinks`=True: Qwen3ForCausalLM needs False"):
        to_transformers(ArchLMForCausalLM(ArchLMConfig.from_preset("qwen3", **ARCHLM_TINY, attention_sinks=True)))


def export_matches(config: ArchLMConfig, family: str, attn_implementation: str | None = None) -> None:
    """A random model of `config` exports to `family` with its logits (left padding included)."""
    torch.manual_seed(0)
    model = randomised(ArchLMForCausalLM(config)).eval()
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    native = to_transformers(model).eval()
    assert type(native).__name__ == family
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected, exported = model(ids, attention_mask=mask).logits, native(ids, attention_mask=mask).logits
    torch.testing.assert_close(exported[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset, family", [("pythia", "GPTNeoXForCausalLM"), ("stablelm", "StableLmForCausalLM"),
                                            ("phi2", "PhiForCausalLM")])
def test_a_whole_head_rotated_exports_to_a_family_whose_config_defaults_to_partial_rotary(preset, family):
    """Their config classes default to rotating part of each head (NeoX and StableLM 0.25, Phi 0.5): a rope dict
    without partial_rotary_factor (the whole head) exported as that default, 5e-3 apart, silently."""
    config = ArchLMConfig.from_preset(preset, **ARCHLM_TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert config.rotary_dim() == config.head_dim
    export_matches(config, family)


@pytest.mark.parametrize("preset, family", [("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"),
                                            ("olmo3", "Olmo3ForCausalLM")])
def test_a_model_without_a_window_exports_to_a_family_that_always_builds_a_sliding_mask(preset, family):
    """Gemma 2/3 and OLMo 3 build a sliding mask whatever their layers are, and fail without a window."""
    if preset not in ArchLMConfig.presets():  # (OLMo 3 has no preset: OLMo 2's block with its rope dict)
        config = ArchLMConfig.from_preset("olmo2", **ARCHLM_TINY)
    else:
        config = ArchLMConfig.from_preset(preset, **ARCHLM_TINY, sliding_window=None, layer_types=None)
    assert config.sliding_window is None and "sliding_attention" not in config.layer_types
    if preset == "olmo3":
        config = ArchLMConfig(**{**config.to_diff_dict(), "converted_from": "Olmo3ForCausalLM"})
    export_matches(config, family)


def test_a_family_without_sdpa_exports_with_eager_from_a_model_running_sdpa(caplog):
    """Gemma 2 runs no sdpa: the export falls back to its eager attention, saying so, instead of failing."""
    config = ArchLMConfig.from_preset("gemma", **ARCHLM_TINY, norm_position="sandwich", sliding_window=4)
    with caplog.at_level("WARNING", logger="archlm.convert"):
        export_matches(config, "Gemma2ForCausalLM", attn_implementation="sdpa")
    assert "Gemma2ForCausalLM does not run attn_implementation='sdpa'" in caplog.text


def test_deepseek_v3s_mixture_without_latent_attention_exports_to_glm45_not_deepseek_v3():
    """DeepSeek-V3's class needs latent attention: the dots1 mixture without qk norm is GLM-4.5's (it failed in
    DeepseekV3Config's validation, a traceback)."""
    config = ArchLMConfig.from_preset("dots1", **ARCHLM_TINY, head_dim=16, qk_norm=False, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    export_matches(config, "Glm4MoeForCausalLM")


def test_a_rotated_share_set_for_one_layer_type_only_is_refused_both_ways():
    """Gemma 3 and OLMo 3 rotate every channel of every layer; a share in the sliding layers' rope dict only was
    read past (rotary_dim looked at the full layers'), and the logits were 0.1-0.4 apart both ways."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}}
    config = ArchLMConfig.from_preset("gemma3", **ARCHLM_TINY, rope_parameters=rope, sliding_window=4,
                                      layer_types=["sliding_attention", "full_attention"])
    refusal = r"`partial_rotary_factor`='per layer type' \(the rotated share of each head, in rope_parameters\)"
    with pytest.raises(ValueError, match=refusal):
        to_transformers(ArchLMForCausalLM(config))
    native = Gemma3ForCausalLM(Gemma3TextConfig(**TINY, rope_parameters=rope, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"]))
    with pytest.raises(ValueError, match=refusal):
        from_transformers(native)


def test_gpt2_with_unscaled_scores_converts_both_ways():
    """scale_attn_weights=False (scores not divided by sqrt(head_dim)) is ArchLM's attention_multiplier=1.0; it was
    refused as having no equivalent."""
    torch.manual_seed(0)
    native = randomised(GPT2LMHeadModel(GPT2Config(**TINY, n_embd=64, n_layer=2, n_head=4, scale_attn_weights=False)))
    ours = from_transformers(native)
    assert ours.config.attention_multiplier == 1.0
    back = to_transformers(ours)
    assert back.config.scale_attn_weights is False
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        expected = native(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_opt_counts_its_positions_from_the_mask_when_none_are_given():
    """OPT's learned positions count the real tokens before each one: with left padding and no position_ids (batched
    scoring), ArchLM counted slots and its logits were 0.5 apart; generate passes position_ids either way."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    native = randomised(OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=96, max_position_embeddings=64,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)))
    ours = from_transformers(native)
    assert ours.config.position_ids_from_mask
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected, actual = native(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)
    with pytest.raises(VALIDATION_ERRORS, match="position_ids_from_mask.*'rope'"):
        ArchLMConfig(**ARCHLM_TINY, position_ids_from_mask=True)
