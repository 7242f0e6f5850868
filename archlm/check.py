"""Conformance checker: run the contracts every ArchLM model must keep, on *your* architecture.

    python -m archlm.check --preset llama --config_overrides "hidden_size=256,num_hidden_layers=4"
    python -m archlm.check --model path/to/saved_folder
    python -m archlm.check --preset gpt2 --tiny          # same choices, shrunk sizes: seconds on a CPU

or from Python: `archlm.check_model(config_or_model)`. Prints a pass/fail table; the command exits
non-zero when any contract fails. Contracts:

    cache == full forward     decoding token by token with the KV cache gives the logits of one full pass
    static == dynamic         greedy generation with a static cache equals the dynamic cache (tokens, logits)
    eager == sdpa             both attention implementations agree on a left-padded batch
    checkpointing == none     gradient checkpointing changes neither loss nor gradients
    save == load              save_pretrained -> from_pretrained gives the same logits (and tied weights stay tied)
    padding invariance        a left-padded batch gives each prompt's logits and generation as if alone
    fully masked row finite   a sequence whose attention mask is all zeros gives finite logits (eager and sdpa)
"""

import argparse
import json
import copy
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_archlm import ArchLMConfig, parse_config_overrides
from .modeling_archlm import ArchLMForCausalLM

logger = logging.getLogger(__name__)

# fp32 on CPU: the paths differ only in summation order
RTOL, ATOL = 1e-4, 1e-5
GENERATED_TOKENS = 6


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class CheckReport:
    architecture: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    def table(self) -> str:
        width = max(len(result.name) for result in self.results)
        lines = [f"ArchLM conformance: {self.architecture}", "", f"| {'contract'.ljust(width)} | result | detail |",
                 f"|{'-' * (width + 2)}|--------|--------|"]
        for result in self.results:
            lines.append(f"| {result.name.ljust(width)} | {'PASS' if result.passed else 'FAIL'}   | {result.detail} |")
        failed = sum(not result.passed for result in self.results)
        lines += ["", f"{len(self.results) - failed} passed, {failed} failed"]
        return "\n".join(lines)


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    """close within RTOL/ATOL; the detail gives the largest absolute difference."""
    difference = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    close = torch.allclose(actual.float(), expected.float(), rtol=RTOL, atol=ATOL) and torch.isfinite(actual).all().item()
    return close, f"max |diff| {difference:.2e}"


def _prompts(config: ArchLMConfig, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second shorter and left-padded: (ids (2, T), attention_mask (2, T))."""
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, : seq_len // 3] = 0
    ids[1, : seq_len // 3] = config.pad_token_id if config.pad_token_id is not None else 0
    return ids, mask


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` derives from a left-padded mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def check_cache_vs_full(model, ids, mask) -> tuple[bool, str]:
    sequence = ids[:1]
    full = model(sequence, use_cache=False).logits
    prefill = sequence.shape[1] // 2
    out = model(sequence[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for position in range(prefill, sequence.shape[1]):
        out = model(sequence[:, position : position + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return _max_error(torch.cat(steps, dim=1), full)


def _greedy(model, ids, mask, max_new_tokens, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=model.config.pad_token_id or 0, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def check_static_vs_dynamic(model, ids, mask) -> tuple[bool, str]:
    """The padded batch, and its first prompt alone: without padding sdpa gets no mask at all (is_causal), and a
    static cache holds more keys than the prompt."""
    results = []
    for batch, batch_mask in ((ids, mask), (ids[:1], mask[:1])):
        dynamic_tokens, dynamic_logits = _greedy(model, batch, batch_mask, GENERATED_TOKENS)
        static_tokens, static_logits = _greedy(model, batch, batch_mask, GENERATED_TOKENS, cache_implementation="static")
        results.append((*_max_error(static_logits, dynamic_logits), torch.equal(static_tokens, dynamic_tokens)))
    close, detail, same_tokens = next((result for result in results if not (result[0] and result[2])), results[0])
    return close and same_tokens, detail + ("" if same_tokens else "; generated tokens differ")


def _with_attn(model, implementation: str, fn: Callable):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        return fn()
    finally:
        model.set_attn_implementation(previous)


def _implementations(config: ArchLMConfig) -> list[str]:
    """The attention implementations this architecture runs with (soft-capped scores: eager only on CPU)."""
    return ["eager"] if config.attn_logit_softcapping is not None else ["eager", "sdpa"]


def check_eager_vs_sdpa(model, ids, mask) -> tuple[bool, str]:
    if "sdpa" not in _implementations(model.config):
        return True, "n/a: attention soft-capping needs the scores, which sdpa does not expose"
    position_ids = generate_position_ids(mask)
    run = lambda: model(ids, attention_mask=mask, position_ids=position_ids).logits  # noqa: E731
    eager, sdpa = _with_attn(model, "eager", run), _with_attn(model, "sdpa", run)
    real = mask.bool()  # padded positions have no meaningful output
    return _max_error(sdpa[real], eager[real])


def check_checkpointing(model, ids, mask) -> tuple[bool, str]:
    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same dropout masks in both runs; checkpointing replays the RNG state
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        loss, grads = loss_and_grads()
        model.activation_checkpointing_enable()
        try:
            loss_ckpt, grads_ckpt = loss_and_grads()
        finally:
            model.activation_checkpointing_disable()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    if grads.keys() != grads_ckpt.keys():
        return False, f"gradients for different parameters: {sorted(grads.keys() ^ grads_ckpt.keys())[:3]}"
    worst = max(grads, key=lambda name: (grads[name] - grads_ckpt[name]).abs().max().item())
    loss_ok, loss_detail = _max_error(loss_ckpt, loss)
    grad_ok, grad_detail = _max_error(grads_ckpt[worst], grads[worst])
    return loss_ok and grad_ok, f"loss {loss_detail}; grads {grad_detail} ({worst})"


def check_save_load(model, ids, mask) -> tuple[bool, str]:
    expected = model(ids, attention_mask=mask).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = type(model).from_pretrained(folder, attn_implementation=model.config._attn_implementation).eval()
    close, detail = _max_error(loaded(ids, attention_mask=mask).logits, expected)
    if model.config.tie_word_embeddings and loaded.lm_head.weight is not loaded.model.embed_tokens.weight:
        return False, "lm_head and embed_tokens are no longer the same tensor after loading"
    return close, detail


def check_padding_invariance(model, ids, mask) -> tuple[bool, str]:
    padded = model(ids, attention_mask=mask, position_ids=generate_position_ids(mask)).logits
    errors, ok = [], True
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real]).logits[0]
        row_ok, detail = _max_error(padded[row, real], alone)
        ok, errors = ok and row_ok, errors + [detail]
    tokens_batched, _ = _greedy(model, ids, mask, GENERATED_TOKENS)
    real = mask[1].bool()
    tokens_alone, _ = _greedy(model, ids[1:, real], mask[1:, real], GENERATED_TOKENS)
    same_generation = torch.equal(tokens_batched[1, -GENERATED_TOKENS:], tokens_alone[0, -GENERATED_TOKENS:])
    return ok and same_generation, "; ".join(errors) + ("" if same_generation else "; generation differs when padded")


def check_fully_masked_row(model, ids, mask) -> tuple[bool, str]:
    mask = mask.clone()
    mask[1] = 0
    finite = {impl: _with_attn(model, impl, lambda: torch.isfinite(model(ids, attention_mask=mask).logits).all().item())
              for impl in _implementations(model.config)}
    return all(finite.values()), ", ".join(f"{impl}: {'finite' if ok else 'NaN/inf'}" for impl, ok in finite.items())


CONTRACTS: dict[str, Callable] = {
    "cache == full forward": check_cache_vs_full,
    "static == dynamic": check_static_vs_dynamic,
    "eager == sdpa": check_eager_vs_sdpa,
    "checkpointing == none": check_checkpointing,
    "save == load": check_save_load,
    "padding invariance": check_padding_invariance,
    "fully masked row finite": check_fully_masked_row,
}


PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
PER_LAYER_KEYS = ("full_attention", "sliding_attention")  # rope_parameters nested by layer type


def tiny_version(config: ArchLMConfig) -> ArchLMConfig:
    """The same architecture choices at a size that checks in seconds (2 layers, 64 wide, 4 heads)."""
    small = config.to_dict()
    heads = 4
    kv_heads = 1 if config.num_key_value_heads == 1 else (heads if config.num_key_value_heads == config.num_attention_heads else 2)
    # every kind of layer the model has (sliding or full, rope or not), in at least two layers: each per-layer list
    # keeps the first layer of each kind
    per_layer = [key for key in PER_LAYER_FIELDS if small.get(key) is not None]
    kinds = list(zip(*(small[key] for key in per_layer)))
    first_of_kind = {}
    for index, kind in enumerate(kinds):
        first_of_kind.setdefault(kind, index)
    layers = sorted(first_of_kind.values())
    layers += layers[-1:] * (2 - len(layers))
    for key in per_layer:
        small[key] = [small[key][index] for index in layers]
    small.pop("no_rope_layer_interval", None)  # no_rope_layers, cut above, says which layers skip rope
    small.update(hidden_size=64, num_hidden_layers=len(layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=128, vocab_size=min(config.vocab_size, 512))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        small[key] = None if small[key] is None else 0 if isinstance(small[key], int) else [0]
    if config.sliding_window is not None:
        small["sliding_window"] = 8
    small.pop("auto_map", None)
    small["head_dim"] = 16
    if config.kv_lora_rank:  # latent attention at the same small widths
        small.update(kv_lora_rank=32, q_lora_rank=24 if config.q_lora_rank else None, qk_nope_head_dim=16, v_head_dim=16)
    rope = small.get("rope_parameters") or {}
    for params in [rope[key] for key in PER_LAYER_KEYS if key in rope] or [rope]:
        if params.get("rope_type") == "longrope":  # one factor per rotated channel pair
            pairs = int(16 * (params.get("partial_rotary_factor") or 1.0)) // 2
            for key in ("short_factor", "long_factor"):
                params[key] = params[key][:1] * pairs
    return ArchLMConfig(**small)


def check_model(config_or_model, seq_len: int = 16, seed: int = 0, contracts: list[str] | None = None,
                verbose: bool = True) -> CheckReport:
    """Run the contracts on an `ArchLMConfig` (a model is built from it) or on an `ArchLMForCausalLM`.

    A given model is checked on a deep copy in float32, so the caller's model is left untouched."""
    if isinstance(config_or_model, ArchLMConfig):
        torch.manual_seed(seed)
        model = ArchLMForCausalLM(config_or_model)
    elif isinstance(config_or_model, ArchLMForCausalLM):
        model = copy.deepcopy(config_or_model)
    else:
        raise TypeError(f"check_model takes an ArchLMConfig or an ArchLMForCausalLM, got {type(config_or_model).__name__}.")
    unknown = set(contracts or []) - set(CONTRACTS)
    if unknown:
        raise ValueError(f"Unknown contract(s) {sorted(unknown)}; available: {list(CONTRACTS)}.")
    model = model.float().eval()
    if model.config.sliding_window is not None:
        seq_len = max(seq_len, model.config.sliding_window + 4)  # exercise the window itself
    if model.config.position_embedding_type == "learned" or model.config.learned_position_embeddings:
        # learned positions end at max_position_embeddings: leave room for the generated tokens
        seq_len = min(seq_len, model.config.max_position_embeddings - GENERATED_TOKENS)
        if seq_len < 4:
            raise ValueError(f"max_position_embeddings={model.config.max_position_embeddings} is too short to check "
                             f"(needs at least {GENERATED_TOKENS + 4}).")
    ids, mask = _prompts(model.config, seq_len, torch.Generator().manual_seed(seed))
    report = CheckReport(model.config.architecture_name)
    for name in contracts or CONTRACTS:
        try:
            with torch.no_grad() if name != "checkpointing == none" else torch.enable_grad():
                passed, detail = CONTRACTS[name](model, ids, mask)
        except Exception as error:  # a contract that crashes is a failed contract, reported with its cause
            passed, detail = False, f"{type(error).__name__}: {error}"
        report.results.append(CheckResult(name, passed, detail))
    if verbose:
        print(report.table())
    return report


def missing_local_folder(name: str) -> bool:
    """Whether `name` means a folder on this machine that is not there: it is written as a path (./, /, ~) or its
    first component is a local folder (runs/demo when runs/ exists). Caught before from_pretrained, which would
    take it for a Hub id and retry the network for a minute before an error that never says "no such folder"."""
    path = Path(name).expanduser()
    if path.exists():
        return False
    return name.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def model_folder_problem(model_dir: str | Path, other_models: str) -> str | None:
    """What keeps `model_dir` from being a saved ArchLM model with its tokenizer, said with the folder's name, or
    None. `other_models` ends the message for a folder of another model type (what to use for those instead)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return f"model folder '{model_dir}' does not exist (or is not a folder)"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"'{model_dir}' has no config.json: it is not a saved model folder"
    except ValueError as error:
        return f"'{model_dir}/config.json' is not valid JSON ({error})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "archlm":
        return f"'{model_dir}' holds a {model_type!r} model, not an ArchLM one (model_type 'archlm'); {other_models}"
    if not (folder / "tokenizer_config.json").is_file():
        return (f"'{model_dir}' has no tokenizer (tokenizer_config.json); save one with "
                "`tokenizer.save_pretrained(MODEL_DIR)`")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=ArchLMConfig.presets(), help="start from a preset architecture")
    source.add_argument("--model", help="a saved ArchLM folder (config.json + weights)")
    source.add_argument("--config", help="a config.json file or a folder holding one (fresh random weights)")
    parser.add_argument("--config_overrides", default="", help='"k=v,k=v" applied to the preset or config')
    parser.add_argument("--tiny", action="store_true", help="shrink sizes, keep every architecture choice")
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides = parse_config_overrides(args.config_overrides)
    if args.model:
        if overrides:
            parser.error("--config_overrides applies to --preset or --config, not to a trained --model")
        if missing_local_folder(args.model):
            parser.error(f"--model {args.model!r}: no such folder")
        subject = ArchLMForCausalLM.from_pretrained(args.model)
        if args.tiny:
            parser.error("--tiny applies to --preset or --config (a trained model keeps its sizes)")
    else:
        if args.preset:
            config = ArchLMConfig.from_preset(args.preset, **overrides)
        else:
            config = ArchLMConfig.from_pretrained(args.config, **overrides)
        subject = tiny_version(config) if args.tiny else config
    report = check_model(subject, seq_len=args.seq_len, seed=args.seed)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
