"""examples/evaluate.py: lm-evaluation-harness on the example tasks of examples/lm_eval_tasks/ (offline, data shipped),
on a tiny trained model; batch sizes agree; the results become the model card's model-index in hub_upload.py.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_evaluate.py -q
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script, save_tiny_trained_model
from huggingface_hub import ModelCard

from archlm import ArchLMConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "evaluate.py"
sys.path.insert(0, str(REPO_ROOT))  # hub_upload.py is a top-level script
import hub_upload  # noqa: E402

EXAMPLE_TASKS = {"archlm_python_perplexity": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
                 "archlm_python_next_line": {"acc", "acc_norm"}}


def metric_values(results: dict) -> dict[tuple[str, str], float]:
    """(task, metric) -> value for every number lm-evaluation-harness reports (stderrs excepted)."""
    return {(task, key.split(",")[0]): value for task, metrics in results["results"].items()
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evaluate") / "model"
    save_tiny_trained_model(folder)
    return folder


@pytest.fixture(scope="module")
def evaluations(model_dir, tmp_path_factory):
    """The example tasks at batch size 1 from the command line (results into the model folder), then at batch
    size 4 in-process into --output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path_factory.mktemp("modules")))
    command = [sys.executable, str(SCRIPT), str(model_dir), "--tasks", "archlm_examples", "--batch_size", "1"]
    result = subprocess.run(command, cwd=model_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    batch_1 = json.loads((model_dir / "eval_results.json").read_text(encoding="utf-8"))
    output = tmp_path_factory.mktemp("batch-4") / "results.json"
    load_script(SCRIPT, "evaluate_example").main(
        [str(model_dir), "--tasks", "archlm_python_perplexity,archlm_python_next_line", "--batch_size", "4",
         "--output", str(output)])
    batch_4 = json.loads(output.read_text(encoding="utf-8"))
    return batch_1, batch_4, result.stdout


def test_example_tasks_run_offline_and_write_results_into_the_model_folder(evaluations):
    batch_1, _, stdout = evaluations
    values = metric_values(batch_1)
    assert {(task, metric) for task, metrics in EXAMPLE_TASKS.items() for metric in metrics} == set(values)
    assert batch_1["n-samples"]["archlm_python_perplexity"]["effective"] == 8
    assert batch_1["n-samples"]["archlm_python_next_line"]["effective"] == 16
    assert 0.0 <= values["archlm_python_next_line", "acc"] <= 1.0
    # trained on Python source: far better than uniform over the ~300 tokens (8+ bits per byte)
    assert 0.0 < values["archlm_python_perplexity", "bits_per_byte"] < 6.0
    assert "archlm_python_perplexity  bits_per_byte" in stdout  # the table on stdout


def test_batch_sizes_1_and_4_give_the_same_numbers(evaluations):
    batch_1, batch_4, _ = evaluations
    assert batch_1["config"]["batch_size"] == 1 and batch_4["config"]["batch_size"] == 4
    one, four = metric_values(batch_1), metric_values(batch_4)
    print("\nbatch 1 vs batch 4:\n" + "\n".join(f"  {task} {metric}: {one[task, metric]!r} vs {four[task, metric]!r}"
                                               for task, metric in sorted(one)))
    assert set(one) == set(four)
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_results_become_the_model_index_of_the_card(evaluations, model_dir, tmp_path):
    """What examples/evaluate.py wrote, read as hub_upload.py reads a folder's eval_results.json."""
    evaluation = hub_upload.read_eval_results(model_dir / hub_upload.EVAL_RESULTS, required=True)
    card = hub_upload.build_model_card(ArchLMConfig.from_pretrained(model_dir), "someone/tiny", log=None,
                                       figures_png=[], license_id="mit", datasets=[], evaluation=evaluation)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    [model_index] = loaded.data.to_dict()["model-index"]
    assert model_index["name"] == "tiny"
    by_task = {entry["dataset"]["name"]: entry for entry in model_index["results"]}
    assert set(by_task) == set(EXAMPLE_TASKS)
    values = metric_values(evaluations[0])
    for task, entry in by_task.items():
        assert entry["task"] == {"type": "text-generation", "name": "Text Generation"}
        assert entry["dataset"] == {"name": task, "type": task, "split": "test", "args": {"num_few_shot": 0}}
        assert entry["source"] == {"name": "lm-evaluation-harness",
                                   "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
        assert {metric["type"] for metric in entry["metrics"]} == EXAMPLE_TASKS[task]
        for metric in entry["metrics"]:
            assert metric["name"] == metric["type"]
            assert metric["value"] == pytest.approx(values[task, metric["type"]], abs=1e-4, rel=1e-6)


def test_a_missing_folder_or_a_model_that_is_not_archlm_is_refused_naming_it(tmp_path):
    evaluate = load_script(SCRIPT, "evaluate_refusals")
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=f"model folder '{missing}' does not exist"):
        evaluate.main([str(missing), "--tasks", "archlm_examples"])
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit, match=f"'{llama}' holds a 'llama' model, not an ArchLM one"):
        evaluate.main([str(llama), "--tasks", "archlm_examples"])
    with pytest.raises(SystemExit, match=f"'{tmp_path}' has no config.json"):
        evaluate.main([str(tmp_path), "--tasks", "archlm_examples"])


@pytest.mark.slow  # indexing every task lm-evaluation-harness registers takes ~30 s on 2 busy cores
def test_an_unknown_task_is_refused_naming_it_and_the_close_matches(model_dir):
    evaluate = load_script(SCRIPT, "evaluate_unknown_task")
    with pytest.raises(SystemExit) as refusal:
        evaluate.main([str(model_dir), "--tasks", "archlm_python_perplexity,archlm_python_perplexty"])
    message = str(refusal.value)
    assert "unknown task(s):\n  'archlm_python_perplexty' (did you mean archlm_python_perplexity" in message
    assert "'archlm_python_perplexity'" not in message  # the known one is not listed
