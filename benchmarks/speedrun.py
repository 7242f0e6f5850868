"""What moves validation loss per second for a small model on this machine: training recipes at equal wall-clock.

Each variant trains the same architecture (the issue's 4-layer, 192-wide llama preset, BPE 2048, block 128,
batch 16) on the same text for the same --max_train_seconds, through `python -m archlm.train`, and is scored by
its validation loss in nats per character (tokenizer-neutral), from the held-out last 10% of the text (nanoGPT's
split). Variants differ only in the flags of VARIANTS.

    python benchmarks/shakespeare.py runs/shakespeare.txt       # or any plain-text file
    python benchmarks/speedrun.py --text runs/shakespeare.txt --seconds 240 --variants adamw,speedrun

Writes OUTPUT_DIR/speedrun.json and OUTPUT_DIR/speedrun.png (validation nats/char against seconds) and prints a
table. Runs are sequential unless --parallel 2, which with --threads 1 gives each run one of two cores: use that
only to rank variants against each other, never for the absolute figure of a 2-core run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = [
    "--preset", "llama", "--config_overrides",
    "hidden_size=192,intermediate_size=512,num_hidden_layers=4,num_attention_heads=6,num_key_value_heads=2",
    "--tokenizer_vocab_size", "2048", "--block_size", "128", "--per_device_train_batch_size", "16",
]
ADAMW = ["--learning_rate", "2e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "20"]  # the baseline
# name -> (flags, what it tests); config fields go through --config_overrides (appended to the architecture's)
VARIANTS = {
    "adamw": (ADAMW, "AdamW, lr 2e-3, cosine, 20 warm-up steps: the issue's plain recipe"),
    "speedrun": (["--recipe", "speedrun"], "--recipe speedrun"),
    # the levers of docs/training.md, one at a time over Muon at 4e-3
    "adamw_lr4": (["--learning_rate", "4e-3", "--adam_beta2", "0.95", "--lr_scheduler_type", "cosine",
                   "--warmup_steps", "20"], "AdamW at twice the learning rate"),
    "muon": (["--optim", "muon", *ADAMW], "Muon at AdamW's learning rate (RMS-matched)"),
    "muon_lr4": (["--optim", "muon", "--learning_rate", "4e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "20"],
                 "Muon, learning rate 4e-3"),
    "muon_lr8": (["--optim", "muon", "--learning_rate", "8e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "20"],
                 "Muon, learning rate 8e-3"),
}
MUON4 = VARIANTS["muon_lr4"][0]
VARIANTS.update({
    "muon_lr4_dropout": ([*MUON4, "--weight_decay", "0.1", "+hidden_dropout=0.1", "+attention_dropout=0.1",
                          "+embedding_dropout=0.1"], "dropout 0.1 and weight decay 0.1"),
    "muon_lr4_qknorm": ([*MUON4, "+qk_norm=true"], "qk-norm"),
    "muon_lr4_tied": ([*MUON4, "+tie_word_embeddings=true"], "tied embeddings"),
    "muon_lr4_theta1k": ([*MUON4, '+rope_parameters={"rope_type":"default","rope_theta":1000.0}'], "rope theta 1000"),
    "muon_lr4_warm100": ([*MUON4[:-1], "100"], "100 warm-up steps instead of 20"),
    "muon_lr4_zloss": ([*MUON4, "+z_loss_coef=1e-4"], "PaLM's z-loss, 1e-4"),
})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="A plain-text file: the first 90%% trains, the rest validates.")
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--variants", default="adamw,speedrun", help=f"Comma-separated: {', '.join(VARIANTS)}.")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                        help='A variant of your own, e.g. --extra "muon3e-3=--optim muon --learning_rate 3e-3".')
    parser.add_argument("--eval_steps", type=int, default=200, help="Evaluations for the loss-vs-time plot.")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per run (default: all cores).")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--output_dir", default="benchmarks/results/speedrun")
    return parser.parse_args(argv)


def split_text(path: str, folder: Path) -> tuple[Path, Path]:
    text = Path(path).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, validation = folder / "train.txt", folder / "validation.txt"
    folder.mkdir(parents=True, exist_ok=True)
    train.write_text(text[:cut], encoding="utf-8")
    validation.write_text(text[cut:], encoding="utf-8")
    return train, validation


def variant_flags(name: str, extra: dict[str, list[str]]) -> list[str]:
    flags = extra[name] if name in extra else VARIANTS[name][0]
    overrides = [flag for flag in flags if flag.startswith("+")]  # "+key=value": a config field over the architecture
    flags = [flag for flag in flags if not flag.startswith("+")]
    architecture = list(ARCHITECTURE)
    if overrides:
        index = architecture.index("--config_overrides") + 1
        architecture[index] += "," + ",".join(flag[1:] for flag in overrides)
    return architecture + flags


def command(name: str, args, files: tuple[Path, Path], extra) -> list[str]:
    train, validation = files
    return [sys.executable, "-m", "archlm.train", *variant_flags(name, extra), "--train_file", str(train),
            "--validation_file", str(validation), "--max_train_seconds", str(args.seconds),
            "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--logging_steps", "50",
            "--report_to", "none", "--disable_tqdm", "true", "--sample_prompt", "",
            "--output_dir", str(Path(args.output_dir) / name), "--overwrite_output_dir", "true"]


def result(name: str, args) -> dict:
    log = json.loads((Path(args.output_dir) / name / "training_log.json").read_text())
    summary = log["summary"]
    return {
        "variant": name,
        "steps": summary["global_step"],
        "seconds": summary["budget"]["elapsed_seconds"],
        "eval_nats_per_char": summary["eval_nats_per_char"],
        "eval_loss": summary["eval_loss"],
        "train_loss": summary["final_loss"],
        "tokens_per_second": summary["tokens_per_second"],
        "curve": [(entry["elapsed_seconds"], entry["eval_nats_per_char"]) for entry in log["evals"]
                  if "elapsed_seconds" in entry and entry.get("eval_nats_per_char") is not None],
    }


def run_all(names: list[str], args, files, extra) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(Path(args.output_dir) / f"{name}.log", "w")
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(variant_flags(name, extra))}", flush=True)
            running.append((name, subprocess.Popen(command(name, args, files, extra), env=env, stdout=log,
                                                   stderr=subprocess.STDOUT), log))
        time.sleep(1)
        for entry in [entry for entry in running if entry[1].poll() is not None]:
            running.remove(entry)
            entry[2].close()
            if entry[1].returncode != 0:
                raise SystemExit(f"{entry[0]} failed: see {Path(args.output_dir) / (entry[0] + '.log')}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for entry in results:
        seconds, losses = zip(*entry["curve"]) if entry["curve"] else ((), ())
        axis.plot(seconds, losses, marker="o", markersize=3, label=f"{entry['variant']} ({entry['eval_nats_per_char']:.3f})")
    axis.set_xlabel("training seconds (wall clock)")
    axis.set_ylabel("validation loss (nats / character)")
    axis.set_title("Validation loss against time, equal budgets")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    extra = {}
    for item in args.extra:
        name, _, flags = item.partition("=")
        extra[name] = flags.split()
    names = [name for name in args.variants.split(",") if name] + list(extra)
    unknown = [name for name in names if name not in VARIANTS and name not in extra]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: {', '.join(VARIANTS)}, or define one with --extra")
    output = Path(args.output_dir)
    files = split_text(args.text, output / "data")
    run_all(names, args, files, extra)
    results = [result(name, args) for name in names]
    baseline = next((entry for entry in results if entry["variant"] == "adamw"), results[0])
    from common import machine_description

    lines = [f"Text: {Path(args.text).name} ({Path(args.text).stat().st_size:,} bytes; last 10% held out), "
             f"{args.seconds:g} s per run, {args.threads or 'all'} thread(s) per run, {args.parallel} at a time; "
             f"{machine_description()}.", "",
             f"| variant | steps | seconds | val nats/char | vs {baseline['variant']} | train loss/token | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for entry in results:
        ratio = entry["eval_nats_per_char"] / baseline["eval_nats_per_char"]
        lines.append(f"| {entry['variant']} | {entry['steps']} | {entry['seconds']:.1f} | "
                     f"{entry['eval_nats_per_char']:.4f} | {ratio:.3f} | {entry['train_loss']:.3f} | "
                     f"{entry['tokens_per_second'] or 0:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    document = {"text": args.text, "seconds": args.seconds, "threads": args.threads, "parallel": args.parallel,
                "machine": machine_description(),
                "variants": {name: variant_flags(name, extra) for name in names}, "results": results}
    (output / "speedrun.json").write_text(json.dumps(document, indent=2) + "\n")
    (output / "speedrun.md").write_text(table + "\n")
    plot(results, output / "speedrun.png")
    print(f"\n{output / 'speedrun.json'}, {output / 'speedrun.md'}, {output / 'speedrun.png'}")


if __name__ == "__main__":
    main()
