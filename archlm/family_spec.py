"""How a transformers family is written down for `archlm.convert`: the `Family` record, the reversible weight
operations (`Transpose`, `SplitRows`, `SplitGroupedQKV`, `StackHeads`) and key renames (`Rename`), the neutral
ArchLM config a family departs from, and the helpers and field maps the records share. The records themselves are in
`archlm.families` (dense models), `archlm.families_moe` (mixtures of experts) and `archlm.families_more`.
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
from transformers import PreTrainedConfig, PreTrainedModel

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
class OffsetRows(WeightOp):
    """OPT's learned positions are looked up at position + 2: its table has two leading rows no real token reads
    (left padding's pads read the second), dropped on import and written as zeros on export."""

    key: str  # "model.embed_positions.weight"
    offset: int

    def to_archlm(self, state_dict, config):
        if self.key in state_dict:
            state_dict[self.key] = state_dict[self.key][self.offset:]

    def to_native(self, state_dict, config):
        if self.key in state_dict:
            table = state_dict[self.key]
            state_dict[self.key] = torch.cat([table.new_zeros(self.offset, table.shape[1]), table])


@dataclass(frozen=True)
class SplitGroupedQKV(WeightOp):
    """A fused qkv holding, per key/value head, its group's query heads, then its key and its value:
    (kv, heads / kv + 2, hd, C). Falcon's with any grouping; with one key/value head per head it is GPT-NeoX's and
    Persimmon's per-head (nh, 3, hd) layout, with one for all GPT-BigCode's multi-query [q | k | v]."""

    fused: str
    parts: tuple[str, str, str]

    def to_archlm(self, state_dict, config):
        kv, head_dim = config.num_key_value_heads, config.head_dim
        group = config.num_attention_heads // kv
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                fused = self.fused.format(i=i) + suffix
                if fused in state_dict:
                    grouped = state_dict.pop(fused).reshape(kv, group + 2, head_dim, -1)
                    for part, tensor in zip(self.parts, (grouped[:, :group], grouped[:, group], grouped[:, group + 1])):
                        tensor = tensor.reshape(-1, tensor.shape[-1])
                        state_dict[part.format(i=i) + suffix] = tensor.squeeze(-1) if suffix == ".bias" else tensor

    def to_native(self, state_dict, config):
        kv, head_dim = config.num_key_value_heads, config.head_dim
        group = config.num_attention_heads // kv
        for i in range(config.num_hidden_layers):
            for suffix in (".weight", ".bias"):
                parts = [part.format(i=i) + suffix for part in self.parts]
                if all(part in state_dict for part in parts):
                    q, k, v = (state_dict.pop(part) for part in parts)
                    width = q.shape[-1] if q.dim() == 2 else 1
                    grouped = torch.cat([q.reshape(kv, group, head_dim, width), k.reshape(kv, 1, head_dim, width),
                                         v.reshape(kv, 1, head_dim, width)], dim=1)
                    fused = grouped.reshape(-1, width)
                    state_dict[self.fused.format(i=i) + suffix] = fused.squeeze(-1) if suffix == ".bias" else fused


@dataclass(frozen=True)
class LeadingAxis(WeightOp):
    """ERNIE 4.5 keeps its routing bias with a leading axis of one (one group of experts: (1, E)); ArchLM as (E,)."""

    key: str  # "model.layers.{i}.mlp.e_score_correction_bias"

    def to_archlm(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            if self.key.format(i=i) in state_dict:
                state_dict[self.key.format(i=i)] = state_dict[self.key.format(i=i)].squeeze(0)

    def to_native(self, state_dict, config):
        for i in range(config.num_hidden_layers):
            if self.key.format(i=i) in state_dict:
                state_dict[self.key.format(i=i)] = state_dict[self.key.format(i=i)].unsqueeze(0)


@dataclass(frozen=True)
class ParallelNorms(WeightOp):
    """Falcon names a parallel block's two norms ln_attn and ln_mlp, and a block with one or two norms otherwise
    input_layernorm (and post_attention_layernorm): renamed only where the block has two parallel norms."""

    prefix: str = "model.layers.{i}."
    names: tuple[tuple[str, str], ...] = (("ln_attn.", "input_layernorm."), ("ln_mlp.", "post_attention_layernorm."))

    def _rename(self, state_dict, config, to_archlm: bool):
        for i in range(config.num_hidden_layers):
            for native, ours in self.names:
                source, target = (native, ours) if to_archlm else (ours, native)
                for key in [key for key in state_dict if key.startswith(self.prefix.format(i=i) + source)]:
                    state_dict[self.prefix.format(i=i) + target + key[len(self.prefix.format(i=i) + source):]] = \
                        state_dict.pop(key)

    def to_archlm(self, state_dict, config):
        self._rename(state_dict, config, to_archlm=True)

    def to_native(self, state_dict, config):
        if config.use_parallel_residual and not config.parallel_shared_norm:
            self._rename(state_dict, config, to_archlm=False)


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
class TransposedInterleavedExperts(WeightOp):
    """gpt-oss stores its experts (in, out), not nn.Linear's (out, in), and its gate_up_proj's gate and up columns
    interleaved: (E, C, 2I) with gate at even columns, up at odd; its bias (E, 2I) likewise. ArchLM stacks
    (E, 2I, C) as [gate rows | up rows] and down_proj (E, C, I)."""

    prefix: str = "model.layers.{i}.mlp.experts."

    def _each(self, state_dict, config, convert: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        for i in range(config.num_hidden_layers):
            for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
                key = self.prefix.format(i=i) + name
                if key in state_dict:
                    state_dict[key] = convert(name, state_dict[key])

    def to_archlm(self, state_dict, config):
        def convert(name, tensor):
            tensor = tensor.transpose(1, 2) if name.endswith("_proj") else tensor  # (E, out, in)
            return torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1) if name.startswith("gate_up") else tensor

        self._each(state_dict, config, convert)

    def to_native(self, state_dict, config):
        def convert(name, tensor):
            if name.startswith("gate_up"):  # [gate | up] rows -> gate, up, gate, up, ...
                tensor = torch.stack(tensor.chunk(2, dim=1), dim=2).flatten(1, 2)
            return tensor.transpose(1, 2) if name.endswith("_proj") else tensor

        self._each(state_dict, config, convert)


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
    "position_embedding_type": "rope", "learned_position_embeddings": False, "position_ids_from_mask": False, "_partial_rotary_factor": 1.0,
    "rope_interleaved": False, "_rope_per_layer_type": False, "_no_rope_layers": 0, "_layer_types": "full",
    "norm_type": "rmsnorm", "norm_position": "pre", "use_parallel_residual": False, "parallel_shared_norm": True,
    "sub_layernorm": False, "mlp_type": "gated", "hidden_act": "silu", "qk_norm": False, "qk_norm_scope": "head",
    "qk_norm_type": None, "qk_norm_position": "before_rope", "clip_qkv": None, "attention_bias": False,
    "attention_output_bias": False, "mlp_bias": False, "lm_head_bias": False, "embedding_multiplier": 1.0, "scale_embeddings_by_sqrt_hidden": False,
    "residual_multiplier": 1.0, "attention_multiplier": None, "query_pre_attn_scalar": None, "logits_scaling": 1.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_sinks": False,
    "num_experts": None, "norm_topk_prob": True, "_shared_expert": False, "_dense_layers": 0,
    "router_bias_update_rate": 0.0, "router_bias": False, "swiglu_limit": None, "router_scoring": "softmax", "routed_scaling_factor": 1.0, "n_group": 1,
    "router_choice_bias": False, "topk_group": 1, "group_scoring": "top2_sum", "shared_expert_gated": True, "kv_lora_rank": None, "q_lora_rank": None,
}
# Fields that matter only when another is on
_RELEVANT = {
    "parallel_shared_norm": lambda config: config.use_parallel_residual,
    "position_ids_from_mask": lambda config: config.position_embedding_type in ("learned", "sinusoidal")
    or config.learned_position_embeddings,
    "qk_norm_scope": lambda config: config.qk_norm,
    "qk_norm_type": lambda config: config.qk_norm,
    "qk_norm_position": lambda config: config.qk_norm,
    "norm_topk_prob": lambda config: config.num_experts,
    "_shared_expert": lambda config: config.num_experts,
    "_dense_layers": lambda config: config.num_experts,
    "router_bias_update_rate": lambda config: config.num_experts,
    "router_bias": lambda config: config.num_experts,
    # the routing bias exists anyway with a sigmoid router or a rate
    "router_choice_bias": lambda config: config.num_experts and config.router_scoring == "softmax"
    and not config.router_bias_update_rate,
    "router_scoring": lambda config: config.num_experts,
    "routed_scaling_factor": lambda config: config.num_experts,
    "n_group": lambda config: config.num_experts,
    "topk_group": lambda config: config.num_experts and config.n_group > 1,
    "group_scoring": lambda config: config.num_experts and config.n_group > 1,
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
    sparse = [i for i in range(layers) if config.layer_is_sparse(i)]
    slides = [layer_type == "sliding_attention" for layer_type in config.layer_types]
    # the rotated share of each head, in every layer type's rope dict: one share, or "per layer type" when they differ
    shares = {config.rotary_dim(layer_type) / config.head_dim for layer_type in config.rope_parameters_by_layer_type()}
    return {
        "_partial_rotary_factor": (1.0 if config.position_embedding_type != "rope" else shares.pop() if len(shares) == 1
                                   else "per layer type"),
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
        # ERNIE 4.5 makes every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index sparse
        "_sparse_layers_one_run": sparse == [i for i in range(sparse[0], sparse[-1] + 1)
                                             if (i + 1) % config.decoder_sparse_step == 0] if sparse else True,
        "_shared_expert_whole": bool(config.num_experts) and (config.shared_expert_intermediate_size or 0)
        % config.moe_intermediate_size == 0,
        # HunYuan-MoE's shared MLP is as wide as each expert (both its intermediate_size)
        "_shared_expert_one_expert": bool(config.num_experts)
        and config.shared_expert_intermediate_size == config.moe_intermediate_size,
        "_swiglu_clamped": config.swiglu_limit is not None,
        "_latent_attention": bool(config.kv_lora_rank),
        "_num_key_value_heads": "mha" if config.num_key_value_heads == config.num_attention_heads
        else "mqa" if config.num_key_value_heads == 1 else "gqa",
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
    "_num_key_value_heads": ("num_key_value_heads", "'mha': one per head, 'mqa': one for all, or 'gqa'"),
    "_head_dim": ("head_dim", "'default': hidden_size // num_attention_heads, or 'explicit'"),
    "_rope_layers": (None, "the layers with rope (no_rope_layers) against layer_types ('sliding': the sliding ones "
                           "only; 'all': every layer, none sliding)"),
    "_rope_per_layer_type": (None, "one rope dict per layer type (rope_parameters nested by layer type)"),
    "_dense_layers": (None, "dense layers in a mixture (mlp_only_layers, decoder_sparse_step)"),
    "_dense_layers_first": (None, "dense layers before every sparse one (mlp_only_layers, decoder_sparse_step)"),
    "_shared_expert": (None, "a shared expert (shared_expert_intermediate_size)"),
    "_sparse_layers_one_run": (None, "sparse layers every decoder_sparse_step-th layer of one run, none dense between "
                                     "(mlp_only_layers at the ends only)"),
    "_swiglu_clamped": (None, "gpt-oss's clamped GLU (swiglu_limit set)"),
    "_shared_expert_one_expert": (None, "a shared expert as wide as each expert (shared_expert_intermediate_size = "
                                        "moe_intermediate_size)"),
    "_latent_attention": (None, "multi-head latent attention (kv_lora_rank set)"),
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
        rope = fields.get(self.fields.get("rope_parameters"))
        if "_partial_rotary_factor" in self.allows and isinstance(rope, dict) and "rope_type" in rope:
            # written out: without it the native config takes its class's default share (NeoX and StableLM 0.25,
            # Phi 0.5), not the whole head
            rope.setdefault("partial_rotary_factor", config.rotary_dim() / config.head_dim)
        try:
            return self.config_class(**{**fields, **self.export_fields(config)})
        except StrictDataclassError as error:  # huggingface_hub's validation errors are not ValueErrors
            raise ValueError(f"Cannot export this ArchLM model to {self.name}: its config class refuses the values "
                             f"this model maps to: {error}") from error

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
        # OPT names it init_std (its field map reads that)
        **({"initializer_range": config.initializer_range} if hasattr(config, "initializer_range") else {}),
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


def native_head_dim(native: PreTrainedConfig) -> int:
    # Mistral reads `head_dim` with `or`, Llama/Qwen with getattr: both fall back to hidden / heads
    return getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads


def any_bias(config: ArchLMConfig) -> bool:
    """One native flag for q/k/v/o: a bias the ArchLM model lacks is exported as zeros (the same function)."""
    return config.attention_bias or config.attention_output_bias


def native_layer_types(native: PreTrainedConfig) -> dict:
    """A native `layer_types` and window as the model runs them: with no window (Qwen without use_sliding_window:
    None, or 0 in Qwen2-MoE), a layer called sliding attends to everything."""
    layer_types = list(native.layer_types or ["full_attention"] * native.num_hidden_layers)
    if not native.sliding_window:
        return dict(layer_types=["full_attention"] * len(layer_types), sliding_window=None)
    return dict(layer_types=layer_types, sliding_window=native.sliding_window)


def rope_in_sliding_layers(native: PreTrainedConfig, rope_without_window: bool) -> dict:
    """Cohere 2, EXAONE 4 and EXAONE MoE rotate q and k in their sliding layers only, the full ones going without
    rope. Without a window every layer attends fully: EXAONE 4's all with rope, Cohere 2's all without (though its
    model cannot run without one: it always builds the sliding mask; EXAONE MoE's config always has one)."""
    fields = native_layer_types(native)
    if not native.sliding_window and rope_without_window:
        return fields
    rotates = [int(layer_type == "sliding_attention") for layer_type in fields["layer_types"]]
    return dict(fields, no_rope_layers=rotates if 0 in rotates else None)


def rope_in_sliding_layers_export(config: ArchLMConfig, rope_without_window: bool) -> dict:
    """A window wherever a full layer goes without rope (any will do when none slides), and always for Cohere 2."""
    rope_everywhere = not config.no_rope_layers or all(config.no_rope_layers)
    windowless = rope_without_window and rope_everywhere and "sliding_attention" not in config.layer_types
    return dict(sliding_window=None if windowless else config.sliding_window or config.max_position_embeddings,
                layer_types=list(config.layer_types))


def window_of_every_native_layer(native: PreTrainedConfig) -> dict:
    """Families whose one `sliding_window` (None: off) applies to every layer, with no layer_types."""
    window = native.sliding_window or None
    return dict(sliding_window=window,
                layer_types=["sliding_attention" if window else "full_attention"] * native.num_hidden_layers)


def qwen_layer_fields(config: ArchLMConfig) -> dict:
    """Qwen2/3 and SmolLM3 choose full or sliding attention per layer through `layer_types`."""
    sliding = "sliding_attention" in config.layer_types
    return dict(use_sliding_window=sliding, sliding_window=config.sliding_window, layer_types=list(config.layer_types))


def gemma_scale(config: ArchLMConfig) -> dict:
    """Gemma 2/3 always scale scores by query_pre_attn_scalar**-0.5; ArchLM's None means head_dim."""
    return dict(query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim)


def rope_per_layer_type(config: ArchLMConfig) -> dict:
    """Gemma 3, OLMo 3 and Mellum read one rope dict per layer type, for both types: a nested dict's own (that of a
    type no layer has too, so that it round-trips), else the shared one."""
    nested, by_type = config.rope_parameters or {}, config.rope_parameters_by_layer_type()
    shared = next(iter(by_type.values()))
    return {layer_type: copy.deepcopy(nested.get(layer_type) or by_type.get(layer_type, shared))
            for layer_type in ("full_attention", "sliding_attention")}


def window_for_the_mask(config: ArchLMConfig) -> dict:
    """Families that build a sliding mask whatever their layers are (Gemma 2/3, OLMo 3, gpt-oss, ...), and fail
    without a window: a window no full layer reads when none slides."""
    return dict(sliding_window=config.sliding_window or config.max_position_embeddings)


def window_of_every_layer(config: ArchLMConfig) -> dict:
    """Families whose one `sliding_window` applies to every layer."""
    return dict(sliding_window=config.sliding_window if "sliding_attention" in config.layer_types else None)


def granite_swa_rope(native: PreTrainedConfig) -> dict:
    """GraniteSWA's rope base per layer: one base (ArchLM's rope_theta) and 0 for the layers without rope. Several
    bases are refused, naming them: ArchLM's rope dicts go by layer type, not by layer."""
    thetas = list(native.layer_rope_theta)
    bases = sorted({theta for theta in thetas if theta})
    if len(bases) != 1:
        raise ValueError(f"Cannot convert this {native.model_type} model: `layer_rope_theta`={thetas} sets "
                         f"{len(bases)} rope bases; ArchLM takes one base, with 0 (no rope) in any layers.")
    no_rope = [int(bool(theta)) for theta in thetas]
    return dict(rope_parameters={**native.rope_parameters, "rope_theta": bases[0]},
                no_rope_layers=no_rope if 0 in no_rope else None)


def phi3_original_length(config: ArchLMConfig) -> dict:
    """Phi-3's top-level original_max_position_embeddings overrides the one in rope_parameters: keep them equal."""
    original = (config.rope_parameters or {}).get("original_max_position_embeddings")
    return dict(original_max_position_embeddings=original or config.max_position_embeddings)


LLAMA_ACTIVATIONS = {"silu", "swish"}  # what serving engines run for the Llama-like families (ACT2FN's swish is SiLU)
GPT2_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh"}  # Gemma rewrites plain "gelu" to the tanh approximation
LLAMA_FIELDS = dict(intermediate_size="intermediate_size", num_key_value_heads="num_key_value_heads",
                     hidden_act="hidden_act", rope_parameters="rope_parameters", attention_dropout="attention_dropout")
PARTIAL_ROPE = {"_partial_rotary_factor": ANY}
# each family's roundings where they differ from Llama's (no effect in float32; bit-identical imports in bf16)
OLMO_ROUNDING = dict(rope_precision="float32", layernorm_precision="float32")
OLMO2_ROUNDING = dict(rope_precision="float32", norm_weight_fp32=True)
SUBLAYERS_FIRST = dict(parallel_residual_order="sublayers_first")
# Gemma 2/3 and OLMo 2 call the norm on the attention output post_attention_layernorm, Llama the one before the MLP
SANDWICH_NORMS = (
    Rename("model.layers.{i}.post_attention_layernorm.", "model.layers.{i}.attention_output_layernorm."),
    Rename("model.layers.{i}.pre_feedforward_layernorm.", "model.layers.{i}.post_attention_layernorm."),
    Rename("model.layers.{i}.post_feedforward_layernorm.", "model.layers.{i}.mlp_output_layernorm."),
)
