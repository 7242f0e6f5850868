"""Generate text from a saved model folder, streaming tokens as they come.

    python examples/generate.py runs/demo "def fibonacci(n):" --max_new_tokens 64
    echo "import os" | python examples/generate.py runs/demo --do_sample --temperature 0.8 --top_p 0.95
    python examples/generate.py runs/demo "class Stack:" --cache static
    python examples/generate.py runs/demo "class Stack:" --compile      # static cache + compiled decode step

The folder needs the model (config.json, safetensors) and its tokenizer, as examples/train.py writes
them. It loads through `AutoModelForCausalLM` with `trust_remote_code=True`, so it works for any
ArchLM folder whether or not archlm is installed.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, TextStreamer

logger = logging.getLogger("generate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder (weights, config and tokenizer)")
    parser.add_argument("prompt", nargs="?", help="the prompt; read from standard input when omitted")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling seed")
    parser.add_argument("--cache", choices=["dynamic", "static", "none"], default="dynamic",
                        help="KV cache: dynamic (default), static (preallocated; compilable) or none")
    parser.add_argument("--compile", action="store_true",
                        help="static cache and a torch.compile'd decode step (on CPU too): the first call compiles "
                             "(tens of seconds), then each token is faster; pays for long or repeated generation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bf16 on a GPU that supports it, else float32")
    args = parser.parse_args(argv)
    # what generate would refuse only after loading the model, with a traceback
    for flag, value, allowed in (("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                                 ("--num_beams", args.num_beams, args.num_beams >= 1),
                                 ("--temperature", args.temperature, args.temperature > 0 or not args.do_sample),
                                 ("--top_k", args.top_k, args.top_k >= 0),
                                 ("--top_p", args.top_p, 0 < args.top_p <= 1),
                                 ("--repetition_penalty", args.repetition_penalty, args.repetition_penalty > 0)):
        if not allowed:
            parser.error(f"{flag} {value} is out of range: --max_new_tokens and --num_beams >= 1, --temperature > 0 "
                         "(greedy decoding: drop --do_sample), --top_k >= 0, --top_p in (0, 1], --repetition_penalty > 0.")
    return args


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # bf16 matmuls are far slower than fp32 on most CPUs


def check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """A model with learned positions has no position past max_position_embeddings: refuse before generating,
    instead of failing at that token with everything generated so far lost."""
    learned = getattr(config, "position_embedding_type", None) == "learned" or getattr(
        config, "learned_position_embeddings", False)
    limit = getattr(config, "max_position_embeddings", None)
    if learned and limit is not None and prompt_tokens + max_new_tokens > limit:
        fix = (f"use --max_new_tokens {limit - prompt_tokens} or less" if prompt_tokens < limit else
               f"shorten the prompt to fewer than {limit} tokens")
        raise SystemExit(
            f"error: the prompt ({prompt_tokens} tokens) + --max_new_tokens {max_new_tokens} exceed the model's "
            f"max_position_embeddings={limit} (learned positions end there); {fix}."
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise SystemExit("error: empty prompt (pass it as an argument or on standard input)")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    # a folder that is not there would be taken for a Hub id (a minute of network retries, then no "not found");
    # written as a path, or under a local folder (runs/x when runs/ exists), it is a missing folder. This script
    # does not import archlm (archlm.check.missing_local_folder says the same), so it runs without it.
    path = Path(args.model).expanduser()
    if not path.exists() and (args.model.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())):
        raise SystemExit(f"error: model folder {args.model!r} does not exist")
    # trust_remote_code: the folder's config.json maps AutoConfig to the remote code, which AutoTokenizer reads too
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, trust_remote_code=True, dtype=pick_dtype(args.dtype, args.device)
    ).to(args.device).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
    check_length(model.config, inputs["input_ids"].shape[1], args.max_new_tokens)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if args.num_beams == 1 else None

    generation_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        use_cache=args.cache != "none",
    )
    if args.do_sample:
        generation_kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.compile and args.cache == "none":
        raise SystemExit(f"error: --compile decodes with a static cache; it cannot run with --cache {args.cache}")
    if args.cache == "static" or args.compile:
        generation_kwargs["cache_implementation"] = "static"
    if args.compile:
        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles the decode step on GPUs only unless told
        generation_kwargs["compile_config"] = compile_config
    else:
        generation_kwargs["disable_compile"] = True  # generate would compile a static cache by itself on a GPU

    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, **generation_kwargs)
    seconds = time.perf_counter() - start
    if streamer is None:  # beam search cannot stream: print the best beam at the end
        print(tokenizer.decode(output[0], skip_special_tokens=True))
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    cache = "static" if args.compile else args.cache
    logger.info("[%d new tokens in %.2f s, cache=%s%s]", new_tokens, seconds, cache, ", compiled" if args.compile else "")


if __name__ == "__main__":
    main()
