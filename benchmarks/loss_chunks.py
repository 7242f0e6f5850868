"""The LM head and the cross-entropy, forward and backward, by the plain path (transformers': the full logits, in
float32) and by ArchLM's fused loss (ChunkedLinearCrossEntropy) at several chunk sizes: the evidence for the chunk
size the fused loss takes (`loss_chunk_size`: at most 64 MiB of float32 logits a chunk, at least 512 tokens).

    python benchmarks/loss_chunks.py                                    # CPU, fp32, ~2 minutes on 2 cores
    python benchmarks/loss_chunks.py --device cuda --dtype bfloat16     # on a GPU (gpu_checks.sh: step loss)

On a GPU the question is whether thin chunks (16 of 512 tokens at 8,192 tokens x 32k vocabulary) cost the training
step time: the chunked loss launches more, smaller kernels and sums the head's weight gradient chunk by chunk. Each
way is checked against the plain path first (loss, hidden and weight gradients), then timed interleaved
(common.interleaved); its peak memory above the inputs is measured on its own. Writes loss_chunks.json,
loss_chunks.md and loss_chunks.png to --output_dir.
"""

import argparse
import logging

import torch
import torch.nn.functional as F
from common import interleaved, machine_description, peak_memory_since, seconds, start_peak_memory, write_results

from archlm.modeling_archlm import ChunkedLinearCrossEntropy, loss_chunk_size

logger = logging.getLogger("benchmarks.loss_chunks")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the batch (batch x sequence)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", default="512,1024,2048,4096", help="tokens per chunk, comma-separated; the "
                        "size loss_chunk_size gives is added")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def plain(hidden, weight, targets):
    """transformers' ForCausalLMLoss on the full logits, upcast to float32 (the sum over the targets)."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def fused(chunk: int):
    def loss(hidden, weight, targets):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, 1.0, None, chunk, -100, True, 0.0)
    return loss


def step(way, hidden, weight, targets):
    """Forward and backward; the gradients of hidden and weight."""
    hidden.grad = weight.grad = None
    loss = way(hidden, weight, targets)
    (loss / targets.numel()).backward()
    return loss.detach(), hidden.grad, weight.grad


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=args.device) * args.hidden ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=args.device)
    default = loss_chunk_size(args.tokens, args.vocab, args.hidden)
    chunks = sorted({min(int(size), args.tokens) for size in args.chunks.split(",")} | {default})
    sizes = {"plain (full logits)": None, **{f"fused, chunks of {size}": size for size in chunks}}  # name -> chunk
    ways = {name: plain if size is None else fused(size) for name, size in sizes.items()}

    expected = step(plain, hidden, weight, targets)
    # float32 agrees to rounding; bf16 products round each chunk's sum differently
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    rows = []
    for name, way in ways.items():
        for got, want, what in zip(step(way, hidden, weight, targets), expected, ("loss", "hidden grad", "weight grad")):
            torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=f"{name}: {what}")
        base = start_peak_memory(args.device)
        step(way, hidden, weight, targets)
        rows.append({"way": name, "chunk": sizes[name], "default": sizes[name] == default,
                     "peak_mib": peak_memory_since(args.device, base) / 2**20})
    times = interleaved(ways, lambda way: seconds(lambda: step(way, hidden, weight, targets), args.device), args.rounds)
    for row in rows:
        row["ms"] = times[row["way"]] * 1000
        row["vs_plain"] = times["plain (full logits)"] / times[row["way"]]
    results = {"config": {key: getattr(args, key) for key in ("tokens", "hidden", "vocab", "rounds")},
               "dtype": str(dtype), "device": args.device, "machine": machine_description(), "default_chunk": default,
               "rows": rows}
    write_results(args.output_dir, "loss_chunks", results, markdown(results), plot)


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [f"LM head + cross-entropy, forward and backward: {config['tokens']:,} tokens x hidden {config['hidden']} x "
             f"vocabulary {config['vocab']:,}, {results['dtype']}; {results['machine']}; median of {config['rounds']} "
             f"interleaved rounds. * the chunk size the fused loss takes here.", "",
             "| way | ms | plain / this (> 1: faster) | peak MiB above the inputs |", "|---|---:|---:|---:|"]
    lines += [f"| {row['way']}{' *' if row['default'] else ''} | {row['ms']:,.1f} | {row['vs_plain']:.2f}x | "
              f"{row['peak_mib']:,.0f} |" for row in results["rows"]]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [row["way"] + (" *" if row["default"] else "") for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].barh(labels, [row["ms"] for row in rows], color="tab:blue")
    axes[0].set_xlabel("ms per forward + backward (lower is better)")
    axes[1].barh(labels, [row["peak_mib"] for row in rows], color="tab:orange")
    axes[1].set_xlabel("peak MiB above the inputs")
    axes[1].set_yticks([])
    fig.suptitle(f"LM head + loss, {results['config']['tokens']:,} tokens, {results['dtype']}, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
