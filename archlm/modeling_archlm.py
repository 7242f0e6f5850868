"""ArchLM modeling: one decoder-only transformer whose parts are chosen by `ArchLMConfig`.

This file is remote code: it travels to the Hub with every saved model, so it imports only torch,
transformers and the config (relative import). Parameter names follow transformers' Llama, so
PEFT, tensor-parallel plans and converters find `q_proj`, `gate_proj`, `input_layernorm`, ...

Each choice is a small table at the top (`NORM_CLASSES`, `MLP_CLASSES`, `MASK_FUNCTIONS`); the
decoder layer and the model read top to bottom, with shapes noted as (B, T, C) = (batch, query
length, hidden), nh / nkv = query / key-value heads, hd = head_dim, S = key length.
"""

import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, StoppingCriteria, StoppingCriteriaList
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import is_liger_kernel_available, logging

from .configuration_archlm import ArchLMConfig

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------------
class ArchLMRMSNorm(nn.Module):
    """RMSNorm computed in float32. `unit_offset` (Gemma): scaled by (1 + weight), weight starting at 0, and the
    scale applied in float32 before the cast back; otherwise (Llama) by weight after the cast, or before it with
    `weight_fp32` (OLMo 2: the same in float32, one rounding fewer in bf16).

    `shape` is the weight's shape: (C,) normalises over C; (nh, hd) gives each head its own weight (normalised
    over hd only)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-6, unit_offset: bool = False,
                 weight_fp32: bool = False):
        super().__init__()
        self.unit_offset, self.weight_fp32 = unit_offset, weight_fp32
        self.weight = nn.Parameter(torch.zeros(shape) if unit_offset else torch.ones(shape))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.unit_offset:
            return (hidden_states * (1.0 + self.weight.float())).to(input_dtype)
        if self.weight_fp32:
            return (hidden_states * self.weight.float()).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, unit_offset={self.unit_offset}"
                + (", weight_fp32=True" if self.weight_fp32 else ""))


class ArchLMLayerNorm(nn.Module):
    """LayerNorm over the last dimension, with a weight and a bias, a weight only, or no parameters (OLMo).
    A 2-D `shape` (nh, hd) gives each head its own parameters (StableLM, Cohere qk-norm). `precision`
    (layernorm_precision) is where a bf16/fp16 model rounds: torch's kernel on the activations, or in float32.
    `unit_offset` (Nemotron's LayerNorm1P): scaled by (1 + weight), weight starting at 0; 1 + weight is rounded to
    the weight's dtype before the kernel, as Nemotron does."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-5, weight: bool = True, bias: bool = True,
                 precision: str = "default", unit_offset: bool = False):
        super().__init__()
        self.normalized_shape = (shape if isinstance(shape, int) else shape[-1],)
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(shape) if unit_offset else torch.ones(shape)) if weight else None
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None
        self.eps, self.precision = eps, precision

    def scale(self) -> torch.Tensor | None:
        return self.weight + 1.0 if self.unit_offset else self.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per_head = self.weight is not None and self.weight.dim() > 1
        if self.precision == "default" and not per_head:  # torch's fused kernel (nn.LayerNorm's numerics)
            return F.layer_norm(hidden_states, self.normalized_shape, self.scale(), self.bias, self.eps)
        # in float32, rounded once at the end: OLMo's (the kernel on float32), Cohere's (its own formula), and
        # per-head parameters (as StableLM's one nn.LayerNorm per head rounds)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        if self.precision == "float32_explicit":
            centred = hidden_states - hidden_states.mean(-1, keepdim=True)
            hidden_states = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            hidden_states = F.layer_norm(hidden_states, self.normalized_shape, eps=self.eps)
        if self.weight is not None:
            hidden_states = hidden_states * self.scale().float()
        if self.bias is not None:
            hidden_states = hidden_states + self.bias.float()
        return hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else self.normalized_shape
        return (f"{shape}, eps={self.eps}, weight={self.weight is not None}, bias={self.bias is not None}"
                + (", unit_offset=True" if self.unit_offset else "")
                + (f", precision={self.precision!r}" if self.precision != "default" else ""))


NORM_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "rmsnorm": ArchLMRMSNorm,
    "rmsnorm_unit_offset": partial(ArchLMRMSNorm, unit_offset=True),
    "layernorm": ArchLMLayerNorm,
    "layernorm_nobias": partial(ArchLMLayerNorm, bias=False),
    "layernorm_noaffine": partial(ArchLMLayerNorm, weight=False, bias=False),
    "layernorm_unit_offset": partial(ArchLMLayerNorm, unit_offset=True),
}


def make_norm(config: ArchLMConfig, shape: int | tuple[int, ...], norm_type: str | None = None) -> nn.Module:
    norm_type = norm_type or config.norm_type
    if norm_type not in NORM_CLASSES:
        raise ValueError(f"Unknown norm_type {norm_type!r}; valid: {list(NORM_CLASSES)}")
    # the rounding options of each kind of norm (the unit-offset RMSNorm always applies its weight in float32)
    options = (dict(precision=config.layernorm_precision) if norm_type.startswith("layernorm")
               else dict(weight_fp32=config.norm_weight_fp32) if norm_type == "rmsnorm" else {})
    return NORM_CLASSES[norm_type](shape, eps=config.norm_eps, **options)


def optional_norm(config: ArchLMConfig, present: bool, shape: int | tuple[int, ...]) -> nn.Module:
    """A norm slot: the norm when this architecture has it, else Identity (litgpt's Block)."""
    return make_norm(config, shape) if present else nn.Identity()


# ------------------------------------------------------------------------------------------------
# Positions: rope (rotates q/k), alibi (biases scores), learned / sinusoidal (added to embeddings)
# ------------------------------------------------------------------------------------------------
class ArchLMRotaryEmbedding(nn.Module):
    """cos/sin tables for rope, from transformers' ROPE_INIT_FUNCTIONS (default/linear/dynamic/yarn/longrope/llama3/...).

    One table per layer type when `rope_parameters` is nested by layer type (Gemma 3's local rope theta), kept
    under `{layer_type}_inv_freq` as transformers' models do so that dynamic rope updates find them. The table
    covers the rotated channels only (`partial_rotary_factor`); `rope_interleaved` repeats each frequency for a
    pair of neighbouring channels (GPT-J, Cohere) instead of repeating the half (Llama, NeoX)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.interleaved = config.rope_interleaved
        nested = set(config.rope_parameters) & {"full_attention", "sliding_attention"}
        self.layer_types = sorted(nested) or [None]
        if nested:
            self.rope_type = {}
        for layer_type in self.layer_types:
            rope_type = (config.rope_parameters[layer_type] if layer_type else config.rope_parameters)["rope_type"]
            if layer_type:
                self.rope_type[layer_type] = rope_type
            else:
                self.rope_type = rope_type
            inv_freq, attention_scaling = self.frequencies(layer_type)
            prefix = f"{layer_type}_" if layer_type else ""
            self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
            self.register_buffer(f"{prefix}original_inv_freq", inv_freq.clone(), persistent=False)
            setattr(self, f"{prefix}attention_scaling", attention_scaling)

    def frequencies(self, layer_type: str | None) -> tuple[torch.Tensor, float]:
        """inv_freq and attention scaling of one layer type's rope (None: the one shared rope)."""
        rope_type = self.rope_type[layer_type] if layer_type else self.rope_type
        rope_init_fn = self.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        return rope_init_fn(self.config, None, layer_type=layer_type)

    @staticmethod
    def compute_default_rope_parameters(config: ArchLMConfig, device=None, layer_type=None, **kwargs) -> tuple[torch.Tensor, float]:
        params = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
        base = params["rope_theta"]
        dim = int(config.head_dim * (params.get("partial_rotary_factor") or 1.0))  # the rotated channels
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # dynamic / longrope types recompute inv_freq for long inputs
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = f"{layer_type}_" if layer_type else ""
        inv_freq, scaling = getattr(self, f"{prefix}inv_freq"), getattr(self, f"{prefix}attention_scaling")
        freqs = position_ids[..., None].float() * inv_freq.to(x.device)  # (B, T, rot/2)
        # (B, T, rot): f0 f1 .. f0 f1 .. (halves) or f0 f0 f1 f1 .. (interleaved pairs)
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        if self.config.rope_precision == "float32":  # OLMo: q and k rotate by float32 tables
            return cos, sin
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved rotation of GPT-J and Cohere."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary_pos_emb(q, k, cos, sin, interleaved: bool = False, in_float32: bool = False):
    """Rotate the first cos.shape[-1] channels of each head (all of them unless rotary is partial); the rest pass.
    `in_float32` (rope_precision other than "default"): bf16/fp16 q and k rotate in float32, rounded back once."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rot): broadcast over heads
    rotate = rotate_pairs if interleaved else rotate_half
    rotary_dim = cos.shape[-1]

    def apply(x):
        x = x.float() if in_float32 else x
        if rotary_dim == x.shape[-1]:
            return (x * cos) + (rotate(x) * sin)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat(((x_rot * cos) + (rotate(x_rot) * sin), x_pass), dim=-1)

    return apply(q).to(q.dtype), apply(k).to(k.dtype)


def sinusoidal_embeddings(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sin/cos positions of 'Attention Is All You Need' (sin half, then cos half), (B, T, dim)."""
    half = dim // 2
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=position_ids.device) / max(half, 1))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:  # odd width: one zero channel keeps the shape
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al.): a geometric sequence, interleaved when heads is not a power of 2."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, device=device, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, batch: int, query_start: int, query_length: int, key_length: int, dtype) -> torch.Tensor:
    """(B, nh, T, S) bias = slope * (key position - query position); 0 on the diagonal, negative into the past.

    Positions are cache slots, so left padding shifts queries and keys alike and the distances stay exact.
    Keys are the last `key_length` slots before the query end (a sliding-window cache holds only those), or
    slots 0.. when the cache is longer than what was seen (a static cache).
    """
    device = slopes.device
    query_positions = query_start + torch.arange(query_length, device=device)
    key_start = max(query_start + query_length - key_length, 0)
    key_positions = key_start + torch.arange(key_length, device=device)
    distance = (key_positions[None, :] - query_positions[:, None]).float()  # (T, S)
    # expanded (no copy) to the batch: flex attention's score_mod indexes the bias by batch
    return (slopes[:, None, None] * distance).to(dtype).expand(batch, -1, -1, -1)


def check_attention_implementation(config: ArchLMConfig, attn_implementation: str | None = None) -> None:
    """Refuse an attention function that cannot compute this architecture, instead of dropping part of it (wrong
    tokens) or failing mid-generation. ALiBi needs a bias over every key: flash attention takes none, and the paged
    implementations of continuous batching (`paged|...`) read keys the bias built for this call does not cover.
    Attention soft-capping needs the scores before softmax, which only eager and flex attention expose."""
    attn_implementation = attn_implementation or config._attn_implementation or "eager"
    if config.position_embedding_type == "alibi" and attn_implementation.startswith(("flash_attention", "paged")):
        raise ValueError(
            f"ALiBi adds a bias to attention scores, which attn_implementation={attn_implementation!r} cannot take "
            "(flash attention takes no bias; continuous batching's paged attention reads keys the bias does not "
            "cover). Use 'sdpa', 'eager' or 'flex_attention' with generate()."
        )
    if config.attn_logit_softcapping is not None and attn_implementation.split("|")[-1] not in ("eager", "flex_attention"):
        raise ValueError(
            f"`attn_logit_softcapping`={config.attn_logit_softcapping} caps the attention scores before softmax, "
            f"which attn_implementation={attn_implementation!r} does not expose. Use 'eager' or 'flex_attention'."
        )
    if config.attention_sinks and attn_implementation not in ("eager", "sdpa"):
        raise ValueError(
            "`attention_sinks`=True adds a learned logit per head to each softmax's denominator, which "
            f"attn_implementation={attn_implementation!r} cannot take. Use 'eager' or 'sdpa'."
        )


def check_flex_attention_on_cpu(config: ArchLMConfig, device: torch.device) -> None:
    """torch's compiled CPU flex_attention kernel (inductor's micro-GEMM tail for q.k^T) reads and writes past the
    end of a key block when head_dim is 8 or 16 on CPUs without AVX512: garbage or NaN logits that change from run
    to run. Refused there instead of returning them."""
    if (config._attn_implementation == "flex_attention" and device.type == "cpu" and config.head_dim in (8, 16)
            and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        raise ValueError(
            f"attn_implementation='flex_attention' on this CPU ({torch.backends.cpu.get_cpu_capability()}) computes "
            f"wrong attention for head_dim={config.head_dim} (a torch inductor kernel bug for head_dim 8 and 16 "
            "without AVX512). Use 'sdpa' or 'eager', or a head_dim of 32 or more."
        )


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sinks_in_softmax: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. GQA without copying K/V: the query heads of a group share one K/V head. `sinks`
    (nh,): one more logit per head in the softmax's denominator, applied as GraniteSWA does, by scaling the output,
    or with `sinks_in_softmax` as gpt-oss does, as one more column of the softmax (the same function, rounded apart).

        query (B, nh, T, hd) -> (B, nkv, g, T, hd)    key/value (B, nkv, S, hd) -> (B, nkv, 1, S, hd)
    """
    batch, num_heads, query_length, head_dim = query.shape
    num_kv_heads, key_length = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    query = query.view(batch, num_kv_heads, groups, query_length, head_dim)
    scores = torch.matmul(query, key.unsqueeze(2).transpose(-1, -2)) * scaling  # (B, nkv, g, T, S)
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before any bias or mask
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias.view(position_bias.shape[0], num_kv_heads, groups, query_length, key_length)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        per_head = attention_mask.shape[1] != 1  # (B, 1 or nh, T, S) -> (B, 1 or nkv, 1 or g, T, S)
        scores = scores + attention_mask.view(attention_mask.shape[0], num_kv_heads if per_head else 1,
                                              groups if per_head else 1, query_length, key_length)
    if sinks is not None and sinks_in_softmax:  # gpt-oss: the column's max subtracted, the softmax in the scores' dtype
        column = sinks.view(1, num_kv_heads, groups, 1, 1).expand(batch, -1, -1, query_length, 1).to(scores.dtype)
        scores = torch.cat([scores, column], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = F.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1].to(query.dtype)
        sinks = None  # (in the probabilities already)
    elif sinks is not None:  # exp(s) / (sum exp + exp(sink)) = softmax x sigmoid(lse - sink), in float32
        sink_scale = (torch.logsumexp(scores, dim=-1) - sinks.view(1, num_kv_heads, groups, 1)).float().sigmoid()
    if not sinks_in_softmax:
        # softmax in float32 at least; a fully masked row (all min) becomes uniform instead of NaN. Not float32 for
        # float64 scores: float64's min would round to -inf there, and a row of -inf gives NaN
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value.unsqueeze(2))  # (B, nkv, g, T, hd)
    if sinks is not None:
        output = output * sink_scale.unsqueeze(-1).to(output.dtype)
    # (B, T, nh, hd of the values: latent attention's differ from its queries')
    output = output.view(batch, num_heads, query_length, value.shape[-1]).transpose(1, 2).contiguous()
    return output, probs.view(batch, num_heads, query_length, key_length)


def sdpa_with_sinks(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, sinks: torch.Tensor, sdpa: Callable, scaling: float,
                    sinks_in_softmax: bool = False, position_bias: torch.Tensor | None = None, **kwargs):
    """Attention sinks through sdpa, which takes no logit of its own into the softmax but attends to keys: each sink
    is one more key, first, with a zero value and the head's sink as its score, through one more channel (sink /
    scale in each query, 1 in the sink key, 0 in every other key). The same function as eager's, rounded apart, for
    ~1/S more work; sdpa's fused kernels spare the (B, nh, T, S) scores eager keeps for its backward."""
    batch, heads, length, head_dim = query.shape
    keys = key.shape[2]
    sink_channel = (sinks.float() / scaling).to(query.dtype).view(1, heads, 1, 1).expand(batch, -1, length, 1)
    query = torch.cat([query, sink_channel], dim=-1)  # (B, nh, T, hd + 1)
    sink_key = F.pad(key.new_ones(*key.shape[:2], 1, 1), (head_dim, 0))  # (B, nkv, 1, hd + 1): 0 ... 0 1
    key = torch.cat([sink_key, F.pad(key, (0, 1))], dim=2)  # (B, nkv, 1 + S, hd + 1)
    value = F.pad(value, (0, 0, 1, 0))  # a zero value for the sink key
    if attention_mask is None:  # what sdpa does without a mask, which the sink key's column needs spelled out:
        # several queries are causal with the first keys (is_causal: a static cache's prefill holds more keys than
        # the prompt, the rest empty), one query sees every key
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(0 if length > 1 else keys)
        attention_mask = causal[None, None]
    # every query sees its sink: True in a boolean mask, 0 in an additive one or a position bias
    attention_mask = F.pad(attention_mask, (1, 0), value=True if attention_mask.dtype == torch.bool else 0.0)
    if position_bias is not None:
        position_bias = F.pad(position_bias, (1, 0))
    return sdpa(module, query, key, value, attention_mask, scaling=scaling, position_bias=position_bias, **kwargs)


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function the config names (eager_attention_forward unless another is set), with the module's
    scale and dropout; (B, nh, T, hd) states in, (B, T, nh, hd of the values) out."""
    interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    if kwargs.get("sinks") is not None and module.config._attn_implementation == "sdpa":
        interface = partial(sdpa_with_sinks, sdpa=interface)
    return interface(module, query, key, value, attention_mask, dropout=module.attention_dropout if module.training else 0.0,
                     scaling=module.scaling, **kwargs)


def qk_norm_shapes(config: ArchLMConfig) -> tuple:
    """Weight shapes of q_norm and k_norm for `qk_norm_scope`: (hd,) shared by the heads, (heads, hd) one per head,
    or (heads * hd,) over the whole projection."""
    head_dim, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    return {
        "head": ((head_dim,), (head_dim,)),
        "per_head": ((heads, head_dim), (kv_heads, head_dim)),
        "full": ((heads * head_dim,), (kv_heads * head_dim,)),
    }[config.qk_norm_scope]


class ArchLMAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when there is one K/V head).

        q_proj: C -> nh * hd      k_proj, v_proj: C -> nkv * hd      o_proj: nh * hd -> C
        query heads  q0 q1 q2 q3 | q4 q5 q6 q7      (nh = 8)
        K/V heads        kv0     |     kv1          (nkv = 2, each serves a group of nh / nkv = 4)

    Per layer: its type (full or sliding window) and whether it rotates q/k (NoPE layers do not). Options in the
    order they apply: q/k norm (per head or over the full width), clip_qkv, rope (partial, interleaved), or the q/k
    norm here (qk_norm_position="after_rope": HunYuan), scores scaled and soft-capped, Sub-LN's norm before o_proj.
    """

    def __init__(self, config: ArchLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.attention_scaling
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.use_rope = config.layer_uses_rope(layer_idx)
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_output_bias)
        self.o_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        self.v_proj.magneto_scaled = self.o_proj.magneto_scaled = True  # the value path: `magneto` init's larger gain
        if config.qk_norm:
            # keeps attention logits bounded without touching the residual stream
            q_shape, k_shape = qk_norm_shapes(config)
            self.q_norm = make_norm(config, q_shape, config.qk_norm_type)
            self.k_norm = make_norm(config, k_shape, config.qk_norm_type)
        self.sub_layernorm = optional_norm(config, config.sub_layernorm, q_size)
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))

    def score_flops(self, seq_len: int) -> float:
        """FLOPs per token of QK^T and AV at context `seq_len`: 2 * nh * hd per key each. A causal query sees
        (t + 1) keys, on average (seq_len + 1) / 2; in a sliding layer at most `sliding_window`."""
        keys_seen = (seq_len + 1) / 2
        window = self.sliding_window
        if window is not None and window < seq_len:
            # positions before the window is full see t+1 keys, the rest see exactly `window`
            keys_seen = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        return 2 * (2 * self.config.num_attention_heads * self.head_dim * keys_seen)

    def norm_heads(self, norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """A q/k norm on (B, heads, T, hd) states, in the layout its scope normalises: (B, T, heads, hd) per head, or
        (B, T, heads * hd) over the full width."""
        states = states.transpose(1, 2)  # (B, T, heads, hd)
        if self.config.qk_norm_scope == "full":
            return norm(states.flatten(-2)).view_as(states).transpose(1, 2)
        return norm(states).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        alibi_slopes: torch.Tensor | None = None,
        query_start: int = 0,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        config = self.config
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # (B, T, heads, hd)
        query_states, key_states, value_states = (
            self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)  # (B, T, heads * hd)
        )
        norm_before_rope = config.qk_norm and config.qk_norm_position == "before_rope"
        if norm_before_rope and config.qk_norm_scope == "full":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.view(hidden_shape), key_states.view(hidden_shape)
        value_states = value_states.view(hidden_shape)
        if norm_before_rope and config.qk_norm_scope != "full":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        if config.clip_qkv is not None:  # after any q/k norm (OLMoE); OLMo has none
            query_states, key_states, value_states = (
                states.clamp(-config.clip_qkv, config.clip_qkv) for states in (query_states, key_states, value_states)
            )
        query_states, key_states, value_states = (
            states.transpose(1, 2) for states in (query_states, key_states, value_states)  # (B, heads, T, hd)
        )

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, config.rope_interleaved,
                                                            in_float32=config.rope_precision != "default")
        if config.qk_norm and config.qk_norm_position == "after_rope":
            query_states, key_states = self.norm_heads(self.q_norm, query_states), self.norm_heads(self.k_norm, key_states)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        if alibi_slopes is not None:
            kwargs["position_bias"] = alibi_bias(
                alibi_slopes, input_shape[0], query_start, input_shape[-1], key_states.shape[-2], query_states.dtype
            )
        if config.attn_logit_softcapping is not None:
            kwargs["softcap"] = config.attn_logit_softcapping
        if config.attention_sinks:
            kwargs.update(sinks=self.sinks, sinks_in_softmax=config.attention_sinks_in_softmax)
        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask,
                                           sliding_window=self.sliding_window, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return self.o_proj(self.sub_layernorm(attn_output)), attn_weights


def rotate_pairs_deinterleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation (pairs (0,1), (2,3), ... each by one frequency) with DeepSeek's output layout: the
    pairs' first channels, then their second. q and k get the same layout, so q . k is the rotation's; cos/sin come
    in the interleaved layout (f0 f0 f1 f1 ...)."""
    cos, sin = cos[..., ::2].unsqueeze(1), sin[..., ::2].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# DeepSeek's latent norms: RMSNorms with RMSNorm's default epsilon, whatever norm_type and norm_eps say
LATENT_NORM_EPS = 1e-6


class ArchLMLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): each token's keys and values come from one latent of
    kv_lora_rank numbers (what the cache holds: kv_lora_rank + head_dim a token and layer, where ArchLMAttention
    holds 2 x kv heads x head_dim) and a rotary key of head_dim shared by every head.

        q:  x ─► q_proj, or q_a_proj ─► q_a_layernorm ─► q_b_proj ─► per head [q_nope | q_rope]
        kv: x ─► kv_a_proj_with_mqa ─► [latent | k_rope];  latent ─► kv_a_layernorm ─► (cache) ─► kv_b_proj ─►
            per head [k_nope | v]
        per head: q = [q_nope | rope(q_rope)], k = [k_nope | rope(k_rope)], scores over qk_nope_head_dim + head_dim
    """

    def __init__(self, config: ArchLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        heads, self.kv_lora_rank = config.num_attention_heads, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_head_dim = config.qk_nope_head_dim, config.head_dim, config.v_head_dim
        self.head_dim = self.nope_dim + self.rope_dim  # of q and k
        self.num_key_value_groups = 1  # the latent expands into every head's key and value
        self.scaling = config.attention_scaling
        self.attention_dropout = config.attention_dropout
        self.sliding_window = None
        self.is_causal = True
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = ArchLMRMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * self.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim,
                                            bias=config.attention_bias)
        self.kv_a_layernorm = ArchLMRMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, config.hidden_size, bias=config.attention_output_bias)
        self.o_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it

    def score_flops(self, seq_len: int) -> float:
        """FLOPs per token of QK^T (over qk_nope_head_dim + head_dim) and AV (over v_head_dim) at context `seq_len`;
        a causal query sees (seq_len + 1) / 2 keys on average."""
        return 2 * self.config.num_attention_heads * (self.head_dim + self.v_head_dim) * (seq_len + 1) / 2

    def absorbs(self, length: int, keys: int, attention_mask: torch.Tensor | None) -> bool:
        """Whether `length` new queries over `keys` cached latents attend in the latent space (`absorbed`): when
        expanding every cached latent through kv_b_proj costs more than scoring the latents themselves (decoding,
        short chunks), in inference, with kv_b_proj a plain Linear whose whole weight is here (not an adapter, a
        quantized matrix, or a ZeRO-3 partition, which only the module's own forward is sure to gather) and a mask
        that eager attention reads (a 4-D tensor, or none for one query, which then sees every key)."""
        mask_readable = (attention_mask is None and length == 1) or (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
        expand_cost = keys * self.kv_lora_rank * (self.nope_dim + self.v_head_dim)  # per head
        latent_cost = length * keys * (2 * self.kv_lora_rank + self.rope_dim)
        return (not self.training and length < keys and latent_cost < expand_cost and mask_readable
                and self.config._attn_implementation in ("eager", "sdpa") and type(self.kv_b_proj) is nn.Linear
                and not hasattr(self.kv_b_proj.weight, "tensor_data_names")
                and self.kv_b_proj.weight.numel() == self.kv_b_proj.in_features * self.kv_b_proj.out_features)

    def absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the cached latents without expanding them (DeepSeek-V2's absorption): each head's key
        projection moves onto its query, q_nope @ W_k (nope -> kv_lora_rank), so that the scores are
        [q_nope W_k | q_rope] . [latent | k_rope]; the probabilities weight the latents, and each head's value
        projection W_v applies after. Every head reads the same latents and rotary keys: the heads' queries become
        rows of one head, one matmul each with no key copied. A step costs O(keys x kv_lora_rank) per head where the
        expansion costs O(keys x kv_lora_rank x (nope + v)). Returns (B, nh, T, v) and the probabilities."""
        batch, heads, length, _ = q_nope.shape
        keys = latent.shape[2]
        w_k, w_v = self.kv_b_proj.weight.view(heads, -1, self.kv_lora_rank).split([self.nope_dim, self.v_head_dim], 1)
        query = torch.cat((torch.matmul(q_nope, w_k), q_rope), dim=-1)  # (B, nh, T, r + rope)
        rows = query.reshape(batch, 1, heads * length, -1)  # row h * T + t: head h's query t
        if attention_mask is not None:  # (B, 1, T, S) -> the same mask for each head's rows
            attention_mask = attention_mask.unsqueeze(2).expand(-1, -1, heads, -1, -1).reshape(batch, 1, -1, keys)
        output, probs = eager_attention_forward(self, rows, torch.cat((latent, k_rope), dim=-1), latent, attention_mask,
                                                scaling=self.scaling)  # (B, nh * T, 1, r)
        output = torch.matmul(output.view(batch, heads, length, -1), w_v.transpose(1, 2))  # (B, nh, T, v)
        return output, probs.view(batch, heads, length, keys)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for name in ("alibi_slopes", "query_start"):  # ArchLMAttention's: this one is on rope only
            kwargs.pop(name, None)
        batch, length = hidden_states.shape[:-1]
        if hasattr(self, "q_proj"):
            query_states = self.q_proj(hidden_states)
        else:
            query_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query_states = query_states.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, qk)
        q_nope, q_rope = query_states.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # both as one-head 4-D states, so that every cache layout holds them as it holds keys and values
        latent = self.kv_a_layernorm(latent).view(batch, 1, length, self.kv_lora_rank)
        k_rope = k_rope.view(batch, 1, length, self.rope_dim)
        cos, sin = position_embeddings
        # float32 tables (rope_precision="float32", DeepSeek-V2's) rotate in float32, rounded back once
        if self.config.rope_interleaved:
            q_rope, k_rope = (rotate_pairs_deinterleaved(x, cos, sin).to(x.dtype) for x in (q_rope, k_rope))
        else:
            q_rope, k_rope = apply_rotary_pos_emb(q_rope, k_rope, cos, sin)
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)

        keys = latent.shape[2]
        if past_key_values is not None and self.absorbs(length, keys, attention_mask):
            attn_output, attn_weights = self.absorbed(q_nope, q_rope, latent, k_rope, attention_mask)
            if self.config._attn_implementation != "eager":  # as the prefill's sdpa: no attention weights
                attn_weights = None
            return self.o_proj(attn_output.transpose(1, 2).reshape(batch, length, -1)), attn_weights
        expanded = self.kv_b_proj(latent).view(batch, keys, -1, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value_states = expanded.split([self.nope_dim, self.v_head_dim], dim=-1)
        key_states = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        query_states = torch.cat((q_nope, q_rope), dim=-1)
        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask, **kwargs)
        attn_output = attn_output.reshape(batch, length, -1).contiguous()  # (B, T, nh * v)
        return self.o_proj(attn_output), attn_weights


# ------------------------------------------------------------------------------------------------
# MLPs
# ------------------------------------------------------------------------------------------------
def gated_product(act_fn: Callable, gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """act(gate) * up, or with a limit gpt-oss's clamped form: clamping bounds the product's size (its activations
    stay small in low precision), and the +1 lets a zero up projection pass act(gate) through."""
    if limit is None:
        return act_fn(gate) * up
    return act_fn(gate.clamp(max=limit)) * (up.clamp(-limit, limit) + 1)


class ArchLMGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu (Shazeer 2020). Sub-LN normalises the
    product before down_proj."""

    def __init__(self, config: ArchLMConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            linear.magneto_scaled = True  # `magneto` init's larger gain on the whole MLP
        self.act_fn, self.limit = ACT2FN[config.hidden_act], config.swiglu_limit
        self.sub_layernorm = optional_norm(config, config.sub_layernorm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.sub_layernorm(gated_product(self.act_fn, self.gate_proj(x), self.up_proj(x), self.limit)))


class ArchLMStandardMLP(nn.Module):
    """down(act(up(x))): the GPT-2 / original Transformer MLP."""

    def __init__(self, config: ArchLMConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        self.up_proj.magneto_scaled = self.down_proj.magneto_scaled = True  # `magneto` init's larger gain
        self.act_fn = ACT2FN[config.hidden_act]
        self.sub_layernorm = optional_norm(config, config.sub_layernorm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.sub_layernorm(self.act_fn(self.up_proj(x))))


MLP_CLASSES: dict[str, type[nn.Module]] = {"gated": ArchLMGatedMLP, "standard": ArchLMStandardMLP}


# ------------------------------------------------------------------------------------------------
# Mixture of experts
# ------------------------------------------------------------------------------------------------
def grouped_mm_takes(dtype: torch.dtype, weight_shape: Sequence[int]) -> bool:
    """Whether torch's grouped_mm (transformers' default experts implementation too) takes expert stacks of this
    dtype and shape (E, out, in): fp32/bf16/fp16, with rows of 16-byte multiples."""
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and all(
        size * dtype.itemsize % 16 == 0 for size in weight_shape[1:])


def expert_weight(stack: torch.Tensor, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's (out, in) weight. A torchao-quantized stack (int8 values and scales, which neither grouped_mm nor
    transpose takes) is dequantized one expert at a time: a temporary copy of one expert, never of the whole stack."""
    weight = stack[expert]
    return weight.dequantize().to(dtype) if hasattr(weight, "tensor_data_names") else weight


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """inputs (S, in) sorted by expert, counts[e] rows each; weight (E, out, in) -> (S, out), row block e by expert e.

    torch's grouped matmul where it has one for this dtype and shape (one kernel for all experts, as transformers'
    default), else one matmul per expert over its block of rows: either way the cost follows the routed tokens."""
    if not hasattr(weight, "tensor_data_names"):  # not torchao-quantized (see expert_weight)
        offsets = counts.cumsum(0, dtype=torch.int32)
        compiling = torch.compiler.is_compiling()
        # inductor lowers grouped_mm for bfloat16 only (transformers' rule too)
        if hasattr(F, "grouped_mm") and grouped_mm_takes(inputs.dtype, weight.shape) and (
                not compiling or inputs.dtype == torch.bfloat16):
            return F.grouped_mm(inputs, weight.transpose(1, 2), offs=offsets)
        if compiling and hasattr(torch.ops.transformers, "grouped_mm_fallback"):
            # the per-expert loop reads the counts on the host: transformers' custom op (registered by its MoE
            # integration, which Mixtral's modeling imports) hides it from the compiler, so the graph stays whole, as
            # generate needs when it compiles a static cache's decoding step (fullgraph=True)
            return torch.ops.transformers.grouped_mm_fallback(inputs, weight.transpose(1, 2), offsets)
    blocks = inputs.split(counts.tolist())
    return torch.cat([block @ expert_weight(weight, expert, block.dtype).T
                      for expert, block in enumerate(blocks) if len(block)] or [inputs.new_empty(0, weight.shape[1])])


class ArchLMExperts(nn.Module):
    """`num_experts` MLPs of the kind `mlp_type` chooses, stacked as transformers 5 stores them (nn.Linear layout):

        gated:    gate_up_proj (E, 2I, C) = [gate rows | up rows]    down_proj (E, C, I)
        standard: up_proj      (E, I, C)                             down_proj (E, C, I)
        mlp_bias: gate_up_proj_bias (E, 2I) or up_proj_bias (E, I),  down_proj_bias (E, C)

    Three ways to the same function, chosen by `forward`: `grouped` (sorted by expert, each expert's rows in one
    matmul: prefill and training), `gathered` (decoding on an accelerator, or compiled on a CPU) and `one_token`
    (decoding eagerly on a CPU)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        experts, width, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts, self.gated = experts, config.mlp_type == "gated"
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        else:
            self.up_proj = nn.Parameter(torch.empty(experts, width, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))
        if config.mlp_bias:  # one bias row per expert
            up_name = "gate_up_proj" if self.gated else "up_proj"
            self.register_parameter(f"{up_name}_bias", nn.Parameter(torch.empty(experts, getattr(self, up_name).shape[1])))
            self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))
        self.act_fn, self.limit = ACT2FN[config.hidden_act], config.swiglu_limit

    def project(self, routed: torch.Tensor, name: str, expert_ids: torch.Tensor,
                counts: torch.Tensor | None) -> torch.Tensor:
        """One projection of every token-expert pair (row i by expert expert_ids[i]): rows grouped by expert with
        `counts`, else each row by its own expert's weights, gathered."""
        weight = getattr(self, name)
        if counts is None:
            if hasattr(weight, "tensor_data_names"):  # torchao's quantized stacks cannot be indexed (expert_weight)
                chosen = torch.stack([expert_weight(weight, expert, routed.dtype) for expert in expert_ids.tolist()])
            else:
                chosen = weight[expert_ids]
            output = torch.bmm(chosen, routed.unsqueeze(-1)).squeeze(-1)
        else:
            output = grouped_linear(routed, weight, counts)
        bias = getattr(self, f"{name}_bias", None)
        return output if bias is None else output + bias[expert_ids]

    def mlp(self, routed: torch.Tensor, project: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """The experts' MLP on rows (S, C) -> (S, C), the one definition every path uses: `project(inputs, name)`
        applies stack `name` to each row, with that row's expert."""
        if self.gated:
            gate, up = project(routed, "gate_up_proj").chunk(2, dim=-1)
            routed = gated_product(self.act_fn, gate, up, self.limit)  # (S, I)
        else:
            routed = self.act_fn(project(routed, "up_proj"))
        return project(routed, "down_proj")

    def one_token(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Decoding one sequence on a CPU: each of the token's k (distinct) experts on its own. The grouped path's
        sort, counts, gathers and per-expert loop inside grouped_mm cost ~0.5 ms a layer at 1 token there, more than
        reading the two experts' weights; the same matmuls and the same sum over k as the grouped path."""
        up_name = "gate_up_proj" if self.gated else "up_proj"
        # each stack read once: under PEFT's target_parameters every read of it recomputes the adapted stack
        stacks = {name: (getattr(self, name), getattr(self, f"{name}_bias", None)) for name in (up_name, "down_proj")}

        def linear(inputs: torch.Tensor, name: str, expert: int) -> torch.Tensor:
            stack, bias = stacks[name]
            output = F.linear(inputs, expert_weight(stack, expert, inputs.dtype))
            # the bias added after the product, as the other paths do (F.linear's fused add rounds once, not twice)
            return output if bias is None else output + bias[expert]

        routed = [self.mlp(hidden_states, partial(linear, expert=expert)) for expert in top_k_index[0].tolist()]
        return (torch.cat(routed) * top_k_weights.reshape(-1, 1)).view(1, len(routed), -1).sum(dim=1)

    def gathered(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Decoding on an accelerator, or compiled on a CPU: each token-expert pair multiplies its expert's weights,
        gathered, in one batched matmul per projection. At a few rows the grouped path's sort, counts, permutations
        and grouped kernel cost more launches than the matmuls take (transformers switches Mixtral to this
        `batched_mm` for decoding on accelerators), and nothing waits for the host, so a CUDA graph captures it in
        any dtype. Compiled on a CPU, inductor fuses the gather, the one-column bmm and the activation into one C++
        kernel: each chosen weight is read once, by every thread, never copied (decoding waits on memory there, and
        MKL runs a one-row matmul on one thread): ~2x faster a layer than the compiled grouped path, 1.4-1.6x faster
        compiled decoding (benchmarks/experts_paths.py, vs_mixtral.py). Eagerly on a CPU the copy makes it the
        slowest path."""
        tokens, top_k = top_k_index.shape
        routed = self.mlp(hidden_states.repeat_interleave(top_k, dim=0),  # (T*k, C)
                          partial(self.project, expert_ids=top_k_index.reshape(-1), counts=None))
        return (routed * top_k_weights.reshape(-1, 1)).view(tokens, top_k, -1).sum(dim=1)

    def grouped(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each token-expert pair sorted by expert, so that every expert multiplies its own block of rows once."""
        tokens, top_k = top_k_index.shape
        expert_ids, order = top_k_index.reshape(-1).sort()  # the T * k token-expert pairs, grouped by expert
        ones = torch.ones_like(expert_ids)  # counted into a fixed size: bincount's size depends on the ids' values
        counts = ones.new_zeros(self.num_experts).scatter_add_(0, expert_ids, ones)
        # index_select, not indexing: its backward is an index_add, ~3x cheaper on CPU than indexing's
        # accumulating index_put (each token is copied k times, so the gradient rows must be summed)
        routed = self.mlp(hidden_states.index_select(0, order // top_k),  # (T*k, C)
                          partial(self.project, expert_ids=expert_ids, counts=counts))
        routed = routed * top_k_weights.reshape(-1)[order, None]
        # back to token-major order: `order` is a permutation, so an empty tensor filled in place (no zero fill, no
        # copy of it as out-of-place index_copy makes: 2x faster here), then the k outputs of each token summed as
        # transformers does (a fixed order, where index_add_ would accumulate nondeterministically on a GPU)
        output = routed.new_empty(routed.shape).index_copy_(0, order, routed)
        return output.view(tokens, top_k, -1).sum(dim=1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape  # hidden_states (T, C), top_k_* (T, k)
        on_cpu, compiling = hidden_states.device.type == "cpu", torch.compiler.is_compiling()
        if on_cpu and tokens == 1 and not compiling:
            return self.one_token(hidden_states, top_k_index, top_k_weights)
        # decoding sizes (no more weights copied than a layer holds), except eagerly on a CPU, where the gathered copy
        # costs more than the grouped path's bookkeeping (compiled, inductor fuses the gather away: see gathered)
        if tokens * top_k <= self.num_experts and (compiling or not on_cpu):
            return self.gathered(hidden_states, top_k_index, top_k_weights)
        return self.grouped(hidden_states, top_k_index, top_k_weights)


class Float32Linear(nn.Linear):
    """A Linear computed in float32 at least, whatever the model's dtype (DeepSeek-V3's router: sigmoid scores of bf16
    logits would tie and round before they are compared with each other and the routing bias; DeepSeek-V2's softmax
    router with router_logits_fp32)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(hidden_states.to(dtype), self.weight.to(dtype), bias)


class ArchLMSparseMoeBlock(nn.Module):
    """A router (`gate`) sends each token to its top-k experts, their outputs weighted by the router's scores
    (softmax, or DeepSeek-V3's sigmoid; renormalised over the k with `norm_topk_prob`, x routed_scaling_factor);
    Qwen2-MoE adds an always-on shared expert behind a sigmoid gate, DeepSeek-V3 one without.

        x ──► gate ──► softmax | sigmoid ──► top-k ──► experts ──┐
        └───────────► shared_expert * sigmoid(shared_expert_gate(x)) ──► + ──►
    """

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.router_weights_fp32, self.topk_softmax = config.router_weights_fp32, config.router_topk_softmax
        self.sigmoid, self.scale = config.router_scoring == "sigmoid", config.routed_scaling_factor
        self.n_group, self.topk_group, self.group_scoring = config.n_group, config.topk_group, config.group_scoring
        router = Float32Linear if self.sigmoid or config.router_logits_fp32 else nn.Linear
        self.gate = router(config.hidden_size, config.num_experts, bias=config.router_bias)
        self.experts = ArchLMExperts(config)
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP_CLASSES[config.mlp_type](config, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.bias_update_rate = config.router_bias_update_rate
        if self.bias_update_rate or self.sigmoid or config.router_choice_bias:
            # DeepSeek-V3's auxiliary-loss-free balancing (its name): a bias per expert that enters the choice of
            # the top-k only, not the weights that mix their outputs; part of the model (saved, used in inference).
            # router_choice_bias: ERNIE 4.5's, on softmax scores and never moved
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))

    def choose(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing: (T, E) logits -> the top-k experts' weights (float32) and indices, each (T, k)."""
        if self.topk_softmax:  # Granite-MoE's order: the k largest logits first, then their softmax
            top_k_logits, top_k_index = router_logits.float().topk(self.top_k, dim=-1)
            top_k_weights = F.softmax(top_k_logits, dim=-1)
            return top_k_weights * self.scale if self.scale != 1 else top_k_weights, top_k_index
        if self.sigmoid:
            scores = torch.sigmoid(router_logits.float())
        else:
            scores = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        bias = getattr(self, "e_score_correction_bias", None)
        for_choice = scores if bias is None else scores + bias.float()
        if self.n_group > 1:  # only the experts of each token's topk_group best groups stay candidates
            groups = for_choice.unflatten(-1, (self.n_group, -1))  # (T, G, E/G)
            # a group's score: its best expert's (DeepSeek-V2), or its two best summed (DeepSeek-V3)
            group_scores = groups.amax(dim=-1) if self.group_scoring == "max" else groups.topk(2, dim=-1).values.sum(-1)
            best_groups = group_scores.topk(self.topk_group, dim=-1).indices
            kept = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(-1, best_groups, True)
            for_choice = groups.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(-2)
        top_k_index = for_choice.topk(self.top_k, dim=-1).indices
        top_k_weights = scores.gather(-1, top_k_index)
        if self.norm_topk_prob:  # (+ 1e-20: sigmoid scores can all underflow to 0)
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return top_k_weights * self.scale if self.scale != 1 else top_k_weights, top_k_index

    @torch.no_grad()
    def update_routing_bias(self, expert_tokens: torch.Tensor) -> None:
        """DeepSeek-V3's rule, once per optimizer step: `expert_tokens` (E,), the tokens routed to each expert in the
        step (every process's), moves each bias by router_bias_update_rate toward balance: down for an expert above
        the mean load, up for one below. Only the sign of each expert's difference from the mean counts."""
        load = expert_tokens.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])  # (T, C)
        router_logits = self.gate(hidden_states)  # (T, E)
        top_k_weights, top_k_index = self.choose(router_logits)
        weights = top_k_weights if self.router_weights_fp32 else top_k_weights.to(hidden_states.dtype)
        output = self.experts(hidden_states, top_k_index, weights).to(hidden_states.dtype)
        if hasattr(self, "shared_expert_gate"):
            output = output + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        elif hasattr(self, "shared_expert"):
            output = output + self.shared_expert(hidden_states)
        return output.view(shape), router_logits


def sequence_balance_loss(router_logits: tuple[torch.Tensor, ...], blocks: list[ArchLMSparseMoeBlock], batch: int,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, the load-balancing loss of sigmoid routers: per
    sequence and sparse layer, sum_i f_i P_i, where f_i = E / (k T) x the sequence's tokens routed to expert i (the
    top-k each block ran: routing bias and group limit included) and P_i is the mean over its T tokens of expert i's
    sigmoid score normalised over the experts; padding excluded; the mean over sequences and layers. 1 when balanced
    (transformers' softmax loss is k there)."""
    losses = []
    for logits, block in zip(router_logits, blocks):
        experts, top_k = logits.shape[-1], block.top_k
        scores = torch.sigmoid(logits.float())
        scores = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, -1, experts)  # (B, T, E)
        routed = torch.zeros_like(scores).view(-1, experts).scatter_(-1, block.choose(logits)[1], 1.0).view_as(scores)
        if attention_mask is None or attention_mask.dim() != 2:
            weights = scores.new_ones(scores.shape[:2])
        else:
            weights = attention_mask.reshape(batch, -1).to(scores.dtype)  # (B, T)
        tokens = weights.sum(dim=1, keepdim=True)  # (B, 1)
        f = (routed * weights[..., None]).sum(dim=1) * experts / (top_k * tokens.clamp_min(1))  # (B, E)
        p = (scores * weights[..., None]).sum(dim=1) / tokens.clamp_min(1)  # (B, E)
        losses.append(((f * p).sum(dim=-1), tokens[:, 0] > 0))
    loss, seen = (torch.stack(parts) for parts in zip(*losses))  # (L, B) each
    return (loss * seen).sum() / seen.sum().clamp_min(1)  # sequences of padding only count for nothing


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE's z-loss: the mean over tokens (padding excluded) and sparse layers of logsumexp(router logits)^2,
    which keeps the router's logits small."""
    squares = torch.stack([torch.logsumexp(logits.float(), dim=-1) ** 2 for logits in router_logits])  # (L, T)
    if attention_mask is None or attention_mask.dim() != 2:
        return squares.mean()
    weights = attention_mask.reshape(1, -1).to(squares.dtype)
    return (squares * weights).sum() / (weights.sum() * squares.shape[0]).clamp_min(1)


# ------------------------------------------------------------------------------------------------
# Decoder layer
# ------------------------------------------------------------------------------------------------
class ArchLMDecoderLayer(GradientCheckpointingLayer):
    """One block with fixed norm slots (each an Identity where `norm_position` has no norm):

        input_layernorm             before attention          (pre, sandwich; post: after the attention add)
        attention_output_layernorm  on attention's output     (sandwich, sublayer_output)
        post_attention_layernorm    before the MLP            (pre, sandwich; post: after the MLP add)
        mlp_output_layernorm        on the MLP's output       (sandwich, sublayer_output)

        sequential, pre-norm (Llama)                 parallel (GPT-J, Phi: one norm; NeoX: the MLP has its own)
        x ──┬───────────────────────────► + ──►      x ──┬────────────────────────────► + ──►
            └► input_layernorm ► attn ────┘              ├► input_layernorm ► attn ──────┤
        x ──┬───────────────────────────► + ──►          └► (post_attention_layernorm) ► mlp ┘
            └► post_attention_layernorm ► mlp ┘

        sandwich (Gemma 2): x + attention_output_layernorm(attn(input_layernorm(x))), likewise for the MLP
        post (original Transformer): input_layernorm(x + attn(x)), then post_attention_layernorm(x + mlp(x))

    Each sublayer's output is dropped out (`hidden_dropout`) and scaled (`residual_multiplier`) before its add.
    """

    def __init__(self, config: ArchLMConfig, layer_idx: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.parallel = config.use_parallel_residual
        self.sublayers_first = config.parallel_residual_order == "sublayers_first"
        self.shared_norm = config.use_parallel_residual and config.parallel_shared_norm
        self.residual_multiplier = config.residual_multiplier
        self.self_attn = (ArchLMLatentAttention if config.kv_lora_rank else ArchLMAttention)(config, layer_idx)
        self.mlp = ArchLMSparseMoeBlock(config) if config.layer_is_sparse(layer_idx) else MLP_CLASSES[config.mlp_type](config)
        hidden, position = config.hidden_size, config.norm_position
        inputs, outputs = position in ("pre", "sandwich"), position in ("sandwich", "sublayer_output")
        self.input_layernorm = optional_norm(config, inputs or self.post_norm, hidden)
        self.attention_output_layernorm = optional_norm(config, outputs, hidden)
        # a parallel post-norm block has one add, so one norm after it
        self.post_attention_layernorm = optional_norm(
            config, (inputs and not self.shared_norm) or (self.post_norm and not self.parallel), hidden
        )
        self.mlp_output_layernorm = optional_norm(config, outputs, hidden)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def feed_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLP's output, and its router logits (None for a dense MLP)."""
        output = self.mlp(hidden_states)
        return output if isinstance(output, tuple) else (output, None)

    def residual(self, sublayer_output: torch.Tensor) -> torch.Tensor:
        if self.training:  # dropout is the identity in eval: decoding skips the call, which it would pay per token
            sublayer_output = self.dropout(sublayer_output)
        return sublayer_output if self.residual_multiplier == 1 else sublayer_output * self.residual_multiplier

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # post-norm puts its two norms after the adds; every other position normalises the sublayers' inputs
        before_attention = hidden_states if self.post_norm else self.input_layernorm(hidden_states)
        attn_output, attn_weights = self.self_attn(
            before_attention, position_embeddings=position_embeddings, attention_mask=attention_mask,
            past_key_values=past_key_values, **kwargs,
        )
        attn_output = self.attention_output_layernorm(attn_output)
        if self.parallel:  # both sublayers read the block's input
            before_mlp = before_attention if self.shared_norm else self.post_attention_layernorm(hidden_states)
            mlp_output, router_logits = self.feed_forward(before_mlp)
            attn_output, mlp_output = self.residual(attn_output), self.residual(self.mlp_output_layernorm(mlp_output))
            # the same sum, rounded in the family's order (parallel_residual_order)
            if self.sublayers_first:
                hidden_states = attn_output + mlp_output + hidden_states
            else:
                hidden_states = hidden_states + attn_output + mlp_output
            return (self.input_layernorm(hidden_states) if self.post_norm else hidden_states), attn_weights, router_logits

        hidden_states = hidden_states + self.residual(attn_output)
        if self.post_norm:
            hidden_states = self.input_layernorm(hidden_states)
        mlp_output, router_logits = self.feed_forward(
            hidden_states if self.post_norm else self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.residual(self.mlp_output_layernorm(mlp_output))
        if self.post_norm:
            hidden_states = self.post_attention_layernorm(hidden_states)
        return hidden_states, attn_weights, router_logits


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def check_safetensors_file(path: Path) -> None:
    """Raise an OSError naming `path` unless it is a complete safetensors file: an 8-byte header length, a JSON
    header, then exactly the bytes its offsets promise. A truncated copy fails here, before any tensor is read,
    instead of deep inside the loader with an error that names no file. (Plain json: remote code imports only
    torch and transformers.)"""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + header_length > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(handle.read(header_length))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise OSError(f"{path} is not a valid safetensors file ({error}); save or download it again.") from error
    if 8 + header_length + data_end != size:
        raise OSError(
            f"{path} is truncated or corrupt: its header promises {8 + header_length + data_end} bytes, the file has "
            f"{size}. Save or download it again."
        )


# Every Auto class a saved folder opens with (trust_remote_code=True)
AUTO_MAP = {
    "AutoConfig": "configuration_archlm.ArchLMConfig",
    "AutoModel": "modeling_archlm.ArchLMModel",
    "AutoModelForCausalLM": "modeling_archlm.ArchLMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_archlm.ArchLMForSequenceClassification",
}


class ArchLMPreTrainedModel(PreTrainedModel):
    config_class = ArchLMConfig
    config: ArchLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArchLMDecoderLayer"]
    # the routing bias moves by steps of ~1e-3, which bfloat16 rounds away at its size (DeepSeek-V3 does the same)
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """`normal`: N(0, initializer_range). `scaled` (GPT-2 / nanoGPT): the same, truncated at 2 std, and the
        projections that write into the residual stream (o_proj, down_proj) divided by sqrt(2 * layers), so the
        residual variance does not grow with depth. `magneto` (Foundation Transformers, Wang et al. 2022, for
        Sub-LN): Xavier-normal matrices, with gain sqrt(log(2 * layers)) on v_proj, o_proj and the MLP (gain 1 on
        q_proj and k_proj); embeddings and the head stay N(0, initializer_range). The Linears carry their role
        (`is_residual_output`, `magneto_scaled`), set by their block: transformers skips parameter-less modules
        (attention, MLP) when it initialises remote code, so the rule has to live on the Linear itself.
        Norms start as the identity: weight 1 (0 for (1 + weight) RMSNorm), bias 0."""
        config = self.config
        std = config.initializer_range
        scaled = config.init_scheme == "scaled"
        if isinstance(module, nn.Linear) and config.init_scheme == "magneto" and module is not getattr(self, "lm_head", None):
            gain = math.sqrt(math.log(2 * config.num_hidden_layers)) if getattr(module, "magneto_scaled", False) else 1.0
            init.xavier_normal_(module.weight, gain=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            if scaled and getattr(module, "is_residual_output", False):
                std = std / math.sqrt(2 * config.num_hidden_layers)
            if scaled:
                init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ArchLMExperts):  # the same rules, expert by expert; down_proj writes the residual
            for name, parameter in module.named_parameters(recurse=False):
                if getattr(parameter, "_is_hf_initialized", False):  # loaded from a checkpoint
                    continue
                if name.endswith("_bias"):
                    init.zeros_(parameter)
                    continue
                for expert in parameter:
                    if config.init_scheme == "magneto":
                        init.xavier_normal_(expert, gain=math.sqrt(math.log(2 * config.num_hidden_layers)))
                    elif scaled:
                        expert_std = std / math.sqrt(2 * config.num_hidden_layers) if name == "down_proj" else std
                        init.trunc_normal_(expert, mean=0.0, std=expert_std, a=-2 * expert_std, b=2 * expert_std)
                    else:
                        init.normal_(expert, mean=0.0, std=std)
        elif isinstance(module, (ArchLMRMSNorm, ArchLMLayerNorm)):
            if module.weight is not None:
                init.zeros_(module.weight) if getattr(module, "unit_offset", False) else init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ArchLMRotaryEmbedding):
            for layer_type in module.layer_types:
                prefix = f"{layer_type}_" if layer_type else ""
                inv_freq, _ = module.frequencies(layer_type)
                init.copy_(getattr(module, f"{prefix}inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{prefix}original_inv_freq"), inv_freq)
        elif isinstance(module, ArchLMSparseMoeBlock) and hasattr(module, "e_score_correction_bias"):
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, ArchLMAttention) and hasattr(module, "sinks"):  # (its Linears are modules of their own)
            init.zeros_(module.sinks)
        else:
            super()._init_weights(module)

    def inactive_parameters(self) -> int:
        """Parameters a token does not use: the experts beyond num_experts_per_tok in each sparse layer."""
        return sum(round(parameter.numel() * (1 - self.config.num_experts_per_tok / module.num_experts))
                   for module in self.modules() if isinstance(module, ArchLMExperts) for parameter in module.parameters())

    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        """sdpa by default, eager where the architecture needs what sdpa cannot do (soft-capped scores): transformers
        falls back to eager when this raises and sdpa was not asked for, and shows the message when it was."""
        check_attention_implementation(self.config, "sdpa")
        return super()._sdpa_can_dispatch(is_init_check)

    def _flash_attn_can_dispatch(self, flash_attn_version: int = 2, is_init_check: bool = False) -> bool:
        check_attention_implementation(self.config, f"flash_attention_{flash_attn_version}")
        return super()._flash_attn_can_dispatch(flash_attn_version=flash_attn_version, is_init_check=is_init_check)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, after checking that every local `.safetensors` file is complete."""
        folder = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                check_safetensors_file(path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, made right for remote code and for sharded training:

        - every Auto class goes into `auto_map`, not only this one, so the folder also opens as a base model or a
          classifier with trust_remote_code;
        - FSDP2's `fully_shard` swaps the model's class for `FSDP<Name>`, a subclass torch defines in its own module;
          transformers would write that class into auto_map and copy torch's files instead of ours, and the folder
          would not load. The save runs as our class;
        - a gathered full state dict (FSDP, ZeRO-3) holds a tied head as a separate copy of the embedding, which
          transformers would write twice; it is pointed back at the embedding, as in the model, and saved once.
        """
        self.config.auto_map = dict(AUTO_MAP)
        state_dict = kwargs.get("state_dict")
        if state_dict is not None and self.config.tie_word_embeddings:
            for target, source in (self._tied_weights_keys or {}).items():
                pair = state_dict.get(target), state_dict.get(source)
                # plain tensors only: meta (offloaded) or sharded (DTensor) entries are not ours to compare
                plain = all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" for t in pair)
                if plain and pair[0].shape == pair[1].shape and torch.equal(*pair):
                    state_dict[target] = state_dict[source]
        wrapper = type(self)
        if not wrapper.__name__.startswith("FSDP") or wrapper.__module__ == __name__:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = next(cls for cls in wrapper.__mro__ if cls.__module__ == __name__)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapper

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """transformers' checkpointing (also reached from `gradient_checkpointing_enable`), except that `every_n_layers`
        may come inside the kwargs dict, as `gradient_checkpointing_kwargs={"every_n_layers": 2}` puts it, instead
        of reaching torch's `checkpoint()` as an unknown argument."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        every_n_layers = kwargs.pop("every_n_layers", every_n_layers)
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"`every_n_layers` must be a positive integer, got {every_n_layers!r}.")
        super().activation_checkpointing_enable(kwargs or None, every_n_layers=every_n_layers, offload=offload)


class ArchLMModel(ArchLMPreTrainedModel):
    """Embeddings -> decoder layers -> final norm (not after post-norm layers, which already end in a norm)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__(config)
        # No padding_idx: pad often equals eos, and padding_idx would freeze the eos embedding.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned" or config.learned_position_embeddings:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(ArchLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = optional_norm(config, config.norm_position != "post", config.hidden_size)
        if any(config.layer_uses_rope(i) for i in range(config.num_hidden_layers)):
            self.rotary_emb = ArchLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_seen: int):
        """Refuse bad input before any lookup, with the values in the message (not a CUDA assert or an IndexError)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if shape[1] == 0:
            raise ValueError(f"The input holds no tokens (shape {tuple(shape)}): give at least one (a prompt, or the "
                             "tokenizer's bos token).")
        if torch.compiler.is_compiling():
            return  # data-dependent checks would break the graph; eager runs have already checked
        # A cached step on an accelerator is generate feeding back the model's own tokens: reading a minimum or maximum
        # would make the host wait for the device at every step, which generate itself no longer does (the eager
        # mixture decoded at 0.76-0.79x Mixtral's speed on an H200 with these checks). The first forward is checked.
        on_device = (input_ids if input_ids is not None else inputs_embeds).device.type != "cpu"
        if torch.is_tensor(past_seen) and on_device:
            past_seen = None  # a static cache counts on the device: every one-token forward is taken for a step
        decoding_on_device = on_device and shape[1] == 1 and past_seen != 0
        if input_ids is not None and input_ids.numel() and not decoding_on_device and (
                input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"Token id {bad} is outside the vocabulary [0, {self.config.vocab_size}) (vocab_size={self.config.vocab_size}).")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            too_short = attention_mask.shape[1] < shape[1] or (past_seen == 0 and attention_mask.shape[1] != shape[1])
            if attention_mask.shape[0] != shape[0] or too_short:
                length = f"past + {shape[1]}" if past_seen is None else past_seen + shape[1]
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, which does not match the input of "
                    f"shape {tuple(shape)} (expected (batch, past + sequence length) = ({shape[0]}, {length}))."
                )
        if hasattr(self, "embed_positions") and position_ids.numel() and (
                # a step's positions stay below past + length (generate counts them from the mask): read on the host
                not decoding_on_device or past_seen is None or past_seen + shape[1] > self.config.max_position_embeddings) and (
                position_ids.max() >= self.config.max_position_embeddings):
            raise ValueError(
                f"Position {position_ids.max().item()} is beyond `max_position_embeddings`="
                f"{self.config.max_position_embeddings}: learned position embeddings cannot go past the length they "
                "were trained for. Shorten the input or build the model with a larger max_position_embeddings."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        config = self.config
        use_cache = use_cache if use_cache is not None else config.use_cache
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_router_logits = output_router_logits if output_router_logits is not None else config.output_router_logits
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; not caching in this forward.")
            use_cache = False  # for this call only: the saved config keeps its value
        check_attention_implementation(config)
        check_flex_attention_on_cpu(config, (input_ids if input_ids is not None else inputs_embeds).device)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        given_positions = position_ids is not None
        if position_ids is None:
            device = (input_ids if input_ids is not None else inputs_embeds).device
            position_ids = (torch.arange(seq_length, device=device) + past_seen).unsqueeze(0)  # (1, T)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_seen)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        hidden_states = inputs_embeds
        if config.scale_embeddings_by_sqrt_hidden:  # Gemma rounds the factor to the activations' dtype first
            hidden_states = hidden_states * torch.tensor(config.hidden_size**0.5, dtype=hidden_states.dtype)
        if config.embedding_multiplier != 1:
            hidden_states = hidden_states * config.embedding_multiplier
        absolute = position_ids  # the positions absolute embeddings read
        if config.position_ids_from_mask and not given_positions and isinstance(attention_mask, torch.Tensor) \
                and attention_mask.dim() == 2:  # OPT: the real tokens before each one (left padding shifts nothing)
            absolute = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_length:]
        if hasattr(self, "embed_positions"):
            hidden_states = hidden_states + self.embed_positions(absolute)
        if config.position_embedding_type == "sinusoidal":
            hidden_states = hidden_states + sinusoidal_embeddings(absolute, config.hidden_size, hidden_states.dtype)
        hidden_states = self.embed_dropout(hidden_states)

        # one mask and one rope table per layer type, computed once per forward and shared by its layers
        mask_kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, position_ids=position_ids)
        # (generate with a static cache hands the masks in, built per layer type from `layer_types`)
        masks = attention_mask if isinstance(attention_mask, dict) else {}
        rope_tables = {}
        for layer_type in dict.fromkeys(config.layer_types):
            if layer_type not in masks:
                masks[layer_type] = MASK_FUNCTIONS[layer_type](**mask_kwargs)
            if hasattr(self, "rotary_emb"):
                table_type = layer_type if self.rotary_emb.layer_types != [None] else None
                rope_tables[layer_type] = self.rotary_emb(hidden_states, position_ids, layer_type=table_type)
        if config.position_embedding_type == "alibi":
            # a static cache counts in a tensor that its first layer's update moves on in place: read before that
            query_start = past_seen.clone() if torch.is_tensor(past_seen) else past_seen
            kwargs.update(alibi_slopes=alibi_slopes(config.num_attention_heads, hidden_states.device), query_start=query_start)

        all_hidden_states, all_attentions, all_router_logits = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            layer_type = layer.self_attn.layer_type
            hidden_states, attn_weights, router_logits = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_embeddings=rope_tables.get(layer_type),
                past_key_values=past_key_values,
                output_attentions=output_attentions,
                **kwargs,
            )
            if output_attentions:
                all_attentions.append(attn_weights)
            if output_router_logits and router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            # attention functions that return no weights (sdpa, flash) leave nothing, as in transformers' models
            attentions=tuple(a for a in all_attentions if a is not None) if output_attentions else None,
            router_logits=tuple(all_router_logits) if output_router_logits and all_router_logits else None,
        )
        return output if return_dict else output.to_tuple()


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------
LOSS_CHUNK_BYTES = 1 << 26
LOSS_MIN_CHUNK_TOKENS = 512


def loss_chunk_size(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk of the fused loss: as many as fit LOSS_CHUNK_BYTES (64 MiB) of float32 logits, or the size of
    the hidden states if that is larger, so that the loss never needs much more memory than the layers; but at least
    LOSS_MIN_CHUNK_TOKENS, as thinner chunks make the head's matmuls slow (on a CPU at vocabulary 128k, chunks of 131
    tokens took 1.25x the plain path's time for the head and loss, chunks of 512 0.97x)."""
    budget = max(LOSS_CHUNK_BYTES, tokens * hidden_size * 4)
    return max(1, min(tokens, max(budget // (vocab_size * 4), LOSS_MIN_CHUNK_TOKENS)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the cross-entropy in one pass over chunks of tokens, so that the (tokens x vocabulary)
    logits, their log-softmax and their gradient never exist at once (the idea of Liger-Kernel's fused linear
    cross-entropy and of Cut Cross-Entropy, here in plain torch, so that it runs on any device).

    Each chunk's gradients are computed in the forward pass, while its logits exist, and kept: the backward pass
    only scales them by the incoming gradient (the Trainer's 1 / num_items_in_batch). The logits are computed as
    the plain path computes them (`lm_head`, / logits_scaling, the soft cap, then float32), so both agree to
    float tolerance. Returns the loss summed over the targets that are not ignore_index, in float32, with
    z_loss_coef x logsumexp(logits)^2 of each such target added (PaLM's z-loss; 0 adds nothing)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logits_scaling, softcap, chunk_size, ignore_index, grad_enabled,
                z_loss_coef=0.0):
        # hidden (N, C), weight (V, C), bias (V,) or None, targets (N,)
        want = [grad_enabled and needed for needed in ctx.needs_input_grad[:3]]
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, target = hidden[rows], targets[rows]
            logits = F.linear(h, weight, bias)
            product_dtype = logits.dtype
            if logits_scaling != 1:
                logits = logits / logits_scaling
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            # float32 inside the kernel: no float32 copy of a bf16 model's logits (the upcast is exact either way)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            valid = target != ignore_index
            safe_target = torch.where(valid, target, 0)[:, None]
            total -= torch.where(valid, log_probs.gather(1, safe_target).squeeze(1), 0.0).sum()
            if z_loss_coef:
                lse = logits[:, 0].float() - log_probs[:, 0]  # logsumexp, from what log_softmax computed
                total += z_loss_coef * torch.where(valid, lse.square(), 0.0).sum()
            del logits
            if not any(want):
                continue
            # d loss / d logits = softmax - one_hot(target) (+ 2 z lse softmax for the z-loss), zero on ignored rows;
            # then back through the cap and scale
            grad = log_probs.exp_()
            if z_loss_coef:
                grad.mul_((1 + 2 * z_loss_coef * lse)[:, None])
            grad.scatter_add_(1, safe_target, grad.new_full(safe_target.shape, -1.0))
            if softcap is not None:
                grad.mul_(1 - capped.float().square())
            if logits_scaling != 1:
                grad.div_(logits_scaling)
            # ignored rows get no gradient: zeroed in what multiplies `grad` (rows of h, of the hidden gradient, the
            # bias sum's weights), not in the (tokens x vocabulary) `grad` itself, and without asking the host
            # whether there are any (a wait for the device at every chunk, and a graph break under torch.compile)
            grad_in_weight_dtype = grad.to(weight.dtype)  # converted once: both products of a bf16 model use it
            if grad_hidden is not None:
                torch.mm(grad_in_weight_dtype, weight, out=grad_hidden[rows])
                grad_hidden[rows] = torch.where(valid[:, None], grad_hidden[rows], 0.0)
            if grad_weight is not None:
                kept = torch.where(valid[:, None], h, 0.0)
                if product_dtype == torch.float32:
                    grad_weight.addmm_(grad.T, kept.float())
                else:
                    # in the dtype of the head's forward product (a bf16 model, or autocast), as the plain path's
                    # backward computes it, summed over chunks in float32: a float32 product runs at a fraction of a
                    # GPU's bf16 rate (the whole training step ran 0.64x transformers' Llama on an H200)
                    low = grad_in_weight_dtype if weight.dtype == product_dtype else grad.to(product_dtype)
                    grad_weight += torch.mm(low.T, kept.to(product_dtype))
            if grad_bias is not None:
                grad_bias += valid.to(grad.dtype) @ grad
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        hidden_dtype, weight_dtype = ctx.dtypes

        def scaled(grad, dtype):
            if grad is None:
                return None
            return (grad * grad_output).to(dtype)  # 1 / the targets counted, from fused_loss

        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (scaled(grad_hidden, hidden_dtype), scaled(grad_weight, weight_dtype), scaled(grad_bias, weight_dtype),
                None, None, None, None, None, None, None)


def liger_linear_cross_entropy(hidden, weight, bias, targets, logits_scaling, softcap, ignore_index,
                               z_loss_coef: float = 0.0) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (Triton kernels, GPUs only), where it is installed: the summed loss,
    as ChunkedLinearCrossEntropy returns it. Liger caps the logits but does not scale them: Granite's
    logits_scaling goes into the weight. (No GPU runs in this project's tests: this path is exercised on GPUs.)"""
    if is_liger_kernel_available():  # (transformers' remote-code import check skips imports under such a test)
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    if logits_scaling != 1:
        weight, bias = weight / logits_scaling, None if bias is None else bias / logits_scaling
    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                            reduction="sum", softcap=softcap, lse_square_scale=z_loss_coef)
    return (loss[0] if isinstance(loss, tuple) else loss).float()  # older releases return (loss, z_loss)


class PositionLimit(StoppingCriteria):
    """Stops generating at `max_position_embeddings` tokens, past which learned absolute positions have no row."""

    def __init__(self, max_position_embeddings: int):
        self.limit = max_position_embeddings

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[-1] >= self.limit
        if done:
            logger.warning("Generation stops at max_position_embeddings=%d tokens: learned positions end there.",
                           self.limit)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ArchLMForCausalLM(ArchLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ArchLMConfig):
        super().__init__(config)
        self.model = ArchLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Cache | None = None,
                                      **kwargs):
        # longrope rotates every position by its short factors while the sequence fits original_max_position_embeddings
        # and by its long ones past it: at the step that crosses, the keys cached so far were rotated by the short
        # ones, so all of them are computed again, once (as transformers' Phi-3 does)
        switch = self.config.position_embedding_type == "rope" and min(
            (params["original_max_position_embeddings"] for params in self.config.rope_parameters_by_layer_type().values()
             if params.get("rope_type") == "longrope"), default=None)
        if past_key_values is not None and switch and input_ids.shape[1] > switch:
            if 0 < past_key_values.get_seq_length() <= switch:
                past_key_values, kwargs["next_sequence_length"] = None, None
        return super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate. Learned absolute positions end at max_position_embeddings: a longer request
        stops there, as at max_length, instead of failing at that step with what it generated lost (transformers
        serve asks for 1024 new tokens unless told otherwise)."""
        if hasattr(self.model, "embed_positions"):
            given = args[3] if len(args) > 3 else kwargs.get("stopping_criteria")  # (generate's 4th parameter)
            criteria = StoppingCriteriaList([*(given or []), PositionLimit(self.config.max_position_embeddings)])
            if len(args) > 3:
                args = (*args[:3], criteria, *args[4:])
            else:
                kwargs["stopping_criteria"] = criteria
        return super().generate(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        r"""
        skip_logits (`bool`, *optional*):
            Return the loss without the logits. By default (None) True in training mode when labels are given: the
            loss is then computed chunk by chunk with the LM head (`ChunkedLinearCrossEntropy`), and the
            (tokens x vocabulary) logits never exist at once. Pass False to get the logits in training; evaluation
            (`model.eval()`) and generation always get them.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # generate() asks only for the last position: skip the vocab projection of the prompt
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, keep, :]
        if self.config.logits_scaling_on_hidden:  # MiniCPM3's rounding (logits / scaling otherwise: self.logits)
            hidden_states = hidden_states / self.config.logits_scaling
        if skip_logits is None:  # Liger-Kernel's convention: a training forward with labels needs only the loss
            skip_logits = self.training and labels is not None
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes only the loss: it needs labels")
        fused = skip_logits and self.fused_loss_supported()
        logits = None if fused else self.logits(hidden_states)

        loss, aux_loss = None, None
        if fused:
            loss = self.fused_loss(hidden_states, labels, **kwargs)
        elif labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.config.z_loss_coef and self.training:
                loss = loss + self.z_loss(logits, labels, **kwargs)
        if skip_logits:
            logits = None
        if outputs.router_logits:  # the load-balancing loss, padding excluded: transformers' (Switch, Mixtral) for
            # softmax routers, DeepSeek-V3's sequence-wise one for sigmoid routers
            config = self.config
            # the mask of the tokens the routers saw: with a cache, the 2-D mask also covers the past
            routed = outputs.last_hidden_state.shape[1]
            token_mask = attention_mask[:, -routed:] if isinstance(attention_mask, torch.Tensor) \
                and attention_mask.dim() == 2 else None
            if config.router_scoring == "sigmoid":
                blocks = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, ArchLMSparseMoeBlock)]
                aux_loss = sequence_balance_loss(outputs.router_logits, blocks, outputs.last_hidden_state.shape[0],
                                                 token_mask)
            else:
                aux_loss = load_balancing_loss_func(outputs.router_logits, config.num_experts,
                                                    config.num_experts_per_tok, token_mask)
            if loss is not None:
                loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)
                if config.router_z_loss_coef:
                    loss = loss + config.router_z_loss_coef * router_z_loss(outputs.router_logits, token_mask)
        output = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head with Granite's logits scaling and Gemma 2's final soft cap, in the model's dtype."""
        logits = self.lm_head(hidden_states)
        if self.config.logits_scaling != 1 and not self.config.logits_scaling_on_hidden:
            logits = logits / self.config.logits_scaling
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def z_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, ignore_index: int = -100,
               shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """PaLM's z-loss: z_loss_coef x logsumexp(logits)^2 over the targets, normalised as the loss is (the mean
        over the targets, or the sum / num_items_in_batch): it keeps the softmax normaliser near 1 (log 0)."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        valid = shift_labels.to(logits.device) != ignore_index
        total = torch.where(valid, torch.logsumexp(logits.float(), dim=-1).square(), 0.0).sum()
        count = valid.sum() if num_items_in_batch is None else num_items_in_batch
        return self.config.z_loss_coef * total / (count.to(total.device) if torch.is_tensor(count) else count)

    def fused_loss_supported(self) -> bool:
        """The chunked loss reads the LM head's weight directly: only a plain nn.Linear holding ordinary tensors.
        ZeRO-3 gathers a partitioned weight only inside the module's own forward, PEFT wraps a targeted head,
        and tensor-parallel or quantized weights are tensor subclasses: those take the plain path. A head compiled
        on its own (accelerate's regional compilation) holds its weight as the plain head does."""
        head = getattr(self.lm_head, "_orig_mod", self.lm_head)  # under regional compilation, the compiled head
        return (type(head) is nn.Linear and type(head.weight.data) is torch.Tensor
                and not hasattr(head.weight, "ds_id"))

    def fused_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' causal-LM loss (`ForCausalLMLoss`: shifted labels, ignore_index, the mean over the
        targets, or the sum / num_items_in_batch as the Trainer passes it), computed without the full logits."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden_states.device)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        head = getattr(self.lm_head, "_orig_mod", self.lm_head)
        scaling, softcap = self.config.logits_scaling, self.config.final_logit_softcapping
        scaling = 1.0 if self.config.logits_scaling_on_hidden else scaling  # (the hidden states are divided already)
        z_loss_coef = self.config.z_loss_coef if self.training else 0.0  # a training loss: evaluation reports the CE
        if hidden.is_cuda and is_liger_kernel_available():
            total = liger_linear_cross_entropy(hidden, head.weight, head.bias, targets, scaling, softcap, ignore_index,
                                               z_loss_coef)
        else:
            total = ChunkedLinearCrossEntropy.apply(
                hidden, head.weight, head.bias, targets, scaling, softcap,
                loss_chunk_size(hidden.shape[0], *head.weight.shape), ignore_index, torch.is_grad_enabled(),
                z_loss_coef)
        if num_items_in_batch is None:
            return total / (targets != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (generate_batch, `transformers serve`), refused up front for ALiBi: its
        paged attention cannot take the bias, and a failure inside the batching thread would only be logged."""
        check_attention_implementation(self.config, "paged|" + self.config._attn_implementation)
        return super().init_continuous_batching(*args, **kwargs)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token at context `seq_len`, summed over the modules that compute them.

        Each Linear costs 2 FLOPs per weight per token (q/k/v/o with their real GQA sizes, the MLP, the LM head,
        tied or not; of a mixture of experts, the router, the shared expert and the active top-k experts only); each
        attention layer adds QK^T and AV at its own reach (`ArchLMAttention.score_flops`). A
        training step is forward plus backward, 3x forward. Norms, softmax and activations are left out (under 1%
        at these sizes)."""
        def size(parameter):  # ZeRO-3 leaves each rank an empty shard: DeepSpeed keeps the full size in ds_numel
            return getattr(parameter, "ds_numel", parameter.numel())

        matmul_params = sum(size(module.weight) for module in self.modules() if isinstance(module, nn.Linear))
        # a token runs num_experts_per_tok of each sparse layer's experts
        matmul_params += sum(size(parameter) * self.config.num_experts_per_tok / module.num_experts
                             for module in self.modules() if isinstance(module, ArchLMExperts)
                             for name, parameter in module.named_parameters() if not name.endswith("_bias"))
        attention = sum(layer.self_attn.score_flops(seq_len) for layer in self.model.layers)
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward


class ArchLMForSequenceClassification(GenericForSequenceClassification, ArchLMPreTrainedModel):
    """transformers' sequence classifier (as Llama's): the score of the last non-padding token, left or right
    padding alike. The base model is built here rather than through `AutoModel.from_config`, which remote code could
    not resolve without the in-process Auto registration."""

    def __init__(self, config: ArchLMConfig):
        ArchLMPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ArchLMModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "ArchLMPreTrainedModel",
    "ArchLMModel",
    "ArchLMForCausalLM",
    "ArchLMForSequenceClassification",
]
