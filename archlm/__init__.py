"""ArchLM: decoder-only language models whose architecture is chosen by configuration.

Importing the package registers `archlm` with transformers' Auto classes in this process, and marks
the classes for `auto_map`, so every `save_pretrained` folder also loads with
`trust_remote_code=True` where archlm is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .check import check_model
from .configuration_archlm import PRESETS, ArchLMConfig, parse_config_overrides
from .modeling_archlm import (
    ArchLMForCausalLM,
    ArchLMForSequenceClassification,
    ArchLMModel,
    ArchLMPreTrainedModel,
)

AutoConfig.register("archlm", ArchLMConfig, exist_ok=True)
AutoModel.register(ArchLMConfig, ArchLMModel, exist_ok=True)
AutoModelForCausalLM.register(ArchLMConfig, ArchLMForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ArchLMConfig, ArchLMForSequenceClassification, exist_ok=True)

# auto_map + copies of configuration_archlm.py / modeling_archlm.py in every saved folder
ArchLMConfig.register_for_auto_class()
ArchLMModel.register_for_auto_class("AutoModel")
ArchLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ArchLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "PRESETS",
    "ArchLMConfig",
    "ArchLMPreTrainedModel",
    "ArchLMModel",
    "ArchLMForCausalLM",
    "ArchLMForSequenceClassification",
    "check_model",
    "parse_config_overrides",
]
