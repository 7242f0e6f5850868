"""The README's first Python example runs as written and prints the architecture name its comment shows."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs_and_names_the_architecture(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = blocks[0]
    expected_name = re.search(r"print\(config.architecture_name\)\s+# (\S+)", example).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == expected_name
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
    assert (tmp_path / "my-model" / "modeling_archlm.py").is_file()


def test_make_demo_flags_pass_the_training_checks():
    """`make demo`'s command line parses and passes every check made before data is read (a renamed or refused
    flag would otherwise surface only when a new user types it)."""
    import shlex

    import archlm.train
    from archlm.training import check_arguments

    makefile = (README.parent / "Makefile").read_text()
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE).group(1)
    command = shlex.split(recipe.replace("\\\n", " ").replace("$(DEMO_ARGS)", "").replace("$(PY)", "python"))
    assert command[:2] == ["python", "examples/train.py"]
    model_args, data_args, run_args, training_args = archlm.train.parse_args(command[2:])
    check_arguments(model_args, run_args, training_args, data_args.streaming)
    assert run_args.recipe == "speedrun" and run_args.max_train_seconds and not training_args.disable_tqdm
