"""Compare ArchLM training runs: a ranked markdown table and a PNG of their loss curves.

    python examples/compare_architectures.py --presets gpt2,llama,hybrid --max_steps 200 --output_dir runs/compare \
        -- --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4" --block_size 256
    python examples/compare_architectures.py --presets gpt2,llama,qwen3_moe --budget_flops 2e15 --output_dir runs/flops \
        -- --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4" --block_size 256

With --presets, each preset is first trained by examples/train.py into OUTPUT_DIR/<preset> on the same data, seed,
batch and block size, and one budget, the same for every run:

    --max_steps N        equal steps: N optimizer steps each (the default, 200, when no budget is given);
    --budget_flops F     equal compute: each run takes floor(F / (FLOPs per token x tokens per step)) steps, FLOPs
                         per token being its model's flops_per_token(block size) (training: forward + backward;
                         a mixture of experts counts its active experts only) and tokens per step
                         batch x accumulation x processes x block size; a bigger model gets fewer steps. The steps
                         are computed before the first run starts, and a budget that buys some preset no step is
                         refused;
    --budget_seconds N   equal wall-clock: each run gets train.py's --max_train_seconds N (it measures its
                         throughput after warm-up and fixes its steps so training, evaluations included, ends
                         within N seconds).

The first run's tokenizer is reused by the others, so every model sees the same tokens (with --budget_flops the
vocabulary decides the FLOPs of the output layer, so the tokenizer is trained here first, into OUTPUT_DIR/tokenizer,
unless --tokenizer_name or a vocab_size override is given after `--`); every run's MFU is measured against one peak
TFLOP/s, measured once here before the runs (or the --peak_tflops given after `--`). Flags after `--` are passed on
to every train.py run, except those this script sets per run (PER_RUN_FLAGS); `--preset_overrides
PRESET:FIELD=VALUE,...` adds config overrides for one preset's run on top of the shared --config_overrides (its
fields win), e.g. mixtures of the same active width from presets whose experts differ:

    python examples/compare_architectures.py --presets llama,mixtral,dots1 --max_steps 400 \
        --preset_overrides "mixtral:moe_intermediate_size=256" \
        --preset_overrides "dots1:num_experts=32,moe_intermediate_size=64,shared_expert_intermediate_size=128" \
        -- --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=512"
 What can be checked without training is checked before the first run starts: the presets,
the train.py flags, and the run folders, which must not hold an earlier run unless --overwrite is given.
Without --presets, give run folders to compare:

    python examples/compare_architectures.py runs/gpt2 runs/llama --output_dir runs/compare

Writes OUTPUT_DIR/comparison.md (ranked by final eval loss, with each run's steps and training FLOPs, the budget
and the peak MFU is measured against) and OUTPUT_DIR/loss_curves.png, and prints the table.
"""

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from archlm import ArchLMConfig
from archlm.configuration_archlm import parse_config_overrides
from archlm.data import check_data_arguments, load_raw_data, parse_block_size_schedule
from archlm.plots import plot_runs
from archlm.train import parse_args as parse_train_args
from archlm.training import (
    SETUP_ERRORS,
    RunArguments,
    build_config,
    check_arguments,
    check_block_size,
    load_tokenizer,
    measure_peak_tflops,
    rows_per_step,
    train_tokenizer_on,
)

logger = logging.getLogger("compare_architectures")
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"  # each run is the main job in a process of its own
COLUMNS = ("rank", "run", "architecture", "parameters", "steps", "train FLOPs", "tokens/s", "MFU", "peak MiB",
           "eval loss", "perplexity")
BUDGET_FLAGS = ("--max_steps", "--budget_flops", "--budget_seconds")
DEFAULT_MAX_STEPS = 200  # the budget when none of BUDGET_FLAGS is given

# train.py flags that this script sets for each run (or that would undo what it sets), with what to do instead.
# Passed after `--` they would win over its own (the last flag wins), e.g. send every run to one folder.
PER_RUN_FLAGS = {
    "--preset": "each run's preset comes from --presets",
    "--model_name_or_path": "every run would fine-tune that one model instead of training its preset",
    "--output_dir": "each run goes to OUTPUT_DIR/<preset>: give OUTPUT_DIR with --output_dir before `--`",
    "--overwrite_output_dir": "pass --overwrite before `--` to replace earlier runs",
    "--max_steps": "pass --max_steps, --budget_flops or --budget_seconds before `--`: they set every run's budget",
    "--max_train_seconds": "pass --budget_seconds before `--`: it gives every run --max_train_seconds",
    "--seed": "pass --seed before `--`: it is every run's seed and data seed",
    "--data_seed": "pass --seed before `--`: it is every run's seed and data seed",
}


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


def _active_parameters(run: dict) -> str:
    """For a mixture of experts, the parameters one token uses (its config's top-k of every sparse layer's experts)."""
    config = run.get("config") or {}
    if not config.get("num_experts"):
        return ""
    return f" ({ArchLMConfig.from_dict(config).num_parameters_estimate(active_only=True):,} active)"


def train_flops(run: dict) -> float | None:
    """The run's training FLOPs (matmuls, forward + backward) from its log: FLOPs per token x tokens seen; with a
    --block_size_schedule, each stage's steps at that stage's block size (attention reaches less in short blocks)."""
    summary = run.get("summary") or {}
    tokens, steps = summary.get("tokens_seen"), summary.get("global_step")
    if not tokens or not steps or run.get("flops_per_token") is None:
        return None
    if not run.get("block_size_schedule") or not run.get("config"):
        return run["flops_per_token"] * tokens
    stages = flops_per_step(ArchLMConfig.from_dict(run["config"]), run["block_size"], run["block_size_schedule"],
                            tokens / steps)
    return flops_of_steps(steps, stages)


def _format_flops(value: float | None) -> str:
    """12.6 GFLOP, 1.84 PFLOP: the prefix of the value's thousands."""
    if value is None:
        return "-"
    exponent = min(max(int(math.floor(math.log10(value) / 3)) if value > 0 else 0, 0), 6)
    return f"{value / 1000 ** exponent:.3g} {' KMGTPE'[exponent].strip()}FLOP"


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
            _format(run.get("parameters"), ",") + _active_parameters(run),
            _format(summary.get("global_step"), ","),
            _format_flops(train_flops(run)),
            _format(summary.get("tokens_per_second"), ",.0f"),
            _format(summary.get("mfu") * 100 if summary.get("mfu") is not None else None, ".1f") + ("%" if summary.get("mfu") is not None else ""),
            _format(summary.get("peak_memory_mb"), ",.0f"),
            _format(loss, ".4f"),
            _format(math.exp(loss) if loss is not None and loss < 700 else None, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(runs: list[dict], path: Path, budget: str | None = None) -> None:
    """Training loss (lines) and eval loss (markers) against step, one colour per run."""
    plot_runs([(f"{run['folder'].name} ({run['architecture_name']})", run) for run in runs], path,
              f"ArchLM architectures: same data and seed, {budget}" if budget else "ArchLM architectures")


def peak_note(runs: list[dict], source: str | None = None) -> str:
    """Which peak TFLOP/s the MFU column is measured against (from each run's training_log.json), and whether that
    makes the column comparable: MFU is tokens/s x FLOPs/token over the peak, so runs measured against different
    peaks cannot be ranked by it."""
    peaks = [(run["folder"].name, run.get("peak_tflops")) for run in runs]
    distinct = {peak for _, peak in peaks}
    if distinct == {None}:
        return "MFU: the training logs do not record the peak TFLOP/s it was measured against."
    if len(distinct) == 1:
        return f"MFU: every run against the same peak, {distinct.pop():.4g} TFLOP/s ({source or 'from their training logs'})."
    listed = ", ".join(f"{name} {_format(peak, '.4g')}" for name, peak in peaks)
    return (f"MFU is not comparable across these runs: each was measured against its own peak TFLOP/s ({listed}); "
            "give them one with --peak_tflops.")


def per_run_flags_in(train_args: list[str]) -> list[str]:
    """The PER_RUN_FLAGS among the train.py flags, also when written with dashes (--output-dir), with a value
    (--seed=1), or abbreviated as argparse allows (--output for --output_dir)."""
    found = []
    for token in train_args:
        if not token.startswith("--") or token == "--":
            continue
        name = "--" + token[2:].split("=", 1)[0].replace("-", "_")
        found += [flag for flag in PER_RUN_FLAGS if flag.startswith(name) and flag not in found]
    return found


def check_train_flags(train_command: list[str]):
    """Parses a run's train.py flags with train.py's parser and checks them as it does before anything else, so a
    bad flag stops the comparison before the first run rather than in it; returns (model, data, run, training) args."""
    try:
        model_args, data_args, run_args, training_args = parse_train_args(train_command)
        check_arguments(model_args, run_args, training_args, data_args.streaming)
        check_data_arguments(data_args)
    except SETUP_ERRORS as error:
        raise SystemExit(f"compare_architectures.py: error: the train.py flags after `--`: {error}") from None
    return model_args, data_args, run_args, training_args


def budget_label(args: argparse.Namespace) -> str:
    """Which budget every run was given, for the table and the plot."""
    if args.budget_flops is not None:
        return f"equal FLOPs ({args.budget_flops:.4g} training FLOPs per run)"
    if args.budget_seconds is not None:
        return f"equal wall-clock ({args.budget_seconds:g} s of training per run, evaluations included)"
    return f"equal steps ({args.max_steps:,} per run)"


def flops_per_step(config: ArchLMConfig, block_size: int, schedule: str | None,
                   tokens_per_step: float) -> list[tuple[int, float]]:
    """(first step, training FLOPs of each step from there on): one stage, or one per --block_size_schedule entry (a
    step holds the same tokens at every stage; its blocks are cut into shorter rows, so attention reaches less)."""
    model = config._meta_model()  # shapes only: nothing allocated
    stages = parse_block_size_schedule(schedule) if schedule else [(0, block_size)]
    return [(start, model.flops_per_token(size) * tokens_per_step) for start, size in stages]


def _stage_ends(stages: list[tuple[int, float]]) -> list[float]:
    return [start for start, _ in stages[1:]] + [math.inf]


def steps_within(budget: float, stages: list[tuple[int, float]]) -> int:
    """The most optimizer steps whose FLOPs stay within `budget`: floor(budget / FLOPs per step) for one stage."""
    for (start, cost), end in zip(stages, _stage_ends(stages)):
        affordable = math.floor(budget / cost)
        if affordable < end - start:
            return start + affordable
        budget -= (end - start) * cost
    raise AssertionError("the last stage never ends")


def flops_of_steps(steps: float, stages: list[tuple[int, float]]) -> float:
    return sum(min(max(steps - start, 0), end - start) * cost for (start, cost), end in zip(stages, _stage_ends(stages)))


def budget_tokenizer(model_args, data_args, overrides: dict):
    """The tokenizer whose vocabulary the FLOPs budget counts (the output layer's FLOPs grow with it), or None when
    --config_overrides sets vocab_size. The one given with --tokenizer_name; else trained here on the training
    data as train.py would, to be saved and given to every run."""
    if "vocab_size" in overrides:
        return None
    if model_args.tokenizer_name is None:
        logger.info("--budget_flops: training the shared tokenizer before the runs (its vocabulary sets the FLOPs)")
        return train_tokenizer_on(model_args, load_raw_data(data_args).train)[0]
    return load_tokenizer(model_args, None)[0]


def flops_budget_steps(presets: list[str], budget: float, model_args, data_args, training_args,
                       tokenizer, preset_overrides: dict[str, dict] | None = None) -> dict[str, tuple[int, float]]:
    """Each preset's (steps, training FLOPs) within `budget`, from its config with the overrides (its own on top of
    the shared ones) and the tokenizer on the meta device. Refuses a budget that buys some preset no step, or a
    block size a preset cannot take."""
    plan, refused = {}, []
    for preset in presets:
        own = merged_overrides(model_args.config_overrides, (preset_overrides or {}).get(preset, {}))
        config = build_config(dataclasses.replace(model_args, preset=preset), own, tokenizer)
        schedule = data_args.block_size_schedule
        largest = max(size for _, size in parse_block_size_schedule(schedule)) if schedule else None
        block_size = data_args.block_size or largest or min(1024, config.max_position_embeddings)  # as train.py's
        try:
            check_block_size(block_size, config)
        except ValueError as error:
            raise ValueError(f"preset {preset!r}: {error}") from None
        tokens_per_step = rows_per_step(training_args) * block_size
        stages = flops_per_step(config, block_size, schedule, tokens_per_step)
        steps = steps_within(budget, stages)
        plan[preset] = steps, flops_of_steps(steps, stages)
        cost = stages[0][1]
        logger.info("%s: %s steps of %.4g FLOPs (%s FLOPs/token x %s tokens)", preset, f"{steps:,}", cost,
                    f"{cost / tokens_per_step:,.0f}", f"{tokens_per_step:,}")
        if steps == 0:
            refused.append(f"  {preset}: one step costs {cost:.4g} FLOPs ({cost / tokens_per_step:,.0f} FLOPs/token "
                           f"x {tokens_per_step:,} tokens per step)")
    if refused:
        raise ValueError(f"--budget_flops {budget:.4g} buys these presets no training step:\n" + "\n".join(refused)
                         + "\nGive a larger --budget_flops, or fewer tokens per step (batch size, block size).")
    return plan


def shared_peak_tflops(run_args, training_args) -> tuple[float, str]:
    """The peak every run's MFU is measured against, and where it comes from. Measured here once, on the device and
    in the precision train.py would probe: each run measuring its own varies with what else runs at the time."""
    if run_args.peak_tflops is not None:
        return run_args.peak_tflops, "given with --peak_tflops"
    import torch
    accelerator = None if training_args.use_cpu else torch.accelerator.current_accelerator()
    device = accelerator or torch.device("cpu")
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    peak = measure_peak_tflops(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probe's matrices: the runs need the memory
    source = f"measured once by compare_architectures.py before the runs, {device.type} {str(dtype).removeprefix('torch.')}"
    logger.info("Peak for every run's MFU: %.4g TFLOP/s (%s)", peak, source)
    return peak, source


def parse_preset_overrides(values: list[str], presets: list[str]) -> dict[str, dict]:
    """`--preset_overrides PRESET:FIELD=VALUE,...` (repeatable) -> {preset: overrides}; a ValueError names what is
    wrong (a preset not in --presets or given twice, an unknown field)."""
    parsed = {}
    for value in values:
        preset, sep, text = value.partition(":")
        preset = preset.strip()
        if not sep or not text.strip():
            raise ValueError(f"--preset_overrides {value!r} is not 'PRESET:FIELD=VALUE,...' (e.g. "
                             "\"dots1:num_experts=32,moe_intermediate_size=64\").")
        if preset not in presets:
            raise ValueError(f"--preset_overrides {value!r}: {preset!r} is not one of --presets ({', '.join(presets)}).")
        if preset in parsed:
            raise ValueError(f"--preset_overrides names {preset!r} twice: give its overrides in one list.")
        parsed[preset] = parse_config_overrides(text)
    return parsed


def merged_overrides(shared: str | None, own: dict) -> dict:
    """A preset's config overrides: its own (--preset_overrides) on top of the shared --config_overrides."""
    return {**parse_config_overrides(shared), **own}


def with_overrides(train_args: list[str], shared: str | None, extra: dict) -> list[str]:
    """train.py's flags for a run with `extra` overrides on top of the shared --config_overrides: one merged
    --config_overrides at the end (train.py's parser keeps the last), the extra fields winning."""
    if not extra:
        return train_args
    merged = merged_overrides(shared, extra)
    return [*train_args, "--config_overrides", ",".join(f"{key}={json.dumps(value)}" for key, value in merged.items())]


def run_command(preset: str, folder: Path, budget: list[str], seed: int, overwrite: bool, train_args: list[str]) -> list[str]:
    """One run's train.py flags: the per-run ones first (`budget`: --max_steps N or --max_train_seconds N), then
    those given after `--`."""
    return ["--preset", preset, *budget, "--seed", str(seed), "--data_seed", str(seed),
            "--output_dir", str(folder), *(["--overwrite_output_dir"] if overwrite else []), *train_args]


def run_budget(args: argparse.Namespace, steps: dict[str, tuple[int, float]], preset: str) -> list[str]:
    """The train.py flags of a preset's budget: its steps (equal steps, or those its FLOPs budget buys) or seconds."""
    if args.budget_seconds is not None:
        seconds = args.budget_seconds
        return ["--max_train_seconds", str(int(seconds)) if seconds.is_integer() else repr(seconds)]
    return ["--max_steps", str(steps[preset][0] if preset in steps else args.max_steps)]


def train_presets(presets: list[str], output_dir: Path, budgets: dict[str, list[str]], seed: int, overwrite: bool,
                  train_args: dict[str, list[str]], shared_tokenizer: bool) -> list[Path]:
    """Trains each preset with examples/train.py in its own process (so memory peaks are its own), with its budget
    flags and its train.py flags (`train_args[preset]`). With `shared_tokenizer`, the first run's tokenizer is given
    to the others."""
    folders, tokenizer = [], []
    for preset in presets:
        folder = output_dir / preset
        command = [sys.executable, str(TRAIN_SCRIPT),
                   *run_command(preset, folder, budgets[preset], seed, overwrite, [*tokenizer, *train_args[preset]])]
        logger.info("Training %s: %s", preset, " ".join(command))
        result = subprocess.run(command)
        if result.returncode != 0:
            raise SystemExit(f"compare_architectures.py: error: training preset {preset!r} failed (exit code {result.returncode}).")
        folders.append(folder)
        if shared_tokenizer and not tokenizer:
            tokenizer = ["--tokenizer_name", str(folder)]  # the same tokens for every architecture
    return folders


def check_budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One of BUDGET_FLAGS, with --presets, and a usable value; none given: --max_steps DEFAULT_MAX_STEPS."""
    given = [flag for flag in BUDGET_FLAGS if getattr(args, flag[2:]) is not None]
    if given and not args.presets:
        parser.error(f"{' and '.join(given)} set(s) the budget of the runs of --presets: it needs --presets")
    if len(given) > 1:
        parser.error(f"give one budget, --max_steps (equal steps), --budget_flops (equal FLOPs) or --budget_seconds "
                     f"(equal wall-clock), not {' and '.join(given)}.")
    if not given:
        args.max_steps = DEFAULT_MAX_STEPS
    for flag, what in zip(BUDGET_FLAGS, ("a positive number of steps", "a positive number of FLOPs",
                                         "a positive number of seconds")):
        value = getattr(args, flag[2:])
        if value is not None and not (value > 0 and math.isfinite(value)):  # NaN fails `>` too
            parser.error(f"{flag} must be {what} (every run's budget), got {value:g}.")
    if args.budget_seconds is not None and "max_train_seconds" not in {field.name for field in dataclasses.fields(RunArguments)}:
        parser.error("--budget_seconds gives every run train.py's --max_train_seconds, which this version of archlm's "
                     "train.py does not have; use --max_steps or --budget_flops.")


def check_before_training(parser: argparse.ArgumentParser, args: argparse.Namespace, train_args: list[str]) -> list[str]:
    """The checks that need no training, all before the first run: the presets, the budget, the flags after `--`,
    and the run folders. Returns the presets."""
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    valid = ArchLMConfig.presets()
    unknown = [name for name in presets if name not in valid]
    if not presets or unknown:
        parser.error(f"--presets {args.presets!r}: unknown preset(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                     f"valid presets: {', '.join(valid)}.")
    repeated = sorted({name for name in presets if presets.count(name) > 1})
    if repeated:
        parser.error(f"--presets {args.presets!r} names {', '.join(repeated)} more than once: each preset trains once, "
                     "into OUTPUT_DIR/<preset>.")
    refused = per_run_flags_in(train_args)
    if refused:
        reasons = "\n".join(f"  {flag}: {PER_RUN_FLAGS[flag]}" for flag in refused)
        parser.error(f"flags after `--` that would override what this script sets for each run: "
                     f"{', '.join(refused)}\n{reasons}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {str(args.output_dir)!r} is a file; give a folder (new, or holding earlier runs).")
    earlier = [folder for folder in (args.output_dir / name for name in presets)
               if folder.exists() and (not folder.is_dir() or any(folder.iterdir()))]
    if earlier and not args.overwrite:
        parser.error(f"these run folders are not empty (an earlier run?): {', '.join(map(str, earlier))}. Choose "
                     "another --output_dir, or pass --overwrite to train these presets again there (train.py's "
                     "--overwrite_output_dir deletes the earlier model and checkpoints).")
    return presets


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    separator = argv.index("--") if "--" in argv else len(argv)
    argv, train_args = argv[:separator], argv[separator + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("runs", nargs="*", type=Path, help="Run folders (--output_dir of examples/train.py) to compare.")
    parser.add_argument("--presets", help="Comma-separated presets to train first, e.g. gpt2,llama,hybrid.")
    budget = parser.add_argument_group("budget of each run (with --presets; give one)")
    budget.add_argument("--max_steps", type=int,
                        help=f"Equal steps: this many optimizer steps each (the default, {DEFAULT_MAX_STEPS}).")
    budget.add_argument("--budget_flops", type=float,
                        help="Equal compute: each run takes the steps that spend this many training FLOPs, "
                             "floor(F / (FLOPs per token x tokens per step)).")
    budget.add_argument("--budget_seconds", type=float,
                        help="Equal wall-clock: each run gets train.py's --max_train_seconds (training and "
                             "evaluations end within that many seconds).")
    parser.add_argument("--preset_overrides", action="append", default=[], metavar="PRESET:FIELD=VALUE,...",
                        help="Config overrides for one preset's run, on top of the --config_overrides after `--` (its "
                             "fields win); repeat for other presets.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of every run (with --presets).")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/compare"), help="Where the table, plot and runs go.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Train a preset again whose OUTPUT_DIR/<preset> holds an earlier run (with --presets): "
                             "train.py's --overwrite_output_dir deletes that run's model and checkpoints. Without it, "
                             "such folders stop the comparison before anything is trained.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    if not args.presets and not args.runs:
        parser.error("give run folders to compare, or --presets to train them first")
    if train_args and not args.presets:
        parser.error(f"flags for train.py ({' '.join(train_args)}) need --presets")
    if args.overwrite and not args.presets:
        parser.error("--overwrite replaces earlier runs of --presets: it needs --presets")
    if args.preset_overrides and not args.presets:
        parser.error("--preset_overrides changes runs of --presets: it needs --presets")
    check_budget(parser, args)
    if importlib.util.find_spec("matplotlib") is None:  # the plot comes last: find out before any training
        parser.error("the loss curves need matplotlib: pip install matplotlib")
    try:
        runs = [load_run(folder) for folder in args.runs]  # before training, so a wrong folder costs no runs
    except ValueError as error:
        parser.error(str(error))

    peak_source, budget = None, None
    if args.presets:
        presets = check_before_training(parser, args, train_args)
        # with --budget_flops each run's steps are computed below: a placeholder here, to check the other flags
        first = ["--max_steps", "1"] if args.budget_flops is not None else run_budget(args, {}, presets[0])
        model_args, data_args, run_args, training_args = check_train_flags(
            run_command(presets[0], args.output_dir / presets[0], first, args.seed, args.overwrite, train_args))
        try:
            overrides = parse_preset_overrides(args.preset_overrides, presets)
        except SETUP_ERRORS as error:
            parser.error(f"--preset_overrides: {error}")
        for preset in presets:  # each preset's config as its run builds it, before any run
            try:
                build_config(dataclasses.replace(model_args, preset=preset),
                             merged_overrides(model_args.config_overrides, overrides.get(preset, {})))
            except SETUP_ERRORS as error:
                flags = "--config_overrides" + (" and --preset_overrides" if preset in overrides else "")
                parser.error(f"{preset}: {flags}: {error}")
        run_args_of = {preset: with_overrides(train_args, model_args.config_overrides, overrides.get(preset, {}))
                       for preset in presets}
        steps, tokenizer = {}, None
        if args.budget_flops is not None:
            try:
                tokenizer = budget_tokenizer(model_args, data_args, parse_config_overrides(model_args.config_overrides))
                steps = flops_budget_steps(presets, args.budget_flops, model_args, data_args, training_args, tokenizer,
                                           overrides)
            except SETUP_ERRORS as error:
                raise SystemExit(f"compare_architectures.py: error: {error}") from None
        peak, peak_source = shared_peak_tflops(run_args, training_args)
        if run_args.peak_tflops is None:  # repr: every run logs exactly this value
            run_args_of = {preset: [*flags, "--peak_tflops", repr(peak)] for preset, flags in run_args_of.items()}
        if tokenizer is not None and model_args.tokenizer_name is None:  # trained here: every run gets it
            tokenizer.save_pretrained(args.output_dir / "tokenizer")
            run_args_of = {preset: ["--tokenizer_name", str(args.output_dir / "tokenizer"), *flags]
                           for preset, flags in run_args_of.items()}
        folders = train_presets(presets, args.output_dir, {preset: run_budget(args, steps, preset) for preset in presets},
                                args.seed, args.overwrite, run_args_of,
                                shared_tokenizer=model_args.tokenizer_name is None and tokenizer is None)
        runs += [load_run(folder) for folder in folders]
        budget = budget_label(args)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    note = peak_note(runs, peak_source)
    if budget:
        note = (f"Budget: {budget}. Train FLOPs: the matmuls of training (forward and backward), FLOPs per token x "
                f"tokens seen.\n\n{note}")
    (args.output_dir / "comparison.md").write_text(f"{table}\n\n{note}\n", encoding="utf-8")
    plot_loss_curves(runs, args.output_dir / "loss_curves.png", budget)
    print(table)
    print(note)
    logger.info("Wrote %s and %s", args.output_dir / "comparison.md", args.output_dir / "loss_curves.png")
    return os.fspath(args.output_dir)


if __name__ == "__main__":
    main()
