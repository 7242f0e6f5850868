"""Convert between transformers' causal LMs and ArchLM models, with the same logits both ways.

    python -m archlm.convert --from-transformers IN_DIR OUT_DIR
    python -m archlm.convert --to-native IN_DIR OUT_DIR

`--from-transformers` loads IN_DIR (a local folder) with `AutoModelForCausalLM.from_pretrained`, converts it,
and saves the ArchLM model (config with `auto_map`, safetensors, remote code, generation config) to OUT_DIR.
`--to-native` loads the ArchLM model saved in IN_DIR and saves it as the native transformers family that
computes the same function (no remote code: vLLM, TGI and llama.cpp's converters load it as they load any
Llama, Mistral, Qwen2, Qwen3 or GPT-2), after checking on a short input that both give the same logits.
Either way the tokenizer comes along when IN_DIR has one. OUT_DIR must be new or empty, and neither IN_DIR nor a
folder inside it: writing over a model folder would leave a mix of both models' files. `--overwrite` replaces a
non-empty OUT_DIR (its contents are deleted once the conversion has succeeded). In Python:

    >>> from archlm.convert import from_transformers, to_transformers
    >>> archlm_model = from_transformers(LlamaForCausalLM.from_pretrained(path))
    >>> llama = to_transformers(archlm_model)  # a LlamaForCausalLM again

Supported: `GPT2LMHeadModel`, `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`. Each family is one `Family` entry in `FAMILIES` holding a config mapping and a
state-dict mapping each way, and the list of ArchLM settings the family cannot express.

Whatever a source config sets that the other side cannot represent (GPT-2's per-layer attention scaling,
Qwen's per-layer sliding window, partial rotary, ALiBi, post-norm, ...) is refused with a `ValueError` that
names the field and its value (every such field, not only the first); nothing that changes the logits is
dropped silently, and the weights load with strict key checking. Two things carry over without an equal:

- a bias the target has and the ArchLM model lacks (Llama's `attention_bias` covers q, k, v and o; GPT-2
  has biases everywhere) is exported as zeros, which computes the same function;
- `hidden_dropout` / `embedding_dropout`, which the Llama-like families do not have, are dropped with a
  warning: dropout is off at inference, so the logits are unchanged, but training the export further
  would run without them. `init_scheme` only matters for a fresh initialisation and is dropped too.
"""

import argparse
import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .check import missing_local_folder
from .configuration_archlm import TOKEN_ID_FIELDS, ArchLMConfig, token_ids_fit
from .modeling_archlm import ArchLMForCausalLM

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _unsupported(config: PreTrainedConfig, field: str, value, reason: str) -> ValueError:
    return ValueError(
        f"Cannot convert this {config.model_type} model: `{field}`={value!r} {reason}; ArchLM has no equivalent."
    )


# ------------------------------------------------------------------------------------------------
# Config mappings: one function per family, each returning an ArchLMConfig
# ------------------------------------------------------------------------------------------------
def _shared_fields(config: PreTrainedConfig) -> dict:
    """Fields every supported family names the same way (GPT-2 through its `attribute_map`), ArchLM too: read from
    either side, and accepted by either side's constructor."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        **_special_token_ids(config),
    )


def _special_token_ids(config: PreTrainedConfig) -> dict:
    """pad/bos/eos ids; one outside the vocabulary (transformers accepts such a config with a warning) becomes None,
    with a warning naming it, so that any model transformers accepts converts."""
    ids = {}
    for field in TOKEN_ID_FIELDS:
        value = getattr(config, field, None)
        if not token_ids_fit(value, config.vocab_size):
            logger.warning("%s=%r is outside the vocabulary (vocab_size=%d): converted as None", field, value,
                           config.vocab_size)
            value = None
        ids[field] = value
    return ids


def gpt2_config_to_archlm(config: PreTrainedConfig) -> ArchLMConfig:
    """GPT-2: learned positions, pre-norm LayerNorm, standard GELU MLP, biases everywhere."""
    for field, supported, reason in (
        ("scale_attn_weights", True, "leaves attention scores unscaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "scales attention scores by 1/(layer_idx + 1) per layer"),
        ("reorder_and_upcast_attn", False, "computes attention with a reordered, upcast kernel"),
        ("add_cross_attention", False, "adds cross-attention to an encoder"),
    ):
        if getattr(config, field) != supported:
            raise _unsupported(config, field, getattr(config, field), reason)
    return ArchLMConfig(
        **_shared_fields(config),
        intermediate_size=config.n_inner or 4 * config.hidden_size,
        hidden_act=config.activation_function,
        norm_type="layernorm",
        norm_eps=config.layer_norm_epsilon,
        norm_position="pre",
        position_embedding_type="learned",
        mlp_type="standard",
        attention_bias=True,
        attention_output_bias=True,
        mlp_bias=True,
        attention_dropout=config.attn_pdrop,
        hidden_dropout=config.resid_pdrop,
        embedding_dropout=config.embd_pdrop,
        init_scheme="scaled",
    )


def _rope_parameters(config: PreTrainedConfig) -> dict:
    """The source's (already standardised) v5 `rope_parameters`, if it is one rope over the whole head."""
    params = copy.deepcopy(dict(config.rope_parameters or {}))
    if any(isinstance(value, dict) for value in params.values()):
        raise _unsupported(config, "rope_parameters", params, "sets a different rope per layer type")
    partial_rotary_factor = params.get("partial_rotary_factor", 1.0)
    if partial_rotary_factor != 1.0:
        raise _unsupported(config, "partial_rotary_factor", partial_rotary_factor, "rotates only part of each head")
    return params


def _uniform_sliding_window(config: PreTrainedConfig) -> int | None:
    """Qwen2/3 pick full or sliding attention per layer (`layer_types`, derived from `use_sliding_window` and
    `max_window_layers`); ArchLM applies one choice to every layer, so the layers must agree."""
    layer_types = list(config.layer_types or ["full_attention"] * config.num_hidden_layers)
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return config.sliding_window
    raise _unsupported(
        config, "layer_types", layer_types,
        f"is not all 'full_attention' or all 'sliding_attention' (use_sliding_window={config.use_sliding_window}, "
        f"max_window_layers={config.max_window_layers})",
    )


def _llama_like_config(config: PreTrainedConfig, **family_fields) -> ArchLMConfig:
    """What Llama, Mistral and Qwen2/3 share: rope, pre-norm RMSNorm, SwiGLU, GQA, no dropout but attention's."""
    fields = dict(
        **_shared_fields(config),
        intermediate_size=config.intermediate_size,
        num_key_value_heads=config.num_key_value_heads,
        # Mistral reads `head_dim` with `or`, Llama/Qwen with getattr: both fall back to hidden / heads
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        norm_type="rmsnorm",
        norm_eps=config.rms_norm_eps,
        norm_position="pre",
        position_embedding_type="rope",
        rope_parameters=_rope_parameters(config),
        mlp_type="gated",
        attention_dropout=config.attention_dropout or 0.0,  # Llama allows None
        hidden_dropout=0.0,
        embedding_dropout=0.0,
    )
    return ArchLMConfig(**{**fields, **family_fields})


def llama_config_to_archlm(config: PreTrainedConfig) -> ArchLMConfig:
    # `pretraining_tp` is not refused: transformers 5 ignores it (it only sliced the same matmuls), so the
    # source computes exactly what ArchLM computes.
    return _llama_like_config(
        config,
        attention_bias=config.attention_bias,
        attention_output_bias=config.attention_bias,  # Llama's attention_bias covers o_proj too
        mlp_bias=config.mlp_bias,
    )


def mistral_config_to_archlm(config: PreTrainedConfig) -> ArchLMConfig:
    # MistralModel applies `sliding_window` to every layer (it ignores `layer_types`), as ArchLM does.
    return _llama_like_config(config, sliding_window=config.sliding_window)


def qwen2_config_to_archlm(config: PreTrainedConfig) -> ArchLMConfig:
    return _llama_like_config(
        config,
        attention_bias=True,  # Qwen2 always has q/k/v bias ...
        attention_output_bias=False,  # ... and never an o_proj bias
        sliding_window=_uniform_sliding_window(config),
    )


def qwen3_config_to_archlm(config: PreTrainedConfig) -> ArchLMConfig:
    return _llama_like_config(
        config,
        attention_bias=config.attention_bias,
        attention_output_bias=config.attention_bias,
        qk_norm=True,  # RMSNorm over head_dim on q and k, before rope
        sliding_window=_uniform_sliding_window(config),
    )


# ------------------------------------------------------------------------------------------------
# State-dict mappings: source model -> ArchLM parameter names
# ------------------------------------------------------------------------------------------------
def llama_like_state_dict_to_archlm(model: PreTrainedModel) -> StateDict:
    """Llama, Mistral and Qwen2/3 keys carry over one to one: ArchLM uses Llama's parameter names
    (`model.layers.{i}.self_attn.q_proj`, `...mlp.gate_proj`, `...input_layernorm`, `model.norm`, `lm_head`,
    and Qwen3's `self_attn.q_norm` / `k_norm`). Strict loading then proves both sides hold the same keys."""
    return dict(model.state_dict())


def gpt2_state_dict_to_archlm(model: PreTrainedModel) -> StateDict:
    """GPT-2's names mapped to ArchLM's. Its Conv1D stores weights as (in, out), the transpose of nn.Linear's
    (out, in), and `c_attn` holds q, k and v side by side: (C, 3C) -> transpose -> (3C, C) -> 3 x (C, C)."""
    source = dict(model.state_dict())
    hidden = model.config.hidden_size

    def take(key: str) -> torch.Tensor:
        return source.pop(key)

    target = {
        "model.embed_tokens.weight": take("transformer.wte.weight"),
        "model.embed_positions.weight": take("transformer.wpe.weight"),
        "model.norm.weight": take("transformer.ln_f.weight"),
        "model.norm.bias": take("transformer.ln_f.bias"),
        "lm_head.weight": take("lm_head.weight"),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = take(src + "attn.c_attn.weight").t().split(hidden, dim=0)  # (3C, C) -> 3 x (C, C)
        q_bias, k_bias, v_bias = take(src + "attn.c_attn.bias").split(hidden, dim=0)
        target.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": q_bias,
            dst + "self_attn.k_proj.weight": k, dst + "self_attn.k_proj.bias": k_bias,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": v_bias,
            dst + "self_attn.o_proj.weight": take(src + "attn.c_proj.weight").t(),
            dst + "self_attn.o_proj.bias": take(src + "attn.c_proj.bias"),
            dst + "mlp.up_proj.weight": take(src + "mlp.c_fc.weight").t(),
            dst + "mlp.up_proj.bias": take(src + "mlp.c_fc.bias"),
            dst + "mlp.down_proj.weight": take(src + "mlp.c_proj.weight").t(),
            dst + "mlp.down_proj.bias": take(src + "mlp.c_proj.bias"),
        })
        for norm_src, norm_dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            target[dst + norm_dst + ".weight"] = take(f"{src}{norm_src}.weight")
            target[dst + norm_dst + ".bias"] = take(f"{src}{norm_src}.bias")
    if source:
        raise ValueError(f"GPT-2 parameters with no ArchLM counterpart: {sorted(source)}.")
    return {key: value.contiguous() for key, value in target.items()}


# ------------------------------------------------------------------------------------------------
# The way back: what each family cannot express, and ArchLM -> family config mappings
# ------------------------------------------------------------------------------------------------
# Activations the serving engines run for each family (vLLM's Llama MLP refuses anything but silu; llama.cpp's
# GPT-2 graph uses gelu). transformers itself would take any ACT2FN key, but then the export would not serve.
LLAMA_ACTIVATIONS = {"silu": "silu", "swish": "silu"}  # ACT2FN's "swish" is SiLU
GPT2_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _requirements(config: ArchLMConfig, family: str, rules) -> list[str]:
    """One line per broken rule: (field, holds, what the family does instead)."""
    return [f"`{field}`={getattr(config, field)!r}: {family} {instead}" for field, holds, instead in rules if not holds]


def _llama_like_mismatches(config: ArchLMConfig, family: str) -> list[str]:
    """What Llama, Mistral and Qwen2/3 all require: rope over the whole head, pre-norm RMSNorm, SwiGLU."""
    return _requirements(config, family, [
        ("position_embedding_type", config.position_embedding_type == "rope", "encodes positions with rope only"),
        ("learned_position_embeddings", not config.learned_position_embeddings, "has no learned absolute positions"),
        ("norm_type", config.norm_type == "rmsnorm", "normalises with RMSNorm"),
        ("norm_position", config.norm_position == "pre", "is pre-norm"),
        ("mlp_type", config.mlp_type == "gated", "has a gated MLP (SwiGLU)"),
        ("hidden_act", config.hidden_act in LLAMA_ACTIVATIONS, "gates its MLP with silu (what serving engines run)"),
    ])


def llama_mismatches(config: ArchLMConfig) -> list[str]:
    # any mix of attention biases exports: Llama's `attention_bias` covers q/k/v/o, the missing ones as zeros
    return _llama_like_mismatches(config, "LlamaForCausalLM") + _requirements(config, "LlamaForCausalLM", [
        ("qk_norm", not config.qk_norm, "has no q/k norm (Qwen3 has)"),
        ("sliding_window", config.sliding_window is None, "attends to the full context (Mistral slides)"),
    ])


def mistral_mismatches(config: ArchLMConfig) -> list[str]:
    return _llama_like_mismatches(config, "MistralForCausalLM") + _requirements(config, "MistralForCausalLM", [
        ("qk_norm", not config.qk_norm, "has no q/k norm"),
        ("attention_bias", not config.attention_bias, "has no bias on q/k/v"),
        ("attention_output_bias", not config.attention_output_bias, "has no bias on o_proj"),
        ("mlp_bias", not config.mlp_bias, "has no MLP bias"),
    ])


def qwen2_mismatches(config: ArchLMConfig) -> list[str]:
    default_head_dim = config.hidden_size // config.num_attention_heads
    return _llama_like_mismatches(config, "Qwen2ForCausalLM") + _requirements(config, "Qwen2ForCausalLM", [
        ("qk_norm", not config.qk_norm, "has no q/k norm (Qwen3 has)"),
        ("attention_output_bias", not config.attention_output_bias, "has no bias on o_proj"),
        ("mlp_bias", not config.mlp_bias, "has no MLP bias"),
        ("head_dim", config.head_dim == default_head_dim, f"has no head_dim field: heads are hidden_size / "
                                                          f"num_attention_heads = {default_head_dim} wide"),
    ])


def qwen3_mismatches(config: ArchLMConfig) -> list[str]:
    return _llama_like_mismatches(config, "Qwen3ForCausalLM") + _requirements(config, "Qwen3ForCausalLM", [
        ("mlp_bias", not config.mlp_bias, "has no MLP bias"),
    ])


def gpt2_mismatches(config: ArchLMConfig) -> list[str]:
    family = "GPT2LMHeadModel"
    return _requirements(config, family, [
        ("position_embedding_type", config.position_embedding_type == "learned", "has learned absolute positions only"),
        ("norm_type", config.norm_type in ("layernorm", "layernorm_nobias"), "normalises with LayerNorm"),
        ("norm_position", config.norm_position == "pre", "is pre-norm"),
        ("mlp_type", config.mlp_type == "standard", "has a standard (ungated) MLP"),
        ("hidden_act", config.hidden_act in GPT2_ACTIVATIONS, f"uses a GELU, one of {list(GPT2_ACTIVATIONS)}"),
        ("qk_norm", not config.qk_norm, "has no q/k norm"),
        ("sliding_window", config.sliding_window is None, "attends to the full context"),
        ("num_key_value_heads", config.num_key_value_heads == config.num_attention_heads,
         f"has one key/value head per query head ({config.num_attention_heads}), no GQA"),
        ("head_dim", config.head_dim * config.num_attention_heads == config.hidden_size,
         "splits hidden_size evenly into the heads (head_dim = hidden_size / num_attention_heads)"),
    ])


def _dropped_dropouts(config: ArchLMConfig, family: str) -> None:
    for field in ("hidden_dropout", "embedding_dropout"):
        if getattr(config, field):
            logger.warning(
                "%s has no `%s`; exporting without it (%s=%s). Inference logits are unchanged (dropout is off in "
                "eval), but training the exported model further runs without this dropout.",
                family, field, field, getattr(config, field),
            )


def _llama_like_native_fields(config: ArchLMConfig) -> dict:
    """LlamaConfig's names for what Llama, Mistral and Qwen2/3 share."""
    return dict(
        **_shared_fields(config),
        intermediate_size=config.intermediate_size,
        num_key_value_heads=config.num_key_value_heads,
        hidden_act=LLAMA_ACTIVATIONS[config.hidden_act],
        rms_norm_eps=config.norm_eps,
        rope_parameters=copy.deepcopy(dict(config.rope_parameters)),
        attention_dropout=config.attention_dropout,
    )


def _qwen_sliding_fields(config: ArchLMConfig) -> dict:
    """Qwen2/3 choose full or sliding attention per layer; ArchLM's one window applies to every layer."""
    sliding = config.sliding_window is not None
    return dict(
        use_sliding_window=sliding,
        sliding_window=config.sliding_window,
        max_window_layers=0,  # layers from 0 on slide (when use_sliding_window)
        layer_types=["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers,
    )


def archlm_config_to_llama(config: ArchLMConfig) -> LlamaConfig:
    _dropped_dropouts(config, "LlamaForCausalLM")
    return LlamaConfig(
        **_llama_like_native_fields(config),
        head_dim=config.head_dim,
        attention_bias=config.attention_bias or config.attention_output_bias,  # one flag for q/k/v/o
        mlp_bias=config.mlp_bias,
    )


def archlm_config_to_mistral(config: ArchLMConfig) -> MistralConfig:
    _dropped_dropouts(config, "MistralForCausalLM")
    return MistralConfig(**_llama_like_native_fields(config), head_dim=config.head_dim,
                         sliding_window=config.sliding_window)


def archlm_config_to_qwen2(config: ArchLMConfig) -> Qwen2Config:
    _dropped_dropouts(config, "Qwen2ForCausalLM")  # q/k/v bias is built in: nothing to set
    return Qwen2Config(**_llama_like_native_fields(config), **_qwen_sliding_fields(config))


def archlm_config_to_qwen3(config: ArchLMConfig) -> Qwen3Config:
    _dropped_dropouts(config, "Qwen3ForCausalLM")
    return Qwen3Config(
        **_llama_like_native_fields(config),
        **_qwen_sliding_fields(config),
        head_dim=config.head_dim,
        attention_bias=config.attention_bias or config.attention_output_bias,  # one flag for q/k/v/o
    )


def archlm_config_to_gpt2(config: ArchLMConfig) -> GPT2Config:
    return GPT2Config(
        **_shared_fields(config),  # GPT2Config maps hidden_size, num_hidden_layers, ... to n_embd, n_layer, ...
        n_inner=config.intermediate_size,
        activation_function=config.hidden_act,
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.embedding_dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.norm_eps,
    )


def archlm_state_dict_to_llama_like(model: ArchLMForCausalLM) -> StateDict:
    """The inverse of `llama_like_state_dict_to_archlm`: the same names. Biases the family has and the model
    lacks are filled with zeros by `to_transformers`."""
    return dict(model.state_dict())


def archlm_state_dict_to_gpt2(model: ArchLMForCausalLM) -> StateDict:
    """The inverse of `gpt2_state_dict_to_archlm`: q, k, v side by side in `c_attn`, 3 x (C, C) -> (3C, C) ->
    transpose -> (C, 3C), every Linear weight transposed into Conv1D's (in, out). A bias or LayerNorm bias the
    model lacks (attention_bias=False, norm_type="layernorm_nobias") becomes zeros, which computes the same."""
    source = dict(model.state_dict())

    def take(key: str, size: int | None = None) -> torch.Tensor:
        if key not in source and size is not None:  # a bias this model does not have
            return torch.zeros(size, dtype=model.dtype, device=model.device)
        return source.pop(key)

    config = model.config
    hidden, inner = config.hidden_size, config.intermediate_size
    target = {
        "transformer.wte.weight": take("model.embed_tokens.weight"),
        "transformer.wpe.weight": take("model.embed_positions.weight"),
        "transformer.ln_f.weight": take("model.norm.weight"),
        "transformer.ln_f.bias": take("model.norm.bias", hidden),
        "lm_head.weight": take("lm_head.weight"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        qkv = [take(f"{src}self_attn.{name}_proj.weight") for name in "qkv"]
        qkv_bias = [take(f"{src}self_attn.{name}_proj.bias", hidden) for name in "qkv"]
        target.update({
            dst + "attn.c_attn.weight": torch.cat(qkv, dim=0).t(),  # 3 x (C, C) -> (3C, C) -> (C, 3C)
            dst + "attn.c_attn.bias": torch.cat(qkv_bias, dim=0),
            dst + "attn.c_proj.weight": take(src + "self_attn.o_proj.weight").t(),
            dst + "attn.c_proj.bias": take(src + "self_attn.o_proj.bias", hidden),
            dst + "mlp.c_fc.weight": take(src + "mlp.up_proj.weight").t(),
            dst + "mlp.c_fc.bias": take(src + "mlp.up_proj.bias", inner),
            dst + "mlp.c_proj.weight": take(src + "mlp.down_proj.weight").t(),
            dst + "mlp.c_proj.bias": take(src + "mlp.down_proj.bias", hidden),
        })
        for norm_src, norm_dst in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            target[f"{dst}{norm_dst}.weight"] = take(f"{src}{norm_src}.weight")
            target[f"{dst}{norm_dst}.bias"] = take(f"{src}{norm_src}.bias", hidden)
    if source:
        raise ValueError(f"ArchLM parameters with no GPT-2 counterpart: {sorted(source)}.")
    return {key: value.contiguous() for key, value in target.items()}


# ------------------------------------------------------------------------------------------------
# Families and the public entry points
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one transformers model class maps onto ArchLM, and back."""

    config_to_archlm: Callable[[PreTrainedConfig], ArchLMConfig]
    state_dict_to_archlm: Callable[[PreTrainedModel], StateDict]
    archlm_mismatches: Callable[[ArchLMConfig], list[str]]  # what an ArchLM config sets that the family cannot
    config_from_archlm: Callable[[ArchLMConfig], PreTrainedConfig]
    state_dict_from_archlm: Callable[[ArchLMForCausalLM], StateDict]


FAMILIES: dict[type[PreTrainedModel], Family] = {
    GPT2LMHeadModel: Family(gpt2_config_to_archlm, gpt2_state_dict_to_archlm,
                            gpt2_mismatches, archlm_config_to_gpt2, archlm_state_dict_to_gpt2),
    LlamaForCausalLM: Family(llama_config_to_archlm, llama_like_state_dict_to_archlm,
                             llama_mismatches, archlm_config_to_llama, archlm_state_dict_to_llama_like),
    MistralForCausalLM: Family(mistral_config_to_archlm, llama_like_state_dict_to_archlm,
                               mistral_mismatches, archlm_config_to_mistral, archlm_state_dict_to_llama_like),
    Qwen2ForCausalLM: Family(qwen2_config_to_archlm, llama_like_state_dict_to_archlm,
                             qwen2_mismatches, archlm_config_to_qwen2, archlm_state_dict_to_llama_like),
    Qwen3ForCausalLM: Family(qwen3_config_to_archlm, llama_like_state_dict_to_archlm,
                             qwen3_mismatches, archlm_config_to_qwen3, archlm_state_dict_to_llama_like),
}


def _family_of(model: PreTrainedModel) -> Family:
    family = FAMILIES.get(type(model))
    if family is None:
        supported = ", ".join(cls.__name__ for cls in FAMILIES)
        raise ValueError(f"Cannot convert {type(model).__name__}; supported model classes: {supported}.")
    return family


def _load_like(target: PreTrainedModel, source: PreTrainedModel, state_dict: StateDict) -> PreTrainedModel:
    """`target` with `state_dict` loaded strictly, on the source's device and dtype, with its attention
    implementation, generation config and train/eval mode."""
    parameter = next(source.parameters())
    target = target.to(device=parameter.device, dtype=parameter.dtype)
    target.load_state_dict(state_dict, strict=True)  # raises on any missing or unexpected key
    if source.config._attn_implementation is not None:
        target.set_attn_implementation(source.config._attn_implementation)
    target.generation_config = copy.deepcopy(source.generation_config)
    target.train(source.training)
    return target


def from_transformers(model: PreTrainedModel) -> ArchLMForCausalLM:
    """An `ArchLMForCausalLM` computing the same logits as `model` (a GPT-2, Llama, Mistral, Qwen2 or Qwen3
    causal LM), on the same device, in the same dtype, with the same attention implementation, train/eval
    mode and generation config."""
    family = _family_of(model)
    config = family.config_to_archlm(model.config)
    state_dict = family.state_dict_to_archlm(model)
    return _load_like(ArchLMForCausalLM(config), model, state_dict)


def native_family(config: ArchLMConfig) -> type[PreTrainedModel]:
    """The transformers class an ArchLM config exports to, or a `ValueError` listing every field it cannot
    express. The family follows the features: learned positions -> GPT-2; otherwise qk-norm -> Qwen3, bias on
    q/k/v but not o -> Qwen2, a sliding window -> Mistral, else Llama."""
    if config.position_embedding_type == "learned":
        target = GPT2LMHeadModel
    elif config.qk_norm:
        target = Qwen3ForCausalLM
    elif config.attention_bias and not config.attention_output_bias:
        target = Qwen2ForCausalLM
    elif config.sliding_window is not None:
        target = MistralForCausalLM
    else:
        target = LlamaForCausalLM
    mismatches = FAMILIES[target].archlm_mismatches(config)
    if mismatches:
        listed = "\n".join(f"  - {line}" for line in mismatches)
        raise ValueError(
            f"Cannot export this ArchLM model ({config.architecture_name}) to a native transformers family. The "
            f"nearest is {target.__name__}, which has no equivalent for:\n{listed}\n"
            "Share it with its remote code instead (trust_remote_code=True)."
        )
    return target


def to_transformers(model: ArchLMForCausalLM) -> PreTrainedModel:
    """The native transformers model (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
    `Qwen3ForCausalLM` or `GPT2LMHeadModel`, see `native_family`) that computes the same logits as `model`,
    on the same device, in the same dtype, with the same attention implementation, train/eval mode and
    generation config. It loads, and serves, without remote code."""
    if not isinstance(model, ArchLMForCausalLM):
        raise ValueError(f"to_transformers exports an ArchLMForCausalLM, got {type(model).__name__}.")
    target_class = native_family(model.config)
    family = FAMILIES[target_class]
    target = target_class(family.config_from_archlm(model.config))
    state_dict = family.state_dict_from_archlm(model)
    for key, value in target.state_dict().items():
        if key not in state_dict and key.endswith(".bias"):  # a bias the ArchLM model does not have
            state_dict[key] = torch.zeros_like(value, dtype=model.dtype, device=model.device)
    return _load_like(target, model, state_dict)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# A folder export is checked before it is written: both models on a short random batch, max |difference| over
# max |logit|. float32 agrees to rounding; half precision rounds each op differently.
EXPORT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_PRECISION_TOLERANCE = 2e-2


def _copy_tokenizer(in_dir: Path, out_dir: Path) -> None:
    if any((in_dir / name).exists() for name in _TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(in_dir).save_pretrained(out_dir)
        logger.info("Copied the tokenizer")
    else:
        logger.info("No tokenizer files in %s; saved the model only", in_dir)


def check_output_folder(in_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Refuses, before any work, an `out_dir` that would mix the converted model's files with others: `in_dir`
    itself, a folder inside it or holding it, a file, or (unless `overwrite`) a folder that is not empty."""
    source, target = in_dir.resolve(), out_dir.resolve()  # so that links and `..` cannot hide that both are one folder
    if target.is_relative_to(source) or source.is_relative_to(target):
        where = "is" if target == source else "is inside" if target.is_relative_to(source) else "holds"
        raise ValueError(
            f"OUT_DIR {str(out_dir)!r} {where} IN_DIR {str(in_dir)!r}: the converted model would be written among "
            "(or over) the input model's files. Choose an empty or new folder for OUT_DIR."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {str(out_dir)!r} is a file, not a folder. Choose an empty or new folder for OUT_DIR.")
    if out_dir.is_dir() and not overwrite:
        entries = sorted(path.name for path in out_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ValueError(
                f"OUT_DIR {str(out_dir)!r} is not empty (it holds {shown}): the converted model's files would be "
                "mixed with these. Choose an empty or new folder for OUT_DIR, or pass --overwrite (overwrite=True in "
                "Python) to delete its contents and replace them."
            )


def _clear_folder(folder: Path) -> None:
    """Deletes what `folder` holds (for `overwrite`), keeping the folder itself (it may be a mount point or a link)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.info("Deleted the previous contents of %s (overwrite)", folder)


def convert_folder(in_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> ArchLMForCausalLM:
    """Load a transformers checkpoint folder, convert it and save it (with its tokenizer, if any) as ArchLM into
    `out_dir`, which must be new or empty (see `check_output_folder`); `overwrite` replaces a non-empty one."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_output_folder(in_dir, out_dir, overwrite)
    source = AutoModelForCausalLM.from_pretrained(in_dir)
    logger.info("Loaded %s from %s", type(source).__name__, in_dir)
    archlm_model = from_transformers(source)
    if overwrite:  # only now that the conversion has succeeded
        _clear_folder(out_dir)
    archlm_model.save_pretrained(out_dir)
    logger.info("Saved %s to %s", archlm_model.config.architecture_name, out_dir)
    _copy_tokenizer(in_dir, out_dir)
    return archlm_model


@torch.no_grad()
def export_logit_error(archlm_model: ArchLMForCausalLM, native: PreTrainedModel, seq_len: int = 16) -> float:
    """Max relative logit difference between the two models on a seeded random batch of 2 x `seq_len` tokens."""
    config = archlm_model.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, min(seq_len, config.max_position_embeddings)), generator=generator)
    input_ids = input_ids.to(archlm_model.device)
    modes = {model: model.training for model in (archlm_model, native)}
    for model in modes:
        model.eval()
    ours, theirs = archlm_model(input_ids).logits.float(), native(input_ids).logits.float()
    for model, training in modes.items():
        model.train(training)
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def export_folder(in_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> PreTrainedModel:
    """Load the ArchLM model saved in `in_dir`, export it with `to_transformers`, check the logits agree, and save
    the native model (config, safetensors, generation config; no remote code) and the tokenizer to `out_dir`, which
    must be new or empty (see `check_output_folder`); `overwrite` replaces a non-empty one."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_output_folder(in_dir, out_dir, overwrite)
    native_family(ArchLMConfig.from_pretrained(in_dir))  # refuse what has no native family before loading weights
    archlm_model = ArchLMForCausalLM.from_pretrained(in_dir)
    logger.info("Loaded %s from %s", archlm_model.config.architecture_name, in_dir)
    native = to_transformers(archlm_model)
    error = export_logit_error(archlm_model, native)
    tolerance = EXPORT_TOLERANCE.get(archlm_model.dtype, HALF_PRECISION_TOLERANCE)
    if not error <= tolerance:
        raise RuntimeError(
            f"The {type(native).__name__} export's logits differ from the ArchLM model's by {error:.2e} (relative), "
            f"more than {tolerance:.0e}; nothing was saved. Please report this as a bug."
        )
    if overwrite:  # only now that the export has been checked
        _clear_folder(out_dir)
    native.save_pretrained(out_dir)
    logger.info("Saved %s to %s (max relative logit difference %.2e)", type(native).__name__, out_dir, error)
    _copy_tokenizer(in_dir, out_dir)
    if (out_dir / "tokenizer.json").exists():
        _warn_if_auto_tokenizer_differs(out_dir, native.config.model_type)
    return native


TOKENIZER_PROBE = "def f(x):\r\n\t  return 'é' + \"e\u0301\"  # 🙂\n\n"


def _warn_if_auto_tokenizer_differs(folder: Path, model_type: str) -> None:
    """transformers 5 replaces the saved pipeline with its own for some model types (qwen2: `Qwen2Tokenizer`, with
    NFC and Qwen's split), whatever `tokenizer_config.json` names; the token ids then differ from training's."""
    exact = PreTrainedTokenizerFast.from_pretrained(folder)
    auto = AutoTokenizer.from_pretrained(folder)
    if auto(TOKENIZER_PROBE)["input_ids"] != exact(TOKENIZER_PROBE)["input_ids"]:
        logger.warning(
            "AutoTokenizer loads this %s folder as %s, which tokenizes differently from the saved tokenizer.json. "
            "Load the tokenizer with PreTrainedTokenizerFast.from_pretrained(...) to get the ids the model was "
            "trained on.", model_type, type(auto).__name__,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m archlm.convert", description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-transformers", nargs=2, metavar=("IN_DIR", "OUT_DIR"),
        help="convert the transformers causal LM saved in IN_DIR into an ArchLM model saved in OUT_DIR",
    )
    direction.add_argument(
        "--to-native", nargs=2, metavar=("IN_DIR", "OUT_DIR"),
        help="export the ArchLM model saved in IN_DIR as its native transformers family (Llama, Mistral, Qwen2, "
             "Qwen3 or GPT-2, no remote code) into OUT_DIR",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the contents of a non-empty OUT_DIR (deleted once the conversion has succeeded); without it "
             "OUT_DIR must be new or empty. OUT_DIR is never allowed to be IN_DIR, inside it, or hold it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    in_dir = (args.from_transformers or args.to_native)[0]
    if missing_local_folder(in_dir):
        parser.error(f"IN_DIR {in_dir!r}: no such folder")
    try:
        if args.from_transformers:
            convert_folder(*args.from_transformers, overwrite=args.overwrite)
        else:
            export_folder(*args.to_native, overwrite=args.overwrite)
    except ValueError as error:  # a model the other side cannot express: the message lists why
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()


__all__ = [
    "FAMILIES",
    "Family",
    "check_output_folder",
    "convert_folder",
    "export_folder",
    "from_transformers",
    "native_family",
    "to_transformers",
]
