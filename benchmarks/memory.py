"""Training-step memory and time: activation checkpointing (none, every N-th layer, all) and eager vs sdpa
attention as the sequence grows.

    python benchmarks/memory.py                                   # ~3 minutes on 2 CPU cores
    python benchmarks/memory.py --seqs 256,512,1024,2048 --checkpoint_seq 1024 --output_dir benchmarks/results

Each variant runs in a fresh process (so peaks do not mix): one warm-up training step (forward, backward,
AdamW), then the median time of --steps steps and the peak memory above the model's own (resident set
on CPU, allocator peak on GPU). Writes memory.json, memory.md and memory.png to --output_dir.
"""

import argparse
import json
import logging
import statistics
import subprocess
import sys

import torch
from common import (
    add_model_flags,
    llama_config,
    machine_description,
    peak_memory_since,
    seconds,
    start_peak_memory,
    write_results,
)

from archlm import ArchLMForCausalLM

logger = logging.getLogger("benchmarks.memory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqs", default="256,512,1024,2048", help="sequence lengths of the eager vs sdpa sweep")
    parser.add_argument("--checkpoint_seq", type=int, default=1024, help="sequence length of the checkpointing sweep")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # JSON of one variant, run in a child process
    return parser.parse_args(argv)


def probe(args, variant: dict) -> dict:
    """One variant in this process: {"seconds": median step time, "peak_bytes": peak above the model's own}."""
    torch.manual_seed(0)
    config = llama_config(args, max_position_embeddings=max(2048, variant["seq"]), use_cache=False)
    model = ArchLMForCausalLM(config).to(args.device).train()
    model.set_attn_implementation(variant["attn"])
    if variant["every_n_layers"]:
        model.activation_checkpointing_enable(every_n_layers=variant["every_n_layers"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, variant["seq"]), device=args.device)

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; AdamW's state exists from here on, so the peak below is the step's own
    base = start_peak_memory(args.device)
    times = [seconds(step, args.device) for _ in range(args.steps)]
    return {"seconds": statistics.median(times), "peak_bytes": peak_memory_since(args.device, base)}


def run_variant(args, **variant) -> dict:
    forwarded = [f"--{key}={value}" for key, value in vars(args).items() if key != "probe" and value is not None]
    command = [sys.executable, __file__, *forwarded, "--probe", json.dumps(variant)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return {**variant, **json.loads(result.stdout.strip().splitlines()[-1])}


def markdown(results: dict) -> str:
    lines = [f"`{results['architecture']}`, batch {results['batch']}, fp32 training steps (forward, backward, AdamW); "
             f"{results['machine']}; peak = memory above the model and optimizer state, median of {results['steps']} steps.",
             "", f"Activation checkpointing at sequence {results['checkpoint_seq']} (sdpa):", "",
             "| checkpointed layers | peak MiB | step s | memory saved | time cost |", "|---|---:|---:|---:|---:|"]
    none = results["checkpointing"][0]
    for row in results["checkpointing"]:
        label = {0: "none", 1: "all"}.get(row["every_n_layers"], f"every {row['every_n_layers']}")
        lines.append(f"| {label} | {row['peak_bytes'] / 2**20:.0f} | {row['seconds']:.2f} | "
                     f"{1 - row['peak_bytes'] / none['peak_bytes']:.0%} | {row['seconds'] / none['seconds'] - 1:+.0%} |")
    lines += ["", "eager vs sdpa attention:", "", "| seq | eager MiB | sdpa MiB | eager s | sdpa s |",
              "|---:|---:|---:|---:|---:|"]
    by_seq = {}
    for row in results["attention"]:
        by_seq.setdefault(row["seq"], {})[row["attn"]] = row
    for seq, rows in sorted(by_seq.items()):
        eager, sdpa = rows["eager"], rows["sdpa"]
        lines.append(f"| {seq} | {eager['peak_bytes'] / 2**20:.0f} | {sdpa['peak_bytes'] / 2**20:.0f} | "
                     f"{eager['seconds']:.2f} | {sdpa['seconds']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for attn in ("eager", "sdpa"):
        rows = sorted((row for row in results["attention"] if row["attn"] == attn), key=lambda row: row["seq"])
        left.plot([row["seq"] for row in rows], [row["peak_bytes"] / 2**20 for row in rows], marker="o", label=attn)
    left.set(xscale="log", xlabel="sequence length", ylabel="peak MiB above the model", title="Training-step memory")
    left.legend()
    rows = results["checkpointing"]
    labels = [{0: "none", 1: "all"}.get(row["every_n_layers"], f"every {row['every_n_layers']}") for row in rows]
    right.bar(labels, [row["peak_bytes"] / 2**20 for row in rows])
    right.set(ylabel="peak MiB", title=f"Activation checkpointing, seq {results['checkpoint_seq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args, json.loads(args.probe))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seqs = [int(value) for value in args.seqs.split(",")]
    logger.info("checkpointing sweep at seq %d", args.checkpoint_seq)
    checkpointing = [run_variant(args, seq=args.checkpoint_seq, attn="sdpa", every_n_layers=n) for n in (0, 2, 1)]
    logger.info("eager vs sdpa at seq %s", seqs)
    attention = [run_variant(args, seq=seq, attn=attn, every_n_layers=0) for seq in seqs for attn in ("eager", "sdpa")]
    architecture = llama_config(args).architecture_name
    results = {"architecture": architecture, "batch": args.batch, "steps": args.steps, "machine": machine_description(),
               "checkpoint_seq": args.checkpoint_seq, "checkpointing": checkpointing, "attention": attention}
    table = markdown(results)
    write_results(args.output_dir, "memory", results, table, plot)


if __name__ == "__main__":
    main()
