"""Loss curves as PNG, from `training_log.json` documents: one run's (train.py writes `loss_curve.png` next to its
log) or several runs' on one axis (examples/compare_architectures.py's `loss_curves.png`).

A run's curve is drawn from what its log holds: each logged training loss (the mean over the steps since the previous
log) as a line, each evaluation as a dot, and, for one run, its learning rate below it (a warmup, a cosine or a
warmup-stable-decay schedule is what people check first when a curve bends). The image is written to a temporary
file and renamed, so a reader never finds half of one.
"""

import os
from pathlib import Path

LOSS_CURVE_NAME = "loss_curve.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed (or may be present)
    import matplotlib.pyplot as plt

    return plt


def _draw_run(axes, log: dict, label: str | None):
    """Training loss (line) and eval loss (dots, same colour) of one training_log.json document on `axes`."""
    steps = [entry for entry in log.get("steps") or [] if entry.get("loss") is not None]
    evals = [entry for entry in log.get("evals") or [] if entry.get("eval_loss") is not None]
    (line,) = axes.plot([entry["step"] for entry in steps], [entry["loss"] for entry in steps], label=label,
                        linewidth=1.2, marker="o" if len(steps) == 1 else None)  # (one point draws no line)
    if evals:
        axes.plot([entry["step"] for entry in evals], [entry["eval_loss"] for entry in evals], "o--",
                  color=line.get_color(), markersize=4, linewidth=0.8,
                  label=None if label else "eval")
    if not label and steps:
        line.set_label("train")


def _save(figure, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.tight_layout()
    try:
        figure.savefig(temporary, dpi=120)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path


def plot_training_log(log: dict, path: str | os.PathLike) -> Path:
    """One run: its loss curves (train and eval) and, below, its learning rate, against the step."""
    plt = _pyplot()
    figure, (loss_axes, lr_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    _draw_run(loss_axes, log, None)
    status = log.get("status")
    title = log.get("architecture_name") or "ArchLM"
    if status and status != "finished":
        title += f" ({status} at step {max([0] + [entry['step'] for entry in log.get('steps') or []])})"
    loss_axes.set_title(title)
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(fontsize=8)
    rates = [entry for entry in log.get("steps") or [] if entry.get("learning_rate") is not None]
    lr_axes.plot([entry["step"] for entry in rates], [entry["learning_rate"] for entry in rates], color="gray",
                 linewidth=1.0)
    lr_axes.set_xlabel("step")
    lr_axes.set_ylabel("learning rate")
    lr_axes.grid(alpha=0.3)
    return _save(figure, plt, path)


def plot_runs(runs: list[tuple[str, dict]], path: str | os.PathLike, title: str) -> Path:
    """Several runs, (label, training_log.json document) each, on one axis: lines train, dots eval."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, log in runs:
        _draw_run(axes, log, label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (lines: train, dots: eval)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _save(figure, plt, path)
