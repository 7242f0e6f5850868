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
