"""torch.compile in the main job: examples/train.py with and without --torch_compile (regional compilation of the
decoder layer), same model, data and seed, each in a process of its own.

    python benchmarks/compile.py                                  # ~5 minutes on 2 CPU cores
    python benchmarks/compile.py --steps 100 --preset llama --config_overrides "num_hidden_layers=4,hidden_size=256"

From each run's training_log.json: the first step (compilation included), the median step after it, tokens/s.
Compilation pays for itself after break-even steps = extra seconds of the compiled first step / seconds saved per
step. Writes compile.json, compile.md and compile.png to --output_dir.
"""

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_description, write_results

logger = logging.getLogger("benchmarks.compile")
TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
DEMO_MODEL = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama")
    parser.add_argument("--config_overrides", default=DEMO_MODEL, help="the demo's model by default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def run(args, folder: Path, compiled: bool) -> dict:
    command = [sys.executable, str(TRAIN), "--preset", args.preset, "--config_overrides", args.config_overrides,
               "--tokenizer_vocab_size", "4096", "--max_corpus_mb", "2", "--block_size", str(args.block_size),
               "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps),
               "--learning_rate", "3e-3", "--logging_steps", "10", "--eval_strategy", "no", "--save_strategy", "no",
               "--sample_prompt", "", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
               "--output_dir", str(folder), "--overwrite_output_dir"]
    if compiled:
        command += ["--torch_compile", "true"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"train.py failed ({'compiled' if compiled else 'eager'}):\n{result.stderr[-3000:]}")
    log = json.loads((folder / "training_log.json").read_text())
    summary = log["summary"]
    return {key: summary[key] for key in ("first_step_seconds", "median_step_seconds", "tokens_per_second",
                                          "final_loss", "train_runtime_s")} | {"architecture": log["architecture_name"]}


def markdown(results: dict) -> str:
    eager, compiled = results["eager"], results["compiled"]
    lines = [f"examples/train.py, `{eager['architecture']}`, batch {results['batch']} x {results['block_size']}, "
             f"{results['steps']} steps, fp32; {results['machine']}.", "",
             "| run | first step s | median step s | tokens/s | final loss | run s |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in (("eager", eager), ("--torch_compile", compiled)):
        lines.append(f"| {name} | {row['first_step_seconds']:.2f} | {row['median_step_seconds']:.3f} | "
                     f"{row['tokens_per_second']:,.0f} | {row['final_loss']:.3f} | {row['train_runtime_s']:.1f} |")
    speedup = eager["median_step_seconds"] / compiled["median_step_seconds"]
    break_even = results["break_even_steps"]
    pays = (f"so --torch_compile pays for runs longer than {break_even:.0f} steps." if break_even is not None else
            "so --torch_compile does not pay on this machine at this size (a compiled step is not faster).")
    lines += ["", f"Compiled steps are {speedup:.2f}x the eager speed; compilation costs "
                  f"{results['compile_seconds']:.1f} s, {pays}"]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eager, compiled = results["eager"], results["compiled"]
    steps = range(0, max(results["steps"], int(2 * (results["break_even_steps"] or results["steps"]))) + 1)

    def elapsed(row):  # the first step, then the median step after it
        return [0 if step == 0 else row["first_step_seconds"] + (step - 1) * row["median_step_seconds"] for step in steps]

    fig, axis = plt.subplots(figsize=(6, 4))
    axis.plot(list(steps), elapsed(eager), label="eager")
    axis.plot(list(steps), elapsed(compiled), label="--torch_compile")
    if results["break_even_steps"] is not None:
        axis.axvline(results["break_even_steps"], color="grey", linestyle=":", label="break-even")
    axis.set(xlabel="training steps", ylabel="seconds", title="Time to train N steps (measured first and median step)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"steps": args.steps, "batch": args.batch, "block_size": args.block_size, "machine": machine_description()}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("eager", "compiled"):
            logger.info("training %d steps, %s", args.steps, name)
            results[name] = run(args, Path(folder) / name, compiled=name == "compiled")
    eager, compiled = results["eager"], results["compiled"]
    extra = (compiled["first_step_seconds"] - compiled["median_step_seconds"]) - (
        eager["first_step_seconds"] - eager["median_step_seconds"])
    saved = eager["median_step_seconds"] - compiled["median_step_seconds"]
    results["compile_seconds"] = extra
    results["break_even_steps"] = extra / saved if saved > 0 else None
    write_results(args.output_dir, "compile", results, markdown(results), plot)


if __name__ == "__main__":
    main()
