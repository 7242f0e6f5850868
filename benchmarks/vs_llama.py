"""ArchLM's llama preset against transformers' own LlamaForCausalLM holding the same weights, side by side.

    python benchmarks/vs_llama.py                                  # ~2 minutes on 2 CPU cores
    python benchmarks/vs_llama.py --layers 8 --pairs 7 --output_dir benchmarks/results

Both models run in one process, interleaved (alternating which goes first, after a warm-up), and each
figure is the median over --pairs pairs, so the ratios hold even when the machine's speed drifts:
forward tokens/s; training-step tokens/s (forward + backward + fused AdamW, the Trainer's default), eager
and compiled (torch.compile, the Trainer's --torch_compile); batch-1 cached decode tokens/s with the
dynamic cache, the static cache, and the static cache with the decode step compiled (transformers'
CompileConfig, on CPU too); peak memory of a training step (measured in a fresh process per model). MFU
divides the training FLOPs (`model.flops_per_token`) by the measured dense matmul rate of the same machine
(fp32 here; bf16 is reported, and used on a GPU). Writes vs_llama.json, vs_llama.md and vs_llama.png to
--output_dir.
"""

import argparse
import json
import logging
import statistics
import subprocess
import sys

import torch
from common import (
    Interleaved,
    add_model_flags,
    decode_ms_per_token,
    interleaved,
    llama_config,
    machine_description,
    peak_memory_since,
    seconds,
    start_peak_memory,
    write_results,
)

from archlm import ArchLMForCausalLM
from archlm.convert import to_transformers
from archlm.training import measure_peak_tflops

logger = logging.getLogger("benchmarks.vs_llama")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved measurement pairs per figure")
    parser.add_argument("--decode_prompt", type=int, default=32)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation for both models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--memory_probe", choices=["archlm", "llama"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_models(args):
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.manual_seed(0)
    config = llama_config(args, max_position_embeddings=max(2048, args.seq * 2), bos_token_id=1, eos_token_id=2)
    archlm = ArchLMForCausalLM(config)
    archlm.set_attn_implementation(args.attn)
    llama = to_transformers(archlm)  # same weights, logits checked equal by the converter's tests
    llama.set_attn_implementation(args.attn)
    return {"archlm": archlm.to(args.device, dtype), "llama": llama.to(args.device, dtype)}, dtype


def forward_seconds(ids, device):
    def measure(model):
        model.eval()
        with torch.no_grad():
            return seconds(lambda: model(ids), device)
    return measure


def train_step_seconds(ids, device, compiled: bool = False):
    """A training step's seconds; `compiled` runs the model through torch.compile (the Trainer's --torch_compile)."""
    optimizers, forwards = {}, {}

    def measure(model):
        model.train()
        # fused AdamW: the Trainer's default optimizer (adamw_torch_fused) since torch 2.8
        optimizer = optimizers.setdefault(id(model), torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
        forward = forwards.setdefault(id(model), torch.compile(model) if compiled else model)

        def step():
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return seconds(step, device)
    return measure


def memory_probe(args) -> None:
    """Runs in a fresh process: peak resident memory added by one training step of one model, in bytes."""
    models, _ = build_models(args)
    model = models[args.memory_probe]
    del models
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    base = start_peak_memory(args.device)
    measure = train_step_seconds(ids, args.device)
    measure(model)
    measure(model)  # the second step holds AdamW's state too
    print(json.dumps({"peak_bytes": peak_memory_since(args.device, base)}))


def peak_memory(args, name: str) -> int:
    command = [sys.executable, __file__, "--memory_probe", name] + [
        f"--{key}={value}" for key, value in vars(args).items() if key != "memory_probe" and value is not None]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def ratio(row: dict, reference: str) -> float:
    """ArchLM over the reference, > 1 when ArchLM is better (faster, or less memory)."""
    return row["archlm"] / row[reference] if row["higher_is_better"] else row[reference] / row["archlm"]


def comparison_table(results: dict, reference: str, label: str) -> list[str]:
    """The header line and the table of `results["rows"]`, ArchLM against `reference` (the rows' key for it)."""
    lines = [
        f"`{results['architecture']}` ({results['parameters'] / 1e6:.1f}M parameters), {results['dtype']}, "
        f"batch {results['batch']} x seq {results['seq']}, {results['attn']}; {results['machine']}; median of "
        f"{results['pairs']} interleaved pairs.", "",
        f"| measure | ArchLM | {label} | ArchLM / {label.split()[-1]} | pairs ArchLM won (median pair) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        pairs = row.get("pair_ratios")  # the median pair cancels the machine's drift between pairs
        won = f"{sum(r > 1 for r in pairs)} of {len(pairs)} ({statistics.median(pairs):.2f}x)" if pairs else ""
        lines.append(f"| {row['measure']} | {row['archlm']:,.1f} | {row[reference]:,.1f} | {ratio(row, reference):.2f}x "
                     f"| {won} |")
    return lines


def throughput_row(measure: str, times: Interleaved, work: float) -> dict:
    """A table row of `work` / time per model (tokens/s from seconds, or 1000 / ms per token), with each pair's ratio."""
    return {"measure": measure, **{name: work / time for name, time in times.items()}, "higher_is_better": True,
            "pair_ratios": times.pair_ratios()}


def markdown(results: dict) -> str:
    lines = comparison_table(results, "llama", "transformers Llama")
    lines += ["", f"Measured matmul rate: fp32 {results['matmul_tflops']['float32']:.3f} TFLOP/s, bf16 "
                  f"{results['matmul_tflops']['bfloat16']:.3f} TFLOP/s. MFU = training tokens/s x FLOPs/token "
                  f"({results['flops_per_token'] / 1e6:.1f} MFLOPs at seq {results['seq']}) / the rate of the dtype "
                  "used. Ratios: > 1 means ArchLM is faster (or uses less memory)."]
    return "\n".join(lines)


def plot_ratios(results: dict, path, reference: str = "llama", label: str = "transformers Llama") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    ratios = [ratio(row, reference) for row in rows]
    fig, axis = plt.subplots(figsize=(8, 4))
    axis.barh([row["measure"] for row in rows], ratios, color=["C2" if r >= 1 else "C3" for r in ratios])
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set(xlabel=f"ArchLM / {label} (> 1: ArchLM better)", title=results["architecture"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models, dtype = build_models(args)
    archlm = models["archlm"]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    prompt = torch.randint(3, args.vocab, (1, args.decode_prompt), device=args.device)
    tokens = args.batch * args.seq
    # the roofline first, on an idle machine: the best of several windows, as train.py's MFU uses it
    device = torch.device(args.device)
    rates = {"float32": measure_peak_tflops(device, torch.float32, seconds=2.0),
             "bfloat16": measure_peak_tflops(device, torch.bfloat16, seconds=2.0)}
    logger.info("measuring %s: forward, train step, decode (dynamic, static), memory", archlm.config.architecture_name)

    forward = interleaved(models, forward_seconds(ids, args.device), args.pairs)
    train = interleaved(models, train_step_seconds(ids, args.device), args.pairs)
    logger.info("compiling both models' training step (torch.compile)")
    train_compiled = interleaved(models, train_step_seconds(ids, args.device, compiled=True), args.pairs)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        decode = interleaved(models, lambda m: decode_ms_per_token(m, prompt, args.decode_tokens, 1), args.pairs)
        decode_static = interleaved(models, lambda m: decode_ms_per_token(
            m, prompt, args.decode_tokens, 1, cache_implementation="static"), args.pairs)
        logger.info("compiling both models' decode step (static cache, torch.compile)")
        decode_compiled = interleaved(models, lambda m: decode_ms_per_token(
            m, prompt, args.decode_tokens, 1, compiled=True, cache_implementation="static"), args.pairs)
    memory = {name: peak_memory(args, name) for name in models}

    flops = archlm.flops_per_token(args.seq)
    peak = rates["bfloat16" if dtype == torch.bfloat16 else "float32"] * 1e12
    rows = [
        throughput_row("forward tokens/s", forward, tokens),
        throughput_row("train step tokens/s", train, tokens),
        throughput_row("train step tokens/s (compiled)", train_compiled, tokens),
        throughput_row("decode tokens/s (dynamic cache)", decode, 1000),
        throughput_row("decode tokens/s (static cache)", decode_static, 1000),
        throughput_row("decode tokens/s (static cache, compiled)", decode_compiled, 1000),
        {"measure": "train MFU %", **{n: 100 * tokens / s * flops / peak for n, s in train.items()}, "higher_is_better": True},
        {"measure": "train MFU % (compiled)", **{n: 100 * tokens / s * flops / peak for n, s in train_compiled.items()},
         "higher_is_better": True},
        {"measure": "train step peak MiB", **{n: b / 2**20 for n, b in memory.items()}, "higher_is_better": False},
    ]
    results = {
        "architecture": archlm.config.architecture_name, "parameters": archlm.num_parameters(), "dtype": str(dtype),
        "batch": args.batch, "seq": args.seq, "attn": args.attn, "pairs": args.pairs, "machine": machine_description(),
        "matmul_tflops": rates, "flops_per_token": flops, "rows": rows,
    }
    table = markdown(results)
    write_results(args.output_dir, "vs_llama", results, table, plot_ratios)


if __name__ == "__main__":
    main()
