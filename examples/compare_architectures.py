"""Compare ArchLM training runs: a ranked markdown table and a PNG of their loss curves.

    python examples/compare_architectures.py --presets gpt2,llama,hybrid --max_steps 200 --output_dir runs/compare \
        -- --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4" --block_size 256

With --presets, each preset is first trained by examples/train.py on the same data, seed and budget (steps,
batch, block size); the first run's tokenizer is reused by the others, so every model sees the same tokens. Flags
after `--` are passed on to every train.py run. Without --presets, give run folders to compare:

    python examples/compare_architectures.py runs/gpt2 runs/llama --output_dir runs/compare

Writes OUTPUT_DIR/comparison.md (ranked by final eval loss) and OUTPUT_DIR/loss_curves.png, and prints the table.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("compare_architectures")
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
COLUMNS = ("rank", "run", "architecture", "parameters", "tokens/s", "MFU", "eval loss", "perplexity")


def load_run(folder: Path) -> dict:
    """A run's training_log.json, with its folder."""
    path = folder / "training_log.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no training_log.json: is it the --output_dir of examples/train.py?")
    log = json.loads(path.read_text(encoding="utf-8"))
    return {**log, "folder": folder}


def _final_eval_loss(run: dict) -> float | None:
    summary = run.get("summary") or {}
    if summary.get("eval_loss") is not None:
        return summary["eval_loss"]
    return run["evals"][-1]["eval_loss"] if run.get("evals") else None


def _format(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_table(runs: list[dict]) -> str:
    """Markdown table ranked by final eval loss (runs without one last)."""
    ranked = sorted(runs, key=lambda run: (_final_eval_loss(run) is None, _final_eval_loss(run) or 0.0))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for rank, run in enumerate(ranked, start=1):
        summary = run.get("summary") or {}
        loss = _final_eval_loss(run)
        cells = [
            str(rank),
            run["folder"].name,
            run["architecture_name"],
            _format(run.get("parameters"), ","),
            _format(summary.get("tokens_per_second"), ",.0f"),
            _format(summary.get("mfu") * 100 if summary.get("mfu") is not None else None, ".1f") + ("%" if summary.get("mfu") is not None else ""),
            _format(loss, ".4f"),
            _format(math.exp(loss) if loss is not None and loss < 700 else None, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(runs: list[dict], path: Path) -> None:
    """Training loss (lines) and eval loss (markers) against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        label = f"{run['folder'].name} ({run['architecture_name']})"
        steps = [entry["step"] for entry in run["steps"]]
        (line,) = axes.plot(steps, [entry["loss"] for entry in run["steps"]], label=label, linewidth=1.2)
        if run.get("evals"):
            axes.plot([entry["step"] for entry in run["evals"]], [entry["eval_loss"] for entry in run["evals"]],
                      "o--", color=line.get_color(), markersize=4, linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (lines: train, dots: eval)")
    axes.set_title("ArchLM architectures: same data, seed and budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def train_presets(presets: list[str], output_dir: Path, max_steps: int, seed: int, train_args: list[str]) -> list[Path]:
    """Trains each preset with examples/train.py in its own process (so memory peaks are its own)."""
    folders, tokenizer = [], []
    for preset in presets:
        folder = output_dir / preset
        command = [sys.executable, str(TRAIN_SCRIPT), "--preset", preset, "--max_steps", str(max_steps), "--seed", str(seed),
                   "--data_seed", str(seed), "--output_dir", str(folder), "--overwrite_output_dir", *tokenizer, *train_args]
        logger.info("Training %s: %s", preset, " ".join(command))
        result = subprocess.run(command)
        if result.returncode != 0:
            raise SystemExit(f"compare_architectures.py: error: training preset {preset!r} failed (exit code {result.returncode}).")
        folders.append(folder)
        if not tokenizer and "--tokenizer_name" not in train_args:
            tokenizer = ["--tokenizer_name", str(folder)]  # the same tokens for every architecture
    return folders


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    separator = argv.index("--") if "--" in argv else len(argv)
    argv, train_args = argv[:separator], argv[separator + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("runs", nargs="*", type=Path, help="Run folders (--output_dir of examples/train.py) to compare.")
    parser.add_argument("--presets", help="Comma-separated presets to train first, e.g. gpt2,llama,hybrid.")
    parser.add_argument("--max_steps", type=int, default=200, help="Training steps of each preset (with --presets).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of every run (with --presets).")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/compare"), help="Where the table, plot and runs go.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    if not args.presets and not args.runs:
        parser.error("give run folders to compare, or --presets to train them first")
    if train_args and not args.presets:
        parser.error(f"flags for train.py ({' '.join(train_args)}) need --presets")
    folders = list(args.runs)
    if args.presets:
        presets = [name.strip() for name in args.presets.split(",") if name.strip()]
        folders += train_presets(presets, args.output_dir, args.max_steps, args.seed, train_args)
    try:
        runs = [load_run(folder) for folder in folders]
    except ValueError as error:
        parser.error(str(error))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    (args.output_dir / "comparison.md").write_text(table + "\n", encoding="utf-8")
    plot_loss_curves(runs, args.output_dir / "loss_curves.png")
    print(table)
    logger.info("Wrote %s and %s", args.output_dir / "comparison.md", args.output_dir / "loss_curves.png")
    return os.fspath(args.output_dir)


if __name__ == "__main__":
    main()
