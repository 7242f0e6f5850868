"""ArchLM configuration: one typed, validated config that names every architecture choice.

This file is remote code: it travels to the Hub with every saved model, so it imports only
torch/transformers/huggingface_hub and nothing else from the archlm package.

Every bad value is refused at construction (and therefore also in `from_pretrained`), with a
message that names the field, the value and what is allowed. Type errors come from `@strict`
(huggingface_hub's `StrictDataclassFieldValidationError`), cross-field rules from the
`validate_*` methods below (`StrictDataclassClassValidationError` wrapping a `ValueError`).
"""

import copy
import dataclasses
import difflib
import json
import math
from typing import Any, Literal

import torch

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging
from transformers.utils.type_validators import interval

logger = logging.get_logger(__name__)

# Keys each rope type needs beyond `rope_type` and `rope_theta`; mirrors transformers' validators,
# which only warn (or raise a bare KeyError) where we want a named, early error.
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
# Every rope type transformers can compute, each with the keys it needs.
ROPE_REQUIRED_KEYS = {"default": (), **{name: _ROPE_REQUIRED_KEYS.get(name, ()) for name in ROPE_INIT_FUNCTIONS}}

# Presets: the families' architectures at a size that trains on a laptop. Overrides win.
_LLAMA_LIKE = dict(
    vocab_size=32000,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    hidden_act="silu",
    norm_type="rmsnorm",
    norm_eps=1e-5,
    norm_position="pre",
    position_embedding_type="rope",
    mlp_type="gated",
    bos_token_id=1,
    eos_token_id=2,
)
_GEMMA_LIKE = dict(
    _LLAMA_LIKE,
    vocab_size=256000,
    hidden_act="gelu_pytorch_tanh",
    norm_type="rmsnorm_unit_offset",
    norm_eps=1e-6,
    scale_embeddings_by_sqrt_hidden=True,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# GPT-NeoX-style blocks: LayerNorm with bias, an ungated MLP, biases on every projection, one K/V head per head.
_PARALLEL_LAYERNORM = dict(
    _LLAMA_LIKE,
    vocab_size=50304,
    num_key_value_heads=None,
    norm_type="layernorm",
    mlp_type="standard",
    attention_bias=True,
    mlp_bias=True,
)
# DeepSeek-V3's mixture at the presets' size: 32 narrow experts, top-6 by sigmoid scores (x 2.5), an ungated shared
# expert twice their width, the first layer dense; balanced by routing biases moved after each step
# (auxiliary-loss-free, DeepSeek-V3's rate) with a small load-balancing loss beside them
_DEEPSEEK_MOE = dict(num_experts=32, num_experts_per_tok=6, moe_intermediate_size=256,
                     shared_expert_intermediate_size=512, shared_expert_gated=False, mlp_only_layers=[0],
                     router_scoring="sigmoid", routed_scaling_factor=2.5, router_bias_update_rate=0.001,
                     router_aux_loss_coef=0.0001, router_weights_fp32=True)
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M): learned positions, LayerNorm, GELU MLP, biases everywhere, tied head.
    "gpt2": dict(
        vocab_size=50257,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        hidden_act="gelu_new",
        norm_type="layernorm",
        norm_eps=1e-5,
        norm_position="pre",
        position_embedding_type="learned",
        mlp_type="standard",
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        attention_dropout=0.1,
        hidden_dropout=0.1,
        embedding_dropout=0.1,
        init_scheme="scaled",
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    # Llama 3 style: RoPE (theta 5e5), RMSNorm, SwiGLU, GQA, no biases, untied head.
    "llama": dict(_LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Mistral: Llama plus a sliding attention window.
    "mistral": dict(
        _LLAMA_LIKE,
        max_position_embeddings=4096,
        sliding_window=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Qwen2: bias on q/k/v only, large rope theta, tied head at small sizes.
    "qwen2": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        attention_bias=True,
        attention_output_bias=False,
        norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # Qwen3: no q/k/v bias, RMSNorm on q and k per head, explicit head_dim.
    "qwen3": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        head_dim=64,
        qk_norm=True,
        norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # Gemma: (1 + w) RMSNorm, embeddings x sqrt(hidden), GeGLU (tanh GELU), tied head.
    "gemma": dict(_GEMMA_LIKE),
    # Gemma 2: Gemma with sandwich norms, sliding and full layers alternating, soft-capped scores and logits.
    "gemma2": dict(
        _GEMMA_LIKE,
        norm_position="sandwich",
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    # Gemma 3: sandwich norms, q/k norm, five sliding layers (local rope theta 1e4) for one full layer (1e6).
    "gemma3": dict(
        _GEMMA_LIKE,
        norm_position="sandwich",
        qk_norm=True,
        sliding_window=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    ),
    # OLMo: LayerNorm without parameters (eps 1e-5), SwiGLU, no biases (rope in float32, as OLMo rounds it).
    "olmo": dict(_LLAMA_LIKE, vocab_size=50304, norm_type="layernorm_noaffine", norm_eps=1e-5, rope_precision="float32",
                 layernorm_precision="float32",
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
                 eos_token_id=50279, pad_token_id=1),
    # OLMo 2: norms on the sublayers' outputs only, q/k RMSNorm over their full width (OLMo 2's roundings).
    "olmo2": dict(_LLAMA_LIKE, vocab_size=100352, norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full",
                  rope_precision="float32", norm_weight_fp32=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=None,
                  eos_token_id=100257, pad_token_id=100277),
    # Pythia (GPT-NeoX): attention and MLP in parallel with a norm each, a quarter of each head rotated, GELU MLP.
    "pythia": dict(_PARALLEL_LAYERNORM, use_parallel_residual=True, parallel_shared_norm=False, hidden_act="gelu",
                   parallel_residual_order="sublayers_first",
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                   bos_token_id=0, eos_token_id=0),
    # Phi-2: parallel block with one shared LayerNorm, half of each head rotated, biases everywhere (lm_head too).
    "phi2": dict(_PARALLEL_LAYERNORM, vocab_size=51200, use_parallel_residual=True, hidden_act="gelu_new",
                 parallel_residual_order="sublayers_first",
                 lm_head_bias=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 bos_token_id=50256, eos_token_id=50256),
    # GPT-J: Phi-2's block without attention biases, interleaved rotary on a quarter of each head.
    "gptj": dict(_PARALLEL_LAYERNORM, vocab_size=50400, use_parallel_residual=True, hidden_act="gelu_new",
                 parallel_residual_order="sublayers_first",
                 attention_bias=False, lm_head_bias=True, rope_interleaved=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                 bos_token_id=50256, eos_token_id=50256),
    # Cohere (Command R): parallel block, bias-free LayerNorm, interleaved rotary, logits / 16, tied head.
    "cohere": dict(_LLAMA_LIKE, vocab_size=256000, norm_type="layernorm_nobias", use_parallel_residual=True,
                   rope_interleaved=True, rope_precision="float32_rotation", layernorm_precision="float32_explicit",
                   logits_scaling=16.0, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                   pad_token_id=0, bos_token_id=5, eos_token_id=255001),
    # StableLM 2: LayerNorm, a quarter of each head rotated, q/k/v bias, SwiGLU.
    "stablelm": dict(_LLAMA_LIKE, vocab_size=100352, norm_type="layernorm", attention_bias=True,
                     attention_output_bias=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                     bos_token_id=100257, eos_token_id=100257),
    # StarCoder 2: LayerNorm, tanh-GELU MLP, biases everywhere, a sliding window in every layer, tied head.
    "starcoder2": dict(_PARALLEL_LAYERNORM, vocab_size=49152, hidden_act="gelu_pytorch_tanh", sliding_window=1024,
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       bos_token_id=0, eos_token_id=0),
    # Granite: Llama with muP-style multipliers on embeddings, residual branches, attention scores and logits.
    "granite": dict(_LLAMA_LIKE, vocab_size=49155, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.015625, logits_scaling=8.0, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # SmolLM3: Llama whose every fourth layer has no rope (NoPE), tied head.
    "smollm3": dict(_LLAMA_LIKE, vocab_size=128256, no_rope_layer_interval=4, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 2000000.0},
                    pad_token_id=128004, bos_token_id=128000, eos_token_id=128001),
    # Mixtral: Llama whose every MLP is 8 experts, each token routed to 2 (renormalised).
    "mixtral": dict(_LLAMA_LIKE, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, router_weights_fp32=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen3-MoE: Qwen3 with 16 narrow experts per layer, top-4 renormalised.
    "qwen3_moe": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        head_dim=64,
        qk_norm=True,
        norm_eps=1e-6,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        router_aux_loss_coef=0.001,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # dots.llm1: DeepSeek-V3's mixture on Qwen3's attention.
    "dots1": dict(_LLAMA_LIKE, head_dim=64, qk_norm=True, norm_eps=1e-6, **_DEEPSEEK_MOE),
    # DeepSeek-V3: its mixture with group-limited routing (top-6 within 2 of 4 groups) on multi-head latent
    # attention (a 256-wide key/value latent, what the cache holds, and a 384-wide query latent; per head 64 channels
    # without rope + 32 with DeepSeek's interleaved rope, values 64).
    "deepseek_v3": dict(
        _LLAMA_LIKE,
        num_key_value_heads=None,  # as many as heads (the latent expands into each), also when heads are overridden
        kv_lora_rank=256,
        q_lora_rank=384,
        qk_nope_head_dim=64,
        head_dim=32,
        v_head_dim=64,
        rope_interleaved=True,
        norm_eps=1e-6,
        n_group=4,
        topk_group=2,
        **_DEEPSEEK_MOE,
    ),
    # gpt-oss: every MLP 32 experts with biases and the clamped GLU (quick_gelu, limit 7), top-4 through a router
    # with a bias; attention with biases and a learned sink per head, 128-token sliding and full layers alternating.
    # (Its released models extend rope with YaRN to 131k positions; a model trained from this preset uses plain rope.)
    "gpt_oss": dict(
        _LLAMA_LIKE,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=384,
        router_bias=True,
        router_topk_softmax=True,
        router_aux_loss_coef=0.001,
        hidden_act="quick_gelu",
        swiglu_limit=7.0,
        mlp_bias=True,
        attention_bias=True,
        attention_sinks=True,
        attention_sinks_in_softmax=True,
        norm_weight_fp32=True,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
    # The seeds' hybrid: RoPE positions with GPT-style LayerNorm and GELU MLP, pre-norm.
    "hybrid": dict(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=2048,
        hidden_act="gelu",
        norm_type="layernorm",
        norm_eps=1e-5,
        norm_position="pre",
        position_embedding_type="rope",
        mlp_type="standard",
        init_scheme="scaled",
        bos_token_id=1,
        eos_token_id=2,
    ),
}

# kwargs transformers accepts besides the fields (legacy rope keys, load-time options)
_ROPE_KWARGS = ("rope_scaling", "rope_theta", "partial_rotary_factor")
_LEGACY_KWARGS = {*_ROPE_KWARGS, "attn_implementation", "torch_dtype", "num_labels"}
# other families' names for ArchLM's fields: refused by name (kept as unknown keys, they would build the default)
_OTHER_NAMES = {
    "rms_norm_eps": "norm_eps", "layer_norm_eps": "norm_eps", "layer_norm_epsilon": "norm_eps", "norm_epsilon": "norm_eps",
    "hidden_activation": "hidden_act", "activation_function": "hidden_act", "use_qk_norm": "qk_norm",
    "num_kv_heads": "num_key_value_heads", "n_head_kv": "num_key_value_heads", "num_layers": "num_hidden_layers",
    "n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
    "num_heads": "num_attention_heads", "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
    "ffn_dim": "intermediate_size", "rotary_pct": "rope_parameters['partial_rotary_factor']",
}


def rope_with_legacy_keywords(rope: dict, keywords: dict) -> dict:
    """transformers 4's rope keywords applied to a rope dict, as the caller means them: `rope_scaling` replaces the
    scaling (its rope_type and keys) and keeps the dict's rope_theta and partial_rotary_factor unless it names them;
    `rope_theta` and `partial_rotary_factor` replace theirs. (transformers lets a dict's keys win over the keywords,
    and a rope_scaling replace the dict whole: a preset's rope_theta=10000 override was ignored, and its YaRN
    rope_scaling reset its theta to 10000.)"""
    if not _flat_dict(rope):
        raise ValueError(f"{sorted(keywords)} cannot apply to `rope_parameters` holding one dict per layer type "
                         f"({sorted(rope)}): pass rope_parameters with each layer type's dict.")
    merged = dict(rope)
    scaling = keywords.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ValueError(f"`rope_scaling` must be a dict (rope_type and its keys), got {scaling!r}.")
        scaling = dict(scaling)
        if "type" in scaling:  # transformers 4's name
            scaling.setdefault("rope_type", scaling.pop("type"))
        merged = {key: merged[key] for key in ("rope_theta", "partial_rotary_factor") if key in merged} | scaling
    for key in ("rope_theta", "partial_rotary_factor"):
        if keywords.get(key) is not None:
            merged[key] = keywords[key]
    return merged


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside quotes, brackets and braces, so JSON values may hold commas."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _parse_value(text: str):
    literals = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in literals:
        return literals[text.lower()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text[:1] in "[{":
            raise ValueError(f"is not valid JSON: {text!r}") from None
        return text


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"num_hidden_layers=4,hidden_act=gelu,qk_norm=true"` (run_clm.py's `--config_overrides`) -> typed values.

    Values are JSON (numbers, true/false/null, strings, lists, objects such as a whole `rope_parameters`), Python's
    True/False/None, or a bare string. Unknown field names are refused with the closest known names."""
    if not text or not text.strip():
        return {}
    known = sorted({f.name for f in dataclasses.fields(ArchLMConfig)} | _LEGACY_KWARGS)
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--config_overrides: {item.strip()!r} is not 'field=value' (expected e.g. \"num_hidden_layers=4,hidden_size=256\").")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config_overrides: {key!r} is not an ArchLMConfig field.{hint} Fields: {', '.join(known)}.")
        if key in overrides:
            raise ValueError(f"--config_overrides sets {key!r} twice.")
        try:
            overrides[key] = _parse_value(value)
        except ValueError as error:
            raise ValueError(f"--config_overrides: the value of {key!r} {error}") from None
    return overrides


TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def token_ids_fit(value, vocab_size) -> bool:
    """Whether a special id (an int, a list of ints, or None) indexes a vocabulary of `vocab_size` rows."""
    if not _is_number(vocab_size):
        return True  # (the vocabulary's own check names it)
    ids = value if isinstance(value, list) else [value]
    return all(token_id is None or (isinstance(token_id, int) and 0 <= token_id < vocab_size) for token_id in ids)


def _flat_dict(rope) -> bool:
    """Whether `rope` is one rope dict (not one per layer type)."""
    return isinstance(rope, dict) and not any(isinstance(value, dict) for value in rope.values())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# dropout rates: transformers' interval validator on the field, [0, 1)
_DROPOUT = interval(min=0.0, max=1.0, exclude_max=True)


def _positive_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0


# One table per enum: value -> (name tag, description); the field's Literal type is built from its keys, and the
# modeling file keys its classes (NORM_CLASSES, ...) on the same values.
NORM_TYPES = {
    "rmsnorm": ("RMS", "RMSNorm, weight initialised to 1 (Llama)"),
    "rmsnorm_unit_offset": ("RMS+1", "RMSNorm scaled by (1 + weight), weight initialised to 0 (Gemma)"),
    "layernorm": ("LN", "LayerNorm with weight and bias (GPT-2)"),
    "layernorm_nobias": ("LNNoBias", "LayerNorm with a weight and no bias (Cohere)"),
    "layernorm_noaffine": ("LNNoAffine", "LayerNorm without learned parameters (OLMo)"),
    "layernorm_unit_offset": ("LN+1", "LayerNorm scaled by (1 + weight), weight initialised to 0, with a bias (Nemotron)"),
}
NORM_POSITIONS = {
    "pre": ("PreNorm", "x + f(norm(x)): norm before each sublayer (GPT-2, Llama)"),
    "post": ("PostNorm", "norm(x + f(x)): norm after each residual add (original Transformer)"),
    "sandwich": ("Sandwich", "x + norm(f(norm(x))): norm before and after each sublayer (Gemma 2/3)"),
    "sublayer_output": ("PostSublayer", "x + norm(f(x)): norm on each sublayer's output only (OLMo 2)"),
}
POSITION_EMBEDDING_TYPES = {
    "rope": ("RoPE", "rotary embedding applied to q and k in every layer (except no_rope_layers)"),
    "alibi": ("ALiBi", "per-head linear distance penalty added to attention scores"),
    "learned": ("Learned", "trained absolute position table added to the token embeddings"),
    "sinusoidal": ("Sinusoidal", "fixed sin/cos absolute positions added to the token embeddings"),
    "none": ("NoPE", "no position signal; causal masking alone"),
}
QK_NORM_SCOPES = {
    "head": ("", "each head normalised over head_dim, one weight shared by the heads (Qwen3, Gemma 3)"),
    "per_head": ("PerHead", "each head normalised over head_dim with its own weight (StableLM, Cohere)"),
    "full": ("Full", "q and k normalised over their whole width, all heads together (OLMo 2)"),
}
# how group-limited routing (n_group > 1) scores a group of experts
GROUP_SCORINGS = {
    "top2_sum": "its two best experts' scores summed (DeepSeek-V3)",
    "max": "its best expert's score (DeepSeek-V2's group_limited_greedy)",
}
# where rope rounds in a bf16/fp16 model (all three the same in float32): each family's, so imports are bit-identical
ROPE_PRECISIONS = {
    "default": "cos/sin tables and the rotation in the activations' dtype (Llama, most families)",
    "float32": "float32 tables, q and k rotated in float32 and rounded once (OLMo, OLMo 2)",
    "float32_rotation": "tables rounded to the activations' dtype, q and k rotated in float32 (Cohere)",
}
# where LayerNorm rounds in a bf16/fp16 model (all the same function in float32)
LAYERNORM_PRECISIONS = {
    "default": "torch's kernel on the activations (nn.LayerNorm: GPT-2, NeoX, Phi, StableLM, Starcoder2)",
    "float32": "torch's kernel on float32 activations, rounded once (OLMo)",
    "float32_explicit": "mean and variance by their formula in float32, rounded once (Cohere)",
}
# transformers' layer types that ArchLM layers implement
LAYER_TYPES = ("full_attention", "sliding_attention")
INIT_SCHEMES = {
    "normal": "every matrix N(0, initializer_range)",
    "scaled": "GPT-2: truncated at 2 std, residual output projections / sqrt(2 * num_hidden_layers)",
    "magneto": "Magneto (Foundation Transformers): Xavier-normal, gain sqrt(log(2 * layers)) on v/o and the MLP; needs Sub-LN",
}

# Activation families for the name: every gelu approximation is "GELU", silu/swish "SiLU".
_ACT_NAMES = {"silu": "SiLU", "swish": "SiLU", "relu": "ReLU", "leaky_relu": "LeakyReLU", "relu2": "ReLU2",
              "quick_gelu": "QuickGELU"}
_GLU_NAMES = {"SiLU": "SwiGLU", "GELU": "GeGLU", "ReLU": "ReGLU", "QuickGELU": "QuickGeGLU"}


def _ratio(part: int, whole: int) -> str:
    divisor = math.gcd(part, whole)
    return f"{part // divisor}:{whole // divisor}"


@strict
class ArchLMConfig(PreTrainedConfig):
    r"""Configuration of an ArchLM decoder-only language model.

    Field names follow transformers' configs wherever transformers has one (`LlamaConfig`, and for the options
    of other families their own names: `layer_types`, `attn_logit_softcapping`, `embedding_multiplier`, ...);
    the ArchLM fields below choose the architecture. Every option composes with every other one.

    ```python
    >>> from archlm import ArchLMConfig, ArchLMForCausalLM
    >>> config = ArchLMConfig.from_preset("llama", hidden_size=256, num_hidden_layers=4)
    >>> config.architecture_name
    '4L-12H-256D-RoPE-RMS-SwiGLU-PreNorm-GQA4'
    >>> model = ArchLMForCausalLM(config)
    ```
    """

    model_type = "archlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts"}  # Mixtral's name
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    # --- sizes ---
    vocab_size: int = 32000  # rows of the embedding and of the LM head
    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int | None = None  # MLP width; None: 4x hidden (standard) or ~8/3x hidden (gated)
    num_hidden_layers: int = 12  # decoder layers
    num_attention_heads: int = 12  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA; 1 = MQA); None: = num_attention_heads
    head_dim: int | None = None  # per-head width; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest sequence (hard limit with learned positions)
    # --- components ---
    hidden_act: str = "silu"  # any key of transformers.activations.ACT2FN
    norm_type: Literal[tuple(NORM_TYPES)] = "rmsnorm"  # see NORM_TYPES
    norm_eps: float | int = 1e-6  # epsilon of every norm
    norm_position: Literal[tuple(NORM_POSITIONS)] = "pre"  # where the block's norms sit, see NORM_POSITIONS
    use_parallel_residual: bool = False  # attention and MLP read the same input, both outputs added to it (GPT-J, NeoX, Phi, Cohere)
    parallel_shared_norm: bool = True  # with use_parallel_residual: one input_layernorm feeds both (GPT-J, Phi); False: the MLP has post_attention_layernorm (NeoX)
    # with use_parallel_residual, the order of the block's two adds: (x + attn) + mlp (StableLM, Cohere) or
    # (attn + mlp) + x (NeoX, GPT-J, Phi); the same sum, each family's rounding (see rope_precision below)
    parallel_residual_order: Literal["residual_first", "sublayers_first"] = "residual_first"
    sub_layernorm: bool | None = None  # Sub-LN (Magneto): a norm inside each sublayer, before o_proj and down_proj; None: on with init_scheme="magneto"
    position_embedding_type: Literal[tuple(POSITION_EMBEDDING_TYPES)] = "rope"  # see POSITION_EMBEDDING_TYPES
    learned_position_embeddings: bool = False  # add learned absolute embeddings on top of rope/alibi
    # absolute positions (learned, sinusoidal) count the real tokens before each token when no position_ids are given
    # (OPT), not its slot: left padding does not shift them (generate passes position_ids counted so either way)
    position_ids_from_mask: bool = False
    rope_parameters: RopeParameters | dict | None = None  # transformers v5 rope dict (rope_type, rope_theta, partial_rotary_factor, ...), or one dict per layer type
    rope_interleaved: bool = False  # rotate channel pairs (0,1), (2,3), ... (GPT-J, Cohere) instead of the two halves (NeoX, Llama)
    # rounding only, the same function in float32: in a bf16/fp16 model these keep each family's roundings, so that
    # its imports are bit-identical there too. rope_precision: see ROPE_PRECISIONS; norm_weight_fp32: RMSNorm
    # multiplies by its weight before rounding to the activations' dtype, not after (OLMo 2; the unit-offset RMSNorm
    # always does)
    rope_precision: Literal[tuple(ROPE_PRECISIONS)] = "default"
    norm_weight_fp32: bool = False
    layernorm_precision: Literal[tuple(LAYERNORM_PRECISIONS)] = "default"  # see LAYERNORM_PRECISIONS
    no_rope_layers: list[int] | None = None  # SmolLM3: per layer, 1 = rope, 0 = no position signal (NoPE); None: from no_rope_layer_interval
    no_rope_layer_interval: int | None = None  # SmolLM3: every N-th layer skips rope; None: every layer uses rope
    layer_types: list[str] | None = None  # per layer "full_attention" or "sliding_attention"; None: all sliding when sliding_window is set
    mlp_type: Literal["gated", "standard"] = "gated"  # gated: act(gate) * up (SwiGLU with silu); standard: act(up)
    # gpt-oss's clamped GLU, in every gated MLP (experts included): the gate clamped above at this limit, up to
    # [-limit, limit] and offset by one, i.e. act(min(gate, limit)) * (clamp(up) + 1); None: the plain product.
    # gpt-oss: 7.0 with hidden_act="quick_gelu" (x * sigmoid(1.702 x), its swiglu_alpha)
    swiglu_limit: float | int | None = None
    qk_norm: bool = False  # normalise q and k before rope (Qwen3, OLMo 2, Gemma 3, StableLM, Cohere)
    qk_norm_scope: Literal[tuple(QK_NORM_SCOPES)] = "head"  # see QK_NORM_SCOPES
    qk_norm_position: Literal["before_rope", "after_rope"] = "before_rope"  # after_rope: the rotated q and k (HunYuan)
    qk_norm_type: Literal[tuple(NORM_TYPES)] | None = None  # None: norm_type
    clip_qkv: float | int | None = None  # clamp q, k and v to [-clip_qkv, clip_qkv] after their projections (OLMo)
    sliding_window: int | None = None  # sliding layers attend to at most this many tokens, themselves included (Mistral)
    attention_bias: bool = False  # bias on q/k/v projections
    attention_output_bias: bool | None = None  # bias on o_proj; None: same as attention_bias (Qwen2: q/k/v only)
    # multi-head latent attention (DeepSeek-V2/V3), on when kv_lora_rank is set: keys and values come from one
    # compressed latent of kv_lora_rank per token (what the cache holds) plus one rotary key of head_dim shared by the
    # heads; each head's query and key are qk_nope_head_dim without rope + head_dim with it, its value v_head_dim.
    # q_lora_rank: queries through a latent of that rank too (None: one q_proj)
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    mlp_bias: bool = False  # bias on the MLP projections
    lm_head_bias: bool = False  # bias on the output projection (Phi, GPT-J)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    # --- scales (1.0 / None: off) ---
    embedding_multiplier: float | int = 1.0  # token embeddings x this (Granite)
    scale_embeddings_by_sqrt_hidden: bool = False  # token embeddings x sqrt(hidden_size), rounded to the activations' dtype (Gemma)
    residual_multiplier: float | int = 1.0  # each sublayer's output x this before the residual add (Granite)
    attention_multiplier: float | int | None = None  # attention score scale; None: 1/sqrt(head_dim) (Granite)
    query_pre_attn_scalar: float | int | None = None  # attention score scale is 1/sqrt(this) (Gemma 2/3)
    logits_scaling: float | int = 1.0  # final logits / this (Granite; Cohere's logit_scale is its inverse)
    # rounding only: the final hidden states divided by logits_scaling before the LM head (MiniCPM3), not the logits
    # after it; the same function, rounded apart in bf16 unless the divisor is a power of two
    logits_scaling_on_hidden: bool = False
    z_loss_coef: float | int = 0.0  # output z-loss weight (PaLM): + coef x mean logsumexp(logits)^2 in training
    attn_logit_softcapping: float | int | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    # a learned logit per head in each softmax's denominator (GraniteSWA; gpt-oss's sinks): a head can attend to
    # nothing; its output is scaled by sigmoid(logsumexp(scores) - sink). Eager attention only
    attention_sinks: bool = False
    attention_sinks_in_softmax: bool = False  # rounding only: the sink as one more column of the softmax (gpt-oss)
    final_logit_softcapping: float | int | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # --- regularisation and init ---
    attention_dropout: float | int = _DROPOUT(default=0.0)  # dropout on attention probabilities
    hidden_dropout: float | int = _DROPOUT(default=0.0)  # dropout on each sublayer output before the residual add
    embedding_dropout: float | int = _DROPOUT(default=0.0)  # dropout on the summed input embeddings
    # transformers' LlamaConfig bounds it to [0, 1]; above 1 the logits of a fresh model overflow, 0 is no init
    initializer_range: float | int = interval(min=0.0, max=1.0, exclude_min=True)(default=0.02)  # std of the normal init
    init_scheme: Literal[tuple(INIT_SCHEMES)] = "normal"  # see INIT_SCHEMES
    # --- mixture of experts (num_experts None: every MLP is dense) ---
    num_experts: int | None = None  # experts in each sparse MLP (Mixtral calls it num_local_experts)
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # each expert's MLP width; None: intermediate_size
    shared_expert_intermediate_size: int | None = None  # an always-on shared expert behind a sigmoid gate (Qwen2-MoE)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral always does)
    # the top-k weights stay float32 and the experts' weighted outputs are summed in float32 (Mixtral); False: both
    # in the activations' dtype (Qwen-MoE, OLMoE). The same in a float32 model; in bf16/fp16 it is the native rounding
    router_weights_fp32: bool = False
    # the top-k weights as the softmax of the k largest router logits (Granite-MoE), not the softmax over every expert
    # renormalised over the k: the same weights one rounding apart (needs softmax scoring and norm_topk_prob)
    router_topk_softmax: bool = False
    # rounding only: the router's logits from float32 inputs and weights (DeepSeek-V2, HunYuan-MoE, ERNIE 4.5), not in
    # the activations' dtype; sigmoid routers always are. The same in a float32 model; in bf16 the native choice
    router_logits_fp32: bool = False
    router_bias: bool = False  # a learned bias on the router's logits (gpt-oss): it moves both the choice and the weights
    decoder_sparse_step: int = 1  # every N-th layer is sparse (Qwen-MoE)
    mlp_only_layers: list[int] | None = None  # layers that stay dense
    router_aux_loss_coef: float | int = 0.01  # load-balancing loss weight (Switch, Mixtral), with output_router_logits
    router_z_loss_coef: float | int = 0.0  # router z-loss weight (ST-MoE: mean squared logsumexp of the router logits)
    # auxiliary-loss-free balancing (DeepSeek-V3, which used 1e-3): a routing bias per expert, moved by this after each
    # optimizer step toward the less-loaded experts (ArchLMTrainer does it: archlm.routing.RouterBiasCallback); 0: no bias
    router_bias_update_rate: float | int = 0.0
    # that routing bias on a softmax router without a rate: fixed, as loaded (ERNIE 4.5's, which its transformers class
    # never moves); sigmoid routers and a router_bias_update_rate have it already
    router_choice_bias: bool = False
    # DeepSeek-V3's router (dots.llm1): "sigmoid" scores each expert on its own, in float32, and always has the routing
    # bias above (zeros, moved only with a rate); the top-k weights are the scores, renormalised with norm_topk_prob
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    routed_scaling_factor: float | int = 1.0  # the routed experts' weights x this (DeepSeek-V3: 2.5)
    # group-limited routing (DeepSeek-V2/V3): the experts in n_group groups, each token choosing its top-k among the
    # topk_group groups that score highest; 1 group: no limit
    n_group: int = 1
    topk_group: int = 1
    group_scoring: Literal[tuple(GROUP_SCORINGS)] = "top2_sum"  # how a group is scored for that, see GROUP_SCORINGS
    shared_expert_gated: bool = True  # the shared expert behind Qwen2-MoE's sigmoid gate; False: added as is (DeepSeek)
    output_router_logits: bool = False  # return the router logits and add the auxiliary losses to the loss
    # --- provenance ---
    converted_from: str | None = None  # the transformers class archlm.convert imported this model from; exports prefer it
    # --- generation ---
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None and _is_number(self.hidden_size) and _is_number(self.num_attention_heads):
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None and _is_number(self.hidden_size):
            if self.mlp_type == "gated":
                # Llama's rule: two thirds of 4x (same FLOPs as a standard MLP), rounded up to 64
                self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
            else:
                self.intermediate_size = 4 * self.hidden_size
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if "num_local_experts" in kwargs:  # Mixtral's name, needed before the defaults
            local = kwargs.pop("num_local_experts")
            if self.num_experts is not None and local != self.num_experts:
                raise ValueError(f"`num_experts`={self.num_experts} and `num_local_experts`={local} (Mixtral's name for "
                                 "the same field) disagree: pass one of them.")
            self.num_experts = local
        if self.moe_intermediate_size is None and self.num_experts:
            self.moe_intermediate_size = self.intermediate_size
        if self.sub_layernorm is None:
            self.sub_layernorm = self.init_scheme == "magneto"
        layers = self.num_hidden_layers if isinstance(self.num_hidden_layers, int) else 0
        if self.layer_types is None:
            sliding = self.sliding_window is not None
            self.layer_types = ["sliding_attention" if sliding else "full_attention"] * layers
        if self.no_rope_layers is None and _is_number(self.no_rope_layer_interval) and self.no_rope_layer_interval > 0:
            # SmolLM3's rule: layer i skips rope when (i + 1) is a multiple of the interval
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(layers)]
        # Keep the caller's dict intact: transformers standardises rope_parameters in place.
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = copy.deepcopy(self.rope_parameters)
            keywords = {key: kwargs.pop(key) for key in _ROPE_KWARGS if key in kwargs}
            keywords = {key: value for key, value in keywords.items() if value is not None}  # (old JSON's nulls)
            if keywords:
                self.rope_parameters = rope_with_legacy_keywords(self.rope_parameters, keywords)
        dtype = self.dtype if self.dtype is not None else kwargs.get("torch_dtype")
        if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype`={dtype!r} is not a torch dtype; e.g. 'float32', 'bfloat16' or 'float16'.")
        named = {key: _OTHER_NAMES[key] for key in kwargs if key in _OTHER_NAMES}
        if named:
            raise ValueError("ArchLMConfig names these fields otherwise: " + ", ".join(
                f"{key!r} is `{field}`" for key, field in named.items()) + ".")
        # unknown keys are kept, as every transformers config keeps them (other tools' keys in a config.json); one
        # that is nearly a field's name is a typo, which would otherwise build the default model without a word
        fields = [field.name for field in dataclasses.fields(self)]
        for key in kwargs:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
            if close and key not in _LEGACY_KWARGS:
                logger.warning(f"ArchLMConfig: {key!r} is not a field (kept as an attribute); did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)

    # ----------------------------------------------------------------------------------------
    # validation: @strict runs every validate_* method after __init__. Each group of rules
    # checks its own prerequisites first, so none relies on the order in which they run.
    # ----------------------------------------------------------------------------------------
    def validate_architecture(self):
        """Sizes, head layout and component names (transformers' own checks first)."""
        super().validate_architecture()
        self._check_sizes()
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"`hidden_act`={self.hidden_act!r} is not a known activation; allowed: {sorted(ACT2FN)}."
            )
        if self.learned_position_embeddings and self.position_embedding_type == "learned":
            raise ValueError(
                "`learned_position_embeddings=True` adds learned absolute positions on top of 'rope' or 'alibi'; "
                "`position_embedding_type`='learned' has them already: drop learned_position_embeddings."
            )
        if self.learned_position_embeddings and self.position_embedding_type not in ("rope", "alibi"):
            raise ValueError(
                "`learned_position_embeddings=True` adds learned absolute positions on top of 'rope' or 'alibi'; "
                f"with `position_embedding_type`={self.position_embedding_type!r} use "
                "position_embedding_type='learned' (or set learned_position_embeddings=False)."
            )
        if self.parallel_residual_order != "residual_first" and not self.use_parallel_residual:
            raise ValueError(
                f"`parallel_residual_order`={self.parallel_residual_order!r} orders the adds of a parallel block; "
                "it needs `use_parallel_residual=True` (a sequential block adds each sublayer on its own)."
            )
        norms = {self.norm_type} | ({self.qk_norm_type or self.norm_type} if self.qk_norm else set())
        if self.layernorm_precision != "default" and not any(norm.startswith("layernorm") for norm in norms):
            raise ValueError(
                f"`layernorm_precision`={self.layernorm_precision!r} says where LayerNorm rounds, but this model has "
                f"no LayerNorm (norm_type={self.norm_type!r}" + (f", qk_norm_type={self.qk_norm_type!r}" if self.qk_norm
                                                                  else "") + "); drop it."
            )
        if self.norm_weight_fp32 and "rmsnorm" not in norms:
            raise ValueError(
                "`norm_weight_fp32=True` applies RMSNorm's weight before rounding, but this model has no "
                f"norm_type='rmsnorm' norm (norm_type={self.norm_type!r}"
                + (f", qk_norm_type={self.qk_norm_type!r}" if self.qk_norm else "") + "); drop it."
            )
        absolute = self.position_embedding_type in ("learned", "sinusoidal") or self.learned_position_embeddings
        if self.position_ids_from_mask and not absolute:
            raise ValueError("`position_ids_from_mask`=True counts absolute positions from the attention mask (OPT), "
                             f"but position_embedding_type={self.position_embedding_type!r} has none: rope and ALiBi "
                             "see only distances. Drop it, or use learned or sinusoidal positions.")
        if self.logits_scaling_on_hidden and self.logits_scaling == 1:
            raise ValueError("`logits_scaling_on_hidden`=True says where logits_scaling divides (MiniCPM3's way), but "
                             "logits_scaling=1: set logits_scaling too, or drop it.")
        if self.qk_norm_position != "before_rope" and not self.qk_norm:
            raise ValueError(f"`qk_norm_position`={self.qk_norm_position!r} says where the q/k norms sit (HunYuan's "
                             "after rope), but qk_norm=False: set qk_norm=True too, or drop it.")
        if self.attention_sinks_in_softmax and not self.attention_sinks:
            raise ValueError("`attention_sinks_in_softmax`=True says how the sinks round (gpt-oss's way), but this model "
                             "has none: set attention_sinks=True too, or drop it.")
        limit = self.swiglu_limit
        if limit is not None and not (_positive_finite(limit) and 1e-6 <= limit <= 1e6):
            raise ValueError(f"`swiglu_limit` must be a number in [1e-6, 1e6] (gpt-oss: 7.0), or None, got {limit!r}.")
        if limit is not None and self.mlp_type != "gated":
            raise ValueError(f"`swiglu_limit`={limit} clamps the gate and up projections of a gated MLP, but "
                             "mlp_type='standard' has no gate: set mlp_type='gated', or swiglu_limit=None.")
        if self.init_scheme == "magneto" and not self.sub_layernorm:
            raise ValueError(
                "`init_scheme`='magneto' is derived for Sub-LN, the extra norm inside each sublayer; it needs "
                "`sub_layernorm=True` (or None, which turns it on), got sub_layernorm=False."
            )

    def _check_sizes(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or give `head_dim` explicitly."
            )
        if self.head_dim <= 0:
            raise ValueError(f"`head_dim` must be a positive integer, got {self.head_dim!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads."
            )

    def validate_latent_attention(self):
        """Multi-head latent attention: positive ranks and widths, on rope, and none of the options of ArchLM's other
        attention (they act on per-head keys that this one builds from the latent)."""
        self._check_sizes()
        fields = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")
        for name in fields:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.kv_lora_rank is None:
            given = [name for name in fields[1:] if getattr(self, name) is not None]
            if given:
                raise ValueError(f"`{given[0]}`={getattr(self, given[0])} is for multi-head latent attention: set "
                                 "kv_lora_rank too (DeepSeek-V3: 512).")
            return
        missing = [name for name in ("qk_nope_head_dim", "v_head_dim") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"multi-head latent attention (kv_lora_rank={self.kv_lora_rank}) needs `{missing[0]}` "
                             "(DeepSeek-V3: qk_nope_head_dim=128, v_head_dim=128; head_dim is the rope part, 64).")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"multi-head latent attention expands its latent into every head: `num_key_value_heads` "
                             f"({self.num_key_value_heads}) must equal `num_attention_heads` ({self.num_attention_heads}).")
        rotary = self.position_embedding_type == "rope" and self.rotary_dim() / self.head_dim
        refused = [
            (self.position_embedding_type != "rope", "position_embedding_type", self.position_embedding_type, "'rope'"),
            (self.learned_position_embeddings, "learned_position_embeddings", True, "False"),
            (rotary not in (False, 1.0), "partial_rotary_factor", rotary, "1.0 (head_dim is the rope part)"),
            (bool(self.no_rope_layers) and 0 in self.no_rope_layers, "no_rope_layers", self.no_rope_layers,
             "rope in every layer"),
            (self.qk_norm, "qk_norm", True, "False"), (self.clip_qkv is not None, "clip_qkv", self.clip_qkv, "None"),
            (self.rope_precision == "float32_rotation", "rope_precision", self.rope_precision,
             "'default' or 'float32'"),
            (self.sub_layernorm, "sub_layernorm", True, "False"),
            ("sliding_attention" in self.layer_types, "layer_types", self.layer_types, "full attention in every layer"),
            (self.attn_logit_softcapping is not None, "attn_logit_softcapping", self.attn_logit_softcapping, "None"),
            (self.attention_sinks, "attention_sinks", True, "False"),
            (self.query_pre_attn_scalar is not None, "query_pre_attn_scalar", self.query_pre_attn_scalar, "None")]
        for condition, name, value, allowed in refused:
            if condition:
                raise ValueError(f"`{name}`={value!r} does not combine with multi-head latent attention "
                                 f"(kv_lora_rank={self.kv_lora_rank}): it needs {allowed}.")

    def validate_layer_type(self):
        """transformers' check (known names, one per layer), then: only full and sliding layers, and a window for
        the sliding ones."""
        self._check_sizes()
        super().validate_layer_type()
        unsupported = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unsupported:
            raise ValueError(f"`layer_types` holds {unsupported}; ArchLM layers are one of {list(LAYER_TYPES)}.")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"`sliding_window` must be a positive integer or None, got {self.sliding_window!r}.")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                f"`layer_types` has sliding_attention layers ({self.layer_types}) but `sliding_window` is None: "
                "give the window, or make every layer 'full_attention'."
            )

    def validate_norm_eps(self):
        """A finite epsilon, not below 1e-12: below ~1e-20 float32 norms of a (near-)zero vector, e.g. after dropout,
        give inf/NaN gradients."""
        if not (1e-12 <= self.norm_eps and math.isfinite(self.norm_eps)):
            raise ValueError(f"`norm_eps` must be a finite number >= 1e-12, got {self.norm_eps!r}.")

    def validate_scales(self):
        """Multipliers and soft caps in [1e-6, 1e6]: 0 silences the model, and far outside that range the logits of a
        fresh model overflow float32 (the property test found logits_scaling=1e-105 dividing them to inf)."""
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier",
                     "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "clip_qkv"):
            value = getattr(self, name)
            if value is not None and not (_positive_finite(value) and 1e-6 <= value <= 1e6):
                optional = "" if name in ("embedding_multiplier", "residual_multiplier", "logits_scaling") else ", or None"
                raise ValueError(f"`{name}` must be a number in [1e-6, 1e6]{optional}, got {value!r}.")
        if self.attention_multiplier is not None and self.query_pre_attn_scalar is not None:
            raise ValueError(
                f"`attention_multiplier`={self.attention_multiplier} and `query_pre_attn_scalar`="
                f"{self.query_pre_attn_scalar} both set the attention score scale; give one of them."
            )

    def validate_z_loss(self):
        if not _is_number(self.z_loss_coef) or not math.isfinite(self.z_loss_coef) or self.z_loss_coef < 0:
            raise ValueError(f"`z_loss_coef` must be a finite number >= 0 (PaLM used 1e-4), got {self.z_loss_coef!r}.")

    def validate_experts(self):
        """Mixture of experts: sizes, a top-k within the experts, layer choices that exist, finite coefficients."""
        self._check_sizes()
        # the values are checked in a dense config too: a bad one is a typo there, and would bite once experts are on.
        # The fields comparisons share between dense and mixture presets (widths, which layers, the routers' loss
        # coefficients) are accepted on a dense model; those only a mixture acts on are refused there
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "n_group",
                     "topk_group"):
            value = getattr(self, name)
            if (value is not None or name not in ("num_experts", "moe_intermediate_size")) and (
                    not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        scale = self.routed_scaling_factor
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"`routed_scaling_factor` must be a finite number > 0 (DeepSeek-V3: 2.5), got {scale!r}.")
        layers = self.mlp_only_layers or []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers for i in layers):
            raise ValueError(
                f"`mlp_only_layers` must list layer indices in [0, {self.num_hidden_layers - 1}], got {self.mlp_only_layers}."
            )
        if self.num_experts is None:
            for name, unset in (("shared_expert_intermediate_size", None), ("router_bias_update_rate", 0),
                                ("router_scoring", "softmax"), ("routed_scaling_factor", 1), ("n_group", 1),
                                ("topk_group", 1), ("group_scoring", "top2_sum"), ("shared_expert_gated", True),
                                ("router_topk_softmax", False), ("router_logits_fp32", False), ("router_bias", False),
                                ("router_choice_bias", False)):
                if getattr(self, name) != unset:
                    raise ValueError(f"`{name}`={getattr(self, name)} is for a mixture's experts, but this model is "
                                     "dense (num_experts=None): set num_experts too.")
            return
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be at most `num_experts` ({self.num_experts}):"
                " a token cannot be routed to more experts than there are."
            )
        shared = self.shared_expert_intermediate_size
        if shared is not None and (not isinstance(shared, int) or isinstance(shared, bool) or shared <= 0):
            raise ValueError(f"`shared_expert_intermediate_size` must be a positive integer or None, got {shared!r}.")
        if not self.shared_expert_gated and shared is None:
            raise ValueError("`shared_expert_gated`=False is for a shared expert, but there is none: set "
                             "shared_expert_intermediate_size too.")
        self._check_groups()
        if self.router_choice_bias and (self.router_scoring == "sigmoid" or self.router_bias_update_rate):
            raise ValueError(
                "`router_choice_bias`=True gives a softmax router without a rate its routing bias, which this router "
                f"has already (router_scoring={self.router_scoring!r}, router_bias_update_rate="
                f"{self.router_bias_update_rate}): drop it."
            )
        if self.router_topk_softmax and (self.router_scoring != "softmax" or not self.norm_topk_prob
                                         or self.router_bias_update_rate):
            raise ValueError(
                "`router_topk_softmax`=True takes the softmax of the k largest router logits, which equals softmax "
                "scoring renormalised over the k: it needs router_scoring='softmax' and norm_topk_prob=True, and no "
                f"routing bias (got router_scoring={self.router_scoring!r}, norm_topk_prob={self.norm_topk_prob}, "
                f"router_bias_update_rate={self.router_bias_update_rate})."
            )
        if self.sub_layernorm:
            raise ValueError(
                "`sub_layernorm`=True (Sub-LN; init_scheme='magneto' turns it on) puts a norm before each MLP's "
                f"down_proj, and the routed experts (num_experts={self.num_experts}) have none: use it on a dense "
                "model, or set sub_layernorm=False with init_scheme 'normal' or 'scaled'."
            )
        if not any(self.layer_is_sparse(i) for i in range(self.num_hidden_layers)):
            raise ValueError(
                f"`num_experts`={self.num_experts} but no layer is sparse (decoder_sparse_step={self.decoder_sparse_step}, "
                f"mlp_only_layers={self.mlp_only_layers}, {self.num_hidden_layers} layers); set num_experts=None for a "
                "dense model."
            )

    def _check_groups(self):
        groups, chosen, experts = self.n_group, self.topk_group, self.num_experts
        if experts % groups or not 1 <= chosen <= groups:
            raise ValueError(f"`n_group`={groups} and `topk_group`={chosen}: the {experts} experts must split into "
                             f"n_group equal groups, and 1 <= topk_group <= n_group.")
        per_group = experts // groups
        if groups == 1 and self.group_scoring != "top2_sum":
            raise ValueError(f"`group_scoring`={self.group_scoring!r} scores groups of experts, but n_group=1 makes "
                             "one group (no limit): set n_group > 1, or leave group_scoring at 'top2_sum'.")
        if groups > 1 and per_group < 2 and self.group_scoring == "top2_sum":
            raise ValueError(f"`n_group`={groups} leaves {per_group} expert a group: group_scoring='top2_sum' scores a "
                             "group by its two best experts, so each needs at least 2 (group_scoring='max' needs 1).")
        if self.num_experts_per_tok > chosen * per_group:
            raise ValueError(f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be at most the experts of the "
                             f"topk_group={chosen} groups a token may use ({chosen} x {per_group}).")

    def layer_is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a mixture of experts (Qwen-MoE's rule: every decoder_sparse_step-th layer,
        except mlp_only_layers)."""
        return bool(self.num_experts) and (layer_idx + 1) % self.decoder_sparse_step == 0 and (
            layer_idx not in (self.mlp_only_layers or []))

    def rope_parameters_by_layer_type(self) -> dict[str, dict]:
        """The rope dict of each layer type present: one shared dict, or transformers' nested form (Gemma 3:
        another rope_theta for the sliding layers)."""
        params = self.rope_parameters or {}
        nested = set(params) & set(LAYER_TYPES)
        return {layer_type: (params[layer_type] if nested else params) for layer_type in dict.fromkeys(self.layer_types)}

    def validate_rope(self):
        """A complete, sane rope dict (per layer type when nested); raises instead of transformers' warnings."""
        self._check_sizes()
        params = self.rope_parameters
        if self.position_embedding_type != "rope":
            shaping = [(name, value) for name, value, shapes_rope in (
                ("rope_interleaved", self.rope_interleaved, self.rope_interleaved),
                ("rope_precision", self.rope_precision, self.rope_precision != "default"),
                ("no_rope_layers", self.no_rope_layers, self.no_rope_layers is not None and not all(self.no_rope_layers)),
            ) if shapes_rope]
            if shaping:
                name, value = shaping[0]
                raise ValueError(
                    f"`{name}`={value!r} shapes rope, but `position_embedding_type`={self.position_embedding_type!r}; "
                    f"use position_embedding_type='rope', or drop `{name}`."
                )
        if self.no_rope_layers is not None:
            if len(self.no_rope_layers) != self.num_hidden_layers or not set(self.no_rope_layers) <= {0, 1}:
                raise ValueError(
                    f"`no_rope_layers` must hold one 0 (no rope) or 1 (rope) per layer ({self.num_hidden_layers}), "
                    f"got {self.no_rope_layers}."
                )
        if self.no_rope_layer_interval is not None and not (
            isinstance(self.no_rope_layer_interval, int) and self.no_rope_layer_interval > 0
        ):
            raise ValueError(f"`no_rope_layer_interval` must be a positive integer or None, got {self.no_rope_layer_interval!r}.")
        if not params:
            return
        if not isinstance(params, dict):
            raise ValueError(f"`rope_parameters` must be a dict, got {type(params).__name__}.")
        nested = set(params) & set(LAYER_TYPES)
        if nested and (set(self.layer_types) - nested or set(params) - nested):
            raise ValueError(
                f"`rope_parameters` nested by layer type must hold a dict for each layer type in `layer_types` "
                f"({sorted(set(self.layer_types))}) and nothing else, got keys {sorted(params)}."
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:  # (before the dicts: not their fault)
            raise ValueError(f"rope rotates pairs of channels, so `head_dim` must be even, got {self.head_dim}.")
        for layer_type in sorted(nested) or [None]:  # every nested dict: the rotary module builds a table for each
            self._check_rope_dict(params[layer_type] if layer_type else params,
                                  f"rope_parameters['{layer_type}']" if layer_type else "rope_parameters")
        if self.position_embedding_type != "rope":
            return  # the dict is kept but unused: transformers' even-head_dim check does not apply
        super().validate_rope()

    def _check_rope_dict(self, params, name: str):
        if not isinstance(params, dict):
            raise ValueError(f"`{name}` must be a dict, got {params!r}.")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_REQUIRED_KEYS:
            raise ValueError(f"`{name}['rope_type']`={rope_type!r} is unknown; allowed: {list(ROPE_REQUIRED_KEYS)}.")
        if rope_type != "default" and self.position_embedding_type != "rope":
            raise ValueError(
                f"`{name}['rope_type']`={rope_type!r} scales rope, but `position_embedding_type`="
                f"{self.position_embedding_type!r} does not use rope; use rope_type 'default' or position_embedding_type='rope'."
            )
        known = set(RopeParameters.__annotations__) | {"type"}
        for key in set(params) - known:  # other keys are kept (other tools' own); a near miss is a typo
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)  # (scaling_factor is not long_factor)
            if close:
                raise ValueError(f"`{name}` holds {key!r}, not a rope key: did you mean {close[0]!r}?")
        missing = [key for key in ROPE_REQUIRED_KEYS[rope_type] if params.get(key) is None]
        if missing:
            raise ValueError(f"`{name}` with rope_type={rope_type!r} needs the keys {missing}; got {params}.")
        # finite and > 0, or at least the bound: rope_theta < 1 overflows the frequencies, factor < 1 (which transformers
        # only warns about) can divide them by ~0, longrope divides by log(original_max_position_embeddings)
        minimum = {"rope_theta": 1, "factor": 1, "original_max_position_embeddings": 2}
        for key in ("rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                    "attention_factor", "beta_fast", "beta_slow"):
            value = params.get(key)
            if (key == "rope_theta" or value is not None) and (
                not _is_number(value) or not math.isfinite(value) or value <= 0 or value < minimum.get(key, 0)
            ):
                allowed = f">= {minimum[key]}" if key in minimum else "> 0"
                raise ValueError(f"`{name}['{key}']` must be a finite number {allowed}, got {value!r}.")
        if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ValueError(
                f"`{name}['high_freq_factor']` must be greater than `low_freq_factor`, got "
                f"high_freq_factor={params['high_freq_factor']} and low_freq_factor={params['low_freq_factor']}."
            )
        # (equal bounds are Kimi K2's: transformers' ramp widens an empty range by 0.001)
        if rope_type == "yarn" and params.get("beta_fast", 32) < params.get("beta_slow", 1):
            raise ValueError(
                f"`{name}['beta_fast']` must be at least `beta_slow`, got "
                f"beta_fast={params.get('beta_fast', 32)} and beta_slow={params.get('beta_slow', 1)}."
            )
        if self.position_embedding_type != "rope":
            return  # kept but unused: the rotated width does not apply
        partial = params.get("partial_rotary_factor", 1.0)
        if partial is None:
            partial = 1.0
        # "proportional" rope returns frequencies for the whole head, zero past the rotated part
        rotary_dim = self.head_dim if rope_type == "proportional" else int(self.head_dim * partial) if _is_number(partial) else 0
        if not _is_number(partial) or not 0 < partial <= 1 or rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"`{name}['partial_rotary_factor']`={partial!r} must be in (0, 1] and rotate an even number of "
                f"channels: int(head_dim * factor) = int({self.head_dim} * {partial}) = {rotary_dim}."
            )
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = params[key]
                if not isinstance(value, list) or len(value) != rotary_dim // 2 or not all(
                    _is_number(item) and math.isfinite(item) and item > 0 for item in value
                ):
                    raise ValueError(
                        f"`{name}['{key}']` must be a list of {rotary_dim // 2} finite numbers > 0 "
                        f"(rotated channels / 2), got {value!r}."
                    )

    def validate_token_ids(self):
        """Special token ids must index the vocabulary (transformers only warns; a bad id crashes generate)."""
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            if not token_ids_fit(value, self.vocab_size):
                raise ValueError(
                    f"`{name}`={value!r} is outside the vocabulary: ids must be in [0, {self.vocab_size - 1}] "
                    f"(vocab_size={self.vocab_size}), or None."
                )

    # ----------------------------------------------------------------------------------------
    # derived facts the model and the descriptions share
    # ----------------------------------------------------------------------------------------
    def layer_uses_rope(self, layer_idx: int) -> bool:
        return self.position_embedding_type == "rope" and (self.no_rope_layers is None or bool(self.no_rope_layers[layer_idx]))

    def rotary_dim(self, layer_type: str | None = None) -> int:
        """How many channels of each head rope rotates (the first ones; partial rotary rotates fewer) in layers of
        `layer_type`; None: the full-attention layers', or the first layer type's where every layer slides."""
        by_type = self.rope_parameters_by_layer_type()
        if layer_type is None:
            layer_type = "full_attention" if "full_attention" in by_type else next(iter(by_type), "full_attention")
        params = by_type.get(layer_type) or {}
        if params.get("rope_type") == "proportional":  # its frequencies cover the whole head, zero past the rotated part
            return self.head_dim
        return int(self.head_dim * (params.get("partial_rotary_factor") or 1.0))

    @property
    def attention_scaling(self) -> float:
        """The factor on q . k before softmax."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        if self.kv_lora_rank:  # latent attention: over the whole query (its rope and no-rope parts), times YaRN's
            # mscale squared where the rope dict sets mscale_all_dim (DeepSeek-V3)
            params = next(iter(self.rope_parameters_by_layer_type().values()), None) or {}
            scale = float(self.qk_nope_head_dim + self.head_dim) ** -0.5
            factor, mscale = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
            if params.get("rope_type", "default") != "default" and mscale and factor > 1:
                scale *= (0.1 * mscale * math.log(factor) + 1.0) ** 2
            return scale
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ----------------------------------------------------------------------------------------
    # presets and descriptions
    # ----------------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by `from_preset`."""
        return list(PRESETS)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers sets the keywords of `from_pretrained(folder, norm_eps=...)` as attributes after construction,
        past every check (a negative eps gave NaN logits, a rope_scaling a rope dict without rope_theta): ArchLM's
        fields and the legacy rope keywords among them build the config with the saved ones instead, checked alike."""
        own = {field.name for field in dataclasses.fields(cls)} - {field.name for field in dataclasses.fields(PreTrainedConfig)}
        names = own | set(_ROPE_KWARGS) | set(_OTHER_NAMES) | set(cls.attribute_map)
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ArchLMConfig":
        """A preset family's architecture, with any field overridden: `from_preset("llama", num_hidden_layers=4)`.

        Unlike the constructor (which, as every transformers config, keeps unknown keys of a loaded config.json),
        an override that is not a field is refused: a typo must not train the wrong model silently."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {cls.presets()}.")
        known = {f.name for f in dataclasses.fields(cls)} | _LEGACY_KWARGS | set(cls.attribute_map)
        unknown = sorted(set(overrides) - known)
        if unknown:
            hints = {key: [_OTHER_NAMES[key]] if key in _OTHER_NAMES else difflib.get_close_matches(key, known, n=1)
                     for key in unknown}
            listed = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
            raise ValueError(f"Unknown config field(s) {listed}; fields are: {sorted(f.name for f in dataclasses.fields(cls))}.")
        for alias, field_name in cls.attribute_map.items():  # Mixtral's num_local_experts overrides num_experts
            if alias in overrides:
                value = overrides.pop(alias)
                if overrides.setdefault(field_name, value) != value:
                    raise ValueError(f"`{field_name}`={overrides[field_name]} and `{alias}`={value} (another name for "
                                     "the same field) disagree: pass one of them.")
        fields = {**copy.deepcopy(PRESETS[name]), **overrides}
        rope, preset_rope = overrides.get("rope_parameters"), PRESETS[name].get("rope_parameters")
        if _flat_dict(rope) and _flat_dict(preset_rope):
            # a new rope dict (a scaling type, say) keeps the preset's base frequency unless it names one (not its
            # rotated share: a dict without partial_rotary_factor rotates the whole head)
            fields["rope_parameters"] = {key: preset_rope[key] for key in ("rope_theta",) if key in preset_rope} | rope
        # A preset's special ids belong to its family's tokenizer: with a smaller vocabulary they point nowhere, so
        # they are dropped (ids the caller passes are kept, and validated like any field).
        for key in TOKEN_ID_FIELDS:
            if key not in overrides and not token_ids_fit(fields.get(key), fields.get("vocab_size", 32000)):
                logger.info("Preset %r: dropping %s=%r, outside vocab_size=%s", name, key, fields[key], fields["vocab_size"])
                fields[key] = None
        # A preset's per-layer lists follow an overridden depth (its pattern repeated), unless the caller gives them.
        layers = fields.get("num_hidden_layers")
        for key in ("layer_types", "no_rope_layers"):
            pattern = fields.get(key)
            if key not in overrides and pattern and isinstance(layers, int) and len(pattern) != layers:
                fields[key] = [pattern[i % len(pattern)] for i in range(layers)]
        return cls(**fields)

    def _name_tags(self) -> list[str]:
        """The optional parts of `architecture_name`, each from a (condition, tag) row."""
        sliding = self.layer_types.count("sliding_attention")
        no_rope = self.num_hidden_layers - sum(self.no_rope_layers) if self.no_rope_layers else 0
        scope = QK_NORM_SCOPES[self.qk_norm_scope][0]
        rows = [
            (bool(self.num_experts), f"MoE{self.num_experts}x{self.num_experts_per_tok}"
             + ("" if not self.shared_expert_intermediate_size else "+Shared" if self.shared_expert_gated
                else "+SharedUngated")
             + ("+Sigmoid" if self.router_scoring == "sigmoid" else "")
             + (f"+Group{self.n_group}top{self.topk_group}" + ("max" if self.group_scoring == "max" else "")
                if self.n_group > 1 else "")
             + ("+RouterBias" if self.router_bias_update_rate or self.router_choice_bias else "")
             + ("+GateBias" if self.router_bias else "")),
            (bool(self.kv_lora_rank), f"MLA{self.kv_lora_rank}" + (f"q{self.q_lora_rank}" if self.q_lora_rank else "")),
            (self.num_key_value_heads == 1 and self.num_attention_heads > 1, "MQA"),
            (1 < self.num_key_value_heads < self.num_attention_heads, f"GQA{self.num_key_value_heads}"),
            (self.use_parallel_residual, "Parallel" if self.parallel_shared_norm else "Parallel2Norm"),
            (self.sub_layernorm, "SubLN"),
            (self.swiglu_limit is not None, f"ClampGLU{self.swiglu_limit:g}" if self.swiglu_limit else ""),
            (self.qk_norm, f"QKNorm{scope}" + ("AfterRope" if self.qk_norm_position == "after_rope" else "")),
            (self.clip_qkv is not None, f"ClipQKV{self.clip_qkv:g}" if self.clip_qkv else ""),
            (sliding == self.num_hidden_layers, f"SWA{self.sliding_window}"),
            (0 < sliding < self.num_hidden_layers, f"SWA{self.sliding_window}x{_ratio(sliding, self.num_hidden_layers - sliding)}"),
            (no_rope > 0, f"NoPE{_ratio(no_rope, self.num_hidden_layers)}"),
            (self.attn_logit_softcapping is not None or self.final_logit_softcapping is not None, "Softcap"),
            (self.attention_sinks, "Sinks"),
            (self.embedding_multiplier != 1 or self.scale_embeddings_by_sqrt_hidden, "EmbScale"),
            (self.residual_multiplier != 1 or self.attention_multiplier is not None or self.logits_scaling != 1, "Mult"),
            (self.lm_head_bias, "HeadBias"),
            (self.tie_word_embeddings, "Tied"),
        ]
        return [tag for condition, tag in rows if condition]

    @property
    def architecture_name(self) -> str:
        """A short name for comparisons, e.g. `12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4`."""
        position = POSITION_EMBEDDING_TYPES[self.position_embedding_type][0]
        if self.position_embedding_type == "rope":
            params = next(iter(self.rope_parameters_by_layer_type().values()), {}) or {}
            details = [params.get("rope_type", "default"), f"{self.rotary_dim() / self.head_dim:.0%}", "interleaved"]
            keep = [details[0] != "default", self.rotary_dim() != self.head_dim, self.rope_interleaved]
            if any(keep):
                position += "(" + ",".join(detail for detail, kept in zip(details, keep) if kept) + ")"
        if self.learned_position_embeddings:
            position += "+Learned"
        act = "GELU" if self.hidden_act.startswith("gelu") else _ACT_NAMES.get(self.hidden_act, self.hidden_act)
        mlp = _GLU_NAMES.get(act, f"{act}GLU") if self.mlp_type == "gated" else act
        parts = [
            f"{self.num_hidden_layers}L", f"{self.num_attention_heads}H", f"{self.hidden_size}D",
            position, NORM_TYPES[self.norm_type][0], mlp, NORM_POSITIONS[self.norm_position][0],
        ]
        return "-".join(parts + self._name_tags())

    def _meta_model(self):
        """The causal LM built on the meta device: every parameter's shape, no memory, no init."""
        from .modeling_archlm import ArchLMForCausalLM  # the modeling file imports this one: import at call time

        with torch.device("meta"):
            return ArchLMForCausalLM(self)

    def num_parameters_estimate(self, active_only: bool = False) -> int:
        """Parameter count of the causal LM, counted on a meta-device model; `active_only`: those one token uses
        (a mixture of experts runs num_experts_per_tok of its experts)."""
        model = self._meta_model()
        return model.num_parameters() - (model.inactive_parameters() if active_only else 0)

    def summary(self) -> str:
        """A human-readable table of the architecture."""
        sliding = self.layer_types.count("sliding_attention")
        model = self._meta_model()
        total = model.num_parameters()
        active = total - model.inactive_parameters()
        sparse = sum(self.layer_is_sparse(i) for i in range(self.num_hidden_layers))
        rows = [
            ("architecture", self.architecture_name),
            ("parameters", f"{total:,}" + (f" ({active:,} active per token)" if active != total else "")),
            ("layers x hidden", f"{self.num_hidden_layers} x {self.hidden_size}"),
            ("heads (q / kv) x head_dim", f"{self.num_attention_heads} / {self.num_key_value_heads} x {self.head_dim}"),
            ("latent attention", (f"kv latent {self.kv_lora_rank}, q " + (f"latent {self.q_lora_rank}" if self.q_lora_rank
                                  else "projected") + f"; per head q/k {self.qk_nope_head_dim} + {self.head_dim} rope, "
                                  f"v {self.v_head_dim}") if self.kv_lora_rank else "-"),
            ("block", ("parallel attention + MLP, " + ("one shared norm" if self.parallel_shared_norm else "a norm each"))
             if self.use_parallel_residual else "sequential (attention, then MLP)"),
            ("mlp", f"{self.mlp_type}, {self.hidden_act}, intermediate {self.intermediate_size}"
             + (f", clamped at {self.swiglu_limit} (gpt-oss)" if self.swiglu_limit is not None else "")),
            ("experts", (f"{self.num_experts} of width {self.moe_intermediate_size}, top-{self.num_experts_per_tok}"
                         f" by {self.router_scoring}"
                         + (f" within {self.topk_group} of {self.n_group} groups"
                            f" (by {GROUP_SCORINGS[self.group_scoring]})" if self.n_group > 1 else "")
                         + f"{' renormalised' if self.norm_topk_prob else ''}"
                         + (f" x {self.routed_scaling_factor}" if self.routed_scaling_factor != 1 else "")
                         + f"{' (mixed in fp32)' if self.router_weights_fp32 else ''}"
                         + (", router logits in fp32" if self.router_logits_fp32 else "")
                         + (", router with a bias" if self.router_bias else "")
                         + f", in {sparse} of {self.num_hidden_layers} layers"
                         + (f", shared expert {self.shared_expert_intermediate_size}"
                            + ("" if self.shared_expert_gated else " (ungated)") if self.shared_expert_intermediate_size else "")
                         + f"; aux loss {self.router_aux_loss_coef}, z-loss {self.router_z_loss_coef}"
                         + (f", bias update rate {self.router_bias_update_rate}" if self.router_bias_update_rate else "")
                         + (", a fixed routing bias" if self.router_choice_bias else ""))
             if self.num_experts else "-"),
            ("norm", f"{self.norm_type} ({NORM_POSITIONS[self.norm_position][1]}), eps {self.norm_eps}"
             + (", Sub-LN" if self.sub_layernorm else "")),
            ("positions", self.position_embedding_type + (" + learned" if self.learned_position_embeddings else "")),
            ("rope", (f"{self.rope_parameters}, rotary dim {self.rotary_dim()}/{self.head_dim}"
                      + (", interleaved" if self.rope_interleaved else "")) if self.position_embedding_type == "rope" else "-"),
            ("rope-free layers (NoPE)", str([i for i, rope in enumerate(self.no_rope_layers or []) if not rope] or "-")),
            ("max positions", str(self.max_position_embeddings)),
            ("attention layers", f"{sliding} sliding (window {self.sliding_window}), {self.num_hidden_layers - sliding} full"),
            ("attention scale", f"{self.attention_scaling:.6g}" + (f", softcap {self.attn_logit_softcapping}" if self.attn_logit_softcapping else "")
             + (", a learned sink per head" if self.attention_sinks else "")),
            ("qk norm", f"{self.qk_norm_type or self.norm_type}, {self.qk_norm_scope}"
             + (", after rope" if self.qk_norm_position == "after_rope" else "") if self.qk_norm else "False"),
            ("clip qkv", str(self.clip_qkv)),
            ("bias (qkv / out / mlp / head)", f"{self.attention_bias} / {self.attention_output_bias} / {self.mlp_bias} / {self.lm_head_bias}"),
            ("multipliers (emb / residual / logits)", f"{self.embedding_multiplier}"
             + (" x sqrt(hidden)" if self.scale_embeddings_by_sqrt_hidden else "")
             + f" / {self.residual_multiplier} / 1/{self.logits_scaling}"
             + (f", softcap {self.final_logit_softcapping}" if self.final_logit_softcapping else "")),
            ("tied embeddings", str(self.tie_word_embeddings)),
            ("dropout (attn / hidden / emb)", f"{self.attention_dropout} / {self.hidden_dropout} / {self.embedding_dropout}"),
            ("init", f"{self.init_scheme}, std {self.initializer_range}"),
            ("vocab", str(self.vocab_size)),
        ]
        width = max(len(key) for key, _ in rows)
        lines = [f"{'field'.ljust(width)} | value", f"{'-' * width}-|-{'-' * 40}"]
        lines += [f"{key.ljust(width)} | {value}" for key, value in rows]
        return "\n".join(lines)


__all__ = ["ArchLMConfig", "PRESETS", "parse_config_overrides"]
