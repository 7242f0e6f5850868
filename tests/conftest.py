"""Shared helpers for the ArchLM tests: tiny configs that build and run in milliseconds on a CPU."""

import importlib.util
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from archlm import ArchLMConfig

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's contention makes
# the suite ~10x slower.
torch.set_num_threads(1)

# What a bad config raises at construction: our `validate_*` rules (a ValueError, wrapped by @strict in the class
# error) and @strict's own type checks (the field error).
VALIDATION_ERRORS = (ValueError, StrictDataclassFieldValidationError, StrictDataclassClassValidationError)

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> ArchLMConfig:
    """A 2-layer, 32-wide config; any field can be overridden."""
    return ArchLMConfig(**{**TINY, **overrides})


# --config_overrides of the tiny model the training and distributed tests train with examples/train.py
TINY_MODEL = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,num_key_value_heads=1,intermediate_size=64"


def load_script(path: Path, module_name: str):
    """An example script (examples/*.py is not a package) imported as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
