"""Train or fine-tune an ArchLM model: the main job, `archlm.train`, behind the script users start from and copy.

    python examples/train.py --preset llama \
        --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2" \
        --block_size 256 --max_steps 300 --learning_rate 1e-3 --output_dir runs/llama-stdlib

The same as `python -m archlm.train` with the same flags: run_clm.py's data and model flags, ArchLM's
(--preset, --config_overrides, --block_size_schedule, --lora_r, --peak_tflops, ...) and every TrainingArguments
flag. With no data flags it trains on the source of Python's standard library. It runs unchanged under `torchrun`,
`deepspeed` and `accelerate launch`. `python examples/train.py --help` lists the flags.

To build your own job, copy this file and call the pipeline's parts: `parse_args(argv)` gives the four argument
dataclasses, `setup(...)` checks them and builds the tokenizer, model and packed data before anything is written,
and `main(argv, callbacks=[...])` runs the whole job with your Trainer callbacks added.
"""

import os

from archlm.train import exit_without_finalizing, main, parse_args, setup  # noqa: F401  (the parts named above)

if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalizing()
