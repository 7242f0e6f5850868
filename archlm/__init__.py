"""ArchLM: decoder-only language models whose architecture is chosen by configuration.

Importing the package registers `archlm` with transformers' Auto classes in this process, and marks
the classes for `auto_map`, so every `save_pretrained` folder also loads with
`trust_remote_code=True` where archlm is not installed.
"""

import logging

import torch

# transformers imports torchao (int8 inference, an extra) whenever it is installed, and torchao then tries its
# CUDA-only extensions and logs a warning for each: on a CPU-only torch they can never load, so those lines would be
# noise at the start of every run. Its errors still show.
if torch.version.cuda is None:
    logging.getLogger("torchao").setLevel(logging.ERROR)

from transformers import (  # noqa: E402  (after the torchao logger is set)
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

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



def __getattr__(name: str):
    # check_model is imported on first use: `python -m archlm.check` runs archlm.check as __main__, and runpy warns
    # when the package has imported that module already
    if name == "check_model":
        from .check import check_model

        return check_model
    raise AttributeError(f"module 'archlm' has no attribute {name!r}")


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
