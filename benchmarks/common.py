"""Timing, machine and output helpers shared by the benchmark scripts (imported as `common`: the scripts run
from this folder's parent with `python benchmarks/NAME.py`, which puts this folder on sys.path)."""

import gc
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import CompileConfig, StaticCache

from archlm import ArchLMConfig

logger = logging.getLogger("benchmarks")


def add_model_flags(parser, hidden=512, layers=4, heads=8, kv_heads=4, vocab=8192) -> None:
    """The flags of the llama-preset model the speed and memory benchmarks measure."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv_heads", type=int, default=kv_heads)
    parser.add_argument("--vocab", type=int, default=vocab)


def llama_config(args, **overrides) -> ArchLMConfig:
    """The llama preset at the sizes `add_model_flags` parsed; `overrides` win."""
    return ArchLMConfig.from_preset(
        "llama", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab, **overrides,
    )


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def seconds(fn, device: str = "cpu") -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_seconds(model, ids, new_tokens: int, **kwargs) -> float:
    """Greedy generation of exactly `new_tokens`; a callable `past_key_values` makes a fresh cache for this call."""
    if callable(kwargs.get("past_key_values")):
        kwargs["past_key_values"] = kwargs["past_key_values"]()
    return seconds(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                          pad_token_id=0, **kwargs), str(ids.device))


class Interleaved(dict):
    """The median time per model (the dict's values) and every pair's times (`samples`)."""

    def __init__(self, samples: dict[str, list[float]]):
        super().__init__({name: statistics.median(values) for name, values in samples.items()})
        self.samples = samples

    def pair_ratios(self, name: str = "archlm") -> list[float]:
        """Each pair's (other model's time) / (name's time), sorted: > 1 where `name` was faster in that pair. On a
        noisy machine the share of pairs above 1 tells a tie (about half) from a real difference (nearly all)."""
        other = next(key for key in self.samples if key != name)
        return sorted(theirs / ours for ours, theirs in zip(self.samples[name], self.samples[other]))


def interleaved(models: dict, measure, pairs: int) -> Interleaved:
    """`measure(model)` (a time) per model `pairs` times, alternating which model goes first in each pair."""
    names = list(models)
    for name in names:
        measure(models[name])  # warm-up
    samples = {name: [] for name in names}
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            samples[name].append(measure(models[name]))
    return Interleaved(samples)


def decode_ms_per_token(model, ids, new_tokens: int, repeats: int, compiled: bool = False, **kwargs) -> float:
    """Median decode time per token with the prompt's prefill left out: (t(N tokens) - t(1 token)) / (N - 1).

    With `cache_implementation="static"` every call gets a fresh StaticCache of the same length, so the 1-token and
    the N-token runs have the same shapes and a compiled forward is built once. `compiled` compiles the decode steps
    (transformers' CompileConfig, also on CPU); without it compilation is off, also on GPUs, where generate would
    otherwise compile a static cache by itself.
    """
    if kwargs.get("cache_implementation") == "static":
        kwargs.pop("cache_implementation")
        max_cache_len = ids.shape[1] + new_tokens
        kwargs["past_key_values"] = lambda: StaticCache(config=model.config, max_cache_len=max_cache_len)
        if compiled:
            compile_config = CompileConfig(fullgraph=True)
            compile_config._compile_all_devices = True  # transformers compiles only on GPUs unless told
            kwargs["compile_config"] = compile_config
        else:
            kwargs["disable_compile"] = True
    elif compiled:
        raise ValueError("compiled decoding needs cache_implementation='static'")
    generate_seconds(model, ids, 2, **kwargs)  # warm-up: allocations, static cache build, compilation
    samples = []
    for _ in range(repeats):
        one = generate_seconds(model, ids, 1, **kwargs)
        many = generate_seconds(model, ids, new_tokens, **kwargs)
        samples.append(max(many - one, 1e-9) / (new_tokens - 1) * 1000)
    return statistics.median(samples)


def start_peak_memory(device: str) -> int:
    """Restart the peak-memory count and return the bytes in use now (GPU: allocator; CPU: resident set, Linux)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (VmHWM) from here
    return _proc_status_bytes("VmRSS")


def peak_memory_since(device: str, base: int) -> int:
    """Peak bytes above `base` since `start_peak_memory`."""
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _proc_status_bytes("VmHWM")
    return peak - base


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def write_results(output_dir: str | Path, name: str, results: dict, table: str, plot) -> Path:
    """NAME.json, NAME.md and NAME.png (drawn by `plot(results, path)`) in `output_dir`; prints the table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(table + "\n")
    plot(results, output_dir / f"{name}.png")
    print(table)
    logger.info("\nwrote %s/%s.{json,md,png}", output_dir, name)
    return output_dir
