"""The main job: train or fine-tune an ArchLM model with the transformers Trainer and write a complete model folder.

    python -m archlm.train --preset llama \
        --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2" \
        --block_size 256 --max_steps 300 --learning_rate 1e-3 --output_dir runs/llama-stdlib

With no data flags it trains on the source of Python's standard library (offline, on every machine). Data:
--dataset_name/--dataset_config_name, or --train_file/--validation_file (.txt, .json/.jsonl, .csv, .parquet),
--text_column, --streaming (needs --max_steps). A tokenizer is trained on the training data unless
--tokenizer_name is given (or the model being fine-tuned has one). Fine-tune with --model_name_or_path FOLDER,
optionally with LoRA (--lora_r 8). Resume with --resume_from_checkpoint PATH (or "latest"). Every TrainingArguments
flag works (--per_device_train_batch_size, --eval_strategy, --save_steps, --report_to tensorboard, --deepspeed, ...).

The output folder holds model.safetensors, config.json (with auto_map), the remote-code .py files, the tokenizer,
generation_config.json and training_log.json; it loads with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
"""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, PreTrainedTokenizerBase, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_callback import TrainerState

from . import ArchLMConfig, parse_config_overrides
from .budget import PROVISIONAL_STEPS, TimeBudget
from .recipes import RepeatDropout, apply_recipe
from .data import (
    DataArguments,
    PackedData,
    RawData,
    block_size_at,
    characters_per_token,
    check_data_arguments,
    load_raw_data,
    pack_datasets,
    parse_block_size_schedule,
)
from .training import (
    SETUP_ERRORS,
    ArchLMTrainer,
    ArchLMTrainingArguments,
    NonFiniteLossError,
    ModelArguments,
    RouterStatsCallback,
    RunArguments,
    ThroughputCallback,
    TrainingLogCallback,
    apply_lora,
    base_model,
    build_config,
    build_model,
    chat_template_of,
    check_resume_adapter,
    check_resume_config,
    check_arguments,
    check_block_size,
    check_evaluation,
    check_launch,
    check_output_dir,
    clear_output_dir,
    connect_deepspeed,
    count_parameters,
    distributed_summary,
    format_report,
    load_tokenizer,
    measure_peak_tflops,
    needs_synced_generation,
    perplexity,
    planned_steps,
    resolve_checkpoint,
    rows_per_step,
    run_summary,
    sample,
    save_model_folder,
    train_tokenizer_on,
)

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, ArchLMTrainingArguments))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    parser.set_defaults(
        output_dir="runs/archlm",
        logging_steps=10,
        use_cpu=not has_accelerator,  # so torchrun / accelerate launch also work on a CPU-only machine
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv, recipe = apply_recipe(argv)
    except ValueError as error:
        parser.error(str(error))
    model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(argv)
    run_args.recipe_record = recipe  # what --recipe chose, for training_log.json
    if not any(arg.split("=")[0] == "--logging_steps" for arg in argv) and 0 < training_args.max_steps < training_args.logging_steps:
        training_args.logging_steps = training_args.max_steps  # a short run logs its last step (loss, tokens/s, MFU)
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # the count behind tokens/s and MFU
    return model_args, data_args, run_args, training_args


@dataclass
class Setup:
    """What `setup` checked and built: nothing of it has touched the output folder yet."""

    checkpoint: str | None  # the checkpoint to resume from
    config: ArchLMConfig
    tokenizer: PreTrainedTokenizerBase
    tokenizer_source: str
    model: torch.nn.Module  # an ArchLMForCausalLM, or a PEFT model around one
    raw: RawData
    data: PackedData
    schedule: list[tuple[int, int]]  # (first step, block size); one entry without a curriculum


def setup(model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments, training_args: TrainingArguments) -> Setup:
    """Everything that can fail on bad input, before anything is written: flags, data, tokenizer, model, blocks."""
    check_arguments(model_args, run_args, training_args, data_args.streaming)
    check_data_arguments(data_args)
    overrides = parse_config_overrides(model_args.config_overrides)
    schedule = parse_block_size_schedule(data_args.block_size_schedule) if data_args.block_size_schedule else None
    checkpoint = resolve_checkpoint(training_args)
    check_output_dir(training_args.output_dir, checkpoint, run_args.overwrite_output_dir)
    if run_args.max_train_seconds is not None:
        # the Trainer needs a positive max_steps; the budget plans the real one (a resumed run keeps its plan)
        training_args.max_steps = checkpoint_planned_steps(checkpoint) if checkpoint else PROVISIONAL_STEPS
    config = build_config(model_args, overrides)  # bad overrides fail here, before the data is read
    largest = max(size for _, size in schedule) if schedule else None
    block_size = data_args.block_size or largest or min(1024, config.max_position_embeddings)
    if largest is not None and largest != block_size:
        raise ValueError(f"--block_size {block_size} must equal the largest size of --block_size_schedule {data_args.block_size_schedule!r}.")
    check_block_size(block_size, config)

    given = load_tokenizer(model_args, checkpoint)
    raw = load_raw_data(data_args, chat_template_of(given))  # (conversations written out by its chat template)
    tokenizer, tokenizer_source = given or train_tokenizer_on(model_args, raw.train)
    config = build_config(model_args, overrides, tokenizer)
    if checkpoint is not None:  # (the dropout a recipe fits to the run is set again when training starts)
        recipe = getattr(run_args, "recipe_record", None) or {}
        check_resume_config(checkpoint, config, ignored=recipe.get("dropout", {}).get("fields", ()))
    set_seed(training_args.seed)
    model = build_model(model_args, config, tokenizer)
    if model_args.lora_r:
        model = apply_lora(model, model_args)
        if checkpoint is not None:
            check_resume_adapter(checkpoint, model)
    data = pack_datasets(raw, tokenizer, block_size, data_args)
    check_evaluation(data.validation, training_args)
    return Setup(checkpoint, config, tokenizer, tokenizer_source, model, raw, data, schedule or [(0, block_size)])


def checkpoint_planned_steps(checkpoint: str) -> int:
    """The number of steps a budgeted run had planned when it wrote `checkpoint`."""
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if state.max_steps >= PROVISIONAL_STEPS:
        raise ValueError(f"{checkpoint} was written before its run had planned its steps: resume it without "
                         "--max_train_seconds and with --max_steps.")
    return state.max_steps


def time_budget(run: Setup, run_args: RunArguments, training_args: TrainingArguments) -> TimeBudget | None:
    """The --max_train_seconds plan, with what it needs to know that only the setup knows."""
    if run_args.max_train_seconds is None:
        return None
    args, data = training_args, run.data
    tokens_per_step = rows_per_step(args) * data.block_size
    bytes_to_write = count_parameters(base_model(run.model)) * base_model(run.model).dtype.itemsize
    return TimeBudget(run_args.max_train_seconds, tokens_per_step,
                      eval_tokens=(data.validation_blocks or 0) * data.block_size,
                      final_eval=data.validation is not None,
                      reserve=1.0 + bytes_to_write / 100e6,  # the final save, at a slow disk's 100 MB/s
                      planned_steps=training_args.max_steps if run.checkpoint else None)


def repeat_dropout(run: Setup, recipe: dict | None, training_args: TrainingArguments) -> list[RepeatDropout]:
    """The recipe's dropout fitted to the epochs the run makes (none for streamed data: their count is unknown)."""
    if not recipe or "dropout" not in recipe or run.data.train_blocks is None:
        return []
    fit = recipe["dropout"]
    return [RepeatDropout(base_model(run.model), run.data.train_blocks, rows_per_step(training_args),
                          fit["per_epoch"], fit["max"], tuple(fit["fields"]))]


def startup_report(run: Setup, data_args: DataArguments, run_args: RunArguments, training_args: TrainingArguments,
                   peak: str) -> str:
    """Architecture, parameters, FLOPs/token, data size and the steps it makes."""
    args, data, model = training_args, run.data, base_model(run.model)
    steps_per_epoch, total_steps = planned_steps(data.train_blocks, args)
    budgeted = args.max_steps == PROVISIONAL_STEPS
    batch_rows = rows_per_step(args)
    trainable = count_parameters(run.model, trainable_only=True)
    if data.train_blocks is None:
        blocks, steps = "streamed", f"{total_steps:,} (--max_steps)"
    else:
        blocks = (f"{data.train_blocks:,} training ({data.train_blocks * data.block_size:,} tokens) / "
                  f"{data.validation_blocks or 0:,} validation")
        steps = (f"{total_steps:,} (--max_steps; {total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch:,} steps)"
                 if args.max_steps > 0 else
                 f"{total_steps:,} = {data.train_blocks:,} blocks x {args.num_train_epochs:g} epochs / {batch_rows} blocks per step")
    if budgeted:
        steps = "planned after the first steps to end within --max_train_seconds"
    schedule = f"; schedule {data_args.block_size_schedule}" if data_args.block_size_schedule else ""
    rows = [
        ("architecture", run.config.architecture_name),
        ("parameters", f"{count_parameters(model):,} ({trainable:,} trainable)"),
        ("FLOPs/token", f"{model.flops_per_token(data.block_size):,.0f} (training, at {data.block_size} tokens)"),
        ("data", run.raw.description),
        ("blocks", f"{blocks} of {data.block_size} tokens{schedule}"),
        ("tokenizer", run.tokenizer_source),
        ("batch", f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation "
                  f"x {args.world_size} processes = {batch_rows} blocks/step"),
        ("steps", steps),
        ("optimizer", f"{getattr(args.optim, 'value', args.optim)}, learning rate {args.learning_rate:g}, "
                      f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} schedule"
                      + (f", recipe {run_args.recipe}" if run_args.recipe else "")),
        ("device", f"{args.device} ({peak})"),
        ("output", os.path.abspath(args.output_dir)),
    ]
    return f"ArchLM training run\n{format_report(rows)}\n{run.config.summary()}"


def log_header(run: Setup, data_args: DataArguments, training_args: TrainingArguments, peak_tflops: float) -> dict:
    """What training_log.json says about the run before its steps."""
    model = base_model(run.model)
    return {
        "architecture_name": run.config.architecture_name,
        "config": run.config.to_dict(),
        "parameters": count_parameters(model),
        "trainable_parameters": count_parameters(run.model, trainable_only=True),
        "flops_per_token": model.flops_per_token(run.data.block_size),
        "peak_tflops": peak_tflops,
        "data": run.raw.description,
        "block_size": run.data.block_size,
        "block_size_schedule": data_args.block_size_schedule,
        "train_blocks": run.data.train_blocks,
        "validation_blocks": run.data.validation_blocks,
        "tokenizer": run.tokenizer_source,
        "planned_steps": (None if training_args.max_steps == PROVISIONAL_STEPS
                          else planned_steps(run.data.train_blocks, training_args)[1]),
        "seed": training_args.seed,
    }


def main(argv: list[str] | None = None, callbacks: list | None = None) -> str:
    model_args, data_args, run_args, training_args = parse_args(argv)
    # INFO to stdout, unless the caller (a notebook, a test runner) has set logging up already
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    connect_deepspeed(training_args)  # before the model is built: ZeRO-3 partitions it as it is created
    try:
        run = setup(model_args, data_args, run_args, training_args)
    except SETUP_ERRORS as error:
        raise SystemExit(f"train.py: error: {error}") from None
    output_dir, device = training_args.output_dir, training_args.device

    # From here on the output folder is written.
    if run_args.overwrite_output_dir and run.checkpoint is None and training_args.should_save:
        clear_output_dir(output_dir)
    if training_args.should_save:
        run.tokenizer.save_pretrained(output_dir)  # a resumed run finds it in the checkpoints too

    probe_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    peak_tflops = run_args.peak_tflops or measure_peak_tflops(device, probe_dtype)
    peak = f"peak {peak_tflops:.3g} TFLOP/s, {'given' if run_args.peak_tflops else 'measured'}"
    logger.info(startup_report(run, data_args, run_args, training_args, peak))

    reprobe = None if run_args.peak_tflops else lambda: measure_peak_tflops(device, probe_dtype, seconds=0.3) * 1e12
    throughput = ThroughputCallback(base_model(run.model).flops_per_token, peak_tflops * 1e12, device,
                                    lambda step: block_size_at(run.schedule, step), reprobe=reprobe)
    training_log = TrainingLogCallback(output_dir, log_header(run, data_args, training_args, peak_tflops))
    router_stats = [RouterStatsCallback(base_model(run.model))] if run.config.num_experts else []
    recipe = getattr(run_args, "recipe_record", None)
    if recipe:
        training_log.header["recipe"] = recipe
    fitted_dropout = repeat_dropout(run, recipe, training_args)
    budget = time_budget(run, run_args, training_args)
    chars_per_token = characters_per_token(run.data.validation, run.tokenizer)
    training_log.header["validation_characters_per_token"] = chars_per_token
    if budget is not None:
        training_log.header["budget"] = budget.record()
    trainer = ArchLMTrainer(
        model=run.model,
        args=training_args,
        train_dataset=run.data.train,
        eval_dataset=run.data.validation,
        processing_class=run.tokenizer,
        data_collator=default_data_collator,
        callbacks=[throughput, training_log, *router_stats, *fitted_dropout, *(callbacks or [])],
        block_size_schedule=run.schedule if len(run.schedule) > 1 else None,
        time_budget=budget,
        characters_per_token=chars_per_token,
    )
    try:
        check_launch(trainer)
    except ValueError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    try:
        with terminated_as_an_exception():
            trainer.train(resume_from_checkpoint=run.checkpoint)
    except NonFiniteLossError as error:
        training_log.stop(training_args, trainer.state, str(error))
        checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
        resume = (f"the last checkpoint, {checkpoints[-1].name}, holds the finite weights before it "
                  "(--resume_from_checkpoint latest)" if checkpoints else "no checkpoint was saved before it")
        raise SystemExit(f"train.py: error: training stopped: {error}; the model was not saved; {resume}") from None
    except BaseException as error:  # Ctrl+C, out of memory, ...: the steps logged since the log's last write are
        # kept, and the log says the run stopped and why (a resumed run writes it again)
        with contextlib.suppress(Exception):  # (a full disk must not hide the error that stopped the run)
            training_log.stop(training_args, trainer.state,
                              f"interrupted at step {trainer.state.global_step}: {type(error).__name__} {error}".strip())
        raise
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    best_loaded = training_args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None
    if run.data.validation is not None and (not evals or evals[-1]["step"] != trainer.state.global_step or best_loaded):
        # the final weights' eval, unless the last step already ran one (the best checkpoint's weights, when the
        # Trainer loaded them at the end: the summary, log and model card describe the model saved)
        evals.append(trainer.evaluate())
    if evals:
        per_char = f", {evals[-1]['eval_nats_per_char']:.4f} nats/character" if chars_per_token else ""
        logger.info("Final eval_loss %.4f, perplexity %.2f%s", evals[-1]["eval_loss"], perplexity(evals[-1]["eval_loss"]),
                    per_char)
    save_model_folder(trainer, run.tokenizer, output_dir, lora=bool(model_args.lora_r))
    summary = {**run_summary(trainer.state, throughput, device), **distributed_summary(trainer)}
    for callback in fitted_dropout:  # the rate the recipe's dropout settled on, for the epochs the run made
        training_log.header["recipe"]["dropout"].update(callback.record())
    if budget is not None:  # the plan as it ended, and the seconds it took up to the saved model
        training_log.header["budget"] = summary["budget"] = budget.record(trainer.state)
        training_log.header["planned_steps"] = budget.planned_steps
    training_log.finish(training_args, trainer.state, summary)

    synced = needs_synced_generation(trainer.model_wrapped)  # sharded weights: every process generates
    if run_args.sample_prompt and (training_args.should_save or synced):
        text = sample(trainer.model, run.tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens,
                      training_args.seed, synced_gpus=synced)
        if training_args.should_save:
            logger.info("Sample (prompt %r):\n%s", run_args.sample_prompt, text)
    folder = os.path.abspath(output_dir)
    logger.info("Model folder: %s\n  load it with AutoModelForCausalLM.from_pretrained(%r, trust_remote_code=True)", folder, folder)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # leave together and tear the group down: a rank that exits while gloo or DeepSpeed's shared-memory
        # threads still run can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return output_dir


class Terminated(SystemExit):
    """SIGTERM (a scheduler preempting the job, `kill`), raised in the main thread as Ctrl+C raises
    KeyboardInterrupt, so that the run's log says it stopped and where; the exit status stays 128 + 15."""

    def __str__(self) -> str:
        return "SIGTERM"


@contextlib.contextmanager
def terminated_as_an_exception():
    """While training: SIGTERM raises Terminated instead of ending the process where it stands (the log would say
    "running" for ever). Only the main thread can set a handler; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_without_finalizing() -> None:
    """Ends a multi-process run once everything is written and the process group is gone, without the
    interpreter's finalization. There, on CPU (gloo, DeepSpeed's CPU ops), objects still referenced by the
    communication library's C++ threads are destroyed after Python is half torn down, and a rank sometimes aborts
    ("terminate called without an active exception", SIGABRT) — the launcher then reports a failed run although
    every file was saved. What finalization would still do is done here first: flush the logs and the streams,
    and close a wandb run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalizing()
