"""ArchLM's mixtral preset against transformers' own MixtralForCausalLM holding the same weights, side by side.

    python benchmarks/vs_mixtral.py                                 # ~3 minutes on 2 CPU cores
    python benchmarks/vs_mixtral.py --experts 8 --top_k 2 --pairs 7 --output_dir benchmarks/results

Both models in one process, interleaved as in vs_llama.py (the median over --pairs pairs, alternating which goes
first): forward tokens/s, training-step tokens/s (forward + backward + fused AdamW, the load-balancing loss on, as
train.py trains a mixture of experts) and batch-1 cached decode tokens/s, eager with a dynamic cache and compiled
with a static cache (as generate compiles it on a GPU: fullgraph). Both route tokens the same way (their
logits are tested equal); transformers' experts run its default `grouped_mm` implementation (which its generate
switches to `batched_mm` on an accelerator). fp32 on a CPU, bf16 on a GPU (--device, --dtype). Writes
vs_mixtral.json, vs_mixtral.md and vs_mixtral.png to --output_dir.
"""

import argparse
import logging

import torch
from common import add_model_flags, decode_ms_per_token, interleaved, llama_config, machine_description, write_results
from vs_llama import comparison_table, forward_seconds, plot_ratios, throughput_row, train_step_seconds

from archlm import ArchLMForCausalLM
from archlm.convert import to_transformers

logger = logging.getLogger("benchmarks.vs_mixtral")
LABEL = "transformers Mixtral"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--expert_width", type=int, default=768, help="moe_intermediate_size")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved measurement pairs per figure")
    parser.add_argument("--decode_prompt", type=int, default=32)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def set_router_logits(models: dict, on: bool) -> None:
    for model in models.values():
        model.config.output_router_logits = on


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    config = llama_config(args, num_experts=args.experts, num_experts_per_tok=args.top_k,
                          moe_intermediate_size=args.expert_width, output_router_logits=True,
                          max_position_embeddings=max(2048, args.seq * 2), bos_token_id=1, eos_token_id=2)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    archlm = ArchLMForCausalLM(config)
    mixtral = to_transformers(archlm)  # same weights
    models = {"archlm": archlm.to(args.device, dtype), "mixtral": mixtral.to(args.device, dtype)}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    prompt = torch.randint(3, args.vocab, (1, args.decode_prompt), device=args.device)
    tokens = args.batch * args.seq
    logger.info("measuring %s: forward, train step, decode", config.architecture_name)
    # the same work on both sides: inference without router logits, training with the load-balancing loss (the
    # export leaves Mixtral's output_router_logits off: transformers' MoE classes cannot generate with it on)
    set_router_logits(models, False)
    forward = interleaved(models, forward_seconds(ids, args.device), args.pairs)
    set_router_logits(models, True)
    with torch.no_grad():
        for name, model in models.items():  # both train with the load-balancing loss
            if model(input_ids=ids[:1, :8], labels=ids[:1, :8]).aux_loss is None:
                raise SystemExit(f"{name} computes no load-balancing loss: the train step would compare unequal work")
    train = interleaved(models, train_step_seconds(ids, args.device), args.pairs)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        decode = interleaved(models, lambda model: decode_ms_per_token(
            model, prompt, args.decode_tokens, 1, output_router_logits=False), args.pairs)
        logger.info("compiling both models' decode step (static cache, torch.compile, fullgraph)")
        decode_compiled = interleaved(models, lambda model: decode_ms_per_token(
            model, prompt, args.decode_tokens, 1, compiled=True, cache_implementation="static",
            output_router_logits=False), args.pairs)
    rows = [
        throughput_row("forward tokens/s", forward, tokens),
        throughput_row("train step tokens/s", train, tokens),
        throughput_row("decode tokens/s (dynamic cache)", decode, 1000),
        throughput_row("decode tokens/s (static cache, compiled)", decode_compiled, 1000),
    ]
    results = {
        "architecture": config.architecture_name, "parameters": archlm.num_parameters(),
        "active_parameters": config.num_parameters_estimate(active_only=True), "dtype": str(dtype),
        "batch": args.batch, "seq": args.seq, "attn": archlm.config._attn_implementation, "pairs": args.pairs,
        "machine": machine_description(), "rows": rows,
    }
    table = "\n".join(comparison_table(results, "mixtral", LABEL) + [
        "", f"{results['active_parameters'] / 1e6:.1f}M of the parameters are active per token. Ratios: > 1 means "
            "ArchLM is faster."])
    write_results(args.output_dir, "vs_mixtral", results, table,
                  lambda results, path: plot_ratios(results, path, "mixtral", LABEL))


if __name__ == "__main__":
    main()
