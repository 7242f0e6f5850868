"""Check an ArchLM model folder, stage it with a generated model card, and upload it to the Hugging Face Hub.

    python hub_upload.py MODEL_DIR --repo-id USER/NAME [--private] [--revision R] [--commit-message M]
                         [--dry-run] [--stage-dir DIR] [--native] [--license apache-2.0] [--datasets NAME ...]
                         [--eval-results FILE]

Try it first with `--dry-run`, which needs no account: it stages into `--stage-dir` (default: a new temporary
folder, printed on stdout) and uploads nothing. What happens, in order:

1. The folder is checked before anything is written: `config.json` is a valid ArchLM config; the weights are
   safetensors and complete (each file as long as its header says); there are no pickle files (`*.bin`, `*.pt`,
   `*.pth`, `*.pkl`, `*.ckpt`: loading one runs code; the Trainer's `training_args.bin` is skipped, never
   uploaded); the tokenizer is there. Every problem found is listed, and the folder is refused.
2. A temporary folder receives `config.json` (with `auto_map`), the safetensors, the remote code
   (`configuration_archlm.py`, `modeling_archlm.py`), the tokenizer, `generation_config.json`, any `*.png` figures
   and a model card `README.md` (metadata, architecture, training figures from `training_log.json`, usage).
   The metadata's `model-index` holds the validation loss and perplexity from `training_log.json` and, when the
   folder has an `eval_results.json` (written by examples/evaluate.py, or any lm-evaluation-harness results file
   given with `--eval-results`), every lm-evaluation-harness metric in it.
   With `--native` it receives the native transformers export instead (`archlm.convert.to_transformers`: the
   family that computes the same function, checked for equal logits), which loads without remote code.
3. That folder is loaded in a separate Python process where `import archlm` fails, as on a Hub user's machine:
   `AutoModelForCausalLM` (with `trust_remote_code=True`, or without for `--native`), `AutoTokenizer`, a short
   forward. A folder that does not load is refused with the loader's error, and nothing is left behind.
4. The staged folder moves to `--stage-dir`; without `--dry-run`, `HfApi.create_repo(exist_ok=True)` and
   `HfApi.upload_folder` send it (to branch `--revision` when given, created if needed).

The token is huggingface_hub's own: the `HF_TOKEN` environment variable or `hf auth login`. There is no
`--token` flag, and the token is never printed, logged or written.
"""

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import GenerationConfig

import archlm
from archlm import ArchLMConfig
from archlm.convert import TOKENIZER_PROBE, export_folder, native_family
from archlm.modeling_archlm import AUTO_MAP, check_safetensors_file
from archlm.plots import LOSS_CURVE_NAME
from archlm.tokenization_archlm import TOKENIZER_FILES, VOCABULARY_FILES

logger = logging.getLogger("hub_upload")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SKIPPED_PICKLES = ("training_args.bin",)  # the Trainer's arguments, not weights: never staged
REMOTE_CODE_FILES = ("configuration_archlm.py", "modeling_archlm.py")
TRAINING_LOG = "training_log.json"
EVAL_RESULTS = "eval_results.json"  # examples/evaluate.py's output: lm-evaluation-harness's results dictionary
LM_EVAL_SOURCE = {"source_name": "lm-evaluation-harness",
                  "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
LOAD_CHECK_TIMEOUT_S = 1800
CHECK_RESULT_PREFIX = "HUB_UPLOAD_CHECK "

# Run by `check_loads` in a fresh interpreter: argv = folder, "native" or "remote", probe text. Prints one line
# CHECK_RESULT_PREFIX + JSON: {"error": ...} or what loaded.
LOAD_CHECK = r"""
import json, sys
sys.modules["archlm"] = None  # as on a Hub user's machine: `import archlm` fails
PREFIX = "HUB_UPLOAD_CHECK "
try:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    folder, remote_code, probe = sys.argv[1], sys.argv[2] == "remote", sys.argv[3]
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code, output_loading_info=True)
    bad = {kind: sorted(map(str, keys)) for kind, keys in info.items() if kind != "error_msgs" and keys}
    if bad or info.get("error_msgs"):
        raise ValueError(f"the weights do not match the model: {bad or info['error_msgs']}")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                         f"{model.config.vocab_size}: some token ids have no embedding")
    ids = tokenizer(probe)["input_ids"]
    exact = PreTrainedTokenizerFast.from_pretrained(folder)(probe)["input_ids"]
    input_ids = torch.tensor([ids[:32] or [0]])
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids).logits
    if logits.shape != (1, input_ids.shape[1], model.config.vocab_size) or not torch.isfinite(logits).all():
        raise ValueError(f"a forward pass gave logits of shape {tuple(logits.shape)} that are not all finite")
    print(PREFIX + json.dumps({"model_class": type(model).__name__, "tokenizer_class": type(tokenizer).__name__,
                               "auto_tokenizer_is_exact": ids == exact, "parameters": model.num_parameters()}))
except Exception as error:  # every failure becomes one line for the refusal message
    print(PREFIX + json.dumps({"error": f"{type(error).__name__}: {error}"}))
"""


class Refused(Exception):
    """A folder or request that hub_upload will not stage or upload; the message says what is wrong."""


# ------------------------------------------------------------------------------------------------
# 1. Checks before anything is written
# ------------------------------------------------------------------------------------------------
def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (the loader's own check, see `check_safetensors_file`), or None."""
    try:
        check_safetensors_file(path)
    except OSError as error:
        return str(error)
    return None


def weight_files(model_dir: Path, problems: list[str]) -> list[Path]:
    """The safetensors files (with the index of a sharded checkpoint); problems are appended to `problems`."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            problems.append(f"{SAFETENSORS_INDEX} is not a valid index ({error})")
            return []
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            problems.append(f"{SAFETENSORS_INDEX} lists shards that are missing: {missing}")
        files = [index] + [model_dir / name for name in shards if name not in missing]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not index.is_file() and not files:
        problems.append("no safetensors weights (model.safetensors, or model.safetensors.index.json and its shards); "
                        "save the model with `model.save_pretrained(MODEL_DIR)`")
    problems += [problem for path in files if path.suffix == ".safetensors" and (problem := safetensors_problem(path))]
    return files


def check_folder(model_dir: Path) -> ArchLMConfig:
    """The folder's config, after checking everything that needs no model load; `Refused` lists every problem."""
    if not model_dir.is_dir():
        raise Refused(f"{model_dir} is not a folder")
    problems, config = [], None
    config_path = model_dir / "config.json"
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        if model_type != "archlm":
            problems.append(f"config.json has model_type {model_type!r}, not 'archlm': hub_upload.py shares ArchLM "
                            "models (convert one with `python -m archlm.convert --from-transformers`)")
        else:
            config = ArchLMConfig.from_pretrained(model_dir)  # every field validated, with a named error
    except FileNotFoundError:
        problems.append("config.json is missing")
    except Exception as error:  # JSON, type and cross-field errors alike
        problems.append(f"config.json is not a valid ArchLM config: {error}")

    pickles = sorted(path.name for path in model_dir.iterdir()
                     if path.is_file() and path.suffix in PICKLE_SUFFIXES and path.name not in SKIPPED_PICKLES)
    if pickles:
        problems.append(f"pickle files {pickles}: only safetensors weights are shared (unpickling runs arbitrary code); "
                        "save with `model.save_pretrained(MODEL_DIR)` and remove them")
    weight_files(model_dir, problems)

    has_vocabulary = any((model_dir / name).is_file() for name in VOCABULARY_FILES)
    if not (model_dir / "tokenizer_config.json").is_file() or not has_vocabulary:
        problems.append("no tokenizer (tokenizer.json and tokenizer_config.json): save it into the folder with "
                        "`tokenizer.save_pretrained(MODEL_DIR)`")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise Refused(f"{model_dir} cannot be shared; nothing was staged or uploaded:\n{listed}")
    return config


def check_loads(folder: Path, remote_code: bool) -> dict:
    """Load `folder` as a Hub user would, in a fresh interpreter without archlm; `Refused` with the loader's error."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with tempfile.TemporaryDirectory(prefix="archlm-load-check-") as scratch:
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=scratch)  # a local folder; remote code copied to scratch
        command = [sys.executable, "-c", LOAD_CHECK, str(folder), "remote" if remote_code else "native", TOKENIZER_PROBE]
        logger.info("Checking that the staged folder loads in a separate process without archlm")
        try:
            result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                                    timeout=LOAD_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Refused(f"loading the staged folder took more than {LOAD_CHECK_TIMEOUT_S} s; "
                          "nothing was staged or uploaded") from None
    lines = [line for line in result.stdout.splitlines() if line.startswith(CHECK_RESULT_PREFIX)]
    outcome = json.loads(lines[-1][len(CHECK_RESULT_PREFIX):]) if lines else {"error": result.stderr.strip()[-2000:]}
    if "error" in outcome:
        how = "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)" if remote_code else "AutoModelForCausalLM"
        raise Refused(f"the folder does not load with {how} and AutoTokenizer in a process without archlm; nothing "
                      f"was staged or uploaded:\n  {outcome['error']}")
    return outcome


# ------------------------------------------------------------------------------------------------
# 2. The model card
# ------------------------------------------------------------------------------------------------
def read_training_log(model_dir: Path) -> dict | None:
    """`training_log.json` as written by examples/train.py, or None when absent or unreadable (then: no metrics)."""
    path = model_dir / TRAINING_LOG
    if not path.is_file():
        return None
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        logger.warning("Ignoring %s, which is not valid JSON (%s): the card reports no training figures", path, error)
        return None
    if not isinstance(log, dict):
        logger.warning("Ignoring %s: expected a JSON object, got %s", path, type(log).__name__)
        return None
    return log


def read_eval_results(path: Path, required: bool) -> dict | None:
    """An lm-evaluation-harness results file (a JSON object with a `results` object), or None when it is absent or
    unreadable and not `required` (then: a warning); `Refused` when it was asked for and cannot be used."""
    problem = None
    if not path.is_file():
        problem = "does not exist"
    else:
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            problem = f"is not valid JSON ({error})"
        else:
            if isinstance(results, dict) and isinstance(results.get("results"), dict):
                return results
            problem = "is not an lm-evaluation-harness results file (no `results` object)"
    if required:
        raise Refused(f"--eval-results {path} {problem}; nothing was staged or uploaded")
    if path.exists():
        logger.warning("Ignoring %s, which %s: the card reports no evaluation results", path, problem)
    return None


def lm_eval_results(evaluation: dict | None) -> list[EvalResult]:
    """model-index entries for every finite metric of every task (or group) in lm-evaluation-harness results: the
    task as the dataset (its Hub dataset as `type` when it has one), the metric under its lm-eval name (with its
    filter when that is not `none`), the few-shot count as dataset args, lm-evaluation-harness as the source."""
    if not evaluation:
        return []
    configs, n_shot = evaluation.get("configs") or {}, evaluation.get("n-shot") or {}
    entries = []
    for task, metrics in sorted(evaluation["results"].items()):
        if not isinstance(metrics, dict):
            continue
        config = configs.get(task) if isinstance(configs.get(task), dict) else {}
        dataset = {"dataset_type": config.get("dataset_path") or task, "dataset_name": metrics.get("alias") or task,
                   "dataset_config": config.get("dataset_name"),
                   "dataset_split": config.get("test_split") or config.get("validation_split")}
        if isinstance(n_shot.get(task), int):
            dataset["dataset_args"] = {"num_few_shot": n_shot[task]}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or _number(value) is None:
                continue
            entries.append(EvalResult(task_type="text-generation", task_name="Text Generation", **dataset,
                                      metric_type=metric, metric_value=round(float(value), 4),
                                      metric_name=metric if filter_name == "none" else f"{metric} ({filter_name})",
                                      **LM_EVAL_SOURCE))
    return entries


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def finished_training_log(model_dir: Path) -> dict | None:
    """The training log when it describes the run whose weights the folder holds: a log whose run did not finish
    (a continuation interrupted before it saved its model, a crash) has steps and losses past those weights, so the
    card reports none of them (a warning says why)."""
    log = read_training_log(model_dir)
    status = (log or {}).get("status", "finished")
    if log is None or status == "finished":
        return log
    steps = [entry.get("step") for entry in _entries(log, "steps") if isinstance(entry.get("step"), int)]
    logger.warning("%s says the run is %r (%s, at step %s): its figures need not be those of the weights in %s, so "
                   "the card reports no training figures", model_dir / TRAINING_LOG, status,
                   log.get("stopped") or "no reason recorded", max(steps, default=0), model_dir)
    return None


def _entries(log: dict, *keys: str) -> list[dict]:
    for key in keys:
        if isinstance(log.get(key), list):
            return [entry for entry in log[key] if isinstance(entry, dict)]
    return []


def training_figures(log: dict | None) -> dict[str, float]:
    """The run's numbers from its summary, else from its step and eval entries; only finite numbers."""
    if log is None:
        return {}
    summary = log.get("summary") if isinstance(log.get("summary"), dict) else {}
    history = _entries(log, "log_history")
    steps = [entry for entry in _entries(log, "steps") or history if "loss" in entry]
    evals = [entry for entry in _entries(log, "evals") or history if "eval_loss" in entry]
    figures = {key: summary.get(key) for key in summary}
    figures.setdefault("parameters", log.get("parameters"))
    figures.setdefault("block_size", log.get("block_size"))
    if steps:
        figures.setdefault("global_step", steps[-1].get("step"))
        figures.setdefault("final_loss", steps[-1].get("loss"))
    if evals:
        figures.setdefault("eval_loss", evals[-1].get("eval_loss"))
        figures.setdefault("perplexity", evals[-1].get("perplexity", evals[-1].get("eval_perplexity")))
    if _number(figures.get("perplexity")) is None and _number(figures.get("eval_loss")) is not None:
        figures["perplexity"] = math.exp(min(figures["eval_loss"], 700))
    return {key: value for key, value in figures.items() if _number(value) is not None}


FIGURE_LABELS = {
    "parameters": "parameters",
    "global_step": "optimizer steps",
    "tokens_seen": "tokens seen",
    "block_size": "block size (tokens)",
    "train_loss": "mean training loss",
    "final_loss": "last logged training loss",
    "eval_loss": "validation loss",
    "perplexity": "validation perplexity",
    "tokens_per_second": "throughput (tokens/s)",
    "mfu": "model FLOPs utilisation",
    "peak_memory_mb": "peak memory (MB)",
    "train_runtime_s": "training time (s)",
}


def _format(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def datasets_of(log: dict | None, flag: list[str] | None) -> list[str]:
    """Hub dataset ids: from --datasets, else what the training log recorded (`datasets` or `dataset_name`)."""
    if flag:
        return flag
    recorded = (log or {}).get("datasets", (log or {}).get("dataset_name"))
    if isinstance(recorded, str):
        return [recorded]
    return [name for name in recorded if isinstance(name, str)] if isinstance(recorded, list) else []


def usage_snippet(repo_id: str, revision: str | None, native_class: str | None, exact_auto_tokenizer: bool) -> str:
    repo = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "")
    remote = "" if native_class else ", trust_remote_code=True"
    tokenizer_class = "AutoTokenizer" if exact_auto_tokenizer else "PreTrainedTokenizerFast"
    lines = [
        f"from transformers import AutoModelForCausalLM, {tokenizer_class}",
        "",
        f"tokenizer = {tokenizer_class}.from_pretrained({repo}{remote})",
        f"model = AutoModelForCausalLM.from_pretrained({repo}{remote})",
        'inputs = tokenizer("def fibonacci(n):", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.8, top_k=40)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
    ]
    return "\n".join(lines)


def build_model_card(config: ArchLMConfig, repo_id: str, *, log: dict | None, figures_png: list[str],
                     license_id: str, datasets: list[str], revision: str | None = None,
                     native: dict | None = None, exact_auto_tokenizer: bool = True,
                     evaluation: dict | None = None, parameters: int | None = None) -> ModelCard:
    """The card: YAML metadata (library, task, tags, license, datasets, metrics as model-index), then the
    architecture, the training figures, and how to load it. `native`: the load check's result for a native export;
    `evaluation`: lm-evaluation-harness results (`read_eval_results`), added to the model-index; `parameters`: the
    staged model's count (the log's counts a LoRA run's adapters, which the merged model no longer has)."""
    figures = training_figures(log)
    if parameters is not None:
        figures["parameters"] = parameters
    metrics = {name: figures[key] for name, key in (("loss", "eval_loss"), ("perplexity", "perplexity")) if key in figures}
    model_name = repo_id.split("/")[-1]
    data_description = (log or {}).get("data") if isinstance((log or {}).get("data"), str) else None
    eval_results = [
        EvalResult(task_type="text-generation", dataset_type=datasets[0] if datasets else "custom",
                   dataset_name=datasets[0] if datasets else (data_description or "held-out validation text"),
                   dataset_split="validation", metric_type=name, metric_name=f"validation {name}",
                   metric_value=round(float(value), 4))
        for name, value in metrics.items()
    ] + lm_eval_results(evaluation)
    native_class = native["model_class"] if native else None
    tags = ["archlm", config.architecture_name, "text-generation", "causal-lm"]
    tags += [native["model_type"], "native-export"] if native else ["custom_code"]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_id,
        tags=tags,
        datasets=datasets or None,
        metrics=list(metrics) or None,
        eval_results=eval_results or None,
    )

    parameters = int(figures.get("parameters") or (native or {}).get("parameters") or config.num_parameters_estimate())
    if native:
        intro = (f"A {parameters:,}-parameter decoder-only language model with the **{config.architecture_name}** "
                 f"architecture, trained with ArchLM and exported to the native `{native_class}` format: it loads "
                 "in transformers without remote code, and in serving engines (vLLM, TGI, llama.cpp after GGUF "
                 "conversion) as any model of that family does. The export computes the same logits as the ArchLM "
                 "original (checked when it was made).")
    else:
        intro = (f"A {parameters:,}-parameter decoder-only language model with the **{config.architecture_name}** "
                 "architecture, built and trained with ArchLM. Its modeling code (`configuration_archlm.py`, "
                 "`modeling_archlm.py`) ships in this repository and `trust_remote_code=True` runs it: read it "
                 "first if you do not know its author.")
    sections = [f"# {model_name}", intro, "## Architecture", f"```text\n{config.summary()}\n```", "## Training"]
    if log is None:
        sections.append(f"No training figures are reported: the model folder holds no `{TRAINING_LOG}` of a finished "
                        "run.")
    else:
        rows = [f"| {label} | {_format(figures[key])} |" for key, label in FIGURE_LABELS.items() if key in figures]
        if data_description:
            sections.append(f"Data: {data_description}.")
        if rows:
            sections.append("\n".join(["| figure | value |", "|---|---|", *rows]))
        sections += [f"![{Path(name).stem.replace('_', ' ')}]({name})" for name in figures_png]
    sections += ["## Usage", f"```python\n{usage_snippet(repo_id, revision, native_class, exact_auto_tokenizer)}\n```"]
    if not exact_auto_tokenizer:
        sections.append("`AutoTokenizer` replaces this model type's saved tokenizer with its own pipeline in "
                        "transformers 5, so load `tokenizer.json` as saved with `PreTrainedTokenizerFast`.")
    if native:
        sections.append(f"Serve it with vLLM:\n\n```bash\nvllm serve {repo_id}\n```")
    sections += ["## Limitations", "A small research model: it has not been evaluated for safety, bias or factual "
                 "accuracy, and is not meant for use in production."]
    body = "\n\n".join(sections)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


# ------------------------------------------------------------------------------------------------
# 3. Staging
# ------------------------------------------------------------------------------------------------
def _copy(source: Path, target_dir: Path) -> None:
    shutil.copy2(source, target_dir / source.name)


def _stage_remote_code_model(model_dir: Path, config: ArchLMConfig, build: Path) -> None:
    """config.json with `auto_map`, the weights, the remote code and the generation config, as saved or made."""
    config_dict = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config_dict.get("auto_map") != AUTO_MAP:
        logger.info("Writing auto_map into the staged config.json, so the model loads with trust_remote_code")
        config_dict["auto_map"] = AUTO_MAP
    (build / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in weight_files(model_dir, []):
        _copy(path, build)
    package_dir = Path(archlm.__file__).parent
    for name in REMOTE_CODE_FILES:
        if (model_dir / name).is_file():
            _copy(model_dir / name, build)
        else:
            logger.info("%s is not in the folder; staging the installed archlm's copy", name)
            _copy(package_dir / name, build)
    if (model_dir / "generation_config.json").is_file():
        _copy(model_dir / "generation_config.json", build)
    else:
        logger.info("No generation_config.json in the folder; staging one made from the config")
        GenerationConfig.from_model_config(config).save_pretrained(build)


def stage(model_dir: Path, config: ArchLMConfig, args: argparse.Namespace) -> Path:
    """A new temporary folder holding everything to upload, checked to load; removed again if anything fails."""
    eval_results_path = getattr(args, "eval_results", None)
    evaluation = read_eval_results(eval_results_path or model_dir / EVAL_RESULTS,
                                   required=eval_results_path is not None)
    build = Path(tempfile.mkdtemp(prefix="archlm-hub-stage-"))
    try:
        if args.native:
            try:
                export_folder(model_dir, build)  # the model, its generation config and the tokenizer
            except (ValueError, RuntimeError, OSError) as error:
                raise Refused(f"{model_dir} cannot be exported to a native transformers family; nothing was staged "
                              f"or uploaded:\n{error}") from error
        else:
            _stage_remote_code_model(model_dir, config, build)
            for name in TOKENIZER_FILES:
                if (model_dir / name).is_file():
                    _copy(model_dir / name, build)
        log = finished_training_log(model_dir)
        figures_png = sorted(path.name for path in model_dir.glob("*.png")
                             if log is not None or path.name != LOSS_CURVE_NAME)  # (the unfinished run's curve)
        for name in figures_png:
            _copy(model_dir / name, build)

        outcome = check_loads(build, remote_code=not args.native)
        if not outcome["auto_tokenizer_is_exact"]:
            logger.warning("AutoTokenizer loads this folder as %s, which tokenizes differently from the saved "
                           "tokenizer.json; the card tells users to load PreTrainedTokenizerFast",
                           outcome["tokenizer_class"])
        if args.native:
            outcome["model_type"] = json.loads((build / "config.json").read_text(encoding="utf-8"))["model_type"]
        card = build_model_card(
            config, args.repo_id, log=log, figures_png=figures_png, license_id=args.license,
            datasets=datasets_of(log, args.datasets), revision=args.revision,
            native=outcome if args.native else None, exact_auto_tokenizer=outcome["auto_tokenizer_is_exact"],
            evaluation=evaluation, parameters=outcome.get("parameters"),
        )
        card.save(build / "README.md")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    skipped = sorted(path.name + ("/" if path.is_dir() else "") for path in model_dir.iterdir()
                     if not (build / path.name).exists())
    if skipped:
        logger.info("Not staged (not part of a shared model): %s", ", ".join(skipped))
    return build


def _place(build: Path, stage_dir: Path | None) -> Path:
    """Move the finished staging folder to --stage-dir (checked to be absent or empty), or keep it where it is."""
    if stage_dir is None:
        return build
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    if stage_dir.exists():
        stage_dir.rmdir()
    shutil.move(str(build), str(stage_dir))
    return stage_dir


# ------------------------------------------------------------------------------------------------
# 4. Upload
# ------------------------------------------------------------------------------------------------
def upload(stage_dir: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, api: HfApi | None = None):
    """Create the model repo (if needed) and upload the staged folder as one commit. `api` defaults to an `HfApi`
    that finds the token itself (HF_TOKEN or the saved login)."""
    api = api if api is not None else HfApi()
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    logger.info("Repository %s is ready", repo_url)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(stage_dir),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload ArchLM model with hub_upload.py",
    )
    logger.info("Uploaded %d files: %s", sum(1 for path in stage_dir.rglob("*") if path.is_file()),
                getattr(commit, "commit_url", commit))
    return commit


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hub_upload.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a folder saved by ArchLM (examples/train.py)")
    parser.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME of the model repository")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (an existing one keeps its visibility)")
    parser.add_argument("--revision", default=None, help="branch to upload to (created when missing); default: main")
    parser.add_argument("--commit-message", default=None, help="message of the upload commit")
    parser.add_argument("--dry-run", action="store_true", help="check and stage only; upload nothing")
    parser.add_argument("--stage-dir", type=Path, default=None,
                        help="where to stage (must be absent or empty); default: a new temporary folder")
    parser.add_argument("--native", action="store_true",
                        help="stage the native transformers export (Llama/Mistral/Qwen2/Qwen3/GPT-2, no remote code)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card metadata (default: apache-2.0)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                        help="Hub dataset ids the model was trained on (default: those recorded in training_log.json)")
    parser.add_argument("--eval-results", type=Path, default=None, metavar="FILE",
                        help=f"lm-evaluation-harness results for the card's model-index (default: MODEL_DIR/"
                             f"{EVAL_RESULTS} when present, as examples/evaluate.py writes it)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, api: HfApi | None = None) -> Path:
    """Check, stage and (unless --dry-run) upload; returns the staged folder (removed after an upload when it was a
    temporary one). Raises `Refused` before writing anything when the request or the folder is wrong."""
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise Refused(f"--repo-id {args.repo_id!r} is not a valid repository id: {error}") from None
    if "/" not in args.repo_id:
        raise Refused(f"--repo-id {args.repo_id!r} needs a namespace: USER/NAME or ORG/NAME")
    if args.stage_dir is not None and args.stage_dir.exists() and (
            not args.stage_dir.is_dir() or any(args.stage_dir.iterdir())):
        raise Refused(f"--stage-dir {args.stage_dir} exists and is not an empty folder; choose a new one")
    if not args.dry_run and get_token() is None:
        raise Refused("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or stage only, with --dry-run)")

    config = check_folder(args.model_dir)
    if args.native:
        try:
            native_family(config)  # says which fields have no native equivalent, before anything is loaded
        except ValueError as error:
            raise Refused(f"{args.model_dir} cannot be exported with --native; nothing was staged or uploaded:\n"
                          f"{error}") from None
    staged = _place(stage(args.model_dir, config, args), args.stage_dir)
    listing = "\n".join(f"  {path.relative_to(staged)}  ({path.stat().st_size:,} bytes)"
                        for path in sorted(staged.rglob("*")) if path.is_file())
    logger.info("Staged %s in %s:\n%s", "the native export" if args.native else "the model", staged, listing)
    if args.dry_run:
        logger.info("Dry run: nothing uploaded. Review %s, then run again without --dry-run", staged / "README.md")
        print(staged)
        return staged
    try:
        upload(staged, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, api=api)
    finally:
        if args.stage_dir is None:
            shutil.rmtree(staged, ignore_errors=True)
    return staged


def main(argv: list[str] | None = None, api: HfApi | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args, api)
    except Refused as error:
        logger.error("%s", error)
        return 1
    except HfHubHTTPError as error:  # the Hub said no (permissions, quota, a name taken): its message says why
        logger.error("The upload failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
