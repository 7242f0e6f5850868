"""More families `archlm.convert` converts (DeepSeek-V2, ...), as `Family` records (archlm/family_spec.py);
`archlm.families` lists them after the mixtures of `archlm.families_moe`.
"""

from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, PreTrainedConfig

from .configuration_archlm import ArchLMConfig
from .families_moe import _DEEPSEEK_MOE, _deepseek_moe_export, _deepseek_moe_import
from .family_spec import ANY, LLAMA_FIELDS, Family, any_bias

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
