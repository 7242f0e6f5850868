"""ArchLM modeling: one decoder-only transformer whose parts are chosen by `ArchLMConfig`.

This file is remote code: it travels to the Hub with every saved model, so it imports only torch,
transformers and the config (relative import). Parameter names follow transformers' Llama, so
PEFT, tensor-parallel plans and converters find `q_proj`, `gate_proj`, `input_layernorm`, ...

Each choice is a small table at the top (`NORM_CLASSES`, `MLP_CLASSES`, `POSITION_TYPES`); the
decoder layer and the model read top to bottom, with shapes noted as (B, T, C) = (batch, query
length, hidden), nh / nkv = query / key-value heads, hd = head_dim, S = key length.
"""

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_archlm import ArchLMConfig

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------------
class ArchLMRMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Llama does), so bf16 training matches transformers' models."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class ArchLMLayerNorm(nn.LayerNorm):
    """torch's LayerNorm, named so transformers' generic init and tooling recognise it."""


NORM_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "rmsnorm": ArchLMRMSNorm,
    "layernorm": partial(ArchLMLayerNorm, bias=True),
    "layernorm_nobias": partial(ArchLMLayerNorm, bias=False),
}


def make_norm(config: ArchLMConfig, size: int) -> nn.Module:
    if config.norm_type not in NORM_CLASSES:
        raise ValueError(f"Unknown norm_type {config.norm_type!r}; valid: {list(NORM_CLASSES)}")
    return NORM_CLASSES[config.norm_type](size, eps=config.norm_eps)


# ------------------------------------------------------------------------------------------------
# Positions: rope (rotates q/k), alibi (biases scores), learned / sinusoidal (added to embeddings)
# ------------------------------------------------------------------------------------------------
POSITION_TYPES = {
    "rope": "rotary embedding applied to q and k in every layer",
    "alibi": "per-head linear distance penalty added to attention scores",
    "learned": "trained absolute position table added to the token embeddings",
    "sinusoidal": "fixed sin/cos absolute positions added to the token embeddings",
    "none": "no position signal (NoPE); causal masking alone",
}


class ArchLMRotaryEmbedding(nn.Module):
    """cos/sin tables for rope, from transformers' ROPE_INIT_FUNCTIONS (default/linear/dynamic/yarn/longrope/llama3)."""

    inv_freq: torch.Tensor

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: ArchLMConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # dynamic / longrope types recompute inv_freq for long inputs
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


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


def check_alibi_attention(attn_implementation: str) -> None:
    """ALiBi needs the attention function to take its bias over every key. Flash attention takes no bias, and the
    paged implementations of continuous batching (`paged|...`) read the keys from their own cache inside the
    attention function, where the bias built for this call does not fit them: refuse both instead of dropping the
    bias (wrong tokens) or failing mid-generation."""
    if attn_implementation.startswith(("flash_attention", "paged")):
        raise ValueError(
            f"ALiBi adds a bias to attention scores, which attn_implementation={attn_implementation!r} cannot take "
            "(flash attention takes no bias; continuous batching's paged attention reads keys the bias does not "
            "cover). Use 'sdpa', 'eager' or 'flex_attention' with generate()."
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
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. GQA without copying K/V: the query heads of a group share one K/V head.

        query (B, nh, T, hd) -> (B, nkv, g, T, hd)    key/value (B, nkv, S, hd) -> (B, nkv, 1, S, hd)
    """
    batch, num_heads, query_length, head_dim = query.shape
    num_kv_heads, key_length = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    query = query.view(batch, num_kv_heads, groups, query_length, head_dim)
    scores = torch.matmul(query, key.unsqueeze(2).transpose(-1, -2)) * scaling  # (B, nkv, g, T, S)
    if position_bias is not None:
        scores = scores + position_bias.view(position_bias.shape[0], num_kv_heads, groups, query_length, key_length)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        per_head = attention_mask.shape[1] != 1  # (B, 1 or nh, T, S) -> (B, 1 or nkv, 1 or g, T, S)
        scores = scores + attention_mask.view(attention_mask.shape[0], num_kv_heads if per_head else 1,
                                              groups if per_head else 1, query_length, key_length)
    # float32 softmax; a fully masked row (all min) becomes uniform instead of NaN
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value.unsqueeze(2))  # (B, nkv, g, T, hd)
    output = output.view(batch, num_heads, query_length, head_dim).transpose(1, 2).contiguous()  # (B, T, nh, hd)
    return output, probs.view(batch, num_heads, query_length, key_length)


class ArchLMAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when there is one K/V head).

        q_proj: C -> nh * hd      k_proj, v_proj: C -> nkv * hd      o_proj: nh * hd -> C
        query heads  q0 q1 q2 q3 | q4 q5 q6 q7      (nh = 8)
        K/V heads        kv0     |     kv1          (nkv = 2, each serves a group of nh / nkv = 4)
    """

    def __init__(self, config: ArchLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_output_bias)
        self.o_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        if config.qk_norm:
            # per head, over hd (Qwen3): keeps attention logits bounded without touching the residual stream
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)

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
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # (B, T, heads, hd)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)  # (B, heads, T, hd)

        if position_embeddings is not None:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        if alibi_slopes is not None:
            kwargs["position_bias"] = alibi_bias(
                alibi_slopes, input_shape[0], query_start, input_shape[-1], key_states.shape[-2], query_states.dtype
            )
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return self.o_proj(attn_output), attn_weights


# ------------------------------------------------------------------------------------------------
# MLPs
# ------------------------------------------------------------------------------------------------
class ArchLMGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu (Shazeer 2020)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ArchLMStandardMLP(nn.Module):
    """down(act(up(x))): the GPT-2 / original Transformer MLP."""

    def __init__(self, config: ArchLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.down_proj.is_residual_output = True  # writes into the residual stream: `scaled` init shrinks it
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


MLP_CLASSES: dict[str, type[nn.Module]] = {"gated": ArchLMGatedMLP, "standard": ArchLMStandardMLP}


# ------------------------------------------------------------------------------------------------
# Decoder layer
# ------------------------------------------------------------------------------------------------
class ArchLMDecoderLayer(GradientCheckpointingLayer):
    """One block. The residual path depends on `norm_position`:

        pre-norm (GPT-2, Llama)                      post-norm (original Transformer)
        x ──┬──────────────────────► + ──►           x ──┬──────────────► + ─► input_layernorm ──►
            └► input_layernorm ► attn ┘                  └──► attn ───────┘
        x ──┬──────────────────────────────► + ──►   x ──┬──────────────► + ─► post_attention_layernorm ──►
            └► post_attention_layernorm ► mlp ┘          └──► mlp ────────┘

    `hidden_dropout` drops each sublayer's output before the residual add.
    """

    def __init__(self, config: ArchLMConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = ArchLMAttention(config, layer_idx)
        self.mlp = MLP_CLASSES[config.mlp_type](config)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attend = partial(self.self_attn, position_embeddings=position_embeddings, attention_mask=attention_mask,
                         past_key_values=past_key_values, **kwargs)
        if self.pre_norm:
            attn_output, attn_weights = attend(self.input_layernorm(hidden_states))
            hidden_states = hidden_states + self.dropout(attn_output)
            hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        else:
            attn_output, attn_weights = attend(hidden_states)
            hidden_states = self.input_layernorm(hidden_states + self.dropout(attn_output))
            hidden_states = self.post_attention_layernorm(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, attn_weights


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
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


class ArchLMPreTrainedModel(PreTrainedModel):
    config_class = ArchLMConfig
    config: ArchLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArchLMDecoderLayer"]
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
        residual variance does not grow with depth. Those projections carry `is_residual_output`, set by their block:
        transformers skips parameter-less modules (attention, MLP) when it initialises remote code, so the rule has to
        live on the Linear itself."""
        std = self.config.initializer_range
        scaled = self.config.init_scheme == "scaled"

        def normal(weight: torch.Tensor, std: float):
            if scaled:
                init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            else:
                init.normal_(weight, mean=0.0, std=std)

        if isinstance(module, (nn.Linear, nn.Embedding)):
            if scaled and getattr(module, "is_residual_output", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            normal(module.weight, std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)  # norms (ones / zeros) and rope buffers

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
        self.config.auto_map = {
            "AutoConfig": "configuration_archlm.ArchLMConfig",
            "AutoModel": "modeling_archlm.ArchLMModel",
            "AutoModelForCausalLM": "modeling_archlm.ArchLMForCausalLM",
            "AutoModelForSequenceClassification": "modeling_archlm.ArchLMForSequenceClassification",
        }
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
    """Embeddings -> decoder layers -> final norm (pre-norm only: post-norm layers already end in a norm)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__(config)
        # No padding_idx: pad often equals eos, and padding_idx would freeze the eos embedding.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned" or config.learned_position_embeddings:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(ArchLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size) if config.norm_position == "pre" else nn.Identity()
        if config.position_embedding_type == "rope":
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
        if torch.compiler.is_compiling():
            return  # data-dependent checks would break the graph; eager runs have already checked
        if input_ids is not None and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"Token id {bad} is outside the vocabulary [0, {self.config.vocab_size}) (vocab_size={self.config.vocab_size}).")
        if attention_mask is not None and attention_mask.dim() == 2:
            too_short = attention_mask.shape[1] < shape[1] or (past_seen == 0 and attention_mask.shape[1] != shape[1])
            if attention_mask.shape[0] != shape[0] or too_short:
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, which does not match the input of "
                    f"shape {tuple(shape)} (expected (batch, past + sequence length) = ({shape[0]}, {past_seen + shape[1]}))."
                )
        if hasattr(self, "embed_positions") and position_ids.numel() and position_ids.max() >= self.config.max_position_embeddings:
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
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        config = self.config
        use_cache = use_cache if use_cache is not None else config.use_cache
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; not caching in this forward.")
            use_cache = False  # for this call only: the saved config keeps its value
        if config.position_embedding_type == "alibi":
            check_alibi_attention(config._attn_implementation)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if position_ids is None:
            device = (input_ids if input_ids is not None else inputs_embeds).device
            position_ids = (torch.arange(seq_length, device=device) + past_seen).unsqueeze(0)  # (1, T)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_seen)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        hidden_states = inputs_embeds
        if hasattr(self, "embed_positions"):
            hidden_states = hidden_states + self.embed_positions(position_ids)
        if config.position_embedding_type == "sinusoidal":
            hidden_states = hidden_states + sinusoidal_embeddings(position_ids, config.hidden_size, hidden_states.dtype)
        hidden_states = self.embed_dropout(hidden_states)

        mask_function = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
        attention_mask = mask_function(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids,
        )
        # computed once per forward and shared by every layer
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if hasattr(self, "rotary_emb") else None
        if config.position_embedding_type == "alibi":
            kwargs.update(alibi_slopes=alibi_slopes(config.num_attention_heads, hidden_states.device), query_start=past_seen)

        all_hidden_states, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, attn_weights = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                output_attentions=output_attentions,
                **kwargs,
            )
            if output_attentions:
                all_attentions.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            # attention functions that return no weights (sdpa, flash) leave nothing, as in transformers' models
            attentions=tuple(a for a in all_attentions if a is not None) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class ArchLMForCausalLM(ArchLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ArchLMConfig):
        super().__init__(config)
        self.model = ArchLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
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
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # generate() asks only for the last position: skip the vocab projection of the prompt
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T_kept, V)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (generate_batch, `transformers serve`), refused up front for ALiBi: its
        paged attention cannot take the bias, and a failure inside the batching thread would only be logged."""
        if self.config.position_embedding_type == "alibi":
            check_alibi_attention("paged|" + self.config._attn_implementation)
        return super().init_continuous_batching(*args, **kwargs)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token at context `seq_len`, as this architecture computes them.

        Counted: q/k/v/o projections with their real (GQA) sizes, two or three MLP matrices, the LM head (tied
        or not, it is a matmul), and causal attention: each query sees (t + 1) keys, on average (seq_len + 1) / 2,
        at most `sliding_window`; QK^T and AV cost 2 * nh * hd FLOPs per key each. A training step is forward
        plus backward, 3x forward. Norms, softmax and activations are left out (under 1% at these sizes).
        """
        config = self.config
        hidden, head_dim = config.hidden_size, config.head_dim
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        projection_params = hidden * (2 * q_out + 2 * kv_out)
        mlp_params = (3 if config.mlp_type == "gated" else 2) * hidden * config.intermediate_size
        matmul_params = config.num_hidden_layers * (projection_params + mlp_params) + hidden * config.vocab_size
        keys_seen = (seq_len + 1) / 2
        if config.sliding_window is not None and config.sliding_window < seq_len:
            window = config.sliding_window
            # positions before the window is full see t+1 keys, the rest see exactly `window`
            keys_seen = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        attention = config.num_hidden_layers * 2 * (2 * config.num_attention_heads * head_dim * keys_seen)
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward


class ArchLMForSequenceClassification(ArchLMPreTrainedModel):
    """Classifies a sequence from the hidden state of its last non-padding token (as transformers' Llama does)."""

    def __init__(self, config: ArchLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ArchLMModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

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
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True, **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch_size = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Classifying a batch of more than one sequence needs `pad_token_id` in the config.")
        if pad_token_id is None or input_ids is None:
            last_token = torch.full((batch_size,), -1, device=logits.device)
        else:
            # rightmost non-pad token, so left and right padding both work
            non_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
            last_token = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "ArchLMPreTrainedModel",
    "ArchLMModel",
    "ArchLMForCausalLM",
    "ArchLMForSequenceClassification",
]
