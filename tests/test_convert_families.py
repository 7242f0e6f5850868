"""Every family in `archlm.convert.FAMILY_LIST`, from a tiny random model of transformers' own class: converted
logits and loss equal the reference (eager and sdpa where the class has it, left-padded with generate's position
ids), the export lands back on the same class with equal logits, and the mapped config fields survive the trip.

The five original families have their cases in test_convert.py; this module holds one or more per family added
since, and checks that every registered family has a case somewhere."""

from functools import partial

import pytest
import torch
from test_convert import (  # noqa: F401 (report_parity_errors: the module's autouse fixture that prints the errors)
    CASES,
    PARITY_ERRORS,
    TINY,
    VOCAB,
    batch,
    build_reference,
    max_relative_error,
    randomised,
    report_parity_errors,
)
from transformers import (
    ArceeConfig,
    ArceeForCausalLM,
    AutoModelForCausalLM,
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    CwmConfig,
    CwmForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    Dots1Config,
    Dots1ForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Exaone4Config,
    Exaone4ForCausalLM,
    ExaoneMoeConfig,
    ExaoneMoeForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    Glm4Config,
    Glm4ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteMoeConfig,
    GraniteSWAConfig,
    GraniteSWAForCausalLM,
    GraniteMoeForCausalLM,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    GraniteMoeSWAConfig,
    GraniteMoeSWAForCausalLM,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    HeliumConfig,
    HeliumForCausalLM,
    HunYuanDenseV1Config,
    HunYuanDenseV1ForCausalLM,
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    HyperCLOVAXConfig,
    HyperCLOVAXForCausalLM,
    Jais2Config,
    Jais2ForCausalLM,
    MellumConfig,
    MellumForCausalLM,
    MiniCPM3Config,
    MiniCPM3ForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    NemotronConfig,
    NemotronForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoConfig,
    OlmoeConfig,
    OlmoeForCausalLM,
    OlmoForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PersimmonConfig,
    PersimmonForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SeedOssConfig,
    SeedOssForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    SolarOpenConfig,
    SolarOpenForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
    VaultGemmaConfig,
    VaultGemmaForCausalLM,
    YoutuConfig,
    YoutuForCausalLM,
)

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.convert import FAMILIES, from_transformers, to_transformers

GQA = dict(TINY, num_key_value_heads=2)
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]

# id -> (class, config, attention implementations the class has). The id names the features the case proves.
FAMILY_CASES = {
    "gemma-unitoffsetnorm-embscale-headdim32": (GemmaForCausalLM, lambda: GemmaConfig(**GQA, head_dim=32), ("eager", "sdpa")),
    "gemma2-sandwich-softcaps-slidingthenfull": (Gemma2ForCausalLM, lambda: Gemma2Config(
        **GQA, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=SLIDING_THEN_FULL,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0), ("eager",)),
    "gemma3-qknorm-localrope-linearglobal": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **GQA, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=SLIDING_THEN_FULL,
        final_logit_softcapping=3.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
        ("eager", "sdpa")),
    "smollm3-nope-every2nd-sliding": (SmolLM3ForCausalLM, lambda: SmolLM3Config(
        **GQA, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4), ("eager", "sdpa")),
    "granite-multipliers-bias": (GraniteForCausalLM, lambda: GraniteConfig(
        **GQA, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
        attention_bias=True), ("eager", "sdpa")),
    # the default pattern (full, then 3 sliding), a learned sink per head; NoPE in one layer
    "granite_swa-sinks-fullthen3sliding-multipliers": (GraniteSWAForCausalLM, lambda: GraniteSWAConfig(
        **dict(GQA, num_hidden_layers=4), sliding_window=4, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=4.0, attention_bias=True), ("eager",)),
    "granite_swa-sinks-nopelayer": (GraniteSWAForCausalLM, lambda: GraniteSWAConfig(
        **dict(GQA, num_hidden_layers=3), sliding_window=4, layer_rope_theta=[10000.0, 0, 10000.0]), ("eager",)),
    "olmo-noaffinenorm-clipqkv": (OlmoForCausalLM, lambda: OlmoConfig(**GQA, clip_qkv=0.5), ("eager", "sdpa")),
    "olmo2-sublayeroutputnorms-fullwidthqknorm": (Olmo2ForCausalLM, lambda: Olmo2Config(**GQA), ("eager", "sdpa")),
    "cohere-parallel-interleavedrope-perheadqknorm-logitscale": (CohereForCausalLM, lambda: CohereConfig(
        **GQA, use_qk_norm=True, logit_scale=0.125), ("eager", "sdpa")),
    "stablelm-parallel-perheadqknorm-partialrope-qkvbias": (StableLmForCausalLM, lambda: StableLmConfig(
        **GQA, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True, partial_rotary_factor=0.5),
        ("eager", "sdpa")),
    "stablelm-sequential-defaultpartialrope": (StableLmForCausalLM, lambda: StableLmConfig(**GQA), ("eager", "sdpa")),
    "starcoder2-standardmlp-bias-sliding4": (Starcoder2ForCausalLM, lambda: Starcoder2Config(
        **GQA, sliding_window=4), ("eager", "sdpa")),
    "phi-parallel-qklayernorm-partialrope-headbias": (PhiForCausalLM, lambda: PhiConfig(
        **GQA, qk_layernorm=True, partial_rotary_factor=0.5), ("eager", "sdpa")),
    "phi3-fusedqkv-gateup-sliding5": (Phi3ForCausalLM, lambda: Phi3Config(**GQA, sliding_window=5), ("eager", "sdpa")),
    "phi3-longrope-partial": (Phi3ForCausalLM, lambda: Phi3Config(
        **dict(TINY, max_position_embeddings=64), partial_rotary_factor=0.5, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 2.5],
                         "long_factor": [3.0, 4.0, 5.0, 6.0]}), ("eager", "sdpa")),
    "gpt_neox-parallel-twonorms-interleavedqkv-rotary25": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(
        **TINY, rotary_pct=0.25, use_parallel_residual=True), ("eager", "sdpa")),
    "gpt_neox-sequential-rotary50": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(
        **TINY, rotary_pct=0.5, use_parallel_residual=False), ("eager", "sdpa")),
    "gptj-parallel-interleavedrope-rotarydim8-headbias": (GPTJForCausalLM, lambda: GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2), ("eager",)),
    # OLMo 3's default pattern (3 sliding layers, then a full one), YaRN on the full layer only
    "olmo3-sliding3then1-ropepertype-yarnfull-bias": (Olmo3ForCausalLM, lambda: Olmo3Config(
        **dict(GQA, num_hidden_layers=4), sliding_window=4, attention_bias=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 16}}), ("eager", "sdpa")),
    "ministral-slidingthenfull-headdim32": (MinistralForCausalLM, lambda: MinistralConfig(
        **GQA, head_dim=32, sliding_window=4, layer_types=SLIDING_THEN_FULL), ("eager", "sdpa")),
    "arcee-relu2-ungatedmlp-bias": (ArceeForCausalLM, lambda: ArceeConfig(
        **GQA, attention_bias=True, mlp_bias=True), ("eager", "sdpa")),
    "nemotron-layernorm1p-relu2-partialrope50-bias": (NemotronForCausalLM, lambda: NemotronConfig(
        **GQA, attention_bias=True, mlp_bias=True), ("eager", "sdpa")),
    "nemotron-fullrope-gelu-headdim32": (NemotronForCausalLM, lambda: NemotronConfig(
        **GQA, head_dim=32, hidden_act="gelu", partial_rotary_factor=1.0), ("eager", "sdpa")),
    "seed_oss-qkvbias-nooutbias-mlpbias-headdim32": (SeedOssForCausalLM, lambda: SeedOssConfig(
        **GQA, head_dim=32, attention_bias=True, attention_out_bias=False, mlp_bias=True), ("eager", "sdpa")),
    "helium-interleavedrope-fp32normweight-qkvbias": (HeliumForCausalLM, lambda: HeliumConfig(
        **GQA, head_dim=16, attention_bias=True, mlp_bias=True), ("eager", "sdpa")),
    "ernie4_5-interleavedfp32rope-allbias-headdim32": (Ernie4_5ForCausalLM, lambda: Ernie4_5Config(
        **GQA, head_dim=32, use_bias=True), ("eager", "sdpa")),
    # HunYuan: per-head q/k RMSNorms after rope, biases on q/k/v/o
    "hunyuan_v1_dense-qknormafterrope-bias-headdim32": (HunYuanDenseV1ForCausalLM, lambda: HunYuanDenseV1Config(
        **GQA, head_dim=32, attention_bias=True), ("eager", "sdpa")),
    "exaone4-sublayeroutputnorms-qknorm-ropeinslidingonly": (Exaone4ForCausalLM, lambda: Exaone4Config(
        **dict(GQA, num_hidden_layers=3), sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]), ("eager", "sdpa")),
    "exaone4-nowindow-ropeeverywhere": (Exaone4ForCausalLM, lambda: Exaone4Config(
        **GQA, sliding_window=None, layer_types=["full_attention"] * 2), ("sdpa",)),
    "glm-partialinterleavedrope50-qkvbias-fusedgateup": (GlmForCausalLM, lambda: GlmConfig(
        **GQA, head_dim=16), ("eager", "sdpa")),
    "glm4-sandwich-partialinterleavedrope25-headdim32": (Glm4ForCausalLM, lambda: Glm4Config(
        **GQA, head_dim=32, partial_rotary_factor=0.25), ("eager", "sdpa")),
    "cohere2-parallel-ropeinslidingonly-bias-logitscale": (Cohere2ForCausalLM, lambda: Cohere2Config(
        **dict(GQA, num_hidden_layers=3), sliding_window=4, attention_bias=True, logit_scale=0.125,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]), ("eager", "sdpa")),
    "cohere2-nosliding-norope": (Cohere2ForCausalLM, lambda: Cohere2Config(
        **GQA, sliding_window=4, layer_types=["full_attention"] * 2), ("sdpa",)),  # with a window, full: no rope
    "vaultgemma-prenormonly-softcaps-slidingthenfull": (VaultGemmaForCausalLM, lambda: VaultGemmaConfig(
        **GQA, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=SLIDING_THEN_FULL,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0), ("eager",)),
    # logits_scaling multiplies HyperCLOVA X's logits (ArchLM divides by its inverse)
    "hyperclovax-perilnorms-multipliers-logitsx4-bias-headdim32": (HyperCLOVAXForCausalLM, lambda: HyperCLOVAXConfig(
        **GQA, head_dim=32, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=4.0, attention_bias=True), ("eager", "sdpa")),
    "hyperclovax-nopostnorm-defaultscale": (HyperCLOVAXForCausalLM, lambda: HyperCLOVAXConfig(
        **GQA, use_post_norm=False), ("sdpa",)),
    "cwm-slidingthenfull-llama3rope-headdim32": (CwmForCausalLM, lambda: CwmConfig(
        **GQA, head_dim=32, sliding_window=4, layer_types=SLIDING_THEN_FULL), ("eager", "sdpa")),
    "jais2-layernorm-relu2-ungatedmlp-bias-headdim32": (Jais2ForCausalLM, lambda: Jais2Config(
        **GQA, head_dim=32), ("eager", "sdpa")),
    "persimmon-interleavedqkv-headqklayernorm-partialrope50-relu2-bias": (PersimmonForCausalLM, lambda: PersimmonConfig(
        **TINY), ("eager", "sdpa")),
    "persimmon-noqknorm-fullrope-gelu": (PersimmonForCausalLM, lambda: PersimmonConfig(
        **TINY, qk_layernorm=False, partial_rotary_factor=1.0, hidden_act="gelu"), ("sdpa",)),
    "youtu-mla-qlatent-interleavedrope-densemlp-tied": (YoutuForCausalLM, lambda: YoutuConfig(
        **dict(TINY, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12), ("eager", "sdpa")),
    "youtu-mla-qprojected-halvesrope-bias": (YoutuForCausalLM, lambda: YoutuConfig(
        **dict(TINY, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, rope_interleave=False, attention_bias=True, tie_word_embeddings=False), ("eager", "sdpa")),
    # MiniCPM3: latent attention with a query latent, rope on halves (LongRoPE), scale_emb on the embeddings,
    # scale_depth / sqrt(layers) on each sublayer's output, the hidden states divided by 8/3 before the tied LM head
    # (not a power of two: logits_scaling_on_hidden keeps its rounding);
    # then a projected query with YaRN (mscale_all_dim scales the scores), biases, a divisor of 1/2, untied
    "minicpm3-mla-qlatent-longrope-multipliers-divisor8thirds-tied": (MiniCPM3ForCausalLM, lambda: MiniCPM3Config(
        **dict(TINY, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, scale_emb=12, scale_depth=1.4, dim_model_base=24,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 2.5],
                         "long_factor": [3.0, 4.0, 5.0, 6.0], "original_max_position_embeddings": 16}),
        ("eager", "sdpa")),
    "minicpm3-qprojected-yarnmscale-bias-divisorhalf-untied": (MiniCPM3ForCausalLM, lambda: MiniCPM3Config(
        **dict(TINY, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, scale_emb=2.5, scale_depth=0.7, dim_model_base=128, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                         "beta_slow": 1}), ("eager", "sdpa")),
    # GPT-2's block with one key/value head for all (multi_query), then per-head fused qkv with gelu, untied
    "gpt_bigcode-multiquery-learnedpos-bias-tied": (GPTBigCodeForCausalLM, lambda: GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, multi_query=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2), ("eager", "sdpa")),
    "gpt_bigcode-mha-interleavedqkv-gelu-untied-unscaled": (GPTBigCodeForCausalLM, lambda: GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=False, scale_attn_weights=False,
        activation_function="gelu", tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ("eager", "sdpa")),
    # GPT-Neo: unscaled scores, a local (sliding 4) layer after a global one, then every layer local, tied
    "gpt_neo-unscaledscores-globalthenlocal4-outbias": (GPTNeoForCausalLM, lambda: GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64, intermediate_size=96,
        window_size=4, attention_types=[[["global", "local"], 1]], pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ("eager",)),
    "gpt_neo-alllocal5-gelu-untied": (GPTNeoForCausalLM, lambda: GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64, window_size=5,
        attention_types=[[["local"], 2]], activation_function="gelu", tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2), ("eager",)),
    # OPT: positions offset by 2, pre-norm with biases, head_dim 16 (q scaled by 1/4 before q k^T: exact in bf16);
    # then OPT-350m's post-norm without a final norm, no biases, no affine norms, untied
    "opt-offsetpositions-prenorm-relu-bias-tied": (OPTForCausalLM, lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2), ("eager", "sdpa")),
    "opt-postnorm-nobias-noaffine-gelu-untied": (OPTForCausalLM, lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        max_position_embeddings=64, do_layer_norm_before=False, enable_bias=False, layer_norm_elementwise_affine=False,
        activation_function="gelu", tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ("eager", "sdpa")),
    # Falcon 40B/180B's block (2 key/value groups, a norm per sublayer), then 7B's (one key/value head, one norm),
    # then a sequential block with one key/value head per head
    "falcon-newarch-kvgroups2-parallel-twonorms-tied": (FalconForCausalLM, lambda: FalconConfig(
        **{key: value for key, value in TINY.items() if key != "intermediate_size"}, ffn_hidden_size=96,
        new_decoder_architecture=True, num_kv_heads=2), ("eager", "sdpa")),
    "falcon-multiquery-parallel-onenorm-untied": (FalconForCausalLM, lambda: FalconConfig(
        **{key: value for key, value in TINY.items() if key != "intermediate_size"}, multi_query=True,
        parallel_attn=True, tie_word_embeddings=False), ("eager", "sdpa")),
    "falcon-sequential-mha-relu": (FalconForCausalLM, lambda: FalconConfig(
        **{key: value for key, value in TINY.items() if key != "intermediate_size"}, multi_query=False,
        parallel_attn=False, activation="relu"), ("eager", "sdpa")),
}
# mixtures of experts: the same parity, the auxiliary load-balancing loss included
EXPERTS = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02, output_router_logits=True)
MOE_CASES = {
    "mixtral-8experts-top2-sliding5": (MixtralForCausalLM, lambda: MixtralConfig(
        **GQA, num_local_experts=8, sliding_window=5, **EXPERTS), ("eager", "sdpa")),
    "qwen2_moe-shared-expert-mlponly0-qkvbias": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        **GQA, num_experts=6, moe_intermediate_size=48, shared_expert_intermediate_size=40, mlp_only_layers=[0],
        **EXPERTS), ("eager", "sdpa")),
    "qwen3_moe-qknorm-normtopk-step2": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **dict(GQA, num_hidden_layers=4), num_experts=4, moe_intermediate_size=32, decoder_sparse_step=2,
        norm_topk_prob=True, head_dim=32, **EXPERTS), ("eager", "sdpa")),
    "qwen2_moe-sliding4-firstlayer": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        **GQA, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=24, use_sliding_window=True,
        sliding_window=4, max_window_layers=1, **EXPERTS), ("eager", "sdpa")),
    "qwen3_moe-sliding4-noheaddimfield": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        **GQA, num_experts=4, moe_intermediate_size=32, use_sliding_window=True, sliding_window=4, **EXPERTS),
        ("eager", "sdpa")),
    "olmoe-fullwidthqknorm-clipqkv-top3": (OlmoeForCausalLM, lambda: OlmoeConfig(
        **dict(GQA, pad_token_id=0), num_experts=5, clip_qkv=0.5, **dict(EXPERTS, num_experts_per_tok=3)),
        ("eager", "sdpa")),
    "flex_olmo-sublayeroutputnorms-fullwidthqknorm-top3": (FlexOlmoForCausalLM, lambda: FlexOlmoConfig(
        **GQA, num_experts=5, **dict(EXPERTS, num_experts_per_tok=3)), ("eager", "sdpa")),
    "granitemoe-multipliers-top2": (GraniteMoeForCausalLM, lambda: GraniteMoeConfig(
        **GQA, num_local_experts=4, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
        logits_scaling=4.0, **EXPERTS), ("eager", "sdpa")),
    "granitemoeshared-ungatedsharedmlp-bias-top3": (GraniteMoeSharedForCausalLM, lambda: GraniteMoeSharedConfig(
        **GQA, num_local_experts=5, shared_intermediate_size=40, attention_bias=True, residual_multiplier=0.7,
        **dict(EXPERTS, num_experts_per_tok=3)), ("eager", "sdpa")),
    "granitemoeshared-default-noshared": (GraniteMoeSharedForCausalLM, lambda: GraniteMoeSharedConfig(
        **GQA, num_local_experts=4, **EXPERTS), ("sdpa",)),  # shared_intermediate_size=0: no shared MLP
    # Granite-MoE-SWA: the default pattern (full, then 3 sliding) with sinks, a shared MLP and the multipliers; then
    # no shared MLP, a NoPE layer between sliding ones
    "granitemoe_swa-sinks-fullthen3sliding-sharedmlp-multipliers-top3": (GraniteMoeSWAForCausalLM, lambda: GraniteMoeSWAConfig(
        **dict(GQA, num_hidden_layers=4), num_local_experts=5, shared_intermediate_size=40, sliding_window=4,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
        attention_bias=True, **dict(EXPERTS, num_experts_per_tok=3)), ("eager",)),
    "granitemoe_swa-noshared-nopelayer-allsliding": (GraniteMoeSWAForCausalLM, lambda: GraniteMoeSWAConfig(
        **dict(GQA, num_hidden_layers=3), num_local_experts=4, sliding_window=5, layer_types=["sliding_attention"] * 3,
        layer_rope_theta=[10000.0, 0, 10000.0], **EXPERTS), ("eager",)),
    # DeepSeek-V3's mixture: sigmoid router + bias, top-3 within 2 of 4 groups, weights x 2.5, an ungated shared
    # expert of 2 x the experts' width, the first layer dense, the last one sliding (it has no load-balancing loss)
    "dots1-sigmoid-biased-groups-scaled-sharedx2-densefirst-sliding": (Dots1ForCausalLM, lambda: Dots1Config(
        **dict(GQA, num_hidden_layers=3), n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=2,
        n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, sliding_window=4, max_window_layers=2, output_router_logits=True),
        ("eager", "sdpa")),
    # and on multi-head latent attention: a query latent, DeepSeek's interleaved rope; then a projected query with
    # YaRN (mscale_all_dim scales the scores), attention biases
    "deepseek_v3-mla-qlatent-interleavedrope-groups-densefirst": (DeepseekV3ForCausalLM, lambda: DeepseekV3Config(
        **dict(TINY, num_hidden_layers=3, num_key_value_heads=4), n_routed_experts=8, moe_intermediate_size=16,
        n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12), ("eager", "sdpa")),
    "deepseek_v3-mla-qprojected-yarn-mscale-bias": (DeepseekV3ForCausalLM, lambda: DeepseekV3Config(
        **dict(TINY, num_key_value_heads=4), n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=2,
        n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0, norm_topk_prob=False, kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_interleave=False, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                         "beta_slow": 1}), ("eager", "sdpa")),
    # DeepSeek-V2: a softmax router, unnormalised top-3 x 2.5 within the 2 of 4 groups whose best score is highest
    # (its group_limited_greedy: group_scoring="max"), latent attention with a query latent, the first layer dense;
    # then greedy routing (n_group ignored), a projected query with YaRN (mscale_all_dim scales the scores), biases
    "deepseek_v2-mla-qlatent-grouplimitedgreedy-maxgroups-scaled-densefirst": (DeepseekV2ForCausalLM, lambda: DeepseekV2Config(
        **dict(TINY, num_hidden_layers=3, num_key_value_heads=4), n_routed_experts=8, moe_intermediate_size=16,
        n_shared_experts=2, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12), ("eager", "sdpa")),
    "deepseek_v2-mla-qprojected-greedy-yarn-mscale-bias": (DeepseekV2ForCausalLM, lambda: DeepseekV2Config(
        **dict(TINY, num_key_value_heads=4), n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
        topk_method="greedy", n_group=2, topk_group=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                         "beta_slow": 1}), ("eager", "sdpa")),
    # HunYuan-MoE: its q/k norms after rope, every layer a renormalised top-3 of 5 plus an ungated shared MLP as wide
    # as each expert, q/k/v/o biases
    "hunyuan_v1_moe-qknormafterrope-sharedmlp-top3-bias-headdim16": (HunYuanMoEV1ForCausalLM, lambda: HunYuanMoEV1Config(
        **GQA, head_dim=16, num_experts=5, moe_topk=3, attention_bias=True), ("eager", "sdpa")),
    # ERNIE 4.5 MoE: its fixed routing bias (random here) in the choice of a float32 softmax router's top-3 of 6, an
    # ungated shared expert 2 experts wide, layers 1-2 of 4 sparse, head_dim 32, tied; then every 2nd layer sparse
    # from the first, no shared expert, untied
    "ernie4_5_moe-fixedroutingbias-sharedx2-layers1to2-top3-headdim32": (Ernie4_5_MoeForCausalLM, lambda: Ernie4_5_MoeConfig(
        **dict(GQA, num_hidden_layers=4), head_dim=32, moe_num_experts=6, moe_k=3, moe_intermediate_size=16,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=2, router_aux_loss_coef=0.02,
        output_router_logits=True), ("eager", "sdpa")),
    "ernie4_5_moe-every2ndlayer-noshared-untied": (Ernie4_5_MoeForCausalLM, lambda: Ernie4_5_MoeConfig(
        **dict(GQA, num_hidden_layers=4), moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
        moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_interval=2, tie_word_embeddings=False,
        router_aux_loss_coef=0.02, output_router_logits=True), ("eager", "sdpa")),
    "glm4_moe-sigmoid-biased-rotary50-qkvbias-qknorm-2densefirst": (Glm4MoeForCausalLM, lambda: Glm4MoeConfig(
        **dict(GQA, num_hidden_layers=3), n_routed_experts=6, moe_intermediate_size=16, n_shared_experts=1,
        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=2, routed_scaling_factor=1.5,
        attention_bias=True, use_qk_norm=True), ("eager", "sdpa")),
    # gpt-oss: a biased router, biased experts with the clamped GLU (at 0.5, so that it clamps at this size: every
    # layer has clamped gates and ups), sinks, biased attention, sliding and full layers alternating, YaRN; then
    # swiglu_alpha 1 (silu), full attention only, no attention bias, tied embeddings
    "gpt_oss-routerbias-clampedglu-sinks-alternating4-yarn": (GptOssForCausalLM, lambda: GptOssConfig(
        **dict(GQA, num_hidden_layers=4), head_dim=16, num_local_experts=4, swiglu_limit=0.5, sliding_window=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
        **EXPERTS), ("eager",)),
    "gpt_oss-silu-fullonly-nobias-tied-top3": (GptOssForCausalLM, lambda: GptOssConfig(
        **dict(GQA, tie_word_embeddings=True), num_local_experts=5, swiglu_alpha=1.0, swiglu_limit=1.0,
        sliding_window=8, layer_types=["full_attention"] * 2, attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **dict(EXPERTS, num_experts_per_tok=3)), ("eager",)),
    # GLM-4.7-Flash: latent attention (a query latent, interleaved rope, YaRN), a dense layer between sparse ones
    "glm4_moe_lite-mla-denseinmiddle-sigmoid-groups-scaled-interleavedrope": (Glm4MoeLiteForCausalLM, lambda: Glm4MoeLiteConfig(
        **dict(TINY, num_hidden_layers=3, num_key_value_heads=4), n_routed_experts=8, moe_intermediate_size=16,
        n_shared_experts=2, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
        mlp_layer_types=["sparse", "dense", "sparse"], kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                         "beta_slow": 1}), ("eager", "sdpa")),
    "glm4_moe_lite-qprojected-halvesrope-bias-unnormalised": (Glm4MoeLiteForCausalLM, lambda: Glm4MoeLiteConfig(
        **dict(TINY, num_key_value_heads=4), n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
        num_experts_per_tok=2, norm_topk_prob=False, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, rope_interleave=False, attention_bias=True), ("eager", "sdpa")),
    # Solar Open: every layer sparse, q/k/v biases, GQA, an explicit head_dim
    "solar_open-allsparse-sigmoid-groups-qkvbias-headdim32": (SolarOpenForCausalLM, lambda: SolarOpenConfig(
        **{key: value for key, value in GQA.items() if key != "intermediate_size"}, head_dim=32, n_routed_experts=8,
        moe_intermediate_size=16, n_shared_experts=2, n_group=2, topk_group=1, num_experts_per_tok=2,
        routed_scaling_factor=1.5, attention_bias=True), ("eager", "sdpa")),
    "glm4_moe-unnormalised-fullrotary-noqknorm": (Glm4MoeForCausalLM, lambda: Glm4MoeConfig(
        **dict(GQA, num_hidden_layers=2), n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=0, norm_topk_prob=False, partial_rotary_factor=1.0),
        ("eager", "sdpa")),
    # EXAONE MoE: rope in the sliding layers only (full, sliding, full: the full ones without rope), a dense layer
    # between sparse ones, DeepSeek-V3's router with groups, a shared expert 2 experts wide, YaRN; then every layer
    # sliding (rope everywhere), every layer sparse, unnormalised top-k
    "exaone_moe-ropeinslidingonly-denseinmiddle-sigmoid-groups-sharedx2-yarn": (ExaoneMoeForCausalLM, lambda: ExaoneMoeConfig(
        **dict(GQA, num_hidden_layers=3), num_experts=8, moe_intermediate_size=16, num_shared_experts=2, n_group=4,
        topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5, mlp_layer_types=["sparse", "dense", "sparse"],
        sliding_window=4, layer_types=["full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16}), ("eager", "sdpa")),
    "exaone_moe-allsliding5-allsparse-unnormalised-mha": (ExaoneMoeForCausalLM, lambda: ExaoneMoeConfig(
        **TINY, num_key_value_heads=4, num_experts=4, moe_intermediate_size=16, num_shared_experts=1,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_layer_types=["sparse"] * 2, sliding_window=5,
        layer_types=["sliding_attention"] * 2), ("eager", "sdpa")),
    # Mellum: sliding and full layers with a rope dict each (YaRN on the full one), a dense layer first, q/k/v/o
    # biases, head_dim 32, top-3 of 5; then full layers only with the default dicts, every layer sparse, a linear
    # rope on the sliding type no layer has
    "mellum-slidingthenfull-ropepertype-yarnfull-densefirst-bias-headdim32-top3": (MellumForCausalLM, lambda: MellumConfig(
        **GQA, head_dim=32, num_experts=5, moe_intermediate_size=32, mlp_layer_types=["dense", "sparse"],
        sliding_window=4, layer_types=SLIDING_THEN_FULL, attention_bias=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 16}},
        **dict(EXPERTS, num_experts_per_tok=3)), ("eager", "sdpa")),
    "mellum-fullonly-allsparse-unnormalised-headdim16": (MellumForCausalLM, lambda: MellumConfig(
        **GQA, head_dim=16, num_experts=4, moe_intermediate_size=32, norm_topk_prob=False,
        rope_parameters={"sliding_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}, **EXPERTS),
        ("eager", "sdpa")),
}
FAMILY_CASES.update(MOE_CASES)
PARAMETERS = [(case, implementation) for case, (_, _, implementations) in FAMILY_CASES.items()
              for implementation in implementations]


def build(case: str, attn_implementation: str):
    model_class, make_config, _ = FAMILY_CASES[case]
    torch.manual_seed(0)
    model = randomised(model_class._from_config(make_config(), attn_implementation=attn_implementation))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # routing biases that change the choice
                buffer.normal_(0.0, 0.1)
    return model


def test_every_registered_family_has_a_parity_case():
    covered = {model_class for model_class, *_ in [*CASES.values(), *FAMILY_CASES.values()]}
    assert set(FAMILIES) <= covered, sorted(cls.__name__ for cls in set(FAMILIES) - covered)


# Families whose pad positions (left padding: every key they may see is a pad) attend differently, though no real
# token reads them; only their loss, where the last pad position predicts the first real token, compares apart:
# - GPT-Neo adds its causal mask (a where with float32's min) to the padding mask: a pad query attends evenly to the
#   pads before it (min + min = -inf beyond them), ArchLM's (and most families') to every key alike
PAD_ROWS_APART = ("gpt_neo-",)


@pytest.mark.parametrize("left_padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("case, attn_implementation", PARAMETERS)
def test_family_converts_with_equal_logits_and_loss(case, attn_implementation, left_padding):
    reference = build(case, attn_implementation)
    ours = from_transformers(reference)
    assert ours.config._attn_implementation == attn_implementation
    inputs = batch(left_padding)
    if left_padding and case.startswith(PAD_ROWS_APART):
        # the first real token's label is predicted from the last pad position's logits: left out
        first_real = inputs["attention_mask"].argmax(-1)
        inputs["labels"] = inputs["labels"].scatter(1, first_real[:, None], -100)
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
    real_tokens = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    PARITY_ERRORS[f"{case}-{attn_implementation}-{'leftpad' if left_padding else 'nopad'}"] = max_relative_error(
        actual.logits[real_tokens], expected.logits[real_tokens])
    torch.testing.assert_close(actual.logits[real_tokens], expected.logits[real_tokens], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-4, atol=1e-5)  # with experts: + coef * aux
    if expected.get("aux_loss") is not None:
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
        assert len(actual.router_logits) == len(expected.router_logits)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_exports_back_to_its_class_with_equal_logits_and_config(case):
    attn_implementation = FAMILY_CASES[case][2][0]
    reference = build(case, attn_implementation)
    ours = from_transformers(reference)
    native = to_transformers(ours)
    assert type(native) is type(reference)
    family = FAMILIES[type(reference)]
    for native_field in family.fields.values():
        expected = getattr(reference.config, native_field)
        if expected is not None:  # None: the native default (GPT-J's n_inner = 4 x hidden), exported as its value
            assert getattr(native.config, native_field) == expected, native_field
    inputs = batch(left_padding=True)
    with torch.no_grad():
        expected, exported = reference(**inputs), native(**inputs)
    real_tokens = inputs["attention_mask"].bool()
    PARITY_ERRORS[f"export-{case}"] = max_relative_error(exported.logits[real_tokens], expected.logits[real_tokens])
    torch.testing.assert_close(exported.logits[real_tokens], expected.logits[real_tokens], rtol=1e-4, atol=1e-5)


# the preset named after a family is that family's architecture: it exports to the family's class
PRESET_FAMILIES = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "pythia": "GPTNeoXForCausalLM", "phi2": "PhiForCausalLM", "gptj": "GPTJForCausalLM", "cohere": "CohereForCausalLM",
    "stablelm": "StableLmForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "granite": "GraniteForCausalLM",
    "smollm3": "SmolLM3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "dots1": "Dots1ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
}


@pytest.mark.parametrize("preset", list(PRESET_FAMILIES))
def test_a_family_preset_exports_to_its_family_with_equal_logits(preset):
    config = ArchLMConfig.from_preset(preset, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                      num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    ours = randomised(ArchLMForCausalLM(config))
    native = to_transformers(ours)
    assert type(native).__name__ == PRESET_FAMILIES[preset]
    inputs = batch(left_padding=True)
    real_tokens = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected, exported = ours(**inputs).logits[real_tokens], native(**inputs).logits[real_tokens]
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)


def test_every_preset_but_the_hybrid_is_a_family():
    assert set(ArchLMConfig.presets()) - set(PRESET_FAMILIES) == {"hybrid"}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_mixture_of_experts_generates_the_same_greedy_tokens(case):
    reference = build(case, MOE_CASES[case][2][-1])
    ours = from_transformers(reference)
    inputs = batch(left_padding=True)
    prompt = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    # transformers' own MoE models fail to generate with router logits on (their aux loss takes the whole mask)
    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_router_logits=False)
    assert torch.equal(ours.generate(**prompt, **generate), reference.generate(**prompt, **generate))


def test_generate_runs_with_router_logits_on_and_the_aux_loss_sees_only_the_routed_tokens():
    """With output_router_logits=True in the config, each cached step's aux loss takes the mask of its own tokens."""
    torch.manual_seed(0)
    ours = from_transformers(build("mixtral-8experts-top2-sliding5", "sdpa"))
    inputs = batch(left_padding=True)
    prompt = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    with_logits = ours.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    without = ours.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, output_router_logits=False)
    assert torch.equal(with_logits, without)


def test_an_exported_mixture_of_experts_generates_although_it_trained_with_router_logits():
    """train.py trains a mixture of experts with output_router_logits=True; transformers' MoE classes fail to
    generate with it on, so the export leaves it off (the import keeps what the native config says)."""
    config = ArchLMConfig.from_preset("mixtral", hidden_size=32, num_attention_heads=4, intermediate_size=32,
                                      num_hidden_layers=2, vocab_size=VOCAB, num_experts=4, output_router_logits=True)
    torch.manual_seed(0)
    native = to_transformers(randomised(ArchLMForCausalLM(config)))
    assert native.config.output_router_logits is False
    native.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert from_transformers(build("mixtral-8experts-top2-sliding5", "sdpa")).config.output_router_logits is True


# The families whose bf16 rounding ArchLM does not follow, with the largest logit difference allowed:
# - GPT-J (eager only) computes its attention scores in float32; ArchLM's attention functions take them in the
#   activations' dtype (0.016 at this size)
# - gpt-oss with swiglu_alpha 1 computes x * sigmoid(x) in two roundings, ArchLM's silu (torch's) in one (0.02 here;
#   its released swiglu_alpha 1.702 is quick_gelu's very formula, and bit-identical)
# - Falcon with one key/value head in its original block (7B) hands sdpa keys of one head for every query head, where
#   ArchLM repeats them: torch's kernel rounds the two calls apart (0.016 here; not pinned down further). Its
#   grouped-query block (40B, 180B) is bit-identical
# - HunYuan-MoE builds its router in float32, which a model loaded in bf16 keeps (its logits and top-k weights
#   float32: the import follows that, bit-identical in the loaded test below); cast with .to() as here, it rounds
#   them in bf16 (0.023 at this size)
# - GPT-Neo casts q and k to float32 for its (unscaled) scores and softmax, as GPT-J does (0.04 at this size)
BF16_ROUNDS_APART = {"gptj-parallel-interleavedrope-rotarydim8-headbias": 2 ** -5,
                     "gpt_oss-silu-fullonly-nobias-tied-top3": 2 ** -5,
                     "gpt_neo-unscaledscores-globalthenlocal4-outbias": 2 ** -4, "gpt_neo-alllocal5-gelu-untied": 2 ** -4,
                     "falcon-multiquery-parallel-onenorm-untied": 2 ** -5,
                     "hunyuan_v1_moe-qknormafterrope-sharedmlp-top3-bias-headdim16": 2 ** -5}
# every family, the five original ones (test_convert.CASES) too, each with sdpa where its class has it
BF16_CASES = {**{case: partial(build_reference, case) for case in CASES},
              **{case: partial(build, case, implementations[-1]) for case, (_, _, implementations) in FAMILY_CASES.items()}}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_families_are_bit_identical_in_bfloat16(case):
    """In bf16 every rounding counts, and families round differently where the function is the same: Mixtral,
    dots.llm1, GLM-4.5 and DeepSeek-V3 mix their experts' outputs with float32 weights where Qwen-MoE and OLMoE cast
    them first (router_weights_fp32); OLMo, OLMo 2 and DeepSeek-V2 rotate q and k in float32 and Cohere with rounded
    tables (rope_precision); OLMo 2 applies RMSNorm's weight before rounding (norm_weight_fp32); NeoX, GPT-J and Phi
    add the two sublayers of a parallel block before the residual, StableLM and Cohere after it
    (parallel_residual_order); Granite-MoE's top-k weights are the softmax of the k largest logits, not the
    renormalised top-k of the softmax (router_topk_softmax); gpt-oss puts its sinks in the softmax where GraniteSWA
    scales the output (attention_sinks_in_softmax); DeepSeek-V2 computes its softmax router's logits in float32
    (router_logits_fp32). The import keeps each family's choice, so logits and
    greedy tokens are identical, the one-token decoding path included (BF16_ROUNDS_APART: within a bound, for the
    reasons given there)."""
    reference = BF16_CASES[case]().to(torch.bfloat16).eval()
    converted = from_transformers(reference).to(torch.bfloat16).eval()
    if case in MOE_CASES:
        weights_fp32 = ("mixtral", "dots1", "glm4_moe", "deepseek_v3", "solar_open", "exaone_moe", "deepseek_v2",
                        "hunyuan_v1_moe")
        assert converted.config.router_weights_fp32 == case.startswith(weights_fp32)
    inputs = batch(left_padding=False)
    with torch.no_grad():
        actual, expected = converted(input_ids=inputs["input_ids"]).logits, reference(input_ids=inputs["input_ids"]).logits
        if case in BF16_ROUNDS_APART:
            torch.testing.assert_close(actual, expected, rtol=0, atol=BF16_ROUNDS_APART[case])
            return
        assert torch.equal(actual, expected)
        prompt = inputs["input_ids"][:1, :6]
        generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(converted.generate(prompt, **generate), reference.generate(prompt, **generate))



@pytest.mark.parametrize("case", ["dots1-sigmoid-biased-groups-scaled-sharedx2-densefirst-sliding", "llama-llama3rope-gqa",
                                  "hunyuan_v1_moe-qknormafterrope-sharedmlp-top3-bias-headdim16"])
def test_a_model_loaded_in_bfloat16_converts_both_ways_keeping_its_float32_tensors(case, tmp_path):
    """transformers loads a bf16 checkpoint with its rope frequencies and routing biases in float32 (a model cast
    with .to has them in bf16): the import and the export keep each tensor's dtype, and the logits stay identical."""
    BF16_CASES[case]().save_pretrained(tmp_path)
    native = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = from_transformers(native)
    back = to_transformers(ours)
    kept = ("inv_freq", "e_score_correction_bias")
    for model in (native, ours, back):
        assert model.dtype == torch.bfloat16
        assert {buffer.dtype for name, buffer in model.named_buffers() if name.endswith(kept)} == {torch.float32}
    ids = batch(left_padding=False)["input_ids"]
    with torch.no_grad():
        expected = native(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids).logits, expected) and torch.equal(back(input_ids=ids).logits, expected)


def test_hunyuan_ntk_alpha_rope_imports_as_the_base_it_stretches_and_exports_as_that_default_rope():
    """HunYuan's checkpoints say rope "dynamic" with an alpha, which its class computes as a fixed base
    theta * alpha ** (hd / (hd - 2)): a default rope with that base, the same logits both ways."""
    torch.manual_seed(0)
    reference = randomised(HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(
        **GQA, head_dim=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                                             "factor": 1.0})))
    ours = from_transformers(reference)
    assert ours.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0 * 1000.0 ** (16 / 14)}
    native = to_transformers(ours)
    inputs = batch(left_padding=True)
    real_tokens = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**inputs).logits[real_tokens]
        torch.testing.assert_close(ours(**inputs).logits[real_tokens], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(native(**inputs).logits[real_tokens], expected, rtol=1e-4, atol=1e-5)


def test_hunyuan_moe_takes_a_per_layer_top_k_only_when_every_layer_has_the_same():
    same = HunYuanMoEV1Config(**GQA, head_dim=16, num_experts=4, moe_topk=[2, 2])
    assert from_transformers(randomised(HunYuanMoEV1ForCausalLM(same))).config.num_experts_per_tok == 2
    with pytest.raises(ValueError, match=r"`moe_topk`=\[2, 3\] differs between layers"):
        from_transformers(HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**GQA, head_dim=16, num_experts=4,
                                                                     moe_topk=[2, 3])))


@pytest.mark.parametrize("overrides, fragments", [
    (dict(mlp_bias=True), ["`mlp_bias`=True", "routed experts"]),
    (dict(topk_method="noaux_tc"), ["`topk_method`='noaux_tc'", "'group_limited_greedy'"]),
])
def test_deepseek_v2_settings_arch_lm_cannot_compute_are_refused_naming_them(overrides, fragments):
    native = DeepseekV2ForCausalLM(DeepseekV2Config(
        **dict(TINY, num_key_value_heads=4), n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, **overrides))
    with pytest.raises(ValueError) as refused:
        from_transformers(native)
    for fragment in fragments:
        assert fragment in str(refused.value), fragment


@pytest.mark.parametrize("overrides, fragments", [
    (dict(use_bias=True), ["`use_bias`=True", "routed experts"]),
    (dict(moe_norm_min=1e-6), ["`moe_norm_min`=1e-06", "1e-12"]),
])
def test_ernie4_5_moe_settings_arch_lm_cannot_compute_are_refused_naming_them(overrides, fragments):
    native = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**GQA, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                                        **overrides))
    with pytest.raises(ValueError) as refused:
        from_transformers(native)
    for fragment in fragments:
        assert fragment in str(refused.value), fragment


def test_ernie4_5_moe_exports_only_sparse_layers_of_one_run():
    """ERNIE 4.5 MoE's sparse layers are every moe_layer_interval-th of one range: a dense layer between two sparse
    ones has no equivalent there."""
    ernie = FAMILIES[Ernie4_5_MoeForCausalLM]
    config = dict(GQA, num_hidden_layers=4, num_experts=4, moe_intermediate_size=16, router_choice_bias=True,
                  rope_interleaved=True)
    assert any("one run" in line for line in ernie.mismatches(ArchLMConfig(**config, mlp_only_layers=[1])))
    assert not ernie.mismatches(ArchLMConfig(**config, mlp_only_layers=[0, 3]))


def test_an_export_refusal_names_the_fields_a_user_sets_not_internal_facets():
    """Dots1 keeps its dense layers first and sizes its shared expert in whole experts: a config that breaks both
    is refused naming mlp_only_layers and shared_expert_intermediate_size (every facet has such a description)."""
    from archlm.family_spec import FACET_MEANINGS, _facets

    config = ArchLMConfig.from_preset("dots1", num_hidden_layers=3, mlp_only_layers=[2], hidden_size=64, head_dim=16,
                                      num_attention_heads=4, num_experts=8, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, vocab_size=VOCAB)
    assert set(FACET_MEANINGS) == set(_facets(config))
    with pytest.raises(ValueError) as refused:
        to_transformers(ArchLMForCausalLM(config))
    message = str(refused.value)
    assert "nearest is Dots1ForCausalLM" in message and "_dense" not in message and "shared_expert_whole" not in message
    assert "dense layers before every sparse one (mlp_only_layers" in message
    assert "shared_expert_intermediate_size a multiple of moe_intermediate_size" in message
