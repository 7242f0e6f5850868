"""ArchLM attention on tiny CPU models: the layouts (GQA, MQA, explicit head_dim), windows, padding and masks,
eager == sdpa == flex, multi-head latent attention's cache and latent-space decoding, attention sinks."""

import pytest
import torch
from conftest import TINY, VALIDATION_ERRORS, tiny_config
from test_modeling import ATTENTION, POSITIONS, VOCAB, build, generate_position_ids, left_padded_batch, logits_of, random_ids

from archlm import ArchLMForCausalLM
from archlm.modeling_archlm import attend, check_attention_implementation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_are_the_probabilities_under_eager_and_empty_under_sdpa(attn):
    """As transformers' models: eager returns each layer's (B, nh, T, S) attention probabilities, causal and
    summing to 1 over the keys; sdpa computes none and returns an empty tuple (not a tuple of None)."""
    config = tiny_config(num_key_value_heads=2)
    model = build(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():
        attentions = model(input_ids=random_ids(2, 6), output_attentions=True).attentions
    if attn == "sdpa":
        assert attentions == ()
        return
    assert len(attentions) == config.num_hidden_layers
    for probs in attentions:
        assert probs.shape == (2, config.num_attention_heads, 6, 6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, config.num_attention_heads, 6))
        assert torch.all(probs.triu(diagonal=1) == 0)


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("heads", [
    pytest.param(dict(num_key_value_heads=2), id="gqa"),
    pytest.param(dict(num_key_value_heads=1), id="mqa"),
    pytest.param(dict(head_dim=12), id="head_dim12"),
    pytest.param(dict(num_attention_heads=6, num_key_value_heads=2, head_dim=4), id="6heads-gqa-head_dim4"),
])
def test_gqa_mqa_and_explicit_head_dim_give_eager_equal_sdpa(position, heads):
    model = build(tiny_config(**heads, **POSITIONS[position])).eval()
    attention = model.model.layers[0].self_attn
    heads_q = model.config.num_attention_heads
    assert attention.k_proj.weight.shape[0] == model.config.num_key_value_heads * model.config.head_dim
    assert attention.q_proj.weight.shape[0] == heads_q * model.config.head_dim
    input_ids, attention_mask, position_ids = left_padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    real = attention_mask.bool()
    torch.testing.assert_close(logits_of(model, "eager", **inputs)[real], logits_of(model, "sdpa", **inputs)[real],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
@pytest.mark.parametrize("attn_implementation", ATTENTION)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window_token_beyond_the_window_does_not_influence_output(position, attn_implementation, num_layers):
    window, length = 3, 12
    model = build(tiny_config(sliding_window=window, num_hidden_layers=num_layers, **POSITIONS[position])).eval()
    input_ids = random_ids(1, length)
    perturbed = input_ids.clone()
    perturbed[0, 0] = (input_ids[0, 0] + 1 - 3) % (VOCAB - 3) + 3
    original, changed = (logits_of(model, attn_implementation, input_ids=ids)[0] for ids in (input_ids, perturbed))
    # each layer looks back window - 1 tokens, so token 0 reaches positions 0 .. num_layers * (window - 1)
    reach = num_layers * (window - 1)
    torch.testing.assert_close(changed[reach + 1:], original[reach + 1:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[reach], original[reach], atol=1e-6), "the furthest position in reach should change"


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_without_sliding_window_the_first_token_influences_the_last(attn_implementation):
    model = build(tiny_config()).eval()
    input_ids = random_ids(1, 12)
    perturbed = input_ids.clone()
    perturbed[0, 0] = 3 if input_ids[0, 0] != 3 else 4
    original, changed = (logits_of(model, attn_implementation, input_ids=ids)[0] for ids in (input_ids, perturbed))
    assert not torch.allclose(changed[-1], original[-1], atol=1e-6)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_left_padded_batch_gives_the_same_logits_as_each_prompt_alone(position, attn_implementation):
    model = build(tiny_config(**POSITIONS[position])).eval()
    prompts = [random_ids(1, 5, seed=2)[0], random_ids(1, 8, seed=3)[0]]
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = prompt
        attention_mask[row, length - len(prompt):] = 1
    batched = logits_of(model, attn_implementation, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=generate_position_ids(attention_mask))
    for row, prompt in enumerate(prompts):
        alone = logits_of(model, attn_implementation, input_ids=prompt[None])[0]
        torch.testing.assert_close(batched[row, length - len(prompt):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_fully_masked_row_gives_finite_logits(position, attn_implementation, dtype):
    model = build(tiny_config(**POSITIONS[position])).eval().to(dtype)
    input_ids = random_ids(2, 6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0] = 0
    logits = logits_of(model, attn_implementation, input_ids=input_ids, attention_mask=attention_mask)
    assert torch.isfinite(logits).all()




@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_flex_attention_matches_eager_at_inference(position):
    """flex_attention through transformers' interface (block masks; ALiBi as its score_mod bias). torch has no flex
    backward on CPU, so this checks the forward."""
    torch.manual_seed(0)
    # head_dim 32: torch's CPU flex kernel is wrong for head_dim 8 and 16 without AVX512 (refused, tested below)
    model = ArchLMForCausalLM(tiny_config(position_embedding_type=position, num_key_value_heads=2, head_dim=32)).eval()
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("flex_attention")
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_flex_attention_with_a_head_dim_the_cpu_kernel_gets_wrong_is_refused_or_right():
    """Without AVX512 torch's CPU flex kernel is wrong for head_dim 8 and 16: refused there; with AVX512 it runs
    and equals eager."""
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(head_dim=8)).eval()
    ids = torch.randint(3, 64, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation("flex_attention")
        if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        else:
            with pytest.raises(ValueError, match="head_dim=8"):
                model(ids)


def test_latent_attention_caches_the_latent_and_one_rotary_key_not_the_expanded_heads():
    """Multi-head latent attention's memory saving is its cache: per token and layer kv_lora_rank + head_dim numbers
    (16 + 8 here), where the 4 heads' expanded keys and values would take 4 x (16 + 8) + 4 x 12. Decoding from that
    cache gives the full forward's logits."""
    config = tiny_config(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=16, v_head_dim=12, head_dim=8)
    model = build(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], past_key_values=prefix.past_key_values, use_cache=True)
    for layer in step.past_key_values.layers:
        assert layer.keys.shape == (2, 1, 7, 16) and layer.values.shape == (2, 1, 7, 8)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert "-MLA16q12" in config.architecture_name and "kv latent 16, q latent 12" in config.summary()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_latent_attention_decodes_in_the_latent_space_without_expanding_the_cache(attn_implementation):
    """Decoding and short chunks attend to the cached latents directly (kv_b_proj absorbed into the query and the
    output: it runs on no cached token), with the full forward's logits, left padding and a two-token chunk
    included; a long chunk, whose expansion is cheaper (12 queries: 12 x (2 x 16 + 8) > 16 x (16 + 12) a key and
    head), expands as the prefill does."""
    config = tiny_config(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=16, v_head_dim=12, head_dim=8,
                         num_key_value_heads=4, pad_token_id=0)
    model = build(config).eval()
    model.set_attn_implementation(attn_implementation)
    expanded_rows = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda module, args, output: expanded_rows.append(args[0].shape[-2]))
    ids = random_ids(2, 14)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first row left-padded
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).past_key_values
        expanded_rows.clear()
        one = model(ids[:, 8:9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True).logits
        two = model(ids[:, 9:11], attention_mask=mask[:, :11], past_key_values=cache, use_cache=True).logits
        last = model(ids[:, 11:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        assert expanded_rows == []  # nothing expanded: 1, 2 and 3 queries scored against the latents
    torch.testing.assert_close(torch.cat((one, two, last), dim=1), full[:, 8:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cache = model(ids[:, :2], attention_mask=mask[:, :2], use_cache=True).past_key_values
        expanded_rows.clear()
        chunk = model(ids[:, 2:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert expanded_rows == [14] * config.num_hidden_layers  # each layer expanded its 14 cached latents
    torch.testing.assert_close(chunk[:, 1:], full[:, 3:], rtol=1e-5, atol=1e-5)  # (position 2: padding in row 0)
    with torch.no_grad():  # attention weights as the implementation gives them in the prefill: eager's, or none
        step = model(ids[:, 13:], attention_mask=torch.cat((mask, mask[:, -1:]), dim=1), past_key_values=cache,
                     output_attentions=True)
    if attn_implementation == "eager":
        assert step.attentions[0].shape == (2, 4, 1, 15) and torch.allclose(step.attentions[0].sum(-1), torch.ones(2, 4, 1))
    else:
        assert all(weights is None for weights in step.attentions or ())


@pytest.mark.parametrize("form", ["eager-output-scaled", "eager-in-softmax", "sdpa-sink-key"])
def test_attention_sinks_are_one_more_logit_per_head_in_the_softmax(form):
    """gpt-oss's form, in float64: each head's scores get one more column, its sink, before the softmax, which is
    dropped after it. Eager computes it as GraniteSWA does (the output scaled by sigmoid(logsumexp - sink)) or as
    gpt-oss does (attention_sinks_in_softmax); sdpa with the sink as one more key (zero value, its score the sink
    through an extra channel). With GQA and a padding mask."""
    torch.manual_seed(0)
    model = build(tiny_config(attention_sinks=True, num_key_value_heads=2)).double().eval()
    assert model.config._attn_implementation == "sdpa"  # by default, as without sinks
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.sinks.copy_(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64))
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 5, attention.head_dim
    query, key, value = (torch.randn(batch, h, length, head_dim, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    mask = torch.zeros(batch, 1, length, length, dtype=torch.float64)
    mask[0, :, :, 0] = torch.finfo(torch.float64).min  # the first key padded out
    implementation, _, rounding = form.partition("-")
    model.set_attn_implementation(implementation)
    output, _ = attend(attention, query, key, value, mask, sinks=attention.sinks,
                       sinks_in_softmax=rounding == "in-softmax")
    expected = torch.empty(batch, length, heads, head_dim, dtype=torch.float64)
    for h in range(heads):
        scores = query[:, h] @ key[:, h // 2].transpose(-1, -2) * attention.scaling + mask[:, 0]  # (B, T, S)
        with_sink = torch.cat([scores, attention.sinks[h].expand(batch, length, 1)], dim=-1)
        probs = torch.softmax(with_sink, dim=-1)[..., :-1]
        expected[:, :, h] = probs @ value[:, h // 2]
    torch.testing.assert_close(output, expected.detach())
    with pytest.raises(ValueError, match=r"attention_sinks.*attn_implementation='flash_attention_2'.*'eager' or 'sdpa'"):
        check_attention_implementation(model.config, "flash_attention_2")
    with pytest.raises(VALIDATION_ERRORS, match="attention_sinks.*multi-head latent attention"):
        tiny_config(attention_sinks=True, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)


@pytest.mark.parametrize("queries", [1, 5])
def test_attention_sinks_under_sdpa_without_a_mask_read_the_keys_as_sdpa_does(queries):
    """Without a mask sdpa is causal with the queries the first keys (is_causal), or one query sees every key: a
    static cache's prefill (8 keys, 5 of them the prompt, the rest empty) gets no mask from transformers. Sinks
    read it as the last keys (the prompt attended to the empty slots: greedy tokens of gpt-oss-like models
    changed). Sinks of -inf are no sinks: plain sdpa's output."""
    model = build(tiny_config(attention_sinks=True, num_key_value_heads=2)).eval()
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.sinks.fill_(-1e4)
    query, key, value = torch.randn(1, 4, queries, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    output, _ = attend(attention, query, key, value, None, sinks=attention.sinks)
    plain, _ = attend(attention, query, key, value, None)
    torch.testing.assert_close(output, plain, rtol=1e-5, atol=1e-6)


def test_attention_sinks_generate_alike_from_a_static_and_a_dynamic_cache_without_padding():
    model = build(tiny_config(attention_sinks=True, num_key_value_heads=2)).eval()
    ids = random_ids(1, 11)
    runs = [model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           **kwargs) for kwargs in ({}, {"cache_implementation": "static"})]
    torch.testing.assert_close(torch.stack(runs[1].logits), torch.stack(runs[0].logits), rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("scope", ["head", "per_head", "full"])
def test_qk_norm_after_rope_normalises_the_rotated_query_and_key(scope, monkeypatch):
    """qk_norm_position="after_rope" (HunYuan): the attention scores the q/k norms of the rotated q and k, per head
    or over the full width as the scope says, not the rotation of the normalised ones."""
    from archlm import modeling_archlm

    model = build(tiny_config(qk_norm=True, qk_norm_scope=scope, qk_norm_position="after_rope", norm_position="pre"))
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for norm in (attention.q_norm, attention.k_norm):
            norm.weight.normal_(1.0, 0.3)
    seen = []
    monkeypatch.setattr(modeling_archlm, "attend", lambda module, query, key, *args, **kwargs: (
        seen.append((query, key)) or attend(module, query, key, *args, **kwargs)))
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.model.rotary_emb(hidden, torch.arange(5)[None])
        heads = [projection(hidden).view(2, 5, -1, attention.head_dim).transpose(1, 2)  # (B, heads, T, hd)
                 for projection in (attention.q_proj, attention.k_proj)]
        rotated = modeling_archlm.apply_rotary_pos_emb(*heads, cos, sin)
        expected = []
        for norm, states in zip((attention.q_norm, attention.k_norm), rotated):
            states = states.transpose(1, 2)  # (B, T, heads, hd)
            normed = norm(states.flatten(-2)).view_as(states) if scope == "full" else norm(states)
            expected.append(normed.transpose(1, 2))
    torch.testing.assert_close(seen[0][0], expected[0])
    torch.testing.assert_close(seen[0][1], expected[1])
