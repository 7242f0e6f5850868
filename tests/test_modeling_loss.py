"""The fused (chunked) LM-head cross-entropy of training forwards against the plain loss: values and gradients,
the output z-loss, shifted labels, no-grad and bfloat16, kept logits, and LoRA-wrapped heads."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, VALIDATION_ERRORS, tiny_config
from test_modeling import build

import archlm

VOCAB = TINY["vocab_size"]


# ------------------------------------------------------------------------------------------------
# The fused (chunked) LM-head cross-entropy of training forwards
# ------------------------------------------------------------------------------------------------
def loss_and_grads_with(model, skip_logits, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs, skip_logits=skip_logits)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_loss_chunks(monkeypatch):
    """Chunks of 5 tokens at the tiny vocabulary: many chunks and a ragged last one."""
    monkeypatch.setattr(archlm.modeling_archlm, "LOSS_CHUNK_BYTES", 5 * VOCAB * 4)
    monkeypatch.setattr(archlm.modeling_archlm, "LOSS_MIN_CHUNK_TOKENS", 1)


@pytest.mark.parametrize("overrides", [
    dict(),  # tied head
    dict(tie_word_embeddings=False, lm_head_bias=True),
    dict(final_logit_softcapping=3.0, logits_scaling=2.5),  # Gemma 2's cap over Granite's scaling
    dict(num_experts=4, moe_intermediate_size=32, output_router_logits=True, router_z_loss_coef=0.01),
    dict(z_loss_coef=0.1, tie_word_embeddings=False, lm_head_bias=True, logits_scaling=2.5),
], ids=["tied", "untied-bias", "softcap-scaling", "moe-aux", "z-loss"])
@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_fused_loss_equals_the_plain_loss_and_gradients(small_loss_chunks, overrides, num_items_in_batch):
    torch.manual_seed(0)
    model = build(tiny_config(**overrides)).train()
    input_ids = torch.randint(3, VOCAB, (3, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100
    inputs = dict(input_ids=input_ids, labels=labels)
    if num_items_in_batch is not None:  # as the Trainer passes it: a tensor, the loss a sum over it
        inputs["num_items_in_batch"] = torch.tensor(num_items_in_batch)
    plain, plain_grads = loss_and_grads_with(model, False, **inputs)
    fused, fused_grads = loss_and_grads_with(model, None, **inputs)  # the default in training
    assert plain.logits is not None and fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_z_loss_adds_the_mean_squared_logsumexp_in_training_only():
    torch.manual_seed(0)
    model = build(tiny_config(z_loss_coef=0.1))
    plain = build(tiny_config())
    plain.load_state_dict(model.state_dict())
    input_ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        model.train(), plain.train()
        logits = plain(input_ids, skip_logits=False).logits[:, :-1]
        expected = torch.logsumexp(logits.float(), dim=-1).square().mean() * 0.1
        cross_entropy = plain(input_ids, labels=input_ids).loss
        torch.testing.assert_close(model(input_ids, labels=input_ids).loss, cross_entropy + expected)
        model.eval(), plain.eval()  # evaluation reports the cross-entropy alone
        torch.testing.assert_close(model(input_ids, labels=input_ids).loss, plain(input_ids, labels=input_ids).loss)
    with pytest.raises(VALIDATION_ERRORS, match="`z_loss_coef` must be a finite number >= 0"):
        tiny_config(z_loss_coef=-1e-4)


def test_fused_loss_shift_labels_and_no_grad_and_bfloat16(small_loss_chunks):
    torch.manual_seed(0)
    model = build(tiny_config()).train()
    input_ids = torch.randint(3, VOCAB, (2, 9))
    shift_labels = torch.randint(3, VOCAB, (2, 9))  # context parallelism passes the labels already shifted
    plain = model(input_ids, labels=input_ids, shift_labels=shift_labels, skip_logits=False)
    fused = model(input_ids, labels=input_ids, shift_labels=shift_labels)
    torch.testing.assert_close(fused.loss, plain.loss)
    with torch.no_grad():  # a loss-only forward in train mode: no gradients kept, same loss
        torch.testing.assert_close(model(input_ids, labels=input_ids).loss, model(input_ids, labels=input_ids,
                                                                                  skip_logits=False).loss)
    model = model.to(torch.bfloat16)
    plain, plain_grads = loss_and_grads_with(model, False, input_ids=input_ids, labels=input_ids)
    fused, fused_grads = loss_and_grads_with(model, True, input_ids=input_ids, labels=input_ids)
    assert fused_grads["model.embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(fused.loss, plain.loss, rtol=2e-2, atol=2e-2)
    for name, grad in plain_grads.items():
        cosine = F.cosine_similarity(fused_grads[name].float().flatten(), grad.float().flatten(), dim=0)
        assert cosine > 0.99, name


def test_fused_loss_under_autocast_matches_the_plain_loss(small_loss_chunks):
    """The Trainer's --bf16 on float32 weights: autocast runs the head in bf16, and the chunked loss computes its
    gradient products in that dtype too (as the plain path's backward does), accumulating the weight's in float32."""
    torch.manual_seed(0)
    model = build(tiny_config(tie_word_embeddings=False)).train()
    input_ids = torch.randint(3, VOCAB, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads_with(model, False, input_ids=input_ids, labels=input_ids)
        fused, fused_grads = loss_and_grads_with(model, True, input_ids=input_ids, labels=input_ids)
    assert fused_grads["lm_head.weight"].dtype == torch.float32
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-2, atol=1e-2)
    for name, grad in plain_grads.items():
        cosine = F.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_logits_are_kept_in_eval_and_on_request_and_a_loss_without_labels_is_refused():
    model = build(tiny_config())
    input_ids = torch.randint(3, VOCAB, (2, 6))
    assert model.eval()(input_ids, labels=input_ids).logits.shape == (2, 6, VOCAB)  # evaluation: unchanged
    model.train()
    assert model(input_ids).logits.shape == (2, 6, VOCAB)  # no labels: the logits
    assert model(input_ids, labels=input_ids, skip_logits=False).logits.shape == (2, 6, VOCAB)
    with pytest.raises(ValueError, match="skip_logits=True .* needs labels"):
        model(input_ids, skip_logits=True)


def test_a_lora_wrapped_head_takes_the_plain_loss_and_a_frozen_head_gets_no_gradient(small_loss_chunks):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 8))
    frozen_head = get_peft_model(build(tiny_config(tie_word_embeddings=False)),
                                 LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    assert frozen_head.base_model.model.fused_loss_supported()
    fused, fused_grads = loss_and_grads_with(frozen_head, None, input_ids=input_ids, labels=input_ids)
    plain, plain_grads = loss_and_grads_with(frozen_head, False, input_ids=input_ids, labels=input_ids)
    assert fused.logits is None and len(fused_grads) == 8  # the LoRA A/B of q and v in 2 layers, nothing else
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    lora_head = get_peft_model(build(tiny_config(tie_word_embeddings=False)),
                               LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).train()
    assert not lora_head.base_model.model.fused_loss_supported()
    output = lora_head(input_ids, labels=input_ids)  # the plain path, the logits still skipped as asked
    assert output.logits is None and torch.isfinite(output.loss)
