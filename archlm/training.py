"""The parts of the main job (archlm/train.py, behind examples/train.py): flags, model and tokenizer setup, the
Trainer, its callbacks, the run log.

    flags ──► check (nothing loaded yet) ──► data ──► tokenizer ──► model (+ LoRA) ──► packed blocks
          ──► ArchLMTrainer (curriculum, metrics) + ThroughputCallback + TrainingLogCallback
          ──► output folder: weights, config.json (auto_map), remote code, tokenizer, generation_config.json,
              training_log.json, loss_curve.png

Every problem with the flags or the data is found before the output folder is touched, and raised as a
`ValueError` whose message names the flag and the value.

Metrics added to every training log entry (and so to tensorboard / wandb, `trainer_state.json` and
`training_log.json`): `tokens_per_second` (tokens seen by the model, padding excluded, over the time spent in
training steps), `mfu` (model FLOPs utilisation: tokens/s x `flops_per_token(block_size)` / (peak FLOP/s x
processes)), `peak_memory_mb` (allocator peak on a GPU, peak RSS of the process on CPU), `block_size`; the
Trainer already logs `grad_norm`. Evaluations add `eval_perplexity` = exp(eval_loss).
"""

import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, ProgressCallback, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .budget import TimeBudget, check_schedule, planned_schedule
from .check import missing_local_folder
from .configuration_archlm import PRESETS, ArchLMConfig
from .data import DEFAULT_CHAT, ChatTemplate, block_size_at, iter_texts
from .modeling_archlm import ArchLMForCausalLM
from .optim import muon_optimizer
from .plots import LOSS_CURVE_NAME, plot_training_log
from .routing import RouterBiasCallback, RouterStatsCallback  # noqa: F401 (also imported from here)
from .throughput import ThroughputCallback, measure_peak_tflops, peak_memory_mb  # noqa: F401 (also imported from here)
from .tokenization_archlm import IM_END_TOKEN, train_tokenizer

logger = logging.getLogger(__name__)

TRAINING_LOG_NAME = "training_log.json"
WEIGHT_DTYPES = ("float32", "bfloat16", "auto")
ADAPTER_DIR_NAME = "adapter"
# Errors of bad flags or data, reported as one line before anything is written.
SETUP_ERRORS = (ValueError, OSError, StrictDataclassClassValidationError, StrictDataclassFieldValidationError)
# What a finished run leaves in its folder; --overwrite_output_dir removes these (and checkpoints) first.
RUN_OUTPUTS = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "configuration_archlm.py", "modeling_archlm.py", "training_args.bin", TRAINING_LOG_NAME, ADAPTER_DIR_NAME,
)


@dataclass
class ModelArguments:
    """Which model to train (a preset or an ArchLM folder), its tokenizer, and optional LoRA."""

    preset: str = field(default="llama", metadata={"help": f"Architecture preset: {', '.join(PRESETS)}."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'Config fields over the preset (or the loaded model), "k=v,k=v", e.g. '
                          '"num_hidden_layers=4,hidden_size=256,rope_parameters={\\"rope_type\\":\\"default\\",\\"rope_theta\\":10000}".'},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "An ArchLM folder to fine-tune (instead of --preset)."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer folder or name. Default: the model's, or one trained on the training data."}
    )
    tokenizer_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of a tokenizer trained here."})
    tokenizer_train_mb: float = field(default=200.0, metadata={"help": "Train that tokenizer on at most this many MB of text."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, flex_attention."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype the weights are held in: float32 (full-precision weights; --bf16/--fp16 add mixed precision), "
                "bfloat16, or auto (a fine-tuned checkpoint's own). Default: float32, and with --lora_r the "
                "checkpoint's own (its frozen weights take no updates; PEFT keeps the adapters in float32)."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": 'Modules that get adapters, comma-separated, or "all-linear"; a mixture\'s expert stacks by their '
                                                              'names (gate_up_proj, up_proj, down_proj).'}
    )


@dataclass
class RunArguments:
    """How the run is measured and reported."""

    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak TFLOP/s of one device for MFU. Default: measured with a short matmul probe."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an --output_dir that holds a model or checkpoints (they are deleted)."}
    )
    sample_prompt: str = field(default="def ", metadata={"help": 'Prompt of the sample printed at the end ("" for none).'})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of that sample."})
    recipe: str | None = field(
        default=None, metadata={"help": "A measured set of training flags (archlm/recipes.py, docs/training.md): "
                                        "speedrun. Flags given explicitly win over it."}
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "A wall-clock budget: the run measures its pace after warm-up and plans the "
                                        "steps (evaluations and the final save included) and the learning-rate "
                                        "schedule to end within it; instead of --max_steps / --num_train_epochs."}
    )
    expert_parallel_size: int = field(
        default=1, metadata={"help": "Processes that split a mixture of experts' experts between them (1: every "
                                     "process holds every expert). Only 1 is offered: see docs/distributed.md."}
    )


MUON = "muon"


@dataclass
class ArchLMTrainingArguments(TrainingArguments):
    """TrainingArguments whose `optim` also takes "muon" (archlm/optim.py: Muon for the decoder layers' weight
    matrices, AdamW for the rest), which transformers' list of optimizers does not have."""

    optim: str = field(
        default=TrainingArguments.__dataclass_fields__["optim"].default,
        metadata={"help": "The optimizer: muon (Muon for hidden matrices + AdamW), or one of transformers' "
                          "OptimizerNames (adamw_torch, adamw_torch_fused, adafactor, ...)."},
    )

    def __post_init__(self):
        muon = self.optim == MUON
        if muon:  # transformers checks the name against its own list; the AdamW half stands in for that check
            self.optim = "adamw_torch"
        super().__post_init__()
        if muon:
            self.optim = MUON


def check_optimizer(args: TrainingArguments) -> None:
    """Muon orthogonalises whole matrices: where each process holds flat shards of them it cannot."""
    if args.optim != MUON:
        return
    if args.deepspeed:
        raise ValueError("--optim muon needs whole weight matrices, and DeepSpeed ZeRO hands the optimizer flat "
                         "shards of them: drop --deepspeed (DDP works: each process holds whole matrices) or use an "
                         "AdamW --optim.")
    if args.fsdp:
        raise ValueError("--optim muon needs whole weight matrices, and FSDP shards them between processes: drop "
                         "--fsdp (DDP works) or use an AdamW --optim.")


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
def check_arguments(model_args: ModelArguments, run_args: RunArguments, training_args: TrainingArguments,
                    streaming: bool) -> None:
    """Flag combinations that cannot work, found before anything is loaded."""
    if model_args.model_name_or_path is None and model_args.preset not in PRESETS:
        raise ValueError(f"--preset {model_args.preset!r} is unknown; presets: {', '.join(PRESETS)}.")
    if streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming reads data of unknown length, so it needs --max_steps (a positive number of steps).")
    if model_args.dtype is not None and model_args.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"--dtype {model_args.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)} (float16 weights "
                         "would train without loss scaling: use --fp16 mixed precision on a GPU).")
    if model_args.lora_r < 0:
        raise ValueError(f"--lora_r must be >= 0, got {model_args.lora_r}.")
    if model_args.lora_r and model_args.model_name_or_path is None:
        raise ValueError("--lora_r adapts a trained model: pass --model_name_or_path (an ArchLM folder) to fine-tune.")
    if run_args.peak_tflops is not None and run_args.peak_tflops <= 0:
        raise ValueError(f"--peak_tflops must be positive, got {run_args.peak_tflops}.")
    if model_args.model_name_or_path and not os.path.isdir(model_args.model_name_or_path):
        raise ValueError(f"--model_name_or_path {model_args.model_name_or_path!r} is not a folder.")
    if model_args.tokenizer_name and missing_local_folder(model_args.tokenizer_name):
        raise ValueError(f"--tokenizer_name {model_args.tokenizer_name!r}: no such folder.")
    if training_args.fp16 and training_args.use_cpu:
        raise ValueError("--fp16 mixed precision needs a GPU: on a CPU the Trainer would train in float32 and say "
                         "nothing. Use --bf16 (CPU autocast; its matmuls may be slower than float32's there) or drop "
                         "--fp16.")
    check_optimizer(training_args)
    if run_args.max_train_seconds is not None:
        check_time_budget(run_args.max_train_seconds, training_args)
    if run_args.expert_parallel_size != 1:
        gpus = torch.cuda.device_count()
        raise ValueError(
            f"--expert_parallel_size {run_args.expert_parallel_size}: expert parallelism exchanges tokens between "
            f"GPUs with an all-to-all (NCCL), and this machine has {gpus} GPU(s); train.py does not offer it. Train a "
            "mixture of experts with DDP, DeepSpeed ZeRO-2/3 or FSDP instead (each process holds every expert, or a "
            "shard of each); docs/distributed.md says how expert parallelism would be configured on GPUs."
        )


def check_evaluation(validation, args: TrainingArguments) -> None:
    """Flags that evaluate, with no validation data to evaluate on (the Trainer would refuse them after packing)."""
    evaluating = [flag for flag, on in (("--eval_strategy " + str(getattr(args.eval_strategy, "value", args.eval_strategy)),
                                         args.eval_strategy != "no"),
                                        ("--load_best_model_at_end", args.load_best_model_at_end)) if on]
    if validation is None and evaluating:
        raise ValueError(f"{' and '.join(evaluating)} need validation data, and there is none: give --validation_file "
                         "or a --validation_split_percentage above 0.")


def check_time_budget(seconds: float, args: TrainingArguments) -> None:
    if not seconds > 0:
        raise ValueError(f"--max_train_seconds must be a positive number of seconds, got {seconds}.")
    if args.max_steps > 0:
        raise ValueError(f"--max_train_seconds {seconds:g} plans the number of steps itself: drop --max_steps "
                         f"{args.max_steps}.")
    check_schedule(args)
    for flag in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(args, flag)
        if value is not None and 0 < value < 1:
            raise ValueError(f"--{flag} {value} is a fraction of the run's steps, which --max_train_seconds does not "
                             f"know in advance: give a whole number of steps.")


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: a path, or "true"/"latest" for the newest one in --output_dir."""
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", "no", ""):
        return None
    if str(resume).lower() in ("true", "latest", "last"):
        checkpoint = latest_complete_checkpoint(training_args.output_dir, resume)
    elif not is_complete_checkpoint(resume):
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint folder (no readable "
                         "trainer_state.json: not a checkpoint, or the run was stopped while saving it).")
    else:
        checkpoint = resume
    deepspeed_states = sorted(Path(checkpoint).glob("global_step*"))
    if deepspeed_states and not getattr(training_args, "deepspeed", None) and \
            not os.path.isfile(os.path.join(checkpoint, "optimizer.pt")):
        # the Trainer would look for optimizer.pt only, find none, and go on with fresh optimizer moments
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} was saved by DeepSpeed (its optimizer state is in "
                         f"{deepspeed_states[0].name}/): resume it with the run's --deepspeed config.")
    return checkpoint


def is_complete_checkpoint(folder: str) -> bool:
    """The Trainer writes trainer_state.json last, after the weights, optimizer, scheduler and RNG states: a folder
    without a readable one was cut off while saving."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def latest_complete_checkpoint(output_dir: str, flag: str) -> str:
    """The newest checkpoint-N in `output_dir` that was saved completely; newer, cut-off ones are named and skipped
    (a run killed while saving leaves one behind)."""
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps[int(match.group(1))] = os.path.join(output_dir, name)
    if not steps:
        raise ValueError(f"--resume_from_checkpoint {flag}: no checkpoint-* folder in {output_dir!r}.")
    incomplete = []
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            if incomplete:
                logger.warning("Skipping incomplete checkpoint(s) %s (no readable trainer_state.json: the run stopped "
                               "while saving); resuming from %s.", ", ".join(incomplete), steps[step])
            return steps[step]
        incomplete.append(steps[step])
    raise ValueError(f"--resume_from_checkpoint {flag}: no complete checkpoint in {output_dir!r} (none of "
                     f"{', '.join(incomplete)} has a readable trainer_state.json).")


# config fields that do not change what a checkpoint's weights mean
RESUME_IGNORED_FIELDS = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
                         "_name_or_path", "output_attentions", "output_hidden_states", "return_dict"}


def check_resume_config(checkpoint: str, config: ArchLMConfig, ignored=()) -> None:
    """A resumed run must rebuild the checkpoint's architecture: the flags make the model, the checkpoint only
    fills its weights, so a forgotten --preset or override would otherwise train another model (silently, when
    the shapes happen to fit: a sliding window or rope base differ). `ignored`: fields the run sets itself (a
    recipe's fitted dropout, which its checkpoints' configs record)."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return  # a LoRA checkpoint holds the adapter only; its base comes from --model_name_or_path
    saved, built = ArchLMConfig.from_pretrained(checkpoint).to_dict(), config.to_dict()
    differ = sorted(key for key in set(saved) | set(built)
                    if key not in RESUME_IGNORED_FIELDS and key not in ignored and saved.get(key) != built.get(key))
    if differ:
        shown = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, these flags {built.get(key)!r}" for key in differ[:8])
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} holds another architecture than the flags build ({shown}"
            f"{'; ...' if len(differ) > 8 else ''}). Resume with the original run's --preset / --config_overrides "
            "(its config.json is in the checkpoint), or start a new run in another --output_dir."
        )


LORA_FLAGS = {"r": "--lora_r", "lora_alpha": "--lora_alpha", "target_modules": "--lora_target_modules",
              "target_parameters": "--lora_target_modules", "lora_dropout": "--lora_dropout"}


def check_resume_adapter(checkpoint: str, model) -> None:
    """A resumed LoRA run must rebuild the checkpoint's adapters (its config.json-less checkpoints hold only them):
    other ranks or targets fail deep in loading with a tensor-size table, or load an optimizer state that belongs to
    other tensors."""
    path = os.path.join(checkpoint, "adapter_config.json")
    if not os.path.isfile(path) or not hasattr(model, "peft_config"):
        return
    saved, built = json.loads(Path(path).read_text(encoding="utf-8")), model.peft_config["default"].to_dict()

    def value(config: dict, key: str):
        item = config.get(key)
        return sorted(item) if isinstance(item, (list, set, tuple)) else item

    differ = [key for key in LORA_FLAGS if value(saved, key) != value(built, key)]
    if differ:
        shown = "; ".join(f"{key} ({LORA_FLAGS[key]}): checkpoint {value(saved, key)!r}, these flags "
                          f"{value(built, key)!r}" for key in differ)
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} holds other LoRA adapters than the flags build "
                         f"({shown}). Resume with the original run's LoRA flags, or start a new run in another "
                         "--output_dir.")


def check_output_dir(output_dir: str, checkpoint: str | None, overwrite: bool) -> None:
    """A new run refuses a folder that holds a model or checkpoints, unless --overwrite_output_dir."""
    if checkpoint is not None or overwrite or not os.path.isdir(output_dir):
        return
    previous = sorted(name for name in os.listdir(output_dir) if name in RUN_OUTPUTS or name.startswith(PREFIX_CHECKPOINT_DIR))
    if previous:
        raise ValueError(
            f"--output_dir {output_dir!r} already holds a run ({', '.join(previous[:4])}"
            f"{', ...' if len(previous) > 4 else ''}): pass --resume_from_checkpoint to continue it, "
            "--overwrite_output_dir to start over there, or another --output_dir."
        )


def clear_output_dir(output_dir: str) -> None:
    """Removes a previous run's model files and checkpoints (not other files), for --overwrite_output_dir."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name in RUN_OUTPUTS or re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# ------------------------------------------------------------------------------------------------
# Tokenizer and model
# ------------------------------------------------------------------------------------------------
def _has_tokenizer(folder: str | None) -> bool:
    return folder is not None and os.path.isfile(os.path.join(folder, "tokenizer_config.json"))


def load_tokenizer(model_args: ModelArguments, checkpoint: str | None):
    """(tokenizer, where it came from), or None where one is to be trained. Order: --tokenizer_name, the checkpoint
    being resumed, the model being fine-tuned."""
    for folder, source in ((model_args.tokenizer_name, "--tokenizer_name"), (checkpoint, "the checkpoint"),
                           (model_args.model_name_or_path, "--model_name_or_path")):
        if folder is None or (source != "--tokenizer_name" and not _has_tokenizer(folder)):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as error:  # noqa: BLE001 - a missing or broken tokenizer: one message naming it
            raise ValueError(f"The tokenizer of {source} {folder!r} could not be loaded: {error}") from error
        return tokenizer, f"{folder} ({source})"
    if model_args.model_name_or_path is not None:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path!r} holds no tokenizer: pass --tokenizer_name "
            "(the tokenizer the model was trained with)."
        )
    return None


def train_tokenizer_on(model_args: ModelArguments, train_records):
    """(tokenizer, where it came from): a byte-level BPE trained on the training text (saved with the model later)."""
    logger.info("Training a %d-token byte-level BPE tokenizer on the training text", model_args.tokenizer_vocab_size)
    tokenizer = train_tokenizer(iter_texts(train_records, model_args.tokenizer_train_mb * 1e6), model_args.tokenizer_vocab_size)
    return tokenizer, f"byte-level BPE trained on the training data ({len(tokenizer):,} tokens)"


def chat_template_of(loaded) -> ChatTemplate:
    """How conversations in the data are written out: by the given tokenizer's chat template, else by ArchLM's
    ChatML, which the tokenizer then trained carries."""
    return DEFAULT_CHAT if loaded is None else ChatTemplate.of(*loaded)


def build_config(model_args: ModelArguments, overrides: dict, tokenizer=None) -> ArchLMConfig:
    """The model's config: the preset or the loaded model's, then the tokenizer's vocabulary and special ids
    (when given and not overridden), then --config_overrides. A tokenizer larger than the vocabulary is refused."""
    if model_args.model_name_or_path is not None:
        loaded = AutoConfig.from_pretrained(model_args.model_name_or_path)
        if not isinstance(loaded, ArchLMConfig):
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path!r} is a {type(loaded).__name__}, not an ArchLM "
                "model: convert it first (python -m archlm.convert --from-transformers SRC OUT), then fine-tune OUT.")
        # built anew from the saved fields and the overrides, so that every check a preset's config gets runs
        # (from_pretrained(**overrides) sets them after the checks: a layer count or a rope dict it would refuse)
        config = ArchLMConfig.from_dict({**loaded.to_dict(), **overrides})
        # (a sigmoid router keeps its biases, fixed, at rate 0)
        if overrides.get("router_bias_update_rate", None) == 0 and config.router_scoring == "softmax" and \
                loaded.router_bias_update_rate and not config.router_choice_bias:
            # the model routes with its learned biases; a model without them would route (and compute) differently
            raise ValueError(f"--config_overrides router_bias_update_rate=0 would drop the routing biases "
                             f"(e_score_correction_bias) {model_args.model_name_or_path!r} learned and change its "
                             "routing: keep the rate (fine-tuning moves them on), keep them fixed with "
                             "router_choice_bias=true, or train a new model.")
    else:
        from_tokenizer = {}
        if tokenizer is not None:
            eos = tokenizer.eos_token_id
            from_tokenizer = dict(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        config = ArchLMConfig.from_preset(model_args.preset, **{**from_tokenizer, **overrides})
    if config.num_experts and "output_router_logits" not in overrides and not config.output_router_logits:
        # transformers adds the load-balancing loss only with router logits on; without it the routers collapse
        logger.info("Mixture of experts: training with the load-balancing loss (output_router_logits=True, "
                    "router_aux_loss_coef=%s)", config.router_aux_loss_coef)
        config.output_router_logits = True
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer):,} tokens but the model's vocab_size is {config.vocab_size:,}: ids past "
            "the vocabulary would crash training. Use a larger vocab_size (--config_overrides vocab_size=...) or a "
            "smaller tokenizer."
        )
    return config


def check_block_size(block_size: int, config: ArchLMConfig) -> None:
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {block_size} is larger than the model can take (max_position_embeddings="
            f"{config.max_position_embeddings}): use a smaller --block_size (or --block_size_schedule), or "
            "--config_overrides max_position_embeddings=... for a new model."
        )


def build_model(model_args: ModelArguments, config: ArchLMConfig, tokenizer):
    """A new model from `config`, or the fine-tuned one from its folder; generation settings from the tokenizer."""
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path is not None:
        refusal = (f"--config_overrides {model_args.config_overrides!r} change %s the weights in --model_name_or_path "
                   f"{model_args.model_name_or_path!r}: fine-tuning keeps the architecture; override only fields "
                   "that leave the weights alone (dropout, rope scaling, window, ...).")
        try:
            # float32 unless asked otherwise: transformers loads a checkpoint in its own dtype, and in bfloat16 the
            # optimizer's small updates round away (a fine-tuned norm did not move in 10 steps)
            dtype = model_args.dtype or ("auto" if model_args.lora_r else "float32")
            model, loading = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                                  output_loading_info=True, dtype=dtype, **kwargs)
        except RuntimeError as error:
            if "mismatch" not in str(error):
                raise
            # transformers' message is a table of tensors; the cause is the overrides
            raise ValueError(refusal % "the shapes of") from None
        changed = sorted(loading.get("missing_keys", [])) + sorted(loading.get("unexpected_keys", []))
        if model_args.config_overrides and changed:  # (fewer layers, a bias turned on: weights dropped or made up)
            raise ValueError(refusal % "which tensors make up" + f" ({len(changed)} differ, e.g. {changed[0]!r})")
    else:
        dtype = torch.float32 if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        model = ArchLMForCausalLM._from_config(config, dtype=dtype, **kwargs)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model


def stop_token_ids(tokenizer, config: ArchLMConfig) -> int | list[int] | None:
    """What generation stops at: the end-of-document token and, where the tokenizer's chat template closes each turn
    with ChatML's <|im_end|> (ArchLM's tokenizer, Qwen's), that token too, as Qwen's generation configs list it: a
    chat fine-tune then stops at the end of its answer instead of running on to max_new_tokens."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    turn_end = tokenizer.convert_tokens_to_ids(IM_END_TOKEN) if isinstance(template, str) and IM_END_TOKEN in template \
        else None
    if eos is None or turn_end is None or turn_end in (eos, tokenizer.unk_token_id) or turn_end >= config.vocab_size:
        return eos
    return [eos, turn_end]


def apply_lora(model, model_args: ModelArguments):
    """Wraps the model with LoRA adapters on `--lora_target_modules` (PEFT); only the adapters train.

    A mixture's experts are stacked parameters (E, out, in), not nn.Linear modules: their names in the list
    (gate_up_proj, up_proj, down_proj) become PEFT's `target_parameters`, one adapter per stack; the same names
    still reach any dense layers' nn.Linear modules."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules.strip()
    target_modules = targets if targets == "all-linear" else [name.strip() for name in targets.split(",") if name.strip()]
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    stacks = {name.rsplit(".", 1)[-1] for name, parameter in model.named_parameters()
              if ".experts." in f".{name}" and parameter.dim() == 3}
    target_parameters = []
    if isinstance(target_modules, list):
        unknown = [name for name in target_modules if name not in modules and name not in stacks]
        if unknown:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
            experts = f"; its experts' stacked weights are {sorted(stacks)}" if stacks else ""
            raise ValueError(f"--lora_target_modules {unknown} are not modules of this model; its linear layers are "
                             f"{linear}{experts}.")
        target_parameters = [f"experts.{name}" for name in target_modules if name in stacks]
        target_modules = [name for name in target_modules if name in modules]
        if target_parameters and model_args.lora_dropout:
            raise ValueError(f"--lora_dropout {model_args.lora_dropout}: PEFT has no dropout for adapters on the experts' "
                             f"stacked weights ({', '.join(name.split('.')[-1] for name in target_parameters)}); "
                             "pass --lora_dropout 0 or leave them out of --lora_target_modules.")
    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha if model_args.lora_alpha is not None else 2 * model_args.lora_r,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def connect_deepspeed(training_args: TrainingArguments) -> None:
    """With --deepspeed on CPU (`use_cpu`), the Trainer starts torch.distributed (gloo) but not DeepSpeed's own
    communication layer, and ZeRO-3's `zero.Init` (which partitions the model while it is built) then reads a world
    size of 1 and fails the "auto" batch-size check. This joins DeepSpeed to the process group already there; on
    GPUs accelerate has done it already and this does nothing."""
    if training_args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """The model's parameters (LoRA's adapters, which PEFT puts inside the model's modules, apart), or the trainable
    ones (the adapters, in a LoRA run); also while ZeRO-3 holds only this process's shard of each (its full size is
    then `ds_numel`; `numel()` is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()
               if (p.requires_grad if trainable_only else ".lora_" not in name))


def base_model(model) -> ArchLMForCausalLM:
    """The ArchLM model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------------
# Steps and perplexity (the throughput: archlm/throughput.py)
# ------------------------------------------------------------------------------------------------
def rows_per_step(args: TrainingArguments) -> int:
    """Blocks of training data per optimizer step, over every process."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def planned_steps(train_blocks: int | None, args: TrainingArguments) -> tuple[int | None, int]:
    """(optimizer steps per epoch, total steps), as the Trainer will compute them."""
    if train_blocks is None:  # streaming: unknown length
        return None, args.max_steps
    rows_per_batch = args.per_device_train_batch_size * max(args.world_size, 1)
    batches = train_blocks // rows_per_batch if args.dataloader_drop_last else math.ceil(train_blocks / rows_per_batch)
    steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# ------------------------------------------------------------------------------------------------
# Trainer and callbacks
# ------------------------------------------------------------------------------------------------
def split_rows(batch: dict, block_size: int) -> dict:
    """(B, L) -> (B * L / block_size, block_size) for every tensor: a block cut into consecutive shorter rows."""
    return {key: value.reshape(-1, block_size) if torch.is_tensor(value) and value.dim() == 2 else value
            for key, value in batch.items()}


class NonFiniteLossError(RuntimeError):
    """A training step's loss or gradients are NaN or infinite: raised before that step's optimizer update, so the
    weights in memory and every checkpoint saved so far are still those of the last good step."""

    def __init__(self, step: int, what: str, value: float):
        self.step = step
        super().__init__(f"the {what} of step {step} is {value} (a learning rate far too high?)")


class _HistoryOnly(TrainerCallback):
    """Puts values in the log history (training_log.json, the checkpoints' trainer_state.json) that the other
    callbacks do not get in their `logs`: the tokens routed to each expert, layers x experts numbers, would fill the
    console at every log (6,144 a line for a 48 x 128 mixture), and TensorBoard, MLflow and the like log scalars only
    (TensorBoard warned at every log that it dropped the list). ArchLMTrainer runs it before every other callback."""

    def __init__(self):
        self.pending = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer.log appended a copy of `logs` to the history, then calls the callbacks
        pending = {key: value for key, value in self.pending.items() if value is not None}
        if pending and state.log_history:
            state.log_history[-1].update(pending)
        self.pending = {}


class ArchLMTrainer(Trainer):
    """The Trainer, plus a sequence-length curriculum and ArchLM's metrics in every log.

    Curriculum: the data is packed at the largest block size; at each optimizer step the batch is cut into rows
    of the size the schedule gives for `state.global_step`. Tokens per step stay the same, every token is still
    seen once per epoch, and because the size depends only on the step, a resumed run follows the schedule
    exactly where the interrupted one would have.
    """

    def __init__(self, *args, block_size_schedule: list[tuple[int, int]] | None = None,
                 time_budget: TimeBudget | None = None, characters_per_token: float | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_optimizer(training_args)
        if training_args is not None and training_args.torch_compile:
            # --torch_compile compiles regions (accelerate's regional compilation): each decoder layer is compiled
            # once and the compiled code serves every layer, and the small modules around them on their own,
            # instead of one graph of the whole model: the compile time of about one layer (33 s for the demo's
            # model here); the fused loss stays outside the compiled graphs (docs/performance.md has the speed).
            # ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=0 compiles the whole model instead.
            os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")
        super().__init__(*args, **kwargs)
        self._history_only = _HistoryOnly()
        self.callback_handler.callbacks.insert(0, self._history_only)  # first: before any callback reads the history
        self.block_size_schedule = block_size_schedule
        self.time_budget = time_budget
        self.characters_per_token = characters_per_token  # of the validation text: evaluations report nats/char
        if time_budget is not None:
            time_budget.progress_callbacks = [callback for callback in self.callback_handler.callbacks
                                              if isinstance(callback, ProgressCallback)]
            self.add_callback(time_budget)
        # not under LoRA (a PEFT wrapper): the routing biases belong to the frozen base, and an adapter saved without
        # them (its checkpoints too) would not reproduce the model it trained
        if getattr(getattr(self.model, "config", None), "router_bias_update_rate", 0) and base_model(self.model) is self.model \
                and not any(isinstance(callback, RouterBiasCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(RouterBiasCallback(self.model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # evaluation reports the cross-entropy alone (eval_loss, perplexity, nats/char compare across architectures):
        # without router logits there is no load-balancing or router z-loss term in it. Training steps skip the check.
        if not model.training and getattr(getattr(base_model(self.accelerator.unwrap_model(model)), "config", None),
                                          "num_experts", None):
            inputs = {**inputs, "output_router_logits": False}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.args.optim == MUON:
            model = self.model if model is None else model
            no_decay = {name for name, _ in model.named_parameters()} - set(self.get_decay_parameter_names(model))
            self.optimizer = muon_optimizer(model, self.args, no_decay)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_budget is not None and self.lr_scheduler is None:
            # the schedule follows the plan of --max_train_seconds, not the provisional max_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer if optimizer is None else optimizer, planned_schedule(self.args, self.time_budget))
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # checked before the optimizer step, so nothing non-finite reaches the weights (a finite loss can still
        # have overflowing gradients). DeepSpeed keeps its gradients out of .grad: there the loss is checked.
        # The gradients once a step, at its last micro-batch: a micro-batch's non-finite gradient stays non-finite
        # in the accumulated sum, and reading every gradient at every micro-batch cost a pass over the weights each.
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self.state.global_step + 1, "loss", loss.item())
        grads = [param.grad for param in model.parameters()
                 if param.grad is not None] if self.accelerator.sync_gradients else []
        if grads and not torch.isfinite(norm := torch.nn.utils.get_total_norm(grads)):
            raise NonFiniteLossError(self.state.global_step + 1, "gradient norm", norm.item())
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.block_size_schedule:
            block_size = block_size_at(self.block_size_schedule, self.state.global_step)
            epoch_iterator = (split_rows(batch, block_size) for batch in epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThroughputCallback):
                if callback.wall_start is not None:  # every log: loss-vs-time plots
                    logs["elapsed_seconds"] = round(time.perf_counter() - callback.wall_start, 2)
                if "loss" in logs:
                    logs.update(callback.metrics(self.args, self.state))
            elif isinstance(callback, RouterStatsCallback) and "loss" in logs:
                metrics = callback.metrics()
                self._history_only.pending["expert_tokens"] = metrics.pop("expert_tokens", None)
                logs.update(metrics)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            if self.characters_per_token:
                logs["eval_nats_per_char"] = logs["eval_loss"] / self.characters_per_token
        super().log(logs, start_time)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """Writes to a temporary file next to `path`, then renames it over `path`: a reader sees the old file or
    the new one, never half of one, even if the process is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(_json_safe(data), file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class TrainingLogCallback(TrainerCallback):
    """Keeps `training_log.json` in the output folder: the run's header (config, architecture name, data,
    parameters, ...), every logged step, every evaluation, and a summary once the run has finished.

    Built from `state.log_history`, which checkpoints carry, so a resumed run's log holds the steps before the
    interruption too (and nothing from steps the resumed run redid).

    Every write is the whole document (atomic: a reader never sees half of one), so its cost grows with the run:
    6 ms at 400 logged steps, 0.5 s at 40,000. Written at every log, it slowed a tiny model's steps by half by
    step 400 (a budgeted run then fell behind its plan and stopped short of the end of its schedule). So the file
    is written at every evaluation, before every checkpoint save and at the end, and between them no more often
    than keeps the writes under WRITE_SHARE of the run's time (every log while writing is cheap).
    """

    WRITE_SHARE = 0.02

    def __init__(self, output_dir: str, header: dict):
        self.path = Path(output_dir) / TRAINING_LOG_NAME
        self.header = header
        self.summary = None
        self.stopped = None  # why the run stopped early, when it did
        self.next_write = 0.0  # time.perf_counter() after which a log is written again
        self.began = False  # training began in this process (a resume that fails before it leaves the log alone)

    def document(self, state) -> dict:
        steps, evals = [], []
        for entry in state.log_history:
            if "loss" in entry:
                steps.append(entry)
            elif "eval_loss" in entry:
                evals.append({**entry, "perplexity": entry.get("eval_perplexity", perplexity(entry["eval_loss"]))})
        status = "finished" if self.summary is not None else "stopped" if self.stopped else "running"
        document = {**self.header, "status": status, "steps": steps, "evals": evals, "summary": self.summary}
        return {**document, "stopped": self.stopped} if self.stopped else document

    def write(self, args, state) -> None:
        if state.is_world_process_zero:
            start = time.perf_counter()
            write_json_atomically(self.path, self.document(state))
            end = time.perf_counter()
            self.next_write = end + (end - start) / self.WRITE_SHARE

    def on_log(self, args, state, control, logs=None, **kwargs):
        # a checkpoint about to be saved finds the log in step with it: a run killed while saving keeps every
        # step up to that checkpoint in the file (DefaultFlowCallback sets should_save before the Trainer logs)
        due = (control is None or control.should_save or control.should_training_stop or "eval_loss" in (logs or {})
               or time.perf_counter() >= self.next_write)
        if due:
            self.write(args, state)

    def plot(self, state) -> None:
        """`loss_curve.png` beside the log (train and eval loss, learning rate), once the run has ended: drawing it
        at every write would cost more than the log itself. A figure that fails is reported, not raised: the run's
        weights and log are what matter."""
        if state.is_world_process_zero:
            try:
                plot_training_log(self.document(state), self.path.with_name(LOSS_CURVE_NAME))
            except Exception as error:  # noqa: BLE001 (matplotlib's errors have no common base)
                logger.warning("could not draw %s: %s", LOSS_CURVE_NAME, error)

    def finish(self, args, state, summary: dict) -> None:
        self.summary = summary
        self.write(args, state)
        self.plot(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = True
        if state.is_world_process_zero:  # a run killed while writing its log left its temporary file
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def stop(self, args, state, reason: str) -> None:
        """The run stopped early: the log says why. Before training began (a checkpoint that would not load),
        the log on disk is the previous run's, finished or not, and stays as it is."""
        if not self.began:
            return
        self.stopped = reason
        self.write(args, state)
        self.plot(state)


def mean_logged_loss(steps: list[dict]) -> float:
    """The mean training loss over every step of the run, from the logged losses (each the mean of the steps since
    the previous log). The Trainer's own `train_loss` covers only the steps of this process: after a resume, the
    second half of the run."""
    total, previous = 0.0, 0
    for entry in steps:
        total += entry["loss"] * (entry["step"] - previous)
        previous = entry["step"]
    return total / previous if previous else steps[-1]["loss"]


def run_summary(state, throughput: ThroughputCallback, device: torch.device) -> dict:
    """The numbers a comparison table needs, from the log history and the throughput callback."""
    steps = [entry for entry in state.log_history if "loss" in entry]
    evals = [entry for entry in state.log_history if "eval_loss" in entry]
    end = next((entry for entry in reversed(state.log_history) if "train_runtime" in entry), {})
    rates = throughput.intervals
    tokens_per_second = sum(rate for rate, _ in rates) / len(rates) if rates else None
    mfu = throughput.mean_mfu()
    summary = {
        "global_step": state.global_step,
        "tokens_seen": state.num_input_tokens_seen,
        "train_loss": mean_logged_loss(steps) if steps else end.get("train_loss"),
        "final_loss": steps[-1]["loss"] if steps else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "perplexity": perplexity(evals[-1]["eval_loss"]) if evals else None,
        "eval_nats_per_char": evals[-1].get("eval_nats_per_char") if evals else None,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu,
        "peak_tflops": throughput.peak_flops / 1e12,  # what MFU is measured against: the best probe of the run
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "train_runtime_s": end.get("train_runtime"),
        # the first step of a run pays for torch.compile's compilation: the two together give its cost
        "first_step_seconds": throughput.step_seconds[0] if throughput.step_seconds else None,
        "median_step_seconds": statistics.median(throughput.step_seconds[1:]) if len(throughput.step_seconds) > 1
        else None,
    }
    return summary


# ------------------------------------------------------------------------------------------------
# Reporting and the end of a run
# ------------------------------------------------------------------------------------------------
def format_report(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key.ljust(width)}  {value}" for key, value in rows)


def save_model_folder(trainer: Trainer, tokenizer, output_dir: str, lora: bool) -> None:
    """The output folder: weights (LoRA merged into them, with the adapter alone in `adapter/`), config.json with
    auto_map, the remote-code files, the tokenizer and generation_config.json."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model.save_pretrained(os.path.join(output_dir, ADAPTER_DIR_NAME))
        model = model.merge_and_unload()
        trainer.model = model
    model.config.use_cache = True  # the Trainer turns it off for training; generation wants it
    # training turns router logits on for the load-balancing loss; inference has no use for them (each decoding step
    # would compute the loss), and fine-tuning turns them on again
    model.config.output_router_logits = False
    if lora:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)


def needs_synced_generation(model) -> bool:
    """Whether every process must take part in generation: under ZeRO-3 or FSDP each forward gathers weights
    that are sharded across the processes, so one process generating alone would wait for the others forever."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)


def check_launch(trainer: Trainer) -> None:
    """Refuses a launch whose sharding the Trainer's accelerator silently dropped: accelerate 1.15 turns an FSDP
    launch (`accelerate launch` with distributed_type FSDP) into plain DDP when the processes run on CPU (its
    MULTI_CPU mode has no FSDP), and the run would otherwise train unsharded without a word."""
    wanted = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else None
    wanted = "DEEPSPEED" if trainer.args.deepspeed else wanted
    got = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    if wanted is not None and got != wanted:
        raise ValueError(
            f"The launcher asked for {wanted} but the Trainer runs {got} ({trainer.args.world_size} processes on "
            f"{trainer.args.device.type}). accelerate runs FSDP only on GPUs (or other accelerators); on CPU use "
            "DeepSpeed (--deepspeed examples/deepspeed/zero3.json) or DDP (examples/accelerate/ddp.yaml)."
        )


def distributed_summary(trainer: Trainer) -> dict:
    """How the run was spread: the number of processes, accelerate's distributed type and the wrapper the
    Trainer trained through (DistributedDataParallel, DeepSpeedEngine, an FSDP module, or the model itself when
    nothing wrapped it). A misconfigured launcher fails silently (independent single processes), so this is logged."""
    return {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "wrapped_model": type(trainer.model_wrapped).__name__,
    }


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, synced_gpus: bool = False) -> str:
    """A sampled continuation of `prompt` (temperature 0.8, top-k 40), decoded with the prompt. With sharded
    weights (ZeRO-3, FSDP) every process must call this with `synced_gpus=True`."""
    model.eval()
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
                            synced_gpus=synced_gpus)
    return tokenizer.decode(output[0], skip_special_tokens=True)
