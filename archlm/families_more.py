"""More families `archlm.convert` converts (DeepSeek-V2, HunYuan dense and MoE, ERNIE 4.5 MoE), as `Family` records
(archlm/family_spec.py); `archlm.families` lists them after the mixtures of `archlm.families_moe`.
"""

from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    HunYuanDenseV1Config,
    HunYuanDenseV1ForCausalLM,
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    PreTrainedConfig,
)

from .configuration_archlm import ArchLMConfig
from .families_moe import _DEEPSEEK_MOE, _deepseek_moe_export, _deepseek_moe_import
from .family_spec import ANY, LLAMA_ACTIVATIONS, LLAMA_FIELDS, Family, LeadingAxis, Rename, any_bias, native_head_dim

# DeepSeek-V2's router methods: the top-k of every expert's softmax score, or only of the experts in the topk_group
# groups whose best score is highest
_DEEPSEEK_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _deepseek_v2_import(native: PreTrainedConfig) -> dict:
    """Greedy routing ignores n_group and topk_group (ArchLM: one group); its router never renormalises the top-k
    weights, whatever norm_topk_prob says."""
    if native.topk_method not in _DEEPSEEK_V2_TOPK_METHODS:
        raise ValueError(f"Cannot convert this deepseek_v2 model: `topk_method`={native.topk_method!r} is none of "
                         f"{list(_DEEPSEEK_V2_TOPK_METHODS)}, the routings its transformers class computes.")
    groups = (dict(n_group=native.n_group, topk_group=native.topk_group, group_scoring="max")
              if native.topk_method == "group_limited_greedy" else dict(n_group=1, topk_group=1))
    # its router's logits and its rope's rotation in float32 (rounding only)
    return dict(_deepseek_moe_import(native), **groups, norm_topk_prob=False,
                attention_output_bias=native.attention_bias, router_logits_fp32=True, rope_precision="float32")


def _deepseek_v2_export(config: ArchLMConfig) -> dict:
    grouped = config.n_group > 1
    return dict(_deepseek_moe_export(config), attention_bias=any_bias(config), norm_topk_prob=False,
                topk_method="group_limited_greedy" if grouped else "greedy", n_group=config.n_group,
                topk_group=config.topk_group)


MORE_FAMILY_LIST = [
    Family(
        # DeepSeek-V2 (-Lite, Coder-V2): DeepSeek-V3's latent attention (rope on interleaved pairs) and layout (dense
        # layers first, an ungated shared expert n_shared_experts wide), with a softmax router: its top-k weights
        # unnormalised, x routed_scaling_factor, the choice greedy or limited to the groups of the best single scores
        DeepseekV2ForCausalLM, DeepseekV2Config,
        fields={**LLAMA_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "num_experts": "n_routed_experts", "head_dim": "qk_rope_head_dim",
                **{name: name for name in ("num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor",
                                           "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        fixed=dict(rope_interleaved=True, norm_topk_prob=False, shared_expert_gated=False, group_scoring="max"),
        allows={"_dense_layers": ANY, "_shared_expert": ANY, "attention_output_bias": ANY, "n_group": ANY,
                "topk_group": ANY},
        requires={**_DEEPSEEK_MOE["requires"], "_latent_attention": {True}},
        import_fields=_deepseek_v2_import,
        export_fields=_deepseek_v2_export,
        # its dense MLPs and shared expert take mlp_bias, its routed experts not: ArchLM's mlp_bias covers all three
        refuse=(("mlp_bias", False, "puts biases on its dense MLPs and shared expert but not on its routed experts"),),
        renames=(_DEEPSEEK_MOE["renames"][1],),
    ),
]


def _hunyuan_rope(native: PreTrainedConfig) -> dict:
    """HunYuan's checkpoints label their rope "dynamic" with an `alpha`, which its class computes as a fixed NTK
    stretch of the base (no update with the length): ArchLM's default rope with the stretched base, the same
    frequencies. It exports as that default rope."""
    rope = native.rope_parameters or {}
    if rope.get("rope_type") != "dynamic" or not rope.get("alpha"):
        return {}
    dim = native_head_dim(native)
    return dict(rope_parameters={"rope_type": "default",
                                 "rope_theta": rope["rope_theta"] * rope["alpha"] ** (dim / (dim - 2))})


def _hunyuan_import(native: PreTrainedConfig) -> dict:
    return dict(_hunyuan_rope(native), head_dim=native_head_dim(native), attention_output_bias=native.attention_bias)


# its router is built in float32 and stays so in a model loaded in bf16 (from_pretrained), where it hands the experts
# float32 weights; a model cast with .to() has it in bf16 and rounds apart
_HUNYUAN_ROUTER_ROUNDING = dict(router_logits_fp32=True, router_weights_fp32=True)


def _hunyuan_moe_import(native: PreTrainedConfig) -> dict:
    """Its experts and its shared MLP are intermediate_size wide; every layer is sparse. A top-k per layer (a list)
    is refused unless every layer has the same."""
    top_k = native.moe_topk
    if isinstance(top_k, list):
        if len(set(top_k)) != 1:
            raise ValueError(f"Cannot convert this hunyuan_v1_moe model: `moe_topk`={top_k} differs between layers; "
                             "ArchLM has one top-k for every layer.")
        top_k = top_k[0]
    return dict(_hunyuan_import(native), num_experts_per_tok=top_k, moe_intermediate_size=native.intermediate_size,
                shared_expert_intermediate_size=native.intermediate_size, router_aux_loss_coef=0.0,
                output_router_logits=False, **_HUNYUAN_ROUTER_ROUNDING)


# HunYuan: Llama's attention (attention_bias on q/k/v/o) with per-head q/k RMSNorms applied after rope
_HUNYUAN = dict(
    fixed=dict(qk_norm=True, qk_norm_position="after_rope"),
    allows={"attention_output_bias": ANY},
    renames=(Rename("model.layers.{i}.self_attn.query_layernorm.", "model.layers.{i}.self_attn.q_norm."),
             Rename("model.layers.{i}.self_attn.key_layernorm.", "model.layers.{i}.self_attn.k_norm.")),
)
MORE_FAMILY_LIST += [
    Family(
        HunYuanDenseV1ForCausalLM, HunYuanDenseV1Config,
        fields={**LLAMA_FIELDS, "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias"},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=_hunyuan_import,
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
        **_HUNYUAN,
    ),
    Family(
        # HunYuan-MoE (Hunyuan-A13B): every layer a softmax router's renormalised top-k (moe_topk) plus an ungated
        # shared MLP, experts and shared MLP all intermediate_size wide; as in transformers, no load-balancing loss
        HunYuanMoEV1ForCausalLM, HunYuanMoEV1Config,
        fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "intermediate_size"},
                "moe_intermediate_size": "intermediate_size", "head_dim": "head_dim", "norm_eps": "rms_norm_eps",
                "attention_bias": "attention_bias", "num_experts": "num_experts", "num_experts_per_tok": "moe_topk"},
        fixed=dict(_HUNYUAN["fixed"], norm_topk_prob=True, shared_expert_gated=False),
        allows={**_HUNYUAN["allows"], "_shared_expert": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_shared_expert": {True}, "_shared_expert_one_expert": {True}},
        import_fields=_hunyuan_moe_import,
        export_fields=lambda config: dict(attention_bias=any_bias(config), hidden_act="silu"),
        renames=(*_HUNYUAN["renames"], Rename("model.layers.{i}.mlp.gate.wg.", "model.layers.{i}.mlp.gate."),
                 Rename("model.layers.{i}.mlp.shared_mlp.", "model.layers.{i}.mlp.shared_expert.")),
    ),
]


# ERNIE 4.5 MoE floors its top-k weights' sum at moe_norm_min, ArchLM adds 1e-20 to it: the same weights wherever the
# sum is at least 1e-12 (a top-k of softmax scores sums to k / E or more, unless the routing bias picks experts whose
# scores are all below that)
_ERNIE_NORM_MIN = 1e-12


def _ernie4_5_moe_import(native: PreTrainedConfig) -> dict:
    """Every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index is sparse: ArchLM's
    decoder_sparse_step, the others of that step in mlp_only_layers. Its router's logits are float32, the weights it
    hands the experts in the activations' dtype; its rope rotates pairs in float32."""
    if native.moe_norm_min > _ERNIE_NORM_MIN:
        raise ValueError(f"Cannot convert this ernie4_5_moe model: `moe_norm_min`={native.moe_norm_min!r} floors the "
                         f"sum of the top-k weights; ArchLM's floor matches it only up to {_ERNIE_NORM_MIN}.")
    step, first, last = native.moe_layer_interval, native.moe_layer_start_index, native.moe_layer_end_index
    outside = [i for i in range(native.num_hidden_layers) if (i + 1) % step == 0 and not first <= i <= last]
    shared = native.moe_num_shared_experts * native.moe_intermediate_size
    return dict(head_dim=native_head_dim(native), decoder_sparse_step=step, mlp_only_layers=outside or None,
                shared_expert_intermediate_size=shared or None, output_router_logits=native.output_router_logits,
                router_logits_fp32=True, rope_precision="float32")


def _ernie4_5_moe_export(config: ArchLMConfig) -> dict:
    sparse = [i for i in range(config.num_hidden_layers) if config.layer_is_sparse(i)]
    return dict(head_dim=config.head_dim, hidden_act="silu", use_bias=False,
                moe_layer_interval=config.decoder_sparse_step, moe_layer_start_index=sparse[0],
                moe_layer_end_index=sparse[-1],
                moe_num_shared_experts=(config.shared_expert_intermediate_size or 0) // config.moe_intermediate_size)


MORE_FAMILY_LIST.append(Family(
    # ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B): ERNIE 4.5's attention (interleaved rope in float32) with a mixture in every
    # moe_layer_interval-th layer of a range: a float32 softmax router whose fixed routing bias enters the choice
    # only, its top-k renormalised, an ungated shared expert moe_num_shared_experts wide
    Ernie4_5_MoeForCausalLM, Ernie4_5_MoeConfig,
    fields={**{key: value for key, value in LLAMA_FIELDS.items() if key != "attention_dropout"},
            "norm_eps": "rms_norm_eps", "num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k",
            "moe_intermediate_size": "moe_intermediate_size", "router_aux_loss_coef": "router_aux_loss_coef"},
    fixed=dict(rope_interleaved=True, norm_topk_prob=True, shared_expert_gated=False, router_choice_bias=True),
    # a rate moves the bias in training, dropped on export with a warning
    allows={"_dense_layers": ANY, "_shared_expert": ANY, "router_bias_update_rate": ANY},
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_shared_expert_whole": {True}, "_sparse_layers_one_run": {True}},
    import_fields=_ernie4_5_moe_import,
    export_fields=_ernie4_5_moe_export,
    # use_bias covers its attention, dense and shared MLPs and LM head, not its routed experts: ArchLM's mlp_bias
    # covers those too
    refuse=(("use_bias", False, "puts biases on its dense MLPs and shared expert but not on its routed experts"),),
    renames=(Rename("model.layers.{i}.mlp.gate.moe_statics.e_score_correction_bias",
                    "model.layers.{i}.mlp.e_score_correction_bias"),
             Rename("model.layers.{i}.mlp.shared_experts.", "model.layers.{i}.mlp.shared_expert.")),
    operations=(LeadingAxis("model.layers.{i}.mlp.e_score_correction_bias"),),
))
