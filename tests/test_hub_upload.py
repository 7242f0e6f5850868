"""hub_upload.py: folder checks, staging, the model card, and the upload at the HfApi boundary.

No Hub is reachable from the tests, so the upload goes to `RecordingHfApi`, an `HfApi` whose three network
methods record their arguments and a copy of the folder: the only stand-in of the suite. Everything else runs
for real, the separate-process load check included.

    .venv/bin/python -m pytest tests/test_hub_upload.py -q
"""

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import load_file, save_file

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.convert import TOKENIZER_PROBE
from archlm.tokenization_archlm import train_tokenizer
from conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # hub_upload.py is a top-level script
import hub_upload  # noqa: E402

SECRET = "hf_NeverPrintThisTokenAnywhere0123456789"  # what HF_TOKEN holds in these tests
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # a PNG's first bytes
TRAINING_LOG = {
    "architecture_name": "set by the fixture",
    "data": "default corpus: Python 3.12 standard library, 3 files, 0.1 MB",
    "parameters": 0,
    "steps": [{"step": 5, "loss": 5.5}, {"step": 10, "loss": 5.1}],
    "evals": [{"step": 10, "eval_loss": 4.5, "perplexity": 90.0171}],
    "summary": {"global_step": 10, "tokens_seen": 20480, "train_loss": 5.3, "final_loss": 5.1, "eval_loss": 4.5,
                "perplexity": 90.0171, "tokens_per_second": 1500.0, "mfu": None, "train_runtime_s": 12.5},
}
# What examples/evaluate.py writes (lm-evaluation-harness's results dictionary), trimmed: a registered task with a
# Hub dataset and few shots, one with two filters, a local one; stderrs and non-numbers are not metrics.
LM_EVAL_RESULTS = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.61234567, "acc_stderr,none": 0.01, "acc_norm,none": 0.58},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.02,
                  "exact_match,flexible-extract": 0.3},
        "archlm_python_perplexity": {"alias": "archlm_python_perplexity", "sample_len": 8,
                                     "bits_per_byte,none": 3.5323, "bits_per_byte_stderr,none": "N/A"},
    },
    "configs": {
        "arc_easy": {"task": "arc_easy", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
                     "test_split": "test"},
        "gsm8k": {"task": "gsm8k", "dataset_path": "openai/gsm8k", "dataset_name": "main", "test_split": "test"},
        "archlm_python_perplexity": {"task": "archlm_python_perplexity", "custom_dataset": "def python_snippets...",
                                     "test_split": "test"},
    },
    "n-shot": {"arc_easy": 25, "gsm8k": 5, "archlm_python_perplexity": 0},
    "versions": {"arc_easy": 1.0, "gsm8k": 3.0, "archlm_python_perplexity": 1.0},
}
LM_EVAL_SOURCE = {"name": "lm-evaluation-harness", "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
REMOTE_CODE_STAGED = {"README.md", "config.json", "model.safetensors", "configuration_archlm.py", "modeling_archlm.py",
                      "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                      "loss_curve.png"}
NATIVE_STAGED = REMOTE_CODE_STAGED - {"configuration_archlm.py", "modeling_archlm.py"}


class RecordingHfApi(HfApi):
    """`HfApi` at its network boundary: what would go to the Hub is recorded (the folder copied, as the staging
    folder is removed after an upload), and nothing else is overridden, so any other call would fail offline."""

    def __init__(self, snapshot_dir: Path):
        super().__init__()
        self.snapshot_dir = snapshot_dir
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        shutil.copytree(kwargs["folder_path"], self.snapshot_dir)
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")


@contextlib.contextmanager
def captured_output():
    """stdout, stderr and the INFO+ log records of a call, as one string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(name) for name in ("hub_upload", "archlm")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield stream
    finally:
        for log, level in zip(loggers, levels):
            log.removeHandler(handler)
            log.setLevel(level)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ------------------------------------------------------------------------------------------------
# A trained-looking model folder, staged once by the command line (dry run) and once uploaded (native)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([Path(hub_upload.__file__).read_text(encoding="utf-8")], vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """What examples/train.py leaves: weights, config, remote code, tokenizer, generation config, training log,
    a loss curve, the Trainer's training_args.bin and a checkpoint folder (neither of which is shared), and the
    eval_results.json of examples/evaluate.py."""
    folder = tmp_path_factory.mktemp("run") / "model"
    torch.manual_seed(0)
    model = ArchLMForCausalLM(tiny_config(vocab_size=300, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log = dict(TRAINING_LOG, architecture_name=model.config.architecture_name, parameters=model.num_parameters())
    (folder / "training_log.json").write_text(json.dumps(log))
    (folder / "loss_curve.png").write_bytes(TINY_PNG)
    (folder / "eval_results.json").write_text(json.dumps(LM_EVAL_RESULTS))
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickled arguments")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x04pickled optimizer")
    return folder


@pytest.fixture(scope="module")
def dry_run(model_dir, tmp_path_factory):
    """`python hub_upload.py MODEL_DIR ... --dry-run --stage-dir DIR`, run as a user would, token in the env."""
    stage_dir = tmp_path_factory.mktemp("dry-run") / "stage"
    env = {key: value for key, value in os.environ.items() if key != "HUGGING_FACE_HUB_TOKEN"}
    env["HF_TOKEN"] = SECRET
    result = subprocess.run(
        [sys.executable, "hub_upload.py", str(model_dir), "--repo-id", "someone/tiny-archlm", "--dry-run",
         "--stage-dir", str(stage_dir), "--license", "mit", "--datasets", "someone/stdlib-corpus"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(output=result.stdout + result.stderr, stdout=result.stdout, stage_dir=stage_dir)


@pytest.fixture(scope="module")
def native_upload(model_dir, tmp_path_factory):
    """`main([... --native --private --revision dev ...])` in-process, uploading through `RecordingHfApi`."""
    api = RecordingHfApi(tmp_path_factory.mktemp("hub") / "uploaded")
    argv = [str(model_dir), "--repo-id", "someone/tiny-archlm-llama", "--native", "--private", "--revision", "dev",
            "--commit-message", "First upload"]
    with pytest.MonkeyPatch.context() as patch, captured_output() as output:
        patch.setenv("HF_TOKEN", SECRET)
        exit_code = hub_upload.main(argv, api=api)
    assert exit_code == 0, output.getvalue()[-3000:]
    return SimpleNamespace(api=api, output=output.getvalue())


# ------------------------------------------------------------------------------------------------
# Staging and the card
# ------------------------------------------------------------------------------------------------
def test_dry_run_stages_the_shared_files_only_and_uploads_nothing(dry_run, model_dir):
    staged = files_under(dry_run.stage_dir)
    assert set(staged) == REMOTE_CODE_STAGED  # no training_args.bin, training_log.json or checkpoint folder
    assert staged["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert json.loads(staged["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_archlm.ArchLMForCausalLM"
    assert dry_run.stdout.strip().splitlines()[-1] == str(dry_run.stage_dir)  # the printed staging folder
    assert "Dry run: nothing uploaded" in dry_run.output


def test_the_token_never_appears_in_output_or_staged_files(dry_run, native_upload):
    assert SECRET not in dry_run.output
    assert SECRET not in native_upload.output
    for folder in (dry_run.stage_dir, native_upload.api.snapshot_dir):
        for name, content in files_under(folder).items():
            assert SECRET.encode() not in content, name


def test_card_parses_with_ModelCard_load_and_carries_the_metadata(dry_run, model_dir):
    card = ModelCard.load(dry_run.stage_dir / "README.md")
    architecture = json.loads((model_dir / "training_log.json").read_text())["architecture_name"]
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"archlm", architecture, "custom_code"} <= set(card.data.tags)
    assert card.data.license == "mit"
    assert card.data.datasets == ["someone/stdlib-corpus"]
    results = {result.metric_type: result.metric_value for result in card.data.eval_results
               if result.dataset_type == "someone/stdlib-corpus"}
    assert results == {"loss": 4.5, "perplexity": 90.0171}
    # body: architecture summary, training figures, the loss curve, usage with remote code
    assert ArchLMConfig.from_pretrained(model_dir).summary() in card.text
    assert "| tokens seen | 20,480 |" in card.text and "| validation perplexity | 90.02 |" in card.text
    assert "model FLOPs utilisation" not in card.text  # recorded as null: left out, not printed as None
    assert "![loss curve](loss_curve.png)" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-archlm", trust_remote_code=True)' in card.text


def test_lm_eval_results_become_model_index_entries_in_the_hubs_format(dry_run):
    """The folder's eval_results.json: one model-index result per task, each metric with its type, name and value."""
    [model_index] = ModelCard.load(dry_run.stage_dir / "README.md").data.to_dict()["model-index"]
    assert model_index["name"] == "tiny-archlm"
    by_dataset = {result["dataset"]["name"]: result for result in model_index["results"]}
    assert set(by_dataset) == {"arc_easy", "gsm8k", "archlm_python_perplexity", "someone/stdlib-corpus"}
    assert by_dataset["arc_easy"] == {
        "task": {"type": "text-generation", "name": "Text Generation"},
        "dataset": {"name": "arc_easy", "type": "allenai/ai2_arc", "config": "ARC-Easy", "split": "test",
                    "args": {"num_few_shot": 25}},
        "metrics": [{"type": "acc", "value": 0.6123, "name": "acc"},
                    {"type": "acc_norm", "value": 0.58, "name": "acc_norm"}],
        "source": LM_EVAL_SOURCE,
    }
    assert by_dataset["gsm8k"]["metrics"] == [
        {"type": "exact_match", "value": 0.25, "name": "exact_match (strict-match)"},
        {"type": "exact_match", "value": 0.3, "name": "exact_match (flexible-extract)"}]
    local = by_dataset["archlm_python_perplexity"]  # no Hub dataset: the task names it
    assert local["dataset"] == {"name": "archlm_python_perplexity", "type": "archlm_python_perplexity",
                                "split": "test", "args": {"num_few_shot": 0}}
    assert local["metrics"] == [{"type": "bits_per_byte", "value": 3.5323, "name": "bits_per_byte"}]


def test_eval_results_that_cannot_be_used_are_refused_when_asked_for_and_skipped_when_found(model_dir, tmp_path):
    missing = tmp_path / "missing.json"
    with captured_output() as output:
        exit_code = hub_upload.main([str(model_dir), "--repo-id", "someone/x", "--dry-run", "--stage-dir",
                                     str(tmp_path / "stage"), "--eval-results", str(missing)])
    assert exit_code == 1 and not (tmp_path / "stage").exists()
    assert f"--eval-results {missing} does not exist; nothing was staged or uploaded" in output.getvalue()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(hub_upload.Refused, match="is not an lm-evaluation-harness results file"):
        hub_upload.read_eval_results(tmp_path / "list.json", required=True)
    (tmp_path / "eval_results.json").write_text("{ truncated")
    with captured_output() as output:
        assert hub_upload.read_eval_results(tmp_path / "eval_results.json", required=False) is None
    assert "is not valid JSON" in output.getvalue()
    assert hub_upload.read_eval_results(tmp_path / "absent.json", required=False) is None


def test_card_without_a_training_log_has_no_metrics(tmp_path):
    card = hub_upload.build_model_card(tiny_config(), "someone/untrained", log=None, figures_png=[],
                                       license_id="apache-2.0", datasets=[])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.eval_results is None and loaded.data.metrics is None and loaded.data.datasets is None
    assert "no `training_log.json` of a finished run" in loaded.text


def test_the_card_counts_the_staged_models_parameters_not_the_logs(model_dir, tmp_path):
    """A LoRA run's log counts its adapters, which the merged model it saved no longer has."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    log = json.loads((folder / "training_log.json").read_text())
    staged = log["parameters"]
    (folder / "training_log.json").write_text(json.dumps(dict(log, parameters=staged + 3584)))  # + the adapters
    assert hub_upload.main([str(folder), "--repo-id", "someone/x", "--dry-run", "--stage-dir",
                            str(tmp_path / "stage")]) == 0
    card = (tmp_path / "stage" / "README.md").read_text()
    assert f"A {staged:,}-parameter decoder-only" in card and f"| parameters | {staged:,} |" in card
    assert f"{staged + 3584:,}" not in card


def test_a_log_whose_run_did_not_finish_gives_the_card_no_figures_and_no_curve(model_dir, tmp_path):
    """A finished run continued with a larger --max_steps and interrupted: the folder still holds the finished run's
    weights, the log the continuation's steps (the card said "optimizer steps 50" of step-40 weights)."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    log = json.loads((folder / "training_log.json").read_text())
    log.update(status="stopped", stopped="interrupted at step 52: KeyboardInterrupt", summary=None)
    (folder / "training_log.json").write_text(json.dumps(log))
    with captured_output() as output:
        assert hub_upload.main([str(folder), "--repo-id", "someone/x", "--dry-run", "--stage-dir",
                                str(tmp_path / "stage")]) == 0
    assert "says the run is 'stopped' (interrupted at step 52: KeyboardInterrupt" in output.getvalue()
    card = ModelCard.load(tmp_path / "stage" / "README.md")
    # (the lm-evaluation-harness results stay: evaluate.py measured the folder's weights)
    assert {result.source_name for result in card.data.eval_results} == {"lm-evaluation-harness"}
    assert "no `training_log.json` of a finished run" in card.text
    assert not (tmp_path / "stage" / "loss_curve.png").exists() and "loss curve" not in card.text


def test_card_points_to_the_exact_tokenizer_when_AutoTokenizer_would_swap_it(tmp_path):
    """transformers 5 loads model_type qwen2 folders with its own Qwen2Tokenizer pipeline, whatever was saved."""
    native = {"model_class": "Qwen2ForCausalLM", "model_type": "qwen2", "parameters": 1000}
    card = hub_upload.build_model_card(tiny_config(), "someone/q", log=None, figures_png=[], license_id="mit",
                                       datasets=[], native=native, exact_auto_tokenizer=False)
    assert 'tokenizer = PreTrainedTokenizerFast.from_pretrained("someone/q")' in card.text
    assert "AutoTokenizer.from_pretrained" not in card.text


def test_training_figures_are_read_defensively(tmp_path):
    """A log with only `log_history` entries still gives eval loss and perplexity; junk gives nothing."""
    figures = hub_upload.training_figures({"log_history": [{"step": 5, "loss": 3.0}, {"step": 5, "eval_loss": 2.0},
                                                           {"step": 6, "loss": float("nan")}]})
    assert figures["eval_loss"] == 2.0 and figures["perplexity"] == pytest.approx(7.389, rel=1e-3)
    assert figures["global_step"] == 6 and "final_loss" not in figures  # a NaN loss is left out, not printed
    assert hub_upload.training_figures({"summary": "not a dict", "evals": [None, {"eval_loss": "x"}]}) == {}
    (tmp_path / "training_log.json").write_text("{ truncated")
    assert hub_upload.read_training_log(tmp_path) is None
    (tmp_path / "training_log.json").write_text("[1, 2]")
    assert hub_upload.read_training_log(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# The upload, at the HfApi boundary
# ------------------------------------------------------------------------------------------------
def test_upload_creates_the_repo_and_uploads_the_staged_folder(native_upload):
    calls = native_upload.api.calls
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == {"repo_id": "someone/tiny-archlm-llama", "repo_type": "model", "private": True,
                           "exist_ok": True}
    assert calls[1][1] == {"repo_id": "someone/tiny-archlm-llama", "branch": "dev", "repo_type": "model",
                           "exist_ok": True}
    upload = calls[2][1]
    assert (upload["repo_id"], upload["repo_type"], upload["revision"], upload["commit_message"]) == (
        "someone/tiny-archlm-llama", "model", "dev", "First upload")
    assert "token" not in upload  # huggingface_hub finds the token itself
    assert set(files_under(native_upload.api.snapshot_dir)) == NATIVE_STAGED
    assert not Path(upload["folder_path"]).exists()  # the temporary staging folder is removed after the upload


def test_native_upload_holds_the_llama_export_and_a_card_without_remote_code(native_upload):
    uploaded = native_upload.api.snapshot_dir
    config = json.loads((uploaded / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    card = ModelCard.load(uploaded / "README.md")
    assert {"archlm", "llama", "native-export"} <= set(card.data.tags)
    assert "trust_remote_code" not in card.text
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-archlm-llama", revision="dev")' in card.text


def test_staged_folders_load_in_a_fresh_process_without_archlm(dry_run, native_upload, model_dir, tokenizer, tmp_path):
    """The dry-run folder with trust_remote_code, the uploaded native one with plain AutoModelForCausalLM: both give
    the original model's logits and tokens, in a process where `import archlm` fails."""
    model = ArchLMForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.tensor([tokenizer(TOKENIZER_PROBE)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = r"""
import json, sys
sys.modules["archlm"] = None
try:
    import archlm
    raise SystemExit("archlm was importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
input_ids, probe, results = torch.load(sys.argv[1]), sys.argv[2], {}
for folder, remote_code in ((sys.argv[3], True), (sys.argv[4], False)):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code).eval()
    with torch.no_grad():
        torch.save(model(input_ids=input_ids).logits, folder + ".logits.pt")
    ids = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)(probe)["input_ids"]
    results[folder] = [type(model).__name__, ids]
print(json.dumps(results))
"""
    folders = [str(dry_run.stage_dir), str(native_upload.api.snapshot_dir)]
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "input_ids.pt"), TOKENIZER_PROBE, *folders],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, model_class in zip(folders, ["ArchLMForCausalLM", "LlamaForCausalLM"]):
        assert loaded[folder] == [model_class, input_ids[0].tolist()]
        torch.testing.assert_close(torch.load(folder + ".logits.pt"), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Refusals: nothing staged, nothing uploaded
# ------------------------------------------------------------------------------------------------
def truncate_weights(folder: Path):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def remove_tokenizer(folder: Path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()


def add_pickle_weights(folder: Path):
    torch.save({"lm_head.weight": torch.zeros(1)}, folder / "pytorch_model.bin")


def break_config(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_attention_heads=4, num_key_value_heads=3)))


def remove_weights(folder: Path):
    (folder / "model.safetensors").unlink()


# id -> (how to break the folder, what the message must say)
BROKEN_FOLDERS = {
    "truncated-weights": (truncate_weights, "model.safetensors is truncated or corrupt"),
    "no-tokenizer": (remove_tokenizer, "no tokenizer"),
    "pickle-weights": (add_pickle_weights, "pickle files ['pytorch_model.bin']"),
    "invalid-config": (break_config, "`num_key_value_heads` (3)"),
    "no-weights": (remove_weights, "no safetensors weights"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_broken_folder_is_refused_saying_what_is_wrong(case, model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    breakage, message = BROKEN_FOLDERS[case]
    breakage(folder)
    api = RecordingHfApi(tmp_path / "uploaded")
    with pytest.MonkeyPatch.context() as patch, captured_output() as output:
        patch.setenv("HF_TOKEN", SECRET)
        exit_code = hub_upload.main([str(folder), "--repo-id", "someone/x", "--stage-dir", str(tmp_path / "stage")],
                                    api=api)
    assert exit_code == 1
    assert message in output.getvalue()
    assert "nothing was staged or uploaded" in output.getvalue()
    assert not (tmp_path / "stage").exists() and api.calls == []


def test_folder_that_does_not_load_is_refused_with_the_loaders_error(model_dir, tmp_path):
    """Complete safetensors without one tensor pass the file checks; the load check in a fresh process catches it
    (transformers itself would only warn and initialise the tensor at random)."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with captured_output() as output:
        exit_code = hub_upload.main([str(folder), "--repo-id", "someone/x", "--dry-run",
                                     "--stage-dir", str(tmp_path / "stage")])
    assert exit_code == 1
    assert "does not load" in output.getvalue() and "model.norm.weight" in output.getvalue()
    assert not (tmp_path / "stage").exists()


def test_request_is_checked_before_the_folder(model_dir, tmp_path, monkeypatch):
    cases = [
        (["--repo-id", "no-namespace", "--dry-run"], "needs a namespace"),
        (["--repo-id", "someone/bad name", "--dry-run"], "not a valid repository id"),
        (["--repo-id", "someone/x", "--dry-run", "--stage-dir", str(model_dir)], "is not an empty folder"),
    ]
    # no token anywhere: not in the environment, not saved by a login
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    cases.append((["--repo-id", "someone/x"], "no Hugging Face token"))
    for flags, message in cases:
        with captured_output() as output:
            assert hub_upload.main([str(model_dir), *flags]) == 1
        assert message in output.getvalue(), flags


def test_non_exportable_model_is_refused_for_native_naming_the_fields(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, norm_position="post")))
    with captured_output() as output:
        exit_code = hub_upload.main([str(folder), "--repo-id", "someone/x", "--native", "--dry-run",
                                     "--stage-dir", str(tmp_path / "stage")])
    assert exit_code == 1
    assert "`norm_position`='post'" in output.getvalue() and "LlamaForCausalLM" in output.getvalue()
    assert not (tmp_path / "stage").exists()
