"""Decode speed with and without the KV cache, dynamic vs static cache, and KV-cache memory for MHA/GQA/MQA.

    python benchmarks/generation.py                       # ~3 minutes on 2 CPU cores
    python benchmarks/generation.py --contexts 64,256,1024 --new_tokens 16 --output_dir benchmarks/results

A benchmark, not a test: it prints a markdown table and writes generation.json, generation.md and
generation.png to --output_dir. Per-token time at a context length is measured as
(time to generate N tokens - time to generate 1 token) / (N - 1), so the prompt's prefill is left out;
each figure is the median of --repeats runs. fp32 (bf16 matmuls are ~100x slower on CPUs without
bf16 instructions).
"""

import argparse
import logging
from pathlib import Path

import torch
from common import decode_ms_per_token, machine_description, write_results
from tqdm import tqdm

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.configuration_archlm import parse_config_overrides

logger = logging.getLogger("benchmarks.generation")

DEFAULT_OVERRIDES = "hidden_size=256,num_hidden_layers=4,num_attention_heads=8,num_key_value_heads=4,vocab_size=8192,max_position_embeddings=2048"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama", choices=ArchLMConfig.presets())
    parser.add_argument("--config_overrides", default=DEFAULT_OVERRIDES)
    parser.add_argument("--contexts", default="64,128,256,512,1024", help="prompt lengths to decode after")
    parser.add_argument("--no_cache_max_context", type=int, default=512,
                        help="skip the (quadratic) no-cache runs beyond this context")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv_context", type=int, default=1024, help="sequence length for the KV-cache sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def kv_cache_bytes(model, context: int) -> int:
    """Bytes the dynamic cache actually holds after a prompt of `context` tokens."""
    ids = torch.randint(1, model.config.vocab_size, (1, context))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, label in (("dynamic", "dynamic cache"), ("static", "static cache"), ("no_cache", "no cache")):
        points = [(row["context"], row[mode]) for row in results["decode"] if row.get(mode) is not None]
        if points:
            left.plot(*zip(*points), marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per generated token",
             title=f"Decode time per token ({results['architecture']})")
    left.legend()
    names = [row["attention"] for row in results["kv_cache"]]
    right.bar(names, [row["bytes"] / 2**20 for row in results["kv_cache"]], color=["C0", "C1", "C2"])
    right.set(ylabel="MiB", title=f"KV cache at {results['kv_context']} tokens, batch 1, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict) -> str:
    lines = [f"Model: `{results['architecture']}` ({results['parameters'] / 1e6:.1f}M parameters), "
             f"fp32, {results['machine']}, {results['new_tokens']} new tokens, "
             f"median of {results['repeats']}.", "",
             "| context | dynamic cache ms/token | static cache ms/token | no cache ms/token | cache speed-up |",
             "|---:|---:|---:|---:|---:|"]
    for row in results["decode"]:
        no_cache = f"{row['no_cache']:.1f}" if row["no_cache"] is not None else "-"
        speedup = f"{row['no_cache'] / row['dynamic']:.1f}x" if row["no_cache"] is not None else "-"
        lines.append(f"| {row['context']} | {row['dynamic']:.1f} | {row['static']:.1f} | {no_cache} | {speedup} |")
    lines += ["", f"KV cache at {results['kv_context']} tokens (batch 1, fp32, measured from the cache tensors):", "",
              "| attention | KV heads | bytes | vs MHA |", "|---|---:|---:|---:|"]
    mha = results["kv_cache"][0]["bytes"]
    for row in results["kv_cache"]:
        lines.append(f"| {row['attention']} | {row['num_key_value_heads']} | {row['bytes']:,} | {row['bytes'] / mha:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ArchLMConfig.from_preset(args.preset, **parse_config_overrides(args.config_overrides))
    model = ArchLMForCausalLM(config).eval()
    contexts = [int(value) for value in args.contexts.split(",")]
    if max(contexts) + args.new_tokens > config.max_position_embeddings:
        raise SystemExit(f"error: contexts up to {max(contexts)} + {args.new_tokens} new tokens exceed "
                         f"max_position_embeddings={config.max_position_embeddings}")
    logger.info("%s\n", config.summary())

    decode = []
    for context in tqdm(contexts, desc="contexts"):
        ids = torch.randint(1, config.vocab_size, (1, context))
        row = {"context": context}
        with torch.no_grad():
            row["dynamic"] = decode_ms_per_token(model, ids, args.new_tokens, args.repeats)
            row["static"] = decode_ms_per_token(model, ids, args.new_tokens, args.repeats, cache_implementation="static")
            row["no_cache"] = (decode_ms_per_token(model, ids, args.new_tokens, args.repeats, use_cache=False)
                               if context <= args.no_cache_max_context else None)
        decode.append(row)

    kv_cache = []
    heads = config.num_attention_heads
    for name, kv_heads in (("MHA", heads), ("GQA", max(1, heads // 4)), ("MQA", 1)):
        variant = ArchLMForCausalLM(ArchLMConfig(**{**config.to_dict(), "num_key_value_heads": kv_heads})).eval()
        kv_cache.append({"attention": name, "num_key_value_heads": kv_heads,
                         "bytes": kv_cache_bytes(variant, args.kv_context)})

    results = {
        "architecture": config.architecture_name,
        "parameters": model.num_parameters(),
        "machine": machine_description(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "kv_context": args.kv_context,
        "decode": decode,
        "kv_cache": kv_cache,
    }
    table = markdown(results)
    write_results(args.output_dir, "generation", results, table, plot)


if __name__ == "__main__":
    main()
