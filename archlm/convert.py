"""Convert between transformers' causal LMs and ArchLM models, with the same logits both ways.

    python -m archlm.convert --from-transformers IN_DIR OUT_DIR
    python -m archlm.convert --to-native IN_DIR OUT_DIR

`--from-transformers` loads IN_DIR (a local folder) with `AutoModelForCausalLM.from_pretrained`, converts it,
and saves the ArchLM model (config with `auto_map`, safetensors, remote code, generation config) to OUT_DIR.
`--to-native` loads the ArchLM model saved in IN_DIR and saves it as the native transformers family that
computes the same function (no remote code: vLLM, TGI and llama.cpp's converters load it as they load the
family's own checkpoints), after checking on a short input that both give the same logits.
Either way the tokenizer comes along when IN_DIR has one. OUT_DIR must be new or empty, and neither IN_DIR nor a
folder inside it: writing over a model folder would leave a mix of both models' files. `--overwrite` replaces a
non-empty OUT_DIR (its contents are deleted once the conversion has succeeded). In Python:

    >>> from archlm.convert import from_transformers, to_transformers
    >>> archlm_model = from_transformers(LlamaForCausalLM.from_pretrained(path))
    >>> llama = to_transformers(archlm_model)  # a LlamaForCausalLM again

Supported: GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), OLMo, OLMo 2, Phi, Phi-3,
GPT-NeoX, StableLM, Starcoder2, Cohere, Granite, SmolLM3, GPT-J, ..., and the mixtures of experts Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ... (`FAMILY_LIST`, in `archlm/families.py`; the mixtures' records in
`archlm/families_moe.py`, the `Family` record itself in `archlm/family_spec.py`). Each family is one declarative `Family`
record: which native config field holds each ArchLM field, the ArchLM values the family fixes and those it also
allows, key renames, and the few reversible weight operations (fused matrices split and re-fused, GPT-2's Conv1D
transposed, per-head norms stacked). The same record converts both ways and says what an ArchLM config sets that
the family cannot express.

Whatever a source config sets that the other side cannot represent (GPT-2's per-layer attention scaling, a
rotary fraction a class ignores, ALiBi, post-norm, ...) is refused with a `ValueError` that
names the field and its value (every such field, not only the first); nothing that changes the logits is
dropped silently, and the weights load with strict key checking. Two things carry over without an equal:

- a bias the target has and the ArchLM model lacks (Llama's `attention_bias` covers q, k, v and o; GPT-2
  has biases everywhere) is exported as zeros, which computes the same function;
- `hidden_dropout` / `embedding_dropout`, which the Llama-like families do not have, are dropped with a
  warning: dropout is off at inference, so the logits are unchanged, but training the export further
  would run without them. `init_scheme` only matters for a fresh initialisation and is dropped too.
"""

import argparse
import copy
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from .check import missing_local_folder
from .configuration_archlm import ArchLMConfig
from .families import FAMILIES, FAMILY_LIST
from .family_spec import Family, StateDict
from .modeling_archlm import ArchLMForCausalLM, grouped_mm_takes
from .tokenization_archlm import VOCABULARY_FILES

logger = logging.getLogger(__name__)


def _family_of(model: PreTrainedModel) -> Family:
    family = FAMILIES.get(type(model))
    if family is None:
        supported = ", ".join(cls.__name__ for cls in FAMILIES)
        raise ValueError(f"Cannot convert {type(model).__name__}; supported model classes: {supported}.")
    return family


# rope's frequency tables (GPT-J's: its sin/cos table), buffers that no state dict holds
ROPE_TABLES = ("inv_freq", "embed_positions")


def _load_like(target: PreTrainedModel, source: PreTrainedModel, state_dict: StateDict) -> PreTrainedModel:
    """`target` with `state_dict` loaded strictly, on the source's device and dtype, with its attention
    implementation, generation config and train/eval mode.

    The tensors the source keeps in another dtype than its parameters' stay in it: transformers loads a bf16 model
    with its routing biases (`_keep_in_fp32_modules_strict`) and rope frequencies in float32, where a cast model has
    them in bf16. So each tensor of the state dict keeps its own dtype, and rope's tables (computed, not loaded) the
    dtype of the source's, cast from the target's own float32 values."""
    parameter = next(source.parameters())
    rope_dtype = next((buffer.dtype for name, buffer in source.named_buffers() if name.endswith(ROPE_TABLES)), None)
    rope_tables = {name: buffer for name, buffer in target.named_buffers() if name.endswith(ROPE_TABLES)}
    target = target.to(device=parameter.device, dtype=parameter.dtype)
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        wanted = state_dict[name].dtype if name in state_dict else rope_dtype if name in rope_tables else None
        if wanted is None or wanted == tensor.dtype or not (tensor.is_floating_point() and wanted.is_floating_point):
            continue
        module_name, _, attribute = name.rpartition(".")
        module = target.get_submodule(module_name)
        if attribute in module._parameters:
            module._parameters[attribute].data = tensor.data.to(wanted)
        else:
            module._buffers[attribute] = rope_tables.get(name, tensor).to(device=parameter.device, dtype=wanted)
    target.load_state_dict(state_dict, strict=True)  # raises on any missing or unexpected key
    implementation = source.config._attn_implementation
    if implementation is not None and implementation != target.config._attn_implementation:
        try:
            target.set_attn_implementation(implementation)
        except (ValueError, ImportError) as error:  # e.g. Gemma 2 and VaultGemma run no sdpa; sinks need eager
            logger.warning("%s does not run attn_implementation=%r (%s): converted with %r.", type(target).__name__,
                           implementation, str(error).split(". ")[0], target.config._attn_implementation)
    target.generation_config = copy.deepcopy(source.generation_config)
    target.train(source.training)
    return target


def from_transformers(model: PreTrainedModel) -> ArchLMForCausalLM:
    """An `ArchLMForCausalLM` computing the same logits as `model` (any class in `FAMILIES`), on the same device,
    in the same dtype, with the same attention implementation, train/eval mode and generation config."""
    family = _family_of(model)
    config = family.to_archlm_config(model.config)
    state_dict = family.state_dict_to_archlm(model, config)
    return _load_like(ArchLMForCausalLM(config), model, state_dict)


def native_family(config: ArchLMConfig) -> type[PreTrainedModel]:
    """The transformers class an ArchLM config exports to: the class it was converted from (`converted_from`) when
    that class still expresses every setting, else the first family in `FAMILY_LIST` that does (the more specific
    families come first: Qwen3 before Qwen2 before Llama before Mistral). Where none can, a `ValueError` lists what
    the nearest family (the fewest mismatches) has no equivalent for."""
    mismatches = {family.model_class: family.mismatches(config) for family in FAMILY_LIST}
    preferred = [cls for cls in mismatches if cls.__name__ == config.converted_from]
    for target in preferred + list(mismatches):
        if not mismatches[target]:
            return target
    # ties go to the class it came from, then to a family with experts for a mixture (one without, for a dense model)
    target = min(mismatches, key=lambda model_class: (
        len(mismatches[model_class]), model_class not in preferred,
        ("num_experts" in FAMILIES[model_class].fields) != bool(config.num_experts)))
    listed = "\n".join(f"  - {line}" for line in mismatches[target])
    raise ValueError(
        f"Cannot export this ArchLM model ({config.architecture_name}) to a native transformers family. The "
        f"nearest is {target.__name__}, which has no equivalent for:\n{listed}\n"
        "Share it with its remote code instead (trust_remote_code=True)."
    )


def is_archlm_model(model) -> bool:
    """An ArchLMForCausalLM, this package's class or the remote-code copy a folder carries (AutoModelForCausalLM with
    trust_remote_code loads that copy, a class of its own in transformers_modules, with the same modules)."""
    return isinstance(model, ArchLMForCausalLM) or (
        type(model).__name__ == ArchLMForCausalLM.__name__ and getattr(model.config, "model_type", None) == "archlm")


def to_transformers(model: ArchLMForCausalLM) -> PreTrainedModel:
    """The native transformers model (see `native_family`) that computes the same logits as `model`, on the same
    device, in the same dtype, with the same attention implementation, train/eval mode and generation config. It
    loads, and serves, without remote code. A bias the native class has and the ArchLM model lacks is zeros."""
    if not is_archlm_model(model):
        raise ValueError(f"to_transformers exports an ArchLMForCausalLM, got {type(model).__name__}.")
    family = FAMILIES[native_family(model.config)]
    target = family.model_class(family.to_native_config(model.config))
    state_dict = family.state_dict_to_native(model)
    for key, value in target.state_dict().items():
        if key not in state_dict and key.endswith(".bias"):
            state_dict[key] = torch.zeros_like(value, dtype=model.dtype, device=model.device)
    target = _load_like(target, model, state_dict)
    stacks = [parameter for name, parameter in model.named_parameters() if ".experts." in name and parameter.dim() == 3]
    if not all(grouped_mm_takes(stack.dtype, stack.shape) for stack in stacks):
        # transformers' default experts implementation is torch's grouped_mm too; ArchLM falls back by itself
        # (grouped_linear), the native class would fail
        target.set_experts_implementation("eager")
    return target


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


# A folder export is checked before it is written: both models on a short random batch, max |difference| over
# max |logit|. float32 agrees to rounding; half precision rounds each op differently.
EXPORT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_PRECISION_TOLERANCE = 2e-2


def _copy_tokenizer(in_dir: Path, out_dir: Path) -> None:
    if any((in_dir / name).exists() for name in VOCABULARY_FILES):
        AutoTokenizer.from_pretrained(in_dir).save_pretrained(out_dir)
        logger.info("Copied the tokenizer")
    else:
        logger.info("No tokenizer files in %s; saved the model only", in_dir)


def check_output_folder(in_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Refuses, before any work, an `out_dir` that would mix the converted model's files with others: `in_dir`
    itself, a folder inside it or holding it, a file, or (unless `overwrite`) a folder that is not empty."""
    source, target = in_dir.resolve(), out_dir.resolve()  # so that links and `..` cannot hide that both are one folder
    if target.is_relative_to(source) or source.is_relative_to(target):
        where = "is" if target == source else "is inside" if target.is_relative_to(source) else "holds"
        raise ValueError(
            f"OUT_DIR {str(out_dir)!r} {where} IN_DIR {str(in_dir)!r}: the converted model would be written among "
            "(or over) the input model's files. Choose an empty or new folder for OUT_DIR."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {str(out_dir)!r} is a file, not a folder. Choose an empty or new folder for OUT_DIR.")
    if out_dir.is_dir() and not overwrite:
        entries = sorted(path.name for path in out_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ValueError(
                f"OUT_DIR {str(out_dir)!r} is not empty (it holds {shown}): the converted model's files would be "
                "mixed with these. Choose an empty or new folder for OUT_DIR, or pass --overwrite (overwrite=True in "
                "Python) to delete its contents and replace them."
            )


def _clear_folder(folder: Path) -> None:
    """Deletes what `folder` holds (for `overwrite`), keeping the folder itself (it may be a mount point or a link)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.info("Deleted the previous contents of %s (overwrite)", folder)


def convert_folder(in_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> ArchLMForCausalLM:
    """Load a transformers checkpoint folder, convert it and save it (with its tokenizer, if any) as ArchLM into
    `out_dir`, which must be new or empty (see `check_output_folder`); `overwrite` replaces a non-empty one."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_output_folder(in_dir, out_dir, overwrite)
    source = AutoModelForCausalLM.from_pretrained(in_dir)
    logger.info("Loaded %s from %s", type(source).__name__, in_dir)
    archlm_model = from_transformers(source)
    if overwrite:  # only now that the conversion has succeeded
        _clear_folder(out_dir)
    archlm_model.save_pretrained(out_dir)
    logger.info("Saved %s to %s", archlm_model.config.architecture_name, out_dir)
    _copy_tokenizer(in_dir, out_dir)
    return archlm_model


@torch.no_grad()
def export_logit_error(archlm_model: ArchLMForCausalLM, native: PreTrainedModel, seq_len: int = 16) -> float:
    """Max relative logit difference between the two models on a seeded random batch of 2 x `seq_len` tokens."""
    config = archlm_model.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, min(seq_len, config.max_position_embeddings)), generator=generator,
                              device="cpu")
    input_ids = input_ids.to(archlm_model.device)
    modes = {model: model.training for model in (archlm_model, native)}
    for model in modes:
        model.eval()
    ours, theirs = archlm_model(input_ids).logits.float(), native(input_ids).logits.float()
    for model, training in modes.items():
        model.train(training)
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def export_folder(in_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> PreTrainedModel:
    """Load the ArchLM model saved in `in_dir`, export it with `to_transformers`, check the logits agree, and save
    the native model (config, safetensors, generation config; no remote code) and the tokenizer to `out_dir`, which
    must be new or empty (see `check_output_folder`); `overwrite` replaces a non-empty one."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_output_folder(in_dir, out_dir, overwrite)
    native_family(ArchLMConfig.from_pretrained(in_dir))  # refuse what has no native family before loading weights
    archlm_model = ArchLMForCausalLM.from_pretrained(in_dir)
    logger.info("Loaded %s from %s", archlm_model.config.architecture_name, in_dir)
    native = to_transformers(archlm_model)
    error = export_logit_error(archlm_model, native)
    tolerance = EXPORT_TOLERANCE.get(archlm_model.dtype, HALF_PRECISION_TOLERANCE)
    if not error <= tolerance:
        raise RuntimeError(
            f"The {type(native).__name__} export's logits differ from the ArchLM model's by {error:.2e} (relative), "
            f"more than {tolerance:.0e}; nothing was saved. Please report this as a bug."
        )
    if overwrite:  # only now that the export has been checked
        _clear_folder(out_dir)
    native.save_pretrained(out_dir)
    logger.info("Saved %s to %s (max relative logit difference %.2e)", type(native).__name__, out_dir, error)
    _copy_tokenizer(in_dir, out_dir)
    if (out_dir / "tokenizer.json").exists():
        _warn_if_auto_tokenizer_differs(out_dir, native.config.model_type)
    return native


TOKENIZER_PROBE = "def f(x):\r\n\t  return 'é' + \"e\u0301\"  # 🙂\n\n"


def _warn_if_auto_tokenizer_differs(folder: Path, model_type: str) -> None:
    """transformers 5 replaces the saved pipeline with its own for some model types (qwen2: `Qwen2Tokenizer`, with
    NFC and Qwen's split), whatever `tokenizer_config.json` names; the token ids then differ from training's."""
    exact = PreTrainedTokenizerFast.from_pretrained(folder)
    auto = AutoTokenizer.from_pretrained(folder)
    if auto(TOKENIZER_PROBE)["input_ids"] != exact(TOKENIZER_PROBE)["input_ids"]:
        logger.warning(
            "AutoTokenizer loads this %s folder as %s, which tokenizes differently from the saved tokenizer.json. "
            "Load the tokenizer with PreTrainedTokenizerFast.from_pretrained(...) to get the ids the model was "
            "trained on.", model_type, type(auto).__name__,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m archlm.convert", description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-transformers", nargs=2, metavar=("IN_DIR", "OUT_DIR"),
        help="convert the transformers causal LM saved in IN_DIR into an ArchLM model saved in OUT_DIR",
    )
    direction.add_argument(
        "--to-native", nargs=2, metavar=("IN_DIR", "OUT_DIR"),
        help="export the ArchLM model saved in IN_DIR as its native transformers family (the class it was converted "
             "from, else the first family that expresses it; no remote code) into OUT_DIR",
    )
    direction.add_argument(
        "--to-gguf", nargs=2, metavar=("MODEL_DIR", "OUT_GGUF"),
        help="write the model saved in MODEL_DIR (ArchLM, through its native family) and its tokenizer as one GGUF "
             "file for llama.cpp (see archlm/gguf.py); a model llama.cpp cannot run is refused, naming why",
    )
    parser.add_argument("--dtype", choices=("f32", "f16", "q8_0"), help="--to-gguf only: the matrices' type (f32)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the contents of a non-empty OUT_DIR (deleted once the conversion has succeeded); without it "
             "OUT_DIR must be new or empty. OUT_DIR is never allowed to be IN_DIR, inside it, or hold it",
    )
    args = parser.parse_args(argv)
    if args.dtype and not args.to_gguf:
        parser.error("--dtype applies to --to-gguf only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    in_dir = (args.from_transformers or args.to_native or args.to_gguf)[0]
    # (--from-transformers and --to-native also take a Hub id; a GGUF is written from a folder on this machine)
    if missing_local_folder(in_dir) or (args.to_gguf and not Path(in_dir).expanduser().is_dir()):
        parser.error(f"IN_DIR {in_dir!r}: no such folder")
    try:
        if args.from_transformers:
            convert_folder(*args.from_transformers, overwrite=args.overwrite)
        elif args.to_gguf:
            from .gguf import export_gguf  # needs the gguf package, which only this direction uses

            export_gguf(*args.to_gguf, dtype=args.dtype or "f32", overwrite=args.overwrite)
        else:
            export_folder(*args.to_native, overwrite=args.overwrite)
    except ValueError as error:  # a model the other side cannot express: the message lists why
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except OSError as error:  # a Hub id not found or unreachable, an unwritable OUT: the message, without a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()


__all__ = [
    "FAMILIES",
    "Family",
    "check_output_folder",
    "convert_folder",
    "export_folder",
    "from_transformers",
    "native_family",
    "to_transformers",
]
