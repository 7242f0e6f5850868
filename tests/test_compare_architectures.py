"""examples/compare_architectures.py: the ranked table and plot, the checks made before any run starts, one
peak TFLOP/s for every run's MFU, and the budgets (equal steps, equal FLOPs).

The table is proven on run folders written here (training logs as train.py writes them); the refusals on real
invocations that must stop before training anything; one slow test trains two tiny presets for real, then
checks that a second comparison refuses their folders unless --overwrite; another trains two presets of different
FLOPs per token on one FLOPs budget and checks that each took the steps the formula gives with its real FLOPs per
token; a third gives two presets one wall-clock budget (train.py's --max_train_seconds).

    .venv/bin/python -m pytest tests/test_compare_architectures.py -q
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from archlm import ArchLMConfig
from archlm.training import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
COMPARE_SCRIPT = REPO / "examples" / "compare_architectures.py"
# Flags for train.py after `--`: a tiny model on a slice of the standard library (as tests/train_helpers.py's TINY,
# without --seed, which the comparison sets for every run itself).
TINY_TRAIN_FLAGS = [
    "--max_corpus_mb", "0.15", "--tokenizer_vocab_size", "300", "--block_size", "32",
    "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
    "--disable_tqdm", "true", "--sample_prompt", "", "--report_to", "none",
    "--config_overrides", "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,num_key_value_heads=2",
]
TINY_MODEL = TINY_TRAIN_FLAGS[-1]


compare = load_script(COMPARE_SCRIPT, "archlm_compare_script")


def fake_run(folder: Path, name: str, eval_loss: float | None, peak_tflops: float | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"eval_loss": eval_loss, "tokens_per_second": 1234.5, "mfu": 0.125, "peak_memory_mb": 512.3,
               "global_step": 10, "tokens_seen": 10 * 128}
    write_json_atomically(folder / "training_log.json", {
        "architecture_name": name, "parameters": 1_000_000, "flops_per_token": 1.5e6, "summary": summary,
        **({"peak_tflops": peak_tflops} if peak_tflops is not None else {}),
        "steps": [{"step": step, "loss": 5.0 - step / 10} for step in range(1, 11)],
        "evals": [{"step": 10, "eval_loss": eval_loss}] if eval_loss is not None else [],
    })
    return folder


def test_compare_ranks_runs_by_eval_loss_and_plots_their_curves(tmp_path):
    runs = [fake_run(tmp_path / "gpt2", "A-arch", 3.5), fake_run(tmp_path / "llama", "B-arch", 3.0),
            fake_run(tmp_path / "broken", "C-arch", None)]
    output = Path(compare.main([*map(str, runs), "--output_dir", str(tmp_path / "compare")]))
    table = (output / "comparison.md").read_text().splitlines()
    assert table[0] == ("| rank | run | architecture | parameters | steps | train FLOPs | tokens/s | MFU | peak MiB | "
                        "eval loss | perplexity |")
    # train FLOPs: 1.5e6 FLOPs/token x 1,280 tokens seen
    assert table[2].startswith("| 1 | llama | B-arch | 1,000,000 | 10 | 1.92 GFLOP | 1,234 | 12.5% | 512 | 3.0000 | 20.09 |")
    assert "Budget:" not in "\n".join(table)  # run folders given: this comparison set no budget
    assert table[3].startswith("| 2 | gpt2 | A-arch") and table[4].startswith("| 3 | broken | C-arch") and table[4].endswith("| - | - |")
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--output_dir", str(tmp_path / "compare")])  # not a run folder


# id -> (arguments, what the error must say). Each would have failed only after training a preset, or trained
# into the wrong folder, or quietly overridden the comparison's own per-run flags.
REFUSED_UP_FRONT = {
    "unknown-preset-after-a-valid-one": (
        ["--presets", "llama,lama"], f"unknown preset(s) 'lama'; valid presets: {', '.join(ArchLMConfig.presets())}"),
    "preset-twice": (["--presets", "llama,gpt2,llama"], "names llama more than once"),
    "no-steps": (["--presets", "llama", "--max_steps", "0"], "--max_steps must be a positive number of steps"),
    "output-dir-after-separator": (["--presets", "gpt2,llama", "--", "--output_dir", "{tmp}/X"], "--output_dir: each run goes to"),
    "output-dir-abbreviated-with-dashes": (["--presets", "gpt2,llama", "--", "--output-d={tmp}/X"], "override what this script sets for each run: --output_dir"),
    "preset-after-separator": (["--presets", "gpt2", "--", "--preset=llama"], "--preset: each run's preset comes from --presets"),
    "overwrite-output-dir-after-separator": (["--presets", "gpt2", "--", "--overwrite_output_dir"], "pass --overwrite before `--`"),
    "max-steps-after-separator": (["--presets", "gpt2", "--", "--max_steps", "5"],
                                  "--max_steps: pass --max_steps, --budget_flops or --budget_seconds before `--`"),
    "max-train-seconds-after-separator": (["--presets", "gpt2", "--budget_flops", "1e12", "--", "--max-train-sec", "9"],
                                          "--max_train_seconds: pass --budget_seconds before `--`"),
    "two-budgets": (["--presets", "gpt2", "--max_steps", "3", "--budget_flops", "1e12"],
                    "give one budget, --max_steps (equal steps), --budget_flops (equal FLOPs) or --budget_seconds "
                    "(equal wall-clock), not --max_steps and --budget_flops."),
    "three-budgets": (["--presets", "gpt2", "--budget_seconds", "60", "--max_steps", "3", "--budget_flops", "1e12"],
                      "not --max_steps and --budget_flops and --budget_seconds."),
    "no-flops": (["--presets", "llama", "--budget_flops", "0"], "--budget_flops must be a positive number of FLOPs"),
    "infinite-flops": (["--presets", "llama", "--budget_flops", "inf"], "--budget_flops must be a positive number of FLOPs (every run's budget), got inf."),
    "seconds-with-logging-at-a-fraction-of-unplanned-steps": (
        ["--presets", "gpt2", "--budget_seconds", "60", "--", "--logging_steps", "0.5"],
        "the train.py flags after `--`: --logging_steps 0.5 is a fraction of the run's steps"),
    "no-seconds": (["--presets", "llama", "--budget_seconds", "-5"], "--budget_seconds must be a positive number of seconds"),
    "budget-without-presets": (["{tmp}", "--budget_flops", "1e12"], "--budget_flops set(s) the budget of the runs of --presets"),
    # FLOPs per step at 4 x 32 tokens: gpt2 2.8e7, qwen3 5.8e7 (vocab_size given: no tokenizer is trained to know it)
    "flops-that-buy-no-step": (["--presets", "gpt2,qwen3", "--budget_flops", "4e7", "--", "--block_size", "32",
                                "--per_device_train_batch_size", "4", "--config_overrides", "vocab_size=300," + TINY_MODEL],
                               "--budget_flops 4e+07 buys these presets no training step:\n  qwen3: one step costs 5.79e+07 "
                               "FLOPs (452,352 FLOPs/token x 128 tokens per step)\nGive a larger --budget_flops"),
    "flops-with-a-block-size-a-preset-cannot-take": (
        ["--presets", "llama,gpt2", "--budget_flops", "1e12", "--", "--block_size", "2048", "--config_overrides", "vocab_size=300"],
        "preset 'gpt2': --block_size 2048 is larger than the model can take (max_position_embeddings=1024)"),
    "seeds-after-separator": (["--presets", "gpt2", "--", "--seed", "1", "--data_seed", "2"], "--seed, --data_seed\n"),
    "model-after-separator": (["--presets", "gpt2", "--", "--model_name_or_path", "{tmp}"], "would fine-tune that one model"),
    "misspelt-train-flag": (["--presets", "gpt2,llama", "--", "--max_stepz", "3"], "the train.py flags after `--`"),
    "bad-train-flag-value": (["--presets", "gpt2,llama", "--", "--peak_tflops", "0"], "--peak_tflops must be positive"),
    "run-folder-that-is-not-a-run": (["--presets", "gpt2", "{tmp}"], "holds no training_log.json"),
    "preset-overrides-for-a-preset-not-compared": (["--presets", "gpt2,llama", "--preset_overrides", "mixtral:num_experts=4"],
                                                   "'mixtral' is not one of --presets (gpt2, llama)"),
    "preset-overrides-without-a-preset": (["--presets", "llama", "--preset_overrides", "num_experts=4"],
                                          "is not 'PRESET:FIELD=VALUE,...'"),
    "preset-overrides-twice-for-a-preset": (["--presets", "mixtral", "--preset_overrides", "mixtral:num_experts=4",
                                             "--preset_overrides", "mixtral:num_experts_per_tok=1"], "names 'mixtral' twice"),
    "preset-overrides-misspelt-field": (["--presets", "llama", "--preset_overrides", "llama:num_expert=4"],
                                        "'num_expert' is not an ArchLMConfig field. Did you mean num_experts"),
    # the preset's config with the shared and its own overrides is built before any run
    "preset-overrides-that-make-a-bad-config": (["--presets", "llama,mixtral", "--preset_overrides",
                                                 "mixtral:num_experts_per_tok=9"], "`num_experts_per_tok` (9) must be at most"),
    "preset-overrides-without-presets": (["{tmp}", "--preset_overrides", "llama:num_experts=4"], "it needs --presets"),
    # so is every preset's config with the shared overrides alone (was: found when that preset's run started)
    "shared-overrides-misspelt-field": (["--presets", "gpt2,llama", "--", "--config_overrides", "hiden_size=64"],
                                        "'hiden_size' is not an ArchLMConfig field"),
    "shared-overrides-bad-for-one-preset": (["--presets", "llama,mixtral", "--", "--config_overrides",
                                             "num_experts_per_tok=9"], "mixtral: --config_overrides: "),
    # its own overrides count in its FLOPs: 64 experts of width 4,096, top-8, cost mixtral alone its step
    "flops-with-preset-overrides-that-buy-no-step": (
        ["--presets", "llama,mixtral", "--budget_flops", "1e9", "--preset_overrides",
         "mixtral:num_experts=64,num_experts_per_tok=8,moe_intermediate_size=4096", "--", "--block_size", "32",
         "--per_device_train_batch_size", "4", "--config_overrides", "vocab_size=300," + TINY_MODEL],
        "buys these presets no training step:\n  mixtral: one step costs"),
}


@pytest.mark.parametrize("case", list(REFUSED_UP_FRONT))
def test_bad_arguments_are_refused_before_any_run_starts(case, tmp_path, capsys):
    arguments, message = REFUSED_UP_FRONT[case]  # {tmp}: so that a regression writes nothing outside tmp_path
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    separator = arguments.index("--") if "--" in arguments else len(arguments)
    arguments[separator:separator] = ["--output_dir", str(tmp_path / "compare")]

    with pytest.raises(SystemExit) as exit_info:
        compare.main(arguments)

    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert message in captured.err + str(exit_info.value.code), captured.err
    assert not (tmp_path / "compare").exists()  # nothing trained, nothing written


def test_existing_run_folders_are_refused_before_any_run_starts(tmp_path, capsys):
    output = tmp_path / "compare"
    (output / "gpt2" / "checkpoint-3").mkdir(parents=True)  # an earlier run, with a checkpoint
    (output / "gpt2" / "training_log.json").write_text("{}")
    (output / "mistral").mkdir()  # an empty folder holds no run: fine
    fake_run(output / "llama", "earlier-llama", 2.0)
    arguments = ["--presets", "gpt2,llama,mistral", "--output_dir", str(output), "--", *TINY_TRAIN_FLAGS, "--peak_tflops", "0.05"]
    with pytest.raises(SystemExit):
        compare.main(arguments)
    error = capsys.readouterr().err
    assert f"not empty (an earlier run?): {output / 'gpt2'}, {output / 'llama'}." in error and "--overwrite" in error
    assert (output / "gpt2" / "checkpoint-3").is_dir() and not (output / "comparison.md").exists()


def test_runs_measured_against_different_peaks_are_flagged_as_not_comparable(tmp_path):
    """Each run measuring its own peak made MFU incomparable (0.095-0.317 TFLOP/s under contention)."""
    runs = [fake_run(tmp_path / "a", "A-arch", 3.0, 0.095), fake_run(tmp_path / "b", "B-arch", 3.1, 0.317)]
    output = Path(compare.main([*map(str, runs), "--output_dir", str(tmp_path / "separate")]))
    assert "MFU is not comparable across these runs: each was measured against its own peak TFLOP/s (a 0.095, b 0.317)" in (
        output / "comparison.md").read_text()


@pytest.mark.slow
def test_compare_trains_presets_on_the_same_data_seed_budget_and_peak(tmp_path):
    command = [sys.executable, str(COMPARE_SCRIPT), "--presets", "gpt2,llama", "--max_steps", "3", "--seed", "0",
               "--output_dir", str(tmp_path), "--", *TINY_TRAIN_FLAGS]
    # One thread: on a shared 2-core machine, two OpenMP threads per process are several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [json.loads((tmp_path / preset / "training_log.json").read_text()) for preset in ("gpt2", "llama")]
    assert [log["summary"]["global_step"] for log in logs] == [3, 3]
    assert logs[0]["config"]["vocab_size"] == logs[1]["config"]["vocab_size"] and "gpt2" in logs[1]["tokenizer"]
    assert logs[0]["steps"][0]["num_input_tokens_seen"] == logs[1]["steps"][0]["num_input_tokens_seen"]
    assert logs[0]["peak_tflops"] == logs[1]["peak_tflops"] > 0  # measured once, by the comparison
    table = (tmp_path / "comparison.md").read_text()
    assert "LN-GELU" in table and "RMS-SwiGLU" in table and (tmp_path / "loss_curves.png").is_file()
    assert f"every run against the same peak, {logs[0]['peak_tflops']:.4g} TFLOP/s (measured once" in table

    # the same comparison again: the earlier runs are refused before anything trains ...
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "not empty (an earlier run?)" in again.stderr and "--overwrite" in again.stderr
    assert json.loads((tmp_path / "llama" / "training_log.json").read_text()) == logs[1]
    # ... and replaced with --overwrite; a peak given after `--` is every run's, and nothing is measured
    replaced = subprocess.run([*command[:2], "--overwrite", *command[2:], "--peak_tflops", "0.05"], env=env,
                              capture_output=True, text=True, timeout=600)
    assert replaced.returncode == 0, replaced.stdout[-3000:] + replaced.stderr[-3000:]
    logs = [json.loads((tmp_path / preset / "training_log.json").read_text()) for preset in ("gpt2", "llama")]
    assert [log["peak_tflops"] for log in logs] == [0.05, 0.05]
    assert "every run against the same peak, 0.05 TFLOP/s (given with --peak_tflops)." in (tmp_path / "comparison.md").read_text()


def test_preset_overrides_merge_over_the_shared_ones_in_the_last_config_overrides():
    """train.py's parser keeps the last --config_overrides: a preset's run gets one merged list at the end, its own
    fields winning; a preset without overrides keeps the flags as given."""
    from archlm.train import parse_args as parse_train_args

    shared = "num_hidden_layers=2,hidden_size=32,mlp_only_layers=[0]"
    flags = ["--config_overrides", shared, "--block_size", "32"]
    assert compare.with_overrides(flags, shared, {}) is flags
    merged = compare.with_overrides(flags, shared, {"hidden_size": 64, "router_scoring": "sigmoid", "num_experts": 4})
    model_args = parse_train_args(["--preset", "dots1", "--output_dir", "x", *merged])[0]
    from archlm.configuration_archlm import parse_config_overrides

    assert parse_config_overrides(model_args.config_overrides) == {
        "num_hidden_layers": 2, "hidden_size": 64, "mlp_only_layers": [0], "router_scoring": "sigmoid", "num_experts": 4}


@pytest.mark.slow
def test_preset_overrides_train_each_preset_with_its_own_fields_on_the_shared_ones(tmp_path):
    """A dense model and a mixture of the same active width: the mixture's expert fields go to its run only."""
    command = [sys.executable, str(COMPARE_SCRIPT), "--presets", "llama,mixtral", "--max_steps", "2", "--seed", "0",
               "--preset_overrides", "mixtral:num_experts=4,moe_intermediate_size=16", "--output_dir", str(tmp_path),
               "--", *TINY_TRAIN_FLAGS, "--peak_tflops", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dense, mixture = (json.loads((tmp_path / preset / "training_log.json").read_text())["config"]
                      for preset in ("llama", "mixtral"))
    assert (mixture["num_experts"], mixture["moe_intermediate_size"], mixture["hidden_size"]) == (4, 16, 32)
    assert dense["num_experts"] is None and dense["hidden_size"] == 32 and dense["vocab_size"] == mixture["vocab_size"]
    assert "MoE4x2" in (tmp_path / "comparison.md").read_text()


def test_steps_within_a_flops_budget_follow_the_block_size_schedule():
    """A --block_size_schedule: steps of short blocks cost less (attention reaches less), so the budget buys more."""
    stages = [(0, 10.0), (3, 20.0)]  # steps 0-2 cost 10 FLOPs each, then 20
    assert compare.steps_within(25, stages) == 2 and compare.steps_within(30, stages) == 3
    assert compare.steps_within(75, stages) == 5 and compare.flops_of_steps(5, stages) == 70
    assert compare.steps_within(9, [(0, 10.0)]) == 0 and compare.steps_within(1e9, [(0, 10.0)]) == 10 ** 8


@pytest.mark.slow
def test_equal_flops_gives_the_costlier_model_fewer_steps(tmp_path):
    """gpt2 and qwen3 (head_dim 128: about twice the FLOPs per token at these sizes) on one FLOPs budget: each run's
    steps are floor(F / (its FLOPs per token x tokens per step)), with the FLOPs per token its training log records."""
    budget = 1.8e8  # about 6 steps of the tiny gpt2, 3 of qwen3, at 4 x 32 tokens a step
    command = [sys.executable, str(COMPARE_SCRIPT), "--presets", "gpt2,qwen3", "--budget_flops", str(budget),
               "--output_dir", str(tmp_path), "--", *TINY_TRAIN_FLAGS, "--peak_tflops", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    logs = {preset: json.loads((tmp_path / preset / "training_log.json").read_text()) for preset in ("gpt2", "qwen3")}
    tokens_per_step = 4 * 1 * 1 * 32  # batch x accumulation x processes x block size
    expected = {preset: math.floor(budget / (log["flops_per_token"] * tokens_per_step)) for preset, log in logs.items()}
    assert logs["qwen3"]["flops_per_token"] > logs["gpt2"]["flops_per_token"]
    assert 0 < expected["qwen3"] < expected["gpt2"]
    assert {preset: log["summary"]["global_step"] for preset, log in logs.items()} == expected
    # the tokenizer was trained before the runs (its vocabulary counts in the FLOPs) and every run got it
    assert all(log["tokenizer"] == f"{tmp_path / 'tokenizer'} (--tokenizer_name)" for log in logs.values())
    assert logs["gpt2"]["config"]["vocab_size"] == logs["qwen3"]["config"]["vocab_size"]
    table = (tmp_path / "comparison.md").read_text()
    assert "Budget: equal FLOPs (1.8e+08 training FLOPs per run)." in table
    for preset, log in logs.items():
        spent = log["flops_per_token"] * log["summary"]["tokens_seen"]
        assert budget - log["flops_per_token"] * tokens_per_step < spent <= budget
        assert f"| {preset} | {log['architecture_name']} | {log['parameters']:,} | {expected[preset]} | {spent / 1e6:.3g} MFLOP |" in table


@pytest.mark.slow
def test_equal_wall_clock_gives_every_run_max_train_seconds(tmp_path):
    budget = 10  # seconds of training (evaluations included) per run; the process's start-up is not counted
    command = [sys.executable, str(COMPARE_SCRIPT), "--presets", "gpt2,llama", "--budget_seconds", str(budget),
               "--output_dir", str(tmp_path), "--", *TINY_TRAIN_FLAGS, "--logging_steps", "10", "--peak_tflops", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    logs = {preset: json.loads((tmp_path / preset / "training_log.json").read_text()) for preset in ("gpt2", "llama")}
    table = (tmp_path / "comparison.md").read_text()
    assert "Budget: equal wall-clock (10 s of training per run, evaluations included)." in table
    for preset, log in logs.items():
        steps = log["summary"]["global_step"]
        assert log["budget"]["max_train_seconds"] == budget and 0 < steps <= log["planned_steps"]
        assert f"| {preset} | {log['architecture_name']} | {log['parameters']:,} | {steps:,} |" in table


def test_a_mixture_of_experts_shows_its_active_parameters_beside_the_total():
    config = ArchLMConfig.from_preset("mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, vocab_size=128)
    run = {"folder": Path("moe"), "architecture_name": config.architecture_name, "config": config.to_dict(),
           "parameters": config.num_parameters_estimate(), "summary": {"eval_loss": 3.0}}
    active = config.num_parameters_estimate(active_only=True)
    assert f"{config.num_parameters_estimate():,} ({active:,} active)" in compare.comparison_table([run])
