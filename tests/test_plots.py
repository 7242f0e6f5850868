"""archlm/plots.py: the loss-curve figures train.py and compare_architectures.py write."""

import numpy as np
import pytest
from matplotlib.image import imread

from archlm.plots import plot_runs, plot_training_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_of(losses: list[float], evals: dict[int, float], status: str = "finished") -> dict:
    steps = [{"step": step, "loss": loss, "learning_rate": 1e-3 * min(1.0, step / 3)}
             for step, loss in enumerate(losses, start=1)]
    return {"architecture_name": "2L-2H-32D-RoPE-RMS-SwiGLU-PreNorm", "status": status, "steps": steps,
            "evals": [{"step": step, "eval_loss": loss} for step, loss in evals.items()]}


def drawn_pixels(path) -> int:
    """Pixels that are not the background: lines and text."""
    image = imread(path)[..., :3]
    return int((np.abs(image - image[0, 0]).sum(axis=-1) > 0.1).sum())


def pixels_of(path, colour) -> int:
    return int((np.abs(imread(path)[..., :3] - np.array(colour)).sum(axis=-1) < 0.05).sum())


def test_one_run_draws_its_losses_and_learning_rate_atomically(tmp_path):
    empty = plot_training_log(log_of([], {}), tmp_path / "empty.png")
    path = plot_training_log(log_of([5.0, 4.0, 3.5, 3.0, 2.9, 2.7], {3: 3.6, 6: 2.95}), tmp_path / "loss_curve.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert drawn_pixels(path) > drawn_pixels(empty) + 500  # the curves, beyond the axes and labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "loss_curve.png"]  # no temporary file left


def test_a_run_that_stopped_or_logged_nothing_is_still_drawn(tmp_path):
    # a diverged run's last loss is null in the log (JSON has no NaN): the curve stops before it
    stopped = log_of([5.0, 4.5], {}, status="stopped")
    stopped["steps"].append({"step": 3, "loss": None, "learning_rate": 1e-3})
    assert plot_training_log(stopped, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_training_log({"steps": [], "evals": []}, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_several_runs_share_one_axis(tmp_path):
    runs = [("llama", log_of([5.0, 4.0, 3.0], {3: 3.2})), ("gpt2", log_of([5.5, 4.8, 4.1], {3: 4.3}))]
    one = plot_runs(runs[:1], tmp_path / "one.png", "one run")
    two = plot_runs(runs, tmp_path / "two.png", "two runs")
    assert two.read_bytes()[:8] == PNG_MAGIC
    second_colour = (1.0, 0x7F / 255, 0x0E / 255)  # matplotlib's second line colour: the second run's curve
    assert pixels_of(one, second_colour) == 0 and pixels_of(two, second_colour) > 100


def test_a_figure_that_cannot_be_written_raises_and_leaves_nothing(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(OSError):
        plot_training_log(log_of([1.0], {}), tmp_path / "taken" / "loss_curve.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
