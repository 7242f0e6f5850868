"""generate() with the KV cache: exact for every position type, every cache, every decoding strategy."""

import pytest
import torch
from conftest import tiny_config
from transformers import ContinuousBatchingConfig, DynamicCache, GenerationConfig, pipeline

from archlm import ArchLMForCausalLM
from archlm.check import generate_position_ids
from archlm.tokenization_archlm import train_tokenizer

# (position_embedding_type, learned_position_embeddings, num_key_value_heads): every position type, with MHA,
# GQA and MQA rotated through them
POSITION_CASES = [
    ("rope", False, 4),
    ("rope", True, 2),
    ("alibi", False, 2),
    ("alibi", True, 1),
    ("learned", False, 1),
    ("sinusoidal", False, 2),
    ("none", False, 4),
]
POSITION_IDS = [f"{pos}{'+learned' if learned else ''}-kv{kv}" for pos, learned, kv in POSITION_CASES]


def make_model(seed: int = 0, **overrides) -> ArchLMForCausalLM:
    torch.manual_seed(seed)
    return ArchLMForCausalLM(tiny_config(**overrides)).eval()


def position_model(case, **overrides):
    position, learned, kv_heads = case
    return make_model(position_embedding_type=position, learned_position_embeddings=learned,
                      num_key_value_heads=kv_heads, **overrides)


def greedy(model, ids, mask=None, new_tokens=6, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **kwargs)


def prompts(lengths=(9, 5), vocab=64, seed=1):
    """Left-padded batch of prompts with the given lengths (ids avoid the pad id 0)."""
    generator = torch.Generator(torch.get_default_device()).manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, longest - length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, longest - length:] = 1
    return ids, mask


@pytest.mark.parametrize("case", POSITION_CASES, ids=POSITION_IDS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(case):
    model = position_model(case)
    ids, mask = prompts()
    batched = greedy(model, ids, mask)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = greedy(model, ids[row:row + 1, real])
        assert torch.equal(batched[row, -6:], alone[0, -6:]), f"row {row} differs when left-padded"


@pytest.mark.parametrize("case", POSITION_CASES, ids=POSITION_IDS)
def test_step_by_step_decoding_with_cache_equals_one_full_forward(case):
    model = position_model(case)
    ids, _ = prompts(lengths=(12,))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        for position in range(5, ids.shape[1]):
            steps.append(model(ids[:, position:position + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", POSITION_CASES, ids=POSITION_IDS)
def test_padded_step_by_step_decoding_equals_full_forward_of_the_padded_batch(case):
    """The positions come from the attention mask, also when decoding token by token."""
    model = position_model(case)
    ids, mask = prompts(lengths=(10, 6))
    position_ids = generate_position_ids(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :7], attention_mask=mask[:, :7], position_ids=position_ids[:, :7],
                       past_key_values=cache).logits]
        for t in range(7, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=position_ids[:, t:t + 1],
                               past_key_values=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", POSITION_CASES, ids=POSITION_IDS)
def test_static_cache_generates_the_same_tokens_and_logits_as_dynamic(case):
    model = position_model(case)
    ids, mask = prompts()
    kwargs = dict(output_logits=True, return_dict_in_generate=True)
    dynamic = greedy(model, ids, mask, **kwargs)
    static = greedy(model, ids, mask, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_sliding_window_generation_past_the_window_matches_no_cache(cache_implementation, position):
    """A sliding-window cache keeps only the window; its generations equal recomputing everything without a cache."""
    model = make_model(sliding_window=4, position_embedding_type=position, num_key_value_heads=2)
    ids, mask = prompts(lengths=(7, 5))
    kwargs = dict(output_logits=True, return_dict_in_generate=True)
    cached = greedy(model, ids, mask, new_tokens=8, cache_implementation=cache_implementation, **kwargs)
    uncached = greedy(model, ids, mask, new_tokens=8, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)


def test_sliding_window_dynamic_cache_holds_only_the_window():
    model = make_model(sliding_window=4)
    ids, _ = prompts(lengths=(10,))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[-2] <= 4 + 1


@pytest.mark.parametrize("case", POSITION_CASES[:3], ids=POSITION_IDS[:3])
def test_beam_search_is_identical_with_and_without_cache(case):
    model = position_model(case)
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3)],
                         ids=["temperature", "top_k", "top_p"])
def test_sampling_with_a_fixed_seed_is_identical_with_and_without_cache(sampling):
    model = make_model(num_key_value_heads=2)
    ids, mask = prompts()
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0,
                                      use_cache=use_cache, **sampling))
    assert torch.equal(*outputs)


def test_sampling_depends_on_the_seed():
    """Guards the test above: sampling really samples (two seeds give different continuations)."""
    model = make_model()
    ids, mask = prompts()
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, pad_token_id=0,
                                      temperature=2.0))
    assert not torch.equal(*outputs)


def test_max_new_tokens_and_stopping_on_eos():
    model = make_model()
    ids, _ = prompts(lengths=(6,))
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert free.shape[1] == 6 + 10
    generated = free[0, 6:].tolist()
    # make the third distinct generated token the end-of-sequence token: generation must stop right after it
    stop_token = next(token for index, token in enumerate(generated) if index >= 2 and token not in generated[:index])
    stop_index = generated.index(stop_token)
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop_token, pad_token_id=0)
    assert stopped[0, 6:].tolist() == generated[:stop_index + 1]


def test_logits_to_keep_returns_the_last_positions_of_the_full_logits():
    model = make_model()
    ids, _ = prompts(lengths=(8,))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        last_three = model(ids, logits_to_keep=3).logits
    assert last.shape[1] == 1 and last_three.shape[1] == 3
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(last_three, full[:, -3:])


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16},
], ids=["dynamic", "linear", "yarn"])
def test_generating_past_max_position_embeddings_with_rope_scaling_stays_finite(rope_parameters):
    model = make_model(max_position_embeddings=16, rope_parameters=rope_parameters)
    ids, _ = prompts(lengths=(10,))
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 40
    assert torch.isfinite(torch.stack(out.logits)).all()


@pytest.mark.parametrize("position", [dict(position_embedding_type="learned"),
                                      dict(position_embedding_type="rope", learned_position_embeddings=True)])
def test_generating_past_learned_positions_stops_at_the_last_one_and_a_longer_prompt_is_refused(position, caplog):
    """Learned positions end at max_position_embeddings: generation stops there, as at max_length, keeping what it
    generated (it failed at that step: transformers serve, asking for 1024 new tokens, answered a 500 after
    generating them all); a prompt longer than that is refused naming the field."""
    model = make_model(**position, max_position_embeddings=16)
    ids, _ = prompts(lengths=(10,))
    with caplog.at_level("WARNING"):
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16) and torch.equal(out[:, :10], ids)
    assert "Generation stops at max_position_embeddings=16 tokens" in caplog.text
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.cat([ids, ids], dim=1), max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("overrides", [{}, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)],
                         ids=["dense", "moe"])
def test_torch_compile_with_a_static_cache_generates_what_eager_generates(overrides):
    """fullgraph=True, as generate compiles a static cache's decoding step: nothing may break the graph (the experts'
    per-expert loop of a float32 mixture runs inside an opaque custom op)."""
    model = make_model(num_key_value_heads=2, **overrides)
    ids, mask = prompts()
    expected = greedy(model, ids, mask, new_tokens=4, cache_implementation="static")
    torch._dynamo.reset()
    compiled_forward = torch.compile(model.forward, dynamic=False, fullgraph=True)
    original_forward, model.forward = model.forward, compiled_forward
    try:
        got = greedy(model, ids, mask, new_tokens=4, cache_implementation="static")
    finally:
        model.forward = original_forward
    assert torch.equal(got, expected)


def test_text_generation_pipeline_generates_text():
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 50, "print('hello world')\n" * 50], vocab_size=300)
    model = make_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator("def add(", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("def add(")
    assert len(tokenizer(result[0]["generated_text"])["input_ids"]) > len(tokenizer("def add(")["input_ids"])


# ------------------------------------------------------------------------------------------------
# continuous batching (generate_batch): paged attention
# ------------------------------------------------------------------------------------------------
def batch_generation_config(new_tokens=5):
    # eos disabled: continuous batching has no min_new_tokens to hold it back, so both sides run the full length
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=-1)


def generate_batch_tokens(model, token_lists):
    # a small paged cache: by default transformers gives it 60% of the machine's memory on a CPU (14 GB here), which
    # is also what a second test process running beside this one would need
    small_cache = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)
    outputs = model.generate_batch(token_lists, generation_config=batch_generation_config(), warmup=False,
                                   continuous_batching_config=small_cache, progress_bar=False)
    return [outputs[key].generated_tokens for key in sorted(outputs, key=lambda key: int(key.split("_")[-1]))]


@pytest.mark.parametrize("case", [case for case in POSITION_CASES if case[0] != "alibi"],
                         ids=[name for case, name in zip(POSITION_CASES, POSITION_IDS) if case[0] != "alibi"])
def test_generate_batch_gives_what_generate_gives(case):
    """transformers' continuous batching (paged attention, one packed row of several requests) must give each
    prompt what generate gives it alone: positions restart per request, the cache is paged, not concatenated."""
    model = position_model(case)
    token_lists = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
    expected = [model.generate(torch.tensor([tokens]), generation_config=batch_generation_config())[0, len(tokens):]
                .tolist() for tokens in token_lists]
    assert generate_batch_tokens(model, token_lists) == expected


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_alibi_under_continuous_batching_is_refused_before_generating(attn):
    """Paged attention reads the keys from its own cache, where ALiBi's bias cannot follow: refused up front, not
    silently generated without positions (eager) or failed inside the batching thread (sdpa)."""
    model = make_model(position_embedding_type="alibi", attn_implementation=attn)
    with pytest.raises(ValueError, match="(?i)alibi.*paged"):
        generate_batch_tokens(model, [[5, 6, 7]])
    model.config._attn_implementation = f"paged|{attn}"
    with pytest.raises(ValueError, match="(?i)alibi.*paged"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_longrope_generation_recomputes_the_cache_when_it_crosses_to_the_long_factors():
    """longrope rotates every position by its short factors up to original_max_position_embeddings (16 here) and by
    its long ones past it: the step that crosses recomputes the keys cached with the short factors (as transformers'
    Phi-3 does), so cached greedy decoding from a 10-token prompt to 22 tokens scores as decoding without a cache."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
            "long_factor": [3.0, 5.0, 7.0, 9.0], "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(rope_parameters=rope, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # large weights: the two rotations give clearly different scores
            parameter.normal_(0.0, 0.3)
    prompt = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    generate = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached, uncached = model.generate(prompt, **generate), model.generate(prompt, use_cache=False, **generate)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-5, atol=1e-5)
