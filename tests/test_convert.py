"""Parity of `archlm.convert.from_transformers` with transformers' own GPT-2, Llama, Mistral, Qwen2, Qwen3.

Each reference is a tiny, seeded transformers model with every parameter randomised (norm weights around 1,
biases non-zero), so a swapped, missing or mis-split weight shows in the logits. The converted ArchLM model
must give the same logits (rtol 1e-4) under eager and sdpa attention, with and without left padding.

    .venv/bin/python -m pytest tests/test_convert.py -q
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from archlm import ArchLMForCausalLM
from archlm.convert import from_transformers

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
    generator = torch.Generator().manual_seed(1)
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
        reporter.write_line("\nmax relative logit error, converted ArchLM vs transformers:")
        for test_id, error in PARITY_ERRORS.items():
            reporter.write_line(f"  {test_id:<62} {error:.2e}")


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
    ours = from_transformers(reference)
    inputs = batch(left_padding=True)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=10,
                  do_sample=False, pad_token_id=PAD, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    expected, actual = reference.generate(**kwargs), ours.generate(**kwargs)
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
    "gpt2-scale_attn_weights": (GPT2LMHeadModel, GPT2Config, dict(scale_attn_weights=False)),
    "qwen2-layer_types": (Qwen2ForCausalLM, Qwen2Config, dict(  # layer 0 full, layer 1 sliding
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-layer_types": (Qwen3ForCausalLM, Qwen3Config, dict(layer_types=["full_attention", "sliding_attention"])),
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
