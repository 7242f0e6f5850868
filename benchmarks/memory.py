"""Training-step memory and time: the fused LM-head loss against transformers' Llama, activation checkpointing
(none, every N-th layer, all), and eager vs sdpa attention as the sequence grows.

    python benchmarks/memory.py                                   # ~30 minutes on 2 CPU cores
    python benchmarks/memory.py --sections loss --loss_vocabs 32000,128000 --output_dir benchmarks/results

Each memory figure comes from a fresh process (so peaks do not mix), after a warm-up step that creates AdamW's
state: the peak memory of one training step (forward, backward, AdamW) above the weights and optimizer state
(resident set on CPU, with glibc told to return freed blocks at once so that the resident set follows the live
tensors; allocator peak on GPU).

- loss: ArchLM (its training forward computes the loss chunk by chunk with the LM head, never the full logits)
  against transformers' LlamaForCausalLM holding the same weights, at each of --loss_vocabs: the step's peak
  growth, the step time (in one process, interleaved, the median of --pairs pairs), and the largest batch whose
  step fits in --budget_gib of memory (the whole process; fitted on two batch sizes, then run at the fitted batch).
- checkpointing / attention: ArchLM alone, the median time of --steps steps with the peak.

Writes memory.json, memory.md and memory.png to --output_dir.
"""

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys

import torch
from common import (
    add_model_flags,
    interleaved,
    llama_config,
    machine_description,
    peak_memory_since,
    seconds,
    start_peak_memory,
    write_results,
)

from vs_llama import train_step_seconds

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.convert import to_transformers

logger = logging.getLogger("benchmarks.memory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqs", default="256,512,1024,2048", help="sequence lengths of the eager vs sdpa sweep")
    parser.add_argument("--checkpoint_seq", type=int, default=1024, help="sequence length of the checkpointing sweep")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sections", default="loss,checkpointing,attention")
    parser.add_argument("--loss_vocabs", default="32000,128000", help="vocabulary sizes of the loss section")
    parser.add_argument("--loss_hidden", type=int, default=256)
    parser.add_argument("--loss_layers", type=int, default=4)
    parser.add_argument("--loss_batch", type=int, default=4)
    parser.add_argument("--loss_seq", type=int, default=512)
    parser.add_argument("--budget_gib", type=float, default=8.0, help="memory budget of the largest-batch search")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved step-time pairs of the loss section")
    parser.add_argument("--verify_largest", action="store_true", help="also run the fitted largest batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # JSON of one variant, run in a child process
    return parser.parse_args(argv)


def loss_models(args, vocab: int, which: str):
    """The loss section's model: ArchLM's llama preset, or transformers' Llama holding the same weights."""
    torch.manual_seed(0)
    config = ArchLMConfig.from_preset("llama", hidden_size=args.loss_hidden, num_hidden_layers=args.loss_layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=max(2048, args.loss_seq), use_cache=False)
    model = ArchLMForCausalLM(config)
    return (model if which == "archlm" else to_transformers(model)).to(args.device).train()


def loss_probe(args, variant: dict) -> dict:
    """One model at one batch in this process: the peak growth of a training step over the weights and AdamW's
    state, and the whole process's peak during that step."""
    model = loss_models(args, variant["vocab"], variant["model"])
    gc.collect()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(batch):
        ids = torch.randint(0, variant["vocab"], (batch, args.loss_seq), device=args.device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1)  # AdamW's state exists from here on
    base = start_peak_memory(args.device)
    seconds_taken = seconds(lambda: step(variant["batch"]), args.device)
    growth = peak_memory_since(args.device, base)
    return {"peak_bytes": growth, "total_bytes": base + growth, "seconds": seconds_taken}


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
    forwarded = [f"--{key}={value}" for key, value in vars(args).items()
                 if key not in ("probe", "verify_largest") and value is not None]
    command = [sys.executable, __file__, *forwarded, "--probe", json.dumps(variant)]
    # glibc keeps freed blocks below its (growing) mmap threshold for reuse, so the resident set would show the
    # largest heap ever held, not the live tensors: a fixed threshold returns every large block at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"probe {variant} failed:\n{result.stderr[-3000:]}")
    return {**variant, **json.loads(result.stdout.strip().splitlines()[-1])}


def largest_batch(args, vocab: int, model: str) -> dict:
    """The largest batch whose training step keeps the whole process within --budget_gib. Its peak is linear in the
    batch (a + k * batch): fitted on batches 2 and 8, the fit checked at batch 4; with --verify_largest the fitted
    batch is also run (and lowered by 10% until it fits: minutes per step at a large vocabulary on a CPU)."""
    budget = args.budget_gib * 2**30
    runs = {batch: run_variant(args, kind="loss", model=model, vocab=vocab, batch=batch)["total_bytes"]
            for batch in (2, 4, 8)}
    per_sample = (runs[8] - runs[2]) / 6
    fit_error = abs(runs[4] - (runs[2] + 2 * per_sample)) / runs[4]
    batch = int((budget - runs[2]) / per_sample) + 2
    result = {"batch": batch, "per_sample_bytes": per_sample, "fit_error_at_4": fit_error, "verified": False,
              "total_bytes": runs[2] + (batch - 2) * per_sample}
    while args.verify_largest and batch > 0:
        total = run_variant(args, kind="loss", model=model, vocab=vocab, batch=batch)["total_bytes"]
        if total <= budget:
            return {**result, "batch": batch, "total_bytes": total, "verified": True}
        logger.info("  %s batch %d took %.2f GiB: lowering it", model, batch, total / 2**30)
        batch = int(batch * 0.9)
    return result


def loss_section(args) -> list[dict]:
    """ArchLM's fused loss against transformers' Llama at each vocabulary: memory, time and the largest batch."""
    rows = []
    for vocab in (int(value) for value in args.loss_vocabs.split(",")):
        logger.info("loss section, vocabulary %d: peak memory of a batch-%d step", vocab, args.loss_batch)
        row = {"vocab": vocab}
        for model in ("archlm", "llama"):
            row[model] = run_variant(args, kind="loss", model=model, vocab=vocab, batch=args.loss_batch)
        logger.info("  step time, %d interleaved pairs", args.pairs)
        models = {name: loss_models(args, vocab, name) for name in ("archlm", "llama")}
        ids = torch.randint(0, vocab, (args.loss_batch, args.loss_seq), device=args.device)
        row["step_seconds"] = interleaved(models, train_step_seconds(ids, args.device), args.pairs)
        del models
        for model in ("archlm", "llama"):
            logger.info("  largest %s batch within %.0f GiB", model, args.budget_gib)
            row[model]["largest_batch"] = largest_batch(args, vocab, model)
        rows.append(row)
        logger.info("  %s", row)
    return rows


def largest(row: dict) -> str:
    return f"{row['largest_batch']['batch']}{'*' if row['largest_batch']['verified'] else ''}"


def loss_markdown(results: dict) -> list[str]:
    setup = results["loss_setup"]
    lines = [f"Fused loss against transformers' Llama (same weights): `{setup['architecture']}` at each vocabulary, "
             f"batch {setup['batch']} x seq {setup['seq']}; peak = the step's growth over weights and AdamW state; "
             f"step time the median of {setup['pairs']} interleaved pairs; largest batch = the whole process within "
             f"{setup['budget_gib']:g} GiB (* run and measured; else from the linear fit of the peak over batches "
             "2 and 8, its error at batch 4 in the JSON).", "",
             "| vocab | ArchLM peak MiB | Llama peak MiB | memory ratio | ArchLM step s | Llama step s | speed ratio "
             "| ArchLM largest batch | Llama largest batch |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["loss"]:
        archlm, llama, step = row["archlm"], row["llama"], row["step_seconds"]
        lines.append(f"| {row['vocab']:,} | {archlm['peak_bytes'] / 2**20:.0f} | {llama['peak_bytes'] / 2**20:.0f} | "
                     f"{archlm['peak_bytes'] / llama['peak_bytes']:.2f}x | {step['archlm']:.2f} | {step['llama']:.2f} | "
                     f"{step['llama'] / step['archlm']:.2f}x | {largest(archlm)} | {largest(llama)} |")
    return lines + ["", "memory ratio = ArchLM / Llama (< 1: ArchLM uses less); speed ratio = Llama time / ArchLM time "
                        "(> 1: ArchLM is faster)."]


def checkpointing_markdown(results: dict) -> list[str]:
    lines = [f"Activation checkpointing at sequence {results['checkpoint_seq']} (sdpa), `{results['architecture']}`, "
             f"batch {results['batch']}, median of {results['steps']} steps:", "",
             "| checkpointed layers | peak MiB | step s | memory saved | time cost |", "|---|---:|---:|---:|---:|"]
    none = results["checkpointing"][0]
    for row in results["checkpointing"]:
        label = {0: "none", 1: "all"}.get(row["every_n_layers"], f"every {row['every_n_layers']}")
        lines.append(f"| {label} | {row['peak_bytes'] / 2**20:.0f} | {row['seconds']:.2f} | "
                     f"{1 - row['peak_bytes'] / none['peak_bytes']:.0%} | {row['seconds'] / none['seconds'] - 1:+.0%} |")
    return lines


def attention_markdown(results: dict) -> list[str]:
    lines = [f"eager vs sdpa attention, `{results['architecture']}`, batch {results['batch']}:", "",
             "| seq | eager MiB | sdpa MiB | eager s | sdpa s |", "|---:|---:|---:|---:|---:|"]
    by_seq = {}
    for row in results["attention"]:
        by_seq.setdefault(row["seq"], {})[row["attn"]] = row
    for seq, rows in sorted(by_seq.items()):
        eager, sdpa = rows["eager"], rows["sdpa"]
        lines.append(f"| {seq} | {eager['peak_bytes'] / 2**20:.0f} | {sdpa['peak_bytes'] / 2**20:.0f} | "
                     f"{eager['seconds']:.2f} | {sdpa['seconds']:.2f} |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"fp32 training steps (forward, backward, AdamW) on {results['machine']}."]
    for name, section in (("loss", loss_markdown), ("checkpointing", checkpointing_markdown),
                          ("attention", attention_markdown)):
        if results[name]:
            lines += [""] + section(results)
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("loss", "checkpointing", "attention") if results[name]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, name in zip(axes[0], panels):
        if name == "loss":
            labels = [f"{row['vocab'] // 1000}k" for row in results["loss"]]
            positions = range(len(labels))
            for offset, model in ((-0.2, "archlm"), (0.2, "llama")):
                axis.bar([p + offset for p in positions], [row[model]["peak_bytes"] / 2**20 for row in results["loss"]],
                         width=0.4, label={"archlm": "ArchLM (fused loss)", "llama": "transformers Llama"}[model])
            axis.set_xticks(list(positions), labels)
            axis.set(xlabel="vocabulary", ylabel="step peak MiB above weights + AdamW",
                     title=f"Training step, batch {results['loss_setup']['batch']} x {results['loss_setup']['seq']}")
            axis.legend()
        elif name == "checkpointing":
            rows = results["checkpointing"]
            labels = [{0: "none", 1: "all"}.get(row["every_n_layers"], f"every {row['every_n_layers']}") for row in rows]
            axis.bar(labels, [row["peak_bytes"] / 2**20 for row in rows])
            axis.set(ylabel="peak MiB", title=f"Activation checkpointing, seq {results['checkpoint_seq']}")
        else:
            for attn in ("eager", "sdpa"):
                rows = sorted((row for row in results["attention"] if row["attn"] == attn), key=lambda row: row["seq"])
                axis.plot([row["seq"] for row in rows], [row["peak_bytes"] / 2**20 for row in rows], marker="o",
                          label=attn)
            axis.set(xscale="log", xlabel="sequence length", ylabel="peak MiB above the model",
                     title="Training-step memory")
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        variant = json.loads(args.probe)
        print(json.dumps(loss_probe(args, variant) if variant.get("kind") == "loss" else probe(args, variant)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = set(args.sections.split(","))
    unknown = sections - {"loss", "checkpointing", "attention"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from loss, checkpointing, attention")
    seqs = [int(value) for value in args.seqs.split(",")]
    results = {"architecture": llama_config(args).architecture_name, "batch": args.batch, "steps": args.steps,
               "machine": machine_description(), "checkpoint_seq": args.checkpoint_seq,
               "loss_setup": {"hidden": args.loss_hidden, "layers": args.loss_layers, "batch": args.loss_batch,
                              "seq": args.loss_seq, "budget_gib": args.budget_gib, "pairs": args.pairs,
                              "architecture": loss_models(args, 1024, "archlm").config.architecture_name},
               "loss": [], "checkpointing": [], "attention": []}
    if "loss" in sections:
        results["loss"] = loss_section(args)
    if "checkpointing" in sections:
        logger.info("checkpointing sweep at seq %d", args.checkpoint_seq)
        results["checkpointing"] = [run_variant(args, seq=args.checkpoint_seq, attn="sdpa", every_n_layers=n)
                                    for n in (0, 2, 1)]
    if "attention" in sections:
        logger.info("eager vs sdpa at seq %s", seqs)
        results["attention"] = [run_variant(args, seq=seq, attn=attn, every_n_layers=0)
                                for seq in seqs for attn in ("eager", "sdpa")]
    table = markdown(results)
    write_results(args.output_dir, "memory", results, table, plot)


if __name__ == "__main__":
    main()
