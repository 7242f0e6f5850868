"""The mixture-of-experts families `archlm.convert` converts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo,
Granite-MoE, DeepSeek-V3, EXAONE MoE, Mellum, ...), as `Family` records (archlm/family_spec.py); `archlm.families`
lists them after the dense ones.
"""

from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Dots1Config,
    Dots1ForCausalLM,
    ExaoneMoeConfig,
    ExaoneMoeForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    GraniteMoeSWAConfig,
    GraniteMoeSWAForCausalLM,
    MellumConfig,
    MellumForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedConfig,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SolarOpenConfig,
    SolarOpenForCausalLM,
)

from .configuration_archlm import ArchLMConfig
from .family_spec import (
    ANY,
    LLAMA_ACTIVATIONS,
    LLAMA_FIELDS,
    OLMO2_ROUNDING,
    PARTIAL_ROPE,
    SANDWICH_NORMS,
    any_bias,
    Family,
    granite_swa_rope,
    logger,
    native_head_dim,
    native_layer_types,
    qwen_layer_fields,
    Rename,
    rope_in_sliding_layers,
    rope_in_sliding_layers_export,
    rope_per_layer_type,
    SplitRows,
    TransposedInterleavedExperts,
    window_for_the_mask,
    window_of_every_layer,
    window_of_every_native_layer,
)

# (output_router_logits is imported but exported off: transformers' MoE classes cannot generate with it on)
_EXPERT_FIELDS = dict(num_experts="num_experts", num_experts_per_tok="num_experts_per_tok",
                      router_aux_loss_coef="router_aux_loss_coef")
_QWEN_MOE_FIELDS = dict(_EXPERT_FIELDS, moe_intermediate_size="moe_intermediate_size", norm_topk_prob="norm_topk_prob",
                        decoder_sparse_step="decoder_sparse_step", mlp_only_layers="mlp_only_layers")
MOE_FAMILY_LIST = [
    Family(
        MixtralForCausalLM, MixtralConfig,
        # Mixtral's intermediate_size is its experts' width; it has no dense MLP
        fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
                "num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size", "head_dim": "head_dim",
                "norm_eps": "rms_norm_eps", "sliding_window": "sliding_window"},
        fixed=dict(norm_topk_prob=True),  # Mixtral always renormalises the top-k weights
        allows={"_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        # its router hands the experts float32 weights (the others cast them to the activations' dtype)
        import_fields=lambda native: dict(head_dim=native_head_dim(native), intermediate_size=native.intermediate_size,
                                          output_router_logits=native.output_router_logits, router_weights_fp32=True),
        export_fields=lambda config: dict(hidden_act="silu", **window_of_every_layer(config)),
        refuse=(("router_jitter_noise", 0.0, "multiplies the router's input by noise in training"),),
    ),
    Family(
        Qwen2MoeForCausalLM, Qwen2MoeConfig,
        fields={**LLAMA_FIELDS, **_QWEN_MOE_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "qkv_bias",
                "shared_expert_intermediate_size": "shared_expert_intermediate_size"},
        fixed=dict(attention_output_bias=False),  # qkv_bias: q/k/v only
        allows={"_dense_layers": ANY, "_shared_expert": ANY, "_layer_types": ANY},
        # Qwen2-MoE always has its shared expert
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "_shared_expert": {True}},
        # its config writes sliding_window 0 (not None) when use_sliding_window is off
        import_fields=lambda native: dict(native_layer_types(native), output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(qwen_layer_fields(config), hidden_act="silu"),
    ),
    Family(
        Qwen3MoeForCausalLM, Qwen3MoeConfig,
        # no head_dim field in its config (the model reads it with a hidden / heads fallback): written on export
        fields={**LLAMA_FIELDS, **_QWEN_MOE_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias"},
        fixed=dict(qk_norm=True),
        # one sliding_window for every layer (use_sliding_window), no layer_types
        allows={"attention_output_bias": ANY, "_dense_layers": ANY, "_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(window_of_every_native_layer(native), head_dim=native_head_dim(native),
                                          attention_output_bias=native.attention_bias,
                                          output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(window_of_every_layer(config), head_dim=config.head_dim,
                                          use_sliding_window="sliding_attention" in config.layer_types,
                                          attention_bias=any_bias(config), hidden_act="silu"),
    ),
    Family(
        OlmoeForCausalLM, OlmoeConfig,
        # OLMoE's intermediate_size is its experts' width; it has no dense MLP
        fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
                "moe_intermediate_size": "intermediate_size", "norm_topk_prob": "norm_topk_prob",
                "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias", "clip_qkv": "clip_qkv"},
        fixed=dict(qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                          output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
    ),
]
MOE_FAMILY_LIST.append(Family(
    # FlexOlmo: OLMo 2's block (norms on each sublayer's output, full-width q/k norms) with OLMoE's experts
    FlexOlmoForCausalLM, FlexOlmoConfig,
    fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
            "moe_intermediate_size": "intermediate_size", "norm_topk_prob": "norm_topk_prob", "norm_eps": "rms_norm_eps",
            "attention_bias": "attention_bias"},
    fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
    allows={"attention_output_bias": ANY},
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
    import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                      output_router_logits=native.output_router_logits, **OLMO2_ROUNDING),
    export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
    renames=SANDWICH_NORMS,
))


# Granite's multipliers on Mixtral's mixture (top-k weights: a softmax over the k logits, i.e. renormalised); the
# Shared variant adds an ungated shared MLP whose gate and up rows are one matrix
_GRANITE_MOE_FIELDS = {
    **{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
    "num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size", "norm_eps": "rms_norm_eps",
    "attention_bias": "attention_bias", **{name: name for name in ("embedding_multiplier", "residual_multiplier",
                                                                   "attention_multiplier", "logits_scaling")}}
_GRANITE_MOE = dict(
    fixed=dict(norm_topk_prob=True),
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
    import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                      output_router_logits=native.output_router_logits, router_topk_softmax=True),
    # the shared MLP's before the block's: on export the first rename that matches a key wins
    renames=(Rename("model.layers.{i}.shared_mlp.input_linear.", "model.layers.{i}.mlp.shared_expert.input_linear."),
             Rename("model.layers.{i}.shared_mlp.output_linear.", "model.layers.{i}.mlp.shared_expert.down_proj."),
             Rename("model.layers.{i}.block_sparse_moe.router.", "model.layers.{i}.mlp.gate."),
             Rename("model.layers.{i}.block_sparse_moe.", "model.layers.{i}.mlp.")),
)


def _granite_moe_export(config: ArchLMConfig) -> dict:
    # Granite's attention_multiplier is the whole score scale (its default 1.0 is no 1/sqrt(head_dim))
    return dict(attention_bias=any_bias(config), attention_multiplier=config.attention_scaling, hidden_act="silu")


MOE_FAMILY_LIST += [
    Family(GraniteMoeForCausalLM, GraniteMoeConfig, fields=_GRANITE_MOE_FIELDS,
           allows={"attention_output_bias": ANY}, export_fields=_granite_moe_export, **_GRANITE_MOE),
    Family(
        GraniteMoeSharedForCausalLM, GraniteMoeSharedConfig, fields=_GRANITE_MOE_FIELDS,
        fixed=dict(_GRANITE_MOE["fixed"], shared_expert_gated=False),
        allows={"attention_output_bias": ANY, "_shared_expert": ANY},
        requires=_GRANITE_MOE["requires"],
        import_fields=lambda native: dict(_GRANITE_MOE["import_fields"](native),
                                          shared_expert_intermediate_size=native.shared_intermediate_size or None),
        export_fields=lambda config: dict(_granite_moe_export(config),
                                          shared_intermediate_size=config.shared_expert_intermediate_size or 0),
        renames=_GRANITE_MOE["renames"],
        operations=(SplitRows("model.layers.{i}.mlp.shared_expert.input_linear",
                              ("model.layers.{i}.mlp.shared_expert.gate_proj", "model.layers.{i}.mlp.shared_expert.up_proj"),
                              lambda config: [config.shared_expert_intermediate_size] * 2),),
    ),
]


MOE_FAMILY_LIST.append(Family(
    # Granite-MoE-SWA: Granite-MoE-Shared's mixture with GraniteSWA's attention (sliding and full layers, a learned
    # sink per head, a rope base per layer: 0 for no rope)
    GraniteMoeSWAForCausalLM, GraniteMoeSWAConfig, fields=_GRANITE_MOE_FIELDS,
    fixed=dict(_GRANITE_MOE["fixed"], shared_expert_gated=False, attention_sinks=True),
    allows={"attention_output_bias": ANY, "_shared_expert": ANY, "_layer_types": ANY, "_no_rope_layers": ANY},
    requires=_GRANITE_MOE["requires"],
    import_fields=lambda native: dict(_GRANITE_MOE["import_fields"](native), **native_layer_types(native),
                                      shared_expert_intermediate_size=native.shared_intermediate_size or None,
                                      **granite_swa_rope(native)),
    export_fields=lambda config: dict(
        _granite_moe_export(config), shared_intermediate_size=config.shared_expert_intermediate_size or 0,
        layer_types=list(config.layer_types), **window_for_the_mask(config),
        layer_rope_theta=[config.rope_parameters["rope_theta"] if config.layer_uses_rope(i) else 0
                          for i in range(config.num_hidden_layers)]),
    renames=_GRANITE_MOE["renames"],
    operations=(SplitRows("model.layers.{i}.mlp.shared_expert.input_linear",
                          ("model.layers.{i}.mlp.shared_expert.gate_proj", "model.layers.{i}.mlp.shared_expert.up_proj"),
                          lambda config: [config.shared_expert_intermediate_size] * 2),),
))


# DeepSeek-V3's mixture: a sigmoid router with its bias, group-limited top-k, scaled weights, an ungated shared expert
# of n_shared_experts x the experts' width, the dense layers first; as in transformers, no load-balancing loss
_DEEPSEEK_MOE = dict(
    fields={**{name: name for name in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "n_group",
                                       "topk_group", "routed_scaling_factor")}, "num_experts": "n_routed_experts"},
    fixed=dict(router_scoring="sigmoid", shared_expert_gated=False),
    allows={"_dense_layers": ANY, "_shared_expert": ANY, "router_bias_update_rate": ANY},
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_shared_expert": {True}, "_shared_expert_whole": {True},
              "_dense_layers_first": {True}},
    renames=(Rename("model.layers.{i}.mlp.gate.e_score_correction_bias", "model.layers.{i}.mlp.e_score_correction_bias"),
             Rename("model.layers.{i}.mlp.shared_experts.", "model.layers.{i}.mlp.shared_expert.")),
)


def _deepseek_moe_import(native: PreTrainedConfig, shared: str = "n_shared_experts") -> dict:
    """`shared`: the native field counting the shared expert's width in experts (EXAONE MoE: num_shared_experts)."""
    return dict(head_dim=native_head_dim(native), mlp_only_layers=list(range(getattr(native, "first_k_dense_replace", 0) or 0)) or None,
                shared_expert_intermediate_size=(getattr(native, shared) or 0) * native.moe_intermediate_size or None,
                router_weights_fp32=True, router_aux_loss_coef=0.0, output_router_logits=False)


def _deepseek_moe_export(config: ArchLMConfig, shared: str = "n_shared_experts") -> dict:
    return dict(head_dim=config.head_dim, hidden_act="silu",
                **{shared: config.shared_expert_intermediate_size // config.moe_intermediate_size},
                first_k_dense_replace=sum(not config.layer_is_sparse(i) for i in range(config.num_hidden_layers)))


MOE_FAMILY_LIST += [
    Family(  # dots.llm1: DeepSeek-V3's mixture on Qwen3's attention
        Dots1ForCausalLM, Dots1Config,
        fields={**LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], qk_norm=True),
        allows={**_DEEPSEEK_MOE["allows"], "attention_output_bias": ANY, "_layer_types": ANY},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=lambda native: dict(_deepseek_moe_import(native), **native_layer_types(native),
                                          attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_deepseek_moe_export(config), attention_bias=any_bias(config),
                                          sliding_window=config.sliding_window, layer_types=list(config.layer_types)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(  # DeepSeek-V3 (and Kimi K2): its mixture on multi-head latent attention, rope over head_dim channels
        DeepseekV3ForCausalLM, DeepseekV3Config,
        fields={**LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "head_dim": "qk_rope_head_dim", "rope_interleaved": "rope_interleave",
                **{name: name for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        fixed=_DEEPSEEK_MOE["fixed"],
        allows={**_DEEPSEEK_MOE["allows"], "attention_output_bias": ANY},
        requires={**_DEEPSEEK_MOE["requires"], "_latent_attention": {True}},
        import_fields=lambda native: dict(_deepseek_moe_import(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_deepseek_moe_export(config), attention_bias=any_bias(config)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(  # GLM-4.5 / 4.6: DeepSeek-V3's mixture on attention with partial rotary (NeoX's), q/k/v biases, qk norm
        Glm4MoeForCausalLM, Glm4MoeConfig,
        fields={**LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "qk_norm": "use_qk_norm"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], attention_output_bias=False),
        allows={**_DEEPSEEK_MOE["allows"], **PARTIAL_ROPE},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=_deepseek_moe_import,
        # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
        export_fields=lambda config: dict(_deepseek_moe_export(config),
                                          partial_rotary_factor=config.rotary_dim() / config.head_dim),
        renames=_DEEPSEEK_MOE["renames"],
    ),
]


def _mlp_layer_types_import(native: PreTrainedConfig) -> dict:
    """GLM-4.7-Flash and EXAONE MoE name each layer's MLP "dense" or "sparse" (any layers dense)."""
    return dict(mlp_only_layers=[i for i, kind in enumerate(native.mlp_layer_types) if kind == "dense"] or None)


def _mlp_layer_types_export(config: ArchLMConfig) -> dict:
    return dict(mlp_layer_types=["sparse" if config.layer_is_sparse(i) else "dense"
                                 for i in range(config.num_hidden_layers)])


MOE_FAMILY_LIST += [
    Family(  # GLM-4.7-Flash: DeepSeek-V3's latent attention and mixture, its dense layers anywhere (mlp_layer_types)
        Glm4MoeLiteForCausalLM, Glm4MoeLiteConfig,
        fields={**LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "head_dim": "qk_rope_head_dim", "rope_interleaved": "rope_interleave",
                **{name: name for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        fixed=_DEEPSEEK_MOE["fixed"],
        allows={**_DEEPSEEK_MOE["allows"], "attention_output_bias": ANY},
        requires={**{key: value for key, value in _DEEPSEEK_MOE["requires"].items() if key != "_dense_layers_first"},
                  "_latent_attention": {True}},
        import_fields=lambda native: dict(_deepseek_moe_import(native), **_mlp_layer_types_import(native),
                                          attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(
            {key: value for key, value in _deepseek_moe_export(config).items() if key != "first_k_dense_replace"},
            **_mlp_layer_types_export(config), attention_bias=any_bias(config)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(  # Solar Open: GLM-4.5's mixture (DeepSeek-V3's) in every layer, on Llama's attention with q/k/v biases
        SolarOpenForCausalLM, SolarOpenConfig,
        fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"},
                **_DEEPSEEK_MOE["fields"], "head_dim": "head_dim", "norm_eps": "rms_norm_eps",
                "attention_bias": "attention_bias"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], attention_output_bias=False),
        allows={**_DEEPSEEK_MOE["allows"], "_dense_layers": {0}},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=lambda native: dict(_deepseek_moe_import(native), mlp_only_layers=None),
        export_fields=lambda config: {key: value for key, value in _deepseek_moe_export(config).items()
                                      if key != "first_k_dense_replace"},
        renames=_DEEPSEEK_MOE["renames"],
    ),
]


def _multi_token_prediction_ignored(native: PreTrainedConfig, field: str) -> dict:
    """EXAONE MoE's and Mellum's multi-token-prediction layers (`mtp.*` weights) are not part of their causal LM:
    transformers drops them on load, so the logits do not depend on them. Not converted, with a warning; an export
    has none."""
    if getattr(native, field, None):
        logger.warning("%s sets %s=%r: its multi-token-prediction layers are not converted (transformers' causal LM "
                       "drops their mtp.* weights on load: its logits do not use them), and an export has none.",
                       native.model_type, field, getattr(native, field))
    return {}


def _exaone_moe_import(native: PreTrainedConfig) -> dict:
    if not native.sliding_window or native.sliding_window < 1:  # its config takes no None
        raise ValueError(f"Cannot convert this exaone_moe model: `sliding_window`={native.sliding_window!r} gives its "
                         "sliding layers an empty window; ArchLM has no equivalent.")
    return dict(_deepseek_moe_import(native, shared="num_shared_experts"), **_mlp_layer_types_import(native),
                **rope_in_sliding_layers(native, rope_without_window=False),
                **_multi_token_prediction_ignored(native, "num_nextn_predict_layers"))


def _mellum_import(native: PreTrainedConfig) -> dict:
    return dict(native_layer_types(native), **_mlp_layer_types_import(native),
                attention_output_bias=native.attention_bias, output_router_logits=native.output_router_logits,
                **_multi_token_prediction_ignored(native, "num_mtp_layers"))


MOE_FAMILY_LIST += [
    Family(
        # EXAONE MoE (K-EXAONE): EXAONE 4's attention (per-head q/k norms, rope in the sliding layers only) in Llama's
        # pre-norm block, with DeepSeek-V3's mixture, its dense layers anywhere (mlp_layer_types). Its config always
        # has a window, so its full layers always go without rope
        ExaoneMoeForCausalLM, ExaoneMoeConfig,
        fields={**LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "num_experts": "num_experts", "norm_eps": "rms_norm_eps",
                "layer_types": "layer_types", "sliding_window": "sliding_window"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], qk_norm=True),
        allows={**_DEEPSEEK_MOE["allows"], "_layer_types": ANY, "_no_rope_layers": ANY},
        requires={**{key: value for key, value in _DEEPSEEK_MOE["requires"].items() if key != "_dense_layers_first"},
                  "_rope_layers": {"sliding"}},
        import_fields=_exaone_moe_import,
        # no head_dim field in its config (the model reads it with a hidden / heads fallback): written on export
        export_fields=lambda config: dict(
            {key: value for key, value in _deepseek_moe_export(config, shared="num_shared_experts").items()
             if key != "first_k_dense_replace"},
            **_mlp_layer_types_export(config), **rope_in_sliding_layers_export(config, rope_without_window=False)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(
        # Mellum: Qwen3-MoE's attention (per-head q/k norms, `attention_bias` on q/k/v/o) and mixture (softmax
        # router), a rope dict per layer type (full and sliding layers), dense layers anywhere (mlp_layer_types).
        # Its attention rotates the whole head: a rope dict's partial_rotary_factor cannot run
        MellumForCausalLM, MellumConfig,
        fields={**LLAMA_FIELDS, **_EXPERT_FIELDS, "moe_intermediate_size": "moe_intermediate_size",
                "norm_topk_prob": "norm_topk_prob", "head_dim": "head_dim", "norm_eps": "rms_norm_eps",
                "attention_bias": "attention_bias", "layer_types": "layer_types", "sliding_window": "sliding_window"},
        fixed=dict(qk_norm=True),
        allows={"attention_output_bias": ANY, "_dense_layers": ANY, "_layer_types": ANY, "_rope_per_layer_type": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=_mellum_import,
        export_fields=lambda config: dict(
            _mlp_layer_types_export(config), attention_bias=any_bias(config), rope_parameters=rope_per_layer_type(config),
            layer_types=list(config.layer_types), sliding_window=config.sliding_window, hidden_act="silu"),
    ),
]


# gpt-oss's experts compute act(min(gate, limit)) * (clamp(up, -limit, limit) + 1) with act(x) = x * sigmoid(alpha x):
# ArchLM's swiglu_limit with the activation its alpha names
_GPT_OSS_ALPHAS = {1.702: "quick_gelu", 1.0: "silu"}


def _gpt_oss_import(native: PreTrainedConfig) -> dict:
    if native.swiglu_alpha not in _GPT_OSS_ALPHAS:
        raise ValueError(f"Cannot convert this gpt_oss model: `swiglu_alpha`={native.swiglu_alpha!r} (x * sigmoid(alpha "
                         f"x) in its experts) is an activation ArchLM has only for alpha in {sorted(_GPT_OSS_ALPHAS)} "
                         "(quick_gelu, silu).")
    return dict(native_layer_types(native), head_dim=native_head_dim(native), intermediate_size=native.intermediate_size,
                hidden_act=_GPT_OSS_ALPHAS[native.swiglu_alpha], attention_output_bias=native.attention_bias,
                output_router_logits=native.output_router_logits, router_topk_softmax=True, norm_weight_fp32=True,
                attention_sinks_in_softmax=True)


MOE_FAMILY_LIST.append(Family(
    # gpt-oss: every layer a mixture whose router has a bias (top-k logits, then their softmax), experts with biases
    # and the clamped GLU, attention with biases and a learned sink per head, sliding and full layers alternating
    GptOssForCausalLM, GptOssConfig,
    fields={**{key: value for key, value in LLAMA_FIELDS.items() if key not in ("intermediate_size", "hidden_act")},
            **_EXPERT_FIELDS, "num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size",
            "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
            "swiglu_limit": "swiglu_limit"},
    fixed=dict(norm_topk_prob=True, router_bias=True, mlp_bias=True, attention_sinks=True),
    allows={"attention_output_bias": ANY, "_layer_types": ANY, "hidden_act": {"quick_gelu", "swish"}},
    requires={"_swiglu_clamped": {True}},
    import_fields=_gpt_oss_import,
    export_fields=lambda config: dict(
        swiglu_alpha=1.702 if config.hidden_act == "quick_gelu" else 1.0, attention_bias=any_bias(config),
        layer_types=list(config.layer_types), **window_for_the_mask(config)),
    renames=(Rename("model.layers.{i}.mlp.router.", "model.layers.{i}.mlp.gate."),),
    operations=(TransposedInterleavedExperts(),),
))
