"""Shared helpers for the ArchLM tests: tiny configs that build and run in milliseconds on a CPU."""

import importlib.util
import os
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from archlm import ArchLMConfig, ArchLMForCausalLM, tokenization_archlm

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's contention makes
# the suite ~10x slower.
torch.set_num_threads(1)

# ARCHLM_TEST_DEVICE=cuda runs the tests on a GPU: every tensor and model created without a device lands there (the
# suite is written for a CPU; on a GPU it is a check of the same code paths there, run by hand: CI has no GPU)
if os.environ.get("ARCHLM_TEST_DEVICE"):
    torch.set_default_device(os.environ["ARCHLM_TEST_DEVICE"])

# What a bad config raises at construction: our `validate_*` rules (a ValueError, wrapped by @strict in the class
# error) and @strict's own type checks (the field error).
VALIDATION_ERRORS = (ValueError, StrictDataclassFieldValidationError, StrictDataclassClassValidationError)

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> ArchLMConfig:
    """A 2-layer, 32-wide config; any field can be overridden."""
    return ArchLMConfig(**{**TINY, **overrides})


# --config_overrides of the tiny model the training and distributed tests train with examples/train.py
TINY_MODEL = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,num_key_value_heads=1,intermediate_size=64"


def load_script(path: Path, module_name: str):
    """An example script (examples/*.py is not a package) imported as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every architecture option added for the modern families, each combined with a rotating base of the older ones
# (positions, norm position, heads, MLP, tying), so that each meets many others. id -> overrides of tiny_config.
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]
LOCAL_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
              "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
HALF_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
NEW_OPTIONS = {
    "parallel-shared-norm": dict(use_parallel_residual=True),
    "parallel-two-norms": dict(use_parallel_residual=True, parallel_shared_norm=False),
    "parallel-postnorm": dict(use_parallel_residual=True, norm_position="post"),
    "sandwich": dict(norm_position="sandwich"),
    "sublayer-output-norms": dict(norm_position="sublayer_output"),
    "unit-offset-rmsnorm": dict(norm_type="rmsnorm_unit_offset"),
    "noaffine-layernorm": dict(norm_type="layernorm_noaffine"),
    "unit-offset-layernorm": dict(norm_type="layernorm_unit_offset"),
    "attention-sinks": dict(attention_sinks=True),
    "softcaps": dict(attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "granite-multipliers": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=2.0),
    "sqrt-embedding-query-scalar": dict(scale_embeddings_by_sqrt_hidden=True, query_pre_attn_scalar=12),
    "sliding-then-full": dict(layer_types=SLIDING_THEN_FULL, sliding_window=3),
    "nope-second-layer": dict(no_rope_layers=[1, 0]),
    "local-rope-theta": dict(layer_types=SLIDING_THEN_FULL, sliding_window=3, rope_parameters=LOCAL_ROPE),
    "partial-rotary": dict(rope_parameters=HALF_ROPE),
    "interleaved-rotary": dict(rope_interleaved=True),
    "interleaved-partial-rotary": dict(rope_interleaved=True, rope_parameters=HALF_ROPE),
    "qknorm-full-width": dict(qk_norm=True, qk_norm_scope="full"),
    "qknorm-per-head-layernorm": dict(qk_norm=True, qk_norm_scope="per_head", qk_norm_type="layernorm_nobias"),
    "clip-qkv": dict(clip_qkv=0.5),
    "lm-head-bias": dict(lm_head_bias=True),
    "subln-magneto": dict(init_scheme="magneto"),
    "experts-top2": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "experts-shared-dense-first-zloss": dict(num_experts=3, num_experts_per_tok=1, shared_expert_intermediate_size=16,
                                             mlp_only_layers=[0], norm_topk_prob=False, output_router_logits=True,
                                             router_z_loss_coef=0.01),
    "experts-every-2nd-layer-standard-mlp": dict(num_experts=4, decoder_sparse_step=2, mlp_type="standard",
                                                 hidden_act="gelu", output_router_logits=True),
    "gemma2-like-on-alibi-parallel": dict(position_embedding_type="alibi", use_parallel_residual=True,
                                          norm_position="sandwich", norm_type="rmsnorm_unit_offset",
                                          attn_logit_softcapping=2.0, layer_types=SLIDING_THEN_FULL, sliding_window=3),
    "experts-routing-bias": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 router_bias_update_rate=0.01),
    "experts-sigmoid-groups-ungated-shared": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                  router_scoring="sigmoid", n_group=2, topk_group=1,
                                                  routed_scaling_factor=2.0, shared_expert_intermediate_size=16,
                                                  shared_expert_gated=False),
    # multi-head latent attention: rope only, every head its own expanded key and value
    "latent-attention-q-latent-interleaved": dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, v_head_dim=12,
                                                  head_dim=8, num_key_value_heads=4, position_embedding_type="rope",
                                                  qk_norm=False, rope_interleaved=True),
    "latent-attention-q-projected-yarn": dict(kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
                                              num_key_value_heads=4, position_embedding_type="rope", qk_norm=False,
                                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                               "factor": 4.0, "mscale_all_dim": 1.0,
                                                               "original_max_position_embeddings": 16}),
    # rounding only (the same function in float32): every contract must still hold with them on
    "rounding-olmo2-rope-norm-neox-adds": dict(rope_precision="float32", norm_type="rmsnorm", norm_weight_fp32=True,
                                               use_parallel_residual=True, parallel_residual_order="sublayers_first"),
    "rounding-cohere-rope-layernorm": dict(rope_precision="float32_rotation", rope_interleaved=True,
                                           norm_type="layernorm_nobias", layernorm_precision="float32_explicit"),
    # gpt-oss's mixture: a biased router (softmax of the top-k logits), biased experts with the clamped GLU, its sinks
    "experts-gpt-oss": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_bias=True,
                            router_topk_softmax=True, mlp_type="gated", hidden_act="quick_gelu", swiglu_limit=0.5,
                            mlp_bias=True, attention_sinks=True, attention_sinks_in_softmax=True),
    "clamped-glu": dict(mlp_type="gated", swiglu_limit=0.25),
    # a sink's logit does not shift with the query's position as ALiBi's scores do (a static cache's misplaced
    # queries showed)
    "alibi-sinks": dict(position_embedding_type="alibi", attention_sinks=True),
    # OPT's positions: learned, counted from the attention mask when no position_ids are given
    "learned-positions-from-mask": dict(position_embedding_type="learned", position_ids_from_mask=True),
    # HunYuan's q/k norms on the rotated q and k (what the cache then holds)
    "qknorm-after-rope": dict(qk_norm=True, qk_norm_position="after_rope"),
    # DeepSeek-V2's group_limited_greedy: groups scored by their best expert; the router's logits in float32
    "experts-groups-by-best-expert": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                                          topk_group=1, group_scoring="max", router_logits_fp32=True),
}
_BASES = [
    dict(num_key_value_heads=2, tie_word_embeddings=True),
    dict(position_embedding_type="alibi", mlp_type="standard", hidden_act="gelu_new", tie_word_embeddings=False),
    dict(norm_type="layernorm", num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True),
    dict(position_embedding_type="learned", mlp_bias=True, tie_word_embeddings=False),
    dict(norm_position="post", qk_norm=True, num_key_value_heads=2, tie_word_embeddings=False),
]
_ROPE_ONLY = ("rope_parameters", "rope_interleaved", "no_rope_layers", "rope_precision")


def new_option_configs() -> dict[str, dict]:
    """NEW_OPTIONS, each over a base (a rope base where the option shapes rope; the option wins over its base)."""
    configs = {}
    for index, (name, option) in enumerate(NEW_OPTIONS.items()):
        base = dict(_BASES[index % len(_BASES)])
        if any(key in option for key in _ROPE_ONLY) or "position_embedding_type" in option:
            base.pop("position_embedding_type", None)
        if "norm_position" in option or "norm_type" in option:
            base.pop("norm_position", None)
        configs[name] = {**base, **option}
    return configs


def save_tiny_trained_model(folder: Path, steps: int = 150) -> None:
    """A 2-layer, 32-wide model with a ~300-token tokenizer, trained for a few seconds on ArchLM's tokenizer module
    (Python source, not the evaluation data), saved as examples/train.py saves one: weights, config with auto_map,
    remote code, tokenizer with its chat template, generation config."""
    text = Path(tokenization_archlm.__file__).read_text(encoding="utf-8")
    tokenizer = tokenization_archlm.train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = ArchLMForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)  # (N, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
