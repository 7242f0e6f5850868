"""The families `archlm.convert` converts, as data: how each transformers model class maps onto ArchLM and back.

Each family is one `Family` record: which native config field holds each ArchLM field, the ArchLM values the family
fixes and those it also allows, key renames, and the few reversible weight operations (fused matrices split and
re-fused, GPT-2's Conv1D transposed, per-head norms stacked). The same record converts both ways and says what an
ArchLM config sets that the family cannot express (`Family.mismatches`). `FAMILY_LIST` is ordered: the more specific
families first, as `archlm.convert.native_family` picks the first that expresses a config.

This module holds the dense families' records and the whole list; `archlm/families_moe.py` the mixtures of experts';
`archlm/families_more.py` those added since (DeepSeek-V2, ...); `archlm/family_spec.py` the `Family` record, the weight
operations and the helpers the records share.
"""

import math

import torch
from transformers import (
    ArceeConfig,
    ArceeForCausalLM,
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    CwmConfig,
    CwmForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Exaone4Config,
    Exaone4ForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteSWAConfig,
    GraniteSWAForCausalLM,
    HeliumConfig,
    HeliumForCausalLM,
    HyperCLOVAXConfig,
    HyperCLOVAXForCausalLM,
    Jais2Config,
    Jais2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MiniCPM3Config,
    MiniCPM3ForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    NemotronConfig,
    NemotronForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PersimmonConfig,
    PersimmonForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SeedOssConfig,
    SeedOssForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
    VaultGemmaConfig,
    VaultGemmaForCausalLM,
    YoutuConfig,
    YoutuForCausalLM,
)

from .configuration_archlm import ArchLMConfig
from .families_moe import MOE_FAMILY_LIST
from .families_more import MORE_FAMILY_LIST
from .family_spec import (
    ANY,
    GEMMA_ACTIVATIONS,
    GPT2_ACTIVATIONS,
    LLAMA_ACTIVATIONS,
    LLAMA_FIELDS,
    OLMO2_ROUNDING,
    OLMO_ROUNDING,
    OffsetRows,
    PARTIAL_ROPE,
    ParallelNorms,
    SANDWICH_NORMS,
    SUBLAYERS_FIRST,
    any_bias,
    Family,
    gemma_scale,
    granite_swa_rope,
    native_head_dim,
    native_layer_types,
    phi3_original_length,
    qwen_layer_fields,
    Rename,
    rope_in_sliding_layers,
    rope_in_sliding_layers_export,
    rope_per_layer_type,
    window_for_the_mask,
    SplitGroupedQKV,
    SplitRows,
    StackHeads,
    Transpose,
    window_of_every_layer,
)


GRANITE_FIELDS = dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", mlp_bias="mlp_bias",
                      embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                      attention_multiplier="attention_multiplier", logits_scaling="logits_scaling")


# GPT-2's names, which GPT-BigCode and GPT-Neo keep: embeddings, norms and MLP; then GPT-2's attention (GPT-Neo's
# differs)
GPT2_RENAMES = (
    Rename("transformer.wte.", "model.embed_tokens."), Rename("transformer.wpe.", "model.embed_positions."),
    Rename("transformer.ln_f.", "model.norm."),
    Rename("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
    Rename("transformer.h.{i}.ln_2.", "model.layers.{i}.post_attention_layernorm."),
    Rename("transformer.h.{i}.mlp.c_fc.", "model.layers.{i}.mlp.up_proj."),
    Rename("transformer.h.{i}.mlp.c_proj.", "model.layers.{i}.mlp.down_proj."),
)
GPT2_ATTENTION_RENAMES = (Rename("transformer.h.{i}.attn.c_attn.", "model.layers.{i}.self_attn.qkv."),
                          Rename("transformer.h.{i}.attn.c_proj.", "model.layers.{i}.self_attn.o_proj."))

def unscaled_scores(native: PreTrainedConfig) -> dict:
    """GPT-2's and GPT-BigCode's scale_attn_weights=False: scores not divided by sqrt(head_dim)."""
    return {} if native.scale_attn_weights else dict(attention_multiplier=1.0)


FAMILY_LIST = [
    Family(
        GPT2LMHeadModel, GPT2Config,
        fields=dict(intermediate_size="n_inner", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                    attention_dropout="attn_pdrop", hidden_dropout="resid_pdrop", embedding_dropout="embd_pdrop"),
        fixed=dict(position_embedding_type="learned", norm_type="layernorm", mlp_type="standard", attention_bias=True,
                   attention_output_bias=True, mlp_bias=True, init_scheme="scaled"),
        allows={"norm_type": {"layernorm_nobias"}, "attention_bias": {False}, "attention_output_bias": {False},
                "mlp_bias": {False}, "attention_multiplier": {1.0}},
        requires={"hidden_act": GPT2_ACTIVATIONS, "_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        import_fields=lambda native: dict(intermediate_size=native.n_inner or 4 * native.hidden_size,
                                          **unscaled_scores(native)),
        export_fields=lambda config: dict(scale_attn_weights=config.attention_multiplier != 1.0),
        refuse=(("scale_attn_by_inverse_layer_idx", False, "scales attention scores by 1/(layer_idx + 1) per layer"),
                ("reorder_and_upcast_attn", False, "computes attention with a reordered, upcast kernel"),
                ("add_cross_attention", False, "adds cross-attention to an encoder")),
        renames=(*GPT2_RENAMES, *GPT2_ATTENTION_RENAMES),
        operations=(Transpose(r"(self_attn\.(qkv|o_proj)|mlp\.(up|down)_proj)\.weight$"),
                    SplitRows("model.layers.{i}.self_attn.qkv", tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
                              lambda config: [config.hidden_size] * 3)),
        ignore=(r"\.attn\.(masked_)?bias$",),
    ),
    Family(
        Qwen3ForCausalLM, Qwen3Config,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(qk_norm=True),  # RMSNorm over head_dim on q and k, before rope
        allows={"attention_output_bias": ANY, "_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(native_layer_types(native), head_dim=native_head_dim(native),
                                          attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(qwen_layer_fields(config), attention_bias=any_bias(config), hidden_act="silu"),
    ),
    Family(
        Qwen2ForCausalLM, Qwen2Config,
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(attention_bias=True, attention_output_bias=False),  # q/k/v bias, never one on o_proj
        allows={"_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=native_layer_types,
        export_fields=lambda config: dict(qwen_layer_fields(config), hidden_act="silu"),
    ),
    Family(
        LlamaForCausalLM, LlamaConfig,
        # `pretraining_tp` is not refused: transformers 5 ignores it (it only sliced the same matmuls)
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(head_dim=native_head_dim(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
    ),
    Family(
        MistralForCausalLM, MistralConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", sliding_window="sliding_window"),
        allows={"_layer_types": {"sliding"}},  # MistralModel slides in every layer (it ignores layer_types)
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(head_dim=native_head_dim(native)),
        export_fields=lambda config: dict(hidden_act="silu", **window_of_every_layer(config)),
    ),
    Family(
        GemmaForCausalLM, GemmaConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias"),
        fixed=dict(norm_type="rmsnorm_unit_offset", scale_embeddings_by_sqrt_hidden=True, hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config)),
    ),
    Family(
        Gemma2ForCausalLM, Gemma2Config,
        fields=dict(LLAMA_FIELDS, hidden_act="hidden_activation", head_dim="head_dim", norm_eps="rms_norm_eps",
                    attention_bias="attention_bias", layer_types="layer_types", sliding_window="sliding_window",
                    query_pre_attn_scalar="query_pre_attn_scalar", attn_logit_softcapping="attn_logit_softcapping",
                    final_logit_softcapping="final_logit_softcapping"),
        fixed=dict(norm_type="rmsnorm_unit_offset", norm_position="sandwich", scale_embeddings_by_sqrt_hidden=True,
                   hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY, "_layer_types": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config), **gemma_scale(config),
                                          **window_for_the_mask(config)),
        renames=SANDWICH_NORMS,
    ),
    Family(
        Gemma3ForCausalLM, Gemma3TextConfig,
        fields=dict(LLAMA_FIELDS, hidden_act="hidden_activation", head_dim="head_dim", norm_eps="rms_norm_eps",
                    attention_bias="attention_bias", layer_types="layer_types", sliding_window="sliding_window",
                    query_pre_attn_scalar="query_pre_attn_scalar", final_logit_softcapping="final_logit_softcapping"),
        fixed=dict(norm_type="rmsnorm_unit_offset", norm_position="sandwich", scale_embeddings_by_sqrt_hidden=True,
                   qk_norm=True, hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY, "_rope_per_layer_type": ANY, "_layer_types": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        # Gemma 3 keeps attn_logit_softcapping in its config but never passes it to attention: ArchLM leaves it off
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, attn_logit_softcapping=None),
        export_fields=lambda config: dict(attention_bias=any_bias(config), rope_parameters=rope_per_layer_type(config),
                                          **gemma_scale(config), **window_for_the_mask(config)),
        renames=SANDWICH_NORMS,
    ),
    Family(
        SmolLM3ForCausalLM, SmolLM3Config,
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", mlp_bias="mlp_bias",
                    layer_types="layer_types", sliding_window="sliding_window", no_rope_layers="no_rope_layers"),
        allows={"attention_output_bias": ANY, "_no_rope_layers": ANY, "_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(native_layer_types(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(qwen_layer_fields(config), attention_bias=any_bias(config),
                                          no_rope_layers=list(config.no_rope_layers or [1] * config.num_hidden_layers),
                                          hidden_act="silu"),
    ),
    Family(
        GraniteForCausalLM, GraniteConfig,
        fields=GRANITE_FIELDS,
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        # Granite's attention_multiplier is the whole score scale (its default 1.0 is no 1/sqrt(head_dim))
        export_fields=lambda config: dict(attention_bias=any_bias(config), attention_multiplier=config.attention_scaling,
                                          hidden_act="silu"),
    ),
    Family(
        # GraniteSWA: Granite with sliding layers (3 in 4 by default), a learned sink logit per head, and a rope base
        # per layer (0: no rope there)
        GraniteSWAForCausalLM, GraniteSWAConfig,
        fields=GRANITE_FIELDS,
        fixed=dict(attention_sinks=True),
        allows={"attention_output_bias": ANY, "_layer_types": ANY, "_no_rope_layers": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(native_layer_types(native), attention_output_bias=native.attention_bias,
                                          **granite_swa_rope(native)),
        export_fields=lambda config: dict(attention_bias=any_bias(config), attention_multiplier=config.attention_scaling,
                                          hidden_act="silu", layer_types=list(config.layer_types),
                                          **window_for_the_mask(config),
                                          layer_rope_theta=[config.rope_parameters["rope_theta"] if config.layer_uses_rope(i)
                                                            else 0 for i in range(config.num_hidden_layers)]),
    ),
    Family(
        OlmoForCausalLM, OlmoConfig,
        fields=dict(LLAMA_FIELDS, attention_bias="attention_bias", clip_qkv="clip_qkv"),
        fixed=dict(norm_type="layernorm_noaffine", norm_eps=1e-5),  # OLMo's LayerNorm has no parameters, eps 1e-5
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "norm_eps": {1e-5}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, **OLMO_ROUNDING),
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
    ),
    Family(
        Olmo2ForCausalLM, Olmo2Config,
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, **OLMO2_ROUNDING),
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
        renames=SANDWICH_NORMS,
    ),
    Family(
        CohereForCausalLM, CohereConfig,
        fields=dict(LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="attention_bias", qk_norm="use_qk_norm"),
        fixed=dict(norm_type="layernorm_nobias", use_parallel_residual=True, rope_interleaved=True,
                   qk_norm_scope="per_head"),
        allows={"attention_output_bias": ANY, "logits_scaling": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        # Cohere multiplies the logits by logit_scale, ArchLM divides by logits_scaling
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, logits_scaling=1 / native.logit_scale,
                                          rope_precision="float32_rotation", layernorm_precision="float32_explicit"),
        export_fields=lambda config: dict(attention_bias=any_bias(config), logit_scale=1 / config.logits_scaling,
                                          hidden_act="silu"),
    ),
    Family(
        StableLmForCausalLM, StableLmConfig,
        fields=dict(LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="use_qkv_bias", qk_norm="qk_layernorm",
                    use_parallel_residual="use_parallel_residual", hidden_dropout="hidden_dropout"),
        fixed=dict(norm_type="layernorm", attention_output_bias=False, qk_norm_scope="per_head",
                   qk_norm_type="layernorm_nobias"),  # use_qkv_bias: never a bias on o_proj
        allows={"_partial_rotary_factor": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        export_fields=lambda config: dict(hidden_act="silu"),
        operations=(
            StackHeads("model.layers.{i}.self_attn.q_layernorm.norms.{h}.weight", "model.layers.{i}.self_attn.q_norm.weight",
                       lambda config: config.num_attention_heads),
            StackHeads("model.layers.{i}.self_attn.k_layernorm.norms.{h}.weight", "model.layers.{i}.self_attn.k_norm.weight",
                       lambda config: config.num_key_value_heads),
        ),
    ),
    Family(
        Starcoder2ForCausalLM, Starcoder2Config,
        fields=dict(LLAMA_FIELDS, norm_eps="norm_epsilon", sliding_window="sliding_window",
                    hidden_dropout="residual_dropout", embedding_dropout="embedding_dropout"),
        fixed=dict(norm_type="layernorm", mlp_type="standard", hidden_act="gelu_pytorch_tanh"),
        # `use_bias` covers q/k/v/o and the MLP; the biases the ArchLM model lacks are exported as zeros
        allows={"attention_bias": ANY, "attention_output_bias": ANY, "mlp_bias": ANY, "_layer_types": {"sliding"}},
        requires={"_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_bias=native.use_bias, attention_output_bias=native.use_bias,
                                          mlp_bias=native.use_bias),
        export_fields=lambda config: dict(use_bias=any_bias(config) or config.mlp_bias, **window_of_every_layer(config)),
        renames=(Rename("model.layers.{i}.mlp.c_fc.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.layers.{i}.mlp.c_proj.", "model.layers.{i}.mlp.down_proj.")),
    ),
    Family(
        PhiForCausalLM, PhiConfig,
        fields=dict(LLAMA_FIELDS, norm_eps="layer_norm_eps", qk_norm="qk_layernorm", hidden_dropout="resid_pdrop",
                    embedding_dropout="embd_pdrop"),
        fixed=dict(norm_type="layernorm", use_parallel_residual=True, mlp_type="standard", hidden_act="gelu_new",
                   attention_bias=True, attention_output_bias=True, mlp_bias=True, lm_head_bias=True),
        # every Linear has a bias, and the norms: those the ArchLM model lacks are exported as zeros
        allows={"attention_bias": {False}, "attention_output_bias": {False}, "mlp_bias": {False},
                "lm_head_bias": {False}, "norm_type": {"layernorm_nobias"}, "_partial_rotary_factor": ANY},
        requires={"_head_dim": {"default"}},
        import_fields=lambda native: dict(SUBLAYERS_FIRST),
        renames=(Rename("model.final_layernorm.", "model.norm."),
                 Rename("model.layers.{i}.self_attn.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("model.layers.{i}.self_attn.q_layernorm.", "model.layers.{i}.self_attn.q_norm."),
                 Rename("model.layers.{i}.self_attn.k_layernorm.", "model.layers.{i}.self_attn.k_norm."),
                 Rename("model.layers.{i}.mlp.fc1.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.layers.{i}.mlp.fc2.", "model.layers.{i}.mlp.down_proj.")),
    ),
    Family(
        Phi3ForCausalLM, Phi3Config,
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", sliding_window="sliding_window", hidden_dropout="resid_pdrop"),
        allows={"_partial_rotary_factor": ANY, "_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        export_fields=lambda config: dict(hidden_act="silu", **window_of_every_layer(config), **phi3_original_length(config)),
        operations=(
            SplitRows("model.layers.{i}.self_attn.qkv_proj", tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
                      lambda config: [config.num_attention_heads * config.head_dim] + [config.num_key_value_heads * config.head_dim] * 2),
            SplitRows("model.layers.{i}.mlp.gate_up_proj", ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
                      lambda config: [config.intermediate_size] * 2),
        ),
    ),
    Family(
        GPTNeoXForCausalLM, GPTNeoXConfig,
        fields=dict(intermediate_size="intermediate_size", hidden_act="hidden_act", rope_parameters="rope_parameters",
                    attention_dropout="attention_dropout", norm_eps="layer_norm_eps", attention_bias="attention_bias",
                    use_parallel_residual="use_parallel_residual", hidden_dropout="hidden_dropout"),
        fixed=dict(norm_type="layernorm", mlp_type="standard", mlp_bias=True, parallel_shared_norm=False,
                   hidden_act="gelu"),
        allows={"attention_output_bias": ANY, "mlp_bias": {False}, "norm_type": {"layernorm_nobias"},
                "_partial_rotary_factor": ANY},
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        # NeoX's hidden_dropout drops the embeddings too
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, embedding_dropout=native.hidden_dropout,
                                          **(SUBLAYERS_FIRST if native.use_parallel_residual else {})),
        export_fields=lambda config: dict(attention_bias=any_bias(config)),
        renames=(Rename("gpt_neox.embed_in.", "model.embed_tokens."), Rename("gpt_neox.final_layer_norm.", "model.norm."),
                 Rename("gpt_neox.layers.{i}.attention.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("gpt_neox.layers.{i}.attention.query_key_value.", "model.layers.{i}.self_attn.query_key_value."),
                 Rename("gpt_neox.layers.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
                 Rename("gpt_neox.layers.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj."),
                 Rename("gpt_neox.layers.", "model.layers.")),
        operations=(SplitGroupedQKV("model.layers.{i}.self_attn.query_key_value",
                                    tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),),
        ignore=(r"\.attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$"),
    ),
    Family(
        GPTJForCausalLM, GPTJConfig,
        fields=dict(intermediate_size="n_inner", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                    attention_dropout="attn_pdrop", hidden_dropout="resid_pdrop", embedding_dropout="embd_pdrop"),
        fixed=dict(norm_type="layernorm", use_parallel_residual=True, mlp_type="standard", rope_interleaved=True,
                   mlp_bias=True, lm_head_bias=True, hidden_act="gelu_new"),
        allows={"mlp_bias": {False}, "lm_head_bias": {False}, "norm_type": {"layernorm_nobias"}, "_partial_rotary_factor": ANY},
        # GPT-J's rope is the default one with theta 10000, its sin/cos table hard-coded
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}, "_rope_type": {"default"}, "_rope_theta": {10000.0}},
        import_fields=lambda native: dict(
            SUBLAYERS_FIRST, intermediate_size=native.n_inner or 4 * native.hidden_size,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": native.rotary_dim / (native.hidden_size // native.num_attention_heads)}),
        export_fields=lambda config: dict(rotary_dim=config.rotary_dim()),
        renames=(Rename("transformer.wte.", "model.embed_tokens."), Rename("transformer.ln_f.", "model.norm."),
                 Rename("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
                 Rename("transformer.h.{i}.attn.out_proj.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("transformer.h.{i}.attn.", "model.layers.{i}.self_attn."),
                 Rename("transformer.h.{i}.mlp.fc_in.", "model.layers.{i}.mlp.up_proj."),
                 Rename("transformer.h.{i}.mlp.fc_out.", "model.layers.{i}.mlp.down_proj.")),
        ignore=(r"\.attn\.(masked_)?bias$", r"embed_positions$"),
    ),
]


# Glm and Glm4: partial rotary on interleaved pairs, q/k/v biases, Phi-3's fused gate_up MLP
_GLM = dict(
    fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias"),
    allows=PARTIAL_ROPE,
    requires={"hidden_act": LLAMA_ACTIVATIONS},
    # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
    export_fields=lambda config: dict(hidden_act="silu", partial_rotary_factor=config.rotary_dim() / config.head_dim),
    operations=(SplitRows("model.layers.{i}.mlp.gate_up_proj", ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
                          lambda config: [config.intermediate_size] * 2),),
)
_GLM_FIXED = dict(rope_interleaved=True, attention_output_bias=False)  # attention_bias: q/k/v only


FAMILY_LIST += [
    Family(
        # OLMo 3: OLMo 2 with sliding layers (3 in 4 by default) and a rope dict per layer type
        Olmo3ForCausalLM, Olmo3Config,
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", layer_types="layer_types",
                    sliding_window="sliding_window"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY, "_layer_types": ANY, "_rope_per_layer_type": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(native_layer_types(native), attention_output_bias=native.attention_bias,
                                          **OLMO2_ROUNDING),
        export_fields=lambda config: dict(attention_bias=any_bias(config), rope_parameters=rope_per_layer_type(config),
                                          layer_types=list(config.layer_types), hidden_act="silu",
                                          **window_for_the_mask(config)),
        renames=SANDWICH_NORMS,
    ),
    Family(
        # Ministral: Mistral's attention with full and sliding layers (layer_types)
        MinistralForCausalLM, MinistralConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", layer_types="layer_types",
                    sliding_window="sliding_window"),
        allows={"_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        # MinistralConfig leaves head_dim None, which its attention cannot build with: read with the hidden / heads
        # fallback, written on export
        import_fields=lambda native: dict(native_layer_types(native), head_dim=native_head_dim(native)),
        export_fields=lambda config: dict(layer_types=list(config.layer_types), hidden_act="silu"),
    ),
    Family(
        # Arcee (AFM): Llama with an ungated MLP, ReLU squared (the only activation serving engines run for it)
        ArceeForCausalLM, ArceeConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(mlp_type="standard", hidden_act="relu2"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": {"relu2"}},
        import_fields=lambda native: dict(head_dim=native_head_dim(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config)),
    ),
    Family(
        # Nemotron (Minitron): LayerNorm scaled by 1 + weight (its LayerNorm1P, with a bias), an ungated MLP (ReLU
        # squared by default), half of each head rotated by default
        NemotronForCausalLM, NemotronConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(norm_type="layernorm_unit_offset", mlp_type="standard"),
        allows={"attention_output_bias": ANY, **PARTIAL_ROPE},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
        export_fields=lambda config: dict(attention_bias=any_bias(config),
                                          partial_rotary_factor=config.rotary_dim() / config.head_dim),
    ),
    Family(
        # Seed-OSS: Llama with separate q/k/v and o_proj biases, dropout on each sublayer's output
        SeedOssForCausalLM, SeedOssConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    attention_output_bias="attention_out_bias", mlp_bias="mlp_bias", hidden_dropout="residual_dropout"),
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        export_fields=lambda config: dict(hidden_act="silu"),
    ),
    Family(
        # Helium: Llama with interleaved rope, q/k/v biases only, RMSNorm's weight applied in float32
        HeliumForCausalLM, HeliumConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(rope_interleaved=True, attention_output_bias=False),
        # its o_proj is hidden_size wide on both sides
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(norm_weight_fp32=True),
        export_fields=lambda config: dict(hidden_act="silu"),
    ),
    Family(
        # ERNIE 4.5: Llama with interleaved rope rotated in float32; `use_bias` covers q/k/v/o and the MLP, and its
        # attention has no dropout
        Ernie4_5ForCausalLM, Ernie4_5Config,
        fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "attention_dropout"},
                "head_dim": "head_dim", "norm_eps": "rms_norm_eps"},
        fixed=dict(rope_interleaved=True),
        # the biases the ArchLM model lacks are exported as zeros
        allows={"attention_bias": ANY, "attention_output_bias": ANY, "mlp_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_bias=native.use_bias, attention_output_bias=native.use_bias,
                                          mlp_bias=native.use_bias, rope_precision="float32"),
        export_fields=lambda config: dict(use_bias=any_bias(config) or config.mlp_bias, hidden_act="silu"),
    ),
    Family(
        # EXAONE 4: OLMo 2's norms on each sublayer's output (Llama's RMSNorm), Qwen3's per-head q/k norms, and,
        # with a window, rope in the sliding layers only
        Exaone4ForCausalLM, Exaone4Config,
        # no head_dim field in its config (the model reads it with a hidden / heads fallback): written on export
        fields=dict(LLAMA_FIELDS, norm_eps="rms_norm_eps", layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True),
        allows={"_layer_types": ANY, "_no_rope_layers": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_rope_layers": {"sliding", "all"}},
        import_fields=lambda native: dict(rope_in_sliding_layers(native, rope_without_window=True),
                                          head_dim=native_head_dim(native)),
        export_fields=lambda config: dict(rope_in_sliding_layers_export(config, rope_without_window=True),
                                          head_dim=config.head_dim, hidden_act="silu"),
        renames=SANDWICH_NORMS,
    ),
    Family(GlmForCausalLM, GlmConfig, fixed=_GLM_FIXED, **_GLM),
    Family(
        # GLM-4: Glm with norms before and after each sublayer
        Glm4ForCausalLM, Glm4Config, fixed=dict(_GLM_FIXED, norm_position="sandwich"), **_GLM,
        renames=(Rename("model.layers.{i}.post_self_attn_layernorm.", "model.layers.{i}.attention_output_layernorm."),
                 Rename("model.layers.{i}.post_mlp_layernorm.", "model.layers.{i}.mlp_output_layernorm.")),
    ),
    Family(
        # Cohere 2: Cohere's parallel block without q/k norms, with sliding layers, rope in those only
        Cohere2ForCausalLM, Cohere2Config,
        fields=dict(LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="attention_bias", layer_types="layer_types",
                    sliding_window="sliding_window"),
        fixed=dict(norm_type="layernorm_nobias", use_parallel_residual=True, rope_interleaved=True),
        allows={"attention_output_bias": ANY, "logits_scaling": ANY, "_layer_types": ANY, "_no_rope_layers": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "_rope_layers": {"sliding"}},
        import_fields=lambda native: dict(rope_in_sliding_layers(native, rope_without_window=False),
                                          attention_output_bias=native.attention_bias,
                                          logits_scaling=1 / native.logit_scale, rope_precision="float32_rotation",
                                          layernorm_precision="float32_explicit"),
        export_fields=lambda config: dict(rope_in_sliding_layers_export(config, rope_without_window=False),
                                          attention_bias=any_bias(config), logit_scale=1 / config.logits_scaling,
                                          hidden_act="silu"),
    ),
]


class _PowerOfTwo:
    """A `requires` set: every power of two, the scales by which x * s and x / (1 / s) round alike in any dtype."""

    def __contains__(self, value) -> bool:
        return isinstance(value, (int, float)) and value > 0 and math.frexp(value)[0] == 0.5

    def __iter__(self):
        yield self

    def __repr__(self) -> str:
        return "a power of two"


def _hyperclovax_import(native: PreTrainedConfig) -> dict:
    """HyperCLOVA X multiplies its logits by logits_scaling, ArchLM divides them by its inverse: refused (naming the
    native value) where the two would round apart."""
    if native.logits_scaling not in _PowerOfTwo():
        raise ValueError(f"Cannot convert this {native.model_type} model: `logits_scaling`={native.logits_scaling!r} "
                         "multiplies its logits, and ArchLM divides them by the inverse, which rounds differently in "
                         "bf16 unless the scale is a power of two.")
    return dict(attention_output_bias=native.attention_bias, logits_scaling=1 / native.logits_scaling,
                norm_position="sandwich" if native.use_post_norm else "pre")


FAMILY_LIST += [
    Family(
        # VaultGemma: Gemma 2 with one norm before each sublayer (no norms on their outputs)
        VaultGemmaForCausalLM, VaultGemmaConfig,
        fields=dict(LLAMA_FIELDS, hidden_act="hidden_activation", head_dim="head_dim", norm_eps="rms_norm_eps",
                    attention_bias="attention_bias", layer_types="layer_types", sliding_window="sliding_window",
                    query_pre_attn_scalar="query_pre_attn_scalar", attn_logit_softcapping="attn_logit_softcapping",
                    final_logit_softcapping="final_logit_softcapping"),
        fixed=dict(norm_type="rmsnorm_unit_offset", scale_embeddings_by_sqrt_hidden=True, hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY, "_layer_types": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config), **gemma_scale(config),
                                          **window_for_the_mask(config)),
        # its norm before the MLP keeps Gemma 2's name
        renames=(Rename("model.layers.{i}.pre_feedforward_layernorm.", "model.layers.{i}.post_attention_layernorm."),),
    ),
    Family(
        # HyperCLOVA X: Granite's multipliers with an explicit head_dim and, with use_post_norm, a norm on each
        # sublayer's output too (Peri-LN: Gemma 2's sandwich); its logits are multiplied by logits_scaling
        HyperCLOVAXForCausalLM, HyperCLOVAXConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias", embedding_multiplier="embedding_multiplier",
                    residual_multiplier="residual_multiplier", attention_multiplier="attention_multiplier"),
        allows={"attention_output_bias": ANY, "logits_scaling": ANY, "norm_position": {"sandwich"}},
        # ArchLM divides the logits by the inverse of its scale: the same product in bf16 only for a power of two
        requires={"hidden_act": LLAMA_ACTIVATIONS, "logits_scaling": _PowerOfTwo()},
        import_fields=_hyperclovax_import,
        # its attention_multiplier is the whole score scale (None: 1/sqrt(head_dim), written out as ArchLM's)
        export_fields=lambda config: dict(attention_bias=any_bias(config), attention_multiplier=config.attention_scaling,
                                          logits_scaling=1 / config.logits_scaling,
                                          use_post_norm=config.norm_position == "sandwich", hidden_act="silu"),
        renames=(Rename("model.layers.{i}.post_norm1.", "model.layers.{i}.attention_output_layernorm."),
                 Rename("model.layers.{i}.post_norm2.", "model.layers.{i}.mlp_output_layernorm.")),
    ),
    Family(
        # CWM: Llama with full and sliding layers (layer_types), no attention biases
        CwmForCausalLM, CwmConfig,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", mlp_bias="mlp_bias",
                    layer_types="layer_types", sliding_window="sliding_window"),
        allows={"_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=native_layer_types,
        export_fields=lambda config: dict(layer_types=list(config.layer_types), hidden_act="silu"),
    ),
    Family(
        # Jais 2: Llama's attention with LayerNorm (with bias) and an ungated MLP (ReLU squared by default)
        Jais2ForCausalLM, Jais2Config,
        fields=dict(LLAMA_FIELDS, head_dim="head_dim", norm_eps="layer_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(norm_type="layernorm", mlp_type="standard"),
        # a norm bias the ArchLM model lacks is exported as zeros
        allows={"attention_output_bias": ANY, "norm_type": {"layernorm_nobias"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config)),
    ),
    Family(
        # Persimmon (Fuyu's decoder): NeoX's per-head fused query_key_value in a sequential block, LayerNorm on q
        # and k over head_dim, half of each head rotated by default, an ungated MLP (ReLU squared), biases everywhere
        PersimmonForCausalLM, PersimmonConfig,
        fields=dict(intermediate_size="intermediate_size", hidden_act="hidden_act", rope_parameters="rope_parameters",
                    attention_dropout="attention_dropout", norm_eps="layer_norm_eps", qk_norm="qk_layernorm"),
        fixed=dict(norm_type="layernorm", mlp_type="standard", attention_bias=True, attention_output_bias=True,
                   mlp_bias=True),
        # the biases the ArchLM model lacks are exported as zeros
        allows={"attention_bias": {False}, "attention_output_bias": {False}, "mlp_bias": {False},
                "norm_type": {"layernorm_nobias"}, "_partial_rotary_factor": ANY},
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        refuse=(("hidden_dropout", 0.0, "drops out the MLP's output only (ArchLM's hidden_dropout drops both "
                 "sublayers')"),),
        # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
        export_fields=lambda config: dict(partial_rotary_factor=config.rotary_dim() / config.head_dim),
        renames=(Rename("model.final_layernorm.", "model.norm."),
                 Rename("model.layers.{i}.self_attn.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("model.layers.{i}.self_attn.q_layernorm.", "model.layers.{i}.self_attn.q_norm."),
                 Rename("model.layers.{i}.self_attn.k_layernorm.", "model.layers.{i}.self_attn.k_norm."),
                 Rename("model.layers.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.layers.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj.")),
        operations=(SplitGroupedQKV("model.layers.{i}.self_attn.query_key_value",
                                    tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),),
    ),
    Family(
        # Youtu-LLM: DeepSeek-V3's multi-head latent attention on a dense Llama decoder
        YoutuForCausalLM, YoutuConfig,
        fields={**LLAMA_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "head_dim": "qk_rope_head_dim", "rope_interleaved": "rope_interleave",
                **{name: name for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_latent_attention": {True}},
        import_fields=lambda native: dict(head_dim=native.qk_rope_head_dim, attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
    ),
]

class _ExactInBfloat16:
    """A `requires` set: the multipliers bf16 holds exactly (fp16 too), by which x * s rounds alike whether s is
    rounded to the activations' dtype first (MiniCPM3's scale_emb, a buffer cast to the weights' dtype) or not
    (ArchLM's embedding_multiplier, a Python float)."""

    def __contains__(self, value) -> bool:
        return isinstance(value, (int, float)) and float(torch.tensor(float(value), dtype=torch.bfloat16)) == value

    def __iter__(self):
        yield self

    def __repr__(self) -> str:
        return "a value bf16 holds exactly"


def _minicpm3_import(native: PreTrainedConfig) -> dict:
    """MiniCPM3 divides its hidden states by hidden_size / dim_model_base before the LM head (ArchLM's
    logits_scaling with logits_scaling_on_hidden); it multiplies its embeddings by scale_emb in the weights' dtype,
    ArchLM by the float: refused (naming the value) where the two would round apart."""
    if native.scale_emb not in _ExactInBfloat16():
        raise ValueError(f"Cannot convert this {native.model_type} model: `scale_emb`={native.scale_emb!r} multiplies "
                         "its embeddings rounded to the weights' dtype, and ArchLM by the exact value, which rounds "
                         "differently in bf16 unless bf16 holds the scale exactly.")
    return dict(head_dim=native.qk_rope_head_dim, attention_output_bias=native.attention_bias,
                embedding_multiplier=float(native.scale_emb), logits_scaling=native.logits_scaling,
                logits_scaling_on_hidden=native.logits_scaling != 1,
                residual_multiplier=native.scale_depth / math.sqrt(native.num_hidden_layers))


def _minicpm3_export(config: ArchLMConfig) -> dict:
    dim_model_base = config.hidden_size / config.logits_scaling
    if dim_model_base != int(dim_model_base):
        raise ValueError(f"Cannot export this ArchLM model to MiniCPM3ForCausalLM: `logits_scaling`="
                         f"{config.logits_scaling!r} is hidden_size / dim_model_base for no whole dim_model_base "
                         f"(hidden_size={config.hidden_size}).")
    return dict(attention_bias=any_bias(config), scale_emb=config.embedding_multiplier, dim_model_base=int(dim_model_base),
                scale_depth=config.residual_multiplier * math.sqrt(config.num_hidden_layers), hidden_act="silu")


FAMILY_LIST += [
    Family(
        # MiniCPM3: DeepSeek-V2's multi-head latent attention (rope on halves) on a dense Llama decoder, with
        # Granite-like multipliers: scale_emb on the embeddings, scale_depth / sqrt(layers) on each sublayer's
        # output, and its hidden states divided by hidden_size / dim_model_base before the LM head
        MiniCPM3ForCausalLM, MiniCPM3Config,
        fields={**LLAMA_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
                "head_dim": "qk_rope_head_dim",
                **{name: name for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        allows={"attention_output_bias": ANY, "embedding_multiplier": ANY, "residual_multiplier": ANY,
                "logits_scaling": ANY},
        # ArchLM multiplies the embeddings by the float (the same as by MiniCPM3's rounded scale only for a value
        # bf16 holds)
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_latent_attention": {True}, "embedding_multiplier": _ExactInBfloat16()},
        import_fields=_minicpm3_import,
        export_fields=_minicpm3_export,
    ),
]

FAMILY_LIST += [
    Family(
        # GPT-BigCode (StarCoder, SantaCoder): GPT-2's block in nn.Linear (not Conv1D), with one key/value head
        # (multi_query) or one per head
        GPTBigCodeForCausalLM, GPTBigCodeConfig,
        fields=dict(intermediate_size="n_inner", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                    attention_dropout="attn_pdrop", hidden_dropout="resid_pdrop", embedding_dropout="embd_pdrop"),
        fixed=dict(position_embedding_type="learned", norm_type="layernorm", mlp_type="standard", attention_bias=True,
                   attention_output_bias=True, mlp_bias=True),
        # the biases the ArchLM model lacks are exported as zeros
        allows={"norm_type": {"layernorm_nobias"}, "attention_bias": {False}, "attention_output_bias": {False},
                "mlp_bias": {False}, "attention_multiplier": {1.0}},
        requires={"_num_key_value_heads": {"mha", "mqa"}, "_head_dim": {"default"}},
        import_fields=lambda native: dict(intermediate_size=native.n_inner or 4 * native.hidden_size,
                                          num_key_value_heads=native.num_key_value_heads, **unscaled_scores(native)),
        export_fields=lambda config: dict(multi_query=config.num_key_value_heads == 1 < config.num_attention_heads,
                                          scale_attn_weights=config.attention_multiplier != 1.0),
        refuse=(("add_cross_attention", False, "adds cross-attention to an encoder"),),
        renames=(*GPT2_RENAMES, *GPT2_ATTENTION_RENAMES),
        operations=(SplitGroupedQKV("model.layers.{i}.self_attn.qkv",
                                    tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),),
    ),
    Family(
        # GPT-Neo: GPT-2's block with unscaled attention scores (computed in float32), q/k/v without biases, global
        # and local (sliding window_size) layers
        GPTNeoForCausalLM, GPTNeoConfig,
        fields=dict(intermediate_size="intermediate_size", hidden_act="activation_function",
                    norm_eps="layer_norm_epsilon", sliding_window="window_size", attention_dropout="attention_dropout",
                    hidden_dropout="resid_dropout", embedding_dropout="embed_dropout"),
        fixed=dict(position_embedding_type="learned", norm_type="layernorm", mlp_type="standard",
                   attention_bias=False, attention_output_bias=True, mlp_bias=True, attention_multiplier=1.0),
        # the biases the ArchLM model lacks are exported as zeros
        allows={"norm_type": {"layernorm_nobias"}, "attention_output_bias": {False}, "mlp_bias": {False},
                "_layer_types": ANY},
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        import_fields=lambda native: dict(
            intermediate_size=native.intermediate_size or 4 * native.hidden_size,
            layer_types=["sliding_attention" if kind == "local" else "full_attention" for kind in native.attention_layers]),
        # a window no layer reads when none slides
        export_fields=lambda config: dict(
            window_size=config.sliding_window or config.max_position_embeddings,
            attention_types=[[["local" if kind == "sliding_attention" else "global"], 1] for kind in config.layer_types]),
        renames=(Rename("transformer.h.{i}.attn.attention.out_proj.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("transformer.h.{i}.attn.attention.", "model.layers.{i}.self_attn."), *GPT2_RENAMES),
        ignore=(r"\.attn\.attention\.(masked_)?bias$",),
    ),
    Family(
        # OPT: learned positions (a table offset by 2), LayerNorm before each sublayer or, without
        # do_layer_norm_before (OPT-350m), after each add with no final norm; an ungated ReLU MLP, `enable_bias` on
        # every Linear; q scaled before its product with k (the same scale in bf16 when head_dim is a power of 4)
        OPTForCausalLM, OPTConfig,
        fields=dict(intermediate_size="ffn_dim", hidden_act="activation_function", attention_dropout="attention_dropout",
                    hidden_dropout="dropout", initializer_range="init_std"),
        fixed=dict(position_embedding_type="learned", norm_type="layernorm", mlp_type="standard", norm_eps=1e-5,
                   attention_bias=True, attention_output_bias=True, mlp_bias=True, position_ids_from_mask=True),
        # the biases the ArchLM model lacks are exported as zeros; its norm has a weight and a bias or neither
        allows={"norm_type": {"layernorm_noaffine"}, "norm_position": {"post"}, "attention_bias": ANY,
                "attention_output_bias": ANY, "mlp_bias": ANY},
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}, "norm_eps": {1e-5}},
        refuse=(("layerdrop", 0.0, "skips whole layers at random in training"),
                ("_remove_final_layer_norm", False, "drops the final norm of a pre-norm model")),
        import_fields=lambda native: _opt_import(native),
        export_fields=lambda config: dict(
            do_layer_norm_before=config.norm_position == "pre", word_embed_proj_dim=config.hidden_size,
            layer_norm_elementwise_affine=config.norm_type == "layernorm",
            enable_bias=any_bias(config) or config.mlp_bias),
        renames=(Rename("model.decoder.embed_tokens.", "model.embed_tokens."),
                 Rename("model.decoder.embed_positions.", "model.embed_positions."),
                 Rename("model.decoder.final_layer_norm.", "model.norm."),
                 Rename("model.decoder.layers.{i}.self_attn.out_proj.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("model.decoder.layers.{i}.self_attn_layer_norm.", "model.layers.{i}.input_layernorm."),
                 Rename("model.decoder.layers.{i}.final_layer_norm.", "model.layers.{i}.post_attention_layernorm."),
                 Rename("model.decoder.layers.{i}.fc1.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.decoder.layers.{i}.fc2.", "model.layers.{i}.mlp.down_proj."),
                 Rename("model.decoder.layers.", "model.layers.")),
        operations=(OffsetRows("model.embed_positions.weight", 2),),
    ),
    Family(
        # Falcon: LayerNorm, an ungated MLP (GELU), one key/value head or num_kv_heads groups in one fused
        # query_key_value; a parallel block with one norm (7B) or one per sublayer (40B, 180B), or a sequential one
        FalconForCausalLM, FalconConfig,
        fields=dict(intermediate_size="ffn_hidden_size", hidden_act="activation", norm_eps="layer_norm_epsilon",
                    rope_parameters="rope_parameters", attention_dropout="attention_dropout",
                    hidden_dropout="hidden_dropout"),
        fixed=dict(norm_type="layernorm", mlp_type="standard"),
        # `bias` covers q/k/v/o and the MLP: the biases the ArchLM model lacks are exported as zeros
        allows={"use_parallel_residual": {True}, "parallel_shared_norm": {False}, "attention_bias": ANY,
                "attention_output_bias": ANY, "mlp_bias": ANY, "norm_type": {"layernorm_nobias"}},
        requires={"_head_dim": {"default"}},
        refuse=(("alibi", False, "biases its attention scores with ALiBi (Bloom's, on unscaled scores)"),),
        import_fields=lambda native: _falcon_import(native),
        export_fields=lambda config: _falcon_export(config),
        renames=(Rename("transformer.word_embeddings.", "model.embed_tokens."), Rename("transformer.ln_f.", "model.norm."),
                 Rename("transformer.h.{i}.self_attention.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("transformer.h.{i}.self_attention.", "model.layers.{i}.self_attn."),
                 Rename("transformer.h.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
                 Rename("transformer.h.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj."),
                 Rename("transformer.h.", "model.layers.")),
        operations=(ParallelNorms(), SplitGroupedQKV("model.layers.{i}.self_attn.query_key_value",
                                                     tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"))),
    ),
]


def _falcon_import(native: PreTrainedConfig) -> dict:
    """Falcon's block: sequential, or parallel with one norm or (new_decoder_architecture) one per sublayer; one
    key/value head (multi_query), one per head, or num_kv_heads (new_decoder_architecture)."""
    parallel, new = native.parallel_attn, native.new_decoder_architecture
    kv_heads = native.num_kv_heads if new else 1 if native.multi_query else native.num_attention_heads
    two_norms = new and parallel and (native.num_ln_in_parallel_attn or 2) == 2
    if new and not parallel:
        raise ValueError("Cannot convert this falcon model: `new_decoder_architecture`=True with `parallel_attn`=False "
                         "runs its MLP on the attention's norm; ArchLM has no equivalent.")
    return dict(num_key_value_heads=kv_heads, use_parallel_residual=parallel,
                attention_bias=native.bias, attention_output_bias=native.bias, mlp_bias=native.bias,
                **(dict(parallel_shared_norm=not two_norms, **SUBLAYERS_FIRST) if parallel else {}))


def _falcon_export(config: ArchLMConfig) -> dict:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    new = config.use_parallel_residual and (not config.parallel_shared_norm or kv_heads not in (1, heads))
    return dict(parallel_attn=config.use_parallel_residual, new_decoder_architecture=new, num_kv_heads=kv_heads,
                multi_query=kv_heads == 1, num_ln_in_parallel_attn=(1 if config.parallel_shared_norm else 2) if new else None,
                bias=any_bias(config) or config.mlp_bias, alibi=False)


def _opt_import(native: PreTrainedConfig) -> dict:
    """OPT-350m projects 512-wide embeddings to its 1024-wide layers and back (project_in / project_out)."""
    if native.word_embed_proj_dim != native.hidden_size:
        raise ValueError(f"Cannot convert this opt model: `word_embed_proj_dim`={native.word_embed_proj_dim} projects "
                         f"its embeddings to and from hidden_size={native.hidden_size} (project_in / project_out); "
                         "ArchLM has no equivalent.")
    return dict(norm_type="layernorm" if native.layer_norm_elementwise_affine else "layernorm_noaffine",
                norm_position="pre" if native.do_layer_norm_before else "post",
                attention_bias=native.enable_bias, attention_output_bias=native.enable_bias,
                mlp_bias=native.enable_bias)

# the more specific families first: `archlm.convert.native_family` picks the first that expresses a config
FAMILY_LIST += MOE_FAMILY_LIST + MORE_FAMILY_LIST
FAMILIES: dict[type[PreTrainedModel], Family] = {family.model_class: family for family in FAMILY_LIST}
