"""Serve an ArchLM model folder with transformers' own OpenAI-compatible server (`transformers serve`).

    python -m archlm.serve runs/demo --host 127.0.0.1 --port 8000 [any other `transformers serve` flag]

then, with any OpenAI client, `model` being the folder exactly as given on the command line:

    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
         -d '{"model": "runs/demo", "prompt": "def fibonacci(n):", "max_tokens": 32}'

`/v1/chat/completions` (streamed or not; the prompt is built with the tokenizer's ChatML chat template),
`/v1/completions` and `/health` are transformers' own: this module only makes its model lookup find ArchLM. The server loads a model with `getattr(transformers, config.architectures[0]).from_pretrained(...)`
(`transformers/cli/serving/model_manager.py`), and "ArchLMForCausalLM" is no attribute of the transformers
module, so plain `transformers serve DIR --trust-remote-code` stops with
`AttributeError: module transformers has no attribute ArchLMForCausalLM`. Here, importing archlm registers
the Auto classes, `expose_archlm_classes` adds the ArchLM model classes to the transformers namespace, and the
server starts through transformers' own command line (`transformers.cli.transformers.app`, the `serve`
command) with MODEL_DIR as the model it preloads and pins. The model runs on the installed archlm's code, so
`--trust-remote-code` is not needed (the folder's copy of the code is not run).

A native export (`python -m archlm.convert --to-native SRC OUT`) needs none of this: `transformers serve OUT`.
"""

import json
import sys
from pathlib import Path

import transformers

from archlm import ArchLMConfig, ArchLMForCausalLM, ArchLMForSequenceClassification, ArchLMModel
from archlm.check import model_folder_problem
from archlm.modeling_archlm import check_attention_implementation

ARCHLM_CLASSES = (ArchLMModel, ArchLMForCausalLM, ArchLMForSequenceClassification)
SERVED_ARCHITECTURE = ArchLMForCausalLM.__name__


def expose_archlm_classes() -> None:
    """Makes `getattr(transformers, "ArchLMForCausalLM")` (and the other ArchLM classes) resolve, as transformers
    serve looks a folder's `config.architectures[0]` up there. A name transformers already has is left alone."""
    for model_class in ARCHLM_CLASSES:
        if not hasattr(transformers, model_class.__name__):
            setattr(transformers, model_class.__name__, model_class)


def check_model_folder(model_dir: str, continuous_batching: bool = False) -> None:
    """Refuses, naming the value, what is not a folder holding an ArchLM causal LM and its tokenizer, and, with
    continuous batching, an architecture its paged cache cannot serve: the server would start, then answer every
    request with an error."""
    problem = model_folder_problem(model_dir, f"a model transformers knows serves with `transformers serve {model_dir}`")
    if problem:
        raise SystemExit(f"archlm.serve: {problem}")
    fields = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    architecture = (fields.get("architectures") or [None])[0]
    if architecture != SERVED_ARCHITECTURE:
        raise SystemExit(f"archlm.serve: '{model_dir}/config.json' names the architecture {architecture!r}; the "
                         f"server generates text with a {SERVED_ARCHITECTURE} (save one with `save_pretrained`)")
    if continuous_batching:
        config = ArchLMConfig.from_pretrained(model_dir)
        if config.kv_lora_rank:  # (transformers' own DeepseekV3ForCausalLM fails there the same way)
            raise SystemExit(f"archlm.serve: --continuous-batching: '{model_dir}' uses multi-head latent attention "
                             f"(kv_lora_rank={config.kv_lora_rank}), whose cache of latents the paged cache cannot "
                             "hold; serve it without --continuous-batching.")
        try:
            check_attention_implementation(config, f"paged|{config._attn_implementation or 'sdpa'}")
        except ValueError as error:
            raise SystemExit(f"archlm.serve: --continuous-batching: {error} Serve it without "
                             "--continuous-batching.") from None


USAGE = "python -m archlm.serve MODEL_DIR [transformers serve flags]"


def main(argv: list[str] | None = None) -> None:
    """`transformers serve MODEL_DIR FLAGS...` through transformers' own command line, after the checks and the fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from transformers.cli.transformers import app  # `serve` itself checks that the serving extras are installed

    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\nServes an ArchLM folder with transformers serve, whose flags follow.\n")
        app.main(args=["serve", "--help"], prog_name="transformers")
    if not argv or argv[0].startswith("-"):  # without a folder transformers serve would load models on demand
        raise SystemExit(f"usage: {USAGE} (the folder first; --help lists the flags)")
    check_model_folder(argv[0], continuous_batching="--continuous-batching" in argv)
    expose_archlm_classes()
    app.main(args=["serve", *argv], prog_name="transformers")


if __name__ == "__main__":
    main()
