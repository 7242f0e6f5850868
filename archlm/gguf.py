"""Export to llama.cpp: one GGUF file holding the weights, the architecture's settings and the tokenizer.

    python -m archlm.convert --to-gguf MODEL_DIR OUT.gguf [--dtype f32|f16|q8_0]

or from Python:

    >>> from archlm.gguf import write_gguf
    >>> write_gguf(archlm_model, tokenizer, "model.gguf", dtype="f16")

How, and why:

- Through the native export. The ArchLM model is first expressed as the transformers family that computes the
  same function (`archlm.convert.to_transformers`: LlamaForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel, ...),
  and that family is written the way llama.cpp's own converter (convert_hf_to_gguf.py) writes it: the same
  architecture name, metadata keys and tensor names (gguf's `TensorNameMap`, the table that converter uses), and
  the few layout changes llama.cpp's kernels expect (Llama's q/k rows regrouped into rotary pairs, GPT-2's
  Conv1D transposed, a mixture's experts stacked per projection). Each family is one `GgufFamily` record.
- Refused before anything is written. Whatever llama.cpp would compute differently raises a `ValueError` that
  names every such setting and why: a model with no native family, a family this module does not write (yet),
  rope scaling, a sliding window llama.cpp's architecture ignores, a bias it has no tensor for.
- Written atomically: into a temporary file next to the target, then `os.replace`d, so OUT.gguf is either the
  old file or the whole new one.
- The tokenizer travels inside: byte-level BPE tokens ("gpt2"), their types (normal, control for special
  tokens, unused for ids the tokenizer leaves empty), merges, bos/eos/pad ids, whether bos/eos are added, the chat
  template, and `tokenizer.ggml.pre`, which picks one of llama.cpp's built-in split regexes: a GGUF cannot carry
  a regex of its own. See `PRE_TOKENIZERS` for which tokenizer gets which, and `ARCHLM_SPLIT_DIFFERENCE` for
  what llama.cpp splits differently with ArchLM's own tokenizer.
- dtypes, as llama.cpp's converter chooses them: f32 everything; f16 or q8_0 for the matrices, with norms,
  biases, routers and position tables kept in float32 (q8_0 falls back to f16 for a matrix whose rows are not a
  multiple of 32 long, as llama.cpp's converter does).

Families written: GPT-2, Llama, Mistral (as llama.cpp does: the "llama" architecture), Qwen2, Qwen3, Phi-3,
StableLM, Starcoder2, Qwen2-MoE and Qwen3-MoE (`GGUF_FAMILIES`); tests/test_gguf.py checks each with llama.cpp itself
(llama-cpp-python: the same greedy tokens, logits within 1e-3 of the largest at f32) and with transformers' own
GGUF loader (`from_pretrained(..., gguf_file=...)`: equal logits at f32). That loader rebuilds the config from a
few keys and assumes the rest, which a file written here cannot change: for it to read a model back as it is,
Qwen3's head_dim must be its default 128, the expert widths Qwen2-MoE's (1408, shared 5632) and Qwen3-MoE's (768)
defaults, StableLM's and Starcoder2's rope theta 10000 (StableLM's rotated share a quarter), GPT-2's MLP 4x wide
with 1024 positions, Llama's projections without biases, and Phi-3's rope over the whole head (it ignores
`rope.dimension_count`). llama.cpp reads every one of these from the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
    StableLmForCausalLM,
    Starcoder2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from .configuration_archlm import ArchLMConfig
from .convert import from_transformers, is_archlm_model, native_family, to_transformers
from .modeling_archlm import ArchLMForCausalLM
from .tokenization_archlm import PRETOKENIZE_REGEX as ARCHLM_SPLIT
from .tokenization_archlm import VOCABULARY_FILES

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------
# Layout changes, on the native state dict before renaming (llama.cpp's converter makes the same ones)
# ------------------------------------------------------------------------------------------------


def pair_rotary_rows(state_dict: StateDict, config) -> None:
    """llama.cpp's "llama" architecture rotates neighbouring channels (2i, 2i+1); transformers' Llama rotates the
    two halves of each head (i, i + head_dim/2). Reordering the rows of q_proj and k_proj (and their biases) per
    head, from (2, head_dim/2) to (head_dim/2, 2), makes the same rotation act on the same values."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for key in list(state_dict):
        projection = key.rsplit(".", 2)[-2]
        if projection in heads and ".self_attn." in key:
            tensor = state_dict[key]
            n_head = heads[projection]
            grouped = tensor.reshape(n_head, 2, tensor.shape[0] // n_head // 2, *tensor.shape[1:])  # (nh, 2, hd/2, C)
            state_dict[key] = grouped.swapaxes(1, 2).reshape(tensor.shape)  # (nh, hd/2, 2, C) -> (nh hd, C)


def transpose_conv1d(state_dict: StateDict, config) -> None:
    """GPT-2's Conv1D stores (in, out); llama.cpp's gpt2 wants nn.Linear's (out, in) like every other matrix."""
    for key in list(state_dict):
        if re.search(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$", key):
            state_dict[key] = state_dict[key].t()


def split_fused_experts(state_dict: StateDict, config) -> None:
    """transformers 5 keeps a mixture's experts fused: `experts.gate_up_proj` (E, 2 x I, H) and
    `experts.down_proj` (E, H, I). llama.cpp keeps one stacked tensor per projection: gate, up (E, I, H) and
    down (E, H, I), named like the per-expert weights they stack."""
    for key in [key for key in state_dict if key.endswith("mlp.experts.gate_up_proj")]:
        gate, up = state_dict.pop(key).chunk(2, dim=1)  # (E, 2I, H) -> 2 x (E, I, H); gate first
        state_dict[key.replace("gate_up_proj", "gate_proj.weight")] = gate
        state_dict[key.replace("gate_up_proj", "up_proj.weight")] = up
    for key in [key for key in state_dict if key.endswith("mlp.experts.down_proj")]:
        state_dict[key + ".weight"] = state_dict.pop(key)


def flatten_shared_expert_gate(state_dict: StateDict, config) -> None:
    """Qwen2-MoE's shared-expert gate is a (1, H) Linear; llama.cpp reads it as one (H,) vector."""
    for key in [key for key in state_dict if key.endswith("mlp.shared_expert_gate.weight")]:
        state_dict[key] = state_dict[key].reshape(-1)


# ------------------------------------------------------------------------------------------------
# Metadata: {GGUFWriter method suffix: value}; {"context_length": 2048} is written by `add_context_length`
# ------------------------------------------------------------------------------------------------


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict:
    rope = config.rope_parameters or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return dict(rope_freq_base=rope.get("rope_theta", 10000.0), rope_dimension_count=int(_head_dim(config) * partial))


def _decoder(config) -> dict:
    """What every architecture here reads: sizes, head counts, the context the model was trained for."""
    return dict(
        context_length=config.max_position_embeddings, embedding_length=config.hidden_size,
        block_count=config.num_hidden_layers, feed_forward_length=config.intermediate_size,
        head_count=config.num_attention_heads, head_count_kv=config.num_key_value_heads,
    )


def _head_width(config) -> dict:
    """Written where the head width may differ from hidden / heads (llama.cpp's default)."""
    return dict(key_length=_head_dim(config), value_length=_head_dim(config))


def _experts(config) -> dict:
    return dict(expert_count=config.num_experts, expert_used_count=config.num_experts_per_tok,
                expert_feed_forward_length=config.moe_intermediate_size)


# ------------------------------------------------------------------------------------------------
# What llama.cpp does not compute: one line per setting, empty when the model can be written
# ------------------------------------------------------------------------------------------------


def _common_refusals(config, arch: str) -> list[str]:
    lines = []
    rope = getattr(config, "rope_parameters", None) or {}  # GPT-2 has none
    if rope.get("rope_type", "default") != "default":
        lines.append(f"`rope_type`={rope['rope_type']!r}: rope scaling is not written to GGUF yet (only the "
                     "default rope is, whose theta and rotated width llama.cpp reads)")
    window = _sliding_window(config)
    if window is not None:
        lines.append(f"`sliding_window`={window} (< max_position_embeddings={config.max_position_embeddings}): "
                     f"llama.cpp's {arch} architecture attends to every earlier token, it has no sliding window")
    return lines


def _sliding_window(config) -> int | None:
    """The window a sliding layer actually sees, or None where no layer slides or the window never cuts anything
    off (one at least max_position_embeddings long: then full attention is the same function)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window if window < config.max_position_embeddings else None


# GELU as llama.cpp's gpt2 computes it: the tanh approximation (ggml_gelu)
TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def _gpt2_refusals(config) -> list[str]:
    if config.activation_function not in TANH_GELU:
        return [f"`hidden_act`={config.activation_function!r}: llama.cpp's gpt2 computes GELU's tanh approximation "
                f"({', '.join(sorted(TANH_GELU))})"]
    return []


def _moe_refusals(norm_topk_prob: bool) -> Callable[[Any], list[str]]:
    """Qwen2-MoE in llama.cpp never renormalises the top-k routing weights, Qwen3-MoE always does; both route in
    every layer."""
    def refusals(config) -> list[str]:
        lines = []
        if config.norm_topk_prob != norm_topk_prob:
            lines.append(f"`norm_topk_prob`={config.norm_topk_prob}: llama.cpp's {config.model_type.replace('_', '')} "
                         f"{'always' if norm_topk_prob else 'never'} renormalises the top-k routing weights")
        dense = sorted(set(config.mlp_only_layers or [])
                       | {i for i in range(config.num_hidden_layers) if (i + 1) % config.decoder_sparse_step})
        if dense:
            lines.append(f"dense MLP layers {dense} (`mlp_only_layers` / `decoder_sparse_step`): llama.cpp's "
                         f"{config.model_type.replace('_', '')} routes every layer through its experts")
        return lines
    return refusals


# ------------------------------------------------------------------------------------------------
# Families as data
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GgufFamily:
    """How llama.cpp names, lays out and reads one transformers family.

    - `arch`: llama.cpp's architecture, which names the metadata keys and, through `gguf.TensorNameMap`, the tensors;
    - `metadata`: native config -> {GGUFWriter method suffix: value}, the keys llama.cpp reads for `arch`;
    - `refuse`: native config -> one line per setting llama.cpp computes differently (beyond `_common_refusals`);
    - `operations`: layout changes on the native state dict, in order, before renaming;
    - `no_slot`: GGUF tensor names (regexes) llama.cpp's `arch` has no tensor for. llama.cpp rejects a file holding
      an unknown tensor, so these are left out when all zero (an ArchLM export fills a bias it lacks with zeros:
      Qwen3's `attention_bias` covers o_proj, llama.cpp's qwen3 has none) and refused otherwise;
    - `zero_filled`: (GGUF name with `{i}`, size from the config) of biases llama.cpp requires, written as zeros
      where the native model has none (Starcoder2 without `use_bias`);
    - `output`: "tied" writes `output.weight` only for an untied head (llama.cpp reuses the embedding otherwise),
      "always" also for a tied one (architectures whose llama.cpp loader requires it).
    """

    arch: gguf.MODEL_ARCH
    metadata: Callable[[Any], dict]
    refuse: Callable[[Any], list[str]] = lambda config: []
    operations: tuple[Callable[[StateDict, Any], None], ...] = ()
    no_slot: tuple[str, ...] = ()
    zero_filled: tuple[tuple[str, Callable[[Any], int]], ...] = ()
    output: str = "tied"

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_LLAMA = GgufFamily(
    gguf.MODEL_ARCH.LLAMA,
    metadata=lambda config: dict(_decoder(config), **_rope(config), **_head_width(config), vocab_size=config.vocab_size,
                                 layer_norm_rms_eps=config.rms_norm_eps),
    operations=(pair_rotary_rows,),
)
_QWEN_MOE_NO_SLOT = (r"\.attn_output\.bias$",)
GGUF_FAMILIES: dict[type[PreTrainedModel], GgufFamily] = {
    LlamaForCausalLM: _LLAMA,
    MistralForCausalLM: _LLAMA,  # llama.cpp's converter writes Mistral as "llama" (it has no sliding window there)
    Qwen2ForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.QWEN2,
        metadata=lambda config: dict(_decoder(config), **_rope(config), layer_norm_rms_eps=config.rms_norm_eps),
    ),
    Qwen3ForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.QWEN3,
        metadata=lambda config: dict(_decoder(config), **_rope(config), **_head_width(config),
                                     layer_norm_rms_eps=config.rms_norm_eps),
        no_slot=(r"\.attn_output\.bias$",),
    ),
    GPT2LMHeadModel: GgufFamily(
        gguf.MODEL_ARCH.GPT2,
        metadata=lambda config: dict(
            context_length=config.n_positions, embedding_length=config.n_embd, block_count=config.n_layer,
            feed_forward_length=config.n_inner or 4 * config.n_embd, head_count=config.n_head,
            layer_norm_eps=config.layer_norm_epsilon),
        refuse=_gpt2_refusals,
        operations=(transpose_conv1d,),
    ),
    Phi3ForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.PHI3,
        metadata=lambda config: dict(
            _decoder(config), **_rope(config), layer_norm_rms_eps=config.rms_norm_eps,
            rope_scaling_orig_ctx_len=config.original_max_position_embeddings or config.max_position_embeddings,
            sliding_window=0),  # 0: no window (llama.cpp turns Phi-3's window off anyway)
    ),
    StableLmForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.STABLELM,
        metadata=lambda config: dict(_decoder(config), **_rope(config), layer_norm_eps=config.layer_norm_eps,
                                     parallel_residual=config.use_parallel_residual),
        refuse=lambda config: ["`qk_norm`=True (StableLM's per-head q/k LayerNorms): not written to GGUF yet"]
        if config.qk_layernorm else [],
        output="always",
    ),
    Starcoder2ForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.STARCODER2,
        metadata=lambda config: dict(_decoder(config), **_rope(config), layer_norm_eps=config.norm_epsilon),
        refuse=lambda config: [] if config.hidden_act in TANH_GELU else [
            f"`hidden_act`={config.hidden_act!r}: llama.cpp's starcoder2 computes GELU's tanh approximation"],
        zero_filled=(("blk.{i}.attn_output.bias", lambda config: config.hidden_size),
                     ("blk.{i}.ffn_up.bias", lambda config: config.intermediate_size),
                     ("blk.{i}.ffn_down.bias", lambda config: config.hidden_size)),
    ),
    Qwen2MoeForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.QWEN2MOE,
        metadata=lambda config: dict(_decoder(config), **_rope(config), **_experts(config),
                                     expert_shared_feed_forward_length=config.shared_expert_intermediate_size,
                                     layer_norm_rms_eps=config.rms_norm_eps),
        refuse=_moe_refusals(norm_topk_prob=False),
        operations=(split_fused_experts, flatten_shared_expert_gate),
        no_slot=_QWEN_MOE_NO_SLOT,
        output="always",
    ),
    Qwen3MoeForCausalLM: GgufFamily(
        gguf.MODEL_ARCH.QWEN3MOE,
        metadata=lambda config: dict(_decoder(config), **_rope(config), **_head_width(config), **_experts(config),
                                     layer_norm_rms_eps=config.rms_norm_eps),
        refuse=_moe_refusals(norm_topk_prob=True),
        operations=(split_fused_experts,),
        no_slot=_QWEN_MOE_NO_SLOT,
    ),
}

# Native families ArchLM exports that this module does not write (yet), and why
NOT_WRITTEN = {
    "GemmaForCausalLM": "llama.cpp runs it (\"gemma\"), but transformers' GGUF loader cannot read it back to check "
                        "a file",
    "Gemma2ForCausalLM": "llama.cpp scales its attention scores by 1/sqrt(head_dim) whatever query_pre_attn_scalar "
                         "says, and transformers' GGUF loader reads neither soft cap back to check a file",
    "Gemma3ForCausalLM": "llama.cpp scales its attention scores by 1/sqrt(head_dim) whatever query_pre_attn_scalar "
                         "says",
    "MixtralForCausalLM": "llama.cpp runs it as \"llama\" with experts, but transformers' GGUF loader reads no expert "
                          "settings back to check a file",
}
_NOT_WRITTEN_DEFAULT = "this exporter has no record for it (llama.cpp may run it under its own architecture)"

# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's (GPT-4's) split, one of llama.cpp's built-in pre-tokenizers."""

# A tokenizer's split regex -> `tokenizer.ggml.pre`, as (merges applied to every word, whole words in the
# vocabulary taken as they are = tokenizers' `ignore_merges`). llama.cpp's "llama-bpe" ignores merges like Llama 3's
# tokenizer.json; "smaug-bpe" splits the same way and applies the merges. None: llama.cpp has no such pair.
PRE_TOKENIZERS = {
    LLAMA3_SPLIT: ("smaug-bpe", "llama-bpe"),
    QWEN2_SPLIT: ("qwen2", None),
    ARCHLM_SPLIT: ("smaug-bpe", None),  # the nearest: see ARCHLM_SPLIT_DIFFERENCE
}
ARCHLM_SPLIT_DIFFERENCE = (
    "llama.cpp cannot split text with ArchLM's own regex; the file names Llama 3's split (\"smaug-bpe\"), the "
    "nearest of llama.cpp's built-in ones. Both give the same tokens for text without line breaks and for line "
    "breaks that follow punctuation or end the text, but where a line break is followed by indentation (most "
    "code) or by another line break after a word, llama.cpp (and transformers' GGUF tokenizer) cut the pieces "
    "differently, so the model sees token sequences it was not trained on there (on held-out standard-library "
    "source: 10% more tokens, no file tokenized the same). To tokenize exactly as in training, tokenize with the "
    "saved tokenizer.json and pass token ids to llama.cpp."
)


@dataclass
class GgufVocab:
    """The tokenizer as llama.cpp's BPE reads it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_token_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GgufVocab:
    """The vocabulary of `tokenizer` padded to the model's `vocab_size` (ids the tokenizer leaves empty become
    unused "[PAD{id}]" tokens, as llama.cpp's converter writes them). Raises a ValueError for a tokenizer llama.cpp
    cannot reproduce: not a byte-level BPE, a normalizer, a split llama.cpp has no built-in for, or more tokens
    than the model has embeddings."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}.")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's \"gpt2\"); this one is "
                         f"{model['type']} with a {(backend.get('decoder') or {}).get('type')} decoder.")
    normalizer = (backend.get("normalizer") or {}).get("type")
    if normalizer == "NFC":  # Qwen2's: llama.cpp's own converter writes it the same way, without the NFC step
        logger.warning("The tokenizer NFC-normalizes text; llama.cpp does not, so text not already in NFC (a "
                       "combining accent after its letter) is tokenized differently there.")
    elif normalizer is not None:
        raise ValueError(f"The tokenizer normalizes text ({normalizer}) before splitting it; llama.cpp's byte-level "
                         "BPE does not.")
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer"), bool(model.get("ignore_merges")))

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(f"The tokenizer has {len(vocab)} tokens (largest id {max(vocab.values())}), more than the "
                         f"model's vocab_size={vocab_size} embeddings.")
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(added[token_id].content)
            token_types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.NORMAL)

    # A merge is written "left right"; a space inside a part (never in a byte-level vocabulary, whose space is "Ġ")
    # is shifted by 256 code points, as gguf's SpecialVocab writes it
    merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)
              if isinstance(merge, list) else merge for merge in model["merges"]]
    special_token_ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    probe_ids, plain_ids = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return GgufVocab(
        tokens=tokens, token_types=[int(kind) for kind in token_types], merges=merges, pre=pre,
        special_token_ids={name: token_id for name, token_id in special_token_ids.items() if token_id is not None},
        add_bos=tokenizer.bos_token_id is not None and probe_ids[:1] == [tokenizer.bos_token_id] != plain_ids[:1],
        add_eos=tokenizer.eos_token_id is not None and probe_ids[-1:] == [tokenizer.eos_token_id] != plain_ids[-1:],
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    )


def _pre_tokenizer_name(pre_tokenizer: dict | None, ignore_merges: bool) -> str:
    """`tokenizer.ggml.pre` for a tokenizers pre-tokenizer: Split(regex) + ByteLevel(no regex), or GPT-2's
    ByteLevel with its own regex."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        if not ignore_merges:
            return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space") \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        regex = steps[0]["pattern"].get("Regex")
        names = PRE_TOKENIZERS.get(regex)
        if names is not None and names[ignore_merges] is not None:
            if regex == ARCHLM_SPLIT:
                logger.warning(ARCHLM_SPLIT_DIFFERENCE)
            return names[ignore_merges]
    raise ValueError(
        f"llama.cpp splits text only with its own built-in pre-tokenizers, and this tokenizer's ({kinds}, "
        f"ignore_merges={ignore_merges}) is none this exporter maps to one: Llama 3's, Qwen2's and GPT-2's splits, "
        "and ArchLM's own (written as Llama 3's)."
    )


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
DTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# Kept in float32 whatever the dtype, as llama.cpp's converter keeps them: 1-D tensors (norms, biases) are
# matched by shape; these matrices by name
FLOAT32_MATRICES = r"(_norm\.weight|\.ffn_gate_inp\.weight|\.ffn_gate_inp_shexp\.weight|^position_embd\.weight)$"


def gguf_family(model_or_config: PreTrainedModel | ArchLMConfig) -> tuple[type[PreTrainedModel], GgufFamily]:
    """The native class a model (or an ArchLM config) is written as, and its record; a ValueError says why it cannot
    be written."""
    config = model_or_config if isinstance(model_or_config, PreTrainedConfig) else model_or_config.config
    if config.model_type == ArchLMConfig.model_type:  # (the remote-code copy of ArchLMConfig too)
        try:
            native_class = native_family(config)
        except ValueError as error:
            raise ValueError(f"Cannot write {config.architecture_name} as GGUF: llama.cpp runs only the "
                             f"architectures of native families, and this model has none. {error}") from None
    else:
        native_class = type(model_or_config)
    if native_class not in GGUF_FAMILIES:
        reason = NOT_WRITTEN.get(native_class.__name__, _NOT_WRITTEN_DEFAULT)
        written = ", ".join(sorted({cls.__name__ for cls in GGUF_FAMILIES}))
        raise ValueError(f"Cannot write {_model_name(config)} as GGUF: its family {native_class.__name__} is not "
                         f"written yet: {reason}. Families written: {written}.")
    return native_class, GGUF_FAMILIES[native_class]


def _model_name(config) -> str:
    return config.architecture_name if config.model_type == ArchLMConfig.model_type else type(config).__name__.removesuffix("Config")


def refusals(native: PreTrainedModel, family: GgufFamily) -> list[str]:
    """One line per setting of `native` that llama.cpp's architecture computes differently."""
    return _common_refusals(native.config, family.arch_name) + family.refuse(native.config)


def gguf_tensors(native: PreTrainedModel, family: GgufFamily) -> dict[str, np.ndarray]:
    """The native model's weights under llama.cpp's names and layouts, float32. Raises a ValueError for a non-zero
    tensor llama.cpp has no slot for."""
    config = native.config
    state_dict = {key: tensor.detach().to("cpu", torch.float32) for key, tensor in native.state_dict().items()}
    if config.tie_word_embeddings and family.output != "always":
        state_dict.pop("lm_head.weight", None)  # llama.cpp reuses token_embd
    for operation in family.operations:
        operation(state_dict, config)

    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tensors, no_slot = {}, []
    for key, tensor in state_dict.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"{key} has no GGUF name in llama.cpp's {family.arch_name}; please report this as a bug.")
        if any(re.search(pattern, name) for pattern in family.no_slot):
            if torch.count_nonzero(tensor):
                no_slot.append(f"{key} ({name}): llama.cpp's {family.arch_name} has no such tensor, and this one is "
                               "not zero")
            continue
        tensors[name] = tensor.numpy()
    if no_slot:
        raise ValueError(f"Cannot write {type(native).__name__} as GGUF:\n" + "\n".join(f"  - {line}" for line in no_slot))
    for template, size in family.zero_filled:
        for i in range(config.num_hidden_layers):
            tensors.setdefault(template.format(i=i), np.zeros(size(config), dtype=np.float32))
    return tensors


def _quantize(name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = DTYPES[dtype][1]
    if array.ndim <= 1 or re.search(FLOAT32_MATRICES, name):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError as error:  # q8_0 packs rows in blocks of 32
        logger.info("%s: %s; written as f16", name, error)
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


@torch.no_grad()
def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
               dtype: str = "f32") -> Path:
    """Writes `model` (an `ArchLMForCausalLM`, or a native model of a family in `GGUF_FAMILIES`) and `tokenizer`
    to the GGUF file `path`, atomically. `dtype`: "f32", "f16" or "q8_0". Everything that can be refused is
    refused (ValueError) before the file is opened."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; GGUF export writes {', '.join(DTYPES)}.")
    if not is_archlm_model(model):
        gguf_family(model)  # a class not written here is refused before converting it
        model = from_transformers(model)  # refuses what a native config sets that ArchLM, and so this, cannot compute
    native_class, family = gguf_family(model)
    native = to_transformers(model)
    lines = refusals(native, family)
    if lines:
        listed = "\n".join(f"  - {line}" for line in lines)
        raise ValueError(f"Cannot write {_model_name(model.config)} ({native_class.__name__}) as GGUF: llama.cpp's "
                         f"{family.arch_name} architecture does not compute\n{listed}")
    tensors = gguf_tensors(native, family)
    vocab = gguf_vocab(tokenizer, native.config.vocab_size)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    writer = gguf.GGUFWriter(temporary, family.arch_name)
    try:
        _add_metadata(writer, family, native.config, _model_name(model.config), dtype)
        _add_vocab(writer, vocab)
        for name, array in tensors.items():
            data, qtype = _quantize(name, array, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        writer.close()  # a no-op once closed
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info("Wrote %s (%s, llama.cpp architecture %s, %s, %d tensors, tokenizer.ggml.pre=%s)", path,
                native_class.__name__, family.arch_name, dtype, len(tensors), vocab.pre)
    return path


def _add_metadata(writer: gguf.GGUFWriter, family: GgufFamily, config, name: str, dtype: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value in family.metadata(config).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(DTYPES[dtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_token_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f32",
                overwrite: bool = False) -> Path:
    """Loads the model saved in `model_dir` (an ArchLM folder, or a native one of a family in `GGUF_FAMILIES`) and
    its tokenizer, and writes them to the GGUF file `out_path` (see `write_gguf`). An existing `out_path` is only
    replaced with `overwrite`."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"OUT {str(out_path)!r} is a folder; give the path of the .gguf file to write.")
    if out_path.exists() and not overwrite:
        raise ValueError(f"OUT {str(out_path)!r} exists; pass --overwrite (overwrite=True in Python) to replace it.")
    if not any((model_dir / name).exists() for name in VOCABULARY_FILES):
        raise ValueError(f"{str(model_dir)!r} holds no tokenizer ({', '.join(VOCABULARY_FILES)}): llama.cpp needs the "
                         "vocabulary inside the GGUF file. Save the tokenizer into the model folder first.")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == ArchLMConfig.model_type:
        gguf_family(ArchLMConfig.from_pretrained(model_dir))  # refuses what cannot be written before loading
        model = ArchLMForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return write_gguf(model.eval(), tokenizer, out_path, dtype=dtype)
