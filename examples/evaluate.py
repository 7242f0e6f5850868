"""Evaluate a saved model folder with lm-evaluation-harness and write the results as JSON.

    python examples/evaluate.py runs/demo --tasks archlm_examples
    python examples/evaluate.py runs/demo --tasks archlm_python_perplexity,hellaswag --batch_size 8 --limit 100
    python examples/evaluate.py runs/demo --tasks my_task --include_path my_tasks/ --output results/demo.json

The model runs through lm-evaluation-harness's own `hf` model (`lm_eval.simple_evaluate(model="hf", ...)` with
`trust_remote_code=True`), so the numbers are those `lm_eval --model hf` gives. `--tasks` takes task, group or tag
names, comma-separated: the example tasks in examples/lm_eval_tasks/ (their data ships beside them and loads
offline; the tag `archlm_examples` runs both), tasks in `--include_path` folders, YAML task files, and every task
registered with lm-evaluation-harness (those download their data from the Hub the first time). The example tasks:

- `archlm_python_perplexity`: word and byte perplexity and bits per byte of eight held-out Python snippets;
- `archlm_python_next_line`: which of four continuations completes a line of Python (acc, acc_norm), 16 questions.

The results (lm-evaluation-harness's results dictionary, as `lm_eval --output_path` writes it, less the per-sample
logs) go to MODEL_DIR/eval_results.json unless `--output` says otherwise, and a table goes to stdout.
`hub_upload.py` puts a folder's eval_results.json into the model card's metadata (`model-index`).
"""

import argparse
import difflib
import json
import logging
from pathlib import Path

import torch

from archlm.check import model_folder_problem

logger = logging.getLogger("evaluate")

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
RESULTS_FILE = "eval_results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a saved ArchLM folder (weights, config, "
                        "tokenizer), as examples/train.py writes it")
    parser.add_argument("--tasks", required=True, nargs="+",
                        help="task, group or tag names or YAML task files, comma- or space-separated")
    parser.add_argument("--batch_size", type=int, default=1, help="requests per forward pass (default 1)")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=float, default=None,
                        help="at most this many examples per task (a fraction when below 1); for quick checks")
    parser.add_argument("--include_path", type=Path, nargs="*", default=[], metavar="DIR",
                        help="more folders of YAML task files (examples/lm_eval_tasks is always included)")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default: MODEL_DIR/{RESULTS_FILE})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (default: as saved)")
    return parser.parse_args(argv)


def check_model_dir(model_dir: Path) -> None:
    """Refuses, naming the folder, what is not a saved ArchLM model with its tokenizer."""
    problem = model_folder_problem(model_dir, "evaluate other models with "
                                              f"`lm_eval --model hf --model_args pretrained={model_dir}`")
    if problem:
        raise SystemExit(f"evaluate.py: {problem}")


def task_names(values: list[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def task_manager_for(tasks: list[str], include_paths: list[Path]):
    """A TaskManager that knows every task asked for. The local folders are indexed first (instant); lm-evaluation-
    harness's registered tasks (thousands of YAML files, half a minute) only when a name is not found there."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not path.is_dir():
            raise SystemExit(f"evaluate.py: --include_path '{path}' is not a folder")
    paths = [LOCAL_TASKS, *include_paths]

    def unknown(manager) -> list[str]:
        return [name for name in tasks if name not in manager.all_tasks and not name.endswith((".yaml", ".yml"))]

    manager = TaskManager(include_path=paths, include_defaults=False)
    if unknown(manager):
        logger.info("Indexing lm-evaluation-harness's registered tasks for %s", unknown(manager))
        manager = TaskManager(include_path=paths)
    missing = unknown(manager)
    files = [name for name in tasks if name.endswith((".yaml", ".yml")) and not Path(name).is_file()]
    if missing or files:
        lines = [f"  '{name}' (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(
            name, manager.all_tasks, n=3)) else f"  '{name}'" for name in missing]
        lines += [f"  '{name}' (no such YAML file)" for name in files]
        raise SystemExit("evaluate.py: unknown task(s):\n" + "\n".join(lines) + "\nTasks are lm-evaluation-harness's "
                         "registered names (`lm_eval ls tasks`), those in examples/lm_eval_tasks/ and --include_path "
                         "folders, or YAML task files.")
    return manager


def evaluate(args: argparse.Namespace) -> dict:
    """Runs lm-evaluation-harness on the folder; returns its results dictionary (without per-sample logs)."""
    import lm_eval

    tasks = task_names(args.tasks)
    task_manager = task_manager_for(tasks, args.include_path)
    logger.info("Evaluating %s on %s (batch size %d, %s)", args.model_dir, ", ".join(tasks), args.batch_size,
                args.device)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(args.model_dir), "trust_remote_code": True, "dtype": args.dtype},
        tasks=tasks,
        task_manager=task_manager,
        batch_size=args.batch_size,
        device=args.device,
        num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        log_samples=False,
    )
    results.pop("samples", None)
    return results


def write_results(results: dict, path: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")


def results_table(results: dict) -> str:
    """One row per task and metric. (lm_eval.utils.make_table needs a pytablewriter release newer than the pins
    allow: with 0.38 it prints letters for the headers.)"""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}", "N/A")
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            rows.append((task, label, f"{value:.4f}" if isinstance(value, float) else str(value),
                         f"{stderr:.4f}" if isinstance(stderr, float) else str(stderr)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_model_dir(args.model_dir)
    if args.batch_size < 1:
        raise SystemExit(f"evaluate.py: --batch_size must be at least 1, got {args.batch_size}")
    results = evaluate(args)
    output = args.output or args.model_dir / RESULTS_FILE
    write_results(results, output)

    print(results_table(results))
    logger.info("Wrote %s", output)
    return results


if __name__ == "__main__":
    main()
