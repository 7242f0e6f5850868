"""ArchLM's deepseek_v3 preset (multi-head latent attention) against transformers' own DeepseekV3ForCausalLM holding
the same weights: cached decoding at growing context lengths, and the cache's size per token.

    python benchmarks/vs_deepseek.py                                # ~6 minutes on 2 CPU cores
    python benchmarks/vs_deepseek.py --contexts 256,1024,4096 --pairs 5 --output_dir benchmarks/results

Both cache the latent (kv_lora_rank numbers a token and layer) and the rotary key, not the heads' keys and values.
transformers expands every cached latent through kv_b_proj at every step, so a step's attention costs
O(context x kv_lora_rank x heads x (qk_nope_head_dim + v_head_dim)); ArchLM decodes in the latent space (kv_b_proj
absorbed into the query and the output), O(context x heads x (2 kv_lora_rank + head_dim)). Batch-1 greedy decoding
with the dynamic cache, interleaved as in vs_llama.py (the median over --pairs pairs); the prompt's prefill is left
out (decode_ms_per_token). fp32 on a CPU, bf16 on a GPU. Writes vs_deepseek.json, .md and .png to --output_dir.
"""

import argparse
import logging

import torch
from common import decode_ms_per_token, interleaved, machine_description, write_results
from vs_llama import comparison_table, plot_ratios, throughput_row

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.convert import to_transformers

logger = logging.getLogger("benchmarks.vs_deepseek")
LABEL = "transformers DeepSeek-V3"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--contexts", default="128,1024,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--decode_tokens", type=int, default=48, help="many: each figure subtracts a prefill")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved measurement pairs per figure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def cache_numbers_per_token(model, prompt) -> int:
    """Numbers the dynamic cache holds per token, summed over the layers, after a prefill of `prompt`."""
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    return sum(layer.keys[0].numel() + layer.values[0].numel() for layer in cache.layers) // prompt.shape[1]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contexts = [int(length) for length in args.contexts.split(",")]
    torch.manual_seed(0)
    config = ArchLMConfig.from_preset(
        "deepseek_v3", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        vocab_size=args.vocab, max_position_embeddings=max(contexts) + args.decode_tokens, bos_token_id=1,
        eos_token_id=2)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    archlm = ArchLMForCausalLM(config)
    native = to_transformers(archlm)  # same weights
    models = {name: model.to(args.device, dtype).eval() for name, model in (("archlm", archlm), ("deepseek", native))}
    for model in models.values():
        model.set_attn_implementation("sdpa")
    prompts = {length: torch.randint(3, args.vocab, (1, length), device=args.device) for length in contexts}
    cache = {name: cache_numbers_per_token(model, prompts[contexts[0]]) for name, model in models.items()}
    rows = []
    with torch.no_grad():
        for length in contexts:
            logger.info("decoding %d tokens after a %d-token prompt", args.decode_tokens, length)
            times = interleaved(models, lambda model: decode_ms_per_token(  # noqa: B023 (used at once)
                model, prompts[length], args.decode_tokens, 1), args.pairs)
            rows.append(throughput_row(f"decode tokens/s at context {length:,}", times, 1000))
    rows.append({"measure": "cache numbers per token (all layers)", **cache, "higher_is_better": False})
    results = {
        "architecture": config.architecture_name, "parameters": archlm.num_parameters(), "dtype": str(dtype),
        "batch": 1, "seq": max(contexts), "attn": "sdpa", "pairs": args.pairs, "machine": machine_description(),
        "decode_tokens": args.decode_tokens, "rows": rows,
    }
    table = "\n".join(comparison_table(results, "deepseek", LABEL) + [
        "", "Ratios: > 1 means ArchLM is faster (or holds less). Both caches hold the latent and the rotary key; "
            "transformers expands the whole cache through kv_b_proj at every step, ArchLM attends in the latent "
            "space."])
    write_results(args.output_dir, "vs_deepseek", results, table,
                  lambda results, path: plot_ratios(results, path, "deepseek", LABEL))


if __name__ == "__main__":
    main()
