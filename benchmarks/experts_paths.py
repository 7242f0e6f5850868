"""One sparse layer's experts at decoding sizes, by each way ArchLMExperts can compute them, eager and compiled: the
evidence behind the choice `ArchLMExperts.forward` makes at decoding sizes: on a CPU `one_token` eagerly and
`gathered` compiled (inductor fuses its gather and bmm into one loop), on an accelerator `gathered` (a copy of the
chosen weights and a bmm, as transformers decodes there).

    python benchmarks/experts_paths.py                                  # CPU, fp32, ~2 minutes on 2 cores
    python benchmarks/experts_paths.py --device cuda --dtype bfloat16   # on a GPU

Each call reads its experts from memory, as a decoding step does (a model's experts do not fit in the caches): the
layer's weights are swapped between --stacks sets, one per call, as consecutive layers would be. The ways are timed
interleaved (common.interleaved: their order reversed every other round), each one's output checked against the
eager grouped path first. Writes experts_paths.json, experts_paths.md and experts_paths.png to --output_dir.
"""

import argparse
import logging
from functools import partial

import torch
import transformers.integrations.moe  # noqa: F401  registers the per-expert op the compiled grouped path calls
from common import interleaved, machine_description, seconds, write_results

from archlm import ArchLMConfig
from archlm.modeling_archlm import ArchLMExperts

logger = logging.getLogger("benchmarks.experts_paths")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--expert_width", type=int, default=768)
    parser.add_argument("--tokens", default="1,4", help="decoding batch sizes (tokens per step), comma-separated")
    parser.add_argument("--stacks", type=int, default=8, help="weight sets cycled through, one per call")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def ways(experts: ArchLMExperts, tokens: int) -> dict:
    """Each way to compute the experts, by name: a function of (hidden_states, top_k_index, top_k_weights)."""
    compiled = partial(torch.compile, fullgraph=True, dynamic=False)
    found = {
        "grouped": experts.grouped,
        "gathered": experts.gathered,
        "grouped, compiled": compiled(experts.grouped),
        "gathered, compiled": compiled(experts.gathered),
    }
    if tokens == 1:
        found["one_token"] = experts.one_token
    return found


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    config = ArchLMConfig.from_preset("llama", hidden_size=args.hidden, num_attention_heads=8, num_experts=args.experts,
                                      num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width)
    torch.manual_seed(0)
    experts = ArchLMExperts(config).to(args.device, dtype)
    names = [name for name, _ in experts.named_parameters()]
    stacks = [[torch.randn_like(parameter) * 0.02 for parameter in experts.parameters()] for _ in range(args.stacks)]

    def use(stack):  # the next layer's weights, in place of the last one's (what a compiled graph reads is the same)
        for name, weight in zip(names, stack):
            getattr(experts, name).data = weight

    rows = []
    with torch.no_grad():
        for tokens in (int(size) for size in args.tokens.split(",")):
            hidden = torch.randn(tokens, args.hidden, device=args.device, dtype=dtype)
            scores = torch.randn(tokens, args.experts, device=args.device)
            top_k_weights, top_k_index = scores.softmax(-1).topk(args.top_k, dim=-1)
            top_k_weights = top_k_weights.to(dtype)
            found = ways(experts, tokens)
            # bf16 ways sum in different orders: a looser check than float32's
            tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
            for stack in stacks:  # compile, warm up, and check every way against the grouped path on every stack
                use(stack)
                expected = experts.grouped(hidden, top_k_index, top_k_weights)
                for name, way in found.items():
                    torch.testing.assert_close(way(hidden, top_k_index, top_k_weights), expected, **tolerance,
                                               msg=f"{name} at {tokens} tokens")
            def every_layer(way):
                for stack in stacks:
                    use(stack)
                    way(hidden, top_k_index, top_k_weights)

            times = interleaved(found, lambda way: seconds(partial(every_layer, way), args.device), args.rounds)
            rows += [{"tokens": tokens, "way": name, "us_per_layer": time / len(stacks) * 1e6}
                     for name, time in times.items()]
            logger.info("%d tokens: %s", tokens, ", ".join(f"{row['way']} {row['us_per_layer']:.0f} us"
                                                         for row in rows if row["tokens"] == tokens))
    results = {"config": {key: getattr(args, key) for key in ("hidden", "experts", "top_k", "expert_width", "stacks",
                                                              "rounds")},
               "dtype": str(dtype), "device": args.device, "machine": machine_description(), "rows": rows}
    write_results(args.output_dir, "experts_paths", results, markdown(results), plot)


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [f"{config['experts']} experts of width {config['expert_width']}, top-{config['top_k']}, hidden "
             f"{config['hidden']}, {results['dtype']}; {results['machine']}; weights cycled through {config['stacks']} "
             f"layers' sets; median of {config['rounds']} interleaved rounds.", "",
             "| tokens | way | us per layer |", "|---:|---|---:|"]
    lines += [f"| {row['tokens']} | {row['way']} | {row['us_per_layer']:,.0f} |" for row in results["rows"]]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["tokens"] for row in results["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.5), squeeze=False)
    for axis, tokens in zip(axes[0], sizes):
        rows = [row for row in results["rows"] if row["tokens"] == tokens]
        axis.barh([row["way"] for row in rows], [row["us_per_layer"] for row in rows], color="tab:blue")
        axis.set_title(f"{tokens} token(s) per step")
        axis.set_xlabel("us per layer (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
