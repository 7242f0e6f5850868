"""Convert transformers' causal LMs into ArchLM models with the same logits.

    python -m archlm.convert --from-transformers IN_DIR OUT_DIR

loads IN_DIR (a local folder) with `AutoModelForCausalLM.from_pretrained`, converts it, and saves the
ArchLM model (config with `auto_map`, safetensors, remote code, generation config) to OUT_DIR, with
the tokenizer when IN_DIR has one. In Python:

    >>> from archlm.convert import from_transformers
    >>> archlm_model = from_transformers(LlamaForCausalLM.from_pretrained(path))

Supported: `GPT2LMHeadModel`, `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`. Each family is one `Family` entry in `FAMILIES` holding a config mapping and a
state-dict mapping; the way back (`to_transformers`) is meant to add the inverse pair to each entry.

Whatever a source config sets that ArchLM cannot represent (GPT-2's per-layer attention scaling,
Qwen's per-layer sliding window, partial rotary, ...) is refused with a `ValueError` that names the
field and its value; nothing is dropped silently, and the weights load with strict key checking.
"""

import argparse
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_archlm import ArchLMConfig
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
    """Fields every supported family names the same way (GPT-2 through its `attribute_map`)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


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
# Families and the public entry points
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one transformers model class maps onto ArchLM."""

    config_to_archlm: Callable[[PreTrainedConfig], ArchLMConfig]
    state_dict_to_archlm: Callable[[PreTrainedModel], StateDict]


FAMILIES: dict[type[PreTrainedModel], Family] = {
    GPT2LMHeadModel: Family(gpt2_config_to_archlm, gpt2_state_dict_to_archlm),
    LlamaForCausalLM: Family(llama_config_to_archlm, llama_like_state_dict_to_archlm),
    MistralForCausalLM: Family(mistral_config_to_archlm, llama_like_state_dict_to_archlm),
    Qwen2ForCausalLM: Family(qwen2_config_to_archlm, llama_like_state_dict_to_archlm),
    Qwen3ForCausalLM: Family(qwen3_config_to_archlm, llama_like_state_dict_to_archlm),
}


def _family_of(model: PreTrainedModel) -> Family:
    family = FAMILIES.get(type(model))
    if family is None:
        supported = ", ".join(cls.__name__ for cls in FAMILIES)
        raise ValueError(f"Cannot convert {type(model).__name__}; supported model classes: {supported}.")
    return family


def from_transformers(model: PreTrainedModel) -> ArchLMForCausalLM:
    """An `ArchLMForCausalLM` computing the same logits as `model` (a GPT-2, Llama, Mistral, Qwen2 or Qwen3
    causal LM), on the same device, in the same dtype, with the same attention implementation, train/eval
    mode and generation config."""
    family = _family_of(model)
    config = family.config_to_archlm(model.config)
    state_dict = family.state_dict_to_archlm(model)
    parameter = next(model.parameters())

    archlm_model = ArchLMForCausalLM(config).to(device=parameter.device, dtype=parameter.dtype)
    archlm_model.load_state_dict(state_dict, strict=True)  # raises on any missing or unexpected key
    if model.config._attn_implementation is not None:
        archlm_model.set_attn_implementation(model.config._attn_implementation)
    archlm_model.generation_config = copy.deepcopy(model.generation_config)
    archlm_model.train(model.training)
    return archlm_model


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def convert_folder(in_dir: str | Path, out_dir: str | Path) -> ArchLMForCausalLM:
    """Load a transformers checkpoint folder, convert it and save it (with its tokenizer, if any) as ArchLM."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    source = AutoModelForCausalLM.from_pretrained(in_dir)
    logger.info("Loaded %s from %s", type(source).__name__, in_dir)
    archlm_model = from_transformers(source)
    archlm_model.save_pretrained(out_dir)
    logger.info("Saved %s to %s", archlm_model.config.architecture_name, out_dir)
    if any((in_dir / name).exists() for name in _TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(in_dir).save_pretrained(out_dir)
        logger.info("Copied the tokenizer")
    else:
        logger.info("No tokenizer files in %s; saved the model only", in_dir)
    return archlm_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m archlm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from-transformers", nargs=2, metavar=("IN_DIR", "OUT_DIR"), required=True,
        help="convert the transformers causal LM saved in IN_DIR into an ArchLM model saved in OUT_DIR",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert_folder(*args.from_transformers)


if __name__ == "__main__":
    main()


__all__ = ["FAMILIES", "Family", "convert_folder", "from_transformers"]
