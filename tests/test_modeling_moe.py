"""The sparse mixture-of-experts block: routing equal to a token-by-token reference (a batch, and the one token of
a decoding step), the auxiliary and z-losses, active parameters and FLOPs, and bad settings refused."""

import pytest
import torch
from conftest import VALIDATION_ERRORS, tiny_config
from test_modeling import build, left_padded_batch

from archlm import ArchLMConfig, ArchLMForCausalLM



# ------------------------------------------------------------------------------------------------
# mixture of experts
# ------------------------------------------------------------------------------------------------
def reference_moe(block, hidden_states):
    """The sparse block written token by token: softmax (or sigmoid) scores, top-k (within the best groups),
    (renormalise), x the scale, sum of the chosen experts' MLPs, + the shared expert (gated or not)."""
    experts = block.experts
    outputs = []
    for token in hidden_states.reshape(-1, hidden_states.shape[-1]):
        logits = block.gate(token).float()
        probabilities = torch.sigmoid(logits) if block.sigmoid else torch.softmax(logits, dim=-1)
        # a routing bias (DeepSeek-V3) enters the choice of the experts, not their weights
        for_choice = probabilities + getattr(block, "e_score_correction_bias", 0.0)
        if block.n_group > 1:  # the experts of the topk_group groups whose two best scores sum highest (or best one)
            groups = for_choice.view(block.n_group, -1)
            group_scores = groups.max(-1).values if block.group_scoring == "max" else groups.topk(2).values.sum(-1)
            best = set(group_scores.topk(block.topk_group).indices.tolist())
            for_choice = torch.cat([group if g in best else torch.full_like(group, -torch.inf)
                                    for g, group in enumerate(groups)])
        chosen = for_choice.topk(block.top_k).indices
        weights = probabilities[chosen]
        if block.norm_topk_prob:
            weights = weights / weights.sum()
        weights = weights * block.scale
        total = torch.zeros_like(token)
        for weight, expert in zip(weights, chosen):
            if experts.gated:
                projected = experts.gate_up_proj[expert] @ token
                if hasattr(experts, "gate_up_proj_bias"):
                    projected = projected + experts.gate_up_proj_bias[expert]
                gate, up = projected.chunk(2)
                if experts.limit is not None:  # gpt-oss: the gate clamped above, up both ways and offset by one
                    gate, up = torch.clamp(gate, max=experts.limit), torch.clamp(up, -experts.limit, experts.limit) + 1
                inner = experts.act_fn(gate) * up
            else:
                inner = experts.up_proj[expert] @ token
                if hasattr(experts, "up_proj_bias"):
                    inner = inner + experts.up_proj_bias[expert]
                inner = experts.act_fn(inner)
            out = experts.down_proj[expert] @ inner
            if hasattr(experts, "down_proj_bias"):
                out = out + experts.down_proj_bias[expert]
            total = total + weight.to(token.dtype) * out
        if hasattr(block, "shared_expert_gate"):
            total = total + torch.sigmoid(block.shared_expert_gate(token)) * block.shared_expert(token)
        elif hasattr(block, "shared_expert"):
            total = total + block.shared_expert(token)
        outputs.append(total)
    return torch.stack(outputs).view(hidden_states.shape)


# gpt-oss's mixture: a router with a bias, biased experts whose GLU clamps (at 0.3: most gates and ups of these
# weights reach it). (Its router_topk_softmax rounds the weights apart from the reference's float32 softmax.)
GPT_OSS_MIXTURE = dict(num_experts=4, num_experts_per_tok=2, router_bias=True, mlp_bias=True, hidden_act="quick_gelu",
                       swiglu_limit=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-grouped-mm", "fp64-per-expert"])
@pytest.mark.parametrize("overrides", [
    dict(num_experts=4, num_experts_per_tok=2),
    dict(num_experts=5, num_experts_per_tok=3, norm_topk_prob=False, shared_expert_intermediate_size=12),
    dict(num_experts=4, num_experts_per_tok=1, mlp_type="standard", hidden_act="gelu", mlp_bias=True),
    dict(num_experts=3, num_experts_per_tok=2, mlp_bias=True),
    dict(num_experts=6, num_experts_per_tok=2, router_bias_update_rate=1e-3),
    dict(num_experts=8, num_experts_per_tok=3, router_scoring="sigmoid", n_group=4, topk_group=2,
         routed_scaling_factor=2.5, shared_expert_intermediate_size=12, shared_expert_gated=False),
    dict(num_experts=5, num_experts_per_tok=3, router_topk_softmax=True),
    GPT_OSS_MIXTURE,
    # ERNIE 4.5's fixed routing bias on softmax scores
    dict(num_experts=5, num_experts_per_tok=2, router_choice_bias=True, shared_expert_intermediate_size=12,
         shared_expert_gated=False),
    # DeepSeek-V2's group_limited_greedy: softmax scores, groups by their best score, unnormalised and scaled
    dict(num_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, group_scoring="max", norm_topk_prob=False,
         routed_scaling_factor=2.5, shared_expert_intermediate_size=12, shared_expert_gated=False,
         router_logits_fp32=True),
], ids=["top2", "top3-unnormalised-shared", "top1-standard-bias", "gated-bias", "top2-routing-bias",
        "sigmoid-groups-scaled-ungatedshared", "top3-softmax-of-topk-logits", "gpt-oss-biased-router-clamped-glu",
        "softmax-fixed-routing-bias-ungatedshared", "softmax-maxgroups-unnormalised-scaled-ungatedshared"])
@pytest.mark.parametrize("shape", [(2, 7), (1, 1)], ids=["batch", "decoding-one-token"])
def test_sparse_block_equals_routing_token_by_token(overrides, dtype, shape):
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(moe_intermediate_size=32, **overrides)).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    block = model.model.layers[0].mlp
    hidden_states = torch.randn(*shape, 32, dtype=dtype)
    with torch.no_grad():
        if hasattr(block, "e_score_correction_bias"):  # large enough to change which experts are chosen
            unbiased = block.choose(block.gate(hidden_states.reshape(-1, 32)))[1]
            block.e_score_correction_bias.copy_(torch.linspace(0.3, -0.3, overrides["num_experts"]))
            assert not torch.equal(block.choose(block.gate(hidden_states.reshape(-1, 32)))[1], unbiased) or shape == (1, 1)
        output, router_logits = block(hidden_states)
        expected = reference_moe(block, hidden_states)
    assert router_logits.shape == (shape[0] * shape[1], overrides["num_experts"])
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(num_experts=6, num_experts_per_tok=3),
                                       dict(num_experts=4, num_experts_per_tok=2, mlp_type="standard", mlp_bias=True),
                                       dict(num_experts=8, num_experts_per_tok=2, router_scoring="sigmoid", n_group=2,
                                            topk_group=1, routed_scaling_factor=2.0, norm_topk_prob=False,
                                            shared_expert_intermediate_size=8, shared_expert_gated=False),
                                       GPT_OSS_MIXTURE],
                         ids=["gated-top3", "standard-bias-top2", "sigmoid-groups-scaled-ungatedshared",
                              "gpt-oss-biased-router-clamped-glu"])
def test_sparse_block_gradients_equal_routing_token_by_token(overrides):
    """The backward of the grouped path (gather, grouped matmuls, the permutation back, the sum over k): gradients of
    the input, the router and every expert tensor equal the token-by-token reference's, in float64."""
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(moe_intermediate_size=16, **overrides)).double()
    block = model.model.layers[0].mlp
    parameters = list(block.parameters())
    hidden_states = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 7, 32, dtype=torch.float64)
    grads = torch.autograd.grad(block(hidden_states)[0], [hidden_states, *parameters], upstream)
    expected = torch.autograd.grad(reference_moe(block, hidden_states), [hidden_states, *parameters], upstream)
    for name, grad, reference in zip(["input", *(name for name, _ in block.named_parameters())], grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("implementation", ["grouped", "gathered", "gathered_compiled"])
@pytest.mark.parametrize("overrides", [dict(num_experts=6, num_experts_per_tok=3),
                                       dict(num_experts=4, num_experts_per_tok=1, mlp_type="standard", mlp_bias=True),
                                       dict(num_experts=3, num_experts_per_tok=2, mlp_bias=True), GPT_OSS_MIXTURE],
                         ids=["gated-top3", "standard-bias-top1", "gated-bias-top2", "gpt-oss-biased-router-clamped-glu"])
def test_each_experts_implementation_computes_the_reference_and_its_gradients(overrides, implementation):
    """forward picks the implementation by device and size (a CPU runs `grouped` and `one_token`, an accelerator
    decodes with `gathered`, and so does a compiled decoding step on a CPU), so each is checked here on its own, at
    any size, and `gathered` compiled too: values and float64 gradients."""
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(moe_intermediate_size=16, **overrides)).double()
    block = model.model.layers[0].mlp
    parameters = list(block.experts.parameters())
    hidden_states = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(14, 32, dtype=torch.float64)
    flat = hidden_states.reshape(14, 32)
    top_k_weights, top_k_index = block.choose(block.gate(flat))
    name, _, compiled = implementation.partition("_")
    method = getattr(block.experts, name)
    if compiled:  # inductor fuses the gathered path into its own loops on a CPU
        torch._dynamo.reset()
        method = torch.compile(method, fullgraph=True, dynamic=False)
    output = method(flat, top_k_index, top_k_weights.to(flat.dtype))
    expected = reference_moe(block, hidden_states).reshape(14, 32)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(output, [hidden_states, *parameters], upstream)
    expected_grads = torch.autograd.grad(expected, [hidden_states, *parameters], upstream)
    for name, grad, reference in zip(["input", *(name for name, _ in block.experts.named_parameters())], grads,
                                     expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12, msg=name)


def test_moe_loss_is_cross_entropy_plus_the_weighted_aux_and_z_losses():
    config = tiny_config(num_experts=4, moe_intermediate_size=32, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = build(config).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=input_ids)
    plain = model(**inputs)
    assert plain.aux_loss is None and plain.router_logits is None  # off unless asked for
    routed = model(**inputs, output_router_logits=True)
    assert len(routed.router_logits) == config.num_hidden_layers
    real = attention_mask.reshape(-1).bool()
    z_loss = torch.stack([torch.logsumexp(logits, -1)[real] ** 2 for logits in routed.router_logits]).mean()
    torch.testing.assert_close(routed.loss, plain.loss + 0.1 * routed.aux_loss + 0.01 * z_loss)
    assert routed.aux_loss >= config.num_experts_per_tok * 0.99  # num_experts_per_tok when perfectly balanced


SIGMOID_ROUTER = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, router_scoring="sigmoid",
                      n_group=4, topk_group=2, router_aux_loss_coef=0.1)


def test_sigmoid_routers_balance_by_deepseek_v3s_sequence_wise_loss_on_the_experts_they_ran():
    """For each sequence and sparse layer, sum_i f_i P_i: f_i = E / (k T) x the tokens the block sent to expert i
    (its routing bias and group limit included), P_i the mean of expert i's normalised sigmoid score over the
    sequence's real tokens; the mean over sequences and layers, added to the loss with router_aux_loss_coef."""
    model = build(tiny_config(**SIGMOID_ROUTER)).eval()
    blocks = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        blocks[1].e_score_correction_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0.5]))  # pulls tokens to expert 7
    input_ids, attention_mask, position_ids = left_padded_batch(length=10, pad=3)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=input_ids)
    routed = model(**inputs, output_router_logits=True)
    expected = []
    for logits, block in zip(routed.router_logits, blocks):
        for row, mask in zip(logits.view(2, 10, 8), attention_mask.bool()):
            row = row[mask]  # the sequence's real tokens
            chosen = block.choose(row)[1]  # what the block ran
            f = torch.bincount(chosen.reshape(-1), minlength=8).float() * 8 / (2 * len(row))
            scores = torch.sigmoid(row)
            expected.append((f * (scores / scores.sum(-1, keepdim=True)).mean(0)).sum())
    assert blocks[1].choose(routed.router_logits[1])[1].eq(7).any(dim=-1).all()  # every token went to expert 7
    torch.testing.assert_close(routed.aux_loss, torch.stack(expected).mean())
    torch.testing.assert_close(routed.loss, model(**inputs).loss + 0.1 * routed.aux_loss)
    with torch.no_grad():  # routers that score every expert alike: balanced, whichever k each token takes
        for block in blocks:
            block.gate.weight.zero_()
            block.e_score_correction_bias.zero_()
    torch.testing.assert_close(model(**inputs, output_router_logits=True).aux_loss, torch.tensor(1.0))


def test_moe_counts_active_parameters_and_flops_of_the_routed_experts_only():
    config = tiny_config(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0])
    model = build(config)
    expert_params = 8 * 3 * 32 * 16  # one sparse layer: 8 gated experts of width 16
    assert model.inactive_parameters() == expert_params * 6 // 8
    assert config.num_parameters_estimate() == model.num_parameters()
    assert config.num_parameters_estimate(active_only=True) == model.num_parameters() - expert_params * 6 // 8
    dense = build(tiny_config(num_experts=None))
    extra = model.flops_per_token(16, training=False) - dense.flops_per_token(16, training=False)
    assert extra == pytest.approx(2 * (32 * 8 + expert_params * 2 / 8 - 3 * 32 * 64))  # router + 2 experts - dense MLP
    assert "-MoE8x2" in config.architecture_name and "active per token" in config.summary()


def test_routing_bias_moves_by_the_rate_toward_the_mean_load_and_is_saved(tmp_path):
    """DeepSeek-V3's update: down by the rate for an expert above the mean load, up below it, unchanged at it. The
    bias is saved, and stays float32 in a model loaded in bfloat16 (its steps would round away)."""
    config = tiny_config(num_experts=4, moe_intermediate_size=16, router_bias_update_rate=0.01)
    assert "+RouterBias" in config.architecture_name and "bias update rate 0.01" in config.summary()
    model = build(config)
    block = model.model.layers[1].mlp
    assert block.e_score_correction_bias.tolist() == [0.0] * 4  # initialised to zero
    block.update_routing_bias(torch.tensor([10, 0, 5, 5]))
    block.update_routing_bias(torch.tensor([10, 2, 9, 3]))  # mean 6
    torch.testing.assert_close(block.e_score_correction_bias, torch.tensor([-0.02, 0.02, -0.01, 0.01]))
    model.save_pretrained(tmp_path)
    loaded = ArchLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).model.layers[1].mlp
    assert loaded.gate.weight.dtype == torch.bfloat16 and loaded.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(loaded.e_score_correction_bias, block.e_score_correction_bias)
    assert not hasattr(build(tiny_config(num_experts=4)).model.layers[1].mlp, "e_score_correction_bias")


@pytest.mark.parametrize("overrides, fragments", [
    (dict(num_experts=2, num_experts_per_tok=3), ["num_experts_per_tok", "3", "num_experts", "2"]),
    (dict(num_experts=4, router_bias_update_rate=-1e-3), ["router_bias_update_rate", "-0.001"]),
    (dict(num_experts=0), ["num_experts", "0"]),
    (dict(num_experts=4, mlp_only_layers=[2]), ["mlp_only_layers", "[2]"]),
    (dict(num_experts=4, mlp_only_layers=[0, 1]), ["no layer is sparse"]),
    (dict(num_experts=4, router_aux_loss_coef=-0.1), ["router_aux_loss_coef", "-0.1"]),
    (dict(num_experts=4, shared_expert_intermediate_size=0), ["shared_expert_intermediate_size", "0"]),
    # in a dense config too: a typo there, and wrong once experts are turned on
    (dict(router_aux_loss_coef=-1), ["router_aux_loss_coef", "-1"]),
    (dict(decoder_sparse_step=0), ["decoder_sparse_step", "0"]),
    (dict(moe_intermediate_size=-3), ["moe_intermediate_size", "-3"]),
    (dict(shared_expert_intermediate_size=12), ["shared_expert_intermediate_size", "dense", "num_experts"]),
    (dict(router_bias_update_rate=0.01), ["router_bias_update_rate", "dense", "num_experts"]),
    (dict(num_experts=6, num_local_experts=4), ["num_experts`=6", "num_local_experts`=4", "disagree"]),
    # DeepSeek-V3's routing
    (dict(num_experts=4, router_scoring="tanh"), ["router_scoring", "tanh", "sigmoid"]),
    (dict(num_experts=4, routed_scaling_factor=0), ["routed_scaling_factor", "0"]),
    (dict(num_experts=6, n_group=4), ["n_group`=4", "6 experts", "equal groups"]),
    (dict(num_experts=8, n_group=8), ["n_group`=8", "at least 2"]),
    (dict(num_experts=8, n_group=4, topk_group=5), ["topk_group`=5", "topk_group <= n_group"]),
    (dict(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), ["num_experts_per_tok", "topk_group=1"]),
    (dict(num_experts=4, shared_expert_gated=False), ["shared_expert_gated", "shared_expert_intermediate_size"]),
    (dict(router_scoring="sigmoid"), ["router_scoring", "dense", "num_experts"]),
    (dict(n_group=0), ["n_group", "0"]),
    (dict(num_experts=4, router_topk_softmax=True, norm_topk_prob=False), ["router_topk_softmax", "norm_topk_prob=False"]),
    (dict(num_experts=4, router_topk_softmax=True, router_scoring="sigmoid"), ["router_topk_softmax", "'sigmoid'"]),
    (dict(router_topk_softmax=True), ["router_topk_softmax", "dense", "num_experts"]),
    (dict(router_bias=True), ["router_bias", "dense", "num_experts"]),
    (dict(num_experts=8, group_scoring="max"), ["group_scoring", "'max'", "n_group=1"]),
    (dict(num_experts=8, n_group=4, group_scoring="mean"), ["group_scoring", "mean"]),
    (dict(group_scoring="max"), ["group_scoring", "dense", "num_experts"]),
    (dict(router_logits_fp32=True), ["router_logits_fp32", "dense", "num_experts"]),
    (dict(router_choice_bias=True), ["router_choice_bias", "dense", "num_experts"]),
    (dict(num_experts=4, router_choice_bias=True, router_scoring="sigmoid"),
     ["router_choice_bias", "'sigmoid'", "drop it"]),
    (dict(num_experts=4, router_choice_bias=True, router_bias_update_rate=1e-3), ["router_choice_bias", "0.001"]),
])
def test_bad_mixture_of_experts_settings_are_refused_naming_the_field(overrides, fragments):
    with pytest.raises(VALIDATION_ERRORS) as error:
        tiny_config(**overrides)
    for fragment in fragments:
        assert fragment in str(error.value), fragment


def test_mixtral_name_for_the_expert_count_is_accepted():
    assert tiny_config(num_local_experts=4).num_experts == 4
    assert ArchLMConfig.from_preset("mixtral", num_local_experts=4).num_experts == 4  # the preset has 8
    with pytest.raises(ValueError, match="`num_experts`=6 and `num_local_experts`=4"):
        ArchLMConfig.from_preset("mixtral", num_local_experts=4, num_experts=6)


def test_groups_scored_by_their_best_expert_take_one_expert_each_and_are_named():
    """DeepSeek-V2's group_limited_greedy scores a group by its best expert alone: a group may hold a single expert
    (DeepSeek-V3's sum of the two best needs two), and the name and summary say which scoring routes."""
    config = tiny_config(num_experts=8, num_experts_per_tok=2, n_group=8, topk_group=4, group_scoring="max")
    assert "-MoE8x2+Group8top4max" in config.architecture_name
    assert "within 4 of 8 groups (by its best expert's score" in config.summary()
    with pytest.raises(VALIDATION_ERRORS, match="group_scoring='top2_sum' scores a group by its two best"):
        tiny_config(num_experts=8, num_experts_per_tok=2, n_group=8, topk_group=4)


def test_a_sigmoid_router_keeps_its_bias_at_rate_zero_computes_in_float32_and_exports_to_dots1(tmp_path):
    """DeepSeek-V3's router: its routing bias exists (and is saved) without a rate, its logits are float32 in a
    bfloat16 model, and the model exports to dots.llm1's class; a gated shared expert has no native family there."""
    overrides = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, router_scoring="sigmoid",
                     n_group=2, topk_group=1, shared_expert_intermediate_size=32, qk_norm=True)
    config = tiny_config(**overrides, shared_expert_gated=False)
    assert "-MoE8x2+SharedUngated+Sigmoid+Group2top1" in config.architecture_name
    assert "top-2 by sigmoid within 1 of 2 groups" in config.summary() and "(ungated)" in config.summary()
    model = build(config)
    block = model.model.layers[1].mlp
    assert not hasattr(block, "shared_expert_gate") and block.e_score_correction_bias.tolist() == [0.0] * 8
    with torch.no_grad():
        block.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    model.save_pretrained(tmp_path)
    loaded = ArchLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded.model.layers[1].mlp.e_score_correction_bias, block.e_score_correction_bias)
    assert loaded.model.layers[1].mlp.gate(torch.ones(1, 32, dtype=torch.bfloat16)).dtype == torch.float32
    from archlm.convert import to_transformers

    native = to_transformers(model.eval())
    assert type(native).__name__ == "Dots1ForCausalLM" and native.config.n_shared_experts == 2
    ids = torch.randint(3, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    gated = tiny_config(**overrides)
    with pytest.raises(ValueError, match=r"nearest is Dots1ForCausalLM.*\n.*`shared_expert_gated`=True"):
        to_transformers(build(gated))
