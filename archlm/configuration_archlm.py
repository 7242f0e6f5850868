"""ArchLM configuration: one typed, validated config that names every architecture choice.

This file is remote code: it travels to the Hub with every saved model, so it imports only
torch/transformers/huggingface_hub and nothing else from the archlm package.

Every bad value is refused at construction (and therefore also in `from_pretrained`), with a
message that names the field, the value and what is allowed. Type errors come from `@strict`
(huggingface_hub's `StrictDataclassFieldValidationError`), cross-field rules from the
`validate_*` methods below (`StrictDataclassClassValidationError` wrapping a `ValueError`).
"""

import copy
import dataclasses
import difflib
import json
import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Keys each rope type needs beyond `rope_type` and `rope_theta`; mirrors transformers' validators,
# which only warn (or raise a bare KeyError) where we want a named, early error.
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
# Every rope type transformers can compute, each with the keys it needs.
ROPE_REQUIRED_KEYS = {"default": (), **{name: _ROPE_REQUIRED_KEYS.get(name, ()) for name in ROPE_INIT_FUNCTIONS}}

# Presets: the families' architectures at a size that trains on a laptop. Overrides win.
_LLAMA_LIKE = dict(
    vocab_size=32000,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    hidden_act="silu",
    norm_type="rmsnorm",
    norm_eps=1e-5,
    norm_position="pre",
    position_embedding_type="rope",
    mlp_type="gated",
    bos_token_id=1,
    eos_token_id=2,
)
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M): learned positions, LayerNorm, GELU MLP, biases everywhere, tied head.
    "gpt2": dict(
        vocab_size=50257,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        hidden_act="gelu_new",
        norm_type="layernorm",
        norm_eps=1e-5,
        norm_position="pre",
        position_embedding_type="learned",
        mlp_type="standard",
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        attention_dropout=0.1,
        hidden_dropout=0.1,
        embedding_dropout=0.1,
        init_scheme="scaled",
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    # Llama 3 style: RoPE (theta 5e5), RMSNorm, SwiGLU, GQA, no biases, untied head.
    "llama": dict(_LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Mistral: Llama plus a sliding attention window.
    "mistral": dict(
        _LLAMA_LIKE,
        max_position_embeddings=4096,
        sliding_window=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Qwen2: bias on q/k/v only, large rope theta, tied head at small sizes.
    "qwen2": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        attention_bias=True,
        attention_output_bias=False,
        norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # Qwen3: no q/k/v bias, RMSNorm on q and k per head, explicit head_dim.
    "qwen3": dict(
        _LLAMA_LIKE,
        vocab_size=151936,
        head_dim=64,
        qk_norm=True,
        norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # The seeds' hybrid: RoPE positions with GPT-style LayerNorm and GELU MLP, pre-norm.
    "hybrid": dict(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=2048,
        hidden_act="gelu",
        norm_type="layernorm",
        norm_eps=1e-5,
        norm_position="pre",
        position_embedding_type="rope",
        mlp_type="standard",
        init_scheme="scaled",
        bos_token_id=1,
        eos_token_id=2,
    ),
}

_POSITION_NAMES = {"rope": "RoPE", "alibi": "ALiBi", "learned": "Learned", "sinusoidal": "Sinusoidal", "none": "NoPE"}
_NORM_NAMES = {"rmsnorm": "RMS", "layernorm": "LN", "layernorm_nobias": "LNNoBias"}
# Activation families for the name: every gelu approximation is "GELU", silu/swish "SiLU".
_ACT_NAMES = {"silu": "SiLU", "swish": "SiLU", "relu": "ReLU", "leaky_relu": "LeakyReLU", "relu2": "ReLU2"}
_GLU_NAMES = {"SiLU": "SwiGLU", "GELU": "GeGLU", "ReLU": "ReGLU"}


# kwargs transformers accepts besides the fields (legacy rope keys, load-time options)
_LEGACY_KWARGS = {"rope_theta", "rope_scaling", "attn_implementation", "torch_dtype", "num_labels"}


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside quotes, brackets and braces, so JSON values may hold commas."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _parse_value(text: str):
    literals = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in literals:
        return literals[text.lower()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text[:1] in "[{":
            raise ValueError(f"is not valid JSON: {text!r}") from None
        return text


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"num_hidden_layers=4,hidden_act=gelu,qk_norm=true"` (run_clm.py's `--config_overrides`) -> typed values.

    Values are JSON (numbers, true/false/null, strings, lists, objects such as a whole `rope_parameters`), Python's
    True/False/None, or a bare string. Unknown field names are refused with the closest known names."""
    if not text or not text.strip():
        return {}
    known = sorted({f.name for f in dataclasses.fields(ArchLMConfig)} | _LEGACY_KWARGS)
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--config_overrides: {item.strip()!r} is not 'field=value' (expected e.g. \"num_hidden_layers=4,hidden_size=256\").")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config_overrides: {key!r} is not an ArchLMConfig field.{hint} Fields: {', '.join(known)}.")
        if key in overrides:
            raise ValueError(f"--config_overrides sets {key!r} twice.")
        try:
            overrides[key] = _parse_value(value)
        except ValueError as error:
            raise ValueError(f"--config_overrides: the value of {key!r} {error}") from None
    return overrides


TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def token_ids_fit(value, vocab_size) -> bool:
    """Whether a special id (an int, a list of ints, or None) indexes a vocabulary of `vocab_size` rows."""
    ids = value if isinstance(value, list) else [value]
    return all(token_id is None or (isinstance(token_id, int) and 0 <= token_id < vocab_size) for token_id in ids)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@strict
class ArchLMConfig(PreTrainedConfig):
    r"""Configuration of an ArchLM decoder-only language model.

    Field names follow transformers' `LlamaConfig` wherever transformers has one; the ArchLM
    fields below choose the architecture.

    ```python
    >>> from archlm import ArchLMConfig, ArchLMForCausalLM
    >>> config = ArchLMConfig.from_preset("llama", hidden_size=256, num_hidden_layers=4)
    >>> config.architecture_name
    '4L-12H-256D-RoPE-RMS-SwiGLU-PreNorm-GQA4'
    >>> model = ArchLMForCausalLM(config)
    ```
    """

    model_type = "archlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    # --- sizes ---
    vocab_size: int = 32000  # rows of the embedding and of the LM head
    hidden_size: int = 768  # width of the residual stream
    intermediate_size: int | None = None  # MLP width; None: 4x hidden (standard) or ~8/3x hidden (gated)
    num_hidden_layers: int = 12  # decoder layers
    num_attention_heads: int = 12  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA; 1 = MQA); None: = num_attention_heads
    head_dim: int | None = None  # per-head width; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest sequence (hard limit with learned positions)
    # --- components ---
    hidden_act: str = "silu"  # any key of transformers.activations.ACT2FN
    norm_type: Literal["rmsnorm", "layernorm", "layernorm_nobias"] = "rmsnorm"  # normalisation layer
    norm_eps: float | int = 1e-6  # epsilon of every norm
    norm_position: Literal["pre", "post"] = "pre"  # norm before each sublayer (GPT-2/Llama) or after the residual add (original Transformer)
    position_embedding_type: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"  # how tokens learn their position
    learned_position_embeddings: bool = False  # add learned absolute embeddings on top of rope/alibi
    rope_parameters: RopeParameters | dict | None = None  # transformers v5 rope dict: rope_type, rope_theta, factor, ...
    mlp_type: Literal["gated", "standard"] = "gated"  # gated: act(gate) * up (SwiGLU with silu); standard: act(up)
    qk_norm: bool = False  # normalise q and k per head before rope (Qwen3, OLMo2)
    sliding_window: int | None = None  # attend to at most this many previous tokens (Mistral); None: full causal
    attention_bias: bool = False  # bias on q/k/v projections
    attention_output_bias: bool | None = None  # bias on o_proj; None: same as attention_bias (Qwen2: q/k/v only)
    mlp_bias: bool = False  # bias on the MLP projections
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    # --- regularisation and init ---
    attention_dropout: float | int = 0.0  # dropout on attention probabilities
    hidden_dropout: float | int = 0.0  # dropout on each sublayer output before the residual add
    embedding_dropout: float | int = 0.0  # dropout on the summed input embeddings
    initializer_range: float | int = 0.02  # std of the normal init
    init_scheme: Literal["normal", "scaled"] = "normal"  # scaled: truncated at 2 std, residual outputs / sqrt(2 * layers)
    # --- generation ---
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None and _is_number(self.hidden_size) and _is_number(self.num_attention_heads):
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None and _is_number(self.hidden_size):
            if self.mlp_type == "gated":
                # Llama's rule: two thirds of 4x (same FLOPs as a standard MLP), rounded up to 64
                self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
            else:
                self.intermediate_size = 4 * self.hidden_size
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        # Keep the caller's dict intact: transformers standardises rope_parameters in place.
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = copy.deepcopy(self.rope_parameters)
        super().__post_init__(**kwargs)

    # ----------------------------------------------------------------------------------------
    # validation (run by @strict after __init__, in alphabetical order of the method names)
    # ----------------------------------------------------------------------------------------
    def validate_architecture(self):
        """Sizes, head layout and component names."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or give `head_dim` explicitly."
            )
        if self.head_dim <= 0:
            raise ValueError(f"`head_dim` must be a positive integer, got {self.head_dim!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"`hidden_act`={self.hidden_act!r} is not a known activation; allowed: {sorted(ACT2FN)}."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"`sliding_window` must be a positive integer or None, got {self.sliding_window!r}.")
        if self.learned_position_embeddings and self.position_embedding_type not in ("rope", "alibi"):
            raise ValueError(
                "`learned_position_embeddings=True` adds learned absolute positions on top of 'rope' or 'alibi'; "
                f"with `position_embedding_type`={self.position_embedding_type!r} use "
                "position_embedding_type='learned' (or set learned_position_embeddings=False)."
            )

    def validate_probabilities(self):
        """Dropout rates in [0, 1); finite epsilon (not below 1e-12) and positive, finite init range."""
        for name in ("attention_dropout", "hidden_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` is a probability and must be in [0, 1), got {value!r}.")
        # below ~1e-20 float32 norms of a (near-)zero vector, e.g. after dropout, give inf/NaN gradients
        if not (1e-12 <= self.norm_eps and math.isfinite(self.norm_eps)):
            raise ValueError(f"`norm_eps` must be a finite number >= 1e-12, got {self.norm_eps!r}.")
        # transformers' LlamaConfig bounds it to [0, 1]; above 1 the logits of a fresh model overflow
        if not 0 < self.initializer_range <= 1:
            raise ValueError(f"`initializer_range` is a standard deviation and must be in (0, 1], got {self.initializer_range!r}.")

    def validate_rope(self):
        """A complete, sane `rope_parameters` for its `rope_type`; raises instead of transformers' warnings."""
        params = self.rope_parameters
        if not params:
            return
        if not isinstance(params, dict):
            raise ValueError(f"`rope_parameters` must be a dict, got {type(params).__name__}.")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_REQUIRED_KEYS:
            raise ValueError(f"`rope_parameters['rope_type']`={rope_type!r} is unknown; allowed: {list(ROPE_REQUIRED_KEYS)}.")
        if rope_type != "default" and self.position_embedding_type != "rope":
            raise ValueError(
                f"`rope_parameters['rope_type']`={rope_type!r} scales rope, but `position_embedding_type`="
                f"{self.position_embedding_type!r} does not use rope; use rope_type 'default' or position_embedding_type='rope'."
            )
        missing = [key for key in ROPE_REQUIRED_KEYS[rope_type] if params.get(key) is None]
        if missing:
            raise ValueError(f"`rope_parameters` with rope_type={rope_type!r} needs the keys {missing}; got {params}.")
        # finite and > 0, or at least the bound: rope_theta < 1 overflows the frequencies, factor < 1 (which transformers
        # only warns about) can divide them by ~0, longrope divides by log(original_max_position_embeddings)
        minimum = {"rope_theta": 1, "factor": 1, "original_max_position_embeddings": 2}
        for key in ("rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                    "attention_factor", "beta_fast", "beta_slow"):
            value = params.get(key)
            if (key == "rope_theta" or value is not None) and (
                not _is_number(value) or not math.isfinite(value) or value <= 0 or value < minimum.get(key, 0)
            ):
                allowed = f">= {minimum[key]}" if key in minimum else "> 0"
                raise ValueError(f"`rope_parameters['{key}']` must be a finite number {allowed}, got {value!r}.")
        if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ValueError(
                "`rope_parameters['high_freq_factor']` must be greater than `low_freq_factor`, got "
                f"high_freq_factor={params['high_freq_factor']} and low_freq_factor={params['low_freq_factor']}."
            )
        if rope_type == "yarn" and params.get("beta_fast", 32) <= params.get("beta_slow", 1):
            raise ValueError(
                "`rope_parameters['beta_fast']` must be greater than `beta_slow`, got "
                f"beta_fast={params.get('beta_fast', 32)} and beta_slow={params.get('beta_slow', 1)}."
            )
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = params[key]
                if not isinstance(value, list) or len(value) != self.head_dim // 2 or not all(
                    _is_number(item) and math.isfinite(item) and item > 0 for item in value
                ):
                    raise ValueError(
                        f"`rope_parameters['{key}']` must be a list of {self.head_dim // 2} finite numbers > 0 "
                        f"(head_dim / 2), got {value!r}."
                    )
        partial = params.get("partial_rotary_factor", 1.0)
        if partial is not None and (not _is_number(partial) or not 0 < partial <= 1 or (partial != 1 and rope_type != "proportional")):
            raise ValueError(
                f"`rope_parameters['partial_rotary_factor']`={partial!r} is not supported with rope_type={rope_type!r}: "
                "ArchLM rotates the whole head, so it must be 1.0 (or absent); only rope_type 'proportional' takes (0, 1]."
            )
        if self.position_embedding_type != "rope":
            return  # the dict is kept but unused: transformers' even-head_dim check does not apply
        if self.head_dim % 2:
            raise ValueError(f"rope rotates pairs of channels, so `head_dim` must be even, got {self.head_dim}.")
        super().validate_rope()

    def validate_token_ids(self):
        """Special token ids must index the vocabulary (transformers only warns; a bad id crashes generate)."""
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            if not token_ids_fit(value, self.vocab_size):
                raise ValueError(
                    f"`{name}`={value!r} is outside the vocabulary: ids must be in [0, {self.vocab_size - 1}] "
                    f"(vocab_size={self.vocab_size}), or None."
                )

    # ----------------------------------------------------------------------------------------
    # presets and descriptions
    # ----------------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by `from_preset`."""
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ArchLMConfig":
        """A preset family's architecture, with any field overridden: `from_preset("llama", num_hidden_layers=4)`.

        Unlike the constructor (which, as every transformers config, keeps unknown keys of a loaded config.json),
        an override that is not a field is refused: a typo must not train the wrong model silently."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {cls.presets()}.")
        known = {f.name for f in dataclasses.fields(cls)} | _LEGACY_KWARGS
        unknown = sorted(set(overrides) - known)
        if unknown:
            hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
            listed = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
            raise ValueError(f"Unknown config field(s) {listed}; fields are: {sorted(f.name for f in dataclasses.fields(cls))}.")
        fields = {**copy.deepcopy(PRESETS[name]), **overrides}
        # A preset's special ids belong to its family's tokenizer: with a smaller vocabulary they point nowhere, so
        # they are dropped (ids the caller passes are kept, and validated like any field).
        for key in TOKEN_ID_FIELDS:
            if key not in overrides and not token_ids_fit(fields.get(key), fields.get("vocab_size", 32000)):
                logger.info("Preset %r: dropping %s=%r, outside vocab_size=%s", name, key, fields[key], fields["vocab_size"])
                fields[key] = None
        return cls(**fields)

    @property
    def architecture_name(self) -> str:
        """A short name for comparisons, e.g. `12L-12H-768D-RoPE-RMS-SwiGLU-PreNorm-GQA4`."""
        position = _POSITION_NAMES[self.position_embedding_type]
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if self.position_embedding_type == "rope" and rope_type != "default":
            position += f"({rope_type})"
        if self.learned_position_embeddings:
            position += "+Learned"
        act = "GELU" if self.hidden_act.startswith("gelu") else _ACT_NAMES.get(self.hidden_act, self.hidden_act)
        mlp = _GLU_NAMES.get(act, f"{act}GLU") if self.mlp_type == "gated" else act
        parts = [
            f"{self.num_hidden_layers}L", f"{self.num_attention_heads}H", f"{self.hidden_size}D",
            position, _NORM_NAMES[self.norm_type], mlp, "PreNorm" if self.norm_position == "pre" else "PostNorm",
        ]
        if self.num_key_value_heads == 1 and self.num_attention_heads > 1:
            parts.append("MQA")
        elif self.num_key_value_heads != self.num_attention_heads:
            parts.append(f"GQA{self.num_key_value_heads}")
        if self.qk_norm:
            parts.append("QKNorm")
        if self.sliding_window is not None:
            parts.append(f"SWA{self.sliding_window}")
        if self.tie_word_embeddings:
            parts.append("Tied")
        return "-".join(parts)

    def num_parameters_estimate(self) -> int:
        """Parameter count computed from the config alone (equals `model.num_parameters()` for the causal LM)."""
        hidden, heads, kv_heads, head_dim = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        norm_size = 0 if self.norm_type == "rmsnorm" or self.norm_type == "layernorm_nobias" else hidden
        norm_params = hidden + norm_size
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        attention += (heads + 2 * kv_heads) * head_dim * self.attention_bias + hidden * self.attention_output_bias
        if self.qk_norm:
            attention += 2 * (head_dim + (head_dim if self.norm_type == "layernorm" else 0))
        mlp_matrices = 3 if self.mlp_type == "gated" else 2
        mlp = mlp_matrices * hidden * self.intermediate_size
        mlp += ((mlp_matrices - 1) * self.intermediate_size + hidden) * self.mlp_bias
        mlp += sum(parameter.numel() for parameter in ACT2FN[self.hidden_act].parameters())  # prelu, xielu learn theirs
        layer = attention + mlp + 2 * norm_params
        embeddings = self.vocab_size * hidden
        if self.position_embedding_type == "learned" or self.learned_position_embeddings:
            embeddings += self.max_position_embeddings * hidden
        final_norm = norm_params if self.norm_position == "pre" else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * hidden
        return self.num_hidden_layers * layer + embeddings + final_norm + head

    def summary(self) -> str:
        """A human-readable table of the architecture."""
        rows = [
            ("architecture", self.architecture_name),
            ("parameters", f"{self.num_parameters_estimate():,}"),
            ("layers x hidden", f"{self.num_hidden_layers} x {self.hidden_size}"),
            ("heads (q / kv) x head_dim", f"{self.num_attention_heads} / {self.num_key_value_heads} x {self.head_dim}"),
            ("mlp", f"{self.mlp_type}, {self.hidden_act}, intermediate {self.intermediate_size}"),
            ("norm", f"{self.norm_type} ({self.norm_position}-norm), eps {self.norm_eps}"),
            ("positions", self.position_embedding_type + (" + learned" if self.learned_position_embeddings else "")),
            ("rope", str(self.rope_parameters) if self.position_embedding_type == "rope" else "-"),
            ("max positions", str(self.max_position_embeddings)),
            ("sliding window", str(self.sliding_window)),
            ("qk norm", str(self.qk_norm)),
            ("bias (qkv / out / mlp)", f"{self.attention_bias} / {self.attention_output_bias} / {self.mlp_bias}"),
            ("tied embeddings", str(self.tie_word_embeddings)),
            ("dropout (attn / hidden / emb)", f"{self.attention_dropout} / {self.hidden_dropout} / {self.embedding_dropout}"),
            ("init", f"{self.init_scheme}, std {self.initializer_range}"),
            ("vocab", str(self.vocab_size)),
        ]
        width = max(len(key) for key, _ in rows)
        lines = [f"{'field'.ljust(width)} | value", f"{'-' * width}-|-{'-' * 40}"]
        lines += [f"{key.ljust(width)} | {value}" for key, value in rows]
        return "\n".join(lines)


__all__ = ["ArchLMConfig", "PRESETS", "parse_config_overrides"]
