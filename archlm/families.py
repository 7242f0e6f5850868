"""The families `archlm.convert` converts, as data: how each transformers model class maps onto ArchLM and back.

Each family is one `Family` record: which native config field holds each ArchLM field, the ArchLM values the family
fixes and those it also allows, key renames, and the few reversible weight operations (fused matrices split and
re-fused, GPT-2's Conv1D transposed, per-head norms stacked). The same record converts both ways and says what an
ArchLM config sets that the family cannot express (`Family.mismatches`). `FAMILY_LIST` is ordered: the more specific
families first, as `archlm.convert.native_family` picks the first that expresses a config.
"""

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    ArceeConfig,
    ArceeForCausalLM,
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Dots1Config,
    Dots1ForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Exaone4Config,
    Exaone4ForCausalLM,
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
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    HeliumConfig,
    HeliumForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoConfig,
    OlmoeConfig,
    OlmoeForCausalLM,
    OlmoForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SeedOssConfig,
    SeedOssForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

from .configuration_archlm import TOKEN_ID_FIELDS, ArchLMConfig, token_ids_fit
from .modeling_archlm import ArchLMForCausalLM

logger = logging.getLogger("archlm.convert")  # the converter's messages, whichever module holds the rule

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------
# Weight operations: each one maps native tensors to ArchLM's and back (`to_archlm` / `to_native`).
# Renames (`Rename`, key prefixes) come first on import and last on export; the few operations that split a fused
# matrix or regroup heads run in between. `{i}` in a key stands for the layer index, `{h}` for the head.
# ------------------------------------------------------------------------------------------------
class WeightOp:
    """A reversible operation on whole state dicts (after renaming on import, before it on export)."""

    def to_archlm(self, state_dict: StateDict, config: ArchLMConfig) -> None:
        raise NotImplementedError

    def to_native(self, state_dict: StateDict, config: ArchLMConfig) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(WeightOp):
    """GPT-2's Conv1D stores (in, out), the transpose of nn.Linear's (out, in)."""

    pattern: str  # a regex on ArchLM keys

    def to_archlm(self, state_dict, config):
        for key in [key for key in state_dict if re.search(self.pattern, key)]:
            state_dict[key] = state_dict[key].t()

    to_native = to_archlm


@dataclass(frozen=True)
class SplitRows(WeightOp):
    """One fused matrix (and bias) whose rows are parts side by side, e.g. Phi-3's qkv_proj = [q | k | v] with GQA
    sizes, or gate_up_proj = [gate | up]. `sizes` gives each part's rows from the config."""

    fused: str  # "model.layers.{i}.self_attn.qkv_proj"
    parts: tuple[str, ...]  # ("model.layers.{i}.self_attn.q_proj", ...)
    sizes: Callable[[ArchLMConfig], list[int]]

    def to_archlm(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                fused = self.fused.format(i=i) + suffix
                if fused in state_dict:
                    for part, tensor in zip(self.parts, state_dict.pop(fused).split(self.sizes(config), dim=0)):
                        state_dict[part.format(i=i) + suffix] = tensor

    def to_native(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                parts = [part.format(i=i) + suffix for part in self.parts]
                if all(part in state_dict for part in parts):
                    state_dict[self.fused.format(i=i) + suffix] = torch.cat([state_dict.pop(part) for part in parts])


@dataclass(frozen=True)
class SplitHeadInterleaved(WeightOp):
    """GPT-NeoX's query_key_value holds, per head, its q, k and v rows: (nh, 3, hd, C), not [q | k | v]."""

    fused: str
    parts: tuple[str, str, str]

    def to_archlm(self, state_dict, config):
        heads, head_dim = config.num_attention_heads, config.head_dim
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                fused = self.fused.format(i=i) + suffix
                if fused in state_dict:
                    grouped = state_dict.pop(fused).reshape(heads, 3, head_dim, -1)  # (nh, 3, hd, C or 1)
                    for j, part in enumerate(self.parts):
                        tensor = grouped[:, j].reshape(heads * head_dim, -1)
                        state_dict[part.format(i=i) + suffix] = tensor.squeeze(-1) if suffix == ".bias" else tensor

    def to_native(self, state_dict, config):
        heads, head_dim = config.num_attention_heads, config.head_dim
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                parts = [part.format(i=i) + suffix for part in self.parts]
                if all(part in state_dict for part in parts):
                    grouped = torch.stack([state_dict.pop(part).reshape(heads, head_dim, -1) for part in parts], dim=1)
                    fused = grouped.reshape(3 * heads * head_dim, -1)  # (nh, 3, hd, C) -> (3 nh hd, C)
                    state_dict[self.fused.format(i=i) + suffix] = fused.squeeze(-1) if suffix == ".bias" else fused


@dataclass(frozen=True)
class StackHeads(WeightOp):
    """StableLM keeps one LayerNorm per head (`q_layernorm.norms.{h}.weight`); ArchLM one (heads, hd) weight."""

    per_head: str  # "model.layers.{i}.self_attn.q_layernorm.norms.{h}.weight"
    stacked: str  # "model.layers.{i}.self_attn.q_norm.weight"
    heads: Callable[[ArchLMConfig], int]

    def to_archlm(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            keys = [self.per_head.format(i=i, h=h) for h in range(self.heads(config))]
            if all(key in state_dict for key in keys):
                state_dict[self.stacked.format(i=i)] = torch.stack([state_dict.pop(key) for key in keys])

    def to_native(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            if self.stacked.format(i=i) in state_dict:
                for h, row in enumerate(state_dict.pop(self.stacked.format(i=i))):
                    state_dict[self.per_head.format(i=i, h=h)] = row


@dataclass(frozen=True)
class Rename:
    """A key prefix renamed, `{i}` standing for the layer index: Rename("transformer.h.{i}.ln_1.",
    "model.layers.{i}.input_layernorm."). Written as templates rather than transformers' `WeightRenaming` regexes,
    whose reverse turns a `\\1` back-reference into a pattern: a template reverses by swapping its two sides."""

    native: str
    archlm: str

    @staticmethod
    def _pattern(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))

    def apply(self, key: str, to_archlm: bool) -> str | None:
        source, target = (self.native, self.archlm) if to_archlm else (self.archlm, self.native)
        match = self._pattern(source).match(key)
        if match is None:
            return None
        return target.format(**match.groupdict()) + key[match.end():]


def _rename(state_dict: StateDict, renames: tuple[Rename, ...], to_archlm: bool) -> StateDict:
    """Each key renamed by the first rename that matches it (one per key, so that renames never chain)."""
    renamed = {}
    for key, tensor in state_dict.items():
        new_key = next((new for rename in renames if (new := rename.apply(key, to_archlm)) is not None), key)
        renamed[new_key] = tensor
    return renamed


# ------------------------------------------------------------------------------------------------
# Families as data
# ------------------------------------------------------------------------------------------------
ANY = None  # in `allows`: every value of a field the family maps
# What an ArchLM model must be for a family to express it, unless the family fixes, maps or allows otherwise:
# the plain Llama decoder. Facets (keys starting with "_") are derived from several fields, see `_facets`.
NEUTRAL = {
    "position_embedding_type": "rope", "learned_position_embeddings": False, "_partial_rotary_factor": 1.0,
    "rope_interleaved": False, "_rope_per_layer_type": False, "_no_rope_layers": 0, "_layer_types": "full",
    "norm_type": "rmsnorm", "norm_position": "pre", "use_parallel_residual": False, "parallel_shared_norm": True,
    "sub_layernorm": False, "mlp_type": "gated", "hidden_act": "silu", "qk_norm": False, "qk_norm_scope": "head",
    "qk_norm_type": None, "clip_qkv": None, "attention_bias": False, "attention_output_bias": False,
    "mlp_bias": False, "lm_head_bias": False, "embedding_multiplier": 1.0, "scale_embeddings_by_sqrt_hidden": False,
    "residual_multiplier": 1.0, "attention_multiplier": None, "query_pre_attn_scalar": None, "logits_scaling": 1.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "num_experts": None, "norm_topk_prob": True, "_shared_expert": False, "_dense_layers": 0,
    "router_bias_update_rate": 0.0, "router_scoring": "softmax", "routed_scaling_factor": 1.0, "n_group": 1,
    "topk_group": 1, "shared_expert_gated": True, "kv_lora_rank": None, "q_lora_rank": None,
}
# Fields that matter only when another is on
_RELEVANT = {
    "parallel_shared_norm": lambda config: config.use_parallel_residual,
    "qk_norm_scope": lambda config: config.qk_norm,
    "qk_norm_type": lambda config: config.qk_norm,
    "norm_topk_prob": lambda config: config.num_experts,
    "_shared_expert": lambda config: config.num_experts,
    "_dense_layers": lambda config: config.num_experts,
    "router_bias_update_rate": lambda config: config.num_experts,
    "router_scoring": lambda config: config.num_experts,
    "routed_scaling_factor": lambda config: config.num_experts,
    "n_group": lambda config: config.num_experts,
    "topk_group": lambda config: config.num_experts and config.n_group > 1,
    "shared_expert_gated": lambda config: config.num_experts and config.shared_expert_intermediate_size,
}
# Dropped on export with a warning: inference is unchanged (they act in training only), training the export further
# is not (router_bias_update_rate: the biases it moved are exported, only their further moves are lost;
# attention_dropout: ERNIE 4.5 has none)
DROPPED_ON_EXPORT = ("hidden_dropout", "embedding_dropout", "attention_dropout", "router_z_loss_coef", "z_loss_coef",
                     "router_bias_update_rate")


def _facets(config: ArchLMConfig) -> dict:
    """Properties spread over several fields, in the form the families' rules compare."""
    sliding = config.layer_types.count("sliding_attention")
    layers = config.num_hidden_layers
    default_head_dim = config.hidden_size // config.num_attention_heads
    first_rope = next(iter(config.rope_parameters_by_layer_type().values()), None)
    rotates = [bool(rope) for rope in config.no_rope_layers or [1] * layers]
    slides = [layer_type == "sliding_attention" for layer_type in config.layer_types]
    return {
        "_partial_rotary_factor": config.rotary_dim() / config.head_dim if config.position_embedding_type == "rope" else 1.0,
        "_rope_per_layer_type": bool(set(config.rope_parameters or {}) & {"full_attention", "sliding_attention"}),
        "_no_rope_layers": layers - sum(config.no_rope_layers) if config.no_rope_layers else 0,
        "_layer_types": "full" if sliding == 0 else "sliding" if sliding == layers else "mixed",
        "_rope_theta": (first_rope or {}).get("rope_theta"),
        "_rope_type": (first_rope or {}).get("rope_type", "default"),
        "_dense_layers": sum(not config.layer_is_sparse(i) for i in range(layers)),
        # DeepSeek-V3 and dots.llm1 keep their dense layers first (first_k_dense_replace) and size their shared
        # expert as n_shared_experts x moe_intermediate_size
        "_dense_layers_first": [config.layer_is_sparse(i) for i in range(layers)] == sorted(
            config.layer_is_sparse(i) for i in range(layers)),
        "_shared_expert": bool(config.shared_expert_intermediate_size),
        "_shared_expert_whole": bool(config.num_experts) and (config.shared_expert_intermediate_size or 0)
        % config.moe_intermediate_size == 0,
        "_num_key_value_heads": "mha" if config.num_key_value_heads == config.num_attention_heads else "gqa",
        "_head_dim": "default" if config.head_dim * config.num_attention_heads == config.hidden_size
        and config.head_dim == default_head_dim else "explicit",
        # Cohere 2 and EXAONE 4 rotate q and k in their sliding layers only (EXAONE 4 without a window: in all)
        "_rope_layers": "sliding" if rotates == slides else "all" if all(rotates) and not any(slides) else "other",
    }


# what each facet stands for, in the fields a user sets (refusals name these, not the facets' internal keys): the
# field it is, with what it means, or (None) a description naming the fields it comes from
FACET_MEANINGS = {
    "_partial_rotary_factor": ("partial_rotary_factor", "the rotated share of each head, in rope_parameters"),
    "_rope_theta": ("rope_theta", "in rope_parameters"),
    "_rope_type": ("rope_type", "in rope_parameters"),
    "_no_rope_layers": ("no_rope_layers", "how many layers have no rope"),
    "_layer_types": ("layer_types", "which layers slide: 'full' none, 'sliding' all, or 'mixed'"),
    "_num_key_value_heads": ("num_key_value_heads", "'mha': one per head, or 'gqa'"),
    "_head_dim": ("head_dim", "'default': hidden_size // num_attention_heads, or 'explicit'"),
    "_rope_layers": (None, "the layers with rope (no_rope_layers) against layer_types ('sliding': the sliding ones "
                           "only; 'all': every layer, none sliding)"),
    "_rope_per_layer_type": (None, "one rope dict per layer type (rope_parameters nested by layer type)"),
    "_dense_layers": (None, "dense layers in a mixture (mlp_only_layers, decoder_sparse_step)"),
    "_dense_layers_first": (None, "dense layers before every sparse one (mlp_only_layers, decoder_sparse_step)"),
    "_shared_expert": (None, "a shared expert (shared_expert_intermediate_size)"),
    "_shared_expert_whole": (None, "a shared expert a whole number of experts wide (shared_expert_intermediate_size a "
                                   "multiple of moe_intermediate_size)"),
}


@dataclass(frozen=True)
class Family:
    """How one transformers model class maps onto ArchLM, and back, as data.

    - `fields`: ArchLM field -> the native config's field of the same meaning, copied both ways as they are;
    - `fixed`: the ArchLM values this family implies (an import sets them; an export requires them);
    - `allows`: the values a family accepts beyond NEUTRAL and `fixed` (a set, or ANY);
    - `import_fields` / `export_fields`: the few values computed from the other side's config;
    - `refuse`: native settings ArchLM cannot compute, (field, the only value ArchLM can take, reason);
    - `requires`: the values a family needs of a field it maps (or of a facet), e.g. Llama's silu;
    - `renames` (native -> ArchLM key prefixes) and `operations` for the weights; `ignore`: native keys to drop.
    Everything an ArchLM config sets that is not NEUTRAL, fixed, mapped or allowed is what the family cannot
    express: the export lists it (every such field)."""

    model_class: type[PreTrainedModel]
    config_class: type[PreTrainedConfig]
    fields: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    allows: dict[str, Any] = field(default_factory=dict)
    import_fields: Callable[[PreTrainedConfig], dict] = lambda native: {}
    export_fields: Callable[[ArchLMConfig], dict] = lambda config: {}
    requires: dict[str, set] = field(default_factory=dict)
    refuse: tuple[tuple[str, Any, str], ...] = ()
    renames: tuple[Rename, ...] = ()
    operations: tuple[WeightOp, ...] = ()
    ignore: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.model_class.__name__

    def mismatches(self, config: ArchLMConfig) -> list[str]:
        """One line per ArchLM setting this family cannot express."""
        values = {**{key: getattr(config, key) for key in NEUTRAL if not key.startswith("_")}, **_facets(config)}
        lines = []
        for key, neutral in NEUTRAL.items():
            extra = self.allows.get(key, ())
            relevant = _RELEVANT.get(key, lambda config: True)(config)
            if extra is ANY or not relevant or (key in self.fields and key not in self.allows):
                continue
            expected = {self.fixed.get(key, neutral), *extra}
            if values[key] not in expected:
                lines.append(self._needs(key, values[key], expected))
        for key, allowed in self.requires.items():
            value = values[key] if key in values else getattr(config, key)
            if value not in allowed:
                lines.append(self._needs(key, value, allowed))
        return lines

    def _needs(self, key: str, value, allowed) -> str:
        shown = " or ".join(repr(item) for item in sorted(allowed, key=repr))
        field, meaning = FACET_MEANINGS.get(key, (key, None))
        if field is None:
            return f"{meaning} = {value!r}: {self.name} needs {shown}"
        return f"`{field}`={value!r}{f' ({meaning})' if meaning else ''}: {self.name} needs {shown}"

    def to_archlm_config(self, native: PreTrainedConfig) -> ArchLMConfig:
        for native_field, supported, reason in self.refuse:
            if getattr(native, native_field, supported) != supported:
                raise _unsupported(native, native_field, getattr(native, native_field), reason)
        fields = {**_shared_fields(native), **self.fixed}
        fields.update({ours: getattr(native, theirs) for ours, theirs in self.fields.items()})
        fields.update(self.import_fields(native), converted_from=self.name)
        # a fixed value of a field that this model turns off stays unset (ArchLM refuses settings without effect):
        # Granite-MoE-Shared's shared expert is ungated, but by default it has none
        imported = SimpleNamespace(**{**{key: getattr(ArchLMConfig, key, None) for key in _RELEVANT}, **fields})
        fields = {key: value for key, value in fields.items()
                  if key not in self.fixed or key not in _RELEVANT or _RELEVANT[key](imported)}
        try:
            config = ArchLMConfig(**{key: value for key, value in fields.items() if not key.startswith("_")})
        except StrictDataclassError as error:  # huggingface_hub's validation errors are not ValueErrors
            raise ValueError(f"Cannot convert this {native.model_type} model: ArchLM refuses the config it maps to: "
                             f"{error}") from error
        # What the family cannot express on export, it does not compute either: a native setting read into ArchLM
        # that this class ignores (Llama's partial_rotary_factor) would change the logits silently.
        mismatches = self.mismatches(config)
        if mismatches:
            listed = "\n".join(f"  - {line}" for line in mismatches)
            raise ValueError(f"Cannot convert this {native.model_type} model: {self.name} does not compute what its "
                             f"config sets, so ArchLM has no equivalent for:\n{listed}")
        return config

    def to_native_config(self, config: ArchLMConfig) -> PreTrainedConfig:
        for name in DROPPED_ON_EXPORT:
            if getattr(config, name) and name not in self.fields:
                logger.warning(
                    "%s has no `%s`; exporting without it (%s=%s). Inference logits are unchanged (it acts in "
                    "training only), but training the exported model further runs without it.",
                    self.name, name, name, getattr(config, name),
                )
        fields = {**_shared_fields(config), **{theirs: copy.deepcopy(getattr(config, ours)) for ours, theirs in self.fields.items()}}
        return self.config_class(**{**fields, **self.export_fields(config)})

    def state_dict_to_archlm(self, model: PreTrainedModel, config: ArchLMConfig) -> StateDict:
        state_dict = {key: value for key, value in model.state_dict().items()
                      if not any(re.search(pattern, key) for pattern in self.ignore)}
        state_dict = _rename(state_dict, self.renames, to_archlm=True)
        for operation in self.operations:
            operation.to_archlm(state_dict, config)
        return {key: value.contiguous() for key, value in state_dict.items()}

    def state_dict_to_native(self, model: ArchLMForCausalLM) -> StateDict:
        state_dict = dict(model.state_dict())
        for operation in reversed(self.operations):
            operation.to_native(state_dict, model.config)
        return {key: value.contiguous() for key, value in _rename(state_dict, self.renames, to_archlm=False).items()}


def _unsupported(config: PreTrainedConfig, field: str, value, reason: str) -> ValueError:
    return ValueError(
        f"Cannot convert this {config.model_type} model: `{field}`={value!r} {reason}; ArchLM has no equivalent."
    )


def _shared_fields(config: PreTrainedConfig) -> dict:
    """Fields every family names the same way (GPT-2 and GPT-J through their `attribute_map`), ArchLM too: read
    from either side, and accepted by either side's constructor."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        **_special_token_ids(config),
    )


def _special_token_ids(config: PreTrainedConfig) -> dict:
    """pad/bos/eos ids; one outside the vocabulary (transformers accepts such a config with a warning) becomes None,
    with a warning naming it, so that any model transformers accepts converts."""
    ids = {}
    for name in TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if not token_ids_fit(value, config.vocab_size):
            logger.warning("%s=%r is outside the vocabulary (vocab_size=%d): converted as None", name, value,
                           config.vocab_size)
            value = None
        ids[name] = value
    return ids


def _head_dim(native: PreTrainedConfig) -> int:
    # Mistral reads `head_dim` with `or`, Llama/Qwen with getattr: both fall back to hidden / heads
    return getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads


def _any_bias(config: ArchLMConfig) -> bool:
    """One native flag for q/k/v/o: a bias the ArchLM model lacks is exported as zeros (the same function)."""
    return config.attention_bias or config.attention_output_bias


def _native_layer_types(native: PreTrainedConfig) -> dict:
    """A native `layer_types` and window as the model runs them: with no window (Qwen without use_sliding_window:
    None, or 0 in Qwen2-MoE), a layer called sliding attends to everything."""
    layer_types = list(native.layer_types or ["full_attention"] * native.num_hidden_layers)
    if not native.sliding_window:
        return dict(layer_types=["full_attention"] * len(layer_types), sliding_window=None)
    return dict(layer_types=layer_types, sliding_window=native.sliding_window)


def _window_of_every_native_layer(native: PreTrainedConfig) -> dict:
    """Families whose one `sliding_window` (None: off) applies to every layer, with no layer_types."""
    window = native.sliding_window or None
    return dict(sliding_window=window,
                layer_types=["sliding_attention" if window else "full_attention"] * native.num_hidden_layers)


def _qwen_layer_fields(config: ArchLMConfig) -> dict:
    """Qwen2/3 and SmolLM3 choose full or sliding attention per layer through `layer_types`."""
    sliding = "sliding_attention" in config.layer_types
    return dict(use_sliding_window=sliding, sliding_window=config.sliding_window, layer_types=list(config.layer_types))


def _gemma_scale(config: ArchLMConfig) -> dict:
    """Gemma 2/3 always scale scores by query_pre_attn_scalar**-0.5; ArchLM's None means head_dim."""
    return dict(query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim)


def _rope_per_layer_type(config: ArchLMConfig) -> dict:
    """Gemma 3 reads one rope dict per layer type, for both types."""
    by_type = config.rope_parameters_by_layer_type()
    shared = next(iter(by_type.values()))
    return {layer_type: copy.deepcopy(by_type.get(layer_type, shared)) for layer_type in ("full_attention", "sliding_attention")}


def _window_of_every_layer(config: ArchLMConfig) -> dict:
    """Families whose one `sliding_window` applies to every layer."""
    return dict(sliding_window=config.sliding_window if "sliding_attention" in config.layer_types else None)


def _phi3_original_length(config: ArchLMConfig) -> dict:
    """Phi-3's top-level original_max_position_embeddings overrides the one in rope_parameters: keep them equal."""
    original = (config.rope_parameters or {}).get("original_max_position_embeddings")
    return dict(original_max_position_embeddings=original or config.max_position_embeddings)


LLAMA_ACTIVATIONS = {"silu", "swish"}  # what serving engines run for the Llama-like families (ACT2FN's swish is SiLU)
GPT2_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh"}  # Gemma rewrites plain "gelu" to the tanh approximation
_LLAMA_FIELDS = dict(intermediate_size="intermediate_size", num_key_value_heads="num_key_value_heads",
                     hidden_act="hidden_act", rope_parameters="rope_parameters", attention_dropout="attention_dropout")
_PARTIAL_ROPE = {"_partial_rotary_factor": ANY}
# each family's roundings where they differ from Llama's (no effect in float32; bit-identical imports in bf16)
_OLMO_ROUNDING = dict(rope_precision="float32", layernorm_precision="float32")
_OLMO2_ROUNDING = dict(rope_precision="float32", norm_weight_fp32=True)
_SUBLAYERS_FIRST = dict(parallel_residual_order="sublayers_first")
# Gemma 2/3 and OLMo 2 call the norm on the attention output post_attention_layernorm, Llama the one before the MLP
_SANDWICH_NORMS = (
    Rename("model.layers.{i}.post_attention_layernorm.", "model.layers.{i}.attention_output_layernorm."),
    Rename("model.layers.{i}.pre_feedforward_layernorm.", "model.layers.{i}.post_attention_layernorm."),
    Rename("model.layers.{i}.post_feedforward_layernorm.", "model.layers.{i}.mlp_output_layernorm."),
)


FAMILY_LIST = [
    Family(
        GPT2LMHeadModel, GPT2Config,
        fields=dict(intermediate_size="n_inner", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                    attention_dropout="attn_pdrop", hidden_dropout="resid_pdrop", embedding_dropout="embd_pdrop"),
        fixed=dict(position_embedding_type="learned", norm_type="layernorm", mlp_type="standard", attention_bias=True,
                   attention_output_bias=True, mlp_bias=True, init_scheme="scaled"),
        allows={"norm_type": {"layernorm_nobias"}, "attention_bias": {False}, "attention_output_bias": {False},
                "mlp_bias": {False}},
        requires={"hidden_act": GPT2_ACTIVATIONS, "_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        import_fields=lambda native: dict(intermediate_size=native.n_inner or 4 * native.hidden_size),
        refuse=(("scale_attn_weights", True, "leaves attention scores unscaled by 1/sqrt(head_dim)"),
                ("scale_attn_by_inverse_layer_idx", False, "scales attention scores by 1/(layer_idx + 1) per layer"),
                ("reorder_and_upcast_attn", False, "computes attention with a reordered, upcast kernel"),
                ("add_cross_attention", False, "adds cross-attention to an encoder")),
        renames=(Rename("transformer.wte.", "model.embed_tokens."), Rename("transformer.wpe.", "model.embed_positions."),
                 Rename("transformer.ln_f.", "model.norm."),
                 Rename("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
                 Rename("transformer.h.{i}.ln_2.", "model.layers.{i}.post_attention_layernorm."),
                 Rename("transformer.h.{i}.attn.c_attn.", "model.layers.{i}.self_attn.qkv."),
                 Rename("transformer.h.{i}.attn.c_proj.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("transformer.h.{i}.mlp.c_fc.", "model.layers.{i}.mlp.up_proj."),
                 Rename("transformer.h.{i}.mlp.c_proj.", "model.layers.{i}.mlp.down_proj.")),
        operations=(Transpose(r"(self_attn\.(qkv|o_proj)|mlp\.(up|down)_proj)\.weight$"),
                    SplitRows("model.layers.{i}.self_attn.qkv", tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
                              lambda config: [config.hidden_size] * 3)),
        ignore=(r"\.attn\.(masked_)?bias$",),
    ),
    Family(
        Qwen3ForCausalLM, Qwen3Config,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(qk_norm=True),  # RMSNorm over head_dim on q and k, before rope
        allows={"attention_output_bias": ANY, "_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(_native_layer_types(native), head_dim=_head_dim(native),
                                          attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_qwen_layer_fields(config), attention_bias=_any_bias(config), hidden_act="silu"),
    ),
    Family(
        Qwen2ForCausalLM, Qwen2Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(attention_bias=True, attention_output_bias=False),  # q/k/v bias, never one on o_proj
        allows={"_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=_native_layer_types,
        export_fields=lambda config: dict(_qwen_layer_fields(config), hidden_act="silu"),
    ),
    Family(
        LlamaForCausalLM, LlamaConfig,
        # `pretraining_tp` is not refused: transformers 5 ignores it (it only sliced the same matmuls)
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(head_dim=_head_dim(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), hidden_act="silu"),
    ),
    Family(
        MistralForCausalLM, MistralConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", sliding_window="sliding_window"),
        allows={"_layer_types": {"sliding"}},  # MistralModel slides in every layer (it ignores layer_types)
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(head_dim=_head_dim(native)),
        export_fields=lambda config: dict(hidden_act="silu", **_window_of_every_layer(config)),
    ),
    Family(
        GemmaForCausalLM, GemmaConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias"),
        fixed=dict(norm_type="rmsnorm_unit_offset", scale_embeddings_by_sqrt_hidden=True, hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=_any_bias(config)),
    ),
    Family(
        Gemma2ForCausalLM, Gemma2Config,
        fields=dict(_LLAMA_FIELDS, hidden_act="hidden_activation", head_dim="head_dim", norm_eps="rms_norm_eps",
                    attention_bias="attention_bias", layer_types="layer_types", sliding_window="sliding_window",
                    query_pre_attn_scalar="query_pre_attn_scalar", attn_logit_softcapping="attn_logit_softcapping",
                    final_logit_softcapping="final_logit_softcapping"),
        fixed=dict(norm_type="rmsnorm_unit_offset", norm_position="sandwich", scale_embeddings_by_sqrt_hidden=True,
                   hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY, "_layer_types": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), **_gemma_scale(config)),
        renames=_SANDWICH_NORMS,
    ),
    Family(
        Gemma3ForCausalLM, Gemma3TextConfig,
        fields=dict(_LLAMA_FIELDS, hidden_act="hidden_activation", head_dim="head_dim", norm_eps="rms_norm_eps",
                    attention_bias="attention_bias", layer_types="layer_types", sliding_window="sliding_window",
                    query_pre_attn_scalar="query_pre_attn_scalar", final_logit_softcapping="final_logit_softcapping"),
        fixed=dict(norm_type="rmsnorm_unit_offset", norm_position="sandwich", scale_embeddings_by_sqrt_hidden=True,
                   qk_norm=True, hidden_act="gelu_pytorch_tanh"),
        allows={"attention_output_bias": ANY, "_rope_per_layer_type": ANY, "_layer_types": ANY},
        requires={"hidden_act": GEMMA_ACTIVATIONS},
        # Gemma 3 keeps attn_logit_softcapping in its config but never passes it to attention: ArchLM leaves it off
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, attn_logit_softcapping=None),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), rope_parameters=_rope_per_layer_type(config),
                                          **_gemma_scale(config)),
        renames=_SANDWICH_NORMS,
    ),
    Family(
        SmolLM3ForCausalLM, SmolLM3Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", mlp_bias="mlp_bias",
                    layer_types="layer_types", sliding_window="sliding_window", no_rope_layers="no_rope_layers"),
        allows={"attention_output_bias": ANY, "_no_rope_layers": ANY, "_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(_native_layer_types(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_qwen_layer_fields(config), attention_bias=_any_bias(config),
                                          no_rope_layers=list(config.no_rope_layers or [1] * config.num_hidden_layers),
                                          hidden_act="silu"),
    ),
    Family(
        GraniteForCausalLM, GraniteConfig,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", mlp_bias="mlp_bias",
                    embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                    attention_multiplier="attention_multiplier", logits_scaling="logits_scaling"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias),
        # Granite's attention_multiplier is the whole score scale (its default 1.0 is no 1/sqrt(head_dim))
        export_fields=lambda config: dict(attention_bias=_any_bias(config), attention_multiplier=config.attention_scaling,
                                          hidden_act="silu"),
    ),
    Family(
        OlmoForCausalLM, OlmoConfig,
        fields=dict(_LLAMA_FIELDS, attention_bias="attention_bias", clip_qkv="clip_qkv"),
        fixed=dict(norm_type="layernorm_noaffine", norm_eps=1e-5),  # OLMo's LayerNorm has no parameters, eps 1e-5
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "norm_eps": {1e-5}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, **_OLMO_ROUNDING),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), hidden_act="silu"),
    ),
    Family(
        Olmo2ForCausalLM, Olmo2Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, **_OLMO2_ROUNDING),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), hidden_act="silu"),
        renames=_SANDWICH_NORMS,
    ),
    Family(
        CohereForCausalLM, CohereConfig,
        fields=dict(_LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="attention_bias", qk_norm="use_qk_norm"),
        fixed=dict(norm_type="layernorm_nobias", use_parallel_residual=True, rope_interleaved=True,
                   qk_norm_scope="per_head"),
        allows={"attention_output_bias": ANY, "logits_scaling": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        # Cohere multiplies the logits by logit_scale, ArchLM divides by logits_scaling
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, logits_scaling=1 / native.logit_scale,
                                          rope_precision="float32_rotation", layernorm_precision="float32_explicit"),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), logit_scale=1 / config.logits_scaling,
                                          hidden_act="silu"),
    ),
    Family(
        StableLmForCausalLM, StableLmConfig,
        fields=dict(_LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="use_qkv_bias", qk_norm="qk_layernorm",
                    use_parallel_residual="use_parallel_residual", hidden_dropout="hidden_dropout"),
        fixed=dict(norm_type="layernorm", attention_output_bias=False, qk_norm_scope="per_head",
                   qk_norm_type="layernorm_nobias"),  # use_qkv_bias: never a bias on o_proj
        allows={"_partial_rotary_factor": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        export_fields=lambda config: dict(hidden_act="silu"),
        operations=(
            StackHeads("model.layers.{i}.self_attn.q_layernorm.norms.{h}.weight", "model.layers.{i}.self_attn.q_norm.weight",
                       lambda config: config.num_attention_heads),
            StackHeads("model.layers.{i}.self_attn.k_layernorm.norms.{h}.weight", "model.layers.{i}.self_attn.k_norm.weight",
                       lambda config: config.num_key_value_heads),
        ),
    ),
    Family(
        Starcoder2ForCausalLM, Starcoder2Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="norm_epsilon", sliding_window="sliding_window",
                    hidden_dropout="residual_dropout", embedding_dropout="embedding_dropout"),
        fixed=dict(norm_type="layernorm", mlp_type="standard", hidden_act="gelu_pytorch_tanh"),
        # `use_bias` covers q/k/v/o and the MLP; the biases the ArchLM model lacks are exported as zeros
        allows={"attention_bias": ANY, "attention_output_bias": ANY, "mlp_bias": ANY, "_layer_types": {"sliding"}},
        requires={"_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_bias=native.use_bias, attention_output_bias=native.use_bias,
                                          mlp_bias=native.use_bias),
        export_fields=lambda config: dict(use_bias=_any_bias(config) or config.mlp_bias, **_window_of_every_layer(config)),
        renames=(Rename("model.layers.{i}.mlp.c_fc.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.layers.{i}.mlp.c_proj.", "model.layers.{i}.mlp.down_proj.")),
    ),
    Family(
        PhiForCausalLM, PhiConfig,
        fields=dict(_LLAMA_FIELDS, norm_eps="layer_norm_eps", qk_norm="qk_layernorm", hidden_dropout="resid_pdrop",
                    embedding_dropout="embd_pdrop"),
        fixed=dict(norm_type="layernorm", use_parallel_residual=True, mlp_type="standard", hidden_act="gelu_new",
                   attention_bias=True, attention_output_bias=True, mlp_bias=True, lm_head_bias=True),
        # every Linear has a bias, and the norms: those the ArchLM model lacks are exported as zeros
        allows={"attention_bias": {False}, "attention_output_bias": {False}, "mlp_bias": {False},
                "lm_head_bias": {False}, "norm_type": {"layernorm_nobias"}, "_partial_rotary_factor": ANY},
        requires={"_head_dim": {"default"}},
        import_fields=lambda native: dict(_SUBLAYERS_FIRST),
        renames=(Rename("model.final_layernorm.", "model.norm."),
                 Rename("model.layers.{i}.self_attn.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("model.layers.{i}.self_attn.q_layernorm.", "model.layers.{i}.self_attn.q_norm."),
                 Rename("model.layers.{i}.self_attn.k_layernorm.", "model.layers.{i}.self_attn.k_norm."),
                 Rename("model.layers.{i}.mlp.fc1.", "model.layers.{i}.mlp.up_proj."),
                 Rename("model.layers.{i}.mlp.fc2.", "model.layers.{i}.mlp.down_proj.")),
    ),
    Family(
        Phi3ForCausalLM, Phi3Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", sliding_window="sliding_window", hidden_dropout="resid_pdrop"),
        allows={"_partial_rotary_factor": ANY, "_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        export_fields=lambda config: dict(hidden_act="silu", **_window_of_every_layer(config), **_phi3_original_length(config)),
        operations=(
            SplitRows("model.layers.{i}.self_attn.qkv_proj", tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
                      lambda config: [config.num_attention_heads * config.head_dim] + [config.num_key_value_heads * config.head_dim] * 2),
            SplitRows("model.layers.{i}.mlp.gate_up_proj", ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
                      lambda config: [config.intermediate_size] * 2),
        ),
    ),
    Family(
        GPTNeoXForCausalLM, GPTNeoXConfig,
        fields=dict(intermediate_size="intermediate_size", hidden_act="hidden_act", rope_parameters="rope_parameters",
                    attention_dropout="attention_dropout", norm_eps="layer_norm_eps", attention_bias="attention_bias",
                    use_parallel_residual="use_parallel_residual", hidden_dropout="hidden_dropout"),
        fixed=dict(norm_type="layernorm", mlp_type="standard", mlp_bias=True, parallel_shared_norm=False,
                   hidden_act="gelu"),
        allows={"attention_output_bias": ANY, "mlp_bias": {False}, "norm_type": {"layernorm_nobias"},
                "_partial_rotary_factor": ANY},
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}},
        # NeoX's hidden_dropout drops the embeddings too
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, embedding_dropout=native.hidden_dropout,
                                          **(_SUBLAYERS_FIRST if native.use_parallel_residual else {})),
        export_fields=lambda config: dict(attention_bias=_any_bias(config)),
        renames=(Rename("gpt_neox.embed_in.", "model.embed_tokens."), Rename("gpt_neox.final_layer_norm.", "model.norm."),
                 Rename("gpt_neox.layers.{i}.attention.dense.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("gpt_neox.layers.{i}.attention.query_key_value.", "model.layers.{i}.self_attn.query_key_value."),
                 Rename("gpt_neox.layers.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
                 Rename("gpt_neox.layers.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj."),
                 Rename("gpt_neox.layers.", "model.layers.")),
        operations=(SplitHeadInterleaved("model.layers.{i}.self_attn.query_key_value",
                                         tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),),
        ignore=(r"\.attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$"),
    ),
    Family(
        GPTJForCausalLM, GPTJConfig,
        fields=dict(intermediate_size="n_inner", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                    attention_dropout="attn_pdrop", hidden_dropout="resid_pdrop", embedding_dropout="embd_pdrop"),
        fixed=dict(norm_type="layernorm", use_parallel_residual=True, mlp_type="standard", rope_interleaved=True,
                   mlp_bias=True, lm_head_bias=True, hidden_act="gelu_new"),
        allows={"mlp_bias": {False}, "lm_head_bias": {False}, "norm_type": {"layernorm_nobias"}, "_partial_rotary_factor": ANY},
        # GPT-J's rope is the default one with theta 10000, its sin/cos table hard-coded
        requires={"_num_key_value_heads": {"mha"}, "_head_dim": {"default"}, "_rope_type": {"default"}, "_rope_theta": {10000.0}},
        import_fields=lambda native: dict(
            _SUBLAYERS_FIRST, intermediate_size=native.n_inner or 4 * native.hidden_size,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": native.rotary_dim / (native.hidden_size // native.num_attention_heads)}),
        export_fields=lambda config: dict(rotary_dim=config.rotary_dim()),
        renames=(Rename("transformer.wte.", "model.embed_tokens."), Rename("transformer.ln_f.", "model.norm."),
                 Rename("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
                 Rename("transformer.h.{i}.attn.out_proj.", "model.layers.{i}.self_attn.o_proj."),
                 Rename("transformer.h.{i}.attn.", "model.layers.{i}.self_attn."),
                 Rename("transformer.h.{i}.mlp.fc_in.", "model.layers.{i}.mlp.up_proj."),
                 Rename("transformer.h.{i}.mlp.fc_out.", "model.layers.{i}.mlp.down_proj.")),
        ignore=(r"\.attn\.(masked_)?bias$", r"embed_positions$"),
    ),
]


def _rope_in_sliding_layers(native: PreTrainedConfig, rope_without_window: bool) -> dict:
    """Cohere 2 and EXAONE 4 rotate q and k in their sliding layers only, the full ones going without rope. Without
    a window every layer attends fully: EXAONE 4's all with rope, Cohere 2's all without (though its model cannot
    run without one: it always builds the sliding mask)."""
    fields = _native_layer_types(native)
    if not native.sliding_window and rope_without_window:
        return fields
    rotates = [int(layer_type == "sliding_attention") for layer_type in fields["layer_types"]]
    return dict(fields, no_rope_layers=rotates if 0 in rotates else None)


def _rope_in_sliding_layers_export(config: ArchLMConfig, rope_without_window: bool) -> dict:
    """A window wherever a full layer goes without rope (any will do when none slides), and always for Cohere 2."""
    rope_everywhere = not config.no_rope_layers or all(config.no_rope_layers)
    windowless = rope_without_window and rope_everywhere and "sliding_attention" not in config.layer_types
    return dict(sliding_window=None if windowless else config.sliding_window or config.max_position_embeddings,
                layer_types=list(config.layer_types))


# Glm and Glm4: partial rotary on interleaved pairs, q/k/v biases, Phi-3's fused gate_up MLP
_GLM = dict(
    fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias"),
    allows=_PARTIAL_ROPE,
    requires={"hidden_act": LLAMA_ACTIVATIONS},
    # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
    export_fields=lambda config: dict(hidden_act="silu", partial_rotary_factor=config.rotary_dim() / config.head_dim),
    operations=(SplitRows("model.layers.{i}.mlp.gate_up_proj", ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
                          lambda config: [config.intermediate_size] * 2),),
)
_GLM_FIXED = dict(rope_interleaved=True, attention_output_bias=False)  # attention_bias: q/k/v only


FAMILY_LIST += [
    Family(
        # OLMo 3: OLMo 2 with sliding layers (3 in 4 by default) and a rope dict per layer type
        Olmo3ForCausalLM, Olmo3Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", attention_bias="attention_bias", layer_types="layer_types",
                    sliding_window="sliding_window"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY, "_layer_types": ANY, "_rope_per_layer_type": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(_native_layer_types(native), attention_output_bias=native.attention_bias,
                                          **_OLMO2_ROUNDING),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), rope_parameters=_rope_per_layer_type(config),
                                          layer_types=list(config.layer_types), hidden_act="silu"),
        renames=_SANDWICH_NORMS,
    ),
    Family(
        # Ministral: Mistral's attention with full and sliding layers (layer_types)
        MinistralForCausalLM, MinistralConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", layer_types="layer_types",
                    sliding_window="sliding_window"),
        allows={"_layer_types": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        # MinistralConfig leaves head_dim None, which its attention cannot build with: read with the hidden / heads
        # fallback, written on export
        import_fields=lambda native: dict(_native_layer_types(native), head_dim=_head_dim(native)),
        export_fields=lambda config: dict(layer_types=list(config.layer_types), hidden_act="silu"),
    ),
    Family(
        # Arcee (AFM): Llama with an ungated MLP, ReLU squared (the only activation serving engines run for it)
        ArceeForCausalLM, ArceeConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(mlp_type="standard", hidden_act="relu2"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": {"relu2"}},
        import_fields=lambda native: dict(head_dim=_head_dim(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(attention_bias=_any_bias(config)),
    ),
    Family(
        # Seed-OSS: Llama with separate q/k/v and o_proj biases, dropout on each sublayer's output
        SeedOssForCausalLM, SeedOssConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    attention_output_bias="attention_out_bias", mlp_bias="mlp_bias", hidden_dropout="residual_dropout"),
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        export_fields=lambda config: dict(hidden_act="silu"),
    ),
    Family(
        # Helium: Llama with interleaved rope, q/k/v biases only, RMSNorm's weight applied in float32
        HeliumForCausalLM, HeliumConfig,
        fields=dict(_LLAMA_FIELDS, head_dim="head_dim", norm_eps="rms_norm_eps", attention_bias="attention_bias",
                    mlp_bias="mlp_bias"),
        fixed=dict(rope_interleaved=True, attention_output_bias=False),
        # its o_proj is hidden_size wide on both sides
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(norm_weight_fp32=True),
        export_fields=lambda config: dict(hidden_act="silu"),
    ),
    Family(
        # ERNIE 4.5: Llama with interleaved rope rotated in float32; `use_bias` covers q/k/v/o and the MLP, and its
        # attention has no dropout
        Ernie4_5ForCausalLM, Ernie4_5Config,
        fields={**{key: value for key, value in _LLAMA_FIELDS.items() if key != "attention_dropout"},
                "head_dim": "head_dim", "norm_eps": "rms_norm_eps"},
        fixed=dict(rope_interleaved=True),
        # the biases the ArchLM model lacks are exported as zeros
        allows={"attention_bias": ANY, "attention_output_bias": ANY, "mlp_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(attention_bias=native.use_bias, attention_output_bias=native.use_bias,
                                          mlp_bias=native.use_bias, rope_precision="float32"),
        export_fields=lambda config: dict(use_bias=_any_bias(config) or config.mlp_bias, hidden_act="silu"),
    ),
    Family(
        # EXAONE 4: OLMo 2's norms on each sublayer's output (Llama's RMSNorm), Qwen3's per-head q/k norms, and,
        # with a window, rope in the sliding layers only
        Exaone4ForCausalLM, Exaone4Config,
        # no head_dim field in its config (the model reads it with a hidden / heads fallback): written on export
        fields=dict(_LLAMA_FIELDS, norm_eps="rms_norm_eps", layer_types="layer_types", sliding_window="sliding_window"),
        fixed=dict(norm_position="sublayer_output", qk_norm=True),
        allows={"_layer_types": ANY, "_no_rope_layers": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_rope_layers": {"sliding", "all"}},
        import_fields=lambda native: dict(_rope_in_sliding_layers(native, rope_without_window=True),
                                          head_dim=_head_dim(native)),
        export_fields=lambda config: dict(_rope_in_sliding_layers_export(config, rope_without_window=True),
                                          head_dim=config.head_dim, hidden_act="silu"),
        renames=_SANDWICH_NORMS,
    ),
    Family(GlmForCausalLM, GlmConfig, fixed=_GLM_FIXED, **_GLM),
    Family(
        # GLM-4: Glm with norms before and after each sublayer
        Glm4ForCausalLM, Glm4Config, fixed=dict(_GLM_FIXED, norm_position="sandwich"), **_GLM,
        renames=(Rename("model.layers.{i}.post_self_attn_layernorm.", "model.layers.{i}.attention_output_layernorm."),
                 Rename("model.layers.{i}.post_mlp_layernorm.", "model.layers.{i}.mlp_output_layernorm.")),
    ),
    Family(
        # Cohere 2: Cohere's parallel block without q/k norms, with sliding layers, rope in those only
        Cohere2ForCausalLM, Cohere2Config,
        fields=dict(_LLAMA_FIELDS, norm_eps="layer_norm_eps", attention_bias="attention_bias", layer_types="layer_types",
                    sliding_window="sliding_window"),
        fixed=dict(norm_type="layernorm_nobias", use_parallel_residual=True, rope_interleaved=True),
        allows={"attention_output_bias": ANY, "logits_scaling": ANY, "_layer_types": ANY, "_no_rope_layers": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "_rope_layers": {"sliding"}},
        import_fields=lambda native: dict(_rope_in_sliding_layers(native, rope_without_window=False),
                                          attention_output_bias=native.attention_bias,
                                          logits_scaling=1 / native.logit_scale, rope_precision="float32_rotation",
                                          layernorm_precision="float32_explicit"),
        export_fields=lambda config: dict(_rope_in_sliding_layers_export(config, rope_without_window=False),
                                          attention_bias=_any_bias(config), logit_scale=1 / config.logits_scaling,
                                          hidden_act="silu"),
    ),
]
# (output_router_logits is imported but exported off: transformers' MoE classes cannot generate with it on)
_EXPERT_FIELDS = dict(num_experts="num_experts", num_experts_per_tok="num_experts_per_tok",
                      router_aux_loss_coef="router_aux_loss_coef")
_QWEN_MOE_FIELDS = dict(_EXPERT_FIELDS, moe_intermediate_size="moe_intermediate_size", norm_topk_prob="norm_topk_prob",
                        decoder_sparse_step="decoder_sparse_step", mlp_only_layers="mlp_only_layers")
FAMILY_LIST += [
    Family(
        MixtralForCausalLM, MixtralConfig,
        # Mixtral's intermediate_size is its experts' width; it has no dense MLP
        fields={**{key: value for key, value in _LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
                "num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size", "head_dim": "head_dim",
                "norm_eps": "rms_norm_eps", "sliding_window": "sliding_window"},
        fixed=dict(norm_topk_prob=True),  # Mixtral always renormalises the top-k weights
        allows={"_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        # its router hands the experts float32 weights (the others cast them to the activations' dtype)
        import_fields=lambda native: dict(head_dim=_head_dim(native), intermediate_size=native.intermediate_size,
                                          output_router_logits=native.output_router_logits, router_weights_fp32=True),
        export_fields=lambda config: dict(hidden_act="silu", **_window_of_every_layer(config)),
        refuse=(("router_jitter_noise", 0.0, "multiplies the router's input by noise in training"),),
    ),
    Family(
        Qwen2MoeForCausalLM, Qwen2MoeConfig,
        fields={**_LLAMA_FIELDS, **_QWEN_MOE_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "qkv_bias",
                "shared_expert_intermediate_size": "shared_expert_intermediate_size"},
        fixed=dict(attention_output_bias=False),  # qkv_bias: q/k/v only
        allows={"_dense_layers": ANY, "_shared_expert": ANY, "_layer_types": ANY},
        # Qwen2-MoE always has its shared expert
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}, "_shared_expert": {True}},
        # its config writes sliding_window 0 (not None) when use_sliding_window is off
        import_fields=lambda native: dict(_native_layer_types(native), output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(_qwen_layer_fields(config), hidden_act="silu"),
    ),
    Family(
        Qwen3MoeForCausalLM, Qwen3MoeConfig,
        # no head_dim field in its config (the model reads it with a hidden / heads fallback): written on export
        fields={**_LLAMA_FIELDS, **_QWEN_MOE_FIELDS, "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias"},
        fixed=dict(qk_norm=True),
        # one sliding_window for every layer (use_sliding_window), no layer_types
        allows={"attention_output_bias": ANY, "_dense_layers": ANY, "_layer_types": {"sliding"}},
        requires={"hidden_act": LLAMA_ACTIVATIONS},
        import_fields=lambda native: dict(_window_of_every_native_layer(native), head_dim=_head_dim(native),
                                          attention_output_bias=native.attention_bias,
                                          output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(_window_of_every_layer(config), head_dim=config.head_dim,
                                          use_sliding_window="sliding_attention" in config.layer_types,
                                          attention_bias=_any_bias(config), hidden_act="silu"),
    ),
    Family(
        OlmoeForCausalLM, OlmoeConfig,
        # OLMoE's intermediate_size is its experts' width; it has no dense MLP
        fields={**{key: value for key, value in _LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
                "moe_intermediate_size": "intermediate_size", "norm_topk_prob": "norm_topk_prob",
                "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias", "clip_qkv": "clip_qkv"},
        fixed=dict(qk_norm=True, qk_norm_scope="full"),
        allows={"attention_output_bias": ANY},
        requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
        import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                          output_router_logits=native.output_router_logits),
        export_fields=lambda config: dict(attention_bias=_any_bias(config), hidden_act="silu"),
    ),
]
FAMILY_LIST.append(Family(
    # FlexOlmo: OLMo 2's block (norms on each sublayer's output, full-width q/k norms) with OLMoE's experts
    FlexOlmoForCausalLM, FlexOlmoConfig,
    fields={**{key: value for key, value in _LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
            "moe_intermediate_size": "intermediate_size", "norm_topk_prob": "norm_topk_prob", "norm_eps": "rms_norm_eps",
            "attention_bias": "attention_bias"},
    fixed=dict(norm_position="sublayer_output", qk_norm=True, qk_norm_scope="full"),
    allows={"attention_output_bias": ANY},
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
    import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                      output_router_logits=native.output_router_logits, **_OLMO2_ROUNDING),
    export_fields=lambda config: dict(attention_bias=_any_bias(config), hidden_act="silu"),
    renames=_SANDWICH_NORMS,
))


# Granite's multipliers on Mixtral's mixture (top-k weights: a softmax over the k logits, i.e. renormalised); the
# Shared variant adds an ungated shared MLP whose gate and up rows are one matrix
_GRANITE_MOE_FIELDS = {
    **{key: value for key, value in _LLAMA_FIELDS.items() if key != "intermediate_size"}, **_EXPERT_FIELDS,
    "num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size", "norm_eps": "rms_norm_eps",
    "attention_bias": "attention_bias", **{name: name for name in ("embedding_multiplier", "residual_multiplier",
                                                                   "attention_multiplier", "logits_scaling")}}
_GRANITE_MOE = dict(
    fixed=dict(norm_topk_prob=True),
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_head_dim": {"default"}},
    import_fields=lambda native: dict(attention_output_bias=native.attention_bias, intermediate_size=native.intermediate_size,
                                      output_router_logits=native.output_router_logits),
    # the shared MLP's before the block's: on export the first rename that matches a key wins
    renames=(Rename("model.layers.{i}.shared_mlp.input_linear.", "model.layers.{i}.mlp.shared_expert.input_linear."),
             Rename("model.layers.{i}.shared_mlp.output_linear.", "model.layers.{i}.mlp.shared_expert.down_proj."),
             Rename("model.layers.{i}.block_sparse_moe.router.", "model.layers.{i}.mlp.gate."),
             Rename("model.layers.{i}.block_sparse_moe.", "model.layers.{i}.mlp.")),
)


def _granite_moe_export(config: ArchLMConfig) -> dict:
    # Granite's attention_multiplier is the whole score scale (its default 1.0 is no 1/sqrt(head_dim))
    return dict(attention_bias=_any_bias(config), attention_multiplier=config.attention_scaling, hidden_act="silu")


FAMILY_LIST += [
    Family(GraniteMoeForCausalLM, GraniteMoeConfig, fields=_GRANITE_MOE_FIELDS,
           allows={"attention_output_bias": ANY}, export_fields=_granite_moe_export, **_GRANITE_MOE),
    Family(
        GraniteMoeSharedForCausalLM, GraniteMoeSharedConfig, fields=_GRANITE_MOE_FIELDS,
        fixed=dict(_GRANITE_MOE["fixed"], shared_expert_gated=False),
        allows={"attention_output_bias": ANY, "_shared_expert": ANY},
        requires=_GRANITE_MOE["requires"],
        import_fields=lambda native: dict(_GRANITE_MOE["import_fields"](native),
                                          shared_expert_intermediate_size=native.shared_intermediate_size or None),
        export_fields=lambda config: dict(_granite_moe_export(config),
                                          shared_intermediate_size=config.shared_expert_intermediate_size or 0),
        renames=_GRANITE_MOE["renames"],
        operations=(SplitRows("model.layers.{i}.mlp.shared_expert.input_linear",
                              ("model.layers.{i}.mlp.shared_expert.gate_proj", "model.layers.{i}.mlp.shared_expert.up_proj"),
                              lambda config: [config.shared_expert_intermediate_size] * 2),),
    ),
]


# DeepSeek-V3's mixture: a sigmoid router with its bias, group-limited top-k, scaled weights, an ungated shared expert
# of n_shared_experts x the experts' width, the dense layers first; as in transformers, no load-balancing loss
_DEEPSEEK_MOE = dict(
    fields={**{name: name for name in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "n_group",
                                       "topk_group", "routed_scaling_factor")}, "num_experts": "n_routed_experts"},
    fixed=dict(router_scoring="sigmoid", shared_expert_gated=False),
    allows={"_dense_layers": ANY, "_shared_expert": ANY, "router_bias_update_rate": ANY},
    requires={"hidden_act": LLAMA_ACTIVATIONS, "_shared_expert": {True}, "_shared_expert_whole": {True},
              "_dense_layers_first": {True}},
    renames=(Rename("model.layers.{i}.mlp.gate.e_score_correction_bias", "model.layers.{i}.mlp.e_score_correction_bias"),
             Rename("model.layers.{i}.mlp.shared_experts.", "model.layers.{i}.mlp.shared_expert.")),
)


def _deepseek_moe_import(native: PreTrainedConfig) -> dict:
    return dict(head_dim=_head_dim(native), mlp_only_layers=list(range(native.first_k_dense_replace or 0)) or None,
                shared_expert_intermediate_size=(native.n_shared_experts or 0) * native.moe_intermediate_size or None,
                router_weights_fp32=True, router_aux_loss_coef=0.0, output_router_logits=False)


def _deepseek_moe_export(config: ArchLMConfig) -> dict:
    return dict(head_dim=config.head_dim, hidden_act="silu",
                n_shared_experts=config.shared_expert_intermediate_size // config.moe_intermediate_size,
                first_k_dense_replace=sum(not config.layer_is_sparse(i) for i in range(config.num_hidden_layers)))


FAMILY_LIST += [
    Family(  # dots.llm1: DeepSeek-V3's mixture on Qwen3's attention
        Dots1ForCausalLM, Dots1Config,
        fields={**_LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], qk_norm=True),
        allows={**_DEEPSEEK_MOE["allows"], "attention_output_bias": ANY, "_layer_types": ANY},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=lambda native: dict(_deepseek_moe_import(native), **_native_layer_types(native),
                                          attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_deepseek_moe_export(config), attention_bias=_any_bias(config),
                                          sliding_window=config.sliding_window, layer_types=list(config.layer_types)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(  # DeepSeek-V3 (and Kimi K2): its mixture on multi-head latent attention, rope over head_dim channels
        DeepseekV3ForCausalLM, DeepseekV3Config,
        fields={**_LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "head_dim": "qk_rope_head_dim", "rope_interleaved": "rope_interleave",
                **{name: name for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")}},
        fixed=_DEEPSEEK_MOE["fixed"],
        allows={**_DEEPSEEK_MOE["allows"], "attention_output_bias": ANY},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=lambda native: dict(_deepseek_moe_import(native), attention_output_bias=native.attention_bias),
        export_fields=lambda config: dict(_deepseek_moe_export(config), attention_bias=_any_bias(config)),
        renames=_DEEPSEEK_MOE["renames"],
    ),
    Family(  # GLM-4.5 / 4.6: DeepSeek-V3's mixture on attention with partial rotary (NeoX's), q/k/v biases, qk norm
        Glm4MoeForCausalLM, Glm4MoeConfig,
        fields={**_LLAMA_FIELDS, **_DEEPSEEK_MOE["fields"], "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias",
                "qk_norm": "use_qk_norm"},
        fixed=dict(_DEEPSEEK_MOE["fixed"], attention_output_bias=False),
        allows={**_DEEPSEEK_MOE["allows"], **_PARTIAL_ROPE},
        requires=_DEEPSEEK_MOE["requires"],
        import_fields=_deepseek_moe_import,
        # its config's partial_rotary_factor argument (default 0.5) would override the rope dict's
        export_fields=lambda config: dict(_deepseek_moe_export(config),
                                          partial_rotary_factor=config.rotary_dim() / config.head_dim),
        renames=_DEEPSEEK_MOE["renames"],
    ),
]
FAMILIES: dict[type[PreTrainedModel], Family] = {family.model_class: family for family in FAMILY_LIST}
